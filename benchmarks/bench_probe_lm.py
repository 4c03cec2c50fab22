"""Probe cost on transformer LMs the project did not design for, short and long sequences.

Run:  python benchmarks/bench_probe_lm.py                      (n = 32, 64 tokens: Llama, GPT-2, Qwen2, GPT-NeoX, T5)
      python benchmarks/bench_probe_lm.py --long               (n = 8, 1k and 4k tokens: Llama)

Each model (~3.5-4 M parameters, built from config, sdpa attention (T5: eager, for its position
bias), CPU, 1 thread) is timed, interleaved in one process, for ``step`` (``model(**batch).loss.backward()``), ``probe (cold)``
(``dynamics.probe`` with no stored example-axis verdicts: the first probe of a run) and ``probe
(cached)`` (the steady state the hooks pay); printed: medians as multiples of the step's median
(and the spread of the per-round ratios), the gradient paths (none may be ``exact``) and, with
``--memory``, the peak memory above the start of each (PyTorch's memory profiler) and the probe's
extra peak as a fraction of the step's; with ``--phases``, where the step's and the steady-state
probe's time goes (``benchmarks_common.phase_times``).
"""

from __future__ import annotations

import argparse
import statistics

import torch


def build(arch: str, vocab: int, max_len: int):
    import transformers as tf

    common = {"vocab_size": vocab}
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=max_len,
            **common,
        )
        cls = tf.LlamaForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=max_len, **common)
        cls = tf.GPT2LMHeadModel
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_len,
            **common,
        )
        cls = tf.Qwen2ForCausalLM
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=max_len,
            **common,
        )
        cls = tf.GPTNeoXForCausalLM
    elif arch == "t5":  # encoder-decoder; labels are the decoder's targets (shifted right inside)
        cfg = tf.T5Config(
            d_model=256,
            d_kv=64,
            d_ff=688,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            **common,
        )
        cls = tf.T5ForConditionalGeneration
    else:
        raise ValueError(arch)  # fmt: skip
    cfg._attn_implementation = "eager" if arch == "t5" else "sdpa"  # T5's position bias needs eager
    torch.manual_seed(0)
    return cls(cfg)


def lm_batch(n: int, seq: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(n):  # variable lengths: the last quarter of the rows padded by up to half
        if i >= 3 * n // 4:
            mask[i, seq // 2 + i % (seq // 2) :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : seq // 8] = -100  # a prompt prefix without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def measure(arch: str, n: int, seq: int, reps: int, memory: bool, vocab: int, phases: bool = False) -> None:
    from benchmarks_common import (
        interleaved_times,
        peak_memory,
        phase_text,
        phase_times,
        probe_variants,
        ratio_text,
        ratios_to,
    )

    from dynamics import probe

    model = build(arch, vocab, max(seq, 128))
    batch = lm_batch(n, seq, vocab)
    task_ids = torch.arange(n) % 4
    variants = probe_variants(model, batch, task_ids)
    times = interleaved_times(variants, reps)
    r = ratios_to(times)
    paths = {k: len(v) for k, v in probe(model, batch, task_ids=task_ids).coverage.items() if v}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{arch:9s} {n_params / 1e6:5.2f} M  n={n:3d} T={seq:5d}  step {1e3 * statistics.median(times['step']):8.1f} ms  "
        f"cached {ratio_text(r['cached'])}  cold {ratio_text(r['cold'])}  paths {paths}",
        flush=True,
    )
    if phases:
        print(phase_text(phase_times(model, batch, task_ids, reps), indent=" " * 10), flush=True)
    if memory:
        peaks = {k: peak_memory(f) for k, f in variants.items()}
        if all(v is not None for v in peaks.values()):
            s = peaks["step"]
            print(
                f"{'':9s} peak MB above start: step {s / 2**20:.1f}, cold {peaks['cold'] / 2**20:.1f}, "
                f"cached {peaks['cached'] / 2**20:.1f}; probe's extra peak over a step: "
                f"cold {(peaks['cold'] - s) / 2**20:+.1f} MB ({(peaks['cold'] - s) / s:+.0%} of the step's), "
                f"cached {(peaks['cached'] - s) / 2**20:+.1f} MB ({(peaks['cached'] - s) / s:+.0%})",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llama,gpt2,qwen2,gpt_neox,t5")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seq", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--long", action="store_true", help="n = 8 at 1024 and 4096 tokens (Llama), with memory"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--phases", action="store_true", help="also time the step's halves and the steady-state probe's steps"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.long:
        args.archs, args.n, args.seq, args.memory = "llama", 8, [1024, 4096], True
    print(
        f"CPU, {args.threads} thread(s), medians of {args.reps} interleaved rounds (ratio range over rounds; fastest call over fastest step)"
    )
    for seq in args.seq:
        for arch in args.archs.split(","):
            measure(arch, args.n, seq, args.reps, args.memory, args.vocab, args.phases)


if __name__ == "__main__":
    main()
