"""FedAvg math and validation, score aggregation, pseudo-label selection."""

import numpy as np
import pytest
import torch

from feddale.method import federation
from feddale.method.federation import (
    FederationError,
    Selection,
    aggregate_scores,
    clamp_counts,
    fedavg,
    select_pseudo_labels,
)


def _state(value: float, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"a.lora_A": torch.full((2, 3), value, dtype=dtype), "a.lora_B": torch.full((3,), 2 * value, dtype=dtype)}


# ----------------------------------------------------------------------------- fedavg


def test_fedavg_is_sample_weighted_and_fp32():
    out = fedavg([_state(1.0), _state(4.0, torch.float16)], [3, 1])
    assert set(out) == {"a.lora_A", "a.lora_B"}
    assert all(t.dtype == torch.float32 for t in out.values())
    torch.testing.assert_close(out["a.lora_A"], torch.full((2, 3), 1.75))
    torch.testing.assert_close(out["a.lora_B"], torch.full((3,), 3.5))


def test_fedavg_single_client_is_identity():
    state = {"w": torch.randn(4, 5)}
    torch.testing.assert_close(fedavg([state], [7])["w"], state["w"])


def test_fedavg_does_not_mutate_inputs():
    a, b = _state(1.0), _state(3.0)
    fedavg([a, b], [1, 1])
    assert float(a["a.lora_A"][0, 0]) == 1.0 and float(b["a.lora_A"][0, 0]) == 3.0


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([], [], "at least one"),
        ([_state(1.0)], [1, 2], "weights"),
        ([_state(1.0), _state(1.0)], [1, 0], "client 1: weight"),
        ([_state(1.0), _state(1.0)], [1, -2], "client 1: weight"),
        ([_state(1.0), _state(1.0)], [1, 1.5], "client 1: weight"),
        ([{}], [1], "empty"),
        ([_state(1.0), {"a.lora_A": torch.zeros(2, 3)}], [1, 1], "client 1: keys"),
        ([_state(1.0), {**_state(1.0), "extra": torch.zeros(1)}], [1, 1], "client 1: keys"),
        ([_state(1.0), {**_state(1.0), "a.lora_B": torch.zeros(4)}], [1, 1], "'a.lora_B': shape"),
        ([_state(1.0), {**_state(1.0), "a.lora_B": torch.zeros(3, dtype=torch.int64)}], [1, 1], "not floating"),
        (
            [_state(1.0), {**_state(1.0), "a.lora_A": torch.full((2, 3), float("nan"))}],
            [1, 1],
            "client 1, key 'a.lora_A'",
        ),
        ([_state(1.0), {**_state(1.0), "a.lora_B": torch.full((3,), float("inf"))}], [1, 1], "NaN or infinite"),
        ([_state(1.0), {**_state(1.0), "a.lora_B": [1.0, 2.0, 3.0]}], [1, 1], "torch.Tensor"),
    ],
)
def test_fedavg_rejects_bad_updates(states, weights, message):
    with pytest.raises(FederationError, match=message):
        fedavg(states, weights)


def test_federation_error_is_value_error():
    assert issubclass(FederationError, ValueError)


# ----------------------------------------------------------------------------- aggregation


MATRIX = np.array([[0.9, 0.1, 0.5, 0.3], [0.7, 0.3, 0.2, 0.6]])


def test_aggregate_mean_and_max():
    np.testing.assert_allclose(aggregate_scores(MATRIX, "mean"), [0.8, 0.2, 0.35, 0.45])
    np.testing.assert_allclose(aggregate_scores(MATRIX, "max"), [0.9, 0.3, 0.5, 0.6])


def test_aggregate_rank_mean_ignores_calibration():
    shifted = np.vstack([MATRIX[0], MATRIX[0] * 0.1])  # same ranking, very different scale
    np.testing.assert_allclose(aggregate_scores(shifted, "rank_mean"), [1.0, 0.0, 2 / 3, 1 / 3])
    ties = aggregate_scores(np.array([[0.5, 0.5, 0.1]]), "rank_mean")
    np.testing.assert_allclose(ties, [0.75, 0.75, 0.0])


def test_aggregate_none_keeps_clients_apart():
    out = aggregate_scores(MATRIX, "none")
    assert out.shape == MATRIX.shape
    np.testing.assert_array_equal(out, MATRIX)


@pytest.mark.parametrize(
    ("matrix", "how", "message"),
    [
        (np.array([0.1, 0.2]), "mean", "2-D"),
        (np.zeros((0, 3)), "mean", "empty"),
        (np.zeros((2, 0)), "mean", "empty"),
        (np.array([[0.1, np.nan]]), "mean", "client 0, sample 1"),
        (MATRIX, "mode", "unknown aggregation"),
    ],
)
def test_aggregate_errors(matrix, how, message):
    with pytest.raises(FederationError, match=message):
        aggregate_scores(matrix, how)


# ----------------------------------------------------------------------------- selection


def test_plain_selection_is_the_paper_rule():
    scores = np.array([0.5, 0.1, 0.9, 0.2, 0.8, 0.3])
    texts = [f"t{i}" for i in range(6)]
    sel = select_pseudo_labels(scores, texts, k_normal=2, k_anomalous=2)
    assert isinstance(sel, Selection)
    assert sel.anomalous_idx == (1, 3)
    assert sel.normal_idx == (2, 4)
    assert sel.texts == ("t2", "t4", "t1", "t3")  # normal by rank, then anomalous by rank
    assert sel.labels == (0, 0, 1, 1)
    assert sel.weights == (1, 1, 1, 1)


def test_ties_break_by_index():
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.5])
    sel = select_pseudo_labels(scores, list("abcde"), k_normal=2, k_anomalous=2)
    assert sel.anomalous_idx == (0, 1)
    assert sel.normal_idx == (2, 3)
    again = select_pseudo_labels(scores, list("abcde"), k_normal=2, k_anomalous=2)
    assert again == sel


def test_distinct_selection_counts_texts_once_with_weights():
    texts = ["bad", "ok", "bad", "ok", "ok", "odd", "fine"]
    scores = np.array([0.1, 0.9, 0.1, 0.9, 0.9, 0.2, 0.8])
    plain = select_pseudo_labels(scores, texts, k_normal=2, k_anomalous=2, strategy="plain")
    assert set(plain.texts) == {"bad", "ok"}  # duplicates crowd out everything else
    sel = select_pseudo_labels(scores, texts, k_normal=2, k_anomalous=2, strategy="distinct")
    assert sel.texts == ("ok", "fine", "bad", "odd")
    assert sel.labels == (0, 0, 1, 1)
    assert sel.weights == (3, 1, 2, 1)
    assert sel.normal_idx == (1, 3, 4, 6)
    assert sel.anomalous_idx == (0, 2, 5)


def test_distinct_uses_mean_score_of_a_text():
    texts = ["x", "x", "y", "z"]
    scores = np.array([0.0, 1.0, 0.4, 0.6])  # x averages 0.5
    sel = select_pseudo_labels(scores, texts, k_normal=1, k_anomalous=1, strategy="distinct")
    assert sel.texts == ("z", "y")


@pytest.mark.parametrize(
    ("k_n", "k_a", "available", "expected"),
    [
        (2, 2, 10, (2, 2)),
        (200, 200, 5, (3, 2)),
        (200, 200, 300, (150, 150)),
        (120, 200, 300, (120, 180)),
        (200, 30, 100, (70, 30)),
        (1, 1, 2, (1, 1)),
    ],
)
def test_clamp_counts(k_n, k_a, available, expected):
    assert clamp_counts(k_n, k_a, available) == expected


def test_selection_clamps_and_sides_never_overlap():
    rng = np.random.default_rng(0)
    scores = rng.random(7)
    sel = select_pseudo_labels(scores, [str(i) for i in range(7)], k_normal=200, k_anomalous=200)
    assert len(sel.normal_idx) == 4 and len(sel.anomalous_idx) == 3
    assert not set(sel.normal_idx) & set(sel.anomalous_idx)
    assert max(scores[list(sel.anomalous_idx)]) < min(scores[list(sel.normal_idx)])


def test_distinct_clamps_on_distinct_texts():
    texts = ["a"] * 5 + ["b"] * 5 + ["c"]
    sel = select_pseudo_labels(np.linspace(0, 1, 11), texts, k_normal=5, k_anomalous=5, strategy="distinct")
    assert sel.texts == ("c", "b", "a")
    assert sel.labels == (0, 0, 1)
    assert sum(sel.weights) == 11


def test_none_aggregation_pools_per_client_choices_round_robin():
    matrix = np.array(
        [
            [0.0, 0.1, 0.9, 0.5, 0.5, 1.0],  # client 0: lowest 0,1 ; highest 5,2
            [0.5, 0.5, 0.0, 0.1, 1.0, 0.9],  # client 1: lowest 2,3 ; highest 4,5
        ]
    )
    sel = select_pseudo_labels(aggregate_scores(matrix, "none"), list("abcdef"), k_normal=2, k_anomalous=2)
    assert sel.anomalous_idx == (0, 2)  # client 0's lowest, then client 1's lowest
    assert sel.normal_idx == (4, 5)  # client 0's highest (5), then client 1's highest (4)
    assert not set(sel.normal_idx) & set(sel.anomalous_idx)


def test_none_aggregation_skips_items_taken_by_the_other_side():
    matrix = np.array([[0.0, 0.2, 0.5, 0.9], [0.9, 0.8, 0.1, 0.0]])
    sel = select_pseudo_labels(matrix, list("abcd"), k_normal=2, k_anomalous=2)
    assert sel.anomalous_idx == (0, 3)
    assert sel.normal_idx == (1, 2)


@pytest.mark.parametrize(
    ("scores", "texts", "kwargs", "message"),
    [
        (np.array([0.1, np.nan, 0.3]), list("abc"), {}, "NaN"),
        (np.array([0.1, 0.2]), list("abc"), {}, "2 scores but 3 texts"),
        (np.array([0.1]), list("a"), {}, "at least 2"),
        (np.zeros((1, 1, 3)), list("abc"), {}, "shape"),
        (np.array([0.1, 0.2, 0.3]), list("abc"), {"strategy": "fancy"}, "unknown selection strategy"),
        (np.array([0.1, 0.2, 0.3]), list("abc"), {"k_normal": 0}, "k_normal"),
        (np.array([0.1, 0.2, 0.3]), list("abc"), {"k_anomalous": -1}, "k_anomalous"),
        (np.array([0.1, 0.2, 0.3]), ["same"] * 3, {"strategy": "distinct"}, "at least 2"),
    ],
)
def test_selection_errors(scores, texts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_pseudo_labels(scores, texts, **kwargs)


# --------------------------------------------------------------------------- hostile clients


def test_declared_sample_counts_are_capped_at_the_median():
    assert federation.bounded_weights([100, 120, 10**9, 90, 110]) == [100, 110, 110, 90, 110]
    assert federation.bounded_weights([50, 50]) == [50, 50]
    with pytest.raises(federation.FederationError):
        federation.bounded_weights([10, 0])


def test_a_boosted_adapter_is_scaled_to_the_typical_norm():
    honest = [{"b": torch.full((2, 2), v)} for v in (1.0, 1.1, 0.9, 1.0)]
    boosted = {"b": torch.full((2, 2), 100.0)}
    clipped = federation.clip_to_median_norm(honest + [boosted])
    assert all(torch.equal(c["b"], h["b"]) for c, h in zip(clipped, honest)), "honest clients untouched"
    median_norm = 2.0  # ||full(2x2, 1.0)||
    assert torch.linalg.norm(clipped[-1]["b"]).item() == pytest.approx(2 * median_norm)
    averaged = federation.fedavg(clipped, [1] * 5)["b"]
    assert averaged.max().item() < 2.0  # unclipped, the boosted client alone would put it near 20.8


def test_median_and_trimmed_mean_ignore_one_hostile_client():
    rng = np.random.default_rng(0)
    truth = np.linspace(0.0, 1.0, 50)
    honest = np.stack([truth + rng.normal(0, 0.01, 50) for _ in range(4)])
    for attack in (1.0 - truth, rng.random(50)):  # inverted, random
        matrix = np.vstack([honest, attack])
        for how in ("median", "trimmed_mean"):
            robust = federation.aggregate_scores(matrix, how)
            assert np.corrcoef(robust, truth)[0, 1] > 0.99, (how, attack[:3])
        assert federation.outlier_clients(matrix) == [4]
    assert federation.outlier_clients(honest) == []
    assert federation.outlier_clients(honest[:2]) == []  # two clients: neither can be told apart
