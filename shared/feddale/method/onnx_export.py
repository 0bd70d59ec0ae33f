"""Export a student artifact to its ONNX bundle (needs torch and the ``onnx`` extra).

Runs where the student is trained (:func:`feddale.method.student.train_student` calls
:func:`with_onnx` last), because the detector image has no torch to export with. The model is
rebuilt *from the artifact* (fp16-rounded LoRA and head, exactly what the torch detector serves),
LoRA is merged, attention is switched to its eager form (it traces to the plain
MatMul/Softmax pattern; the SDPA form adds NaN guards and masks and measured slower here at 256
tokens), the graph is exported with torch's dynamo exporter (onnxscript), dynamic in batch and
length, and its attention and GELU are fused into ONNX Runtime kernels
(:mod:`feddale.method.onnx_fusion`) where that gives the same logits.
The exporter's optimizer renames and pre-transposes weights, so weights are matched back to
the model's parameters by value, then to the base model's file (see
:mod:`feddale.method.onnx_bundle`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from feddale.method.artifact import StudentArtifact, StudentError, seal
from feddale.method.onnx_fusion import fuse
from feddale.method.onnx_bundle import (
    EXTERNAL_LOCATION,
    BundleHeader,
    FromBase,
    FromLora,
    Source,
    base_weights_file,
    read_tensors,
    write_bundle,
)

OPSET = 18
OUTPUT = "logits"
INPUTS = ["input_ids", "attention_mask"]
# A base without a weights file this code can reference (a Hub id, a GGUF) puts every weight in
# the graph: for SmolLM2-135M that is ~540 MB, far past the coordinator's upload limit and the
# point of a small artifact. Such students keep no bundle and are served by the torch runtime.
MAX_BUNDLE_BYTES = 32 * 1024 * 1024
# The fused graph must reproduce the exported one's logits to float rounding (measured ~1e-6).
FUSION_TOLERANCE = 1e-4
PROBE_LINES = (
    "Receiving block <*> src: <*> dest: <*>",
    "PacketResponder <*> for block <*> terminating",
    "Got exception while serving <*> to <*>",
)

log = logging.getLogger(__name__)


def with_onnx(artifact: StudentArtifact) -> StudentArtifact:
    """The same artifact (same weights, stats and creation time) with its ONNX bundle added,
    or unchanged when the bundle would exceed :data:`MAX_BUNDLE_BYTES`."""
    bundle = export_bundle(artifact)
    if len(bundle) > MAX_BUNDLE_BYTES:
        log.warning("student %s: ONNX bundle of %d bytes exceeds %d (base %s has no weights file to reference);"
                    " published without it, serve it with the torch runtime",
                    artifact.version, len(bundle), MAX_BUNDLE_BYTES, artifact.meta.base)
        return artifact
    return seal(artifact.meta.spec(), artifact.weights, bundle, artifact.meta.created, artifact.meta.stats)


def export_bundle(artifact: StudentArtifact) -> bytes:
    """Trace the merged student and package graph, tokenizer and weight sources as a bundle."""
    try:
        import onnx
        import onnxruntime  # noqa: F401 - checks the fused graph, checked for a clear message
        import onnxscript  # noqa: F401 - the dynamo exporter's dependency, checked for a clear message
    except ImportError:
        raise StudentError("exporting the student to ONNX needs onnx, onnxscript and onnxruntime: "
                           "pip install 'feddale[onnx]'") from None
    from peft.tuners.lora import LoraLayer

    from feddale.method.student import TextEncoder, build_model

    model, tokenizer = build_model(artifact, device="cpu")
    encoder = TextEncoder(tokenizer, artifact.meta.max_len, artifact.meta.view)
    adapter = model.active_adapter
    lora: dict[str, tuple[str, str, float, np.ndarray]] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            unmerged = module.get_base_layer().weight.detach().cpu().numpy().copy()
            lora[f"{name}.weight"] = (f"{name}.lora_A.weight", f"{name}.lora_B.weight",
                                      float(module.scaling[adapter]), unmerged)
    merged = model.merge_and_unload().eval()
    merged.set_attn_implementation("eager")
    merged.config.use_cache = False  # Llama-family students would return a KV cache torch.export cannot trace
    proto = _export(merged, encoder, int(tokenizer.pad_token_id), artifact.meta.max_len)
    onnx.checker.check_model(proto)  # before weights become external references the checker cannot follow
    proto = _fused_if_equal(proto, _probe(encoder, int(tokenizer.pad_token_id)))
    params = {name: t.detach().cpu().numpy() for name, t in merged.state_dict().items()}
    sources = _externalize(proto, params, lora, base_weights_file(artifact.meta.base))
    header = BundleHeader(
        opset=OPSET, inputs=INPUTS, output=OUTPUT, prefix=list(encoder.prefix), suffix=list(encoder.suffix),
        pad_id=int(tokenizer.pad_token_id), content_len=encoder.content_len, view=artifact.meta.view,
        base=artifact.meta.base, sources=sources,
    )
    return write_bundle(header, proto.SerializeToString(), tokenizer.backend_tokenizer.to_str())


def _export(model: Any, encoder: Any, pad_id: int, max_len: int) -> Any:
    """The ONNX graph (ModelProto) of ``model``, dynamic in batch size and sequence length."""
    import torch

    rows = [encoder.wrap(encoder.ids("Receiving block <*> src: <*> dest: <*>")), encoder.wrap([])]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=max_len)
    with torch.inference_mode():
        program = torch.onnx.export(
            model, (ids, mask), input_names=INPUTS, output_names=[OUTPUT],
            dynamic_shapes=({0: batch, 1: tokens}, {0: batch, 1: tokens}),
            opset_version=OPSET, dynamo=True, optimize=True, verbose=False,
        )
    return program.model_proto


def _probe(encoder: Any, pad_id: int) -> dict[str, np.ndarray]:
    """Model inputs the fused graph is checked on: log text, rows of different lengths, padding."""
    content = encoder.ids(" ;-; ".join(PROBE_LINES))[: encoder.content_len]
    rows = [encoder.wrap(content[:n]) for n in (len(content), len(content) // 2, 1)]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return dict(zip(INPUTS, (ids, mask)))


def _fused_if_equal(proto: Any, probe: dict[str, np.ndarray]) -> Any:
    """The graph with :func:`feddale.method.onnx_fusion.fuse` applied, if it gives the same logits.

    Why the check: the rewrites match node patterns, not semantics; a student whose attention
    mask is not padding-only (a causal one) or a pattern that only looks alike would otherwise
    be served wrong scores. Any difference beyond float rounding keeps the graph as exported.
    """
    import onnx
    import onnxruntime as ort

    fused = onnx.ModelProto()
    fused.CopyFrom(proto)
    counts = fuse(fused)
    if not any(counts.values()):
        return proto
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def logits(model: Any) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run([OUTPUT], probe)[0]

    if np.allclose(logits(fused), logits(proto), atol=FUSION_TOLERANCE, rtol=FUSION_TOLERANCE):
        log.debug("student graph fused: %s", counts)
        return fused
    log.warning("fused student graph (%s) changed the logits; exported unfused", counts)
    return proto


def _fingerprint(value: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(), tuple(value.shape), str(value.dtype)


def _externalize(
    proto: Any,
    params: dict[str, np.ndarray],
    lora: dict[str, tuple[str, str, float, np.ndarray]],
    base_file: Any,
) -> dict[str, Source]:
    """Point every initializer the base file can rebuild at it; the rest stays in the graph."""
    from onnx import TensorProto, numpy_helper

    if base_file is None:
        return {}
    by_value: dict[tuple[str, tuple[int, ...], str], tuple[str, bool]] = {}
    for name, value in params.items():
        by_value.setdefault(_fingerprint(value), (name, False))
        if value.ndim == 2:
            by_value.setdefault(_fingerprint(value.T), (name, True))
    matches = {}
    for init in proto.graph.initializer:
        hit = by_value.get(_fingerprint(numpy_helper.to_array(init)))
        if hit is not None:
            matches[init.name] = hit
    wanted = {c for name, _ in matches.values() for c in (name, name.partition(".")[2])}
    stored = read_tensors(base_file, wanted & _keys(base_file))
    sources: dict[str, Source] = {}
    for init in proto.graph.initializer:
        if init.name not in matches:
            continue
        name, transposed = matches[init.name]
        original = lora[name][3] if name in lora else params[name]
        key = next((k for k in (name, name.partition(".")[2]) if k in stored and _identical(stored[k], original)), None)
        if key is None:
            continue
        if name in lora:
            a, b, scale, _ = lora[name]
            sources[init.name] = FromLora(key=key, a=a, b=b, scale=scale, transpose=transposed)
        else:
            sources[init.name] = FromBase(key=key, transpose=transposed)
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", EXTERNAL_LOCATION
    return sources


def _keys(path: Any) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return set(handle.keys())


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
