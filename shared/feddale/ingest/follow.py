"""Following log files as they grow: globs, appends, rotation by rename, ``.gz`` archives.

A file is known by its *fingerprint*, a hash of its first bytes (decompressed for ``.gz``),
not by its name or inode, as the OpenTelemetry Collector's filelog receiver does. That one
rule covers what logrotate does to a file:

* appended to: the same fingerprint, read on from the saved offset;
* renamed (``app.log`` -> ``app.log.1``) while a new ``app.log`` starts: the old content keeps
  its fingerprint under the new name and is read on from its offset; the new file is new;
* compressed later (``app.log.1`` -> ``app.log.1.gz``): the archive decompresses to the same
  first bytes, so what was read is not read again;
* truncated in place (copytruncate): the offset lies past the end, so it is read from the start.

Only complete lines are handed out; a plain file's last line without its newline waits for
the next poll (a writer may be halfway through it), an archive's counts as complete. The
state (:class:`TrackedFile`) is plain data the caller saves together with what it made of
the lines, so a crash between the two never skips or repeats a line.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import BinaryIO

from pydantic import BaseModel

from feddale.ingest.reader import MAX_LINE_BYTES, RawLine

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 1024
MAX_TRACKED = 4096  # files remembered; the least recently seen are forgotten beyond this
_READ_ERRORS = (OSError, EOFError, zlib.error)


class TrackedFile(BaseModel):
    """What is known about one file's content: its fingerprint and how far it was read."""

    fingerprint: str  # sha256 (hex) of the first `length` bytes
    length: int  # bytes the fingerprint covers; below FINGERPRINT_BYTES while the file is short
    offset: int = 0  # bytes consumed (decompressed, for .gz)
    lines: int = 0  # lines handed out so far
    path: str  # where it was last seen
    seen: float = 0.0
    skipping: bool = False  # inside an over-long line: skip to its end
    done: bool = False  # an archive read to its end (archives do not grow)
    broken: str | None = None  # why it cannot be read (binary, damaged archive); not retried


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileFollower:
    """Reads new complete lines from the files the ``patterns`` (globs) match, poll by poll."""

    def __init__(self, patterns: tuple[str, ...] | list[str], *, max_line_bytes: int = MAX_LINE_BYTES,
                 max_tracked: int = MAX_TRACKED) -> None:
        self.patterns = tuple(patterns)
        self.max_line_bytes = max_line_bytes
        self.max_tracked = max_tracked
        self.files: list[TrackedFile] = []
        self.counts: Counter[str] = Counter()
        self._reported: set[tuple[str, str]] = set()

    # ----------------------------------------------------------------- state

    def state(self) -> list[dict[str, object]]:
        """The follower's position, as plain data to save beside what was read."""
        return [f.model_dump() for f in self.files]

    def restore(self, state: list[dict[str, object]]) -> None:
        """Continue from a saved :meth:`state`."""
        self.files = [TrackedFile.model_validate(item) for item in state]

    # ----------------------------------------------------------------- reading

    def candidates(self) -> list[str]:
        """Matching regular files: plain files before archives (a file being compressed is
        read from the plain copy, which may still grow), then by name."""
        found = {p for pattern in self.patterns for p in glob.glob(pattern) if os.path.isfile(p)}
        return sorted(found, key=lambda p: (p.endswith(".gz"), p))

    def poll(self, budget: int | None = None) -> Iterator[RawLine]:
        """Yield the new complete lines of every file, at most ``budget`` in this poll.

        Offsets advance as lines are yielded: save :meth:`state` only after handling them all.
        A file that cannot be read now (gone, no permission) is skipped and counted; one that
        is binary or a damaged archive is remembered as broken and not read again.
        """
        claimed: set[int] = set()
        left = budget
        for path in self.candidates():
            if left is not None and left <= 0:
                return
            tracked = self._identify(path, claimed)
            if tracked is None or tracked.broken or tracked.done:
                continue
            for line in self._read(tracked):
                yield line
                if left is not None:
                    left -= 1
                    if left <= 0:
                        return
        self._forget_oldest()

    def _head(self, path: str) -> bytes | None:
        try:
            with _open(path) as handle:
                return handle.read(FINGERPRINT_BYTES)
        except FileNotFoundError:
            return None  # rotated away between the glob and the open
        except _READ_ERRORS as error:
            self._problem("unreadable", path, error)
            return None

    def _identify(self, path: str, claimed: set[int]) -> TrackedFile | None:
        """The tracked entry for the content at ``path`` (a new one for new content)."""
        head = self._head(path)
        if not head:
            return None  # empty (so far): nothing to fingerprint yet
        best: TrackedFile | None = None
        for tracked in self.files:
            if id(tracked) in claimed or tracked.length > len(head):
                continue
            if _digest(head[: tracked.length]) == tracked.fingerprint and (best is None or tracked.length > best.length):
                best = tracked
        if best is None:
            best = TrackedFile(fingerprint=_digest(head), length=len(head), path=path)
            if b"\x00" in head:
                best.broken = "binary data (NUL bytes), not a text log"
                self._problem("binary", path, best.broken)
            self.files.append(best)
            self.counts["files"] += 1
        elif best.length < len(head):  # the file grew past its old fingerprint: widen it
            best.fingerprint, best.length = _digest(head), len(head)
        if best.path != path:
            self.counts["renamed"] += 1
        best.path, best.seen = path, time.time()
        claimed.add(id(best))
        if not path.endswith(".gz"):
            try:
                if os.path.getsize(path) < best.offset:  # truncated in place: read it again
                    best.offset, best.lines, best.skipping = 0, 0, False
                    self.counts["truncated"] += 1
            except OSError:
                return None
        return best

    def _read(self, tracked: TrackedFile) -> Iterator[RawLine]:
        archive = tracked.path.endswith(".gz")
        limit = self.max_line_bytes
        try:
            with _open(tracked.path) as handle:
                handle.seek(tracked.offset)
                while True:
                    chunk = handle.readline(limit + 1)
                    if not chunk:
                        tracked.done = archive
                        return
                    complete = chunk.endswith(b"\n")
                    if not complete and not archive and len(chunk) <= limit:
                        return  # a line still being written: wait for its end
                    tracked.offset += len(chunk)
                    if tracked.skipping:
                        tracked.skipping = not complete
                        continue
                    tracked.lines += 1
                    if not complete and len(chunk) > limit:
                        tracked.skipping = True  # the rest of it is skipped, now or in later polls
                        yield RawLine(tracked.path, tracked.lines, None)
                        continue
                    yield RawLine(tracked.path, tracked.lines, chunk.rstrip(b"\r\n").decode("utf-8", errors="replace"))
        except FileNotFoundError:
            return
        except _READ_ERRORS as error:
            if archive:
                tracked.broken = f"cannot read ({error})"
            self._problem("unreadable", tracked.path, error)

    def _problem(self, kind: str, path: str, error: object) -> None:
        """Count and log a file's problem once per file, not at every poll."""
        if (kind, path) in self._reported:
            return
        self._reported.add((kind, path))
        self.counts[kind] += 1
        log.warning("log file %s skipped: %s", path, error)

    def _forget_oldest(self) -> None:
        if len(self.files) > self.max_tracked:
            self.files.sort(key=lambda f: f.seen, reverse=True)
            del self.files[self.max_tracked:]

