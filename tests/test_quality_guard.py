"""Regression guard: a small fixed recipe on real weights and real HDFS keeps its natural-rate F1.

The `cpu` profile takes half an hour a seed; this is the same method (SmolLM2-135M teachers,
MiniLM student, mean top-3 accuracy, distinct selection, the label-free threshold) at a size
that runs in a few minutes on 2 cores, evaluated on a test split at HDFS's 2.9% anomaly rate.
It runs on the suite's one torch thread, where training is bit-exact from run to run. The
recipe is small enough that the thread count alone moves it: natural-rate F1 0.879 on one
thread, 0.708 on two (docs/quality.md §9). The floor sits below both, so it catches a change
that breaks scoring, selection, the student or the threshold (a detector that flags at random
scores ~0.06 here), not the recipe's own noise. About 13 minutes on one thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from feddale.harness.simulate import run_seed
from feddale.method.config import load_config

pytestmark = pytest.mark.real

HDFS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hdfs"
FLOOR_NATURAL_F1 = 0.65

GUARD = {
    "data.n_clients": 2, "data.public": [150, 150], "data.test": [0, 0], "data.validation": [100, 100],
    "data.natural": [1942, 58], "data.max_client_sessions": 600,
    "teacher.steps": 12, "teacher.batch_size": 8, "teacher.max_len": 192,
    "score.max_len": 512, "score.overlap": 64,
    "k_normal": 60, "k_anomalous": 60, "student.steps": 40, "student.onnx": False,
    "student.threshold": "otsu",
}


def test_natural_rate_f1_of_a_small_real_recipe_stays_above_its_floor(tmp_path):
    if not (HDFS / "sessions.csv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the quality guard needs the real HDFS sessions at {HDFS}")
        pytest.skip(f"real HDFS sessions not found at {HDFS}")
    cfg = load_config("cpu", {**GUARD, "data.source": f"hdfs-csv:{HDFS}"})
    row = run_seed(cfg, 0, tmp_path, progress=False)
    natural = row["student"]["natural"]
    print("quality guard, natural split:", {m: natural[m] for m in ("f1", "precision", "recall", "false_alarms_per_10k")})
    assert natural["n"] == 2000 and natural["tp"] + natural["fn"] == 58
    assert natural["f1"] >= FLOOR_NATURAL_F1, natural
