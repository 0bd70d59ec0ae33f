"""The real student base (bundled all-MiniLM-L6-v2): a few steps, save, load, same outputs."""

import numpy as np
import pytest

from feddale.method.detector import Detector
from feddale.method.student import StudentArtifact, StudentConfig, train_student

pytestmark = pytest.mark.real

NORMAL = "Receiving block blk_<*> src: /<*> dest: /<*> ;-; PacketResponder <*> for block blk_<*> terminating"
ANOMALOUS = NORMAL + " ;-; Got exception while serving blk_<*> to /<*>:"


def test_minilm_student_round_trip(tmp_path):
    texts = [
        NORMAL,
        ANOMALOUS,
        NORMAL + " ;-; Received block blk_<*> of size <*> from /<*>",
        "Verification succeeded for blk_<*>",
        ANOMALOUS + " ;-; Deleting block blk_<*> file /<*>",
        "Exception in receiveBlock for block blk_<*>",
    ]
    labels = [0, 1, 0, 0, 1, 1]
    cfg = StudentConfig(base="builtin:minilm-l6", steps=5, batch_size=8, micro_batch=4, max_len=128)
    artifact = train_student(texts, labels, cfg, progress=False)
    assert artifact.meta.base == "builtin:minilm-l6"
    assert artifact.meta.lora["model_type"] == "bert" and artifact.meta.lora["rank"] == 8

    loaded = StudentArtifact.load(artifact.save(tmp_path / "student"))
    assert loaded.version == artifact.version
    sessions = [text.split(" ;-; ") for text in texts]
    before = Detector(artifact).predict_proba(sessions)
    after = Detector(loaded).predict_proba(sessions)
    assert before.shape == (6,) and np.all((before > 0) & (before < 1))
    np.testing.assert_array_equal(after, before)
    # LoRA + head only: a small fraction of MiniLM's ~90 MB of fp32 weights
    assert len(loaded.to_bytes()) < 1_000_000
