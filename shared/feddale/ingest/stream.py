"""Open sessions of streamed lines: lines arrive one by one, a session closes when it is done.

A detector fed a stream (OpenTelemetry logs) cannot wait for the end of a file: it keeps the
sessions that are still growing, per source and session id (the same ids
:class:`~feddale.ingest.sessions.SessionBuilder` gives), and hands a session out for scoring
when it closes:

* ``idle``: no new line for ``idle_s`` seconds (by the receiver's clock: streamed lines may
  come late or out of order, the arrival time is what says a session went quiet);
* ``max_lines``: it reached ``max_lines`` lines; a later line of the same id opens a new one;
* ``evicted``: more than ``max_open`` sessions are open, or their messages hold more than
  ``max_chars`` characters; the least recently extended is closed early, scored like any other
  and counted, so memory stays bounded under any traffic and nothing is dropped unseen.

Not thread-safe on its own: the caller holds one lock around it.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from feddale.ingest.parsing import ParsedLine
from feddale.ingest.sessions import NO_KEY, NO_TIME, line_keys, line_time, window_id
from feddale.ingest.sources import Source

IDLE = "idle"
MAX_LINES = "max_lines"
EVICTED = "evicted"
FLUSHED = "flushed"


@dataclass(frozen=True)
class ClosedSession:
    """A session ready to be scored, and why it closed."""

    source: str
    id: str
    messages: tuple[str, ...]
    reason: str
    opened_at: float  # wall-clock seconds (time.time), for reports
    closed_at: float


@dataclass
class _Open:
    source: str
    id: str
    opened_at: float
    last_seen: float  # the clock's time of the last line
    messages: list[str] = field(default_factory=list)
    chars: int = 0


class OpenSessions:
    """Streamed parsed lines into sessions that close by idleness, length or eviction."""

    def __init__(self, *, idle_s: float, max_lines: int, max_open: int, max_chars: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if idle_s <= 0 or max_lines < 1 or max_open < 1 or max_chars < 1:
            raise ValueError("idle_s must be positive, max_lines, max_open and max_chars at least 1")
        self.idle_s, self.max_lines, self.max_open, self.max_chars = idle_s, max_lines, max_open, max_chars
        self.clock = clock
        self._open: OrderedDict[tuple[str, str], _Open] = OrderedDict()  # least recently extended first
        self._chars = 0
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, source: Source, line: ParsedLine) -> list[ClosedSession]:
        """Put one parsed line into its session(s); returns the sessions this closed."""
        if line.masked is None:
            return []
        ids = self._ids(source, line)
        closed: list[ClosedSession] = []
        now = self.clock()
        for session_id in ids:
            key = (source.name, session_id)
            session = self._open.get(key)
            if session is None:
                session = self._open[key] = _Open(source.name, session_id, time.time(), now)
            session.messages.append(line.masked)
            session.chars += len(line.masked)
            session.last_seen = now
            self._chars += len(line.masked)
            self._open.move_to_end(key)
            if len(session.messages) >= self.max_lines:
                closed.append(self._close(key, MAX_LINES))
        while self._open and (len(self._open) > self.max_open or self._chars > self.max_chars):
            closed.append(self._close(next(iter(self._open)), EVICTED))
        return closed

    def _ids(self, source: Source, line: ParsedLine) -> list[str]:
        if source.key_pattern is not None:
            keys = line_keys(source, line)
            if not keys:
                self.counts[NO_KEY] += 1
            return keys
        moment = line_time(source, line)
        if moment is None:
            self.counts[NO_TIME] += 1
            return []
        return [window_id(source, line, moment)]

    def expire(self) -> list[ClosedSession]:
        """Close the sessions idle for ``idle_s`` or more."""
        limit = self.clock() - self.idle_s
        closed = []
        while self._open:
            key, session = next(iter(self._open.items()))
            if session.last_seen > limit:
                break
            closed.append(self._close(key, IDLE))
        return closed

    def flush(self) -> list[ClosedSession]:
        """Close every open session now (shutdown, tests)."""
        return [self._close(key, FLUSHED) for key in list(self._open)]

    def _close(self, key: tuple[str, str], reason: str) -> ClosedSession:
        session = self._open.pop(key)
        self._chars -= session.chars
        self.counts[reason] += 1
        return ClosedSession(session.source, session.id, tuple(session.messages), reason,
                             session.opened_at, time.time())
