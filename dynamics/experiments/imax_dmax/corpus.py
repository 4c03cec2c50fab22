"""Stage 0: a generic image-caption corpus, the analogue of an MLLM's alignment / pretraining data.

Every arm of the reproduction fine-tunes from the same checkpoint, pretrained on captions of
phantom images from all sources, as the paper's MLLMs were pretrained before their IMAX/DMAX
fine-tuning. A caption describes what the image shows in words and an order that none of the
seven tasks uses (free order, other phrasing, no ratios, grades on their own scale word, no
boxes), e.g.

    instruction: "caption this image ."
    answer:      "chest film : fluid on the left ; large heart ; small spot in the right upper lung"

so pretraining teaches the towers to see and the language model to talk about findings without
teaching any task's format or answer grammar. What it shares with the tasks is the world: the
same phantoms, the same sources.
"""

from __future__ import annotations

import numpy as np

from dynamics.experiments.imax_dmax.phantoms import EDEMA_GRADES, Phantom

CAPTION_TASK = "caption"
CAPTION_INSTRUCTIONS = ("caption this image .", "caption this film .", "give a caption .")
CAPTION_WORDS = (
    "caption", "give", "this", "image", "film", "chest", ":", ";", "large", "normal", "heart", "fluid",
    "on", "the", "small", "spot", "in", "patchy", "shadow", "lung", "clear", "lungs", "haze", "a",
)  # fmt: skip


def caption(ph: Phantom, rng: np.random.Generator) -> str:
    """A caption of ``ph``: its findings as phrases in a random order (see module docstring)."""
    parts = ["large heart" if ph.cardiomegaly else "normal heart"]
    if ph.effusion:
        parts.append(f"fluid on the {ph.effusion}")
    if ph.nodule is not None:
        parts.append(f"small spot in the {ph.nodule.side} {ph.nodule.zone} lung")
    if ph.opacity is not None:
        parts.append(f"patchy shadow in the {ph.opacity.side} {ph.opacity.zone} lung")
    parts.append(f"{EDEMA_GRADES[ph.edema]} haze" if ph.edema else "clear lungs")
    order = rng.permutation(len(parts))
    return "chest film : " + " ; ".join(parts[i] for i in order)
