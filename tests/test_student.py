"""Student training, artifact format and the Detector, on the tiny BERT (seconds on CPU)."""

import json
import random

import numpy as np
import pytest
import torch

from feddale.method.detector import Detector
from feddale.method.metrics import binary_report
from feddale.method.preprocess import join_messages, mask
from feddale.method.student import (
    StudentArtifact,
    StudentConfig,
    StudentError,
    TextEncoder,
    sampling_probabilities,
    train_student,
)

NORMAL_LINES = (
    "Receiving block blk_{b} src: /10.250.{x}.102:54106 dest: /10.250.{x}.102:50010",
    "PacketResponder {x} for block blk_{b} terminating",
    "Received block blk_{b} of size 67108864 from /10.251.42.{x}",
    "BLOCK* NameSystem.addStoredBlock: blockMap updated: 10.251.{x}.84:50010 is added to blk_{b} size 67108864",
)
ERROR_LINE = "Got exception while serving blk_{b} to /10.251.71.{x}:"

# The full view keeps every message, so long sessions really span several windows here.
CFG = StudentConfig(base="tiny:bert", steps=40, batch_size=16, micro_batch=16, lr=1e-2, max_len=128, view="full")


def raw_session(rng: random.Random, anomalous: bool, length: int | None = None) -> list[str]:
    """Raw log lines (real-looking ids/IPs); anomalous sessions contain one exception line."""
    lines = rng.choices(NORMAL_LINES, k=length or rng.randint(2, 4))
    if anomalous:
        lines.insert(rng.randint(0, len(lines)), ERROR_LINE)
    return [line.format(b=rng.randint(10**17, 10**18), x=rng.randint(1, 250)) for line in lines]


def masked_text(lines: list[str]) -> str:
    return join_messages(mask(line) for line in lines)


@pytest.fixture(scope="module")
def toy():
    rng = random.Random(0)
    train = [raw_session(rng, anomalous=i % 2 == 1) for i in range(40)]
    test_labels = [i % 2 for i in range(30)]
    test = [raw_session(rng, anomalous=bool(y)) for y in test_labels]
    return [masked_text(s) for s in train], [i % 2 for i in range(40)], test, test_labels


@pytest.fixture(scope="module")
def artifact(toy):
    texts, labels, _, _ = toy
    return train_student(texts, labels, CFG, progress=False)


@pytest.fixture(scope="module")
def detector(artifact):
    return Detector(artifact)


# ----------------------------------------------------------------------------- training


def test_student_learns_a_separable_toy_task(detector, toy):
    _, _, test, test_labels = toy
    report = binary_report(test_labels, detector.predict_proba(test), threshold=0.5)
    assert report["roc_auc"] >= 0.9
    assert report["f1"] > 0.7


def test_artifact_records_training(artifact):
    stats = artifact.meta.stats
    assert stats["steps"] == CFG.steps
    assert stats["rows_per_class"] == {"normal": 20, "anomalous": 20}
    assert stats["loss_last10"] < stats["loss_first"]
    assert artifact.meta.base == "tiny:bert?seed=0"  # tiny bases record their init seed
    assert artifact.meta.labels == {"0": "normal", "1": "anomalous"}
    assert artifact.version == artifact.digest[:12] and len(artifact.digest) == 64


def test_bf16_autocast_trains_a_working_student_and_is_recorded(toy):
    """bf16 autocast on CPU (an opt-in speed-up) changes the arithmetic, not what is learned."""
    texts, labels, test, test_labels = toy
    fast = train_student(texts, labels, CFG.model_copy(update={"autocast": "bf16"}), progress=False)
    assert fast.meta.stats["autocast"] == "bf16"
    report = binary_report(test_labels, Detector(fast).predict_proba(test), threshold=0.5)
    assert report["roc_auc"] >= 0.9
    with pytest.raises(ValueError):
        StudentConfig(autocast="fp8")


def test_training_is_deterministic_and_weights_matter(toy):
    texts, labels, _, _ = toy
    small = CFG.model_copy(update={"steps": 2, "batch_size": 4, "micro_batch": 2})
    a = train_student(texts, labels, small, progress=False)
    b = train_student(texts, labels, small, progress=False)
    assert a.version == b.version
    weighted = train_student(texts, labels, small, weights=[1 + 5 * (i % 3) for i in range(40)], progress=False)
    assert weighted.version != a.version
    assert weighted.meta.stats["weight_per_class"]["normal"] == sum(1 + 5 * (i % 3) for i in range(0, 40, 2))


@pytest.mark.parametrize(
    ("texts", "labels", "weights", "message"),
    [
        (["a", "b"], [0, 0], None, "both classes"),
        (["a", "b"], [1, 1], None, "both classes"),
        ([], [], None, "no training texts"),
        (["a", "b"], [0], None, "2 texts but 1 labels"),
        (["a", "b"], [0, 2], None, "label 1"),
        (["a", "b"], [0, True], None, "label 1"),
        (["a", " "], [0, 1], None, "text 1"),
        (["a", "b"], [0, 1], [1], "weights"),
        (["a", "b"], [0, 1], [1, 0], "weight 1"),
        (["a", "b"], [0, 1], [1, 1.5], "weight 1"),
    ],
)
def test_train_student_rejects_bad_input(texts, labels, weights, message):
    with pytest.raises(StudentError, match=message):
        train_student(texts, labels, CFG, weights=weights, progress=False)


def test_max_len_beyond_model_positions_is_an_error():
    with pytest.raises(StudentError, match="positions"):
        train_student(["a", "b"], [0, 1], CFG.model_copy(update={"max_len": 1024}), progress=False)


def test_student_config_validation():
    assert StudentConfig().base == "builtin:minilm-l6"
    with pytest.raises(ValueError, match="micro_batch"):
        StudentConfig(batch_size=8, micro_batch=16)
    with pytest.raises(ValueError):
        StudentConfig(rank=0)
    with pytest.raises(ValueError):
        StudentConfig(learning_rate=1e-3)


def test_sampling_probabilities_balance_classes_and_respect_counts():
    p = sampling_probabilities([0, 0, 0, 1], [1, 1, 2, 5], balance=True)
    torch.testing.assert_close(p, torch.tensor([0.125, 0.125, 0.25, 0.5], dtype=torch.float64))
    # Unbalanced classes (4 normal vs 5 anomalous by weight): without balancing, weight alone decides.
    p = sampling_probabilities([0, 0, 0, 1], [1, 1, 2, 5], balance=False)
    torch.testing.assert_close(p, torch.tensor([1, 1, 2, 5], dtype=torch.float64) / 9)
    # By texts: counts no longer matter, only the classes' halves.
    p = sampling_probabilities([0, 0, 0, 1], [1, 1, 2, 5], balance=True, by="texts")
    torch.testing.assert_close(p, torch.tensor([1 / 6, 1 / 6, 1 / 6, 0.5], dtype=torch.float64))
    p = sampling_probabilities([0, 0, 0, 1], [1, 1, 2, 5], balance=False, by="texts")
    torch.testing.assert_close(p, torch.full((4,), 0.25, dtype=torch.float64))


# ----------------------------------------------------------------------------- artifact


def test_save_load_gives_identical_predictions(artifact, toy, tmp_path):
    _, _, test, _ = toy
    path = artifact.save(tmp_path / "student")
    assert sorted(p.name for p in path.iterdir()) == ["student.json", "student.onnx.bundle", "student.safetensors"]
    meta = json.loads((path / "student.json").read_text())
    assert meta["version"] == artifact.version and meta["labels"] == {"0": "normal", "1": "anomalous"}
    loaded = StudentArtifact.load(path)
    assert loaded.version == artifact.version
    # fresh detectors: same weights and same batches give bit-identical probabilities
    np.testing.assert_array_equal(Detector(loaded).predict_proba(test), Detector(artifact).predict_proba(test))


def test_bytes_round_trip(artifact, toy):
    _, _, test, _ = toy
    again = StudentArtifact.from_bytes(artifact.to_bytes())
    assert again.weights == artifact.weights and again.meta == artifact.meta
    np.testing.assert_array_equal(Detector(again).predict_proba(test[:5]), Detector(artifact).predict_proba(test[:5]))


def test_tampered_weights_are_refused(artifact, tmp_path):
    path = artifact.save(tmp_path / "s")
    blob = bytearray((path / "student.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (path / "student.safetensors").write_bytes(bytes(blob))
    with pytest.raises(StudentError, match="digest mismatch"):
        StudentArtifact.load(path)


@pytest.mark.parametrize(("key", "value"), [("max_len", 64), ("base", "tiny:bert?seed=1"), ("version", "0" * 12)])
def test_tampered_description_is_refused(artifact, tmp_path, key, value):
    path = artifact.save(tmp_path / "s")
    meta = json.loads((path / "student.json").read_text())
    meta[key] = value
    (path / "student.json").write_text(json.dumps(meta))
    with pytest.raises(StudentError, match="digest mismatch"):
        StudentArtifact.load(path)


def test_malformed_artifacts(artifact, tmp_path):
    with pytest.raises(StudentError, match="missing"):
        StudentArtifact.load(tmp_path)
    (tmp_path / "student.safetensors").write_bytes(artifact.weights)
    (tmp_path / "student.json").write_text("{not json")
    with pytest.raises(StudentError, match="invalid student.json"):
        StudentArtifact.load(tmp_path)
    with pytest.raises(StudentError, match="magic"):
        StudentArtifact.from_bytes(b"nope")
    blob = artifact.to_bytes()
    with pytest.raises(StudentError, match="truncated"):
        StudentArtifact.from_bytes(blob[:40])


# ----------------------------------------------------------------------------- detector


def test_detector_cache_counts_hits_and_misses(artifact, toy):
    _, _, test, _ = toy
    det = Detector(artifact, cache_size=3)
    first = det.predict_proba(test[:3])
    assert det.cache_info() == {"hits": 0, "misses": 3, "size": 3, "max_size": 3}
    np.testing.assert_array_equal(det.predict_proba(test[:3]), first)
    assert det.cache_info()["hits"] == 3
    det.predict_proba([test[3], test[3]])  # repeat inside one call: computed once
    assert det.cache_info() == {"hits": 4, "misses": 4, "size": 3, "max_size": 3}
    det.predict_proba([test[0]])  # evicted as least recently used
    assert det.misses == 5
    det.clear_cache()
    assert det.cache_info()["size"] == 0


def test_cache_can_be_disabled(artifact, toy):
    _, _, test, _ = toy
    det = Detector(artifact, cache_size=0)
    det.predict_proba(test[:2])
    det.predict_proba(test[:2])
    assert det.cache_info() == {"hits": 0, "misses": 4, "size": 0, "max_size": 0}


def test_raw_and_masked_lines_score_the_same(artifact, toy):
    _, _, test, _ = toy
    det = Detector(artifact)
    raw = test[1]
    masked = [mask(line) for line in raw]
    assert raw != masked
    p_raw = det.predict_proba([raw])
    p_masked = det.predict_proba([masked])
    assert p_raw[0] == p_masked[0]
    assert det.hits == 1 and det.misses == 1  # same masked text, so one cache entry


def test_late_anomaly_in_a_long_session_is_found(detector):
    rng = random.Random(7)
    long_normal = raw_session(rng, anomalous=False, length=40)
    late_error = long_normal + [ERROR_LINE.format(b=123456789012345678, x=7)]
    backend = detector.backend
    assert len(backend.ids([masked_text(late_error)])[0]) > 3 * backend.content_len  # several windows
    p_normal, p_late = detector.predict_proba([long_normal, late_error])
    assert p_late > 0.5 > p_normal


def test_predict_uses_threshold(artifact, toy):
    _, _, test, _ = toy
    probs = Detector(artifact).predict_proba(test[:4])
    out = Detector(artifact, threshold=float(np.median(probs))).predict(test[:4])
    assert [flag for flag, _ in out] == [bool(p >= np.median(probs)) for p in probs]
    assert [p for _, p in out] == [float(p) for p in probs]


def test_decision_threshold_is_part_of_the_artifact_and_detectors_apply_it(artifact, toy, tmp_path):
    _, _, test, _ = toy
    assert artifact.meta.threshold is None and artifact.threshold == 0.5  # older artifacts: the boundary
    assert Detector(artifact).threshold == 0.5
    probs = Detector(artifact).predict_proba(test)
    cut = float(np.quantile(probs, 0.8))
    shipped = artifact.with_threshold(cut, {"rule": "test"})
    assert shipped.version != artifact.version and shipped.weights == artifact.weights
    assert shipped.meta.stats["threshold"] == {"rule": "test"}
    for loaded in (StudentArtifact.from_bytes(shipped.to_bytes()), StudentArtifact.load(shipped.save(tmp_path / "s"))):
        assert loaded.version == shipped.version and loaded.threshold == cut
        assert [flag for flag, _ in Detector(loaded).predict(test)] == [bool(p >= cut) for p in probs]
    assert Detector(shipped, threshold=0.5).threshold == 0.5  # an explicit threshold still wins
    # The threshold is digested: editing it in student.json is tampering.
    meta = json.loads((tmp_path / "s" / "student.json").read_text())
    meta["threshold"] = 0.01
    (tmp_path / "s" / "student.json").write_text(json.dumps(meta))
    with pytest.raises(StudentError, match="digest mismatch"):
        StudentArtifact.load(tmp_path / "s")
    # An artifact without a threshold keeps its exact description (no "threshold": null key).
    assert "threshold" not in json.loads(artifact.meta_json())


def test_detector_input_errors(detector):
    assert detector.predict_proba([]).shape == (0,)
    with pytest.raises(ValueError, match="not a string"):
        detector.predict_proba("Receiving block")
    with pytest.raises(ValueError, match="session 0 is a string"):
        detector.predict_proba(["Receiving block"])
    with pytest.raises(ValueError, match="session 1 has no log lines"):
        detector.predict_proba([["a"], []])
    with pytest.raises(ValueError, match="must be a string"):
        detector.predict_proba([["a", 3]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threshold": 1.5}, "threshold"), ({"batch_size": 0}, "batch_size"), ({"cache_size": -1}, "cache_size"),
     ({"overlap": 10_000}, "overlap")],
)
def test_detector_argument_errors(artifact, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Detector(artifact, **kwargs)


def test_text_encoder_wraps_windows_like_the_tokenizer(artifact):
    enc = Detector(artifact, runtime="torch").backend.encoder
    text = masked_text(["Receiving block blk_1 src: /1.2.3.4:5 dest: /1.2.3.4:6"])
    assert enc.wrap(enc.ids(text)) == enc.tokenizer(text)["input_ids"]
    head, cut = enc.head(text * 30)
    assert cut and len(head) == CFG.max_len
    with pytest.raises(StudentError, match="no room"):
        TextEncoder(enc.tokenizer, 4)


def test_compact_view_fits_a_long_session_in_one_window_and_is_part_of_the_artifact(toy):
    rng = random.Random(3)
    long_session = raw_session(rng, anomalous=False, length=40)
    compact_cfg = CFG.model_copy(update={"view": "compact", "steps": 2})
    texts, labels, _, _ = toy
    artifact = train_student(texts, labels, compact_cfg, progress=False)
    assert artifact.meta.view == "compact"
    compact = Detector(artifact).backend  # the ONNX runtime applies the view from the bundle
    assert len(compact.ids([masked_text(long_session)])[0]) <= compact.content_len
    full = Detector(train_student(texts, labels, compact_cfg.model_copy(update={"view": "full"}), progress=False))
    assert len(full.backend.ids([masked_text(long_session)])[0]) > full.backend.content_len
    assert artifact.version != full.artifact.version  # the view is part of the model spec
