"""The student artifact: what the trainer publishes and every detector loads, readable without torch.

It holds the LoRA matrices plus the classifier head (fp16 safetensors), a JSON description and,
since the detector runs on ONNX Runtime, an optional ONNX bundle (:mod:`feddale.method.onnx_bundle`):
the student's graph with LoRA merged, its tokenizer and the few weights the base model's file does
not hold. Base weights do not travel: they come from the base model installed next to the
detector, so the artifact stays a few hundred kilobytes and the one-shot traffic stays small.

The ``digest`` covers the weights, the bundle and everything needed to rebuild the model (base
ref, max_len, label map, LoRA config), so a tampered file or header is refused on load. Nothing
here imports torch: the coordinator validates artifacts with :meth:`StudentArtifact.from_bytes`
and the detector service runs without torch at all.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feddale.files import atomic_write
from feddale.method.preprocess import View

WEIGHTS_FILE = "student.safetensors"
META_FILE = "student.json"
ONNX_FILE = "student.onnx.bundle"
FORMAT = 1
LABEL_MAP = {"0": "normal", "1": "anomalous"}
LORA_PREFIX = "lora."
HEAD_PREFIX = "head."
_BYTES_MAGIC = b"FDSTUDNT"


class StudentError(ValueError):
    """Bad student training input, or an artifact that is malformed or was tampered with."""


class OnnxInfo(BaseModel):
    """Where the ONNX bundle sits in the artifact and what it must hash to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bytes: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ArtifactMeta(BaseModel):
    """The ``student.json`` schema. ``spec()`` is the part that defines the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = FORMAT
    base: str
    max_len: int = Field(ge=8)
    view: View = "full"
    labels: dict[str, str]
    lora: dict[str, Any]
    onnx: OnnxInfo | None = None
    # P(anomalous) at or above which detectors flag a session, chosen without labels at training
    # time (feddale.method.threshold); absent in artifacts from before it existed, which mean 0.5.
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    version: str
    digest: str
    created: str
    stats: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """The digested description; ``onnx`` and ``threshold`` only when present, so older artifacts
        keep their digest. The threshold is digested: it decides what a detector flags."""
        fields = {"format", "base", "max_len", "view", "labels", "lora"}
        fields |= {name for name in ("onnx", "threshold") if getattr(self, name) is not None}
        return self.model_dump(include=fields)


def content_digest(spec: dict[str, Any], weights: bytes) -> str:
    """sha256 over the canonical JSON model spec and the safetensors bytes.

    The ONNX bundle enters through ``spec["onnx"]["sha256"]``, so it is covered without hashing
    it twice.
    """
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    h.update(b"\n")
    h.update(weights)
    return h.hexdigest()


def seal(spec: dict[str, Any], weights: bytes, onnx: bytes | None, created: str, stats: dict[str, Any]) -> StudentArtifact:
    """Build a verified artifact: adds the bundle's size and hash to ``spec``, then the digest."""
    spec = dict(spec)
    spec.pop("onnx", None)
    if onnx is not None:
        spec["onnx"] = {"bytes": len(onnx), "sha256": hashlib.sha256(onnx).hexdigest()}
    digest = content_digest(spec, weights)
    meta = ArtifactMeta(**spec, version=digest[:12], digest=digest, created=created, stats=stats)
    return StudentArtifact(weights=weights, meta=meta, onnx=onnx)


@dataclass(frozen=True, eq=False)
class StudentArtifact:
    """Trained student weights (safetensors bytes), their verified description and the ONNX bundle."""

    weights: bytes
    meta: ArtifactMeta
    onnx: bytes | None = None

    def __post_init__(self) -> None:
        expected = content_digest(self.meta.spec(), self.weights)
        if expected != self.meta.digest or self.meta.version != expected[:12]:
            raise StudentError("student artifact digest mismatch: the weights or model description were modified")
        info = self.meta.onnx
        if (info is None) != (self.onnx is None):
            raise StudentError("student artifact ONNX bundle and its description disagree (one is missing)")
        if info is not None and (len(self.onnx) != info.bytes or hashlib.sha256(self.onnx).hexdigest() != info.sha256):
            raise StudentError("student artifact digest mismatch: the ONNX bundle was modified")

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def digest(self) -> str:
        return self.meta.digest

    @property
    def threshold(self) -> float:
        """The decision threshold detectors apply: the artifact's own, else the student's 0.5 boundary."""
        return 0.5 if self.meta.threshold is None else self.meta.threshold

    def with_threshold(self, threshold: float, evidence: dict[str, Any]) -> StudentArtifact:
        """The same student with its decision threshold (a new version), ``evidence`` saying how it was chosen."""
        spec = {**self.meta.spec(), "threshold": float(threshold)}
        return seal(spec, self.weights, self.onnx, self.meta.created, {**self.meta.stats, "threshold": evidence})

    def meta_json(self) -> str:
        meta = self.meta.model_dump()
        for optional in ("onnx", "threshold"):  # older artifacts keep their exact bytes
            if meta[optional] is None:
                del meta[optional]
        return json.dumps(meta, indent=2, sort_keys=True)

    def save(self, directory: str | Path) -> Path:
        """Write ``student.safetensors`` + ``student.json`` (+ the ONNX bundle) into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        files = [(WEIGHTS_FILE, self.weights), (META_FILE, self.meta_json().encode("utf-8"))]
        if self.onnx is not None:
            files.append((ONNX_FILE, self.onnx))
        else:
            (out / ONNX_FILE).unlink(missing_ok=True)
        for name, data in files:
            atomic_write(out / name, data)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> StudentArtifact:
        """Read an artifact written by :meth:`save`; refuses it if the digest does not match."""
        d = Path(directory)
        for name in (WEIGHTS_FILE, META_FILE):
            if not (d / name).is_file():
                raise StudentError(f"{d / name} is missing; not a student artifact directory")
        meta = _parse_meta((d / META_FILE).read_bytes())
        onnx = (d / ONNX_FILE).read_bytes() if meta.onnx is not None and (d / ONNX_FILE).is_file() else None
        return cls(weights=(d / WEIGHTS_FILE).read_bytes(), meta=meta, onnx=onnx)

    def to_bytes(self) -> bytes:
        """One blob for HTTP: magic | u32 JSON length | JSON | safetensors bytes | ONNX bundle bytes."""
        head = self.meta_json().encode("utf-8")
        return _BYTES_MAGIC + struct.pack(">I", len(head)) + head + self.weights + (self.onnx or b"")

    @classmethod
    def from_bytes(cls, blob: bytes) -> StudentArtifact:
        blob = bytes(blob)
        start = len(_BYTES_MAGIC) + 4
        if len(blob) < start or not blob.startswith(_BYTES_MAGIC):
            raise StudentError("not a FedDALE student artifact (wrong magic bytes or too short)")
        (size,) = struct.unpack(">I", blob[len(_BYTES_MAGIC) : start])
        if start + size > len(blob):
            raise StudentError("student artifact truncated inside its JSON header")
        meta = _parse_meta(blob[start : start + size])
        body = blob[start + size :]
        tail = meta.onnx.bytes if meta.onnx is not None else 0
        if tail > len(body):
            raise StudentError("student artifact truncated inside its ONNX bundle")
        weights, onnx = body[: len(body) - tail], (body[len(body) - tail :] if tail else None)
        return cls(weights=weights, meta=meta, onnx=onnx)

    def numpy_tensors(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(LoRA state in :mod:`feddale.method.adapters` naming, head state) as fp32 numpy arrays."""
        import numpy as np
        from safetensors.numpy import load

        try:
            raw = load(self.weights)
        except Exception as exc:  # safetensors raises several error types for corrupt input
            raise StudentError(f"student weights are not valid safetensors: {exc}") from None
        lora = {k.removeprefix(LORA_PREFIX): v.astype(np.float32) for k, v in raw.items() if k.startswith(LORA_PREFIX)}
        head = {k.removeprefix(HEAD_PREFIX): v.astype(np.float32) for k, v in raw.items() if k.startswith(HEAD_PREFIX)}
        if len(lora) + len(head) != len(raw) or not lora or not head:
            raise StudentError("student weights must hold LoRA ('lora.*') and head ('head.*') tensors only")
        return lora, head


def _parse_meta(data: bytes) -> ArtifactMeta:
    try:
        return ArtifactMeta.model_validate_json(data)
    except ValidationError as exc:
        raise StudentError(f"invalid student.json: {exc}") from None
