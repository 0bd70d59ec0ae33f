"""Seeded synthetic HDFS sessions: the offline default data set.

Each session is the life of one HDFS block told with the 29 Loghub HDFS_v1 event templates:
allocation and a 3-replica write pipeline, acknowledgements and namenode updates, optional
verification and reads, optional deletion. Anomalous sessions are the failure stories found
in the real data: writes abandoned after allocation, deletes of blocks a datanode no longer
has, re-replication of under-replicated blocks, redundant or orphan ``addStoredBlock``
requests, empty packets, pipeline exceptions and failed transfers.

All probabilities below were measured on the real sessions (``sessions.csv``, 10,855 normal
and 22,838 anomalous HDFS_v1 blocks); docs/data.md compares the generator with that data.
Like the real data, anomalies are not separable by one trivial feature: anomalous sessions
share the normal lifecycle, reads and exceptions while serving occur in both classes, and
the rare replication events occur in normal sessions too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from feddale.data.types import Dataset, Session

# The 29 HDFS_v1 event templates (Loghub numbering), in the masked form the models see.
EVENT_TEMPLATES: dict[str, str] = {
    "E1": "<*>:Adding an already existing block blk_<*>",
    "E2": "Verification succeeded for blk_<*>",
    "E3": "<*> Served block blk_<*> to /<*>",
    "E4": "<*>:Got exception while serving blk_<*> to /<*>:",
    "E5": "Receiving block blk_<*> src: /<*> dest: /<*>",
    "E6": "Received block blk_<*> src: /<*> dest: /<*> of size <*>",
    "E7": "writeBlock blk_<*> received exception java.io.IOException: Could not read from stream",
    "E8": "PacketResponder <*> for block blk_<*> Interrupted.",
    "E9": "Received block blk_<*> of size <*> from /<*>",
    "E10": "PacketResponder blk_<*> <*> Exception java.io.InterruptedIOException: "
    "Interruped while waiting for IO on channel <*>",
    "E11": "PacketResponder <*> for block blk_<*> terminating",
    "E12": "<*>:Exception writing block blk_<*> to mirror <*>",
    "E13": "Receiving empty packet for block blk_<*>",
    "E14": "Exception in receiveBlock for block blk_<*> java.io.IOException: Connection reset by peer",
    "E15": "Changing block file offset of block blk_<*> from <*> to <*> meta file offset to <*>",
    "E16": "<*>:Transmitted block blk_<*> to /<*>",
    "E17": "<*>:Failed to transfer blk_<*> to <*> got java.io.IOException: Connection reset by peer",
    "E18": "<*> Starting thread to transfer block blk_<*> to <*>",
    "E19": "Reopen Block blk_<*>",
    "E20": "Unexpected error trying to delete block blk_<*>. BlockInfo not found in volumeMap.",
    "E21": "Deleting block blk_<*> file /<*>",
    "E22": "BLOCK* NameSystem.allocateBlock: /<*> blk_<*>",
    "E23": "BLOCK* NameSystem.delete: blk_<*> is added to invalidSet of <*>",
    "E24": "BLOCK* Removing block blk_<*> from neededReplications as it does not belong to any file.",
    "E25": "BLOCK* ask <*> to replicate blk_<*> to datanode(s) <*>",
    "E26": "BLOCK* NameSystem.addStoredBlock: blockMap updated: <*> is added to blk_<*> size <*>",
    "E27": "BLOCK* NameSystem.addStoredBlock: Redundant addStoredBlock request received for "
    "blk_<*> on <*> size <*>",
    "E28": "BLOCK* NameSystem.addStoredBlock: addStoredBlock request received for blk_<*> on <*> "
    "size <*> But it does not belong to any file.",
    "E29": "PendingReplicationMonitor timed out block blk_<*>",
}

REPLICAS = 3  # HDFS_v1's replication factor: almost every real block has 3 E5/E9/E11/E26
Events = list[str]
Rng = random.Random


T = TypeVar("T")


def _choice(rng: Rng, weighted: Sequence[tuple[T, float]]) -> T:
    values = [value for value, _ in weighted]
    return rng.choices(values, [weight for _, weight in weighted])[0]


# (E3 "served", E4 "exception while serving") counts of sessions with reads, real frequencies.
_READ_COUNTS = (
    ((1, 2), 0.45), ((4, 2), 0.18), ((8, 4), 0.10), ((6, 3), 0.10), ((2, 1), 0.04),
    ((1, 0), 0.05), ((1, 15), 0.025), ((3, 2), 0.012), ((4, 0), 0.012), ((7, 4), 0.008),
    ((6, 0), 0.008), ((8, 0), 0.008), ((3, 4), 0.008), ((3, 3), 0.008),
)
_VERIFY_COUNTS = ((1, 0.69), (2, 0.16), (3, 0.15))


def _write_open(rng: Rng) -> Events:
    """allocateBlock (E22) interleaved with the pipeline's three Receiving block (E5)."""
    events = ["E5"] * REPLICAS
    position = _choice(rng, ((0, 0.253), (1, 0.212), (2, 0.200), (3, 0.335)))
    events.insert(position, "E22")
    return events


def _acks(rng: Rng, allocate_first: bool, prelude: str | None = None) -> Events:
    """Per replica PacketResponder terminating (E11) + Received block (E9), and the
    namenode's three addStoredBlock (E26), whose order varies with the namenode's lag."""
    pair = ([prelude] if prelude else []) + ["E11", "E9"]
    if allocate_first:
        layout = _choice(rng, (("before", 0.52), ("mixed", 0.27), ("after", 0.21)))
    else:
        layout = _choice(rng, (("before", 0.005), ("mixed", 0.23), ("after", 0.765)))
    if layout == "before":
        slots = [0] * REPLICAS
    elif layout == "after":
        slots = [REPLICAS] * REPLICAS
    else:
        slots = sorted(rng.randint(1, REPLICAS) for _ in range(REPLICAS))
        if slots == [REPLICAS] * REPLICAS:
            slots[0] = rng.randint(1, REPLICAS - 1)
    events: Events = []
    for index in range(REPLICAS + 1):
        events += ["E26"] * slots.count(index)
        if index < REPLICAS:
            events += pair
    return events


def _reads(rng: Rng, p_reads: float, p_verify: float) -> Events:
    """Block verification (E2) and client reads: served (E3) and exceptions while serving (E4,
    a client closing early: common in normal blocks)."""
    reads: Events = []
    if rng.random() < p_reads:
        served, failed = _choice(rng, _READ_COUNTS)
        reads = ["E3"] * served + ["E4"] * failed
        rng.shuffle(reads)
    if rng.random() < 0.0005:  # a hot block, read hundreds of times
        reads += ["E3"] * rng.randint(50, 250)
    if rng.random() < p_verify:
        verify = ["E2"] * _choice(rng, _VERIFY_COUNTS)
        reads = verify + reads if rng.random() < 0.25 else reads + verify
    return reads


def _replication(rng: Rng) -> Events:
    """Re-replication of an under-replicated block: ask (E25), start transfer (E18), the new
    replica's Receiving (E5), Received src/dest (E6) and Transmitted (E16), two addStoredBlock."""
    copy = ["E16", "E6"]
    rng.shuffle(copy)
    events = ["E25", "E18"]
    rng.shuffle(events)
    return events + ["E5"] + copy + ["E26", "E26"]


def _deletes(excess: int = 0) -> Events:
    """The namenode invalidates each replica (E23), each datanode deletes its file (E21)."""
    return ["E23"] * (REPLICAS + excess) + ["E21"] * (REPLICAS + excess)


def _lifecycle(
    rng: Rng, *, p_reads: float, p_verify: float, p_delete: float, p_replication: float = 0.0,
    prelude: str | None = None,
) -> Events:
    opening = _write_open(rng)
    events = opening + _acks(rng, opening[0] == "E22", prelude)
    if rng.random() < p_replication:
        events += _replicate_then_trim(rng)
    events += _reads(rng, p_reads, p_verify)
    if rng.random() < p_delete:
        events += _deletes()
    return events


def _replicate_then_trim(rng: Rng) -> Events:
    """One or more re-replications; the excess replica is deleted right away (E21)."""
    rounds = _choice(rng, ((1, 0.74), (2, 0.25), (3, 0.01)))
    events: Events = []
    for _ in range(rounds):
        events += _replication(rng)
        if rng.random() < 0.5:
            events.append("E21")
    return events


def _normal(rng: Rng) -> Events:
    return _lifecycle(rng, p_reads=0.245, p_verify=0.149, p_delete=0.816, p_replication=0.003)


# --- anomalies ---------------------------------------------------------------------------


def _abandoned_write(rng: Rng) -> Events:
    """Allocated, one or two pipeline stages started, then nothing: the writer died."""
    events = ["E22"] + ["E5"] * rng.choice((1, 1, 2, 2, 2))
    rng.shuffle(events)
    return events


def _anomalous_lifecycle(
    rng: Rng, *, p_delete: float = 0.97, p_replication: float = 0.0, prelude: str | None = None
) -> Events:
    """The normal lifecycle, with the read, verify and delete rates of real anomalous blocks."""
    return _lifecycle(
        rng, p_reads=0.34, p_verify=0.19, p_delete=p_delete, p_replication=p_replication,
        prelude=prelude,
    )


def _delete_missing(rng: Rng) -> Events:
    """A datanode is told to delete a replica it does not have (E20) among the deletes."""
    events = _anomalous_lifecycle(rng, p_replication=0.11)
    if "E21" not in events:
        events += _deletes()
    last = len(events) - 1 - events[::-1].index("E21")
    events.insert(last + rng.randint(-2, 1), "E20")
    return events


def _under_replicated(rng: Rng) -> Events:
    """A replica was lost; the namenode re-replicates and keeps or trims the extra copy."""
    opening = _write_open(rng)
    events = opening + _acks(rng, opening[0] == "E22") + _replicate_then_trim(rng)
    events += _reads(rng, 0.34, 0.19)
    if rng.random() < 0.97:
        events += _deletes(excess=0 if events[-1] == "E21" or rng.random() < 0.6 else 1)
    return events


def _orphan_add_stored(rng: Rng) -> Events:
    """A late block report re-adds a replica of a deleted file (E28, then E26)."""
    events = _anomalous_lifecycle(rng)
    if "E21" not in events:
        events += _deletes()
    events.insert(len(events) - 1, "E28")
    events.insert(len(events) - 1, "E26")
    return events


def _redundant_add_stored(rng: Rng) -> Events:
    """A datanode reports a replica the namenode already has (E27) after the updates."""
    events = _anomalous_lifecycle(rng)
    updates = [i for i, e in enumerate(events) if e == "E26"]
    events.insert(updates[rng.choice((-1, -2))] + 1, "E27")
    return events


def _empty_packets(rng: Rng) -> Events:
    """Each pipeline stage receives an empty packet (E13) before terminating."""
    return _anomalous_lifecycle(rng, prelude="E13")


_PIPELINE_FAILURES = (
    ["E11", "E10"], ["E7"], ["E14", "E7", "E8", "E11"], ["E12", "E14"], ["E7", "E11", "E10"],
)


def _pipeline_exception(rng: Rng) -> Events:
    """The write pipeline breaks (E7, E8, E10, E12, E14); sometimes the client recovers it
    (offset change E15, reopen E19, already existing block E1) and finishes the block."""
    events = _write_open(rng)
    for _ in range(rng.randint(1, 3)):
        events += rng.choice(_PIPELINE_FAILURES)
    if rng.random() < 0.5:
        return events
    for _ in range(rng.randint(1, 2)):
        events += ["E15", "E5"] + (["E19"] if rng.random() < 0.1 else [])
        events += (["E1"] if rng.random() < 0.15 else []) + ["E11", "E9", "E26"]
    events += ["E11", "E9", "E26"] + _replicate_then_trim(rng) + _deletes()
    return events


def _failed_transfer(rng: Rng) -> Events:
    """A re-replication attempt fails: the transfer's connection is reset (E17)."""
    events = _anomalous_lifecycle(rng, p_delete=0.0)
    events += ["E25", "E18", "E26", "E17"]
    if rng.random() < 0.5:
        events += _replicate_then_trim(rng) + _deletes()
    return events


def _replication_timeout(rng: Rng) -> Events:
    """A requested replication never completes (E29), so it is asked again."""
    events = _anomalous_lifecycle(rng, p_delete=0.0)
    events += ["E25", "E18", "E29"] + _replication(rng) + _deletes()
    return events


def _orphan_replication(rng: Rng) -> Events:
    """A block queued for replication turns out to belong to no file (E24)."""
    events = _anomalous_lifecycle(rng, p_delete=0.0)
    copy = _replication(rng)
    copy.insert(3, "E24")
    return events + copy + ["E21"] + _deletes()


# Share of each failure story among anomalies, from the real anomalous sessions.
_ANOMALIES: tuple[tuple[Callable[[Rng], Events], float], ...] = (
    (_abandoned_write, 0.365),
    (_delete_missing, 0.283),
    (_under_replicated, 0.18),
    (_orphan_add_stored, 0.072),
    (_redundant_add_stored, 0.057),
    (_empty_packets, 0.0295),
    (_pipeline_exception, 0.006),
    (_failed_transfer, 0.0027),
    (_replication_timeout, 0.001),
    (_orphan_replication, 0.0003),
)


def _anomalous(rng: Rng) -> Events:
    story = _choice(rng, _ANOMALIES)
    return story(rng)


def generate_events(n_normal: int, n_anomalous: int, seed: int = 0) -> list[tuple[Events, int]]:
    """Event-id sequences with labels, shuffled so position says nothing about the label."""
    if n_normal < 0 or n_anomalous < 0:
        raise ValueError(f"counts must be non-negative, got {n_normal} and {n_anomalous}")
    if n_normal + n_anomalous == 0:
        raise ValueError("asked for an empty data set (0 normal and 0 anomalous sessions)")
    rng = random.Random(seed)
    rows = [(_normal(rng), 0) for _ in range(n_normal)]
    rows += [(_anomalous(rng), 1) for _ in range(n_anomalous)]
    rng.shuffle(rows)
    return rows


def generate(n_normal: int, n_anomalous: int, seed: int = 0) -> Dataset:
    """A labeled synthetic HDFS data set, identical for identical arguments."""
    rows = generate_events(n_normal, n_anomalous, seed)
    sessions = tuple(
        Session(f"syn-{index:07d}", tuple(EVENT_TEMPLATES[e] for e in events))
        for index, (events, _) in enumerate(rows)
    )
    return Dataset("synthetic", sessions, tuple(label for _, label in rows))
