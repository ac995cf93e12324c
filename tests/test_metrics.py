"""Metrics against sklearn / scipy on fixed arrays, and hand-checked values."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

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


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    pred, gold = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert accuracy(pred, gold) == pytest.approx(sklearn.metrics.accuracy_score(gold, pred))
    assert f1(pred, gold) == pytest.approx(sklearn.metrics.f1_score(gold, pred))
    assert matthews(pred, gold) == pytest.approx(sklearn.metrics.matthews_corrcoef(gold, pred))
    multi_pred, multi_gold = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    assert matthews(multi_pred, multi_gold) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(multi_gold, multi_pred)
    )


def test_correlations_by_hand_and_against_scipy():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert spearman(x, x**3) == pytest.approx(1.0) and pearson(x, x**3) < 0.99
    # Spearman of ranks [1,2,3,4] vs [2,1,4,3]: 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*4/60 = 0.6
    assert spearman(x, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=100), rng.normal(size=100)
    assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0])
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0])
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
