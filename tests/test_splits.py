"""Federation splits: disjointness, sizes, anomaly rate, Dirichlet skew, labels kept away."""

from collections import Counter
from itertools import combinations

import pytest

from feddale.data.splits import make_split, session_kind, shard
from feddale.data.synthetic import generate
from feddale.data.types import Dataset, FederationSplit, LabeledSession, Session, texts_digest


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate(4000, 1000, seed=5)


SMALL = {"public": (200, 200), "test": (300, 300), "validation": (100, 100)}


def _ids(split: FederationSplit) -> dict[str, list[str]]:
    return {
        "clients": [s.id for c in split.clients for s in c],
        "public": [s.id for s in split.public],
        "validation": [x.session.id for x in split.validation],
        "test": [x.session.id for x in split.test],
    }


def test_parts_are_disjoint_and_sized(data: Dataset) -> None:
    split = make_split(data, 3, **SMALL, seed=1)
    ids = _ids(split)
    for a, b in combinations(ids, 2):
        assert not set(ids[a]) & set(ids[b]), (a, b)
    assert all(len(v) == len(set(v)) for v in ids.values())
    truth = dict(zip((s.id for s in data.sessions), data.labels))
    assert Counter(split.public_labels) == {0: 200, 1: 200}
    assert [truth[i] for i in ids["public"]] == list(split.public_labels)
    assert Counter(x.label for x in split.test) == {0: 300, 1: 300}
    assert Counter(x.label for x in split.validation) == {0: 100, 1: 100}
    assert all(truth[x.session.id] == x.label for x in split.test + split.validation)
    # Clients get every remaining normal session and anomalies at about 3%.
    client_labels = [truth[i] for i in ids["clients"]]
    assert client_labels.count(0) == 4000 - 600
    assert abs(client_labels.count(1) / len(client_labels) - 0.03) < 0.002
    sizes = [len(c) for c in split.clients]
    assert max(sizes) - min(sizes) <= 1


def test_natural_part_has_its_rate_is_disjoint_and_changes_nothing_else(data: Dataset) -> None:
    plain = make_split(data, 3, **SMALL, seed=2)
    assert plain.natural == ()
    split = make_split(data, 3, **SMALL, natural=(970, 30), seed=2)
    assert Counter(x.label for x in split.natural) == {0: 970, 1: 30}
    ids = {**_ids(split), "natural": [x.session.id for x in split.natural]}
    for a, b in combinations(ids, 2):
        assert not set(ids[a]) & set(ids[b]), (a, b)
    # Drawn after the others: public, test and validation are the same sessions as without it.
    assert (split.public, split.test, split.validation) == (plain.public, plain.test, plain.validation)
    truth = dict(zip((s.id for s in data.sessions), data.labels))
    assert all(truth[x.session.id] == x.label for x in split.natural)


def test_labels_never_reach_clients_or_public(data: Dataset) -> None:
    split = make_split(data, 2, **SMALL)
    for session in [s for c in split.clients for s in c] + list(split.public):
        assert type(session) is Session and not hasattr(session, "label")
    assert all(isinstance(x, LabeledSession) for x in split.test + split.validation)
    # Public order mixes the classes: a digest of its texts is all a client sees.
    assert 0 < sum(split.public_labels[:50]) < 50
    assert len(texts_digest([s.text for s in split.public])) == 64


def test_same_seed_same_split(data: Dataset) -> None:
    assert make_split(data, 3, **SMALL, seed=4) == make_split(data, 3, **SMALL, seed=4)
    assert make_split(data, 3, **SMALL, seed=4).public != make_split(data, 3, **SMALL, seed=5).public


def test_rate_and_cap(data: Dataset) -> None:
    split = make_split(data, 4, **SMALL, client_anomaly_rate=0.0, max_client_sessions=1000)
    assert sum(len(c) for c in split.clients) == 1000
    truth = dict(zip((s.id for s in data.sessions), data.labels))
    assert all(truth[s.id] == 0 for c in split.clients for s in c)
    capped = make_split(data, 4, **SMALL, client_anomaly_rate=0.1, max_client_sessions=500)
    pooled = [truth[s.id] for c in capped.clients for s in c]
    assert len(pooled) == 500 and pooled.count(1) == 50


def _kind_skew(split: FederationSplit) -> float:
    """Mean total-variation distance between the clients' distributions over session kinds."""
    dists = []
    for client in split.clients:
        counts = Counter(session_kind(s) for s in client)
        dists.append({k: n / len(client) for k, n in counts.items()})
    pairs = list(combinations(dists, 2))
    return sum(
        0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b)) for a, b in pairs
    ) / len(pairs)


def test_dirichlet_partition_skews_kinds_and_keeps_clients_non_empty(data: Dataset) -> None:
    iid = make_split(data, 5, **SMALL, partition="iid")
    skewed = make_split(data, 5, **SMALL, partition="dirichlet", dirichlet_alpha=0.1)
    assert _kind_skew(skewed) > _kind_skew(iid) + 0.2
    assert sum(map(len, skewed.clients)) == sum(map(len, iid.clients))
    many = make_split(data, 60, **SMALL, partition="dirichlet", dirichlet_alpha=0.01)
    assert len(many.clients) == 60 and all(many.clients)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"public": (4500, 10)}, "public set needs 4500 normal"),
        ({"test": (10, 1000)}, "test set needs 1000 anomalous"),
        ({"public": (1000, 900), "client_anomaly_rate": 0.5}, "needs .* anomalous sessions but only"),
        ({"public": (-1, 1)}, "non-negative"),
        ({"natural": (3900, 10)}, "natural set needs 3900 normal"),
        ({"client_anomaly_rate": 1.0}, "client_anomaly_rate"),
        ({"partition": "random"}, "partition"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
        ({"max_client_sessions": 2}, "less than one session"),
    ],
)
def test_bad_arguments(data: Dataset, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_split(data, 3, **{**SMALL, **kwargs})


def test_needs_labels_unique_ids_and_clients() -> None:
    sessions = tuple(Session(f"s{i}", ("m",)) for i in range(10))
    with pytest.raises(ValueError, match="has no labels"):
        make_split(Dataset("raw", sessions, None), 2)
    twice = Dataset("dup", sessions + sessions[:1], (0,) * 11)
    with pytest.raises(ValueError, match="duplicate session ids"):
        make_split(twice, 2, public=(0, 0), test=(0, 0), validation=(0, 0))
    with pytest.raises(ValueError, match="n_clients"):
        make_split(Dataset("ok", sessions, (0,) * 10), 0)
    with pytest.raises(ValueError, match="left for 20 clients"):
        make_split(Dataset("ok", sessions, (0,) * 10), 20, public=(0, 0), test=(0, 0), validation=(0, 0))


def test_default_synthetic_fits_default_split() -> None:
    split = make_split(generate(12000, 3000), 4)
    assert len(split.public) == 2000 and len(split.test) == 2000 and len(split.validation) == 1000
    assert sum(map(len, split.clients)) > 9000


def test_shard() -> None:
    sessions = tuple(Session(f"s{i}", ("m",)) for i in range(7))
    parts = [shard(sessions, i, 3) for i in range(3)]
    assert sorted(s.id for p in parts for s in p) == sorted(s.id for s in sessions)
    assert [len(p) for p in parts] == [3, 2, 2]
    for index, count in [(3, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError):
            shard(sessions, index, count)
    with pytest.raises(ValueError, match="empty"):
        shard(sessions[:1], 1, 2)


def test_types_validate() -> None:
    with pytest.raises(ValueError, match="2 labels for 1 sessions"):
        Dataset("x", (Session("a", ("m",)),), (0, 1))
    with pytest.raises(ValueError, match="label must be 0"):
        LabeledSession(Session("a", ()), 2)
    with pytest.raises(ValueError, match="label must be 0"):
        LabeledSession(Session("a", ()), True)
    with pytest.raises(ValueError, match="non-empty string"):
        Session("", ("m",))
    with pytest.raises(ValueError, match="public labels"):
        FederationSplit(((Session("a", ()),),), (Session("b", ()),), (), (), ())
    with pytest.raises(ValueError, match="at least one session"):
        FederationSplit(((),), (), (), (), ())
    assert Session("a", ["x", "y"]).messages == ("x", "y")
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
    assert texts_digest([]) != texts_digest([""])
    assert texts_digest(["a", "b"]) == texts_digest(("a", "b"))
