"""GLUE metrics, computed offline (READ Section 3.2 and the caption of Table 1).

CoLA: Matthews correlation; SST-2, MNLI, QNLI, RTE: accuracy; MRPC, QQP: mean of F1 (class 1)
and accuracy; STS-B: mean of Pearson and Spearman correlation. All are fractions, not percent.
Degenerate inputs (a constant prediction) score 0.0 where the formula would divide by zero.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from readlib.data import PAPER_TASKS, get_task


def _mcc(pred: np.ndarray, ref: np.ndarray) -> float:
    """Binary Matthews correlation (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))."""
    tp, tn = int(np.sum((pred == 1) & (ref == 1))), int(np.sum((pred != 1) & (ref != 1)))
    fp, fn = int(np.sum((pred == 1) & (ref != 1))), int(np.sum((pred != 1) & (ref == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def _f1(pred: np.ndarray, ref: np.ndarray) -> float:
    """F1 of the positive class 1: 2tp / (2tp + fp + fn)."""
    tp = int(np.sum((pred == 1) & (ref == 1)))
    fp, fn = int(np.sum((pred == 1) & (ref != 1))), int(np.sum((pred != 1) & (ref == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _corr(kind: str, pred: np.ndarray, ref: np.ndarray) -> float:
    # a constant vector has no correlation (scipy gives NaN); count it as 0
    if np.ptp(pred) == 0 or np.ptp(ref) == 0:
        return 0.0
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(pred, ref).statistic)


def compute_metrics(task: str, predictions, references) -> dict[str, float]:
    """The task's GLUE metrics and its "score" (the number Table 1 reports), as fractions.

    predictions are class ids for classification tasks and floats for STS-B.
    """
    spec = get_task(task)
    dtype = float if spec.is_regression else None
    pred, ref = np.asarray(predictions, dtype=dtype), np.asarray(references, dtype=dtype)
    if pred.ndim != 1 or ref.ndim != 1:
        raise ValueError(f"predictions and references must be 1-D, got shapes {pred.shape}, {ref.shape}")
    if len(pred) != len(ref):
        raise ValueError(f"length mismatch: {len(pred)} predictions vs {len(ref)} references")
    if len(pred) == 0:
        raise ValueError("cannot score empty predictions")
    if spec.metric == "pearson_spearman":
        out = {"pearson": _corr("pearson", pred, ref), "spearman": _corr("spearman", pred, ref)}
        return out | {"score": (out["pearson"] + out["spearman"]) / 2}
    if spec.metric == "mcc":
        mcc = _mcc(pred, ref)
        return {"mcc": mcc, "score": mcc}
    accuracy = float(np.mean(pred == ref))
    if spec.metric == "f1_accuracy":
        f1 = _f1(pred, ref)
        return {"f1": f1, "accuracy": accuracy, "score": (f1 + accuracy) / 2}
    return {"accuracy": accuracy, "score": accuracy}


def glue_average(scores: Mapping[str, float], tasks: Sequence[str] = PAPER_TASKS) -> float:
    """Mean score over tasks (Table 1's average over 7 tasks); NaN if any task is missing."""
    if any(t not in scores for t in tasks):
        return math.nan
    return sum(scores[t] for t in tasks) / len(tasks)


def majority_baseline(task: str, train_labels, test_labels) -> dict[str, float]:
    """Metrics of always predicting the most frequent train label (STS-B: the train mean).

    Ties go to the smaller label. The result also holds the constant "prediction".
    """
    spec = get_task(task)
    train = np.asarray(train_labels)
    if spec.is_regression:
        prediction = float(np.mean(train))
    else:
        values, counts = np.unique(train, return_counts=True)  # values sorted ascending
        prediction = int(values[np.argmax(counts)])  # argmax takes the first, i.e. smaller, label
    test = np.asarray(test_labels)
    return compute_metrics(task, np.full(len(test), prediction), test) | {"prediction": prediction}
