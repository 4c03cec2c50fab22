"""The probe under glibc's default malloc and with its memory kept mapped, in alternating processes.

Run:  python benchmarks/bench_allocator.py                      (Llama of bench_probe_lm.py, n = 32, 64 tokens; ~3 min)
      python benchmarks/bench_allocator.py --arch gpt2 --pairs 2

On CPU a probe allocates blocks larger than glibc's mmap threshold (per-example gradients of a whole
layer: 22 MB for a 256 x 688 weight at n = 32, T = 64) and glibc maps such blocks afresh for each
allocation and gives freed heap memory back, so the probe pays a page fault for every 4 kB it
writes into new memory. ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (glibc's tunables;
jemalloc or tcmalloc via ``LD_PRELOAD`` do the same job) keep the memory mapped instead. An
environment variable only acts at a process's start, so each setting runs in its own child process,
the two alternating ``--pairs`` times; each child times step, first probe and steady-state probe
interleaved (as ``bench_probe_lm.py`` does) and reports its minor page faults per steady-state probe
and its peak resident memory (what keeping the memory costs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

KEEP_MAPPED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def child(arch: str, n: int, seq: int, reps: int) -> None:
    """Time one setting in this process and print one JSON line."""
    import resource

    import torch
    import transformers
    from bench_probe_lm import build, lm_batch
    from benchmarks_common import interleaved_times, probe_variants

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    vocab = 2048
    model, batch = build(arch, vocab, max(seq, 128)), lm_batch(n, seq, vocab)
    variants = probe_variants(model, batch, torch.arange(n) % 4)
    times = interleaved_times(variants, reps)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    variants["cached"]()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    med = {k: statistics.median(v) for k, v in times.items()}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({**med, "faults": faults, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds in each child")
    parser.add_argument("--pairs", type=int, default=3, help="children per setting, alternating")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.arch, args.n, args.seq, args.reps)
        return
    settings = {"glibc default": {}, "memory kept mapped": KEEP_MAPPED}
    results: dict[str, list[dict]] = {k: [] for k in settings}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--arch",
        args.arch,
        "--n",
        str(args.n),
        "--seq",
        str(args.seq),
        "--reps",
        str(args.reps),
    ]
    for _ in range(args.pairs):
        for name, extra in settings.items():
            env = {k: v for k, v in os.environ.items() if k not in KEEP_MAPPED} | extra
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"{args.arch}, n = {args.n}, T = {args.seq}, CPU, 1 thread; {args.pairs} alternating processes per "
        f"setting, each the median of {args.reps} interleaved rounds; medians over the processes"
    )
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        cached = [r["cached"] / r["step"] for r in rows]
        cold = [r["cold"] / r["step"] for r in rows]
        print(
            f"  {name:19s} step {1e3 * med['step']:7.1f} ms  steady-state probe {statistics.median(cached):.2f}x "
            f"({min(cached):.2f}-{max(cached):.2f})  first probe {statistics.median(cold):.2f}x "
            f"({min(cold):.2f}-{max(cold):.2f})  page faults a probe {med['faults']:,.0f}  "
            f"peak resident {med['peak_mb']:,.0f} MB"
        )


if __name__ == "__main__":
    main()
