"""Evaluation metrics: hand-checked numbers and JSON-ready types."""

import json

import pytest

from feddale.method.metrics import binary_report, purity


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
