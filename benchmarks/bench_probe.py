"""Cost of a probe as a multiple of one training step, next to the naive per-example loop.

Run:  python benchmarks/bench_probe.py            (CPU, 1 thread, n = 32 examples, 7 tasks)

On a tiny LLaVA-style model built from config (CLIP vision tower + Llama text model, one image
per example), the script times, interleaved in one process:

* ``step``:  one training step's forward + backward (``model(**batch).loss.backward()``);
* ``probe (cold)``: ``dynamics.probe(model, batch, task_ids=...)`` with no stored example-axis
  verdicts (fast path: one forward, two backward passes to the layer outputs, the second checking
  which rows belong to which example, per-layer Gram products), all signals included;
* ``probe (cached)``: the same call again on the same batch: the verdicts of the first call are
  reused (:mod:`dynamics.signals.axis_cache`), so one backward pass;
* ``naive``: the classic per-example loop: one batched forward, then one backward per example's
  own loss (``torch.autograd.grad(..., retain_graph=True)``), gradients stacked, ``K = G G^T``;
* ``naive_single``: a forward and a backward of each example alone (batches of one);

and prints the median of each as a multiple of the step's median, plus the peak memory above the
starting point of each (PyTorch's memory profiler, CPU tensors), the probe's extra peak over the
step's, and a check that the probe's Gram matrices (cold and cached) equal the naive one.

Which cost the training hooks pay: they probe one held batch every ``probe_every`` steps, so
every probe after the first is the cached one (steady state); the cold probe is paid once per run
(and again only if the batch, the parameter set or the model's code path changes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args: argparse.Namespace):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_tokens = (args.image_size // args.patch) ** 2
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        image_size=args.image_size,
        patch_size=args.patch,
        num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.text_hidden,
        intermediate_size=4 * args.text_hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=args.vocab - 1,
        image_seq_length=image_tokens,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    n, start = args.n, 1 + image_tokens
    seq = start + args.text_len
    input_ids = torch.zeros(n, seq, dtype=torch.long)
    attention_mask = torch.zeros(n, seq, dtype=torch.long)
    labels = torch.full((n, seq), -100)
    for i in range(n):
        length = int(torch.randint(args.text_len // 2, args.text_len + 1, (1,), generator=gen))
        text_ids = torch.randint(3, args.vocab - 1, (length,), generator=gen)
        input_ids[i, 0] = 1
        input_ids[i, 1:start] = args.vocab - 1
        input_ids[i, start : start + length] = text_ids
        attention_mask[i, : start + length] = 1
        prompt = length // 2  # answer tokens supervised, prompt masked
        labels[i, start + prompt : start + length] = text_ids[prompt:]
    pixel_values = torch.randn(n, 3, args.image_size, args.image_size, generator=gen)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "labels": labels,
    }
    task_ids = torch.arange(n) % args.tasks
    return model, batch, task_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--text-hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=48)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--naive-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from benchmarks_common import peak_memory

    from dynamics import probe

    model, batch, task_ids = build(args)
    params = [p for p in model.parameters() if p.requires_grad]
    tasks = [f"task{a}" for a in range(args.tasks)]
    n = args.n

    def step():
        model.train()
        model(**batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    from dynamics.signals.axis_cache import clear

    def run_probe():
        return probe(model, batch, task_ids=task_ids, tasks=tasks)

    def run_probe_cold():
        clear(model)
        return probe(model, batch, task_ids=task_ids, tasks=tasks)

    def gram_of(rows):
        G = torch.stack(rows).double()
        return G @ G.T

    def flat(grads):
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]
        )

    def naive():
        """One batched forward, then one backward per example's own loss (the classic loop)."""
        model.eval()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), shift, reduction="none")
        losses = ce.sum(1) / (shift != -100).sum(1).clamp(min=1)
        rows = [
            flat(torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True))
            for i in range(n)
        ]
        model.train()
        return gram_of(rows)

    def naive_single():
        """A forward and a backward of each example alone (batch of one)."""
        model.eval()
        rows = []
        for i in range(n):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            loss = model(**one, use_cache=False).loss  # example i's own loss (mean over its tokens)
            rows.append(flat(torch.autograd.grad(loss, params, allow_unused=True)))
        model.train()
        return gram_of(rows)

    variants = {
        "step": step,
        "probe_cold": run_probe_cold,
        "probe": run_probe,
        "naive": naive,
        "naive_single": naive_single,
    }
    for f in variants.values():  # warm-up (lazy initialisation, allocator)
        f()
    times = {k: [] for k in variants}
    for r in range(args.reps):
        for name, f in variants.items():
            if name.startswith("naive") and r >= args.naive_reps:
                continue
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    cold = run_probe_cold()
    res = run_probe()
    k_naive = naive()
    k_single = naive_single()
    rel = float((res.gram - k_naive).abs().max() / k_naive.abs().max())
    rel_single = float((res.gram - k_single).abs().max() / k_single.abs().max())
    rel_cold = float((cold.gram - k_naive).abs().max() / k_naive.abs().max())
    same = torch.equal(cold.gram, res.gram)

    n_params = sum(p.numel() for p in params)
    print(
        f"tiny LLaVA-style model: {n_params:,} trainable parameters, {args.layers} vision + {args.layers} text layers"
    )
    print(
        f"probe batch: n = {n} examples, {args.tasks} tasks, sequence {batch['input_ids'].shape[1]} tokens "
        f"({(args.image_size // args.patch) ** 2} image tokens), CPU, {args.threads} thread(s), "
        f"median of {args.reps} (naive: {args.naive_reps}) interleaved runs"
    )
    print(f"gradient paths: { {k: len(v) for k, v in res.coverage.items()} }")
    labels = {
        "step": "training step (forward + backward)",
        "probe_cold": "dynamics.probe, cold (first call)",
        "probe": "dynamics.probe, cached (steady state)",
        "naive": "naive loop: 1 forward, n backward",
        "naive_single": "naive loop: n x (forward + backward) of 1",
    }
    print(f"{'':44s} {'median ms':>10s} {'x step':>8s}")
    for name, label in labels.items():
        print(f"{label:44s} {1e3 * med[name]:10.2f} {med[name] / med['step']:8.2f}")
    print(
        f"probe cold / cached: {med['probe_cold'] / med['step']:.2f}x / {med['probe'] / med['step']:.2f}x a step "
        "(the hooks pay the cached one at every probe, the cold one once per run)"
    )
    print(f"max |K_probe - K_naive| / max |K_naive| = {rel:.1e} (batched), {rel_single:.1e} (single)")
    print(f"cold probe: {rel_cold:.1e} vs naive; cold and cached Gram identical: {same}")

    if not args.no_memory:
        peaks = {name: peak_memory(variants[name]) for name in ("step", "probe_cold", "probe", "naive")}
        if all(v is not None for v in peaks.values()):
            print(f"{'':44s} {'peak MB above start':>20s}")
            for name in peaks:
                print(f"{labels[name]:44s} {peaks[name] / 2**20:20.2f}")
            extra = {k: (peaks[k] - peaks["step"]) / 2**20 for k in ("probe_cold", "probe")}
            print(
                f"probe's peak extra memory over a training step: {extra['probe_cold']:.2f} MB cold, "
                f"{extra['probe']:.2f} MB cached"
            )


if __name__ == "__main__":
    main()
