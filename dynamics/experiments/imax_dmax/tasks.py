"""The seven IMAX task families as instruction -> answer text, with their answer parsers.

Every answer is a short sentence over a closed vocabulary (``VOCAB``), so that a tiny
vision-language model can learn the format quickly and the evaluation reads answers back exactly:

==============  ==========================================  =====================================
task            instruction (one of a few paraphrases)      answer
==============  ==========================================  =====================================
calculation     "what is the cardiothoracic ratio ?"        "0.48"   (CTR rounded to 0.02)
report          "write the findings ."                      "heart enlarged . right effusion .
                                                              no nodule . opacity left upper .
                                                              mild edema ."
multiclass      "grade the edema ."                         "moderate"  (none/mild/moderate/severe)
multilabel      "list the findings ."                       "cardiomegaly , effusion" or "none"
rec             "locate the heart ."                        "1 3 4 5"  (box x0 y0 x1 y1 on a grid)
reg             "describe region 1 3 4 5 ."                 "heart" / "nodule right upper" / ...
vqa             "is there a nodule ?" / "which side ..."    "yes" / "no" / "right" / "left"
==============  ==========================================  =====================================

Boxes are written on a ``BOX_BINS`` x ``BOX_BINS`` grid over the image (normalised coordinates, as
Qwen-VL's [0, 1000) or PaliGemma's <loc> tokens): a pixel box (x0, y0, x1, y1) becomes the inclusive
cells ``floor(x0/q), floor(y0/q), ceil(x1/q)-1, ceil(y1/q)-1`` with ``q = size / BOX_BINS``.

Tasks with a single natural question per image (calculation, report, multiclass, multilabel) have
capacity 1; rec / reg / vqa have one candidate entry per nameable object or question, which is what
lets an image carry several entries of one task (IMAX's 7.46 entries over 4.10 tasks per image).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynamics.experiments.imax_dmax.corpus import CAPTION_WORDS
from dynamics.experiments.imax_dmax.phantoms import (
    CTR_RANGE,
    EDEMA_GRADES,
    FINDINGS,
    SIDES,
    ZONES,
    Phantom,
)

TASK_NAMES: tuple[str, ...] = ("calculation", "report", "multiclass", "multilabel", "rec", "reg", "vqa")
SINGLE_ENTRY_TASKS = ("calculation", "report", "multiclass", "multilabel")
BOX_BINS = 6

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "calculation": (
        "what is the cardiothoracic ratio ?",
        "compute the cardiothoracic ratio .",
        "measure the cardiothoracic ratio .",
    ),
    "report": ("write the findings .", "write a report for this image .", "describe the findings ."),
    "multiclass": ("grade the edema .", "what is the edema grade ?", "classify the edema severity ."),
    "multilabel": ("list the findings .", "which findings are present ?", "list all findings ."),
    "rec": ("locate the {obj} .", "where is the {obj} ?", "find the {obj} ."),
    "reg": ("describe region {box} .", "what is in region {box} ?", "name the region {box} ."),
}
VQA_QUESTIONS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("is the heart enlarged ?", "is there cardiomegaly ?"),
    "effusion": ("is there an effusion ?", "is there a pleural effusion ?"),
    "nodule": ("is there a nodule ?", "is a nodule present ?"),
    "opacity": ("is there an opacity ?", "is an opacity present ?"),
    "edema": ("is there edema ?", "is edema present ?"),
    "effusion_side": ("which side is the effusion ?", "where is the effusion ?"),
    "nodule_side": ("which lung has the nodule ?", "on which side is the nodule ?"),
    "opacity_side": ("which lung has the opacity ?", "on which side is the opacity ?"),
}
ANATOMY = ("heart", "right lung", "left lung")

# CTR answers on a 0.02 grid (quantisation error <= 0.01): 13 ordinal tokens a tiny model can tell
# apart; a finer grid mostly adds classes that differ by less than a pixel of heart width.
CTR_STEP = 0.02
CTR_TOKENS = tuple(
    f"{v * CTR_STEP:.2f}"
    for v in range(int(round(CTR_RANGE[0] / CTR_STEP)), int(round(CTR_RANGE[1] / CTR_STEP)) + 1)
)


def _words(text: str) -> list[str]:
    return text.split()


def _vocab() -> tuple[str, ...]:
    words: set[str] = set()
    for templates in INSTRUCTIONS.values():
        for t in templates:
            words.update(w for w in _words(t) if not w.startswith("{"))
    for qs in VQA_QUESTIONS.values():
        for q in qs:
            words.update(_words(q))
    words.update(w for obj in ANATOMY for w in obj.split())
    words.update(FINDINGS)
    words.update(EDEMA_GRADES)
    words.update(SIDES)
    words.update(ZONES)
    words.update(("yes", "no", "none", ",", ".", "normal", "enlarged", "region"))
    words.update(str(i) for i in range(BOX_BINS))
    words.update(CTR_TOKENS)
    words.update(CAPTION_WORDS)  # stage 0's caption corpus (corpus.py) shares the tokenizer
    return tuple(sorted(words))


VOCAB: tuple[str, ...] = _vocab()


@dataclass(frozen=True)
class Candidate:
    """One possible entry of a task for an image: ``key`` identifies the question (distinct per image)."""

    task: str
    key: str
    instruction: str
    answer: str
    truth: Any = field(default=None, compare=False)


# ----------------------------------------------------------------------------- answers
def ctr_answer(ctr: float) -> str:
    """CTR as a vocabulary token: nearest multiple of CTR_STEP, clipped to the sampled range."""
    v = min(max(round(ctr / CTR_STEP) * CTR_STEP, CTR_RANGE[0]), CTR_RANGE[1])
    return f"{v:.2f}"


def lesion_phrase(name: str, ph: Phantom) -> str:
    """Referring phrase of a region: anatomy by name, effusion with its side, lesions with side + zone."""
    if name in ANATOMY:
        return name
    if name == "effusion":
        return f"{ph.effusion} effusion"
    les = getattr(ph, name)
    return f"{name} {les.side} {les.zone}"


def report_answer(ph: Phantom) -> str:
    """Templated report: one sentence per finding in a fixed order (negatives stated, as radiologists do)."""
    s = ["heart enlarged ." if ph.cardiomegaly else "heart normal ."]
    s.append(f"{ph.effusion} effusion ." if ph.effusion else "no effusion .")
    for name in ("nodule", "opacity"):
        les = getattr(ph, name)
        s.append(f"{name} {les.side} {les.zone} ." if les else f"no {name} .")
    s.append(f"{EDEMA_GRADES[ph.edema]} edema ." if ph.edema else "no edema .")
    return " ".join(s)


def labels_answer(labels: dict[str, bool]) -> str:
    pos = [f for f in FINDINGS if labels[f]]
    return " , ".join(pos) if pos else "none"


def quantise_box(box_px: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    """Pixel box -> inclusive grid cells on a BOX_BINS grid (see module docstring)."""
    q = size / BOX_BINS
    x0, y0, x1, y1 = box_px
    clip = lambda v: min(max(v, 0), BOX_BINS - 1)  # noqa: E731
    return (
        clip(math.floor(x0 / q)),
        clip(math.floor(y0 / q)),
        clip(math.ceil(x1 / q) - 1),
        clip(math.ceil(y1 / q) - 1),
    )


def box_text(cells: tuple[int, int, int, int]) -> str:
    return " ".join(str(v) for v in cells)


def candidates(
    task: str, ph: Phantom, boxes_px: dict[str, tuple], size: int, rng: np.random.Generator
) -> list[Candidate]:
    """All distinct entries ``task`` can ask about this image, in a random order, paraphrase drawn by ``rng``."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    out: list[Candidate] = []
    if task == "calculation":
        out.append(Candidate(task, "ctr", pick(INSTRUCTIONS[task]), ctr_answer(ph.ctr), ph.ctr))
    elif task == "report":
        out.append(Candidate(task, "report", pick(INSTRUCTIONS[task]), report_answer(ph), dict(ph.labels())))
    elif task == "multiclass":
        out.append(Candidate(task, "edema", pick(INSTRUCTIONS[task]), EDEMA_GRADES[ph.edema], ph.edema))
    elif task == "multilabel":
        labels = ph.labels()
        out.append(Candidate(task, "labels", pick(INSTRUCTIONS[task]), labels_answer(labels), labels))
    elif task in ("rec", "reg"):
        for name, box in boxes_px.items():
            cells = quantise_box(box, size)
            phrase = lesion_phrase(name, ph)
            if task == "rec":
                instr = pick(INSTRUCTIONS[task]).format(obj=name)
                out.append(Candidate(task, name, instr, box_text(cells), cells))
            else:
                instr = pick(INSTRUCTIONS[task]).format(box=box_text(cells))
                out.append(Candidate(task, name, instr, phrase, phrase))
        if task == "reg":
            # Two regions quantised to the same cells would make the phrase ambiguous: keep the first.
            seen: set[str] = set()
            kept: list[Candidate] = []
            for c in out:
                if c.instruction not in seen:
                    seen.add(c.instruction)
                    kept.append(c)
            out = kept
    else:  # vqa
        labels = ph.labels()
        for f in FINDINGS:
            ans = "yes" if labels[f] else "no"
            out.append(Candidate(task, f, pick(VQA_QUESTIONS[f]), ans, ans))
        for name in ("effusion", "nodule", "opacity"):
            side = ph.effusion if name == "effusion" else getattr(getattr(ph, name), "side", None)
            if side is not None:
                out.append(Candidate(task, f"{name}_side", pick(VQA_QUESTIONS[f"{name}_side"]), side, side))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# ----------------------------------------------------------------------------- parsers
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def parse_ctr(text: str) -> float | None:
    """First number in the answer, or None (e.g. "0.47" -> 0.47, "ratio" -> None)."""
    m = _NUM.search(text or "")
    return float(m.group()) if m else None


def parse_grade(text: str) -> int | None:
    """Edema grade 0..3 from the first grade word, or None."""
    for w in (text or "").split():
        if w in EDEMA_GRADES:
            return EDEMA_GRADES.index(w)
    return None


def parse_labels(text: str) -> set[str]:
    """Finding names in a comma list; "none" or anything unknown contributes nothing."""
    return {w for w in re.split(r"[\s,]+", text or "") if w in FINDINGS}


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    """First four integers as (x0, y0, x1, y1) cells with x0 <= x1, y0 <= y1 (reordered), else None."""
    nums = [int(float(v)) for v in _NUM.findall(text or "")]
    if len(nums) < 4:
        return None
    x0, y0, x1, y1 = nums[:4]
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def parse_report_findings(text: str) -> set[str]:
    """Positive findings stated in a report, sentence by sentence.

    A sentence starting with "no" is negative; otherwise "enlarged" signals cardiomegaly, a grade
    word other than "none" or the word "edema" signals oedema, and a finding name signals itself.
    """
    found: set[str] = set()
    for sent in (text or "").split("."):
        words = sent.split()
        if not words or words[0] == "no":
            continue
        if "enlarged" in words or "cardiomegaly" in words:
            found.add("cardiomegaly")
        for f in ("effusion", "nodule", "opacity"):
            if f in words:
                found.add(f)
        if "edema" in words and "none" not in words:
            found.add("edema")
    return found
