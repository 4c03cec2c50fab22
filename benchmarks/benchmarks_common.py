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


def cuda_peak_memory(fn) -> int:
    """Peak bytes of CUDA memory allocated during ``fn`` above what was allocated at its start."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def interleaved_times(variants: dict, reps: int, sync=None) -> dict[str, list[float]]:
    """Seconds per call of each variant: one untimed warm-up call each, then ``reps`` rounds that run
    every variant once in turn, so that drifts of the machine's load hit all alike. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read: a GPU call is timed to its completion."""
    import time

    sync = sync or (lambda: None)
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def ratios_to(
    times: dict[str, list[float]], base: str = "step"
) -> dict[str, tuple[float, float, float, float]]:
    """Per variant: (median time / median ``base`` time, lowest and highest per-round ratio, fastest
    time / fastest ``base`` time).

    The last is what the timings say with the least noise when noise only ever adds time (another
    tenant of the machine, a page fault): on a quiet machine it agrees with the first."""
    import statistics

    med = statistics.median(times[base])
    out = {}
    for name, ts in times.items():
        per_round = [t / b for t, b in zip(ts, times[base], strict=True)]
        out[name] = (statistics.median(ts) / med, min(per_round), max(per_round), min(ts) / min(times[base]))
    return out


def ratio_text(r: tuple[float, float, float, float]) -> str:
    """``1.25x (1.01-1.60; fastest 1.10x)``: a :func:`ratios_to` entry as the benchmarks print it."""
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f}; fastest {r[3]:.2f}x)"


PATHS = ("ghost", "materialized", "rule", "module", "exact", "unused")


def path_counts(coverage: dict[str, list[str]], model) -> dict[str, str]:
    """``path -> "tensors (elements)"`` of a probe's ``coverage``: every path (zeros included), the
    usual ones first in the order of ``PATHS``."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    order = [p for p in PATHS if p in coverage] + sorted(set(coverage) - set(PATHS))
    return {
        path: f"{len(coverage[path])} ({sum(sizes.get(n, 0) for n in coverage[path]) / 1e3:.1f} k)"
        for path in order
    }


def zoo_case(name: str, n: int = 32, seed: int = 0):
    """``(model, batch, task_ids)``: zoo architecture ``name`` at the reproduction's dims and image
    size (the ``full`` preset's), and an ``n``-example probe batch from its collator, stratified over
    the seven tasks as the reproduction's held probe batch is (``build_probe_batch``). CPU, float32."""
    from dynamics.experiments.imax_dmax.constructions import build_bundle
    from dynamics.experiments.imax_dmax.data import EntryDataset, VLMCollator
    from dynamics.experiments.imax_dmax.presets import get_preset
    from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
    from dynamics.experiments.imax_dmax.tokenizer import build_tokenizer
    from dynamics.experiments.imax_dmax.zoo import get_arch
    from dynamics.integrations.probe_batch import build_probe_batch

    preset = get_preset("full")
    tok = build_tokenizer()
    arch = get_arch(name, size=preset.size, dims=preset.train.dims)
    images = max(12, n // 2)  # ~7.5 entries per IMAX image: enough of every task (and >= 10 images)
    ds = EntryDataset(build_bundle(images, 4, size=preset.size, seed=seed).imax, tok)
    batch, task_ids = build_probe_batch(ds, VLMCollator(arch, tok), len(TASK_NAMES), n, seed=seed)
    return arch.build(tok, seed=seed), batch, task_ids


def probe_variants(model, batch, task_ids) -> dict:
    """The three timed calls every probe benchmark compares: ``step`` (forward + backward, train mode),
    ``cold`` (``dynamics.probe`` with no stored example-axis verdicts: a run's first probe) and
    ``cached`` (the steady state the hooks pay)."""
    from dynamics import probe
    from dynamics.signals.axis_cache import clear

    def step() -> None:
        model.train()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def cold() -> None:
        clear(model)
        probe(model, batch, task_ids=task_ids)

    def cached() -> None:
        probe(model, batch, task_ids=task_ids)

    return {"step": step, "cold": cold, "cached": cached}


# The steady-state probe's steps, in the order it runs them: (module, function, label). Timed by
# wrapping those functions for the length of one measurement; a renamed function fails loudly here.
PROBE_PHASES = (
    ("dynamics.probing", "per_example_losses", "forward (hooked)"),
    ("dynamics.signals.gram", "plan", "plan"),
    ("dynamics.signals.gram", "_known_verdicts", "verdict lookup"),
    ("dynamics.signals.gram", "backward_to_outputs", "backward to outputs"),
    ("dynamics.signals.gram", "_add_factored", "factored products"),
    ("dynamics.signals.gram", "_add_elementwise", "closed-form rules"),
    ("dynamics.signals.gram", "_add_modules", "module-local"),
    ("dynamics.signals.gram", "_add_exact", "exact"),
)


def phase_times(model, batch, task_ids, reps: int) -> dict[str, list[float]]:
    """Seconds per round of a training step's two halves and of the steady-state probe's steps.

    Each round runs a step (``forward``, then ``backward`` with ``zero_grad``) and then a probe with
    cached example-axis verdicts, whose :data:`PROBE_PHASES` are timed inside it; ``probe: rest`` is
    what the probe spends outside them (signals from the Gram, checks, bookkeeping). The step's
    backward less the probe's backward to the layer outputs estimates the step's weight-gradient
    GEMMs, the work the probe's per-example products and Gram replace.
    """
    import importlib
    import time
    from contextlib import ExitStack
    from unittest import mock

    from dynamics import probe

    spent: dict[str, float] = {}

    def timed(fn, label):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        return run

    def step() -> tuple[float, float]:
        model.train()
        start = time.perf_counter()
        loss = model(**batch).loss
        mid = time.perf_counter()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return mid - start, time.perf_counter() - mid

    times: dict[str, list[float]] = {k: [] for k in ("step", "step: forward", "step: backward", "probe")}
    times.update({f"probe: {label}": [] for _, _, label in PROBE_PHASES})
    times["probe: rest"] = []
    with ExitStack() as patches:
        for module, name, label in PROBE_PHASES:
            mod = importlib.import_module(module)
            patches.enter_context(mock.patch.object(mod, name, timed(getattr(mod, name), label)))
        step()
        probe(model, batch, task_ids=task_ids)  # warm-up, and the verdicts the rounds reuse
        for _ in range(reps):
            fwd, bwd = step()
            times["step"].append(fwd + bwd)
            times["step: forward"].append(fwd)
            times["step: backward"].append(bwd)
            spent.clear()
            start = time.perf_counter()
            probe(model, batch, task_ids=task_ids)
            total = time.perf_counter() - start
            times["probe"].append(total)
            for _, _, label in PROBE_PHASES:
                times[f"probe: {label}"].append(spent.get(label, 0.0))
            times["probe: rest"].append(total - sum(spent.values()))
    return times


def phase_text(times: dict[str, list[float]], indent: str = "") -> str:
    """:func:`phase_times` as lines of medians in ms and as fractions of the step's median, then the
    steady-state probe's floor: the step with its weight-gradient GEMMs replaced by the products."""
    import statistics

    step = statistics.median(times["step"])
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"{indent}{k:30s} {1e3 * m:8.1f} ms  {m / step:5.2f} of a step" for k, m in med.items() if m > 0]
    wgrad = med["step: backward"] - med["probe: backward to outputs"]
    lines.append(
        f"{indent}{'step weight gradients (est.)':30s} {1e3 * wgrad:8.1f} ms  {wgrad / step:5.2f} of a step"
        " (step backward - probe backward to outputs)"
    )
    # The probe runs the step's forward and activation backward and, instead of the weight-gradient
    # GEMMs, the per-example products and Gram: 1 + (products - weight gradients) / step at best.
    floor = 1 + (med["probe: factored products"] - wgrad) / step
    lines.append(
        f"{indent}{'floor (est.)':30s} {floor:5.2f}x a step (1 + (factored products - step weight gradients)"
        f" / step), against the probe's {med['probe'] / step:.2f}x here"
    )
    return "\n".join(lines)
