"""Evaluation metrics (harness only: labels reach this module, never training or selection).

Everything returns plain Python numbers so results drop straight into JSON reports.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)


def _labels(y_true: Sequence[int]) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D sequence, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 (normal) and 1 (anomalous)")
    return y.astype(np.int64)


def binary_report(y_true: Sequence[int], scores: Sequence[float], threshold: float) -> dict[str, Any]:
    """Detection quality with anomalous (1) as the positive class; predict 1 when score >= threshold.

    ``scores`` are P(anomalous)-like (higher = more anomalous). ``roc_auc`` and ``pr_auc``
    (average precision) are threshold-free and ``None`` when y_true holds one class only (they
    are undefined there, and NaN is not JSON). ``false_alarms_per_10k`` is the false-positive
    rate per 10,000 normal sessions: what an on-call rotation feels, whatever the anomaly rate.
    """
    y = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"scores shape {s.shape} does not match y_true shape {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    pred = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    both_classes = np.unique(y).size == 2
    return {
        "f1": float(f1_score(y, pred, zero_division=0)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(y, s)) if both_classes else None,
        "pr_auc": float(average_precision_score(y, s)) if both_classes else None,
        "false_alarms_per_10k": round(1e4 * fp / (fp + tn), 2) if fp + tn else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": int(y.size),
        "threshold": float(threshold),
    }


def purity(selected_idx: Sequence[int], labels: Sequence[int], positive: int) -> float:
    """Fraction of selected public samples whose true label is ``positive``.

    Used to report how clean the pseudo-labels were (e.g. purity of the pseudo-anomalous side
    with positive=1); duplicate indices count as often as they appear.
    """
    y = _labels(labels)
    idx = np.asarray(selected_idx, dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError("selected_idx must be a non-empty 1-D sequence of indices")
    if idx.min() < 0 or idx.max() >= y.size:
        raise ValueError(f"selected_idx out of range for {y.size} labels")
    if positive not in (0, 1):
        raise ValueError(f"positive must be 0 or 1, got {positive!r}")
    return float(np.mean(y[idx] == positive))


def f1_at_rate(recall: float, false_positive_rate: float, anomaly_rate: float) -> float:
    """F1 a detector with this recall and false-positive rate reaches on a stream with ``anomaly_rate``.

    Recall and FPR do not depend on the class mix, precision does; this re-weights a balanced
    split's counts to the rate users see (used on the balanced validation split).
    """
    if not 0.0 < anomaly_rate < 1.0:
        raise ValueError(f"anomaly_rate must be in (0, 1), got {anomaly_rate}")
    tp = recall * anomaly_rate
    fp = false_positive_rate * (1.0 - anomaly_rate)
    fn = (1.0 - recall) * anomaly_rate
    return 0.0 if tp == 0 else float(2 * tp / (2 * tp + fp + fn))
