"""Torch dataset of task entries and the per-architecture collator (emits ``task_ids``).

Every example is laid out as

    <bos> [image tokens of the architecture] instruction <sep> | answer <eos>

with the loss on the answer and ``<eos>`` only (labels -100 on the prefix and padding). Training
batches are right-padded; generation batches (``prompt_only=True``) hold the prefix only and are
left-padded, as decoder-only generation needs. Each batch carries ``task_ids`` (index into
``TASK_NAMES``), the key the dynamics hook reads per-task losses from and removes before the
model's forward; without the hook, build the collator with ``emit_task_ids=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from dynamics.experiments.imax_dmax.constructions import Construction, Entry
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.zoo import Arch

IGNORE_INDEX = -100
TASK_INDEX = {t: i for i, t in enumerate(TASK_NAMES)}


def encode_words(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens; raises on out-of-vocabulary words."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.unk_token_id in ids:
        bad = [w for w, i in zip(text.split(), ids, strict=False) if i == tok.unk_token_id]
        raise ValueError(f"words outside the tokenizer's vocabulary: {bad} in {text!r}")
    return ids


class EntryDataset(Dataset):
    """Entries of a construction with their image pixels, pre-tokenised once.

    ``__getitem__`` returns ``{"image": (H, W) float tensor, "prompt": ids, "answer": ids,
    "task_ids": int (index into TASK_NAMES; -1 for the stage-0 caption corpus, which is no task),
    "weight": float (the entry's loss weight, 1 unless ``weights`` say otherwise), "index": int}``.
    """

    def __init__(
        self,
        construction: Construction,
        tok: PreTrainedTokenizerBase,
        entries: Sequence[Entry] | None = None,
        weights: Sequence[float] | None = None,
    ):
        self.construction = construction
        self.entries = list(construction.entries if entries is None else entries)
        self.weights = [1.0] * len(self.entries) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.entries):
            raise ValueError(f"{len(self.weights)} weights for {len(self.entries)} entries")
        self.pixels = {i: torch.from_numpy(r.pixels) for i, r in construction.images.items()}
        self._prompt = [encode_words(tok, e.instruction) for e in self.entries]
        self._answer = [encode_words(tok, e.answer) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        return {
            "image": self.pixels[e.image_id],
            "prompt": self._prompt[i],
            "answer": self._answer[i],
            "task_ids": TASK_INDEX.get(e.task, -1),
            "weight": self.weights[i],
            "index": i,
        }


class VLMCollator:
    """Batches examples for one architecture (see module docstring for the layout)."""

    def __init__(
        self,
        arch: Arch,
        tok: PreTrainedTokenizerBase,
        *,
        prompt_only: bool = False,
        emit_task_ids: bool = True,
        emit_weights: bool = False,
    ):
        self.arch, self.tok = arch, tok
        self.prompt_only = prompt_only
        self.emit_task_ids = emit_task_ids
        self.emit_weights = emit_weights  # "loss_weight" (B,), read by train.WeightedTrainer
        self.image_ids = arch.image_token_ids(tok)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        tok = self.tok
        seqs, labels, prefix_lens = [], [], []
        for ex in examples:
            prefix = [tok.bos_token_id, *self.image_ids, *ex["prompt"], tok.sep_token_id]
            answer = [] if self.prompt_only else [*ex["answer"], tok.eos_token_id]
            seqs.append(prefix + answer)
            labels.append([IGNORE_INDEX] * len(prefix) + answer)
            prefix_lens.append(len(prefix))
        n = max(len(s) for s in seqs)
        b = len(seqs)
        input_ids = torch.full((b, n), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((b, n), dtype=torch.long)
        lab = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
        prefix_mask = torch.zeros((b, n), dtype=torch.bool)
        for r, (s, lb, pl) in enumerate(zip(seqs, labels, prefix_lens, strict=True)):
            sl = slice(n - len(s), n) if self.prompt_only else slice(0, len(s))  # left pad for generation
            input_ids[r, sl] = torch.tensor(s)
            attn[r, sl] = 1
            lab[r, sl] = torch.tensor(lb)
            start = sl.start
            prefix_mask[r, start : start + pl] = True
        batch = {"input_ids": input_ids, "attention_mask": attn}
        if not self.prompt_only:
            batch["labels"] = lab
        batch.update(self.arch.pixel_inputs(torch.stack([ex["image"] for ex in examples])))
        batch.update(self.arch.token_inputs(input_ids, prefix_mask, tok))
        if self.emit_task_ids:
            batch["task_ids"] = torch.tensor([ex["task_ids"] for ex in examples], dtype=torch.long)
        if self.emit_weights:
            batch["loss_weight"] = torch.tensor([ex["weight"] for ex in examples], dtype=torch.float32)
        return batch
