"""Probe cost on the nine VLM architectures of the IMAX/DMAX reproduction, at the reproduction's dims.

Run:  python benchmarks/bench_probe_zoo.py                          (all nine, n = 32, 5 rounds; a few minutes)
      python benchmarks/bench_probe_zoo.py --archs llava,qwen2_vl --reps 1

Each architecture of ``dynamics.experiments.imax_dmax.zoo`` is built at the ``full`` preset's
``Dims`` and image size (CPU, float32, 1 thread) with an n-example probe batch from its own collator,
stratified over the seven tasks like the reproduction's held probe batch. Timed, interleaved in one
process: ``step`` (``model(**batch).loss.backward()``), ``probe (cold)`` (``dynamics.probe`` with no
stored example-axis verdicts: the first probe of a run) and ``probe (cached)`` (the steady state the
hooks pay). Printed: medians as multiples of the step's median (and the range of the per-round
ratios), then for every coverage path how many parameter tensors (and elements) it computed,
``exact`` included even when zero. Targets (issue 15): cached <= 1.2x, cold <= 1.5x, exact empty.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from benchmarks_common import (
    interleaved_times,
    path_counts,
    phase_text,
    phase_times,
    probe_variants,
    ratio_text,
    ratios_to,
    zoo_case,
)

from dynamics.experiments.imax_dmax.zoo import ARCHITECTURES


def measure(name: str, n: int, reps: int, phases: bool = False) -> tuple[float, float, int]:
    """Print one architecture's line; return (cached ratio, cold ratio, parameters on the exact path)."""
    from dynamics import probe

    model, batch, task_ids = zoo_case(name, n)

    times = interleaved_times(probe_variants(model, batch, task_ids), reps)
    r = ratios_to(times)
    coverage = probe(model, batch, task_ids=task_ids).coverage
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{name:10s} {n_params / 1e6:5.2f} M  n={n} T={batch['input_ids'].shape[1]:3d}  "
        f"step {1e3 * statistics.median(times['step']):7.1f} ms  "
        f"cached {ratio_text(r['cached'])}  cold {ratio_text(r['cold'])}",
        flush=True,
    )
    counts = path_counts(coverage, model)
    print(
        f"{'':10s} paths, tensors (elements): " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True
    )
    if phases:
        print(phase_text(phase_times(model, batch, task_ids, reps), indent=" " * 11), flush=True)
    return r["cached"][0], r["cold"][0], len(coverage.get("exact", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated zoo names")
    parser.add_argument("--n", type=int, default=32, help="probe batch size")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--phases", action="store_true", help="also time the step's halves and the steady-state probe's steps"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    names = args.archs.split(",")
    unknown = [a for a in names if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {sorted(ARCHITECTURES)}")
    print(
        f"CPU, {args.threads} thread(s), float32, reproduction dims ('full' preset), "
        f"medians of {args.reps} interleaved rounds (ratio range over rounds; fastest call over fastest step)"
    )
    results = {a: measure(a, args.n, args.reps, args.phases) for a in names}
    worst_cached = max(results, key=lambda a: results[a][0])
    worst_cold = max(results, key=lambda a: results[a][1])
    print(
        f"largest cached ratio {results[worst_cached][0]:.2f}x ({worst_cached}; target <= 1.2), "
        f"largest cold ratio {results[worst_cold][1]:.2f}x ({worst_cold}; target <= 1.5); "
        f"parameters on the exact path: "
        + (", ".join(f"{a} {r[2]}" for a, r in results.items() if r[2]) or "none")
    )


if __name__ == "__main__":
    main()
