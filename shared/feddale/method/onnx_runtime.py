"""The student on ONNX Runtime (CPU): what the detector service runs, without torch or transformers.

The graph comes from the artifact's bundle (:mod:`feddale.method.onnx_bundle`; its attention and
GELU already fused into ONNX Runtime's kernels by the exporter, :mod:`feddale.method.onnx_fusion`),
its external weights from the installed base model with the LoRA delta merged in, and
tokenization from the bundle's ``tokenizer.json`` through the ``tokenizers`` package, which is the
same Rust tokenizer transformers' fast tokenizers wrap, so token ids match the torch path exactly.

Loading happens in two steps. :func:`prepare_model` writes the runnable model file: the graph
with its weights filled in and constants folded (``fp32``), or that model with its MatMul,
Attention and embedding weights dynamically quantized to int8 by ``onnxruntime.quantization``
(``int8``; needs the ``onnx`` package). It runs in a short-lived child process and its file is
cached by artifact digest and precision. Why: assembling weights and quantizing hold two or three
copies of the model at once; in the serving process those would set its resident high-water
mark for good (~300 MB fp32, ~700 MB int8 measured), in a child they are returned to the system
on exit. The server then opens the file with ONNX Runtime, holding one copy (plus ONNX Runtime's
pre-packed MatMul weights).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from feddale.method.artifact import StudentArtifact, StudentError
from feddale.method.onnx_bundle import assemble_weights, read_bundle
from feddale.method.preprocess import as_view

Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8")
# Operators whose weights int8 quantizes: the linear layers, the fused attention's Q/K/V projection
# and the embedding lookups (Gather: a quarter of the word embeddings' memory).
INT8_OPS = ("MatMul", "Attention", "Gather")
# ONNX Runtime's SkipLayerNormalization kernel measured 2.4 us per 384-wide token against 0.7 us
# for the Add, Add and LayerNormalization it replaces (single thread, ONNX Runtime 1.32), ~20% of
# an int8 student's time; the fusion is turned off when the session is created.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def prepare_model(artifact: StudentArtifact, precision: Precision, out: Path) -> Path:
    """Write the self-contained ONNX model of ``artifact`` at ``precision`` to ``out`` (atomically).

    fp32 needs ONNX Runtime only: a session over the graph and the assembled weights writes its
    (hardware-independent, basic-level) optimized model with the weights embedded and constant
    expressions folded, such as the fused attention's packed Q/K/V weights. int8 quantizes that
    model with ``onnxruntime.quantization.quantize_dynamic``, which needs the ``onnx`` package.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bundle = _bundle(artifact)
    weights = assemble_weights(bundle, artifact)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    _write_fp32(bundle.graph, weights, tmp)
    if precision == "int8":
        _quantize(tmp)
    tmp.replace(out)
    return out


def _write_fp32(graph: bytes, weights: dict[str, np.ndarray], out: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
    ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _quantize(path: Path) -> None:
    """Replace the fp32 model at ``path`` by its dynamically quantized int8 form."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise StudentError("int8 needs the onnx package (pip install onnx; detector image: DETECTOR_EXTRAS=int8)") from None
    model = onnx.load(path)
    # per_channel: one weight scale per output column. On 710 distinct unlabeled HDFS sessions the
    # bench student's int8 P(anomalous) was off fp32's by 0.020 on average against 0.039 with one
    # scale per matrix (no labels used). DefaultTensorType: onnx's shape inference cannot type the
    # outputs of ONNX Runtime's own operators (Gelu, MultiHeadAttention) that MatMuls read.
    quantize_dynamic(model, path, weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS), per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def prepared_model_file(artifact: StudentArtifact, precision: Precision, cache: Path) -> Path:
    """The model file for ``artifact`` at ``precision`` in ``cache``, prepared in a child process if missing.

    ``cache`` must be private to the service (its state directory): a file there is trusted.
    """
    out = Path(cache) / f"student-{artifact.digest}-{precision}.onnx"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="feddale-prepare-", dir=cache) as tmp:
        source = artifact.save(Path(tmp) / "artifact")
        proc = subprocess.run(
            [sys.executable, "-m", "feddale.method.onnx_runtime", str(source), precision, str(out)],
            capture_output=True, text=True,
        )
    if proc.returncode != 0 or not out.is_file():
        raise StudentError(f"preparing the {precision} ONNX student failed: {proc.stderr.strip()[-2000:]}")
    return out


def _bundle(artifact: StudentArtifact):
    if artifact.onnx is None:
        raise StudentError(
            f"student {artifact.version} carries no ONNX bundle (trained by an older feddale or without "
            "the onnx extra); serve it with the torch runtime or retrain it"
        )
    return read_bundle(artifact.onnx)


class OnnxBackend:
    """Tokenizer + ONNX Runtime session for one artifact; ``probs`` is thread-safe (ORT's ``run`` is).

    Intra-op threads do not spin while idle: the detector shares its cores with the HTTP
    server and the tokenizer, and spinning workers measurably slowed every call on 2 cores.
    """

    name = "onnx"

    def __init__(self, artifact: StudentArtifact, precision: Precision = "fp32", cache_dir: Path | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        bundle = _bundle(artifact)
        header = bundle.header
        self.precision: Precision = precision
        self.prefix, self.suffix = list(header.prefix), list(header.suffix)
        self.content_len, self.view, self.pad_id = header.content_len, header.view, header.pad_id
        self.inputs, self.output = header.inputs, header.output
        self.tokenizer = Tokenizer.from_str(bundle.tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ONNX Runtime reads the whole file when the session is created, so without a cache the
        # prepared file only lives that long.
        with tempfile.TemporaryDirectory(prefix="feddale-onnx-") as tmp:
            path = prepared_model_file(artifact, precision, Path(cache_dir) if cache_dir else Path(tmp))
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(DISABLED_OPTIMIZERS))

    @property
    def device(self) -> str:
        return f"cpu (onnxruntime {self.precision})"

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without special tokens (one batched call into the Rust tokenizer)."""
        encoded = self.tokenizer.encode_batch([as_view(t, self.view) for t in texts], add_special_tokens=False)
        return [e.ids for e in encoded]

    def wrap(self, content: Sequence[int]) -> list[int]:
        return [*self.prefix, *content, *self.suffix]

    def probs(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """P(anomalous) for each row of model input, right-padded to the longest row."""
        width = max(len(row) for row in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        (logits,) = self.session.run([self.output], dict(zip(self.inputs, (ids, mask))))
        return _softmax(logits.astype(np.float64))[:, 1]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m feddale.method.onnx_runtime ARTIFACT_DIR PRECISION OUT``: the child of :func:`prepared_model_file`."""
    parser = argparse.ArgumentParser(prog="python -m feddale.method.onnx_runtime", description=main.__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("precision", choices=PRECISIONS)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    prepare_model(StudentArtifact.load(args.artifact), args.precision, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
