"""A client node's raw logs: the files of a sources file, followed into bounded session stores.

One :class:`FollowedSource` per source of ``FEDDALE_SOURCES``: a :class:`FileFollower` reads new
lines, a :class:`LineParser` masks them, a :class:`SessionStore` groups them. After each poll
the follower's offsets and the store's sessions are written together, atomically, to
``STATE_DIR/raw-logs/NAME.json``, so a node killed at any moment restarts where its last
saved poll ended: no line is lost or counted twice. The files hold masked messages only.

A node trains on :meth:`RawLogs.sessions` at the start of each run; nothing here talks to the
network, and nothing raw leaves the node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from feddale.data.types import Session
from feddale.files import atomic_write
from feddale.ingest.catalog import SourceEntry, load_sources
from feddale.ingest.follow import FileFollower, TrackedFile
from feddale.ingest.parsing import LineParser
from feddale.ingest.store import SessionStore, StoreState

log = logging.getLogger(__name__)

POLL_BUDGET = 200_000  # lines per source and poll, so a large backlog never holds the lock for long


class SavedSource(BaseModel):
    """The state file of one followed source."""

    source_digest: str  # the source's settings: a changed source starts over, grouped anew
    files: list[TrackedFile] = Field(default_factory=list)
    store: StoreState = Field(default_factory=StoreState)
    parse_counts: dict[str, int] = Field(default_factory=dict)


def _digest(entry: SourceEntry) -> str:
    settings = entry.source.model_dump(mode="json")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class FollowedSource:
    """One source's files, parser and session store, saved as one file after each poll."""

    def __init__(self, entry: SourceEntry, state_dir: Path | None) -> None:
        self.entry = entry
        self.name = entry.source.name
        self.follower = FileFollower(entry.paths)
        self.parser = LineParser(entry.source)
        self.store = SessionStore(entry.source, max_sessions=entry.max_sessions)
        self.path = state_dir / "raw-logs" / f"{self.name}.json" if state_dir else None
        self._digest = _digest(entry)
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            saved = SavedSource.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError) as error:
            log.warning("%s: unreadable raw-log state (%s); reading the files again from the start",
                        self.path, str(error).splitlines()[0])
            return
        if saved.source_digest != self._digest:
            log.warning("source %s changed since %s was saved; reading its files again from the start",
                        self.name, self.path)
            return
        self.follower.files = saved.files
        self.store.restore(saved.store)
        self.parser.counts.update(saved.parse_counts)

    def poll(self, budget: int = POLL_BUDGET) -> int:
        """Read and group the new lines (at most ``budget``), then save; the number of lines read."""
        before = self._positions()
        read = 0
        for raw in self.follower.poll(budget):
            self.store.add(self.parser.parse(raw))
            read += 1
        if read or self._positions() != before:
            self.save()
        return read

    def _positions(self) -> list[dict[str, object]]:
        return [f.model_dump(exclude={"seen"}) for f in self.follower.files]

    def save(self) -> None:
        if self.path is None:
            return
        saved = SavedSource(source_digest=self._digest, files=self.follower.files, store=self.store.state(),
                            parse_counts=dict(self.parser.counts))
        atomic_write(self.path, saved.model_dump_json())

    def summary(self) -> dict[str, Any]:
        """What the node's status shows: sessions held, lines read, what could not be used."""
        store = self.store.counts
        return {
            "sessions": len(self.store), "files": len(self.follower.files), "lines": self.parser.lines,
            "unparsed": self.parser.unparsed, "in_no_session": store["no_key"] + store["no_time"],
            "evicted_sessions": store["evicted"], "dropped_messages": store["dropped_messages"],
        }


class RawLogs:
    """All sources of a node's sources file; thread-safe between the poller and the agent."""

    def __init__(self, entries: list[SourceEntry], state_dir: Path | None = None) -> None:
        missing = [e.source.name for e in entries if not e.paths]
        if missing:
            raise ValueError(f"source(s) {missing} name no paths to follow (paths: [/var/log/app/*.log])")
        self.sources = [FollowedSource(entry, state_dir) for entry in entries]
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, state_dir: Path | None = None) -> RawLogs:
        return cls(load_sources(path), state_dir)

    def poll(self) -> int:
        """One pass over every source's files; returns the lines read."""
        with self._lock:
            return sum(source.poll() for source in self.sources)

    def sessions(self) -> tuple[Session, ...]:
        """The sessions held now; ids carry the source name when there are several sources."""
        with self._lock:
            if len(self.sources) == 1:
                return self.sources[0].store.sessions()
            return tuple(Session(f"{source.name}/{s.id}", s.messages)
                         for source in self.sources for s in source.store.sessions())

    def summary(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {source.name: source.summary() for source in self.sources}

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Poll until ``stop``; a failing poll is logged and retried, never ends the node."""
        while not stop.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("reading the raw logs failed; retrying in %.0f s", interval_s)
            stop.wait(interval_s)
