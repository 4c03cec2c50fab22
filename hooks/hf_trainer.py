"""Recipe: training dynamics from a Hugging Face Trainer script, with two added lines.

    python hooks/hf_trainer.py --out runs/hf --model llava --steps 40

What your script needs: each training example carries ``task_ids`` (an int, the index of its task
in ``TASKS``), then

    import dynamics
    dynamics.attach(trainer, tasks=TASKS, tags={"construction": "IMAX", "seed": 0})

before ``trainer.train()``. Per-task losses are recorded every step, probes (gradient norms and
cosines, the Fisher spectrum, ...) every ``probe_every`` steps, all into ``<output_dir>/dynamics``
and into the Trainer's logs (TensorBoard shows them under ``train/dynamics/...``). Every evaluation
that reports ``eval_<task>_<metric>`` (``eval_dataset=dynamics.split_by_task(ds, TASKS)``, or
``dynamics.evaluate_per_task(trainer, ds)`` after training) is stored as a per-task curve
``eval_<metric>`` at its step; the last one's non-loss metrics are the run's final scores.

The model here is a tiny Llama or LLaVA built from a config, so the recipe runs offline in seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset

TASKS = ["caption", "vqa", "report"]
VOCAB, IMAGE_TOKEN = 64, 63


def build_model(kind: str) -> torch.nn.Module:
    """A tiny Llama causal LM or a tiny LLaVA (CLIP vision tower + Llama), from configs only."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = LlamaConfig(  # type: ignore[call-arg]  # (config kwargs are untyped **kwargs)
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    if kind == "llama":
        return LlamaForCausalLM(text)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    config = LlavaConfig(  # type: ignore[call-arg]
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
        attn_implementation="eager",
    )
    model = LlavaForConditionalGeneration(config)
    # Evaluation keeps the logits only (the cache and vision-tower outputs cannot be gathered).
    model.config.keys_to_ignore_at_inference = ["cache", "past_key_values", "image_outputs"]
    return model


class MultiTaskData(Dataset):
    """Synthetic examples: task ``k``'s text counts up in steps of ``k + 1`` (learnable, task-specific)."""

    def __init__(self, n: int, *, images: bool, text_len: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        n_image = 16 if images else 0
        for i in range(n):
            task = i % len(TASKS)
            start = int(torch.randint(3, IMAGE_TOKEN, (1,), generator=gen))
            text = 3 + (start + (task + 1) * torch.arange(text_len)) % (IMAGE_TOKEN - 3)
            ids = torch.cat([torch.full((n_image,), IMAGE_TOKEN), text])
            labels = ids.clone()
            labels[: n_image + 1] = -100  # no loss on the image and the first text token
            item = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": labels,
                "task_ids": task,
            }
            if images:
                item["pixel_values"] = torch.randn(3, 16, 16, generator=gen)
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def next_token_accuracy(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep the argmax only (the full logits are not needed).
    LLaVA returns a tuple (logits, then image features); the logits come first."""
    tensor = logits[0] if isinstance(logits, tuple) else logits
    return tensor.argmax(-1)


def compute_metrics(pred: object) -> dict[str, float]:
    """Next-token accuracy on the supervised positions (the position t predicts token t + 1)."""
    import numpy as np

    predicted, labels = pred.predictions, pred.label_ids  # type: ignore[attr-defined]
    supervised = labels[:, 1:] != -100
    return {"accuracy": float(np.mean((predicted[:, :-1] == labels[:, 1:])[supervised]))}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="runs/hf_trainer", help="Trainer output_dir (the store goes in <out>/dynamics)"
    )
    parser.add_argument("--model", choices=["llama", "llava"], default="llava")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=12)
    parser.add_argument(
        "--eval-every", type=int, default=0, help="evaluate per task every N steps (0: at the end)"
    )
    parser.add_argument("--report-to", default="none", help="e.g. tensorboard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    import dynamics

    torch.manual_seed(args.seed)
    train = MultiTaskData(120, images=args.model == "llava", seed=args.seed)
    evaluation = MultiTaskData(30, images=args.model == "llava", seed=args.seed + 1)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3,
        logging_steps=5,
        eval_strategy="steps" if args.eval_every else "no",
        eval_steps=args.eval_every or None,
        save_strategy="no",
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=build_model(args.model), args=training_args, train_dataset=train,
        eval_dataset=dynamics.split_by_task(evaluation, TASKS),  # one eval set per task: per-task curves
        compute_metrics=compute_metrics, preprocess_logits_for_metrics=next_token_accuracy,
    )  # fmt: skip

    # -- the two lines --------------------------------------------------------------------------
    callback = dynamics.attach(
        trainer, tasks=TASKS, probe_every=args.probe_every, probe_size=args.probe_size,
        tags={"model": args.model, "seed": args.seed},
    )  # fmt: skip
    trainer.train()
    # -------------------------------------------------------------------------------------------

    # Final per-task scores from one eval set with a task_ids column (stored as the last point of
    # the eval_<metric> curves, and the non-loss metrics as scores; with your own evaluation:
    # callback.record_scores({task: {metric: value}})).
    dynamics.evaluate_per_task(trainer, evaluation)
    callback.close()
    print(f"run store: {callback.run_dir}")
    return Path(str(callback.run_dir))


if __name__ == "__main__":
    main()
