"""GPU figures in one run: probe / step on a ~110 M-parameter LM and on the VLM zoo, fp32 and bf16, memory, hook overhead.

    python benchmarks/bench_gpu.py --device cuda                          # ~5-8 min on an H100 / H200
    python benchmarks/bench_gpu.py --device cuda --quick                  # ~1 min subset
    python benchmarks/bench_gpu.py --device cpu --quick --tiny --archs llava,idefics3   # toy sizes: the code path

Everything is measured side by side in one process: interleaved rounds (each runs every variant
once, after one untimed warm-up call each), medians, and the range of the per-round ratios;
on CUDA ``torch.cuda.synchronize()`` runs before and after each timed call, and peak memory is
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, above what was allocated
at the call's start (on the CPU: PyTorch's memory profiler, ``benchmarks_common.peak_memory``).

Variants, for every model and precision:

* ``step``: a training step's forward + backward (``model(**batch).loss.backward()``, gradients freed);
* ``cold``: ``dynamics.signals.axis_cache.clear(model)`` then ``dynamics.probe``: a run's first probe;
* ``cached``: ``dynamics.probe`` again on the same batch: the steady state the hooks pay.

Precisions (every line says which):

* ``fp32``: float32 weights and inputs; TF32 as PyTorch's defaults leave it (printed in the header);
* ``bf16-cast``: ``model.to(torch.bfloat16)``, floating inputs cast too;
* ``bf16-autocast``: float32 weights; ``model.forward`` wrapped in ``torch.autocast(bfloat16)`` as
  accelerate (and so the HF Trainer with ``bf16=True``) wraps it, for the step and the probe alike:
  the forward runs in bf16, the backward follows it, the probe's own products run outside autocast.

Sections:

1. ``lm``: a Llama-style LM built from config (hidden 768, 12 layers, 12 heads, MLP 2,048, vocab
   32,000, tied embeddings, sdpa attention: 110 M parameters); n = 32 x 256 tokens and n = 8 x 1,024
   tokens (the last quarter of the rows padded, a prompt prefix without loss, four tasks).
2. ``zoo``: the nine architectures of ``dynamics.experiments.imax_dmax.zoo`` at the reproduction's
   dims (``full`` preset), an n = 32 probe batch from each one's collator, stratified over the seven
   tasks (``benchmarks_common.zoo_case``); also each model's coverage paths.
3. ``overhead``: ``bench_overhead.py``'s HF Trainer job (tiny LLaVA, 8 x 4 examples per step, logging
   every 10 steps): per-step per-task losses and the defaults against no callback, fp32 and ``--bf16``.

Targets (issue 15): cached probe <= 1.2x a step, cold <= 1.5x, no parameter on the exact path;
hook overhead <= 1.03x (losses) at the defaults. ``--budget-s`` bounds the wall time: each section
starts no new configuration past its share (lm 45 %, zoo 75 %, overhead 100 % of the budget) and
says what it skipped, so that a device command limit is never hit with nothing printed. A failing
configuration (an error, an out-of-memory) prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import statistics
import time
import traceback
from collections.abc import Callable, Iterator

import torch
from bench_probe_lm import lm_batch
from benchmarks_common import (
    cuda_peak_memory,
    interleaved_times,
    path_counts,
    peak_memory,
    probe_variants,
    ratio_text,
    ratios_to,
    zoo_case,
)
from torch import nn

PRECISIONS = ("fp32", "bf16-cast", "bf16-autocast")
LM_FULL = dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000)
LM_TINY = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512)


class Bench:
    """Device, timing and budget of one run; collects the ratios for the closing summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.summary: list[tuple[str, float, float, int]] = []  # (label, cached, cold, exact)
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self, share: float, what: str) -> bool:
        """True (and noted) when the run is past ``share`` of its budget: ``what`` is skipped."""
        if self.elapsed() > share * self.args.budget_s:
            self.skipped.append(what)
            print(
                f"  skipped (time budget, {self.elapsed():.0f} s of {self.args.budget_s:.0f} s): {what}",
                flush=True,
            )
            return True
        return False

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak(self, fn: Callable[[], None]) -> int | None:
        return cuda_peak_memory(fn) if self.cuda else peak_memory(fn)


@contextlib.contextmanager
def precision(
    model: nn.Module, batch: dict, name: str, device: torch.device
) -> Iterator[tuple[nn.Module, dict]]:
    """The model and batch to run in precision ``name`` (module docstring); the model is restored after."""
    if name == "fp32":
        yield model, batch
    elif name == "bf16-cast":
        cast = copy.deepcopy(model).to(torch.bfloat16)
        yield cast, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
        del cast
    elif name == "bf16-autocast":
        # accelerate's prepare_model(mixed_precision="bf16") wraps the bound forward the same way
        model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
        try:
            yield model, batch
        finally:
            del model.forward
    else:
        raise ValueError(f"unknown precision {name!r}; choose from {PRECISIONS}")


def measure(bench: Bench, label: str, model: nn.Module, batch: dict, task_ids: torch.Tensor) -> dict | None:
    """Time step / cold / cached, measure their peaks, print one line; None if it failed."""
    from dynamics import probe

    variants = probe_variants(model, batch, task_ids)
    try:
        times = interleaved_times(variants, bench.args.reps, bench.sync)
        peaks = {k: bench.peak(f) for k, f in variants.items()}
        coverage = probe(model, batch, task_ids=task_ids).coverage
    except Exception as err:  # one configuration failing must not end the run
        print(f"{label}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        print("   at " + traceback.format_exc().strip().splitlines()[-3].strip(), flush=True)
        model.zero_grad(set_to_none=True)
        if bench.cuda:
            torch.cuda.empty_cache()
        return None
    r = ratios_to(times)
    exact = len(coverage.get("exact", []))
    line = (
        f"{label}  step {1e3 * statistics.median(times['step']):8.1f} ms  "
        f"cached {ratio_text(r['cached'])}  cold {ratio_text(r['cold'])}  exact {exact}"
    )
    s = peaks["step"]
    if s is not None and peaks["cold"] is not None and peaks["cached"] is not None and s > 0:
        line += (
            f"\n{'':4s}peak MB above start: step {s / 2**20:.0f}; probe's extra over the step's: "
            f"cached {(peaks['cached'] - s) / 2**20:+.0f} MB ({(peaks['cached'] - s) / s:+.0%}), "
            f"cold {(peaks['cold'] - s) / 2**20:+.0f} MB ({(peaks['cold'] - s) / s:+.0%})"
        )
    print(line, flush=True)
    bench.summary.append((label, r["cached"][0], r["cold"][0], exact))
    return coverage


def build_lm(dims: dict, max_len: int) -> nn.Module:
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(cfg)


def section_lm(bench: Bench) -> None:
    args = bench.args
    dims = LM_TINY if args.tiny else LM_FULL
    shapes = [(8, 32), (4, 64)] if args.tiny else [(32, 256), (8, 1024)]
    if args.quick:
        shapes = shapes[:1]
    model = build_lm(dims, max(t for _, t in shapes)).to(bench.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n[lm] Llama from config: hidden {dims['hidden']}, {dims['layers']} layers, vocab {dims['vocab']}, "
        f"tied embeddings, sdpa: {n_params / 1e6:.1f} M parameters",
        flush=True,
    )
    for n, seq in shapes:
        batch = {k: v.to(bench.device) for k, v in lm_batch(n, seq, dims["vocab"]).items()}
        task_ids = torch.arange(n) % 4
        for prec in PRECISIONS:
            label = f"lm {prec:13s} n={n:2d} T={seq:4d}"
            if bench.over(0.45, label):
                continue
            with precision(model, batch, prec, bench.device) as (m, b):
                measure(bench, label, m, b, task_ids)
    del model
    if bench.cuda:
        torch.cuda.empty_cache()


def section_zoo(bench: Bench) -> None:
    from dynamics.experiments.imax_dmax.zoo import ARCHITECTURES

    args = bench.args
    names = args.archs.split(",") if args.archs else list(ARCHITECTURES)
    precisions = PRECISIONS[:1] if args.quick else PRECISIONS
    print(f"\n[zoo] reproduction dims ('full' preset), n = {args.zoo_n} from each collator", flush=True)
    for name in names:
        if bench.over(0.75, f"zoo {name}"):
            continue
        try:
            model, batch, task_ids = zoo_case(name, args.zoo_n)
        except Exception as err:
            print(f"zoo {name}: FAILED to build: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        model = model.to(bench.device)
        batch = {k: v.to(bench.device) for k, v in batch.items()}
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n_params / 1e6:.2f} M parameters, {batch['input_ids'].shape[1]} tokens", flush=True)
        for prec in precisions:
            label = f"zoo {name:9s} {prec:13s}"
            if bench.over(0.75, label):
                continue
            with precision(model, batch, prec, bench.device) as (m, b):
                coverage = measure(bench, label, m, b, task_ids)
            if coverage is not None and prec == "fp32":
                counts = path_counts(coverage, model)
                print(
                    f"{'':4s}paths, tensors (elements): " + ", ".join(f"{k} {v}" for k, v in counts.items())
                )


def section_overhead(bench: Bench) -> None:
    import bench_overhead

    args = bench.args
    if args.tiny:
        base = [
            "--steps",
            "3",
            "--rounds",
            "1",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--logging-steps",
            "1",
        ]
    elif args.quick:
        base = ["--steps", "30", "--rounds", "1"]
    else:
        base = ["--steps", "100", "--rounds", "3"]
    base += ["--device", args.device, "--threads", str(torch.get_num_threads())]
    runs = [("fp32", base)] if args.quick else [("fp32", base), ("bf16", [*base, "--bf16"])]
    for name, argv in runs:
        if bench.over(0.9 if name == "bf16" else 1.0, f"overhead {name}"):
            continue
        print(f"\n[overhead] bench_overhead.py {' '.join(argv)}", flush=True)
        try:
            ratios = bench_overhead.main(argv)
        except Exception as err:
            print(f"overhead {name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        bench.summary.append((f"overhead {name} losses (wall)", ratios["losses_wall"], float("nan"), 0))
        bench.summary.append((f"overhead {name} defaults (wall)", ratios["defaults_wall"], float("nan"), 0))


def header(bench: Bench) -> None:
    import transformers

    import dynamics

    print(f"bench_gpu.py  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, dynamics {dynamics.__version__}, "
        f"device {bench.device}",
        end="",
    )
    if bench.cuda:
        props = torch.cuda.get_device_properties(bench.device)
        print(
            f" = {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
            f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN {torch.backends.cudnn.allow_tf32}"
        )
    else:
        print(f", {torch.get_num_threads()} CPU thread(s)")
    a = bench.args
    print(
        f"medians of {a.reps} interleaved rounds (range of the per-round ratios; fastest call over fastest step); time budget {a.budget_s:.0f} s; "
        f"{'quick' if a.quick else 'full'} set, {'tiny' if a.tiny else 'real'} sizes",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument(
        "--quick", action="store_true", help="a ~1 min subset: first LM shape, zoo in fp32, one overhead run"
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes (checks the code path on a CPU)")
    parser.add_argument(
        "--sections", default="lm,zoo,overhead", help="comma-separated subset of lm,zoo,overhead"
    )
    parser.add_argument("--archs", default="", help="zoo architectures (default: all nine)")
    parser.add_argument(
        "--zoo-n", type=int, default=None, help="zoo probe batch size (default 32; 8 with --tiny)"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="wall-time budget (default 480; 60 with --quick)"
    )
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 5)
    args.zoo_n = args.zoo_n or (8 if args.tiny else 32)
    args.budget_s = args.budget_s or (60.0 if args.quick else 480.0)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            "--device cuda but torch.cuda.is_available() is False: install a CUDA build of torch, or pass --device cpu"
        )
    sections = args.sections.split(",")
    unknown = set(sections) - {"lm", "zoo", "overhead"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from lm, zoo, overhead")
    import transformers

    transformers.logging.set_verbosity_error()
    bench = Bench(args)
    header(bench)
    for name, fn in (("lm", section_lm), ("zoo", section_zoo), ("overhead", section_overhead)):
        if name in sections:
            fn(bench)
    print(
        f"\n[summary] {bench.elapsed():.0f} s; targets: cached <= 1.2x, cold <= 1.5x, exact 0, losses overhead <= 1.03"
    )
    for label, cached, cold, exact in bench.summary:
        extra = "" if cold != cold else f"  cold {cold:.2f}x  exact {exact}"  # NaN: an overhead row
        print(f"  {label:40s} {cached:.3f}{'x' if extra else ''}{extra}")
    if bench.skipped:
        print("  skipped for time: " + ", ".join(bench.skipped))


if __name__ == "__main__":
    main()
