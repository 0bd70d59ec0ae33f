"""Server-side federation math: FedAvg over adapters, score aggregation, pseudo-labels.

Everything here is a plain function on tensors / arrays so the coordinator service, the
in-process simulator and the tests all run exactly the same code. Labels never enter this
module: selection is driven only by the teachers' unsupervised scores (high = normal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

Aggregation = Literal["mean", "max", "rank_mean", "median", "trimmed_mean", "none"]
SelectionStrategy = Literal["plain", "distinct"]

NORMAL = 0
ANOMALOUS = 1


class FederationError(ValueError):
    """Client updates or score matrices that cannot be combined (names the client/key)."""


# --------------------------------------------------------------------------- FedAvg


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int]) -> dict[str, torch.Tensor]:
    """Sample-count weighted average of client adapter states (McMahan et al. FedAvg).

    Every client must send exactly the same keys and shapes in a floating dtype with finite
    values: a silently broadcast or NaN update would poison every client in the next round,
    so each violation is rejected with the offending client index and key. The result is
    fp32 on CPU regardless of the wire dtype (fp16 averaging loses precision quickly).
    """
    if len(states) == 0:
        raise FederationError("fedavg needs at least one client state")
    if len(weights) != len(states):
        raise FederationError(f"fedavg got {len(states)} states but {len(weights)} weights")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w <= 0:
            raise FederationError(f"client {i}: weight must be a positive integer sample count, got {w!r}")
    reference = states[0]
    if len(reference) == 0:
        raise FederationError("client 0: state is empty")
    keys = set(reference)
    for i, state in enumerate(states):
        missing, extra = keys - set(state), set(state) - keys
        if missing or extra:
            raise FederationError(
                f"client {i}: keys differ from client 0 (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
            )
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise FederationError(f"client {i}, key {key!r}: expected a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise FederationError(f"client {i}, key {key!r}: dtype {tensor.dtype} is not floating point")
            if tensor.shape != reference[key].shape:
                raise FederationError(
                    f"client {i}, key {key!r}: shape {tuple(tensor.shape)} != {tuple(reference[key].shape)} of client 0"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise FederationError(f"client {i}, key {key!r}: contains NaN or infinite values")
    total = float(sum(int(w) for w in weights))
    averaged: dict[str, torch.Tensor] = {}
    for key in reference:
        acc = torch.zeros(reference[key].shape, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += state[key].detach().to(device="cpu", dtype=torch.float64) * (int(w) / total)
        averaged[key] = acc.to(torch.float32)
    return averaged


def bounded_weights(samples: Sequence[int], cap_factor: float = 1.0) -> list[int]:
    """FedAvg weights from client-declared sample counts, each capped at ``cap_factor`` x the median.

    The counts are the clients' own word: uncapped, one client declaring 1e9 sessions would
    replace the global adapter with its own. Capped at the median, no client weighs more than
    the typical one; IID shards (equal sizes) keep their counts.
    """
    if not samples or any(int(n) < 1 for n in samples):
        raise FederationError(f"sample counts must be positive integers, got {list(samples)}")
    cap = max(1, int(cap_factor * float(np.median([int(n) for n in samples]))))
    return [min(int(n), cap) for n in samples]


def clip_to_median_norm(
    states: Sequence[Mapping[str, torch.Tensor]], factor: float = 2.0
) -> list[dict[str, torch.Tensor]]:
    """Scale down each client's adapter whose L2 norm exceeds ``factor`` x the clients' median norm.

    A LoRA ``B`` matrix starts at zero, so an adapter's norm measures how far a client moved; a
    scaled (boosted) update would otherwise dominate the average however its weight is bounded.
    Honest clients, trained alike, are rarely near the bound.
    """
    norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values()))) for state in states]
    bound = factor * float(np.median(norms))
    clipped = []
    for state, norm in zip(states, norms):
        scale = bound / norm if norm > bound > 0 else 1.0
        clipped.append({k: v * scale for k, v in state.items()})
    return clipped


# --------------------------------------------------------------------------- score aggregation


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise FederationError(f"score matrix must be 2-D (clients x samples), got shape {m.shape}")
    if m.shape[0] == 0 or m.shape[1] == 0:
        raise FederationError(f"score matrix is empty: shape {m.shape}")
    bad = ~np.isfinite(m)
    if bad.any():
        client, sample = map(int, np.argwhere(bad)[0])
        raise FederationError(f"client {client}, sample {sample}: score is NaN or infinite")
    return m


def _rank_percentiles(row: np.ndarray) -> np.ndarray:
    """Map scores to [0, 1] by rank (ties share their average rank) so clients compare fairly."""
    if row.size == 1:
        return np.full(1, 0.5)
    return (rankdata(row, method="average") - 1.0) / (row.size - 1.0)


def aggregate_scores(matrix: np.ndarray, how: Aggregation) -> np.ndarray:
    """Combine per-client scores of the public set (clients x n) into what selection ranks.

    - ``mean``: average score, the paper's default consensus filter.
    - ``max``: a sample is as normal as its most confident teacher says.
    - ``rank_mean``: mean of per-client rank percentiles in [0, 1]; robust when teachers are
      calibrated differently (e.g. one client saw far more data and scores everything high).
    - ``median``: coordinate-wise median; one hostile client (random or inverted scores) cannot
      move it while honest clients are the majority.
    - ``trimmed_mean``: per public session, the mean after dropping the highest and the lowest
      score (with three clients or more; the plain mean below that).
    - ``none``: the "no filter" ablation. No cross-client combination at all: the matrix is
      returned unchanged (clients x n) and :func:`select_pseudo_labels` then lets each client
      pick its own most confident samples in turn and pools them (see there).

    ``mean``/``max``/``rank_mean`` return shape (n,); ``none`` returns (clients, n).
    """
    m = _check_matrix(matrix)
    if how == "mean":
        return m.mean(axis=0)
    if how == "max":
        return m.max(axis=0)
    if how == "rank_mean":
        return np.mean([_rank_percentiles(row) for row in m], axis=0)
    if how == "median":
        return np.median(m, axis=0)
    if how == "trimmed_mean":
        if m.shape[0] < 3:
            return m.mean(axis=0)
        return np.sort(m, axis=0)[1:-1].mean(axis=0)
    if how == "none":
        return m.copy()
    raise FederationError(
        f"unknown aggregation {how!r}; expected one of mean, max, rank_mean, median, trimmed_mean, none"
    )


def outlier_clients(matrix: np.ndarray, min_agreement: float = 0.0) -> list[int]:
    """Clients whose ranking of the public set disagrees with everyone else's (indices into the rows).

    Each client's scores are rank-correlated (Spearman) with the coordinate-wise median of the
    other clients. Honest teachers agree on what is normal; a client is flagged when its
    agreement is at or below ``min_agreement`` (inverted payloads: negative) or below half of the
    clients' median agreement (random payloads: near 0 while the others agree). Needs three
    clients: with two, neither can be told from the other.
    """
    m = _check_matrix(matrix)
    if m.shape[0] < 3:
        return []
    agreement = []
    for i in range(m.shape[0]):
        a, b = rankdata(m[i]), rankdata(np.median(np.delete(m, i, axis=0), axis=0))
        agreement.append(0.0 if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1]))
    typical = float(np.median(agreement))
    return [i for i, value in enumerate(agreement) if value <= min_agreement or value < typical / 2]


# --------------------------------------------------------------------------- pseudo-label selection


@dataclass(frozen=True)
class Selection:
    """Pseudo-labelled training set for the student, plus where it came from in the public set.

    ``normal_idx``/``anomalous_idx`` index the public set (every occurrence of a selected text in
    ``distinct`` mode, so purity reports are count-weighted exactly like training is).
    ``texts``/``labels``/``weights`` are aligned training rows: label 0 pseudo-normal, 1
    pseudo-anomalous, weight = how many public sessions the row stands for.
    """

    strategy: str
    normal_idx: tuple[int, ...]
    anomalous_idx: tuple[int, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    weights: tuple[int, ...]


def clamp_counts(k_normal: int, k_anomalous: int, available: int) -> tuple[int, int]:
    """Shrink the requested per-side counts so the two sides fit in ``available`` items.

    Rule (deterministic, no warnings): if both requests fit, keep them. Otherwise a side that
    asks for at most its half (anomalous half = floor(available / 2)) keeps its request and the
    other side gets the rest; if both ask for more, anomalous gets floor(available / 2) and
    normal the remaining ceil(available / 2).
    """
    for name, k in (("k_normal", k_normal), ("k_anomalous", k_anomalous)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must be a positive integer, got {k!r}")
    if available < 2:
        raise ValueError(f"need at least 2 selectable items to pick both classes, got {available}")
    if k_normal + k_anomalous <= available:
        return int(k_normal), int(k_anomalous)
    k_a = min(k_anomalous, max(available - k_normal, available // 2))
    return int(available - k_a), int(k_a)


def _round_robin(orders: list[np.ndarray], k: int, taken: np.ndarray) -> list[int]:
    """Let each client pick its next untaken item in turn until ``k`` items are chosen."""
    picked: list[int] = []
    cursors = [0] * len(orders)
    while len(picked) < k:
        progressed = False
        for c, order in enumerate(orders):
            while cursors[c] < order.size and taken[order[cursors[c]]]:
                cursors[c] += 1
            if cursors[c] < order.size and len(picked) < k:
                item = int(order[cursors[c]])
                taken[item] = True
                picked.append(item)
                progressed = True
        if not progressed:
            break
    return picked


def _rank_items(item_scores: np.ndarray, k_normal: int, k_anomalous: int) -> tuple[list[int], list[int]]:
    """Pick item ids for each side from (clients x items) scores; ties break by lower item id.

    With one row this is exactly the paper: the k_anomalous lowest and k_normal highest. With
    several rows (``none`` aggregation) clients take turns, anomalous side first, and an item
    already taken (by any client, on either side) is skipped, so the sides never overlap.
    """
    items = np.arange(item_scores.shape[1])
    ascending = [np.lexsort((items, row)) for row in item_scores]
    descending = [np.lexsort((items, -row)) for row in item_scores]
    taken = np.zeros(item_scores.shape[1], dtype=bool)
    anomalous = _round_robin(ascending, k_anomalous, taken)
    normal = _round_robin(descending, k_normal, taken)
    return normal, anomalous


def select_pseudo_labels(
    scores: np.ndarray,
    texts: Sequence[str],
    k_normal: int = 200,
    k_anomalous: int = 200,
    strategy: SelectionStrategy = "plain",
) -> Selection:
    """Turn aggregated teacher scores into a pseudo-labelled student training set.

    ``scores`` is (n,) from :func:`aggregate_scores`, or (clients, n) for the ``none`` ablation.
    High score = the teachers predicted the session well = pseudo-normal.

    - ``plain`` (the paper): the k_anomalous lowest sessions are pseudo-anomalous and the
      k_normal highest pseudo-normal, one training row each.
    - ``distinct``: the same ranking over distinct texts (a text's score is the mean over its
      occurrences). HDFS repeats itself heavily, so the 200 lowest *sessions* can be a couple of
      dozen distinct texts; here each distinct text is one row with weight = its count, and k
      counts distinct texts.

    Requests larger than what is available are shrunk with :func:`clamp_counts`.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2:
        raise ValueError(f"scores must be 1-D (n,) or 2-D (clients, n), got shape {np.shape(scores)}")
    if s.shape[0] == 0:
        raise ValueError("scores has no client rows")
    if not np.isfinite(s).all():
        client, sample = map(int, np.argwhere(~np.isfinite(s))[0])
        raise ValueError(f"scores contain NaN or infinite values (client row {client}, sample {sample})")
    texts = list(texts)
    if len(texts) != s.shape[1]:
        raise ValueError(f"got {s.shape[1]} scores but {len(texts)} texts")

    if strategy == "plain":
        groups = [np.array([i]) for i in range(len(texts))]
    elif strategy == "distinct":
        first_seen: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            first_seen.setdefault(text, []).append(i)
        groups = [np.array(idx) for idx in first_seen.values()]  # ordered by first occurrence
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}; expected 'plain' or 'distinct'")

    item_scores = np.stack([s[:, g].mean(axis=1) for g in groups], axis=1)
    k_n, k_a = clamp_counts(k_normal, k_anomalous, len(groups))
    normal, anomalous = _rank_items(item_scores, k_n, k_a)

    rows = [(g, NORMAL) for g in normal] + [(g, ANOMALOUS) for g in anomalous]
    return Selection(
        strategy=strategy,
        normal_idx=tuple(sorted(int(i) for g in normal for i in groups[g])),
        anomalous_idx=tuple(sorted(int(i) for g in anomalous for i in groups[g])),
        texts=tuple(texts[int(groups[g][0])] for g, _ in rows),
        labels=tuple(label for _, label in rows),
        weights=tuple(int(groups[g].size) for g, _ in rows),
    )


def pseudo_label_agreement(matrix: np.ndarray, selection: Selection) -> float:
    """How far the teachers agree on the pseudo-labels, without any label: in [0, 1].

    For each client, the probability that its own teacher scores a pseudo-normal public session
    above a pseudo-anomalous one (ties count half: a Mann-Whitney AUC), averaged over clients.
    1.0 means every teacher ranks every pseudo-normal session above every pseudo-anomalous one;
    0.5 is chance. It is what automatic promotion compares between students (a student whose
    pseudo-labels its own teachers agree on less is the riskier one); it says nothing about how
    well the student learned them. With one client it is 1.0 by construction (its own ranking
    chose them), except where the selection was made on other clients' scores.
    """
    m = _check_matrix(matrix)
    normal, anomalous = list(selection.normal_idx), list(selection.anomalous_idx)
    if not normal or not anomalous:
        raise FederationError("the selection has no pseudo-normal or no pseudo-anomalous session")
    per_client = []
    for row in m:
        n, a = np.sort(row[normal]), row[anomalous]
        below = np.searchsorted(n, a, side="left")  # pseudo-normal scores under each pseudo-anomalous one
        not_above = np.searchsorted(n, a, side="right")
        wins = float((n.size - not_above).sum()) + 0.5 * float((not_above - below).sum())
        per_client.append(wins / (n.size * a.size))
    return float(np.mean(per_client))
