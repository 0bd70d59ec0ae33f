"""Parsed lines into sessions, by a key in the message or by time window.

* ``key``: every distinct match of the key regex in a line's Content (its first group, when it
  has one) names a session the line belongs to; a line naming several (an HDFS namenode line
  about two blocks) belongs to each, as in :func:`feddale.data.hdfs.parse_raw_log`. With
  ``idle_seconds``, a key that comes back after that long without a line starts a new session
  (``KEY#2``, ``KEY#3``, ...).
* ``window``: per value of the ``by`` field (or one series), consecutive windows of
  ``seconds``; the session id is ``VALUE@START`` with START the window's start (UTC, ISO 8601).

Sessions come out in order of their first line, their messages in log order: the same as the
``hdfs-raw`` path, so a raw HDFS log grouped here reads exactly as it does there. Lines that
end up in no session are counted by reason, never dropped silently.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

from feddale.data.types import Dataset, Session
from feddale.ingest.parsing import ParsedLine
from feddale.ingest.sources import Source

NO_KEY = "no_key"
NO_TIME = "no_time"


def line_keys(source: Source, line: ParsedLine) -> list[str]:
    """The distinct session keys a line's Content names under a key source, in order (empty: none).

    Shared by the batch builder here, a client node's store and the detector's open sessions,
    so a line belongs to the same sessions wherever it is grouped.
    """
    pattern = source.key_pattern
    if pattern is None:
        raise ValueError(f"source {source.name!r} groups by window, not by key")
    return list(dict.fromkeys(
        found.group(1) if pattern.groups else found.group(0) for found in pattern.finditer(line.content)
    ))


def window_id(source: Source, line: ParsedLine, moment: float) -> str:
    """The id of the window session a line at ``moment`` (seconds, UTC) falls in: ``VALUE@START``."""
    window = source.window
    if window is None:
        raise ValueError(f"source {source.name!r} groups by key, not by window")
    start = math.floor(moment / window.seconds) * window.seconds
    when = datetime.fromtimestamp(start, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    if window.by is None:
        return when
    return f"{(line.fields or {}).get(window.by, '')}@{when}"


def line_time(source: Source, line: ParsedLine) -> float | None:
    """The line's time from the source's timestamp fields (None: no timestamp, or unreadable)."""
    stamp = source.timestamp
    return stamp.parse(line.fields or {}) if stamp is not None else None


@dataclass
class _Open:
    id: str
    messages: list[str] = field(default_factory=list)
    last_time: float | None = None
    anomalous: bool = False


class SessionBuilder:
    """Collects parsed lines into sessions as the source says; ``dataset()`` at the end.

    ``labels`` maps a session key (before any ``#N`` suffix) to 0/1, e.g. from Loghub's
    ``anomaly_label.csv``; a source's ``label_field`` labels sessions from the lines instead
    (anomalous when any line's label differs from ``normal_label``). Labels are for evaluation
    only and travel in the jsonl file's ``label`` field.
    """

    def __init__(self, source: Source, labels: dict[str, int] | None = None) -> None:
        if labels is not None and source.label_field is not None:
            raise ValueError(f"source {source.name!r} labels sessions from {source.label_field}; "
                             "a label file would contradict it")
        if source.key_pattern is None and source.window is None:
            raise ValueError(
                f"source {source.name!r} says nothing about sessions: give it a key (regex) "
                "or a window ({by: FIELD, seconds: N})"
            )
        self.source = source
        self._labels = labels
        self._sessions: list[_Open] = []
        self._open: dict[str, _Open] = {}
        self._occurrences: Counter[str] = Counter()
        self._keys: dict[str, str] = {}  # session id -> key, for the label file
        self.counts: Counter[str] = Counter()

    def add(self, line: ParsedLine) -> None:
        """Put one parsed line into its session(s); unparsed lines are the caller's to count."""
        if line.fields is None or line.masked is None:
            return
        if self.source.key_pattern is not None:
            self._add_by_key(line)
        else:
            self._add_by_window(line)

    def _time(self, line: ParsedLine) -> float | None:
        return line_time(self.source, line)

    def _anomalous(self, line: ParsedLine) -> bool:
        name = self.source.label_field
        return name is not None and (line.fields or {}).get(name) != self.source.normal_label

    def _add_by_key(self, line: ParsedLine) -> None:
        keys = line_keys(self.source, line)
        if not keys:
            self.counts[NO_KEY] += 1
            return
        moment = self._time(line) if self.source.idle_seconds is not None else None
        for key in keys:
            session = self._open.get(key)
            idle = self.source.idle_seconds
            if (
                session is not None and idle is not None and moment is not None
                and session.last_time is not None and moment - session.last_time > idle
            ):
                session = None
            if session is None:
                self._occurrences[key] += 1
                number = self._occurrences[key]
                session = self._start(key if number == 1 else f"{key}#{number}")
                self._open[key] = session
                self._keys[session.id] = key
            self._append(session, line, moment)
        self.counts["grouped"] += 1

    def _add_by_window(self, line: ParsedLine) -> None:
        moment = self._time(line)
        if moment is None:
            self.counts[NO_TIME] += 1
            return
        session_id = window_id(self.source, line, moment)
        session = self._open.get(session_id)
        if session is None:
            session = self._open[session_id] = self._start(session_id)
        self._append(session, line, moment)
        self.counts["grouped"] += 1

    def _start(self, session_id: str) -> _Open:
        session = _Open(session_id)
        self._sessions.append(session)
        return session

    def _append(self, session: _Open, line: ParsedLine, moment: float | None) -> None:
        assert line.masked is not None
        session.messages.append(line.masked)
        session.anomalous = session.anomalous or self._anomalous(line)
        if moment is not None:
            session.last_time = moment

    def dataset(self, name: str | None = None) -> Dataset:
        """The sessions so far as a Dataset, labeled when labels are known for every session."""
        sessions = tuple(Session(s.id, tuple(s.messages)) for s in self._sessions)
        labels: tuple[int, ...] | None = None
        if self.source.label_field is not None:
            labels = tuple(int(s.anomalous) for s in self._sessions)
        elif self._labels is not None:
            missing = [s.id for s in self._sessions if self._keys.get(s.id, s.id) not in self._labels]
            if missing:
                raise ValueError(f"the label file has no label for {len(missing)} sessions, e.g. {missing[:3]}")
            labels = tuple(self._labels[self._keys.get(s.id, s.id)] for s in self._sessions)
        return Dataset(name or self.source.name, sessions, labels)

    def summary(self) -> str:
        """One line: sessions made, lines grouped, lines in no session and why."""
        skipped = ", ".join(
            f"{self.counts[r]} {text}" for r, text in ((NO_KEY, "without a key"), (NO_TIME, "without a readable time"))
            if self.counts[r]
        )
        text = f"{len(self._sessions)} sessions from {self.counts['grouped']} lines"
        return text + (f"; in no session: {skipped}" if skipped else "")
