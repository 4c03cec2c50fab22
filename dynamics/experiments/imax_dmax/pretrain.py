"""Stage 0: pretrain each architecture on the generic caption corpus; one cached checkpoint per
architecture, style draw and init seed, shared by every arm (see ``corpus.py`` for the corpus).

    OUT/pretrained/<model>-st<style>-i<init>/model.pt   state dict of the pretrained model
                                             /DONE       timing and the final caption loss (JSON)

A folder without ``DONE`` is an interrupted pretraining and is redone; a finished one is reused by
every later run (and rerun) of the same preset, which is what makes the pipeline resumable here too.
The corpus is drawn from the style draw and the init seed only, not from the data seed, so the
same checkpoint serves every data draw: what the arms then differ in is their fine-tuning data.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PrinterCallback, Trainer

from dynamics.experiments.imax_dmax.constructions import Construction, Entry, ImageRecord, _balanced
from dynamics.experiments.imax_dmax.corpus import CAPTION_INSTRUCTIONS, CAPTION_TASK, caption
from dynamics.experiments.imax_dmax.data import EntryDataset, VLMCollator
from dynamics.experiments.imax_dmax.phantoms import sample_phantom
from dynamics.experiments.imax_dmax.sources import SourceStyle, render_styled

DONE_FILE = "DONE"


@dataclass(frozen=True)
class PretrainConfig:
    """Size and optimisation of stage 0 (``n_images`` captions, ``epochs`` passes; 0 images: no stage 0)."""

    n_images: int = 800
    epochs: float = 4.0
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01

    def steps(self) -> int:
        return max(1, math.ceil(self.epochs * math.ceil(self.n_images / self.batch_size)))


def checkpoint_name(model: str, style_seed: int, init_seed: int) -> str:
    return f"{model}-st{style_seed}-i{init_seed}"


def build_corpus(n_images: int, *, sources: list[SourceStyle], size: int, seed: int) -> Construction:
    """``n_images`` phantoms, sources balanced over all of them, one caption entry each."""
    rng = np.random.default_rng([seed, 6])
    images: dict[int, ImageRecord] = {}
    entries: list[Entry] = []
    for i, src in enumerate(_balanced(rng, n_images, len(sources))):
        ph = sample_phantom(rng)
        pixels, boxes = render_styled(ph, sources[int(src)], size, rng)
        image_id = 5_000_000 + i
        images[image_id] = ImageRecord(image_id, int(src), ph, pixels, boxes)
        instr = CAPTION_INSTRUCTIONS[int(rng.integers(len(CAPTION_INSTRUCTIONS)))]
        entries.append(Entry(image_id, CAPTION_TASK, "caption", instr, caption(ph, rng)))
    return Construction("pretrain", images, entries)


def pretrain(
    model: str,
    *,
    sources: list[SourceStyle],
    size: int,
    dims,
    cfg: PretrainConfig,
    style_seed: int,
    init_seed: int,
    out_dir: str | Path,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Train ``model`` from random init seed ``init_seed`` on the caption corpus; save into ``out_dir``.

    Returns ``out_dir`` (``model.pt`` + ``DONE``); a finished ``out_dir`` is returned as it is.
    """
    from dynamics.experiments.imax_dmax.tokenizer import build_tokenizer
    from dynamics.experiments.imax_dmax.train import TrainConfig, _StepProgress, training_args
    from dynamics.experiments.imax_dmax.zoo import get_arch

    out_dir = Path(out_dir)
    if (out_dir / DONE_FILE).exists():
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    arch = get_arch(model, size=size, dims=dims)
    net = arch.build(tok, seed=init_seed)
    corpus = build_corpus(cfg.n_images, sources=sources, size=size, seed=1000 * style_seed + init_seed)
    tc = TrainConfig(
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        dims=dims,
    )
    trainer = Trainer(
        model=net,
        args=training_args(out_dir / "trainer", tc, cfg.steps(), init_seed),
        train_dataset=EntryDataset(corpus, tok),
        data_collator=VLMCollator(arch, tok, emit_task_ids=False),
    )
    trainer.remove_callback(PrinterCallback)
    if progress is not None:
        trainer.add_callback(_StepProgress(progress))
    result = trainer.train()
    torch.save(net.state_dict(), out_dir / "model.pt")
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info = {
        "steps": cfg.steps(),
        "train_s": time.perf_counter() - t0,
        "mean_loss": float(result.training_loss),
        "final_loss": float(losses[-1]) if losses else float("nan"),
    }
    (out_dir / DONE_FILE).write_text(json.dumps(info) + "\n")
    return out_dir
