"""Crash-safe file writes, the one helper every writer in FedDALE uses.

A process killed mid-write must never leave a half-written result, adapter or student where a
reader (or a restart) would take it for whole: data goes to a temporary file beside the target,
is flushed and fsynced, and only then renamed over it (rename is atomic on POSIX filesystems).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, verify: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically; with ``verify``, read the bytes back before the rename.

    ``verify`` guards against a disk that acknowledges writes it did not keep (the coordinator
    stores uploads it must average later).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        if verify and Path(tmp).read_bytes() != blob:
            raise OSError(f"{target.name}: the bytes read back differ from what was written")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
