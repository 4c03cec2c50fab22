"""Train and evaluate one run (model x construction x seed) with the Hugging Face Trainer.

The run directory is the run store: the dynamics callback (``dynamics.attach``) writes per-task
losses, gradient geometry and the Fisher spectrum there during training, and the final evaluation
scores are recorded through it (``cb.record_scores``). ``predictions.jsonl`` keeps every generated
answer next to its reference for inspection, and ``DONE`` marks a finished run (the pipeline skips
runs that have it, which makes the reproduction resumable).

Both constructions train for the same number of optimizer steps (``epochs * ceil(entries /
batch)``, and IMAX and DMAX have the same number of entries), with the same schedule, so a
difference in the final scores is a difference of data construction alone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from dynamics.experiments.imax_dmax.constructions import DataBundle
from dynamics.experiments.imax_dmax.data import EntryDataset, VLMCollator
from dynamics.experiments.imax_dmax.evaluate import evaluate_model
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.tokenizer import build_tokenizer
from dynamics.experiments.imax_dmax.zoo import Dims, get_arch

DONE_FILE = "DONE"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and probing settings of one run (a preset fixes them for all runs)."""

    epochs: float = 8.0
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    probe_every: int = 25
    probe_size: int = 32
    dims: Dims = field(default_factory=Dims)
    use_hooks: bool = True

    def steps(self, n_entries: int) -> int:
        """Optimizer steps for a training set of ``n_entries`` entries."""
        return max(1, math.ceil(self.epochs * math.ceil(n_entries / self.batch_size)))


class _StepProgress(TrainerCallback):
    """Forwards each optimizer step to a progress function (the pipeline's bar)."""

    def __init__(self, progress: Callable[[int], None]):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress(1)


def _attach_hooks(trainer: Trainer, run_dir: Path, tags: dict, cfg: TrainConfig):
    """The dynamics callback, or None when the hooks are switched off or not importable."""
    if not cfg.use_hooks:
        return None
    try:
        from dynamics import attach
    except (ImportError, AttributeError):  # hooks not installed in this build: train without them
        return None
    return attach(
        trainer,
        tasks=list(TASK_NAMES),
        probe_every=cfg.probe_every,
        probe_size=cfg.probe_size,
        tags=tags,
        out_dir=run_dir,
        loss="causal_lm",  # every zoo model shifts its labels; no guessing from class names
    )


def train_run(
    bundle: DataBundle,
    *,
    construction: str,
    model: str,
    seed: int,
    run_dir: str | Path,
    cfg: TrainConfig,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Train ``model`` on ``construction`` with ``seed``, evaluate, record; returns the scores.

    Scores are ``{task: {metric: value}}`` plus ``{"": {"multitask_score": m}}``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    arch = get_arch(model, size=bundle.size, dims=cfg.dims)
    net = arch.build(tok, seed=seed)
    train_set = EntryDataset(bundle.train(construction), tok)
    eval_set = EntryDataset(bundle.eval, tok)
    tags = {
        "construction": construction.upper(),
        "model": model,
        "seed": str(seed),
        "heterogeneity": f"{bundle.heterogeneity:g}",
    }
    max_steps = cfg.steps(len(train_set))
    args = TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=max_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=int(round(cfg.warmup_ratio * max_steps)),
        lr_scheduler_type="cosine",
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),  # the same pipeline runs on a GPU where there is one
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # our examples are raw dicts; the collator builds model inputs
    )
    trainer = Trainer(model=net, args=args, train_dataset=train_set, data_collator=VLMCollator(arch, tok))
    trainer.remove_callback(PrinterCallback)  # the pipeline shows one progress bar, not log dicts
    cb = _attach_hooks(trainer, run_dir, tags, cfg)
    if cb is None:  # no hook strips task_ids before the forward: do not emit them
        trainer.data_collator = VLMCollator(arch, tok, emit_task_ids=False)
    if progress is not None:
        trainer.add_callback(_StepProgress(progress))
    result = trainer.train()
    train_s = time.perf_counter() - t0

    scores, preds = evaluate_model(net, arch, tok, eval_set, batch_size=cfg.eval_batch_size)
    with open(run_dir / "predictions.jsonl", "w") as f:
        for e, p in zip(eval_set.entries, preds, strict=True):
            f.write(
                json.dumps(
                    {"task": e.task, "instruction": e.instruction, "answer": e.answer, "prediction": p}
                )
                + "\n"
            )
    timing = {"train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s, "steps": max_steps}
    _record(cb, run_dir, tags, scores, timing, net, cfg, result.training_loss)
    (run_dir / DONE_FILE).write_text(json.dumps(timing) + "\n")
    return scores


def _record(
    cb, run_dir: Path, tags: dict, scores: dict, timing: dict, net, cfg: TrainConfig, train_loss: float
):
    meta = {
        "experiment": "imax_dmax",
        "timing": timing,
        "train_loss": float(train_loss),
        "config": {k: v for k, v in asdict(cfg).items() if k != "dims"} | {"dims": asdict(cfg.dims)},
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
    }
    if cb is not None:
        cb.record_scores(scores)
        writer = getattr(getattr(cb, "recorder", None), "writer", None)
        if writer is not None:
            writer.set_meta(imax_dmax=meta)
        cb.close()  # flush the store and take the hooks off the model
        return
    # Without the hooks the scores still go to a run store, so the pipeline reads runs one way.
    from dynamics import RunWriter

    with RunWriter(run_dir, tasks=list(TASK_NAMES), tags=tags, meta={"imax_dmax": meta}) as w:
        w.log(int(timing["steps"]), "train_loss", float(train_loss))
        w.log_scores(scores)
