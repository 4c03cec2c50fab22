"""The probe's per-layer products against the training step's weight-gradient GEMM, layer by layer.

Run:  python benchmarks/bench_products.py                 (n = 32; T = 64 and 256; a few seconds)
      python benchmarks/bench_products.py --n 8 --seq 1024

For a Linear layer with inputs ``a`` (n, T, d_in) and output gradients ``b`` (n, T, d_out), a training
step's weight gradient is one GEMM, ``b^T a`` over all ``n T`` rows. The probe's block of the Gram is
``GramBuilder.add_factored`` on the same two tensors: the per-example gradients ``a_i^T b_i`` (as many
flops as that GEMM, in ``n`` products of inner size ``T``) and their ``n x n`` Gram (``n / T`` of
them). Both are timed, interleaved in one process (CPU, float32, 1 thread), at the layer shapes of the
LM benchmark (``bench_probe_lm.py``: d = 256, MLP 688, vocabulary 2048) and of the zoo (d = 64, MLP
128). Printed: the median times and their ratio, next to the flop count's ``1 + n / T``, and the
bare ``torch.bmm`` of the per-example gradients and the bare Gram GEMM as fractions of the same GEMM
(what the builder adds around them: casts, the layout choice, page faults of a fresh block).

With ``s`` the weight-gradient share of a step (``bench_probe_lm.py --phases`` prints it) and ``r``
this ratio, a steady-state probe costs at least ``1 + (r - 1) s`` steps: it runs the step's forward
and activation backward and replaces the weight-gradient GEMMs by these products.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from benchmarks_common import interleaved_times

from dynamics.signals.products import Factored, GramBuilder

SHAPES = {  # (d_in, d_out) of the benchmarked models' Linear layers
    "lm attention 256 x 256": (256, 256),
    "lm mlp up 256 x 688": (256, 688),
    "lm mlp down 688 x 256": (688, 256),
    "lm head 256 x 2048": (256, 2048),
    "zoo attention 64 x 64": (64, 64),
    "zoo mlp 64 x 128": (64, 128),
}


def measure(label: str, d_in: int, d_out: int, n: int, seq: int, reps: int) -> float:
    """Print one layer's line; return the products' time over the weight-gradient GEMM's."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, seq, d_in, generator=g)
    b = torch.randn(n, seq, d_out, generator=g)

    def weight_grad() -> None:
        b.reshape(-1, d_out).T @ a.reshape(-1, d_in)

    def products() -> None:
        builder = GramBuilder(n, a.device, "materialize")
        builder.add_factored(0, torch.Size((d_out, d_in)), [Factored(a, b, False, d_in)], [], None)
        builder.finish()

    per_example = torch.bmm(a.transpose(1, 2), b).reshape(n, -1)

    def bmm_only() -> None:
        torch.bmm(a.transpose(1, 2), b)

    def gram_only() -> None:
        per_example @ per_example.T

    variants = {"weight_grad": weight_grad, "products": products, "bmm": bmm_only, "gram": gram_only}
    med = {k: statistics.median(v) for k, v in interleaved_times(variants, reps).items()}
    w = med["weight_grad"]
    print(
        f"{label:24s} n={n:3d} T={seq:5d}  weight-gradient GEMM {1e3 * w:7.2f} ms  "
        f"products + Gram {1e3 * med['products']:7.2f} ms = {med['products'] / w:4.2f}x "
        f"(flops {1 + n / seq:.2f}x; the bare batched product {med['bmm'] / w:4.2f}x, "
        f"the bare Gram GEMM {med['gram'] / w:4.2f}x)",
        flush=True,
    )
    return med["products"] / w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seq", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} thread(s), float32, medians of {args.reps} interleaved rounds")
    for seq in args.seq:
        for label, (d_in, d_out) in SHAPES.items():
            measure(label, d_in, d_out, args.n, seq, args.reps)


if __name__ == "__main__":
    main()
