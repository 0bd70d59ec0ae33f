"""Compact binary codec for one client's accuracies on one public set.

This is the only thing a client uploads about its private data, so it is kept small and
strict: one byte per public session (scores quantized to 1/255), optional zlib when that is
smaller (HDFS sessions repeat, so their scores do too), and a header that binds the payload to
a specific public set (sha256 digest), run, round and client. The server rejects anything
that does not match what it asked for instead of averaging scores of the wrong samples.

Wire format (big-endian)::

    magic "FDSC" | version u8 | flags u8 (bit 0: body is zlib) | public digest 32 bytes
    | run_id length u8 + UTF-8 | round u16 | client_id length u8 + UTF-8 | count u32 | body

The body decodes to exactly ``count`` uint8 values q; the score is q / 255.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"FDSC"
VERSION = 1
FLAG_ZLIB = 0x01
MAX_ID_BYTES = 64
MAX_ROUND = 0xFFFF
MAX_COUNT = 0xFFFFFFFF
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PayloadError(ValueError):
    """A score payload that is malformed or does not match what the receiver expected."""


@dataclass(frozen=True)
class PayloadHeader:
    """Who sent which scores for which public set; validated on construction."""

    version: int
    public_digest: str
    run_id: str
    round: int
    client_id: str
    count: int

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise PayloadError(f"unsupported payload version {self.version}; this codec speaks {VERSION}")
        if not isinstance(self.public_digest, str) or not _HEX64.fullmatch(self.public_digest):
            raise PayloadError("public_digest must be 64 lowercase hex characters (sha256)")
        for name in ("run_id", "client_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise PayloadError(f"{name} must be a non-empty string")
            if len(value.encode("utf-8")) > MAX_ID_BYTES:
                raise PayloadError(f"{name} is longer than {MAX_ID_BYTES} UTF-8 bytes")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or not 0 <= self.round <= MAX_ROUND:
            raise PayloadError(f"round must be an integer in [0, {MAX_ROUND}], got {self.round!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 0 < self.count <= MAX_COUNT:
            raise PayloadError(f"count must be a positive integer <= {MAX_COUNT}, got {self.count!r}")


def quantize(scores: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] -> uint8 (round(score * 255)); anything else is a client bug, so raise."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise PayloadError(f"scores must be 1-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise PayloadError(f"score {int(np.argmax(np.isnan(s)))} is NaN")
    outside = (s < 0.0) | (s > 1.0)
    if outside.any():
        i = int(np.argmax(outside))
        raise PayloadError(f"score {i} = {s[i]!r} is outside [0, 1]")
    return np.rint(s * 255.0).astype(np.uint8)


def encode_scores(scores: np.ndarray, header: PayloadHeader) -> bytes:
    """Serialize one client's public-set scores; ``header.count`` must equal ``len(scores)``."""
    q = quantize(scores)
    if q.size != header.count:
        raise PayloadError(f"header.count is {header.count} but {q.size} scores were given")
    raw = q.tobytes()
    packed = zlib.compress(raw, 9)
    flags, body = (FLAG_ZLIB, packed) if len(packed) < len(raw) else (0, raw)
    run = header.run_id.encode("utf-8")
    client = header.client_id.encode("utf-8")
    return b"".join(
        (
            MAGIC,
            struct.pack(">BB", header.version, flags),
            bytes.fromhex(header.public_digest),
            struct.pack(">B", len(run)),
            run,
            struct.pack(">H", header.round),
            struct.pack(">B", len(client)),
            client,
            struct.pack(">I", header.count),
            body,
        )
    )


class _Reader:
    """Bounds-checked cursor so a truncated blob says which field it ran out in."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.pos = blob, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.blob):
            raise PayloadError(f"payload truncated while reading {what}")
        chunk = self.blob[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def rest(self) -> bytes:
        return self.blob[self.pos :]


def _decode_body(body: bytes, flags: int, count: int) -> bytes:
    if not flags & FLAG_ZLIB:
        if len(body) < count:
            raise PayloadError(f"payload truncated: body has {len(body)} scores, header says {count}")
        if len(body) > count:
            raise PayloadError(f"payload has {len(body) - count} trailing bytes after {count} scores")
        return body
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, count)  # never inflate past count: zip-bomb guard
        extra = inflater.decompress(inflater.unconsumed_tail, 1) if inflater.unconsumed_tail else b""
    except zlib.error as exc:
        raise PayloadError(f"compressed score body is corrupt: {exc}") from exc
    if extra:
        raise PayloadError(f"compressed body holds more than the {count} scores the header announces")
    if len(raw) < count or not inflater.eof:
        raise PayloadError(f"payload truncated: compressed body ends before {count} scores")
    if inflater.unused_data:
        raise PayloadError(f"payload has {len(inflater.unused_data)} trailing bytes after the compressed body")
    return raw


def decode_scores(
    blob: bytes,
    *,
    public_digest: str | None = None,
    run_id: str | None = None,
    round: int | None = None,  # noqa: A002 - mirrors the header field name
    count: int | None = None,
    max_bytes: int | None = None,
) -> tuple[PayloadHeader, np.ndarray]:
    """Parse and verify a payload; every keyword given must match the header exactly.

    Returns the header and float64 scores (q / 255). ``max_bytes`` caps the blob size before
    any parsing so an oversized upload is refused cheaply.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if max_bytes is not None and len(blob) > max_bytes:
        raise PayloadError(f"payload is {len(blob)} bytes, more than the allowed {max_bytes}")
    r = _Reader(blob)
    if r.take(len(MAGIC), "magic") != MAGIC:
        raise PayloadError("not a FedDALE score payload (wrong magic bytes)")
    version, flags = struct.unpack(">BB", r.take(2, "version/flags"))
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version}; this codec speaks {VERSION}")
    if flags & ~FLAG_ZLIB:
        raise PayloadError(f"unknown payload flags 0x{flags:02x}")
    digest = r.take(32, "public digest").hex()
    try:
        run = r.take(r.take(1, "run_id length")[0], "run_id").decode("utf-8")
        rnd = struct.unpack(">H", r.take(2, "round"))[0]
        client = r.take(r.take(1, "client_id length")[0], "client_id").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload id is not valid UTF-8: {exc}") from exc
    n = struct.unpack(">I", r.take(4, "count"))[0]
    header = PayloadHeader(version=version, public_digest=digest, run_id=run, round=rnd, client_id=client, count=n)

    expected = {"public_digest": public_digest, "run_id": run_id, "round": round, "count": count}
    for field, want in expected.items():
        if want is not None and getattr(header, field) != want:
            raise PayloadError(f"payload {field} is {getattr(header, field)!r}, expected {want!r}")

    raw = _decode_body(r.rest(), flags, n)
    return header, np.frombuffer(raw, dtype=np.uint8).astype(np.float64) / 255.0
