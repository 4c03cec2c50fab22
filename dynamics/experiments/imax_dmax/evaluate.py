"""Greedy generation on the evaluation set, answer parsing and per-task metrics.

Entries are generated task by task in left-padded batches with ``model.generate`` (greedy,
``max_new_tokens`` = the longest answer the task's grammar allows plus ``<eos>``), decoded without
special tokens and scored by ``metrics.score_entries``. The multi-task score is added as the
global entry ``scores[""]["multitask_score"]``.

Each task's normalised score is also split by source (``Construction.source_split``): ``score_home`` on the
evaluation images from the task's home source (the one DMAX trains that task on) and
``score_shifted`` on the others. A DMAX model that learned a task but not across sources is high
on the first and low on the second; an IMAX model, which sees every source, should be level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dynamics.experiments.imax_dmax.data import EntryDataset, VLMCollator
from dynamics.experiments.imax_dmax.metrics import multitask_score, score_entries
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.zoo import Arch

# Longest answer of each task's grammar, in words (see tasks.py): the report's five sentences,
# five labels with four commas, four box cells, "nodule right upper", one word otherwise.
MAX_ANSWER_WORDS = {
    "calculation": 1,
    "report": 17,
    "multiclass": 1,
    "multilabel": 9,
    "rec": 4,
    "reg": 3,
    "vqa": 1,
}


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    arch: Arch,
    tok: PreTrainedTokenizerBase,
    dataset: EntryDataset,
    *,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    confidences: list[float] | None = None,
) -> list[str]:
    """Greedy answers for every entry of ``dataset``, in dataset order.

    With a list ``confidences``, it is filled (in dataset order) with each answer's confidence: the
    smallest probability the model gave any of the answer's tokens, ``<eos>`` included (the
    weakest link of the greedy answer; pseudo.py keeps answers above a threshold).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collate = VLMCollator(arch, tok, prompt_only=True, emit_task_ids=False)
    was_training = model.training
    model.eval()
    out: list[str | None] = [None] * len(dataset)
    conf = [0.0] * len(dataset)
    try:
        for task in TASK_NAMES:
            idx = [i for i, e in enumerate(dataset.entries) if e.task == task]
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                batch = {k: v.to(model.device) for k, v in collate([dataset[i] for i in chunk]).items()}
                n_prompt = batch["input_ids"].shape[1]
                gen = cast(Any, model).generate(
                    **batch,
                    max_new_tokens=MAX_ANSWER_WORDS[task] + 1,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    output_scores=confidences is not None,
                    return_dict_in_generate=True,
                )
                seqs = gen.sequences[:, n_prompt:]
                texts = tok.batch_decode(seqs, skip_special_tokens=True)
                for i, t in zip(chunk, texts, strict=True):
                    out[i] = " ".join(t.split())
                if confidences is not None:
                    for i, c in zip(chunk, _min_token_prob(gen.scores, seqs, tok.eos_token_id), strict=True):
                        conf[i] = c
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    if confidences is not None:
        confidences[:] = conf
    return [o if o is not None else "" for o in out]


def _min_token_prob(scores: tuple[torch.Tensor, ...], seqs: torch.Tensor, eos: int) -> list[float]:
    """Per row: min over generated tokens up to the first ``eos`` of softmax(score)[token]."""
    probs = torch.stack([torch.softmax(s.float(), -1) for s in scores], 1)  # (B, T, V)
    chosen = probs.gather(-1, seqs[:, : probs.shape[1], None]).squeeze(-1)  # (B, T)
    # Tokens after the first eos are padding the batch appended: not part of the answer.
    after = (seqs[:, : probs.shape[1]] == eos).long().cumsum(1) - (seqs[:, : probs.shape[1]] == eos).long()
    chosen = chosen.masked_fill(after > 0, 1.0)
    return chosen.min(1).values.tolist()


def split_scores(entries, predictions, split: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """``{task: {"score_home": s, "score_shifted": s}}``, each the task's ``score`` on that part of
    ``split`` (``Construction.source_split``: part name -> indices into ``entries``).

    A part with no entries of a task (e.g. ``eval_sources="home"`` has no shifted images) is
    left out rather than reported as a number.
    """
    out: dict[str, dict[str, float]] = {}
    for part, idx in split.items():
        sub = score_entries([entries[i] for i in idx], [predictions[i] for i in idx])
        for task, m in sub.items():
            out.setdefault(task, {})[f"score_{part}"] = m["score"]
    return out


def evaluate_model(
    model: PreTrainedModel,
    arch: Arch,
    tok: PreTrainedTokenizerBase,
    dataset: EntryDataset,
    *,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """``({task: {metric: value}, "": {"multitask_score": m}}, predictions)`` on ``dataset``.

    The per-task metrics include the source split ``score_home`` / ``score_shifted`` (see the
    module docstring).
    """
    preds = generate_answers(model, arch, tok, dataset, batch_size=batch_size, progress=progress)
    scores = score_entries(dataset.entries, preds)
    scores[""] = {"multitask_score": multitask_score(scores)}
    split = dataset.construction.source_split(dataset.entries)
    for task, m in split_scores(dataset.entries, preds, split).items():
        scores[task].update(m)
    return scores, preds
