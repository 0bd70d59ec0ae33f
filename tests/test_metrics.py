"""Evaluation metrics: hand-checked numbers and JSON-ready types."""

import json

import pytest

from feddale.method.metrics import binary_report, f1_at_rate, purity


def test_binary_report_counts_and_rates():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.9, 0.8, 0.3, 0.1, 0.6, 0.2, 0.4, 0.7]
    r = binary_report(y, s, threshold=0.5)
    assert (r["tp"], r["fp"], r["tn"], r["fn"], r["n"]) == (3, 1, 3, 1, 8)
    assert r["precision"] == pytest.approx(0.75)
    assert r["recall"] == pytest.approx(0.75)
    assert r["f1"] == pytest.approx(0.75)
    assert r["roc_auc"] == pytest.approx(14 / 16)
    json.dumps(r)  # plain Python types only
    assert all(type(v) in (int, float) for v in r.values())
    assert r["false_alarms_per_10k"] == 2500.0


def test_pr_auc_and_false_alarms_per_10k_by_hand():
    # Ranked by score: 1 (0.9), 1 (0.8), 0 (0.6), 1 (0.4), 0 (0.2). Average precision is the mean
    # of the precision at each anomaly's rank: (1 + 1 + 3/4) / 3.
    r = binary_report([1, 1, 0, 1, 0], [0.9, 0.8, 0.6, 0.4, 0.2], threshold=0.5)
    assert r["pr_auc"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert r["false_alarms_per_10k"] == 5000.0  # 1 of 2 normals flagged
    only_anomalies = binary_report([1, 1], [0.9, 0.1], threshold=0.5)
    assert only_anomalies["pr_auc"] is None and only_anomalies["false_alarms_per_10k"] is None


def test_f1_at_rate_reweights_a_balanced_split_to_the_natural_rate():
    # Recall 0.9 and FPR 1%: balanced F1 is high, at 2.9% anomalies precision falls to ~0.73.
    assert f1_at_rate(0.9, 0.01, 0.5) == pytest.approx(2 * 0.45 / (2 * 0.45 + 0.005 + 0.05))
    at_natural = f1_at_rate(0.9, 0.01, 0.029)
    precision = 0.9 * 0.029 / (0.9 * 0.029 + 0.01 * 0.971)
    assert at_natural == pytest.approx(2 * precision * 0.9 / (precision + 0.9))
    assert f1_at_rate(0.0, 0.0, 0.029) == 0.0
    with pytest.raises(ValueError):
        f1_at_rate(0.9, 0.01, 0.0)


def test_threshold_is_inclusive():
    r = binary_report([1, 0], [0.5, 0.49], threshold=0.5)
    assert r["tp"] == 1 and r["tn"] == 1


def test_single_class_has_no_auc_and_no_division_error():
    r = binary_report([0, 0, 0], [0.1, 0.2, 0.9], threshold=0.5)
    assert r["roc_auc"] is None
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["fp"] == 1
    json.dumps(r)


@pytest.mark.parametrize(
    ("y", "s", "t", "message"),
    [
        ([], [], 0.5, "non-empty"),
        ([0, 2], [0.1, 0.2], 0.5, "only 0"),
        ([0, 1], [0.1], 0.5, "shape"),
        ([0, 1], [0.1, float("nan")], 0.5, "NaN"),
        ([0, 1], [0.1, 0.2], float("nan"), "threshold"),
    ],
)
def test_binary_report_errors(y, s, t, message):
    with pytest.raises(ValueError, match=message):
        binary_report(y, s, t)


def test_purity():
    labels = [0, 1, 1, 0, 1]
    assert purity([1, 2, 4], labels, positive=1) == 1.0
    assert purity([0, 1, 3, 4], labels, positive=0) == 0.5
    assert isinstance(purity([0], labels, positive=0), float)


@pytest.mark.parametrize(
    ("idx", "positive", "message"),
    [([], 1, "non-empty"), ([5], 1, "out of range"), ([-1], 1, "out of range"), ([0], 2, "positive")],
)
def test_purity_errors(idx, positive, message):
    with pytest.raises(ValueError, match=message):
        purity(idx, [0, 1, 1, 0, 1], positive)
