import sys
from pathlib import Path

import pytest
import torch

# tests/ holds the shared tiny models and the brute-force references
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores shared by several test runs: OpenMP spinning makes tiny ops 100x slower otherwise.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
