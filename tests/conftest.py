"""Shared test setup: one torch intra-op thread per test.

Tiny models on a shared 2-core machine run many times faster with one thread (two threads
spin-wait on each other). Session-scoped, so that module-scoped fixtures (references computed once
per module) run with the same thread count as the tests: float32 matmuls (e.g. rotary embeddings)
round differently with another blocking, which a 1e-8 float64 comparison sees. ``tests`` is a package, so
shared builders are imported as ``tests.tiny_models``, ``tests.reference`` and so on.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
