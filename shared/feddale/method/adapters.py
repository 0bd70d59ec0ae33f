"""LoRA adapter state <-> safetensors bytes, the only model weights that ever cross the network.

Adapters arrive from other parties, so decoding is defensive: the blob must be well-formed
safetensors, hold nothing but ``lora_A``/``lora_B`` matrices (no smuggled base weights or
heads), contain only finite floating-point values and, when the receiver says what it expects,
match those names and shapes exactly. Tensors travel as fp16 (half the bytes of fp32, ample
precision for low-rank deltas) and come back as fp32 for averaging.

Key names are independent of peft's wrapper prefix and adapter name, e.g.
``model.layers.0.self_attn.q_proj.lora_A.weight``, so states from differently named adapters
or peft versions can be averaged and exchanged.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch

META_KEY = "feddale_lora_meta"
_LORA_KEY = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\.lora_[AB]\.weight$")
_WIRE_DTYPES = {"F16", "BF16", "F32", "F64"}
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors library's own cap on header size


class AdapterError(ValueError):
    """An adapter blob or state that is malformed, unsafe or does not fit the model."""


def _lora_parameters(peft_model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(stable key, parameter) for every LoRA matrix of the active adapter."""
    from peft.tuners.lora import LoraLayer

    if not hasattr(peft_model, "get_base_model"):
        raise AdapterError("model has no LoRA layers; wrap it with feddale.method.models.add_lora first")
    adapter = peft_model.active_adapter
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        yield f"{name}.lora_A.weight", module.lora_A[adapter].weight
        yield f"{name}.lora_B.weight", module.lora_B[adapter].weight


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies of the active adapter's LoRA matrices (heads excluded).

    Classifier heads (``modules_to_save``) are deliberately not part of it: what clients
    exchange is the low-rank delta only.
    """
    state = {key: p.detach().to("cpu", torch.float32, copy=True) for key, p in _lora_parameters(peft_model)}
    if not state:
        raise AdapterError("model has no LoRA layers; wrap it with feddale.method.models.add_lora first")
    return state


def adapter_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    """The ``expected`` argument of :func:`adapter_from_bytes` for this model."""
    return {key: tuple(p.shape) for key, p in _lora_parameters(peft_model)}


def load_adapter_state(peft_model, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's LoRA matrices; names and shapes must match exactly."""
    params = dict(_lora_parameters(peft_model))
    _check_keys_and_shapes(state, {k: tuple(p.shape) for k, p in params.items()})
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))


def _check_keys_and_shapes(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"adapter keys do not match the model: {len(missing)} missing {missing[:3]}, "
            f"{len(extra)} unexpected {extra[:3]}"
        )
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != tuple(shape):
            raise AdapterError(f"adapter tensor {key} has shape {got}, expected {tuple(shape)}")


def _check_tensors(state: Mapping[str, torch.Tensor]) -> None:
    if not state:
        raise AdapterError("adapter holds no tensors")
    for key, tensor in state.items():
        if not _LORA_KEY.match(key):
            raise AdapterError(f"adapter key {key!r} is not a LoRA matrix (…lora_A.weight / …lora_B.weight)")
        if not tensor.is_floating_point():
            raise AdapterError(f"adapter tensor {key} has non-floating dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter tensor {key} contains NaN or Inf")


def adapter_to_bytes(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """Serialize a LoRA state as safetensors (fp16 tensors, ``meta`` as JSON in the header)."""
    from safetensors.torch import save

    _check_tensors(state)
    wire = {key: t.detach().to("cpu", torch.float16).contiguous() for key, t in state.items()}
    overflow = [key for key, t in wire.items() if not torch.isfinite(t).all()]
    if overflow:
        raise AdapterError(f"adapter tensors overflow fp16 (|value| > 65504): {overflow[:3]}")
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True)
    except TypeError as exc:
        raise AdapterError(f"adapter meta is not JSON-serialisable: {exc}") from None
    return save(wire, metadata={META_KEY: meta_json})


def _read_header(blob: bytes) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header before any tensor bytes are touched."""
    if len(blob) < 8:
        raise AdapterError(f"adapter blob of {len(blob)} bytes is too short to be safetensors")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(len(blob) - 8, _HEADER_LIMIT):
        raise AdapterError(f"safetensors header claims {size} bytes but the blob has {len(blob) - 8}")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError("safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise AdapterError("safetensors header is not a JSON object")
    return header


def adapter_from_bytes(
    blob: bytes,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode and validate an adapter blob; returns (fp32 state, meta).

    ``expected`` (key -> shape, see :func:`adapter_shapes`) rejects adapters for another base
    model or rank; ``max_bytes`` bounds what a receiver is willing to parse.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise AdapterError(f"adapter blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if max_bytes is not None and len(blob) > max_bytes:
        raise AdapterError(f"adapter blob of {len(blob)} bytes exceeds the limit of {max_bytes}")
    header = _read_header(blob)
    metadata = header.pop("__metadata__", None) or {}
    for key, info in header.items():
        if not _LORA_KEY.match(key):
            raise AdapterError(f"adapter key {key!r} is not a LoRA matrix (…lora_A.weight / …lora_B.weight)")
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in _WIRE_DTYPES:
            raise AdapterError(f"adapter tensor {key} has dtype {dtype!r}; only {sorted(_WIRE_DTYPES)} allowed")
    try:
        raw = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"adapter blob is not valid safetensors: {exc}") from None
    state = {key: t.to(torch.float32) for key, t in raw.items()}
    _check_tensors(state)
    if expected is not None:
        _check_keys_and_shapes(state, expected)
    if META_KEY not in metadata:
        raise AdapterError(f"adapter blob lacks the {META_KEY!r} metadata entry")
    try:
        meta = json.loads(metadata[META_KEY])
    except json.JSONDecodeError:
        raise AdapterError("adapter metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise AdapterError("adapter metadata must be a JSON object")
    return state, meta

