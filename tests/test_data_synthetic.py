"""The synthetic HDFS generator: determinism, shape, and closeness to the real data."""

import csv
import statistics
from collections import Counter
from pathlib import Path

import pytest

from feddale.data.synthetic import EVENT_TEMPLATES, generate, generate_events

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hdfs"


@pytest.fixture(scope="module")
def rows() -> list[tuple[list[str], int]]:
    return generate_events(6000, 6000, seed=3)


def test_same_seed_same_data_other_seed_other_data() -> None:
    assert generate(200, 50, seed=7) == generate(200, 50, seed=7)
    assert generate(200, 50, seed=7).sessions != generate(200, 50, seed=8).sessions


def test_shape_ids_labels_and_templates() -> None:
    data = generate(300, 100, seed=1)
    assert data.name == "synthetic" and len(data) == 400
    assert Counter(data.labels) == {0: 300, 1: 100}
    assert len({s.id for s in data.sessions}) == 400
    assert set(data.labels[:100]) == {0, 1}  # shuffled: position says nothing about the label
    known = set(EVENT_TEMPLATES.values())
    assert all(m in known for s in data.sessions for m in s.messages)
    assert len(EVENT_TEMPLATES) == 29


@pytest.mark.parametrize(("normal", "anomalous"), [(-1, 5), (5, -1), (0, 0)])
def test_rejects_bad_counts(normal: int, anomalous: int) -> None:
    with pytest.raises(ValueError):
        generate(normal, anomalous)


def test_normal_sessions_follow_the_block_lifecycle(rows) -> None:
    for events, label in rows:
        if label == 0:
            counts = Counter(events)
            assert counts["E22"] == 1 and counts["E5"] >= 3 and counts["E11"] == counts["E9"] == 3
            assert counts["E23"] in (0, 3) and counts["E21"] >= counts["E23"]


def test_anomalies_are_not_separable_by_length_alone(rows) -> None:
    normal_lengths = [len(e) for e, label in rows if label == 0]
    low, high = min(normal_lengths), sorted(normal_lengths)[int(0.99 * len(normal_lengths))]
    anomalous = [len(e) for e, label in rows if label == 1]
    inside = sum(low <= n <= high for n in anomalous) / len(anomalous)
    assert 0.45 < inside < 0.75  # real HDFS_v1: 0.60 of anomalies have a normal-looking length


def _profile(sequences: list[list[str]]) -> tuple[dict[str, float], float, float]:
    present = Counter(e for s in sequences for e in set(s))
    lengths = [len(s) for s in sequences]
    return (
        {e: n / len(sequences) for e, n in present.items()},
        statistics.mean(lengths),
        statistics.median(lengths),
    )


@pytest.mark.skipif(not (REAL / "sessions.csv").is_file(), reason="real HDFS data absent")
@pytest.mark.parametrize("label", [0, 1])
def test_close_to_real_hdfs(rows, label: int) -> None:
    with (REAL / "sessions.csv").open() as handle:
        real = [r["events"].split() for r in csv.DictReader(handle) if int(r["label"]) == label]
    real_present, real_mean, real_median = _profile(real)
    syn_present, syn_mean, syn_median = _profile([e for e, lab in rows if lab == label])
    for event in EVENT_TEMPLATES:
        assert abs(real_present.get(event, 0.0) - syn_present.get(event, 0.0)) < 0.035, event
    assert abs(real_mean - syn_mean) < 1.0
    assert real_median == syn_median
