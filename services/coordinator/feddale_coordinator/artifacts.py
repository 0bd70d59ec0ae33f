"""The coordinator's artifact store: a directory it alone owns, written crash-safely.

Every write goes to a temporary file in the target directory, is fsynced, read back and
checked against the digest of what was received, and only then renamed over the final name.
A coordinator killed mid-write (or a disk that lies) therefore never leaves a half-written
adapter where the next FedAvg would read it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

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
        final = self.path(*parts)
        final.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(data).hexdigest()
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if hashlib.sha256(Path(tmp).read_bytes()).hexdigest() != digest:
                raise OSError(f"artifact {final.name}: read-back digest differs from what was written")
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def read(self, parts: tuple[str, ...]) -> bytes:
        return self.path(*parts).read_bytes()

    def exists(self, parts: tuple[str, ...]) -> bool:
        return self.path(*parts).is_file()
