"""Detection-cost benchmark on tiny models: table structure, cache accounting, per-process memory, bad input.

Timings are not asserted (the machine is shared); only their internal consistency is.
"""

import json
import os
import random

import pytest

from feddale.method import adapters, models
from feddale.harness.bench.cost import distinct_sessions, measure_cost, session_text
from feddale.method.student import StudentConfig, train_student
from feddale.method.teacher import ScoreConfig

LINES = (
    "Receiving block blk_{b} src: /10.250.{x}.102:54106 dest: /10.250.{x}.102:50010",
    "PacketResponder {x} for block blk_{b} terminating",
    "Received block blk_{b} of size 67108864 from /10.251.42.{x}",
    "Got exception while serving blk_{b} to /10.251.71.{x}:",
)
# One layer each: the cost of this test is process start-up and model loading, six workers' worth
# (baseline, the student on torch, ONNX fp32 and ONNX int8, the cached stream, the teacher).
TEACHER = "tiny:llama?seed=0&layers=1"
N_STUDENT, N_TEACHER, STREAM, REPEATS = 5, 2, 24, 2


def raw_session(rng: random.Random) -> list[str]:
    """Raw lines with real-looking ids and IPs: sessions differ raw but often coincide once masked."""
    lines = rng.choices(LINES, k=rng.randint(2, 5))
    return [line.format(b=rng.randint(10**17, 10**18), x=rng.randint(1, 250)) for line in lines]


@pytest.fixture(scope="module")
def data():
    rng = random.Random(0)
    return [raw_session(rng) for _ in range(30)], [raw_session(rng) for _ in range(8)]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, data):
    pool, _ = data
    texts = [session_text(s) for s in pool]
    labels = [int("exception" in t) for t in texts]
    cfg = StudentConfig(base="tiny:bert?layers=1", steps=1, batch_size=8, micro_batch=8, max_len=64, view="full")
    return train_student(texts, labels, cfg, progress=False).save(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    base, _ = models.load_causal_lm(TEACHER)
    lora = models.add_lora(base, task="causal")
    path = tmp_path_factory.mktemp("teacher") / "adapter.safetensors"
    path.write_bytes(adapters.adapter_to_bytes(adapters.adapter_state(lora), models.lora_meta(lora)))
    return path


def label(session: list[str]) -> int:
    return int("exception" in session_text(session))


@pytest.fixture(scope="module")
def table(data, student_dir, adapter_file):
    pool, public = data
    return measure_cost(
        student_dir,
        TEACHER,
        adapter_file,
        ScoreConfig(max_len=64, overlap=8),
        pool,
        public,
        n_student=N_STUDENT,
        n_teacher=N_TEACHER,
        stream_length=STREAM,
        repeats=REPEATS,
        batch_size=4,
        labeled=[(s, label(s)) for s in pool[:12]],
        progress=False,
    )


ROWS = ("student", "teacher", "student_cached_stream")
RUNTIMES = ("torch-fp32", "onnx-fp32", "onnx-int8")


def test_table_has_every_row(table):
    assert set(table) == {*ROWS, "student_runtimes", "runtime_ratios", "ratio", "machine", "setup"}
    assert table["student"]["detector"] == table["student_cached_stream"]["detector"] == "student"
    assert table["teacher"]["detector"] == "teacher"
    assert table["setup"]["student_sessions"] == table["student"]["sessions"] == N_STUDENT
    assert table["setup"]["teacher_sessions"] == table["teacher"]["sessions"] == N_TEACHER
    assert table["student_cached_stream"]["sessions"] == STREAM


@pytest.mark.parametrize("row", ROWS)
def test_latencies_are_positive_and_ordered(table, row):
    batch1 = table[row]["batch1"]
    assert 0 < batch1["p50_ms"] <= batch1["p99_ms"] <= batch1["max_ms"]
    assert batch1["mean_ms"] > 0 and batch1["sessions_per_s"] > 0


@pytest.mark.parametrize("row", ("student", "teacher"))
def test_raw_rows_report_a_batched_rate(table, row):
    assert table[row]["batched"]["sessions_per_s"] > 0 and table[row]["batched"]["batch_size"] == 4


def test_raw_rows_time_the_model_and_only_the_stream_row_hits_the_cache(table):
    student, teacher, cached = (table[row] for row in ROWS)
    assert student["cache_size"] == 0 and student["cache_hits"] == 0
    assert teacher["cache_size"] == 0 and teacher["cache_hits"] == 0
    # every timed request ran the model: batch-1 and batched passes, plus batched passes on the compared subset
    assert student["cache_misses"] == REPEATS * (2 * N_STUDENT + N_TEACHER)
    assert teacher["cache_misses"] == 2 * REPEATS * N_TEACHER
    assert student["batch1"]["calls"] == REPEATS * N_STUDENT
    assert cached["cache_size"] > 0 and cached["cache_hits"] > 0
    assert cached["cache_hits"] + cached["cache_misses"] == STREAM
    assert cached["hit_rate"] == pytest.approx(cached["cache_hits"] / STREAM, abs=1e-4)


def test_memory_is_measured_in_a_separate_process_per_row(table):
    pids = {table[row]["pid"] for row in ROWS}
    assert len(pids) == len(ROWS) and os.getpid() not in pids
    baseline = table["machine"]["baseline_python_torch_rss_mb"]
    for row in ("student", "teacher"):
        assert table[row]["peak_rss_mb"] >= table[row]["rss_after_load_mb"] > 0
        assert table[row]["peak_rss_mb"] > baseline > 0
        assert table[row]["torch_threads"] >= 1
    assert table["student_cached_stream"]["runtime"] == "onnx-fp32"  # as the detector service serves it
    assert table["machine"]["torch_threads"] >= 1


def test_each_student_runtime_runs_in_its_own_process_on_the_same_sessions(table):
    rows = table["student_runtimes"]
    assert tuple(rows) == RUNTIMES and table["student"] == rows["torch-fp32"]
    assert len({row["pid"] for row in rows.values()} | {table["teacher"]["pid"]}) == len(RUNTIMES) + 1
    for name, row in rows.items():
        assert row["runtime"] == name.replace("torch-fp32", "torch")
        assert row["sessions"] == N_STUDENT and row["batch1"]["calls"] == REPEATS * N_STUDENT
        assert row["cache_hits"] == 0 and row["peak_rss_mb"] >= row["rss_after_load_mb"] > 0
        assert row["torch_loaded"] is (name == "torch-fp32"), "the ONNX rows must not import torch"


def test_each_runtime_reports_f1_and_the_ratios_against_torch(table):
    rows, ratios = table["student_runtimes"], table["runtime_ratios"]
    assert table["setup"]["labeled_sessions"] == 12
    for row in rows.values():
        assert row["test"]["sessions"] == 12 and 0 <= row["test"]["f1"] <= 1
    # fp32 ONNX is the same model as torch: same decisions on the same sessions
    assert rows["onnx-fp32"]["test"]["f1"] == rows["torch-fp32"]["test"]["f1"]
    assert set(ratios) == {"onnx-fp32", "onnx-int8", "targets"}
    for name in ("onnx-fp32", "onnx-int8"):
        assert ratios[name]["throughput_x"] > 0 and ratios[name]["p50_fraction"] > 0
        assert isinstance(ratios[name]["f1_met"], bool) and isinstance(ratios[name]["rss_met"], bool)
    assert ratios["onnx-fp32"]["f1_minus_torch"] == 0
    assert "int8_f1_met" in ratios["onnx-int8"]


def test_runtimes_are_checked_before_any_worker_starts(tmp_path, student_dir, data):
    pool, public = data
    with pytest.raises(ValueError, match="runtimes"):
        measure_cost(student_dir, TEACHER, None, ScoreConfig(), pool, public, runtimes=["tensorrt"], progress=False)
    with pytest.raises(ValueError, match="label"):
        measure_cost(student_dir, TEACHER, None, ScoreConfig(), pool, public, labeled=[(pool[0], 2)], progress=False)


def test_ratio_compares_the_same_sessions_and_records_the_adapter(table, adapter_file):
    ratio, student, teacher = table["ratio"], table["student"], table["teacher"]
    assert ratio["sessions_compared"] == student["same_sessions"]["sessions"] == N_TEACHER
    assert student["same_sessions"]["batch1"]["calls"] == REPEATS * N_TEACHER
    for key in ("speedup_p50", "speedup_p99", "speedup_mean", "speedup_batched", "memory"):
        assert ratio[key] > 0
    assert isinstance(ratio["speedup_met"], bool) and isinstance(ratio["student_rss_met"], bool)
    assert teacher["adapter"]["source"] == str(adapter_file) and len(teacher["adapter"]["sha256"]) == 64
    assert 0 <= teacher["threshold_accuracy"] <= 1


def test_distinct_sessions_keep_the_first_of_each_masked_text():
    a = ["Received block blk_1 of size 5 from /10.0.0.1"]
    b = ["Received block blk_2 of size 7 from /10.0.0.9"]  # same once masked
    c = ["PacketResponder 1 for block blk_3 terminating"]
    assert distinct_sessions([a, b, c, b]) == [a, c]


@pytest.mark.parametrize(
    "sessions, public, options, match",
    [
        ([], [["x"]], {}, "sessions is empty"),
        ([["x"]], [], {}, "public_sample is empty"),
        ([["x"], []], [["x"]], {}, "no log lines"),
        (["a line"], [["x"]], {}, "is a string"),
        ([["x", 3]], [["x"]], {}, "must be a string"),
        ([["x"]], [["x"]], {"repeats": 0}, "repeats"),
        ([["x"]], [["x"]], {"n_student": 2, "n_teacher": 3}, "n_teacher"),
    ],
)
def test_bad_input_is_refused_before_any_worker_starts(tmp_path, sessions, public, options, match):
    with pytest.raises(ValueError, match=match):
        measure_cost(tmp_path, TEACHER, None, ScoreConfig(), sessions, public, progress=False, **options)


def test_report_shows_every_measured_row_and_the_cache_separately(table, tmp_path):
    from feddale.harness.bench.report import write_report

    (tmp_path / "cost.json").write_text(json.dumps(table))
    text = write_report(tmp_path, {"config": "tiny"}).read_text()
    section = text[text.index("## 3. Detection cost"):]
    for row in ("| student, the teacher's sessions |", "| student, all measured sessions |", "| teacher scoring |"):
        assert row in section
    cache_row = next(line for line in section.splitlines() if line.startswith("| student with its LRU cache"))
    assert f"{table['student_cached_stream']['hit_rate']:.2f}" in cache_row
    assert f"{table['ratio']['speedup_p50']}×" in section
    for name in RUNTIMES:
        assert any(line.startswith(f"| {name} |") for line in section.splitlines())
    assert "- onnx-int8: throughput ≥ 4×" in section
