"""Recipe: training dynamics from a ``Seq2SeqTrainer`` (encoder-decoder, generation during evaluation).

    python hooks/seq2seq.py --out runs/seq2seq --steps 30

The same two lines as for the plain Trainer (``dynamics.attach(trainer, tasks=TASKS, ...)``, then
``trainer.train()``). The model is a tiny T5 built from a config; each example carries ``task_ids``
(here the task NAMES, which work as well as indices). Evaluation during training uses
``predict_with_generate=True``: ``task_ids`` never reach ``generate()``. Per-task losses use the
encoder-decoder (aligned) token loss, exactly the one T5 computes; every evaluation is stored per
task as ``eval_<metric>`` curves, and the last one's non-loss metrics become the final scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset

TASKS = ["copy", "reverse", "shift"]
VOCAB, PAD, EOS = 32, 0, 1


def build_t5(seed: int = 0) -> torch.nn.Module:
    """A tiny T5 (one encoder and one decoder layer) from a config, no download."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(  # type: ignore[call-arg]  # (config kwargs are untyped **kwargs)
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    return T5ForConditionalGeneration(config)


class Seq2SeqData(Dataset):
    """Task ``copy``: the target is the source; ``reverse``: reversed; ``shift``: every token + 1.
    Sources of varying length (so tasks differ in their token counts); targets end with EOS."""

    def __init__(self, n: int, seed: int = 0, names: bool = True) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            k = i % len(TASKS)
            length = int(torch.randint(3, 7, (1,), generator=gen))
            src = torch.randint(2, VOCAB - 1, (length,), generator=gen)
            tgt = [src, src.flip(0), src + 1][k]
            self.items.append(
                {
                    "input_ids": torch.cat([src, torch.tensor([EOS])]),
                    "labels": torch.cat([tgt, torch.tensor([EOS])]),
                    "task_ids": TASKS[k] if names else k,
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(features: list[dict]) -> dict:
    """Pads sources with PAD and labels with -100 (what DataCollatorForSeq2Seq does with a tokenizer)."""
    from torch.nn.utils.rnn import pad_sequence

    out = {
        "input_ids": pad_sequence([f["input_ids"] for f in features], batch_first=True, padding_value=PAD),
        "labels": pad_sequence([f["labels"] for f in features], batch_first=True, padding_value=-100),
    }
    out["attention_mask"] = (out["input_ids"] != PAD).long()
    if "task_ids" in features[0]:
        out["task_ids"] = torch.tensor([f["task_ids"] for f in features])
    return out


def exact_match(pred: object) -> dict[str, float]:
    """compute_metrics: share of generated sequences equal to the target (up to EOS)."""
    import numpy as np

    generated, labels = pred.predictions, pred.label_ids  # type: ignore[attr-defined]
    hits = []
    for g, y in zip(generated, labels, strict=True):
        y = [t for t in y.tolist() if t != -100]
        g = [t for t in g.tolist() if t not in (PAD, -100)][: len(y)]
        hits.append(g == y)
    return {"exact_match": float(np.mean(hits))}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/seq2seq", help="output_dir (the store goes in <out>/dynamics)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    import dynamics

    training_args = Seq2SeqTrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=3e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=args.eval_every,
        predict_with_generate=True,
        generation_max_length=8,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",
        seed=args.seed,
        disable_tqdm=True,
    )
    evaluation = Seq2SeqData(18, seed=args.seed + 1)
    trainer = Seq2SeqTrainer(
        model=build_t5(args.seed), args=training_args, train_dataset=Seq2SeqData(240, seed=args.seed),
        eval_dataset=dynamics.split_by_task(evaluation, TASKS), data_collator=collate,
        compute_metrics=exact_match,
    )  # fmt: skip

    # -- the two lines --------------------------------------------------------------------------
    callback = dynamics.attach(
        trainer, tasks=TASKS, probe_every=args.probe_every, probe_size=args.probe_size,
        tags={"model": "t5", "seed": args.seed},
    )  # fmt: skip
    trainer.train()
    # -------------------------------------------------------------------------------------------
    callback.close()
    print(f"run store: {callback.run_dir}")
    return Path(str(callback.run_dir))


if __name__ == "__main__":
    main()
