"""A client node's own sessions, built line by line from the files it follows, bounded in size.

Unlike :class:`feddale.ingest.sessions.SessionBuilder` (one batch of files, everything kept),
this lives as long as the node: lines arrive poll by poll, a session may span many polls, and
memory and disk stay bounded however long the logs run. What is kept is only the *masked*
messages (no raw line is ever stored), grouped exactly as the batch builder groups them
(:func:`~feddale.ingest.sessions.line_keys`, :func:`~feddale.ingest.sessions.window_id`).

Bounds: at most ``max_sessions`` sessions (the least recently extended go first) and
``max_messages`` messages per session (later lines of a longer session are dropped; the model
reads a bounded window of a session anyway). Both are counted, never silent.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from pydantic import BaseModel, Field

from feddale.data.types import Session
from feddale.ingest.parsing import ParsedLine
from feddale.ingest.sessions import NO_KEY, NO_TIME, line_keys, line_time, window_id
from feddale.ingest.sources import Source

# About a cpu-profile shard (data.max_client_sessions 4000) with room to spare; the store is
# rewritten whole after each poll that changed it, so these also bound that write.
MAX_SESSIONS = 5000
MAX_MESSAGES = 512


class StoredSession(BaseModel):
    """One session as kept on disk: its id, the key it came from, masked messages, last log time."""

    id: str
    key: str
    messages: list[str] = Field(default_factory=list)
    last_time: float | None = None


class StoreState(BaseModel):
    """Everything a store needs to continue after a restart (saved with the follower's offsets)."""

    sessions: list[StoredSession] = Field(default_factory=list)  # least recently extended first
    occurrences: dict[str, int] = Field(default_factory=dict)  # key -> sessions it has had (KEY#N)
    counts: dict[str, int] = Field(default_factory=dict)


class SessionStore:
    """Groups parsed lines of one source into a bounded set of sessions."""

    def __init__(self, source: Source, max_sessions: int = MAX_SESSIONS, max_messages: int = MAX_MESSAGES) -> None:
        if max_sessions < 1 or max_messages < 1:
            raise ValueError("a session store keeps at least one session of one message")
        if source.key_pattern is None and source.window is None:
            raise ValueError(f"source {source.name!r} says nothing about sessions: give it a key or a window")
        self.source = source
        self.max_sessions, self.max_messages = max_sessions, max_messages
        self._sessions: OrderedDict[str, StoredSession] = OrderedDict()
        self._current: dict[str, str] = {}  # key -> id of its open session
        self._occurrences: dict[str, int] = {}
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, line: ParsedLine) -> None:
        """Put one parsed line into its session(s); unparsed lines are the caller's to count."""
        if line.masked is None:
            return
        moment = line_time(self.source, line)
        if self.source.key_pattern is not None:
            keys = line_keys(self.source, line)
            if not keys:
                self.counts[NO_KEY] += 1
                return
            for key in keys:
                self._append(self._by_key(key, moment), line.masked, moment)
        else:
            if moment is None:
                self.counts[NO_TIME] += 1
                return
            session_id = window_id(self.source, line, moment)
            session = self._sessions.get(session_id) or self._start(session_id, session_id)
            self._append(session, line.masked, moment)
        self.counts["grouped"] += 1

    def _by_key(self, key: str, moment: float | None) -> StoredSession:
        session = self._sessions.get(self._current.get(key, ""))
        idle = self.source.idle_seconds
        if (session is not None and idle is not None and moment is not None and session.last_time is not None
                and moment - session.last_time > idle):
            session = None
        if session is None:
            number = self._occurrences.get(key, 0) + 1
            self._occurrences[key] = number
            session = self._start(key if number == 1 else f"{key}#{number}", key)
            self._current[key] = session.id
        return session

    def _start(self, session_id: str, key: str) -> StoredSession:
        session = self._sessions[session_id] = StoredSession(id=session_id, key=key)
        self.counts["sessions"] += 1
        while len(self._sessions) > self.max_sessions:
            _, old = self._sessions.popitem(last=False)
            if self._current.get(old.key) == old.id:
                del self._current[old.key]
                self._occurrences.pop(old.key, None)
            self.counts["evicted"] += 1
        return session

    def _append(self, session: StoredSession, message: str, moment: float | None) -> None:
        if len(session.messages) < self.max_messages:
            session.messages.append(message)
        else:
            self.counts["dropped_messages"] += 1
        if moment is not None:
            session.last_time = moment
        self._sessions.move_to_end(session.id)

    def sessions(self) -> tuple[Session, ...]:
        """What the store holds now, oldest first by last extension."""
        return tuple(Session(s.id, tuple(s.messages)) for s in self._sessions.values() if s.messages)

    def state(self) -> StoreState:
        """The store's content to save; it shares the sessions, so serialise it before the next ``add``."""
        return StoreState(sessions=list(self._sessions.values()), occurrences=dict(self._occurrences),
                          counts=dict(self.counts))

    def restore(self, state: StoreState) -> None:
        """Continue from a saved :meth:`state`."""
        self._sessions = OrderedDict((s.id, s) for s in state.sessions)
        self._occurrences = dict(state.occurrences)
        self._current = {}
        for session in self._sessions.values():  # the latest session of each key is its open one
            self._current[session.key] = session.id
        self.counts = Counter(state.counts)
