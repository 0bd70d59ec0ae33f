"""The ONNX student: bundle format, parity with the torch student, int8, batching, and a detector
service that runs with torch and transformers unimportable.

The student here is the seeded tiny BERT, once as ``tiny:bert`` (every weight embedded in the
graph) and once saved as a local model directory, so the bundle references the base file's
weights (plain and LoRA-merged, some transposed) exactly as it does for the bundled MiniLM.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from feddale.method import models
from feddale.method.artifact import ONNX_FILE, StudentArtifact, StudentError
from feddale.method.detector import Detector, plan_batches
from feddale.method.onnx_bundle import FromBase, FromLora, read_bundle
from feddale.method.preprocess import join_messages, mask
from feddale.method.student import StudentConfig, train_student

# Tolerances: fp32 ONNX Runtime differs from torch only by operation order and fusion, so
# probabilities agree to ~1e-6; 1e-4 leaves room for other CPUs' kernels. Dynamic int8 moves a
# probability by ~1e-2 on this tiny model; 0.1 still catches a broken quantization (which
# produces unrelated scores).
FP32_TOLERANCE = 1e-4
INT8_TOLERANCE = 0.1

LINES = (
    "Receiving block blk_{b} src: /10.250.{x}.102:54106 dest: /10.250.{x}.102:50010",
    "PacketResponder {x} for block blk_{b} terminating",
    "Received block blk_{b} of size 67108864 from /10.251.42.{x}",
    "Got exception while serving blk_{b} to /10.251.71.{x}:",
)
CFG = StudentConfig(base="tiny:bert", steps=4, batch_size=8, micro_batch=8, lr=1e-2, max_len=64, view="full")


def session(rng: random.Random, length: int) -> list[str]:
    return [rng.choice(LINES).format(b=rng.randint(10**17, 10**18), x=rng.randint(1, 250)) for _ in range(length)]


@pytest.fixture(scope="module")
def sessions() -> list[list[str]]:
    """Short and long sessions (the long ones span several 64-token windows)."""
    rng = random.Random(0)
    return [session(rng, n) for n in (1, 2, 3, 5, 8, 13, 21, 2, 1, 4)]


@pytest.fixture(scope="module")
def training() -> tuple[list[str], list[int]]:
    rng = random.Random(1)
    texts = [join_messages(mask(line) for line in session(rng, rng.randint(1, 4))) for _ in range(24)]
    return texts, [i % 2 for i in range(24)]


@pytest.fixture(scope="module")
def artifact(training) -> StudentArtifact:
    return train_student(*training, CFG, progress=False)


@pytest.fixture(scope="module")
def file_artifact(training, tmp_path_factory) -> StudentArtifact:
    """A student whose base is a model directory with model.safetensors, like the bundled MiniLM."""
    base = tmp_path_factory.mktemp("base")
    model, tokenizer = models.load_classifier("tiny:bert", num_labels=2)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return train_student(*training, CFG.model_copy(update={"base": str(base)}), progress=False)


def torch_and_onnx(artifact: StudentArtifact, sessions, **options) -> tuple[np.ndarray, np.ndarray]:
    reference = Detector(artifact, runtime="torch", cache_size=0, **options).predict_proba(sessions)
    served = Detector(artifact, runtime="onnx", cache_size=0, **options).predict_proba(sessions)
    return reference, served


# ----------------------------------------------------------------------------- the bundle


def test_train_student_exports_a_bundle_that_round_trips(artifact, tmp_path):
    assert artifact.onnx is not None and artifact.meta.onnx.bytes == len(artifact.onnx)
    again = StudentArtifact.from_bytes(artifact.to_bytes())
    assert again.onnx == artifact.onnx and again.meta == artifact.meta
    loaded = StudentArtifact.load(artifact.save(tmp_path / "s"))
    assert loaded.onnx == artifact.onnx and (tmp_path / "s" / ONNX_FILE).is_file()
    bundle = read_bundle(artifact.onnx)
    assert bundle.header.sources == {}  # tiny:bert has no weights file: everything is in the graph
    assert bundle.header.content_len == CFG.max_len - len(bundle.header.prefix) - len(bundle.header.suffix)


def test_a_file_base_travels_by_reference(file_artifact, artifact):
    """With a base weights file only the graph and the LoRA merge recipe travel, not the weights."""
    sources = read_bundle(file_artifact.onnx).header.sources
    kinds = {type(s) for s in sources.values()}
    assert kinds == {FromBase, FromLora}
    lora = [s for s in sources.values() if isinstance(s, FromLora)]
    assert len(lora) == 2 * 2 and all(s.transpose for s in lora)  # query + value in both layers
    assert len(file_artifact.onnx) < len(artifact.onnx) / 4


def test_tampered_bundle_is_refused(artifact, tmp_path):
    path = artifact.save(tmp_path / "s")
    blob = bytearray((path / ONNX_FILE).read_bytes())
    blob[-1] ^= 0x01
    (path / ONNX_FILE).write_bytes(bytes(blob))
    with pytest.raises(StudentError, match="ONNX bundle was modified"):
        StudentArtifact.load(path)
    whole = bytearray(artifact.to_bytes())
    whole[-1] ^= 0x01
    with pytest.raises(StudentError, match="digest mismatch"):
        StudentArtifact.from_bytes(bytes(whole))


def test_an_artifact_without_bundle_keeps_the_old_format_and_falls_back_to_torch(training, tmp_path):
    plain = train_student(*training, CFG.model_copy(update={"onnx": False, "steps": 1}), progress=False)
    assert plain.onnx is None and "onnx" not in json.loads(plain.meta_json())
    assert sorted(p.name for p in plain.save(tmp_path / "p").iterdir()) == ["student.json", "student.safetensors"]
    assert Detector(plain).runtime == "torch"
    with pytest.raises(StudentError, match="no ONNX bundle"):
        Detector(plain, runtime="onnx")
    with pytest.raises(ValueError, match="int8"):
        Detector(plain, precision="int8")


def test_a_bundle_past_the_size_limit_is_left_out(training, monkeypatch):
    """A base whose weights cannot be referenced would put them all on the wire: torch serves it instead."""
    from feddale.method import onnx_export

    plain = train_student(*training, CFG.model_copy(update={"onnx": False, "steps": 1}), progress=False)
    monkeypatch.setattr(onnx_export, "MAX_BUNDLE_BYTES", 1024)
    kept = onnx_export.with_onnx(plain)
    assert kept.onnx is None and kept.version == plain.version
    monkeypatch.setattr(onnx_export, "MAX_BUNDLE_BYTES", 64 * 1024 * 1024)
    assert onnx_export.with_onnx(plain).onnx is not None


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("batch_size", [1, 8])
def test_onnx_fp32_matches_torch(artifact, sessions, batch_size):
    reference, served = torch_and_onnx(artifact, sessions, batch_size=batch_size)
    np.testing.assert_allclose(served, reference, atol=FP32_TOLERANCE, rtol=0)


def test_onnx_fp32_matches_torch_with_base_file_weights(file_artifact, sessions):
    reference, served = torch_and_onnx(file_artifact, sessions)
    np.testing.assert_allclose(served, reference, atol=FP32_TOLERANCE, rtol=0)


def test_a_llama_family_student_exports_and_matches_torch(training, sessions):
    """The paper profile's student is a causal LM with a classifier head: no KV cache may reach the graph."""
    llama = train_student(*training, CFG.model_copy(update={"base": "tiny:llama", "steps": 1}), progress=False)
    reference, served = torch_and_onnx(llama, sessions)
    np.testing.assert_allclose(served, reference, atol=FP32_TOLERANCE, rtol=0)


def test_tokenizers_package_gives_the_transformers_ids(artifact, sessions):
    onnx_side = Detector(artifact, runtime="onnx").backend
    torch_side = Detector(artifact, runtime="torch").backend
    texts = [join_messages(mask(line) for line in s) for s in sessions] + ["ünïcode ;-; tabs\tand  spaces", "x" * 500]
    assert onnx_side.ids(texts) == torch_side.ids(texts)
    assert onnx_side.wrap([7, 8]) == torch_side.wrap([7, 8])


def test_int8_scores_close_to_fp32(file_artifact, sessions, tmp_path):
    fp32 = Detector(file_artifact, cache_size=0).predict_proba(sessions)
    int8 = Detector(file_artifact, precision="int8", cache_size=0, cache_dir=tmp_path)
    assert int8.runtime == "onnx-int8"
    np.testing.assert_allclose(int8.predict_proba(sessions), fp32, atol=INT8_TOLERANCE, rtol=0)
    prepared = list(tmp_path.glob("student-*-int8.onnx"))
    assert len(prepared) == 1 and file_artifact.digest in prepared[0].name  # cached by digest
    again = Detector(file_artifact, precision="int8", cache_size=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.predict_proba(sessions), int8.predict_proba(sessions))


# ----------------------------------------------------------------------------- fusion


def graph_ops(graph) -> dict[str, int]:
    return {op: sum(n.op_type == op for n in graph.node) for op in {n.op_type for n in graph.node}}


def test_exported_bert_student_runs_fused_kernels(file_artifact, tmp_path):
    """Attention and GELU become ONNX Runtime kernels; the last layer only runs for [CLS]."""
    import onnx

    from feddale.method.onnx_runtime import prepared_model_file

    layers = 2
    exported = graph_ops(onnx.load_from_string(read_bundle(file_artifact.onnx).graph).graph)
    assert exported["Attention"] == layers - 1 and exported["MultiHeadAttention"] == 1
    assert exported["Gelu"] == layers and "Softmax" not in exported and "Erf" not in exported
    int8 = graph_ops(onnx.load(prepared_model_file(file_artifact, "int8", tmp_path)).graph)
    assert int8["QAttention"] == layers - 1 and "Attention" not in int8


def test_fusion_that_changes_the_logits_is_not_exported(file_artifact, monkeypatch):
    """The fused graph is kept only if it computes what the exported one does."""
    import onnx
    from onnx import numpy_helper

    from feddale.method import onnx_export, onnx_fusion

    def wrong_fuse(model):
        counts = onnx_fusion.fuse(model)
        head = next(i for i in model.graph.initializer if i.name.startswith("classifier") and len(i.dims) == 1)
        head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) + 1.0, head.name))
        return counts

    monkeypatch.setattr(onnx_export, "fuse", wrong_fuse)
    ops = graph_ops(onnx.load_from_string(read_bundle(onnx_export.export_bundle(file_artifact)).graph).graph)
    assert "Attention" not in ops and "Softmax" in ops  # the graph as exported


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("seed", range(5))
def test_plan_batches_covers_every_window_once_within_limits(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(rng.randint(0, 60))]
    max_windows, max_tokens = rng.randint(1, 16), rng.randint(32, 512)
    batches = plan_batches(lengths, max_windows, max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) <= max_windows
        assert len(batch) == 1 or len(batch) * width <= max_tokens
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # bucketed by length: each batch pads only to its own longest


def test_plan_batches_keeps_an_oversized_window_alone():
    assert plan_batches([10, 500, 10], max_windows=8, max_tokens=100) == [[0, 2], [1]]


class CountingBackend:
    """Wraps a backend and records the batches the model is asked to score."""

    def __init__(self, inner) -> None:
        self.inner, self.batches = inner, []
        self.name, self.content_len, self.device = inner.name, inner.content_len, inner.device
        self.precision = getattr(inner, "precision", "fp32")

    def ids(self, texts):
        return self.inner.ids(texts)

    def wrap(self, content):
        return self.inner.wrap(content)

    def probs(self, batch):
        self.batches.append([len(row) for row in batch])
        return self.inner.probs(batch)


def test_identical_masked_texts_in_a_call_are_scored_once(artifact, sessions):
    det = Detector(artifact, cache_size=0, batch_size=4)
    det.backend = spy = CountingBackend(det.backend)
    short = sessions[1]
    renumbered = [line.replace("blk_", "blk_9") for line in short]  # masks to the same text
    expected = Detector(artifact, cache_size=0).predict_proba([short])[0]
    probs = det.predict_proba([short, renumbered, short, sessions[2]])
    assert sum(len(b) for b in spy.batches) == 2  # two distinct texts, one window each
    assert probs[0] == probs[1] == probs[2] and probs[0] == pytest.approx(expected, abs=1e-12)
    assert det.cache_info()["hits"] == 2 and det.cache_info()["misses"] == 2
    for widths in spy.batches:
        assert widths == sorted(widths)


# ----------------------------------------------------------------------------- torch-free service


BLOCKER = """
import sys

class _NoTorch:
    '''Refuses torch, transformers and peft, as an image without them would.'''

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers", "peft", "accelerate"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _NoTorch())
"""

SERVE = """
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

import feddale_detector.app  # the service's own module imports, torch-free
from feddale.service.observability import Metrics
from feddale.service.serving import MicroBatcher, ModelSlot, ServingOptions, add_detect_routes, load_student

blob = Path(sys.argv[1]).read_bytes()
slot = ModelSlot()
slot.swap(load_student(blob, options=ServingOptions(precision=sys.argv[2], cache_dir=Path(sys.argv[3]))))
metrics = Metrics("t")
batcher = MicroBatcher(slot, metrics=metrics)

@asynccontextmanager
async def lifespan(_):
    batcher.start()
    yield
    await batcher.stop()

app = FastAPI(lifespan=lifespan)

add_detect_routes(app, slot, batcher, metrics)
with TestClient(app) as client:
    body = {"sessions": [{"id": "a", "messages": ["Receiving block blk_1 src: /10.0.0.1:5 dest: /10.0.0.2:5"]},
                         {"id": "b", "messages": ["Got exception while serving blk_2 to /10.251.71.3:"]}]}
    answer = client.post("/v1/detect", json=body).json()
    info = client.get("/v1/model").json()
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers", "peft"))
print(answer["results"][0]["score"], answer["results"][1]["score"], info["runtime"], loaded)
"""


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_detector_service_serves_with_torch_unimportable(file_artifact, sessions, tmp_path, precision):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)  # also blocks the model-preparing child
    (tmp_path / "serve.py").write_text(textwrap.dedent(SERVE))
    (tmp_path / "student.bin").write_bytes(file_artifact.to_bytes())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "student.bin"), precision, str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second, runtime, loaded = proc.stdout.strip().splitlines()[-1].split(" ", 3)
    assert runtime == f"onnx-{precision}" and loaded == "[]"
    reference = Detector(file_artifact, runtime="torch").predict_proba(
        [["Receiving block blk_1 src: /10.0.0.1:5 dest: /10.0.0.2:5"], ["Got exception while serving blk_2 to /10.251.71.3:"]]
    )
    tolerance = FP32_TOLERANCE if precision == "fp32" else INT8_TOLERANCE
    np.testing.assert_allclose([float(first), float(second)], reference, atol=tolerance, rtol=0)


def test_the_blocker_really_blocks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "blocked" in proc.stderr


@pytest.mark.real
def test_minilm_student_bundle_is_small_and_matches_torch(training, sessions):
    """The bundled MiniLM base: its 87 MB of weights stay out of the artifact."""
    cfg = CFG.model_copy(update={"base": "builtin:minilm-l6", "steps": 1, "max_len": 128})
    minilm = train_student(*training, cfg, progress=False)
    assert len(minilm.onnx) < 1_000_000
    assert len(minilm.to_bytes()) < 1_000_000
    with torch.inference_mode():
        reference, served = torch_and_onnx(minilm, sessions)
    np.testing.assert_allclose(served, reference, atol=FP32_TOLERANCE, rtol=0)
