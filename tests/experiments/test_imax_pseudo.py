"""DMAX-3stage's stage 2: pseudo-IMAX density, rules checked against the phantoms, accuracy against ground truth."""

from __future__ import annotations

from collections import Counter

import pytest

from dynamics.experiments.imax_dmax.constructions import build_bundle
from dynamics.experiments.imax_dmax.phantoms import EDEMA_GRADES, FINDINGS
from dynamics.experiments.imax_dmax.pseudo import densify, is_correct
from dynamics.experiments.imax_dmax.tasks import labels_answer, lesion_phrase, quantise_box


@pytest.fixture(scope="module")
def dmax():
    return build_bundle(80, 7, seed=5).dmax


def _oracle(queries):
    return [q.true_answer for q in queries], [1.0] * len(queries)


def test_pseudo_imax_reaches_imax_task_density(dmax):
    res = densify(dmax, _oracle, seed=0, threshold=0.5)
    st = res.stats
    cons = res.construction
    pairs = {(e.image_id, e.task) for e in cons.entries}
    assert len(pairs) / len(cons.images) == pytest.approx(st["tasks_per_image"])
    assert st["tasks_per_image_target"] == pytest.approx(4.10, abs=0.5 / len(dmax.images) + 1e-9)
    # Every image reaches its target unless it has run out of answerable tasks (REG needs a REC annotation).
    assert st["tasks_per_image"] == pytest.approx(st["tasks_per_image_target"], abs=0.05)
    assert st["tasks_per_image"] <= st["tasks_per_image_target"] + 1e-9
    assert cons.images is dmax.images and cons.entries[: len(dmax.entries)] == dmax.entries
    assert res.is_pseudo == [False] * len(dmax.entries) + [True] * st["pseudo_entries"]
    assert res.weights(0.25) == [1.0] * len(dmax.entries) + [0.25] * st["pseudo_entries"]
    # One entry per added (image, task) pair, none repeating the image's real task.
    added = Counter((e.image_id, e.task) for e in cons.entries[len(dmax.entries) :])
    assert max(added.values()) == 1
    assert not set(added) & {(e.image_id, e.task) for e in dmax.entries}


def test_threshold_drops_unsure_model_answers_and_lowers_the_density(dmax):
    unsure = lambda qs: ([q.true_answer for q in qs], [0.1] * len(qs))  # noqa: E731
    res = densify(dmax, unsure, seed=0, threshold=0.5)
    assert res.stats["by_origin"]["model"] == 0 and res.stats["model_rejected"] > 0
    assert set(res.origin) == {"rule"}
    assert (
        res.stats["tasks_per_image"] < densify(dmax, _oracle, seed=0, threshold=0.5).stats["tasks_per_image"]
    )


def test_pseudo_label_accuracy_is_measured_against_the_phantoms(dmax):
    # The model answers every other question wrong ("none" parses as no grade, no box, no ratio).
    def half(qs):
        return [q.true_answer if i % 2 else "none none" for i, q in enumerate(qs)], [1.0] * len(qs)

    res = densify(dmax, half, seed=0, threshold=0.5)
    pseudo = res.construction.entries[len(dmax.entries) :]
    # Recount independently from the phantoms: what is each pseudo entry's true answer?
    right: dict[str, list[bool]] = {"rule": [], "model": []}
    assert len(res.origin) == len(pseudo)
    for e, origin in zip(pseudo, res.origin, strict=True):
        ph = dmax.images[e.image_id].phantom
        boxes = dmax.images[e.image_id].boxes
        size = dmax.images[e.image_id].pixels.shape[0]
        if e.task == "multilabel":
            ok = e.answer == labels_answer(ph.labels())
        elif e.task == "multiclass":
            ok = e.answer == EDEMA_GRADES[ph.edema]
        elif e.task == "vqa":
            ok = e.answer == ("yes" if ph.labels()[e.key] else "no") if e.key in FINDINGS else None
        elif e.task == "reg":
            ok = e.answer == lesion_phrase(e.key, ph)
        elif e.task == "rec":
            from dynamics.experiments.imax_dmax.metrics import iou
            from dynamics.experiments.imax_dmax.tasks import parse_box

            ok = iou(parse_box(e.answer), quantise_box(boxes[e.key], size)) >= 0.5
        elif e.task == "calculation":
            ok = e.answer[:1].isdigit() and abs(float(e.answer) - ph.ctr) <= 0.02 + 1e-9
        else:  # report
            from dynamics.experiments.imax_dmax.tasks import report_answer

            ok = e.answer == report_answer(ph)
        right[origin].append(bool(ok))
    st = res.stats
    assert st["accuracy_by_origin"]["rule"] == pytest.approx(sum(right["rule"]) / len(right["rule"]))
    assert st["accuracy_by_origin"]["model"] == pytest.approx(sum(right["model"]) / len(right["model"]))
    assert 0.35 < st["accuracy_by_origin"]["model"] < 0.65  # about half, as the stand-in answers
    assert st["accuracy_by_origin"]["rule"] > 0.95  # the rules read real annotations
    assert st["by_origin"]["rule"] > 0 and st["by_origin"]["model"] > 0


def test_is_correct_tolerances():
    assert is_correct("calculation", "0.50", "0.50", 0.515) and not is_correct(
        "calculation", "0.46", "0.50", 0.515
    )
    assert is_correct("rec", "1 1 3 3", "1 1 3 3", (1, 1, 3, 2)) and not is_correct(
        "rec", "4 4 5 5", "", (0, 0, 1, 1)
    )
    assert is_correct("vqa", " yes ", "yes", "yes") and not is_correct("vqa", "no", "yes", "yes")
