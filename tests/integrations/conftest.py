"""Shared setup for the integration tests: repo root importable, one torch thread per test.

Tiny models on a shared 2-core machine run many times faster with one intra-op thread (two
threads spin-wait on each other); the setting is restored after every test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
