"""The coordinator's artifact store: a directory it alone owns, written crash-safely.

Every write goes through :func:`feddale.files.atomic_write` with read-back verification:
a temporary file, fsynced, compared with what was received, then renamed over the final name.
A coordinator killed mid-write (or a disk that lies) therefore never leaves a half-written
adapter where the next FedAvg would read it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from feddale.files import atomic_write

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        """A path under the root; every part must be a plain name (no traversal, no separators)."""
        for part in parts:
            if not _PART.match(part) or ".." in part:
                raise ValueError(f"unsafe artifact path component {part!r}")
        return self.root.joinpath(*parts)

    def write(self, parts: tuple[str, ...], data: bytes) -> str:
        """Atomically store ``data``; returns its sha256."""
        atomic_write(self.path(*parts), data, verify=True)
        return hashlib.sha256(data).hexdigest()

    def read(self, parts: tuple[str, ...]) -> bytes:
        return self.path(*parts).read_bytes()

    def exists(self, parts: tuple[str, ...]) -> bool:
        return self.path(*parts).is_file()
