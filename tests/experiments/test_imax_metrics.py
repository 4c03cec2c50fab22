"""Metrics and parsers against hand-computed values, including malformed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynamics.experiments.imax_dmax import metrics as M
from dynamics.experiments.imax_dmax import tasks as T
from dynamics.experiments.imax_dmax.constructions import Entry
from dynamics.experiments.imax_dmax.phantoms import CTR_RANGE, sample_phantom


def test_corpus_bleu_by_hand():
    refs = ["a b c d", "a b c d e"]
    hyps = ["a b c d", "a b c e"]
    # clipped n-gram matches / hypothesis n-grams over the corpus:
    # p1 = (4 + 4) / 8, p2 = (3 + 2) / 6, p3 = (2 + 1) / 4, p4 = (1 + 0) / 2; c = 8, r = 9.
    expected = math.exp(1 - 9 / 8) * (1.0 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
    assert M.corpus_bleu(refs, hyps) == pytest.approx(expected)
    assert M.corpus_bleu(["a b"], ["a b"]) == pytest.approx(1.0)  # order capped by length
    assert M.corpus_bleu(["the cat"], ["the the the"]) == 0.0  # clipped: no bigram matches
    assert M.corpus_bleu(["a b"], [""]) == 0.0
    with pytest.raises(ValueError):
        M.corpus_bleu(["a"], [])


def test_rouge_l_by_hand():
    # LCS("a b c d e", "a c e f") = "a c e": P = 3/4, R = 3/5, F = 2PR / (P + R) = 2/3.
    assert M.rouge_l("a b c d e", "a c e f") == pytest.approx(2 / 3)
    assert M.rouge_l("left lung", "left lung") == 1.0
    assert M.rouge_l("left lung", "") == 0.0
    assert M.rouge_l("a b", "c d") == 0.0


def test_classification_metrics_by_hand():
    t = [{"a", "b"}, {"a"}, set(), set()]
    p = [{"a"}, {"b"}, set(), {"c"}]
    assert M.example_f1(t, p) == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    # classes 0, 1, 2: F1 = 2/3, 2/3, 0 (None is a wrong answer, not a class)
    assert M.macro_f1([0, 0, 1, 2], [0, 1, 1, None]) == pytest.approx(4 / 9)
    assert M.accuracy(["yes", "no"], ["yes", "yes"]) == 0.5
    assert M.mae([0.5, 0.4], [0.45, 0.5]) == pytest.approx(0.075)
    # label-wise: a: tp1 fn0 fp0 -> 1; b: tp0 fp1 fn1 -> 0; c: no support, no prediction -> 1
    assert M.label_macro_f1([{"a", "b"}], [{"a", "c"}], labels=["a", "b", "c"]) == pytest.approx(
        (1 + 0 + 0) / 3
    )


def test_iou_on_grid_cells():
    assert M.iou((0, 0, 1, 1), (1, 1, 2, 2)) == pytest.approx(1 / 7)
    assert M.iou((2, 2, 2, 2), (2, 2, 2, 2)) == 1.0
    assert M.iou((0, 0, 0, 0), (3, 3, 4, 4)) == 0.0
    assert M.iou(None, (0, 0, 1, 1)) == 0.0


def test_parsers_on_malformed_answers():
    assert T.parse_ctr("0.47") == 0.47 and T.parse_ctr("ratio 0.5 .") == 0.5
    assert T.parse_ctr("") is None and T.parse_ctr("heart") is None and T.parse_ctr(None) is None
    assert T.parse_grade("moderate edema") == 2 and T.parse_grade("grade") is None
    assert T.parse_labels("cardiomegaly , , foo edema") == {"cardiomegaly", "edema"}
    assert T.parse_labels("none") == set() and T.parse_labels("") == set()
    assert T.parse_box("1 1 0 0") == (0, 0, 1, 1)  # reordered corners
    assert T.parse_box("0 0 1") is None and T.parse_box("left lung") is None
    assert T.parse_box("2 3 4 5 1") == (2, 3, 4, 5)
    rep = "heart enlarged . no effusion . nodule right upper . no opacity . mild edema ."
    assert T.parse_report_findings(rep) == {"cardiomegaly", "nodule", "edema"}
    assert T.parse_report_findings("heart normal . no edema .") == set()
    assert T.parse_report_findings("no . . effusion") == {"effusion"}
    assert T.parse_report_findings("") == set()


def test_answer_templates_round_trip_through_parsers():
    rng = np.random.default_rng(0)
    for _ in range(100):
        ph = sample_phantom(rng)
        pos = {f for f, v in ph.labels().items() if v}
        assert T.parse_report_findings(T.report_answer(ph)) == pos
        assert T.parse_labels(T.labels_answer(ph.labels())) == pos
        assert T.parse_grade(T.EDEMA_GRADES[ph.edema]) == ph.edema
        assert abs(T.parse_ctr(T.ctr_answer(ph.ctr)) - ph.ctr) <= T.CTR_STEP / 2 + 1e-9
        assert T.ctr_answer(ph.ctr) in T.CTR_TOKENS
    cells = T.quantise_box((7.9, 0.0, 24.1, 47.9), 48)  # q = 8 px per cell
    assert cells == (0, 0, 3, 5)
    assert T.parse_box(T.box_text(cells)) == cells


def test_task_metrics_with_unparsable_and_perfect_answers():
    m = M.task_metrics("calculation", [0.45, 0.60], ["0.45", "0.60"], ["0.47", "ratio"])
    # errors 0.02 and, unparsable, the worst in-range error max(0.60 - lo, hi - 0.60)
    lo, hi = CTR_RANGE
    assert (
        m["mae"] == pytest.approx((0.02 + max(0.60 - lo, hi - 0.60)) / 2)
        and m["parse_rate"] == 0.5
        and m["score"] == 0.0
    )
    m = M.task_metrics("rec", [(0, 0, 1, 1), (2, 2, 3, 3)], ["0 0 1 1", "2 2 3 3"], ["1 1 0 0", "2 2"])
    assert m["acc_iou50"] == 0.5 and m["mean_iou"] == 0.5
    labels = {f: f in ("effusion",) for f in T.FINDINGS}
    m = M.task_metrics("multilabel", [labels], ["effusion"], ["effusion , nodule"])
    assert m["example_f1"] == pytest.approx(2 / 3)
    m = M.task_metrics("reg", ["left lung", "heart"], ["left lung", "heart"], ["left lung", "right lung"])
    assert m["exact_match"] == 0.5 and m["rouge_l"] == pytest.approx(0.5)
    m = M.task_metrics("multiclass", [0, 3], ["none", "severe"], ["none", "garbage"])
    assert m["accuracy"] == 0.5
    with pytest.raises(ValueError, match="unknown task"):
        M.task_metrics("ocr", [1], ["a"], ["a"])
    with pytest.raises(ValueError, match="same non-zero length"):
        M.task_metrics("vqa", ["yes"], ["yes"], [])


def _e(task, key, answer, truth=None):
    return Entry(0, task, key, "q", answer, truth)


def test_baselines_and_multitask_score():
    es = [
        _e("vqa", "nodule", "no"),
        _e("vqa", "nodule", "no"),
        _e("vqa", "effusion_side", "left"),
        _e("vqa", "effusion_side", "left"),
        _e("vqa", "effusion_side", "right"),
        _e("calculation", "ctr", "0.40", 0.40),
        _e("calculation", "ctr", "0.52", 0.52),
    ]
    assert (
        M.baseline_predictions(es, "majority") == ["left"] * 5 + ["0.46"] * 2
    )  # "left": 2 vs "no": 2, tie -> min
    assert M.baseline_predictions(es, "blind")[:5] == ["no", "no", "left", "left", "left"]
    sc = M.baseline_scores(es, "blind")
    assert sc["vqa"]["accuracy"] == pytest.approx(4 / 5)
    assert sc["calculation"]["mae"] == pytest.approx(0.06)  # answer 0.46 for truths 0.40 and 0.52
    assert sc["calculation"]["score"] == pytest.approx(0.4)
    full = {t: {"score": i / 10} for i, t in enumerate(T.TASK_NAMES)}
    assert M.multitask_score(full) == pytest.approx(np.mean([i / 10 for i in range(7)]))
    with pytest.raises(ValueError, match="lack"):
        M.multitask_score({"vqa": {"score": 1.0}})
    with pytest.raises(ValueError, match="kind"):
        M.baseline_predictions(es, "oracle")


def test_split_scores_by_hand():
    from dynamics.experiments.imax_dmax.evaluate import split_scores

    es = [
        _e("vqa", "nodule", "no"),
        _e("vqa", "nodule", "yes"),
        _e("vqa", "nodule", "no"),
        _e("calculation", "ctr", "0.40", 0.40),
        _e("calculation", "ctr", "0.52", 0.52),
    ]
    preds = ["no", "no", "yes", "0.42", "0.52"]
    split = {"home": [0, 3, 4], "shifted": [1, 2]}
    sp = split_scores(es, preds, split)
    assert sp["vqa"] == {"score_home": 1.0, "score_shifted": 0.0}
    # CTR at home: MAE (0.02 + 0) / 2 = 0.01 -> score 1 - 0.01 / 0.1 = 0.9; no shifted CTR entries.
    assert sp["calculation"] == {"score_home": pytest.approx(0.9)}
