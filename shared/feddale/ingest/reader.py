"""Reading raw log files safely: plain or gzip, files or standard input, any bytes.

Real log directories hold rotated ``.gz`` archives, the odd binary file and, now and then, a
line of megabytes (a dumped payload). None of that may crash an import or fill memory: lines
are read with a length limit (the rest of an over-long line is skipped, and the line is
reported), bytes that are not UTF-8 are replaced, and a file that starts with NUL bytes is
refused as binary before any of it is parsed.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_LINE_BYTES = 1 << 16  # 64 KiB: above real log lines; masking a longer one costs seconds
_SNIFF_BYTES = 8192
STDIN = "-"


@dataclass(frozen=True)
class RawLine:
    """One line as read: where it came from and its text (None when it was too long)."""

    path: str
    number: int  # 1-based, within its file
    text: str | None


class InputError(ValueError):
    """A log input that cannot be read at all (binary, broken archive, ...)."""


def _open(path: str) -> BinaryIO:
    if path == STDIN:
        return sys.stdin.buffer
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"log file not found: {path}")
    if file.is_dir():
        raise InputError(f"{path} is a folder, not a log file")
    if file.suffix == ".gz":
        return gzip.open(file, "rb")  # type: ignore[return-value]
    return file.open("rb")


def read_lines(path: str | os.PathLike[str], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawLine]:
    """Yield the lines of one input (``-`` is standard input), without line endings.

    Raises InputError for binary data (NUL bytes in the first 8 KiB) or a broken gzip archive,
    and FileNotFoundError for a missing file. An empty input yields nothing.
    """
    name = os.fspath(path)
    handle = _open(name)
    try:
        buffered = handle if isinstance(handle, io.BufferedReader) else io.BufferedReader(handle)  # type: ignore[arg-type]
        try:
            head = buffered.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{name}: cannot read ({error})") from None
        if b"\x00" in head:
            raise InputError(f"{name}: binary data (NUL bytes), not a text log")
        number = 0
        while True:
            try:
                chunk = buffered.readline(max_line_bytes + 1)
            except (OSError, EOFError, zlib.error) as error:
                raise InputError(f"{name} line {number + 1}: cannot read ({error})") from None
            if not chunk:
                return
            number += 1
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                _skip_rest(buffered, max_line_bytes)
                yield RawLine(name, number, None)
                continue
            yield RawLine(name, number, chunk.rstrip(b"\r\n").decode("utf-8", errors="replace"))
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def _skip_rest(handle: io.BufferedReader, chunk_bytes: int) -> None:
    while True:
        chunk = handle.readline(chunk_bytes)
        if not chunk or chunk.endswith(b"\n"):
            return
