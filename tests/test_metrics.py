import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef

from readlib.data import PAPER_TASKS
from readlib.metrics import compute_metrics, glue_average, majority_baseline

# row by row: tp (0, 1, 2), tn (3, 4), fp (5), fn (6), tn (7) -> tp=3, tn=3, fp=1, fn=1
REFS = [1, 1, 1, 0, 0, 0, 1, 0]
PREDS = [1, 1, 1, 0, 0, 1, 0, 0]


def test_mcc_by_formula():
    # MCC = (3*3 - 1*1) / sqrt((3+1)(3+1)(3+1)(3+1)) = 8/16 = 0.5
    m = compute_metrics("cola", PREDS, REFS)
    assert m["mcc"] == pytest.approx(0.5)
    assert m["score"] == m["mcc"]
    assert set(m) == {"mcc", "score"}


def test_mcc_unbalanced_confusion():
    # refs 5 ones, 3 zeros; preds: tp=3, fn=2, tn=2, fp=1
    # MCC = (3*2 - 1*2) / sqrt((3+1)(3+2)(2+1)(2+2)) = 4 / sqrt(240) = 1/sqrt(15)
    refs = [1, 1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 0, 1]
    assert compute_metrics("cola", preds, refs)["mcc"] == pytest.approx(1 / math.sqrt(15), abs=1e-12)


def test_f1_accuracy_mrpc():
    # tp=3, fp=1, fn=2 -> F1 = 2*3 / (2*3 + 1 + 2) = 2/3; accuracy = 5/8; score = (2/3 + 5/8)/2 = 31/48
    refs = [1, 1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 0, 1]
    m = compute_metrics("mrpc", preds, refs)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["score"] == pytest.approx(31 / 48)
    # REFS/PREDS: tp=3, fp=1, fn=1 -> F1 = 6 / (6 + 1 + 1) = 0.75; accuracy = 6/8 = 0.75
    m = compute_metrics("qqp", PREDS, REFS)
    assert (m["f1"], m["accuracy"], m["score"]) == pytest.approx((0.75, 0.75, 0.75))


def test_accuracy_tasks():
    # 3 of 4 right; mnli has 3 classes
    for task in ("sst2", "qnli", "rte"):
        assert compute_metrics(task, [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75, "score": 0.75}
    assert compute_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 1]) == {"accuracy": 0.75, "score": 0.75}


def test_pearson_spearman_by_hand():
    # x = 1,2,3,4 (mean 2.5, dx = -1.5,-.5,.5,1.5, sum dx^2 = 5)
    # y = 1,3,2,10 (mean 4, dy = -3,-1,-2,6, sum dy^2 = 50); sum dx*dy = 4.5+.5-1+9 = 13
    # pearson = 13 / sqrt(5*50) = 13/sqrt(250); ranks of y = 1,3,2,4 -> spearman = 4/5 (as above
    # with dy = -1.5,.5,-.5,1.5: sum dx*dy = 2.25-.25-.25+2.25 = 4, over sqrt(5*5))
    m = compute_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 10.0])
    assert m["pearson"] == pytest.approx(13 / math.sqrt(250), abs=1e-12)
    assert m["spearman"] == pytest.approx(0.8, abs=1e-12)
    assert m["score"] == pytest.approx((13 / math.sqrt(250) + 0.8) / 2, abs=1e-12)


def test_matches_sklearn_on_random_vectors():
    rng = np.random.default_rng(0)
    ref, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert compute_metrics("cola", pred, ref)["mcc"] == pytest.approx(matthews_corrcoef(ref, pred))
    assert compute_metrics("mrpc", pred, ref)["f1"] == pytest.approx(f1_score(ref, pred))


def test_degenerate_inputs_score_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 1])["mcc"] == 0.0
        assert compute_metrics("cola", [0, 0, 0], [0, 0, 0])["mcc"] == 0.0
        const_pred = compute_metrics("stsb", [2.5, 2.5, 2.5], [0.0, 1.0, 4.0])
        assert const_pred == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}
        const_ref = compute_metrics("stsb", [0.0, 1.0, 4.0], [3.0, 3.0, 3.0])
        assert const_ref == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}
        # no positives anywhere: F1 is 0 (not NaN), accuracy 1
        assert compute_metrics("mrpc", [0, 0], [0, 0]) == {"f1": 0.0, "accuracy": 1.0, "score": 0.5}


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 predictions vs 2 references"):
        compute_metrics("sst2", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("sst2", [], [])
    with pytest.raises(ValueError, match="1-D"):
        compute_metrics("mnli", [[0.1, 0.9, 0.0]], [1])


def test_glue_average():
    scores = dict(zip(PAPER_TASKS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], strict=True))
    assert glue_average(scores) == pytest.approx(0.4)
    assert glue_average(scores | {"rte": 0.0}) == pytest.approx(0.4)  # extra tasks are ignored
    assert math.isnan(glue_average({t: s for t, s in scores.items() if t != "qqp"}))
    assert glue_average(scores | {"qqp": 0.0}) == pytest.approx((2.8 - 0.5) / 7)  # zero counts as zero
    assert glue_average({"cola": 0.2, "rte": 0.6}, tasks=("cola", "rte")) == pytest.approx(0.4)


def test_majority_baseline():
    # cola: train majority 1 -> constant prediction -> MCC 0
    assert majority_baseline("cola", [1, 1, 0], [1, 0, 1, 1]) == {"mcc": 0.0, "score": 0.0, "prediction": 1}
    # sst2: tie 2-2 -> smaller label 0; test has one 0 of four
    assert majority_baseline("sst2", [1, 0, 1, 0], [0, 1, 1, 1]) == {
        "accuracy": 0.25, "score": 0.25, "prediction": 0}
    # mrpc: predict 1 on test [1,0,1,1]: tp=3, fp=1, fn=0 -> F1 = 6/7, accuracy 3/4
    m = majority_baseline("mrpc", [1, 1, 0], [1, 0, 1, 1])
    assert (m["f1"], m["accuracy"], m["score"], m["prediction"]) == pytest.approx(
        (6 / 7, 0.75, (6 / 7 + 0.75) / 2, 1))
    # mnli: 3 classes, majority 2
    assert majority_baseline("mnli", [2, 2, 0, 1], [2, 0, 1])["accuracy"] == pytest.approx(1 / 3)
    # stsb: predict the train mean 2.0 -> correlations 0
    assert majority_baseline("stsb", [1.0, 2.0, 3.0], [0.0, 5.0, 2.5]) == {
        "pearson": 0.0, "spearman": 0.0, "score": 0.0, "prediction": 2.0}
