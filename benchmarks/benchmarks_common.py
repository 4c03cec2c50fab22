"""Helpers shared by the benchmark scripts (run them from the repository root or benchmarks/)."""

from __future__ import annotations


def peak_memory(fn) -> int | None:
    """Peak bytes of CPU tensors alive during ``fn`` above those at its start (PyTorch memory profiler)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    except Exception as err:  # private API: report rather than fail the timing run
        print(f"(memory profile unavailable: {type(err).__name__}: {err})")
        return None
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]
