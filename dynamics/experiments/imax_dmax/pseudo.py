"""Stage 2 of DMAX-3stage: densify DMAX images into pseudo-IMAX data (rules first, then the model).

DMAX gives every image one task. Pseudo-IMAX raises each image to IMAX's task density: image ``i``
gets ``k_i`` tasks with ``sum k_i = round(4.10 N)`` (the same draw as IMAX's, ``constructions``),
its own real task plus ``k_i - 1`` added ones, one entry each. An added task's answer comes from

1. a **rule** on the image's own (real) annotation, where one determines it:

   ==============  ==================================================================
   annotation      gives
   ==============  ==================================================================
   report          multilabel (the findings it states), multiclass (its edema grade),
                   VQA (presence of one finding)
   multilabel      VQA (presence of one finding)
   multiclass      VQA ("is there edema ?": grade >= 1)
   calculation     VQA ("is the heart enlarged ?": CTR > 0.5)
   REC             REG (the box as the region; the phrase from the object's name, a
                   lesion's side and zone read off the box's position)
   REG             REC (the region's box for the object the phrase names)
   ==============  ==================================================================

2. otherwise the **stage-1 model's own answer** to the task's instruction (greedy, batched), kept
   only when its confidence (the smallest probability it gave any answer token, ``<eos>``
   included) is at least ``threshold``. The model is asked only what needs no annotation: the
   four single-question tasks, REC of the anatomy (heart, lungs: always present), VQA presence
   questions; never REG (it needs a region) nor a lesion's side (it presupposes the lesion).

Rules are tried first; model answers fill the rest, up to one spare question per image, so an
image whose answers fall below the threshold ends with fewer tasks. ``stats`` reports the density
reached and, since the phantoms' ground truth is known, the **pseudo-label accuracy** per task and
per origin (rule / model): an answer is right when it equals the ground-truth answer (the CTR:
within one answer step, 0.02; REC: IoU >= 0.5 on the answer grid).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dynamics.experiments.imax_dmax.constructions import (
    PAPER_TASKS_PER_IMAGE,
    Construction,
    Entry,
    _tasks_per_image,
)
from dynamics.experiments.imax_dmax.metrics import iou
from dynamics.experiments.imax_dmax.phantoms import EDEMA_GRADES, FINDINGS
from dynamics.experiments.imax_dmax.tasks import (
    ANATOMY,
    CTR_STEP,
    INSTRUCTIONS,
    TASK_NAMES,
    VQA_QUESTIONS,
    Candidate,
    box_text,
    candidates,
    labels_answer,
    parse_box,
    parse_ctr,
    parse_grade,
    parse_report_findings,
)

MODEL_TASKS = ("calculation", "report", "multiclass", "multilabel", "rec", "vqa")


@dataclass(frozen=True)
class Query:
    """One added (image, task) entry to fill: its instruction, the ground truth (for accuracy only),
    and the rule's answer (None: the model answers)."""

    image_id: int
    task: str
    key: str
    instruction: str
    true_answer: str
    truth: object
    rule_answer: str | None


@dataclass
class PseudoResult:
    """Pseudo-IMAX: the construction (real DMAX entries first), per-entry pseudo flags, statistics."""

    construction: Construction
    is_pseudo: list[bool]
    stats: dict = field(default_factory=dict)
    origin: list[str] = field(default_factory=list)  # per pseudo entry: "rule" or "model"

    def weights(self, pseudo_weight: float) -> list[float]:
        """Loss weight per entry: 1 for real DMAX entries, ``pseudo_weight`` for pseudo ones."""
        return [pseudo_weight if p else 1.0 for p in self.is_pseudo]


# ---------------------------------------------------------------------------- rules
def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _grade_from_report(text: str) -> int | None:
    for sent in text.split("."):
        words = sent.split()
        if "edema" in words:
            return 0 if words[0] == "no" else parse_grade(sent)
    return None


def _phrase_from_box(name: str, cells: tuple[int, int, int, int]) -> str:
    """REG phrase of a REC object: anatomy by name; side (and a lesion's zone) from the box centre.

    The image shows the patient's right on the left; lesions above the lungs' mid-height are upper.
    """
    if name in ANATOMY:
        return name
    from dynamics.experiments.imax_dmax.tasks import BOX_BINS

    cx = (cells[0] + cells[2] + 1) / (2 * BOX_BINS)
    cy = (cells[1] + cells[3] + 1) / (2 * BOX_BINS)
    side = "right" if cx < 0.5 else "left"
    if name == "effusion":
        return f"{side} effusion"
    return f"{name} {side} {'upper' if cy < 0.45 else 'lower'}"


def rule_answers(own: Sequence[Entry], task: str, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(key, instruction, answer)`` options for ``task`` derivable from an image's real entries ``own``."""
    out: list[tuple[str, str, str]] = []
    by_task = defaultdict(list)
    for e in own:
        by_task[e.task].append(e)
    if "report" in by_task:
        text = by_task["report"][0].answer
        found = parse_report_findings(text)
        if task == "multilabel":
            labels = {f: f in found for f in FINDINGS}
            out.append(("labels", _pick(rng, INSTRUCTIONS["multilabel"]), labels_answer(labels)))
        if task == "multiclass" and (g := _grade_from_report(text)) is not None:
            out.append(("edema", _pick(rng, INSTRUCTIONS["multiclass"]), EDEMA_GRADES[g]))
        if task == "vqa":
            f = FINDINGS[int(rng.integers(len(FINDINGS)))]
            out.append((f, _pick(rng, VQA_QUESTIONS[f]), "yes" if f in found else "no"))
    if task == "vqa" and "multilabel" in by_task:
        found = {w for w in by_task["multilabel"][0].answer.replace(",", " ").split() if w in FINDINGS}
        f = FINDINGS[int(rng.integers(len(FINDINGS)))]
        out.append((f, _pick(rng, VQA_QUESTIONS[f]), "yes" if f in found else "no"))
    if task == "vqa" and "multiclass" in by_task:
        g = parse_grade(by_task["multiclass"][0].answer)
        if g is not None:
            out.append(("edema", _pick(rng, VQA_QUESTIONS["edema"]), "yes" if g >= 1 else "no"))
    if task == "vqa" and "calculation" in by_task:
        v = parse_ctr(by_task["calculation"][0].answer)
        if v is not None:
            out.append(
                ("cardiomegaly", _pick(rng, VQA_QUESTIONS["cardiomegaly"]), "yes" if v > 0.5 else "no")
            )
    if task == "reg" and "rec" in by_task:
        e = by_task["rec"][int(rng.integers(len(by_task["rec"])))]
        cells = parse_box(e.answer)
        if cells is not None:
            instr = _pick(rng, INSTRUCTIONS["reg"]).format(box=box_text(cells))
            out.append((e.key, instr, _phrase_from_box(e.key, cells)))
    if task == "rec" and "reg" in by_task:
        e = by_task["reg"][int(rng.integers(len(by_task["reg"])))]
        cells = parse_box(e.instruction)
        name = e.answer if e.answer in ANATOMY else e.answer.split()[0]
        if name == "right" or name == "left":  # "right effusion"
            name = "effusion"
        if cells is not None:
            out.append((name, _pick(rng, INSTRUCTIONS["rec"]).format(obj=name), box_text(cells)))
    return out


def _model_question(task: str, rng: np.random.Generator) -> tuple[str, str]:
    """``(key, instruction)`` the stage-1 model is asked for ``task`` (nothing that needs annotation)."""
    if task == "rec":
        obj = ANATOMY[int(rng.integers(len(ANATOMY)))]
        return obj, _pick(rng, INSTRUCTIONS["rec"]).format(obj=obj)
    if task == "vqa":
        f = FINDINGS[int(rng.integers(len(FINDINGS)))]
        return f, _pick(rng, VQA_QUESTIONS[f])
    key = {"calculation": "ctr", "report": "report", "multiclass": "edema", "multilabel": "labels"}[task]
    return key, _pick(rng, INSTRUCTIONS[task])


def is_correct(task: str, answer: str, true_answer: str, truth: object) -> bool:
    """Is a pseudo answer right against the phantom's ground truth (see module docstring)?"""
    if task == "calculation":
        v = parse_ctr(answer)
        return v is not None and abs(v - float(truth)) <= CTR_STEP + 1e-9  # type: ignore[arg-type]
    if task == "rec":
        return iou(parse_box(answer), tuple(truth)) >= 0.5  # type: ignore[arg-type]
    return " ".join(answer.split()) == true_answer


# ---------------------------------------------------------------------------- planning
def plan_queries(
    dmax: Construction, *, seed: int, tasks_per_image: float = PAPER_TASKS_PER_IMAGE, spare: int = 1
) -> tuple[list[list[Query]], np.ndarray]:
    """Per DMAX image (sorted by id): the ordered added-task queries, and the target task counts ``k``.

    Rule-derivable tasks come first; model questions follow, ``k_i - 1 + spare`` queries in all at
    most (the spare replaces an answer below the threshold).
    """
    rng = np.random.default_rng([seed, 4])
    own: dict[int, list[Entry]] = defaultdict(list)
    for e in dmax.entries:
        own[e.image_id].append(e)
    ids = sorted(own)
    n = len(ids)
    k = _tasks_per_image(rng, n, int(round(tasks_per_image * n)))
    plans: list[list[Query]] = []
    for img_id, k_i in zip(ids, k, strict=True):
        rec = dmax.images[img_id]
        have = {e.task for e in own[img_id]}
        truth_rng = np.random.default_rng([seed, 5, img_id])

        def truth_of(task: str, key: str, rec=rec, truth_rng=truth_rng) -> Candidate | None:
            cs = candidates(task, rec.phantom, rec.boxes, rec.pixels.shape[0], truth_rng)
            return next((c for c in cs if c.key == key), None)

        rule_q: list[Query] = []
        model_q: list[Query] = []
        for t in (TASK_NAMES[i] for i in rng.permutation(len(TASK_NAMES))):
            if t in have:
                continue
            options = rule_answers(own[img_id], t, rng)
            if options:
                key, instr, ans = options[int(rng.integers(len(options)))]
                c = truth_of(t, key)
                if c is None:  # the rule named an object the image lacks (a misread box): skip
                    continue
                rule_q.append(Query(img_id, t, key, instr, c.answer, c.truth, ans))
            elif t in MODEL_TASKS:
                key, instr = _model_question(t, rng)
                c = truth_of(t, key)
                if c is not None:
                    model_q.append(Query(img_id, t, key, instr, c.answer, c.truth, None))
        need = int(k_i) - len(have)
        plans.append((rule_q + model_q)[: max(0, need + spare)])
    return plans, k


def densify(
    dmax: Construction,
    answer_fn: Callable[[list[Query]], tuple[list[str], list[float]]],
    *,
    seed: int,
    threshold: float,
    tasks_per_image: float = PAPER_TASKS_PER_IMAGE,
) -> PseudoResult:
    """Pseudo-IMAX from ``dmax``; ``answer_fn(queries) -> (answers, confidences)`` is the stage-1
    model (``train.model_answer_fn``) or, in tests, any stand-in.

    Returns the construction ``pseudo-IMAX`` (DMAX's images; its real entries, then the pseudo
    ones) with ``stats``: target and reached tasks per image, entries per image, counts, and the
    pseudo-label accuracy overall, per origin and per task.
    """
    plans, k = plan_queries(dmax, seed=seed, tasks_per_image=tasks_per_image)
    asked = [q for plan in plans for q in plan if q.rule_answer is None]
    answers, conf = answer_fn(asked) if asked else ([], [])
    if len(answers) != len(asked) or len(conf) != len(asked):
        raise ValueError(f"answer_fn gave {len(answers)} answers / {len(conf)} confidences for {len(asked)}")
    model_answer = {id(q): (a, c) for q, a, c in zip(asked, answers, conf, strict=True)}
    have = Counter(img for img, _ in {(e.image_id, e.task) for e in dmax.entries})
    pseudo: list[Entry] = []
    origin: list[str] = []
    correct: list[bool] = []
    rejected = 0
    for plan, k_i in zip(plans, k, strict=True):
        if not plan:
            continue
        need = int(k_i) - have[plan[0].image_id]
        for q in plan:
            if need <= 0:
                break
            if q.rule_answer is not None:
                ans, src = q.rule_answer, "rule"
            else:
                ans, c = model_answer[id(q)]
                if c < threshold or not ans.strip():
                    rejected += 1
                    continue
                src = "model"
            pseudo.append(Entry(q.image_id, q.task, q.key, q.instruction, ans, q.truth))
            origin.append(src)
            correct.append(is_correct(q.task, ans, q.true_answer, q.truth))
            need -= 1
    entries = list(dmax.entries) + pseudo
    cons = Construction("pseudo-IMAX", dmax.images, entries)
    pairs = {(e.image_id, e.task) for e in entries}
    n_img = len(dmax.images)

    def acc(mask: Sequence[bool]) -> float | None:
        sel = [c for c, m in zip(correct, mask, strict=True) if m]
        return float(np.mean(sel)) if sel else None

    stats = {
        "tasks_per_image_target": float(np.sum(k) / n_img),
        "tasks_per_image": len(pairs) / n_img,
        "entries_per_image": len(entries) / n_img,
        "real_entries": len(dmax.entries),
        "pseudo_entries": len(pseudo),
        "threshold": float(threshold),
        "model_asked": len(asked),
        "model_rejected": rejected,
        "by_origin": {o: int(sum(1 for x in origin if x == o)) for o in ("rule", "model")},
        "accuracy": acc([True] * len(pseudo)),
        "accuracy_by_origin": {o: acc([x == o for x in origin]) for o in ("rule", "model")},
        "accuracy_by_task": {t: acc([e.task == t for e in pseudo]) for t in TASK_NAMES},
        "entries_by_task": {t: int(sum(1 for e in pseudo if e.task == t)) for t in TASK_NAMES},
    }
    return PseudoResult(cons, [False] * len(dmax.entries) + [True] * len(pseudo), stats, origin)


__all__ = ["Query", "PseudoResult", "rule_answers", "plan_queries", "densify", "is_correct"]
