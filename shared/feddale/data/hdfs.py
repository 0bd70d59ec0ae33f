"""Importers for HDFS logs, and FedDALE's own prepared-import format.

Three ways in:

* the raw Loghub ``HDFS.log`` (+ ``anomaly_label.csv``): parsed line by line, messages grouped
  into one session per block id and masked;
* ``templates.csv`` + ``sessions.csv``: sessions given as event ids, rendered by template;
* ``sessions.jsonl``: masked sessions as FedDALE writes them after an import, so the 1.5 GB raw
  log is parsed once, not on every run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from feddale.data.types import Dataset, Session
from feddale.method.preprocess import mask, strip_header

log = logging.getLogger(__name__)

_BLOCK_ID = re.compile(r"blk_-?\d+")
_LABEL_NAMES = {"Normal": 0, "Anomaly": 1}
SESSIONS_JSONL = "sessions.jsonl"


@dataclass(frozen=True)
class RawLogParse:
    """Result of parsing a raw log: the sessions and what had to be skipped, and why."""

    sessions: tuple[Session, ...]
    lines: int
    malformed: int  # not in the Loghub HDFS line format
    without_block: int  # well formed, but naming no block, so in no session


def parse_raw_log(log_path: str | os.PathLike[str], progress: bool = False) -> RawLogParse:
    """Stream a Loghub ``HDFS.log``, grouping masked messages by block id.

    A line naming several blocks belongs to each of them. Sessions come in order of first
    appearance, messages in log order. The file is read line by line (the real one is 1.5 GB);
    identical masked messages share one string object, so memory grows with the number of
    lines times a pointer, not times the text.
    """
    path = Path(log_path)
    if not path.is_file():
        raise FileNotFoundError(f"raw log not found: {path}")
    grouped: dict[str, list[str]] = {}
    canonical: dict[str, str] = {}
    lines = malformed = without_block = 0
    with (
        path.open(encoding="utf-8", errors="replace") as handle,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=f"parsing {path.name}",
            disable=not progress,
        ) as bar,
    ):
        for raw in handle:
            bar.update(len(raw))
            if not raw.strip():
                continue
            lines += 1
            try:
                content = strip_header(raw)
            except ValueError:
                malformed += 1
                continue
            blocks = dict.fromkeys(_BLOCK_ID.findall(content))
            if not blocks:
                without_block += 1
                continue
            masked = mask(content)
            masked = canonical.setdefault(masked, masked)
            for block in blocks:
                grouped.setdefault(block, []).append(masked)
    sessions = tuple(Session(block, tuple(messages)) for block, messages in grouped.items())
    return RawLogParse(sessions, lines, malformed, without_block)


def read_block_labels(label_path: str | os.PathLike[str]) -> dict[str, int]:
    """Read Loghub's ``anomaly_label.csv`` (``BlockId,Label`` with Normal/Anomaly)."""
    path = Path(label_path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    labels: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"BlockId", "Label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header 'BlockId,Label', got {reader.fieldnames}")
        for row in reader:
            if row["Label"] not in _LABEL_NAMES:
                raise ValueError(
                    f"{path} line {reader.line_num}: label must be Normal or Anomaly, "
                    f"got {row['Label']!r}"
                )
            labels[row["BlockId"]] = _LABEL_NAMES[row["Label"]]
    if not labels:
        raise ValueError(f"{path}: no labels")
    return labels


def load_raw_log(
    log_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Dataset:
    """Load a raw Loghub HDFS log as a Dataset, labeled when ``label_path`` is given.

    Skipped lines are logged (warning) with their counts; use :func:`parse_raw_log` to get
    them as numbers.
    """
    parsed = parse_raw_log(log_path, progress=progress)
    if parsed.malformed or parsed.without_block:
        log.warning(
            "%s: skipped %d malformed lines and %d lines naming no block (of %d)",
            log_path, parsed.malformed, parsed.without_block, parsed.lines,
        )
    if not parsed.sessions:
        raise ValueError(
            f"{log_path}: no sessions found in {parsed.lines} lines "
            f"({parsed.malformed} malformed, {parsed.without_block} without a block id)"
        )
    if label_path is None:
        return Dataset("hdfs-raw", parsed.sessions, None)
    by_block = read_block_labels(label_path)
    missing = [s.id for s in parsed.sessions if s.id not in by_block]
    if missing:
        raise ValueError(
            f"{label_path} has no label for {len(missing)} blocks of {log_path}, "
            f"e.g. {missing[:3]}"
        )
    return Dataset("hdfs-raw", parsed.sessions, tuple(by_block[s.id] for s in parsed.sessions))


def _read_csv(path: Path, required: set[str]) -> Iterator[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not required <= columns:
            raise ValueError(f"{path}: missing columns {sorted(required - columns)}")
        for row in reader:
            yield reader.line_num, row


def load_event_csv(directory: str | os.PathLike[str]) -> Dataset:
    """Load ``templates.csv`` (event_id,template) + ``sessions.csv`` (session_id,events[,label]).

    Each event id is rendered by its template. Labels are read when the ``label`` column is
    present and filled for every row; a column left empty everywhere means unlabeled data.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    templates: dict[str, str] = {}
    for line, row in _read_csv(folder / "templates.csv", {"event_id", "template"}):
        if row["event_id"] in templates:
            raise ValueError(f"templates.csv line {line}: duplicate event id {row['event_id']!r}")
        templates[row["event_id"]] = row["template"]
    if not templates:
        raise ValueError(f"{folder / 'templates.csv'}: no templates")

    sessions: list[Session] = []
    raw_labels: list[str] = []
    seen: set[str] = set()
    for line, row in _read_csv(folder / "sessions.csv", {"session_id", "events"}):
        session_id = row["session_id"]
        if session_id in seen:
            raise ValueError(f"sessions.csv line {line}: duplicate session id {session_id!r}")
        seen.add(session_id)
        events = row["events"].split()
        if not events:
            raise ValueError(f"sessions.csv line {line}: session {session_id!r} has no events")
        unknown = sorted(set(events) - templates.keys())
        if unknown:
            raise ValueError(
                f"sessions.csv line {line}: unknown event ids {unknown} in session "
                f"{session_id!r} (templates.csv defines {len(templates)})"
            )
        sessions.append(Session(session_id, tuple(templates[e] for e in events)))
        raw_labels.append((row.get("label") or "").strip())
    if not sessions:
        raise ValueError(f"{folder / 'sessions.csv'}: no sessions")
    return Dataset("hdfs-csv", tuple(sessions), _parse_label_column(raw_labels, folder))


def _parse_label_column(raw: list[str], folder: Path) -> tuple[int, ...] | None:
    if not any(raw):
        return None
    bad = sorted({value for value in raw if value not in ("0", "1")})
    if bad:
        raise ValueError(
            f"{folder / 'sessions.csv'}: labels must be 0 or 1 on every row, found {bad[:5]}"
        )
    return tuple(int(value) for value in raw)


def write_sessions_jsonl(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write a dataset as ``{"id", "messages", "label"}`` lines, atomically (temp + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    labels = dataset.labels or (None,) * len(dataset.sessions)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.", delete=False
    )
    try:
        with handle:
            for session, label in zip(dataset.sessions, labels):
                record = {"id": session.id, "messages": list(session.messages), "label": label}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return target


def load_sessions_jsonl(path: str | os.PathLike[str], name: str = "hdfs-jsonl") -> Dataset:
    """Read what :func:`write_sessions_jsonl` wrote (``path`` may be the file or its folder)."""
    source = Path(path)
    if source.is_dir():
        source = source / SESSIONS_JSONL
    if not source.is_file():
        raise FileNotFoundError(f"sessions file not found: {source}")
    sessions: list[Session] = []
    labels: list[int | None] = []
    with source.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                session = Session(record["id"], tuple(record["messages"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{source} line {number}: bad session record ({error})") from None
            sessions.append(session)
            labels.append(record.get("label"))
    if not sessions:
        raise ValueError(f"{source}: no sessions")
    if len({s.id for s in sessions}) != len(sessions):
        raise ValueError(f"{source}: duplicate session ids")
    if all(label is None for label in labels):
        return Dataset(name, tuple(sessions), None)
    if any(label is None for label in labels):
        raise ValueError(f"{source}: some sessions have labels and some do not")
    return Dataset(name, tuple(sessions), tuple(labels))  # type: ignore[arg-type]
