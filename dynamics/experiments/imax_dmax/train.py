"""Train and evaluate one run (model x arm x seeds) with the Hugging Face Trainer.

The run directory is the run store: the dynamics callback (``dynamics.attach``) writes per-task
losses, gradient geometry and the Fisher spectrum there during training, and the final evaluation
scores are recorded through it (``cb.record_scores``). ``predictions.jsonl`` keeps every generated
answer next to its reference for inspection, and ``DONE`` marks a finished run (the pipeline skips
runs that have it, which makes the reproduction resumable).

Every arm trains for the same number of optimizer steps (``epochs * ceil(entries / batch)`` with
IMAX's entry count, which DMAX and DMAX-mixed share), with the same schedule, from the same
stage-0 checkpoint (``init_from``, see ``pretrain.py``), so a difference in the final scores is a
difference of data construction alone. ``cfg.finetune`` is ``"full"`` (every weight) or ``"lora"``
(PEFT LoRA adapters on every linear layer); the Fisher spectrum is over the trainable parameters.

DMAX-3stage runs its three stages inside one run store and one cosine schedule over the same total
steps: stage 1 trains on DMAX for ``stage1_fraction`` of the steps and saves a Trainer checkpoint;
stage 2 densifies DMAX with the stage-1 model (``pseudo.densify``); stage 3 resumes the checkpoint
(optimizer, schedule and step counter continue) on pseudo-IMAX, the real DMAX entries at weight 1
and the pseudo ones at ``pseudo_weight`` (``WeightedTrainer``).

Besides its own training batch, every arm is probed at the same steps on the **common probe
batch** (``CommonProbe``): one task-stratified batch of the bundle's probe set (fresh images of all
sources), the same examples for every arm. Its rows carry the probe's metric names with the suffix
``_common`` (``fisher_se_common``, ``fisher_rho_common``, ``grad_cosine_common``, ...), so
``features()`` gives e.g. ``fisher_se_common/all/mean``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from dynamics.experiments.imax_dmax.constructions import Construction, DataBundle, Entry, check_arm
from dynamics.experiments.imax_dmax.data import IGNORE_INDEX, EntryDataset, VLMCollator
from dynamics.experiments.imax_dmax.evaluate import evaluate_model, generate_answers
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.tokenizer import build_tokenizer
from dynamics.experiments.imax_dmax.zoo import Arch, Dims, get_arch

DONE_FILE = "DONE"
COMMON_SUFFIX = "_common"
FINETUNE_MODES = ("full", "lora")

# The run's declared score ranges (run.json meta["score_ranges"], read by dynamics.analysis): each
# task is scored by its own "score" on [0, 1] (the CTR's score is already 1 - min(MAE / 0.1, 1)), so
# the library's multitask_score is the reproduction's stored one and `dynamics summary OUT` needs no flags.
SCORE_RANGES: dict[str, dict[str, list[float]]] = {t: {"score": [0.0, 1.0]} for t in TASK_NAMES}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, fine-tuning, probing and DMAX-3stage settings of one run (a preset fixes them)."""

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
    finetune: str = "full"
    lora_rank: int = 8
    common_probe: bool = True
    stage1_fraction: float = 0.5  # DMAX-3stage: share of the steps trained on DMAX before densifying
    pseudo_threshold: float = 0.5  # DMAX-3stage: smallest confidence of a kept model answer
    pseudo_weight: float = 0.5  # DMAX-3stage: loss weight of a pseudo entry (real entries: 1)

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if not 0.0 < self.stage1_fraction < 1.0:
            raise ValueError(f"stage1_fraction must be in (0, 1), got {self.stage1_fraction}")
        if not 0.0 < self.pseudo_weight <= 1.0:
            raise ValueError(f"pseudo_weight must be in (0, 1], got {self.pseudo_weight}")

    def steps(self, n_entries: int) -> int:
        """Optimizer steps for a training set of ``n_entries`` entries."""
        return max(1, math.ceil(self.epochs * math.ceil(n_entries / self.batch_size)))


class _StepProgress(TrainerCallback):
    """Forwards each optimizer step to a progress function (the pipeline's bar)."""

    def __init__(self, progress: Callable[[int], None]):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress(1)


class _StopAt(TrainerCallback):
    """Stops training after step ``step`` and saves a Trainer checkpoint there (DMAX-3stage's stage 1)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


class WeightedTrainer(Trainer):
    """``Trainer`` whose causal-LM loss weighs each example by the batch's ``loss_weight`` (B,).

    ``loss = sum_i w_i sum_t ce_it / sum_i w_i N_i`` over the supervised (shifted) tokens, i.e.
    transformers' token-averaged causal-LM loss with example ``i``'s tokens counted ``w_i`` times.
    Batches without ``loss_weight`` take the model's own loss.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop("loss_weight", None)
        if weight is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1].float()
        target = inputs["labels"][:, 1:].to(logits.device)
        ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        w = weight.to(logits.device)[:, None] * (target != IGNORE_INDEX)
        loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
        return (loss, outputs) if return_outputs else loss


class CommonProbe(TrainerCallback):
    """Probes the common batch at the recorder's probe steps, rows named ``<metric>_common``.

    Runs before the optimizer step, like the recorder's own probe, so both see the same parameters.
    ``dynamics.probe`` runs the model in eval mode, which the recorder's hook ignores, so the probe
    does not count as a training batch. A failed probe is reported once and skipped.
    """

    def __init__(self, batch: dict, task_ids: torch.Tensor, every: int, writer_of: Callable[[], Any]):
        self.batch, self.task_ids, self.every, self.writer_of = batch, task_ids, every, writer_of
        self.failures = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        if self.every <= 0 or step % self.every or model is None:
            return
        from dynamics import probe

        try:
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in self.batch.items()}
            res = probe(
                model, batch, task_ids=self.task_ids.to(device), tasks=list(TASK_NAMES), loss="causal_lm"
            )
        except Exception as err:  # a training run must never die because of a probe
            self.failures += 1
            if self.failures == 1:
                warnings.warn(
                    f"common probe at step {step} failed ({type(err).__name__}: {err}); skipped", stacklevel=2
                )
            return
        writer = self.writer_of()
        if writer is not None:
            writer.log_rows([(s, f"{n}{COMMON_SUFFIX}", t, tb, v) for s, n, t, tb, v in res.to_rows(step)])


def common_probe_batch(
    bundle: DataBundle, arch: Arch, tok, size: int, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The common probe batch: ``size`` entries of the bundle's probe set, stratified by task
    (``floor(size / 7)`` per task, the first tasks one more), chosen by ``seed`` alone, so every arm,
    model and init seed of one data draw sees the same examples."""
    if bundle.probe is None:
        raise ValueError("this bundle has no probe set (build_bundle builds one)")
    gen = torch.Generator().manual_seed(seed)
    by_task = {t: [i for i, e in enumerate(bundle.probe.entries) if e.task == t] for t in TASK_NAMES}
    picked: list[int] = []
    for a, t in enumerate(TASK_NAMES):
        quota = size // len(TASK_NAMES) + (1 if a < size % len(TASK_NAMES) else 0)
        order = torch.randperm(len(by_task[t]), generator=gen).tolist()
        picked += [by_task[t][i] for i in order[:quota]]
    ds = EntryDataset(bundle.probe, tok)
    batch = VLMCollator(arch, tok)([ds[i] for i in picked])
    return batch, batch.pop("task_ids")


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
        meta={"score_ranges": SCORE_RANGES},
        loss="causal_lm",  # every zoo model shifts its labels; no guessing from class names
    )


def training_args(out: Path, cfg: TrainConfig, max_steps: int, seed: int, **extra: Any) -> TrainingArguments:
    """The TrainingArguments every stage uses (cosine schedule, CPU unless there is a GPU)."""
    return TrainingArguments(
        output_dir=str(out),
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
        **extra,
    )


def build_model(arch: Arch, tok, cfg: TrainConfig, seed: int, init_from: str | Path | None):
    """The model an arm fine-tunes: the stage-0 checkpoint (or a random init), LoRA-wrapped if asked."""
    net: Any = arch.build(tok, seed=seed)
    if init_from is not None:
        state = torch.load(Path(init_from) / "model.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # the adapters' init
        net = get_peft_model(
            net,
            LoraConfig(
                r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, target_modules="all-linear"
            ),
        )
    return net


def model_answer_fn(net, arch: Arch, tok, images: Construction, batch_size: int):
    """``answer_fn`` for ``pseudo.densify``: the model's greedy answers and their confidences."""

    def answer(queries):
        entries = [Entry(q.image_id, q.task, q.key, q.instruction, "") for q in queries]
        ds = EntryDataset(Construction("queries", images.images, entries), tok)
        conf: list[float] = []
        answers = generate_answers(net, arch, tok, ds, batch_size=batch_size, confidences=conf)
        return answers, conf

    return answer


def train_run(
    bundle: DataBundle,
    *,
    construction: str,
    model: str,
    seed: int,
    run_dir: str | Path,
    cfg: TrainConfig,
    progress: Callable[[int], None] | None = None,
    init_from: str | Path | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Train ``model`` on arm ``construction`` from init seed ``seed``, evaluate, record; returns the scores.

    ``init_from``: a stage-0 checkpoint folder (``pretrain.pretrain``); None starts from random
    weights. ``tags``: extra run tags (the pipeline adds the data and style seeds).
    Scores are ``{task: {metric: value}}`` plus ``{"": {"multitask_score": m}}``.
    """
    arm = check_arm(construction)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    arch = get_arch(model, size=bundle.size, dims=cfg.dims)
    net = build_model(arch, tok, cfg, seed, init_from)
    train_set = EntryDataset(bundle.train(arm), tok)
    eval_set = EntryDataset(bundle.eval, tok)
    all_tags = {
        "construction": arm,
        "model": model,
        "seed": str(seed),
        "heterogeneity": f"{bundle.heterogeneity:g}",
        "finetune": cfg.finetune,
        "pretrained": "yes" if init_from is not None else "no",
        **(tags or {}),
    }
    max_steps = cfg.steps(len(bundle.imax.entries))  # the same for every arm
    stage1 = max(1, int(round(cfg.stage1_fraction * max_steps))) if arm == "DMAX-3stage" else max_steps
    trainer = WeightedTrainer(
        model=net,
        args=training_args(run_dir / "trainer", cfg, max_steps, seed),
        train_dataset=train_set,
        data_collator=VLMCollator(arch, tok),
    )
    trainer.remove_callback(PrinterCallback)  # the pipeline shows one progress bar, not log dicts
    cb = _attach_hooks(trainer, run_dir, all_tags, cfg)
    if cb is None:  # no hook strips task_ids before the forward: do not emit them
        trainer.data_collator = VLMCollator(arch, tok, emit_task_ids=False)
    extra_callbacks: list[TrainerCallback] = []
    if cb is not None and cfg.common_probe and cfg.probe_every > 0:
        batch, ids = common_probe_batch(bundle, arch, tok, cfg.probe_size)
        writer_of = lambda: getattr(getattr(cb, "recorder", None), "writer", None)  # noqa: E731
        extra_callbacks.append(CommonProbe(batch, ids, cfg.probe_every, writer_of))
    if progress is not None:
        extra_callbacks.append(_StepProgress(progress))
    for c in extra_callbacks:
        trainer.add_callback(c)
    pseudo_stats = None
    if arm == "DMAX-3stage":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the checkpoint save's shard bar, under the pipeline's bar
        trainer.add_callback(_StopAt(stage1))
        trainer.train()
        ckpt = run_dir / "trainer" / f"checkpoint-{stage1}"
        pseudo_stats, trainer = _stages_2_and_3(bundle, net, arch, tok, cfg, run_dir, max_steps, seed, ckpt)
        if cb is not None:
            cb.bind(trainer)  # the same recorder and run store continue at step stage1 + 1
        else:
            trainer.data_collator = VLMCollator(arch, tok, emit_task_ids=False, emit_weights=True)
        for c in extra_callbacks:
            trainer.add_callback(c)
        result = trainer.train(resume_from_checkpoint=str(ckpt))
        shutil.rmtree(ckpt, ignore_errors=True)  # optimizer state of a finished stage: no longer needed
    else:
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
    extra = {"pseudo": pseudo_stats, "stage1_steps": stage1} if pseudo_stats is not None else {}
    if pseudo_stats is not None:
        (run_dir / "pseudo.json").write_text(json.dumps(pseudo_stats, indent=2) + "\n")
    _record(cb, run_dir, all_tags, scores, timing, net, cfg, result.training_loss, extra)
    (run_dir / DONE_FILE).write_text(json.dumps(timing) + "\n")
    return scores


def _stages_2_and_3(bundle, net, arch, tok, cfg, run_dir, max_steps, seed, ckpt):
    """Stage 2 (pseudo-IMAX from the stage-1 model) and the stage-3 Trainer that resumes ``ckpt``."""
    from dynamics.experiments.imax_dmax.pseudo import densify

    if not ckpt.exists():
        raise RuntimeError(f"stage 1 did not leave its checkpoint {ckpt}")
    answer = model_answer_fn(net, arch, tok, bundle.dmax, cfg.eval_batch_size)
    data_seed = int(bundle.seeds.get("data_seed", 0))
    pseudo = densify(bundle.dmax, answer, seed=data_seed * 1000 + seed, threshold=cfg.pseudo_threshold)
    stage3_set = EntryDataset(pseudo.construction, tok, weights=pseudo.weights(cfg.pseudo_weight))
    trainer = WeightedTrainer(
        model=net,
        args=training_args(run_dir / "trainer", cfg, max_steps, seed, ignore_data_skip=True),
        train_dataset=stage3_set,
        data_collator=VLMCollator(arch, tok, emit_weights=True),
    )
    trainer.remove_callback(PrinterCallback)
    return pseudo.stats, trainer


def _record(
    cb,
    run_dir: Path,
    tags: dict,
    scores: dict,
    timing: dict,
    net,
    cfg: TrainConfig,
    train_loss: float,
    extra: dict | None = None,
):
    meta = {
        "experiment": "imax_dmax",
        "timing": timing,
        "train_loss": float(train_loss),
        "config": {k: v for k, v in asdict(cfg).items() if k != "dims"} | {"dims": asdict(cfg.dims)},
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
        "n_trainable_parameters": int(sum(p.numel() for p in net.parameters() if p.requires_grad)),
        **(extra or {}),
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

    run_meta = {"imax_dmax": meta, "score_ranges": SCORE_RANGES}
    with RunWriter(run_dir, tasks=list(TASK_NAMES), tags=tags, meta=run_meta) as w:
        w.log(int(timing["steps"]), "train_loss", float(train_loss))
        w.log_scores(scores)
