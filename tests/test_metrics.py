"""Metrics on cases whose values are worked out by hand (the implementations wrap sklearn
and scipy, so comparing against those would check nothing)."""

import numpy as np
import pytest

from mpcformer_jax.train.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews,
    pearson,
    spearman,
    to_predictions,
)

PRED = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
GOLD = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])
# Hand count: TP = 4 (idx 0,3,5,8), TN = 3 (1,4,7), FP = 2 (2,9), FN = 1 (6).


def test_classification_metrics_by_hand():
    assert accuracy(PRED, GOLD) == pytest.approx(0.7)
    # F1 = 2TP / (2TP + FP + FN) = 8 / 11
    assert f1(PRED, GOLD) == pytest.approx(8 / 11)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 10 / sqrt(6*5*5*4)
    assert matthews(PRED, GOLD) == pytest.approx(10 / np.sqrt(600))


def test_classification_metrics_edge_cases_by_hand():
    # Nothing predicted positive: precision is 0/0, F1 is defined as 0 (not NaN).
    assert f1(np.zeros(4, int), np.array([0, 1, 1, 0])) == 0.0
    # Every prediction right: F1 1, Matthews 1; every one wrong: accuracy 0, Matthews -1.
    gold = np.array([0, 1, 1, 0, 1])
    assert f1(gold, gold) == 1.0 and matthews(gold, gold) == pytest.approx(1.0)
    assert accuracy(1 - gold, gold) == 0.0 and matthews(1 - gold, gold) == pytest.approx(-1.0)
    # A constant predictor carries no information: Matthews 0 (0/0 by the formula).
    assert matthews(np.ones(5, int), gold) == 0.0


def test_multiclass_matthews_by_hand():
    gold = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # Gorodkin's R_K: c = 4 correct of s = 6; true counts t = (2, 2, 2), predicted counts
    # p = (2, 3, 1). (c s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt(22 * 24).
    assert matthews(pred, gold) == pytest.approx(12 / np.sqrt(528))
    assert accuracy(pred, gold) == pytest.approx(4 / 6)


def test_correlations_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert spearman(x, x**3) == pytest.approx(1.0) and pearson(x, x**3) < 0.99
    # Spearman of ranks [1,2,3,4] vs [2,1,4,3]: 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*4/60 = 0.6
    assert spearman(x, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
    # Deviations from the mean 2.5: (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5); products
    # sum to 4, squares to 5 each: r = 4/5.
    assert pearson(x, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)
    # Ties get their mean rank: [1, 2, 2, 3] ranks as [1, 2.5, 2.5, 4]; against [1, 2, 3, 4]
    # the rank deviations give 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), x) == pytest.approx(3 / np.sqrt(10))
    # One far point moves Pearson, not Spearman: y deviations from 11.5 are
    # (-10.5, -9.5, -8.5, 28.5); sum of products 59, of squares 1085: r = 59 / sqrt(5 * 1085).
    y = np.array([1.0, 2.0, 3.0, 40.0])
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) == pytest.approx(59 / np.sqrt(5 * 1085))
    assert pearson(np.ones(4), x) == 0.0 and spearman(x, np.zeros(4)) == 0.0  # not NaN


def test_compute_metrics_from_logits_and_main_score():
    logits = np.stack([1 - PRED, PRED], axis=1).astype(np.float32) * 3.0 - 1.0
    out = compute_metrics(("f1", "accuracy"), logits, GOLD)
    assert out["accuracy"] == pytest.approx(0.7) and out["f1"] == pytest.approx(8 / 11)
    assert out["main"] == pytest.approx((0.7 + 8 / 11) / 2)  # GLUE: mean of the task's metrics
    single = compute_metrics(("accuracy",), PRED, GOLD)
    assert single == {"accuracy": pytest.approx(0.7), "main": pytest.approx(0.7)}
    assert compute_metrics(("matthews",), logits, GOLD)["main"] == pytest.approx(10 / np.sqrt(600))


def test_compute_metrics_regression_and_weights():
    x = np.array([0.0, 1.0, 2.0, 3.0, 9.0])
    y = np.array([0.5, 1.5, 2.5, 3.5, -100.0])
    # The last row is a filler row (weight 0): it must not count.
    out = compute_metrics(("pearson", "spearman"), x[:, None], y, weights=np.array([1, 1, 1, 1, 0]))
    assert out == {
        "pearson": pytest.approx(1.0),
        "spearman": pytest.approx(1.0),
        "main": pytest.approx(1.0),
    }
    acc = compute_metrics(
        ["accuracy"], np.array([1, 1, 0]), np.array([1, 0, 0]), weights=np.array([1.0, 0.0, 1.0])
    )
    assert acc["accuracy"] == 1.0


def test_to_predictions_and_errors():
    np.testing.assert_array_equal(
        to_predictions(np.array([[0.1, 0.9], [2.0, -1.0]]), False), [1, 0]
    )
    np.testing.assert_array_equal(to_predictions(np.array([[0.3], [0.7]]), True), [0.3, 0.7])
    with pytest.raises(ValueError, match="logits"):
        to_predictions(np.array([0.2, 0.8]), False)
    with pytest.raises(ValueError, match="unknown metrics.*accuracy"):
        compute_metrics(("bleu",), PRED, GOLD)
    with pytest.raises(ValueError, match="cannot mix"):
        compute_metrics(("accuracy", "pearson"), PRED, GOLD)
    with pytest.raises(ValueError, match="predictions but"):
        compute_metrics(("accuracy",), PRED[:3], GOLD)
