"""Render HDFS event sequences (``sessions.csv`` + ``templates.csv``) as a raw ``HDFS.log``.

The event-sequence data has no raw text, so the raw-log path (``feddale logs sessions``, client
nodes following files, the detector fed lines) could not be measured against the
event-sequence path on the same sessions. This writes the raw log those sessions could have
come from, in the shape of Loghub's ``HDFS.log``:

* one line per event, ``YYMMDD HHMMSS THREAD LEVEL COMPONENT: CONTENT``, with the level and
  component each event has in the real log (``INFO dfs.DataNode$PacketResponder``, ...);
* every session a block with its own random 64-bit id (``blk_-1608999687919862906``), three
  datanodes from a pool of ``10.250.x.y``/``10.251.x.y`` addresses, client ports, block sizes,
  task paths as in the real allocations;
* sessions interleaved in time: blocks start a fraction of a second apart, the write pipeline
  follows within seconds, reads, verifications and deletions minutes to hours later, as in the
  real log. Within a session the events keep their order.
* a block's first line is its start, so blocks first appear in the log in the order of
  ``sessions.csv``; grouping the log (sessions come out in order of their first line) gives
  the sessions back in that order, with the same labels, so ``federation_split`` draws the
  same sessions for every part from either (``scripts/check_raw_split.py``).

Next to it go ``anomaly_label.csv`` (``BlockId,Label`` with ``Normal``/``Anomaly``, when the
sessions are labeled) and ``blocks.csv`` (``session_id,BlockId``), which ties each block back
to its event sequence. Each rendered message masks back to exactly its template
(``tests/test_ingest_render_hdfs.py`` checks all 29), so grouping the log with
``--preset hdfs`` gives the same session texts as ``hdfs-csv`` does.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from feddale.data.synthetic import EVENT_TEMPLATES
from feddale.method.preprocess import WILDCARD

_START = datetime(2008, 11, 9, 20, 35, 18)  # where the real HDFS_v1 log begins
_NAMENODE = "dfs.FSNamesystem"
# Per template (the 29 of HDFS_v1, by Loghub id): level, component, and what each <*> holds.
_EVENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "E1": ("WARN", "dfs.DataNode", ("node", "blk")),
    "E2": ("INFO", "dfs.DataBlockScanner", ("blk",)),
    "E3": ("INFO", "dfs.DataNode$DataXceiver", ("node", "blk", "ip")),
    "E4": ("WARN", "dfs.DataNode$DataXceiver", ("node", "blk", "ip")),
    "E5": ("INFO", "dfs.DataNode$DataXceiver", ("blk", "client", "node")),
    "E6": ("INFO", "dfs.DataNode$DataXceiver", ("blk", "client", "node", "size")),
    "E7": ("INFO", "dfs.DataNode$DataXceiver", ("blk",)),
    "E8": ("INFO", "dfs.DataNode$PacketResponder", ("responder", "blk")),
    "E9": ("INFO", "dfs.DataNode$PacketResponder", ("blk", "size", "ip")),
    "E10": ("INFO", "dfs.DataNode$PacketResponder", ("blk", "responder", "node")),
    "E11": ("INFO", "dfs.DataNode$PacketResponder", ("responder", "blk")),
    "E12": ("INFO", "dfs.DataNode$DataXceiver", ("node", "blk", "other")),
    "E13": ("INFO", "dfs.DataNode$BlockReceiver", ("blk",)),
    "E14": ("INFO", "dfs.DataNode$BlockReceiver", ("blk",)),
    "E15": ("INFO", "dfs.DataNode$BlockReceiver", ("blk", "offset", "offset", "offset")),
    "E16": ("INFO", "dfs.DataNode$DataTransfer", ("node", "blk", "other")),
    "E17": ("WARN", "dfs.DataNode", ("node", "blk", "other")),
    "E18": ("INFO", "dfs.DataNode", ("node", "blk", "other")),
    "E19": ("INFO", "dfs.FSDataset", ("blk",)),
    "E20": ("WARN", "dfs.FSDataset", ("blk",)),
    "E21": ("INFO", "dfs.FSDataset", ("blk", "data_path")),
    "E22": ("INFO", _NAMENODE, ("task_path", "blk")),
    "E23": ("INFO", _NAMENODE, ("blk", "node")),
    "E24": ("INFO", _NAMENODE, ("blk",)),
    "E25": ("INFO", _NAMENODE, ("node", "blk", "other")),
    "E26": ("INFO", _NAMENODE, ("node", "blk", "size")),
    "E27": ("WARN", _NAMENODE, ("blk", "node", "size")),
    "E28": ("WARN", _NAMENODE, ("blk", "node", "size")),
    "E29": ("WARN", "dfs.PendingReplicationMonitor", ("blk",)),
}
# Events that happen long after the write (reads, checks, deletion), not within the pipeline.
_LATE = {"E2", "E3", "E4", "E20", "E21", "E23", "E29"}
_BLOCK_SIZE = 67108864


@dataclass(frozen=True)
class Rendered:
    """What render_hdfs wrote."""

    log: Path
    labels: Path | None
    blocks: Path
    lines: int
    sessions: int


class _Block:
    """The values one block's lines share: its id, datanodes, client, size and file."""

    def __init__(self, rng: random.Random, block_id: int, nodes: list[str], job: int, part: int) -> None:
        self.id = str(block_id)
        self.nodes = rng.sample(nodes, 4)  # three replicas and a spare for re-replication
        self.client_port = rng.randrange(32768, 61000)
        self.size = _BLOCK_SIZE if rng.random() < 0.8 else rng.randrange(1024, _BLOCK_SIZE)
        self.task = f"user/root/rand{job % 7}/_temporary/_task_200811092030_{job:04d}_m_{part:06d}_0/part-{part:05d}."
        self.subdir = rng.randrange(0, 64)
        self.rng = rng

    def value(self, kind: str, index: int) -> str:
        node = self.nodes[index % 3]
        values = {
            "blk": self.id,
            "node": f"{node}:50010",
            "other": f"{self.nodes[3]}:50010",
            "ip": node,
            "client": f"{self.nodes[0]}:{self.client_port}",
            "size": str(self.size),
            "responder": str(self.rng.randrange(0, 3)),
            "offset": str(self.rng.randrange(0, self.size)),
            "data_path": f"mnt/hadoop/dfs/data/current/subdir{self.subdir}/blk_{self.id}",
            "task_path": self.task,
        }
        return values[kind]


def render_message(event: str, block: _Block, index: int) -> str:
    """One event's message for ``block`` (``index``: the event's position, to vary the replica)."""
    template = EVENT_TEMPLATES[event]
    kinds = _EVENTS[event][2]
    pieces = template.split(WILDCARD)
    if len(pieces) != len(kinds) + 1:
        raise AssertionError(f"{event}: {len(kinds)} value kinds for {len(pieces) - 1} wildcards")
    out = [pieces[0]]
    for kind, piece in zip(kinds, pieces[1:]):
        out.append(block.value(kind, index))
        out.append(piece)
    return "".join(out)


def _read_templates(path: Path) -> dict[str, str]:
    """Map the file's event ids to the Loghub ids whose template text they carry."""
    by_text = {text: event for event, text in EVENT_TEMPLATES.items()}
    mapping: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"event_id", "template"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header 'event_id,template'")
        for row in reader:
            event = by_text.get(row["template"])
            if event is None:
                raise ValueError(
                    f"{path}: cannot render template {row['template']!r}; render-hdfs knows the "
                    "29 HDFS_v1 templates"
                )
            mapping[row["event_id"]] = event
    return mapping


def _read_sessions(path: Path, events: dict[str, str], limit: int | None) -> list[tuple[str, list[str], str]]:
    sessions = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"session_id", "events"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns session_id,events[,label]")
        for row in reader:
            if limit is not None and len(sessions) >= limit:
                break
            ids = row["events"].split()
            unknown = sorted(set(ids) - events.keys())
            if unknown or not ids:
                raise ValueError(f"{path} line {reader.line_num}: unknown or no event ids {unknown}")
            sessions.append((row["session_id"], [events[e] for e in ids], (row.get("label") or "").strip()))
    if not sessions:
        raise ValueError(f"{path}: no sessions")
    return sessions


def render_hdfs(directory: Path, out: Path, limit: int | None = None, seed: int = 0) -> Rendered:
    """Write ``out/HDFS.log`` (+ ``anomaly_label.csv``, ``blocks.csv``) for the sessions in
    ``directory``; ``limit`` renders only the first N sessions. Seeded, so reproducible."""
    if not directory.is_dir():
        raise FileNotFoundError(f"not a folder: {directory}")
    for name in ("templates.csv", "sessions.csv"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"missing {name} in {directory}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    sessions = _read_sessions(directory / "sessions.csv", _read_templates(directory / "templates.csv"), limit)
    rng = random.Random(seed)
    nodes = sorted({f"10.{rng.choice((250, 251))}.{rng.randrange(1, 256)}.{rng.randrange(1, 255)}" for _ in range(400)})
    lines: list[tuple[float, int, int, str]] = []  # (time, session, event index, line)
    used: set[int] = set()
    started = 0.0
    blocks: list[tuple[str, str, str]] = []
    for number, (session_id, events, label) in enumerate(sessions):
        started += rng.expovariate(4.0)  # about four new blocks a second, as in HDFS_v1
        block_id = rng.randrange(-(1 << 63), 1 << 63)
        while block_id in used:
            block_id = rng.randrange(-(1 << 63), 1 << 63)
        used.add(block_id)
        block = _Block(rng, block_id, nodes, job=number // 500 + 1, part=number % 100_000)
        blocks.append((session_id, f"blk_{block.id}", label))
        moment = started
        for index, event in enumerate(events):
            if index:  # the first event is the block's start, so blocks first appear in file order
                moment += rng.expovariate(1 / 1800) if event in _LATE else rng.expovariate(2.0)
            level, component, _ = _EVENTS[event]
            thread = rng.randrange(19, 36) if component == _NAMENODE else rng.randrange(1, 30000)
            stamp = (_START + timedelta(seconds=moment)).strftime("%y%m%d %H%M%S")
            line = f"{stamp} {thread} {level} {component}: {render_message(event, block, index)}"
            lines.append((moment, number, index, line))
    lines.sort()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "HDFS.log"
    with log.open("w", encoding="utf-8") as handle:
        for *_, line in lines:
            handle.write(line + "\n")
    with (out / "blocks.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["session_id", "BlockId"])
        writer.writerows((s, b) for s, b, _ in blocks)
    labels = None
    if all(label in ("0", "1") for _, _, label in blocks):
        labels = out / "anomaly_label.csv"
        with labels.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["BlockId", "Label"])
            writer.writerows((b, "Anomaly" if label == "1" else "Normal") for _, b, label in blocks)
    return Rendered(log, labels, out / "blocks.csv", len(lines), len(sessions))
