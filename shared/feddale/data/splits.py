"""Cutting a labeled data set into the parts of one federated experiment.

Public, test and validation sets are drawn first, with fixed (normal, anomalous) counts; the
client data is what remains: every remaining normal session plus anomalies at a realistic
rate (HDFS_v1 has about 3%), unlabeled. Labels are read here only to compose the parts; the
client shards and the public set leave as plain :class:`Session` tuples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import numpy as np

from feddale.data.types import Dataset, FederationSplit, LabeledSession, Session

Counts = tuple[int, int]  # (normal, anomalous)


def _check_counts(name: str, counts: Counts) -> None:
    if len(counts) != 2 or any(not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"{name} must be two non-negative ints (normal, anomalous), got {counts}")


def make_split(
    dataset: Dataset,
    n_clients: int,
    *,
    public: Counts = (1000, 1000),
    test: Counts = (1000, 1000),
    validation: Counts = (500, 500),
    natural: Counts = (0, 0),
    client_anomaly_rate: float = 0.03,
    partition: Literal["iid", "dirichlet"] = "iid",
    dirichlet_alpha: float = 0.5,
    max_client_sessions: int | None = None,
    seed: int = 0,
) -> FederationSplit:
    """Split ``dataset`` into client shards, a public set, validation and test sets.

    All parts are disjoint by session id. ``natural`` is a second test set at the anomaly rate
    users see (e.g. (4855, 145) for HDFS's 2.9%); drawn after validation, it changes no other
    part when it is empty. ``client_anomaly_rate`` is the share of anomalies in
    the pooled client data; ``max_client_sessions`` caps that pool's size (small CPU runs).
    ``partition="iid"`` deals the shuffled pool out in equal shares; ``"dirichlet"`` groups
    sessions by kind (the set of distinct messages they contain, no labels involved) and gives
    each client a Dirichlet(``dirichlet_alpha``) share of every kind, so clients see different
    mixes of behaviour, as separate clusters would. Every client gets at least one session.
    """
    if dataset.labels is None:
        raise ValueError(
            f"dataset {dataset.name!r} has no labels; a federation split needs them to build "
            "the evaluation sets (use shard() to spread unlabeled data)"
        )
    if n_clients < 1:
        raise ValueError(f"n_clients must be at least 1, got {n_clients}")
    for name, counts in (("public", public), ("test", test), ("validation", validation), ("natural", natural)):
        _check_counts(name, counts)
    if not 0.0 <= client_anomaly_rate < 1.0:
        raise ValueError(f"client_anomaly_rate must be in [0, 1), got {client_anomaly_rate}")
    if partition not in ("iid", "dirichlet"):
        raise ValueError(f"partition must be 'iid' or 'dirichlet', got {partition!r}")
    if not dirichlet_alpha > 0:
        raise ValueError(f"dirichlet_alpha must be positive, got {dirichlet_alpha}")
    if max_client_sessions is not None and max_client_sessions < n_clients:
        raise ValueError(
            f"max_client_sessions={max_client_sessions} leaves less than one session for "
            f"each of {n_clients} clients"
        )
    ids = [s.id for s in dataset.sessions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset {dataset.name!r} has duplicate session ids")

    rng = random.Random(seed)
    pools: dict[int, list[Session]] = {0: [], 1: []}
    for session, label in zip(dataset.sessions, dataset.labels):
        pools[label].append(session)
    for label in (0, 1):
        rng.shuffle(pools[label])

    def take(name: str, counts: Counts) -> list[LabeledSession]:
        drawn: list[LabeledSession] = []
        for label, count in zip((0, 1), counts):
            kind = "normal" if label == 0 else "anomalous"
            if count > len(pools[label]):
                raise ValueError(
                    f"dataset {dataset.name!r} is too small: the {name} set needs {count} "
                    f"{kind} sessions but only {len(pools[label])} are left"
                )
            drawn += [LabeledSession(s, label) for s in pools[label][:count]]
            del pools[label][:count]
        rng.shuffle(drawn)
        return drawn

    public_part = take("public", public)
    test_part = take("test", test)
    validation_part = take("validation", validation)
    natural_part = take("natural", natural)
    client_pool = _client_pool(
        pools, client_anomaly_rate, max_client_sessions, n_clients, dataset.name
    )
    rng.shuffle(client_pool)
    if partition == "iid":
        shards = [client_pool[i::n_clients] for i in range(n_clients)]
    else:
        shards = _dirichlet_shards(client_pool, n_clients, dirichlet_alpha, seed)
    return FederationSplit(
        clients=tuple(tuple(shard) for shard in shards),
        public=tuple(item.session for item in public_part),
        public_labels=tuple(item.label for item in public_part),
        validation=tuple(validation_part),
        test=tuple(test_part),
        natural=tuple(natural_part),
    )


def _client_pool(
    pools: dict[int, list[Session]],
    rate: float,
    cap: int | None,
    n_clients: int,
    name: str,
) -> list[Session]:
    """The remaining normal sessions plus anomalies at ``rate`` of the pool, within ``cap``."""
    normal = len(pools[0])
    anomalous = round(normal * rate / (1.0 - rate))
    if cap is not None and normal + anomalous > cap:
        anomalous = round(cap * rate)
        normal = cap - anomalous
    if normal + anomalous < n_clients:
        raise ValueError(
            f"dataset {name!r} is too small: {normal} normal sessions are left for "
            f"{n_clients} clients"
        )
    if anomalous > len(pools[1]):
        raise ValueError(
            f"dataset {name!r} is too small: client data at anomaly rate {rate} needs "
            f"{anomalous} anomalous sessions but only {len(pools[1])} are left"
        )
    return pools[0][:normal] + pools[1][:anomalous]


def session_kind(session: Session) -> frozenset[str]:
    """What a session does, ignoring order and repetition: its set of distinct messages."""
    return frozenset(session.messages)


def _dirichlet_shards(
    pool: list[Session], n_clients: int, alpha: float, seed: int
) -> list[list[Session]]:
    by_kind: dict[frozenset[str], list[Session]] = {}
    for session in pool:
        by_kind.setdefault(session_kind(session), []).append(session)
    generator = np.random.default_rng(seed)
    shards: list[list[Session]] = [[] for _ in range(n_clients)]
    for members in by_kind.values():
        shares = generator.dirichlet(np.full(n_clients, alpha))
        owners = generator.choice(n_clients, size=len(members), p=shares)
        for session, owner in zip(members, owners):
            shards[owner].append(session)
    # A client left empty takes one session from the largest shard.
    for part in shards:
        if not part:
            part.append(max(shards, key=len).pop())
    order = random.Random(seed)
    for part in shards:
        order.shuffle(part)
    return shards


def shard(sessions: Sequence[Session], index: int, count: int) -> tuple[Session, ...]:
    """The ``index``-th of ``count`` interleaved shards (every count-th session).

    Lets a node started with only a shard number take its part of a shared data set.
    """
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}")
    part = tuple(sessions[index::count])
    if not part:
        raise ValueError(f"shard {index} of {count} is empty: only {len(sessions)} sessions")
    return part
