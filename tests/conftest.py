"""Shared test setup: one torch intra-op thread per test.

Tiny models on a shared 2-core machine run many times faster with one thread (two threads
spin-wait on each other); the setting is restored after every test. ``tests`` is a package, so
shared builders are imported as ``tests.tiny_models``, ``tests.reference`` and so on.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
