"""Per-task metrics parsed from generated answers, the multi-task score and trivial baselines.

Metrics follow the field's usage per task family:

* calculation (CTR): mean absolute error of the parsed ratio against the exact (unrounded) CTR;
* report generation: corpus BLEU-4 and ROUGE-L against the reference report, plus the
  "clinical efficacy" finding-level example-F1 of the findings the report states;
* multiclass (oedema grade): accuracy and macro-F1;
* multilabel findings: example-F1 (headline) and label-wise macro-F1;
* REC: accuracy at IoU >= 0.5 (headline) and mean IoU, boxes compared on the answer grid;
* REG: ROUGE-L (headline), BLEU-4 and exact match;
* VQA (closed-ended): exact-match accuracy.

Each task's headline becomes a ``score`` in [0, 1], higher is better (``HEADLINE``): the metric
itself where it already is, and ``1 - min(MAE / 0.1, 1)`` for the CTR (0.1 is the gap between a
normal ratio of 0.45 and a clearly enlarged 0.55; the mean-answer baseline has MAE ~ 0.06). The
multi-task score is the unweighted mean of the seven task scores, the analogue of the paper's
"multi-task average".

BLEU and ROUGE-L are written here (about 40 lines) instead of adding ``nltk`` / ``rouge_score`` /
``evaluate`` as dependencies: on whitespace-tokenised closed-vocabulary text they reduce to the
textbook definitions, which the tests check against hand-computed values.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from dynamics.experiments.imax_dmax.phantoms import CTR_RANGE, FINDINGS
from dynamics.experiments.imax_dmax.tasks import (
    TASK_NAMES,
    ctr_answer,
    parse_box,
    parse_ctr,
    parse_grade,
    parse_labels,
    parse_report_findings,
)

CTR_SCALE = 0.1
IOU_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- primitives
def mae(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Mean absolute error ``mean |y - yhat|``."""
    a, b = np.asarray(y_true, float), np.asarray(y_pred, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need equal, non-empty shapes, got {a.shape} and {b.shape}")
    return float(np.mean(np.abs(a - b)))


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of exact matches."""
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"need equal, non-empty lengths, got {len(y_true)} and {len(y_pred)}")
    return float(np.mean([t == p for t, p in zip(y_true, y_pred, strict=True)]))


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """Unweighted mean over classes of per-class F1 = 2TP / (2TP + FP + FN).

    Classes are those appearing in ``y_true`` or ``y_pred`` (scikit-learn's default); an
    unparsable prediction (None) counts as a wrong answer but is not a class of its own.
    """
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"need equal, non-empty lengths, got {len(y_true)} and {len(y_pred)}")
    classes = {c for c in (*y_true, *y_pred) if c is not None}
    out = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred, strict=True))
        out.append(_f1(tp, fp, fn))
    return float(np.mean(out))


def example_f1(true_sets: Sequence[set], pred_sets: Sequence[set]) -> float:
    """Example-based F1: mean over examples of ``2 |T & P| / (|T| + |P|)``, 1 when both are empty."""
    if len(true_sets) != len(pred_sets) or not true_sets:
        raise ValueError(f"need equal, non-empty lengths, got {len(true_sets)} and {len(pred_sets)}")
    vals = [
        2 * len(t & p) / (len(t) + len(p)) if (t or p) else 1.0
        for t, p in zip(true_sets, pred_sets, strict=True)
    ]
    return float(np.mean(vals))


def label_macro_f1(
    true_sets: Sequence[set], pred_sets: Sequence[set], labels: Iterable[str] = FINDINGS
) -> float:
    """Label-wise macro-F1 of a multi-label prediction (labels without support or predictions count 1)."""
    out = []
    for lab in labels:
        tp = sum(lab in t and lab in p for t, p in zip(true_sets, pred_sets, strict=True))
        fp = sum(lab not in t and lab in p for t, p in zip(true_sets, pred_sets, strict=True))
        fn = sum(lab in t and lab not in p for t, p in zip(true_sets, pred_sets, strict=True))
        out.append(_f1(tp, fp, fn))
    return float(np.mean(out))


def iou(a: tuple[int, int, int, int] | None, b: tuple[int, int, int, int] | None) -> float:
    """IoU of two inclusive grid-cell boxes (x0, y0, x1, y1); 0 when either is missing."""
    if a is None or b is None:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002), one reference per hypothesis, uniform weights, no smoothing.

    ``BLEU = BP * exp(mean_n log p_n)`` with clipped n-gram precisions ``p_n`` summed over the corpus
    and brevity penalty ``BP = min(1, exp(1 - r / c))`` (r, c: total reference / hypothesis length).
    When an order has no match the score is 0, as in the reference implementation. The maximal
    order is capped by the longest hypothesis so that one-word answers (REG) get unigram BLEU.
    """
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need equal, non-empty lengths, got {len(references)} and {len(hypotheses)}")
    refs = [r.split() for r in references]
    hyps = [h.split() for h in hypotheses]
    c = sum(len(h) for h in hyps)
    r = sum(len(x) for x in refs)
    if c == 0:
        return 0.0
    n_max = max(1, min(max_n, max(len(h) for h in hyps), max(len(x) for x in refs)))
    logs = []
    for n in range(1, n_max + 1):
        match = total = 0
        for ref, hyp in zip(refs, hyps, strict=True):
            hc, rc = _ngrams(hyp, n), _ngrams(ref, n)
            match += sum(min(k, rc[g]) for g, k in hc.items())
            total += max(len(hyp) - n + 1, 0)
        if match == 0 or total == 0:
            return 0.0
        logs.append(math.log(match / total))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return float(bp * math.exp(sum(logs) / len(logs)))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 (Lin 2004, as ``rouge_score`` reports it): ``2 P R / (P + R)`` from the LCS length."""
    ref, hyp = reference.split(), hypothesis.split()
    if not ref or not hyp:
        return 0.0
    lcs = _lcs(ref, hyp)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


# ----------------------------------------------------------------------------- per task
def _ctr_pred(text: str) -> float:
    """Parsed CTR; an unparsable answer counts as the worst guess inside the valid range."""
    v = parse_ctr(text)
    return float("nan") if v is None else v


def task_metrics(
    task: str, truths: Sequence, answers: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
    """Metrics of one task from ground truths, reference answers and generated answers (+ ``score``).

    ``truths`` are the entries' structured ground truth (exact CTR, grade, label dict, box cells,
    phrase, yes/no) and ``answers`` the reference answer strings; both come from ``Entry``.
    """
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
    if not (len(truths) == len(answers) == len(predictions)) or not truths:
        raise ValueError("truths, answers and predictions must have the same non-zero length")
    m: dict[str, float] = {}
    if task == "calculation":
        pred = np.array([_ctr_pred(p) for p in predictions])
        true = np.asarray(truths, float)
        worst = np.maximum(np.abs(true - CTR_RANGE[0]), np.abs(true - CTR_RANGE[1]))
        err = np.where(np.isnan(pred), worst, np.abs(pred - true))
        m["mae"] = float(err.mean())
        m["parse_rate"] = float(np.mean(~np.isnan(pred)))
        m["score"] = 1.0 - min(m["mae"] / CTR_SCALE, 1.0)
    elif task == "report":
        tsets = [{f for f, v in t.items() if v} for t in truths]
        psets = [parse_report_findings(p) for p in predictions]
        m["finding_f1"] = example_f1(tsets, psets)
        m["bleu4"] = corpus_bleu(answers, predictions)
        m["rouge_l"] = float(np.mean([rouge_l(a, p) for a, p in zip(answers, predictions, strict=True)]))
        m["score"] = m["finding_f1"]
    elif task == "multiclass":
        grades = [parse_grade(p) for p in predictions]
        m["accuracy"] = accuracy(list(truths), grades)
        m["macro_f1"] = macro_f1(list(truths), grades)
        m["score"] = m["accuracy"]
    elif task == "multilabel":
        tsets = [{f for f, v in t.items() if v} for t in truths]
        psets = [parse_labels(p) for p in predictions]
        m["example_f1"] = example_f1(tsets, psets)
        m["macro_f1"] = label_macro_f1(tsets, psets)
        m["score"] = m["example_f1"]
    elif task == "rec":
        ious = [iou(tuple(t), parse_box(p)) for t, p in zip(truths, predictions, strict=True)]
        m["acc_iou50"] = float(np.mean([v >= IOU_THRESHOLD for v in ious]))
        m["mean_iou"] = float(np.mean(ious))
        m["score"] = m["acc_iou50"]
    elif task == "reg":
        m["rouge_l"] = float(np.mean([rouge_l(a, p) for a, p in zip(answers, predictions, strict=True)]))
        m["bleu4"] = corpus_bleu(answers, predictions)
        m["exact_match"] = accuracy([a.strip() for a in answers], [p.strip() for p in predictions])
        m["score"] = m["rouge_l"]
    else:  # vqa
        m["accuracy"] = accuracy([a.strip() for a in answers], [p.strip() for p in predictions])
        m["score"] = m["accuracy"]
    return m


HEADLINE: dict[str, str] = {
    "calculation": "mae",
    "report": "finding_f1",
    "multiclass": "accuracy",
    "multilabel": "example_f1",
    "rec": "acc_iou50",
    "reg": "rouge_l",
    "vqa": "accuracy",
}


def multitask_score(scores: dict[str, dict[str, float]]) -> float:
    """Unweighted mean of the seven per-task ``score`` values (raises if a task is missing)."""
    missing = [t for t in TASK_NAMES if t not in scores or "score" not in scores[t]]
    if missing:
        raise ValueError(f"scores lack a 'score' for tasks {missing}")
    return float(np.mean([scores[t]["score"] for t in TASK_NAMES]))


def score_entries(entries: Sequence, predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: metrics}`` for parallel lists of ``Entry`` and generated answers (every task present)."""
    if len(entries) != len(predictions):
        raise ValueError(f"{len(entries)} entries but {len(predictions)} predictions")
    out = {}
    for t in TASK_NAMES:
        idx = [i for i, e in enumerate(entries) if e.task == t]
        if idx:
            out[t] = task_metrics(
                t,
                [entries[i].truth for i in idx],
                [entries[i].answer for i in idx],
                [predictions[i] for i in idx],
            )
    return out


# ----------------------------------------------------------------------------- baselines
def _mode(values: Iterable[str]) -> str:
    # Ties broken by the answer text so that the baseline is deterministic.
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, k in counts.items() if k == best)


def _blind_key(e) -> str:
    # REG's instruction contains the box, which names the answer region; a text-only guesser
    # conditioned on it would be a lookup table, so REG's blind key ignores the region.
    return "region" if e.task == "reg" else e.key


def baseline_predictions(entries: Sequence, kind: str = "majority") -> list[str]:
    """Image-blind constant answers, computed on ``entries`` themselves.

    ``kind="majority"``: per task, the most frequent answer (the CTR: the answer token nearest the
    mean ratio). ``kind="blind"``: the same per question (REC object, VQA question, ...), i.e. the
    best a model that ignores the image can do with the instruction's wording.
    """
    if kind not in ("majority", "blind"):
        raise ValueError(f"kind must be 'majority' or 'blind', got {kind!r}")
    key: Callable = (lambda e: e.task) if kind == "majority" else (lambda e: (e.task, _blind_key(e)))
    groups: dict = {}
    for e in entries:
        groups.setdefault(key(e), []).append(e)
    answer = {}
    for k, es in groups.items():
        if es[0].task == "calculation":
            answer[k] = ctr_answer(float(np.mean([e.truth for e in es])))
        else:
            answer[k] = _mode(e.answer for e in es)
    return [answer[key(e)] for e in entries]


def baseline_scores(entries: Sequence, kind: str = "majority") -> dict[str, dict[str, float]]:
    """Metrics of :func:`baseline_predictions` (same format as :func:`score_entries`)."""
    return score_entries(entries, baseline_predictions(entries, kind))
