"""Task metrics (GLUE conventions) over numpy arrays, and the main score used for selection.

Values are fractions in [0, 1] (correlations in [-1, 1]), not GLUE's percentages. Each
metric wraps the sklearn / scipy implementation; this file only adds input handling.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats
import sklearn.metrics


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predicted class ids equal to the labels."""
    return float(sklearn.metrics.accuracy_score(labels, predictions))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of class 1 (MRPC "equivalent", QQP "duplicate"); 0 when nothing is positive."""
    return float(sklearn.metrics.f1_score(labels, predictions, average="binary", zero_division=0))


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (CoLA); 0 for a constant predictor."""
    return float(sklearn.metrics.matthews_corrcoef(labels, predictions))


def _correlation(fn, predictions, labels) -> float:
    # Correlation with a constant is undefined (scipy warns and returns NaN). A constant
    # predictor carries no information, and NaN would poison "main" and model selection,
    # so it scores 0, as sklearn's matthews_corrcoef does for the same case.
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(predictions, labels)[0])


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation of regression outputs with targets (STS-B)."""
    return _correlation(scipy.stats.pearsonr, predictions, labels)


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation of regression outputs with targets (STS-B)."""
    return _correlation(scipy.stats.spearmanr, predictions, labels)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
REGRESSION_METRICS = frozenset({"pearson", "spearman"})


def to_predictions(outputs: np.ndarray, regression: bool) -> np.ndarray:
    """Turns model outputs into what the metrics compare with labels.

    Args:
      outputs: logits (n, num_labels), class ids (n,), or regression outputs (n,) / (n, 1).
      regression: whether the outputs are regression values.

    Returns:
      float64 values (n,) for regression, int64 class ids (n,) otherwise.
    """
    outputs = np.asarray(outputs)
    if regression:
        if outputs.ndim == 2 and outputs.shape[1] == 1:
            outputs = outputs[:, 0]
        if outputs.ndim != 1:
            raise ValueError(f"regression outputs must be (n,) or (n, 1), got {outputs.shape}")
        return outputs.astype(np.float64)
    if outputs.ndim == 2:
        return outputs.argmax(axis=-1).astype(np.int64)
    if outputs.ndim == 1 and np.all(np.mod(outputs, 1) == 0):
        return outputs.astype(np.int64)
    raise ValueError(
        f"classification outputs must be logits (n, num_labels) or class ids (n,), got "
        f"shape {outputs.shape} dtype {outputs.dtype}"
    )


def compute_metrics(
    task_metric_names: Sequence[str],
    predictions_or_logits: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Computes a task's metrics and its main score.

    Args:
      task_metric_names: e.g. TaskData.metrics: ("accuracy",), ("f1", "accuracy"),
        ("matthews",), ("pearson", "spearman").
      predictions_or_logits: logits (n, C), class ids (n,), or regression outputs.
      labels: (n,) class ids or targets.
      weights: optional (n,) 0/1 mask from `batches` (filler rows have 0); only examples with
        weight > 0 are scored, each once.

    Returns:
      {name: value for each metric} plus "main": the mean of those values (GLUE's single
      number for multi-metric tasks), used for model selection.
    """
    names = tuple(task_metric_names)
    if not names:
        raise ValueError("no metric names given")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; available metrics: {sorted(METRICS)}")
    regression = names[0] in REGRESSION_METRICS
    if any((n in REGRESSION_METRICS) != regression for n in names):
        raise ValueError(f"cannot mix regression and classification metrics: {names}")

    predictions = to_predictions(predictions_or_logits, regression)
    labels = np.asarray(labels)
    labels = labels.astype(np.float64) if regression else labels.astype(np.int64)
    if weights is not None:
        keep = np.asarray(weights) > 0
        predictions, labels = predictions[keep], labels[keep]
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    result = {n: METRICS[n](predictions, labels) for n in names}
    result["main"] = float(np.mean([result[n] for n in names]))
    return result
