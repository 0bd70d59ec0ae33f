"""Detection cost (benchmark table 3, the paper's Table 2): the student detector against teacher scoring.

A detector's cost is per-session latency, sessions per second and resident memory. The student
(:class:`feddale.method.detector.Detector` on a :class:`~feddale.method.student.StudentArtifact`) is compared
with what it replaces: scoring every session with the causal-LM teacher
(:func:`feddale.method.teacher.score_texts`) and flagging sessions whose top-k accuracy falls below an
Otsu cut of the teacher's scores on an unlabeled public sample
(:func:`feddale.method.threshold.otsu_threshold`). Both detectors are timed end to end on raw log
lines: masking, joining and tokenizing are part of what a request costs.

Every row runs in its own fresh interpreter (``python -m feddale.harness.bench.cost --worker JOB``), so
its peak memory is that of a process holding one detector and nothing else. Peak memory is
``VmHWM`` from ``/proc/self/status``, the high-water mark of the worker's own address space.
``getrusage(RUSAGE_SELF).ru_maxrss`` is recorded beside it, but Linux carries ``ru_maxrss``
over from the parent across fork and exec, so in a child of a large process (a test runner
holding models) it shows the parent's size rather than the worker's.

The raw rows see each session text once (student cache off, distinct texts), so they time the
models. The student is measured three times, each in its own fresh process on the same
sessions: on PyTorch (``torch-fp32``, the reference), on ONNX Runtime (``onnx-fp32``) and on
ONNX Runtime with dynamically quantized int8 weights (``onnx-int8``); :func:`runtime_ratios`
compares the two ONNX rows with the torch one. The detector's LRU cache on a repetitive stream,
drawn with repetition from the same pool as production HDFS traffic is, is a separate row.

Labels are read only to report each student runtime's F1 on a held-out labelled split
(``labeled``): the worker returns P(anomalous) per session and the parent scores it at the
detector's fixed 0.5 threshold, so no threshold is tuned on those labels.

Imports that load torch, transformers or model code happen inside the workers so that the
baseline worker measures a bare ``import torch`` and nothing more, and the ONNX workers never
import torch at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from feddale.method.preprocess import join_messages, mask

if TYPE_CHECKING:
    from feddale.data.types import Dataset
    from feddale.method.teacher import ScoreConfig

Sessions = list[list[str]]
Detect = Callable[[Sessions], object]

TARGET_SPEEDUP = 20.0  # the target: student >= 20x faster per session than teacher scoring
TARGET_STUDENT_RSS_MB = 500.0  # the target: student detector process <= 500 MB resident
# issue 18 (the torch-free detector), against the torch student measured in the same run:
TARGET_ONNX_THROUGHPUT = 4.0  # uncached sessions/s in 32-session requests >= 4x
TARGET_ONNX_P50 = 0.5  # batch-1 p50 <= half
TARGET_ONNX_RSS_MB = 250.0  # peak resident memory
TARGET_F1_LOSS = 0.005  # int8 against fp32 (and any ONNX row against torch) on the held-out split
STUDENT_RUNTIMES = {  # row name -> (runtime, precision) of feddale.method.detector.Detector
    "torch-fp32": ("torch", "fp32"),
    "onnx-fp32": ("onnx", "fp32"),
    "onnx-int8": ("onnx", "int8"),
}
WARMUP_CALLS = 2  # untimed batch-1 calls first: the first forward pass pays one-off allocation costs

RSS_NOTE = (
    "peak_rss_mb = VmHWM of the worker process (its own address space, fresh at exec); "
    "ru_maxrss_mb = getrusage(RUSAGE_SELF) in the worker, which Linux carries over from the "
    "parent across fork+exec and so can show the parent's size"
)


# --------------------------------------------------------------------------- inputs


def session_text(session: Sequence[str]) -> str:
    """The masked, joined text both detectors read: what the student's cache is keyed by, too."""
    return join_messages(mask(line) for line in session)


def check_sessions(sessions: Sequence[Sequence[str]], what: str) -> Sessions:
    """Sessions as plain lists of log lines; refuses what no detector could score."""
    if isinstance(sessions, str):
        raise ValueError(f"{what} must be a sequence of sessions, not a string")
    checked = [_check_session(session, what, i) for i, session in enumerate(sessions)]
    if not checked:
        raise ValueError(f"{what} is empty: there is nothing to measure")
    return checked


def _check_session(session: Sequence[str], what: str, i: int) -> list[str]:
    if isinstance(session, str):
        raise ValueError(f"{what}[{i}] is a string; pass each session as a sequence of log lines")
    lines = list(session)
    if not lines:
        raise ValueError(f"{what}[{i}] has no log lines")
    if not all(isinstance(line, str) for line in lines):
        raise ValueError(f"{what}[{i}]: every log line must be a string")
    return lines


def distinct_sessions(pool: Sessions) -> Sessions:
    """First session of each distinct masked text, in pool order: the raw rows' input.

    HDFS repeats the same event sequence thousands of times; timing repeats would time the
    student's cache (and the teacher's in-call dedup), not the models.
    """
    first: dict[str, list[str]] = {}
    for session in pool:
        first.setdefault(session_text(session), session)
    return list(first.values())


def draw_stream(pool: Sessions, length: int, seed: int) -> Sessions:
    """A request stream drawn uniformly with repetition from the pool, so texts recur as often as in the data."""
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(length)]


def sample_sessions(dataset: Dataset, pool: int, public: int, seed: int) -> tuple[Sessions, Sessions]:
    """Two disjoint random draws of sessions (labels untouched): the measured pool and the public sample."""
    order = np.random.default_rng(seed).permutation(len(dataset.sessions))
    if len(order) < pool + public:
        raise ValueError(f"data set has {len(order)} sessions, fewer than pool + public = {pool + public}")
    pick = [list(dataset.sessions[i].messages) for i in order[: public + pool]]
    return pick[public:], pick[:public]


def _check_positive(**values: int) -> None:
    """Counts are checked up front: a bad one would otherwise fail minutes later inside a worker."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- the table


def measure_cost(
    student_dir: Path,
    teacher_model: str,
    teacher_adapter: Path | None,
    score_cfg: ScoreConfig,
    sessions: Sequence[Sequence[str]],
    public_sample: Sequence[Sequence[str]],
    *,
    quantization: str = "auto",
    n_student: int = 500,
    n_teacher: int = 50,
    stream_length: int = 2000,
    repeats: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    labeled: Sequence[tuple[Sequence[str], int]] | None = None,
    runtimes: Sequence[str] = tuple(STUDENT_RUNTIMES),
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the detection-cost table; returns a JSON-ready dict.

    ``sessions`` is a realistic sample of traffic (repetitions included). The student rows
    time its first ``n_student`` distinct texts, the teacher the first ``n_teacher`` of those
    (seconds per session on a small CPU); the ratio compares the two on exactly
    the teacher's sessions. ``public_sample`` only calibrates the teacher's Otsu threshold.
    The cached-stream row replays ``stream_length`` sessions drawn with repetition from
    ``sessions``. ``repeats`` timed passes are pooled for latencies; the batched rate (requests
    of ``batch_size`` sessions) is the median pass. ``teacher_adapter`` is a safetensors file
    from :func:`feddale.method.adapters.adapter_to_bytes`; ``None`` times a fresh, untrained LoRA,
    which costs the same (an adapter changes weights, not shapes). ``runtimes`` names the student
    rows (keys of :data:`STUDENT_RUNTIMES`; the ONNX ones need an artifact with an ONNX bundle);
    ``labeled`` (sessions with their labels) adds each row's F1 at threshold 0.5.
    """
    from feddale.method.artifact import StudentArtifact

    pool = check_sessions(sessions, "sessions")
    public = check_sessions(public_sample, "public_sample")
    _check_positive(
        n_student=n_student, n_teacher=n_teacher, stream_length=stream_length, repeats=repeats, batch_size=batch_size
    )
    if n_teacher > n_student:
        raise ValueError(f"n_teacher ({n_teacher}) must not exceed n_student ({n_student}): the teacher times a subset")
    unknown = set(runtimes) - set(STUDENT_RUNTIMES)
    if unknown or not runtimes:
        raise ValueError(f"runtimes must be a non-empty subset of {list(STUDENT_RUNTIMES)}, got {list(runtimes)}")
    artifact = StudentArtifact.load(student_dir)  # fail here, not in a worker, on a wrong or tampered directory
    if artifact.onnx is None and any(STUDENT_RUNTIMES[r][0] == "onnx" for r in runtimes):
        raise ValueError(f"{student_dir} has no ONNX bundle; measure runtimes=['torch-fp32'] or retrain it")
    eval_sessions, eval_labels = _check_labeled(labeled)
    if teacher_adapter is not None and not Path(teacher_adapter).is_file():
        raise FileNotFoundError(f"teacher adapter {teacher_adapter} does not exist")

    measured = distinct_sessions(pool)[:n_student]
    compared = measured[:n_teacher]
    stream = draw_stream(pool, stream_length, seed)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="feddale-cost-") as tmp:
        workdir = Path(tmp)

        def run(job: dict[str, Any]) -> dict[str, Any]:
            return run_worker(job, workdir, progress)

        timing = {"repeats": repeats, "batch_size": batch_size}
        baseline = run({"role": "baseline"})
        student_job = {"student_dir": str(student_dir)}
        variants = {}
        for name in runtimes:
            runtime, precision = STUDENT_RUNTIMES[name]
            row = run({**student_job, "role": "student", "name": name, "runtime": runtime, "precision": precision,
                       "sessions": measured, "compare": len(compared), "eval": eval_sessions, **timing})
            probs = row.pop("eval_probs")
            if eval_labels:
                row["test"] = binary_quality(eval_labels, probs)
            variants[name] = row
        cached = run({**student_job, "role": "student_stream", "runtime": "auto", "sessions": stream})
        teacher = run(
            {
                "role": "teacher",
                "teacher_model": teacher_model,
                "teacher_adapter": None if teacher_adapter is None else str(teacher_adapter),
                "quantization": quantization,
                "score_cfg": score_cfg.model_dump(mode="json"),
                "sessions": compared,
                "public": public,
                **timing,
            }
        )
    student = variants[runtimes[0]]
    return {
        "student": student,
        "student_runtimes": variants,
        "runtime_ratios": runtime_ratios(variants),
        "teacher": teacher,
        "student_cached_stream": cached,
        "ratio": ratio_row(student, teacher),
        "machine": machine_info(baseline, load_before, os.getloadavg()),
        "setup": {
            "pool_sessions": len(pool),
            "student_sessions": len(measured),
            "labeled_sessions": len(eval_sessions),
            "teacher_sessions": len(compared),
            "public_sessions": len(public),
            "stream_sessions": len(stream),
            "mean_lines_student": round(float(np.mean([len(s) for s in measured])), 2),
            "mean_lines_teacher": round(float(np.mean([len(s) for s in compared])), 2),
            "repeats": repeats,
            "batch_size": batch_size,
            "seed": seed,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }


def ratio_row(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Teacher cost over student cost on the same sessions, and whether the issue's targets hold.

    The memory target is checked on the whole run's peak (batched requests included) and, as
    ``student_rss_met_batch1``, on the peak up to the end of the batch-1 passes.
    """
    same = student["same_sessions"]
    speedup = teacher["batch1"]["p50_ms"] / same["batch1"]["p50_ms"]
    return {
        "sessions_compared": same["sessions"],
        "speedup_p50": round(speedup, 1),
        "speedup_p99": round(teacher["batch1"]["p99_ms"] / same["batch1"]["p99_ms"], 1),
        "speedup_mean": round(teacher["batch1"]["mean_ms"] / same["batch1"]["mean_ms"], 1),
        "speedup_batched": round(same["batched"]["sessions_per_s"] / teacher["batched"]["sessions_per_s"], 1),
        "memory": round(teacher["peak_rss_mb"] / student["peak_rss_mb"], 2),
        "target_speedup": TARGET_SPEEDUP,
        "speedup_met": bool(speedup >= TARGET_SPEEDUP),
        "target_student_rss_mb": TARGET_STUDENT_RSS_MB,
        "student_rss_met": bool(student["peak_rss_mb"] <= TARGET_STUDENT_RSS_MB),
        "student_rss_met_batch1": bool(student["peak_rss_batch1_mb"] <= TARGET_STUDENT_RSS_MB),
    }


def runtime_ratios(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each ONNX row against the torch row of the same run, and whether issue 18's targets hold.

    Throughput is the uncached rate in ``batch_size``-session requests over all measured
    sessions; p50 the batch-1 median; F1 (when measured) on the labelled held-out split, int8
    also against ONNX fp32.
    """
    if "torch-fp32" not in variants:
        return {}
    ref = variants["torch-fp32"]
    out: dict[str, Any] = {}
    for name, row in variants.items():
        if name == "torch-fp32":
            continue
        throughput = row["batched"]["sessions_per_s"] / ref["batched"]["sessions_per_s"]
        p50 = row["batch1"]["p50_ms"] / ref["batch1"]["p50_ms"]
        entry: dict[str, Any] = {
            "throughput_x": round(throughput, 2),
            "p50_fraction": round(p50, 3),
            "peak_rss_mb": row["peak_rss_mb"],
            "throughput_met": bool(throughput >= TARGET_ONNX_THROUGHPUT),
            "p50_met": bool(p50 <= TARGET_ONNX_P50),
            "rss_met": bool(row["peak_rss_mb"] <= TARGET_ONNX_RSS_MB),
        }
        if "test" in row and "test" in ref:
            entry["f1_minus_torch"] = round(row["test"]["f1"] - ref["test"]["f1"], 4)
            entry["f1_met"] = bool(abs(entry["f1_minus_torch"]) <= TARGET_F1_LOSS)
        fp32 = variants.get("onnx-fp32")
        if name == "onnx-int8" and fp32 is not None and "test" in row and "test" in fp32:
            entry["f1_minus_onnx_fp32"] = round(row["test"]["f1"] - fp32["test"]["f1"], 4)
            entry["int8_f1_met"] = bool(entry["f1_minus_onnx_fp32"] >= -TARGET_F1_LOSS)
        out[name] = entry
    out["targets"] = {
        "throughput_x": TARGET_ONNX_THROUGHPUT, "p50_fraction": TARGET_ONNX_P50,
        "peak_rss_mb": TARGET_ONNX_RSS_MB, "f1_loss": TARGET_F1_LOSS,
    }
    return out


def binary_quality(labels: Sequence[int], probs: Sequence[float]) -> dict[str, Any]:
    """F1 and friends at the detector's own 0.5 boundary (never tuned on these labels)."""
    from feddale.method.metrics import binary_report

    report = binary_report(labels, probs, 0.5)
    return {k: report[k] for k in ("f1", "precision", "recall", "roc_auc") if k in report} | {"sessions": len(labels)}


def held_out_sessions(cfg: Any, seed: int, source: str | None = None) -> list[tuple[list[str], int]]:
    """The labelled test split `feddale simulate` evaluates the same config and seed on (``labeled``)."""
    from feddale.data.deployment import federation_split

    split = federation_split(cfg.data, seed, source)
    return [(list(ls.session.messages), ls.label) for ls in split.test]


def _check_labeled(labeled: Sequence[tuple[Sequence[str], int]] | None) -> tuple[Sessions, list[int]]:
    if labeled is None:
        return [], []
    pairs = list(labeled)
    sessions = check_sessions([s for s, _ in pairs], "labeled")
    labels = [y for _, y in pairs]
    if any(isinstance(y, bool) or y not in (0, 1) for y in labels):
        raise ValueError("labeled: every label must be 0 or 1")
    return sessions, labels


def machine_info(
    baseline: dict[str, Any], load_before: tuple[float, ...], load_after: tuple[float, ...]
) -> dict[str, Any]:
    """What the numbers depend on; the load averages show whether the machine was shared meanwhile."""
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": baseline["torch_threads"],
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "nice": os.nice(0),
        "device": baseline["device"],
        "torch": baseline["torch_version"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "baseline_python_torch_rss_mb": baseline["peak_rss_mb"],
        "rss_note": RSS_NOTE,
    }


def _cpu_model() -> str:
    """The CPU's marketing name: latencies mean little without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- workers (parent side)


def run_worker(job: dict[str, Any], workdir: Path, progress: bool) -> dict[str, Any]:
    """Run one row's measurement in a fresh interpreter and return the row it wrote."""
    role = job["role"]
    job_file, out_file = workdir / f"{role}.job.json", workdir / f"{role}.out.json"
    job_file.write_text(json.dumps({**job, "out": str(out_file)}))
    if progress:
        print(f"[cost] {role}: measuring in a fresh process ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "feddale.harness.bench.cost", "--worker", str(job_file)],
        stdout=subprocess.DEVNULL,
        stderr=None if progress else subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        detail = proc.stderr[-4000:] if proc.stderr else "(its stderr is above)"
        raise RuntimeError(f"{role} worker failed (exit {proc.returncode}):\n{detail}")
    if progress:
        print(f"[cost] {role}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return json.loads(out_file.read_text())


# --------------------------------------------------------------------------- workers (child side)


def run_job(job_file: Path) -> None:
    """Worker entry: measure one row, add this process's memory and threads, write the row."""
    job = json.loads(Path(job_file).read_text())
    row = ROLES[job["role"]](job)
    row.update(process_info())
    Path(job["out"]).write_text(json.dumps(row, indent=1))


def process_info() -> dict[str, Any]:
    """This process's id, peak memory (see the module docstring), torch threads (when the row
    loaded torch; importing it here would inflate an ONNX row's memory) and the load it ran under."""
    torch = sys.modules.get("torch")
    return {
        "pid": os.getpid(),
        "peak_rss_mb": _status_mb("VmHWM"),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "torch_loaded": torch is not None,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def _status_mb(field: str) -> float:
    """A memory figure (kB) from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory needs Linux")


def baseline_row(job: dict[str, Any]) -> dict[str, Any]:
    """A bare ``import torch``: the floor every detector process starts from."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"what": "python + import torch", "torch_version": torch.__version__, "device": device}


def note(role: str, message: str) -> None:
    """A phase line on stderr: the parent shows it when asked for progress (real runs take minutes)."""
    print(f"[cost] {role}: {message}", file=sys.stderr, flush=True)


def warm_up(detect: Detect, sessions: Sessions) -> None:
    """Untimed calls so that one-off first-call costs stay out of the latencies."""
    for session in sessions[:WARMUP_CALLS]:
        detect([session])


def time_calls(detect: Detect, sessions: Sessions, repeats: int) -> np.ndarray:
    """Seconds of each batch-1 call, shape (repeats, sessions): one request per session."""
    seconds = np.empty((repeats, len(sessions)))
    for r in range(repeats):
        for i, session in enumerate(sessions):
            started = time.perf_counter()
            detect([session])
            seconds[r, i] = time.perf_counter() - started
    return seconds


def latency_summary(seconds: np.ndarray) -> dict[str, Any]:
    """p50/p99/mean/max in milliseconds over all calls, and the batch-1 rate they imply."""
    ms = np.asarray(seconds, dtype=np.float64).ravel() * 1000.0
    return {
        "calls": int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "max_ms": round(float(ms.max()), 3),
        "sessions_per_s": round(1000.0 / float(ms.mean()), 2),
    }


def batched_rate(detect: Detect, sessions: Sessions, batch_size: int, repeats: int) -> dict[str, Any]:
    """Sessions per second when each request carries ``batch_size`` sessions; the median pass counts."""
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(sessions), batch_size):
            detect(sessions[start : start + batch_size])
        passes.append(time.perf_counter() - started)
    total = float(np.median(passes))
    return {
        "batch_size": batch_size,
        "sessions_per_s": round(len(sessions) / total, 2),
        "ms_per_session": round(1000.0 * total / len(sessions), 3),
    }


def _student_detector(job: dict[str, Any], **options: Any):
    """Load the artifact and build its detector; returns (detector, load seconds, RSS once loaded)."""
    from feddale.method.artifact import StudentArtifact
    from feddale.method.detector import Detector

    started = time.perf_counter()
    runtime = {"runtime": job.get("runtime", "torch"), "precision": job.get("precision", "fp32")}
    detector = Detector(StudentArtifact.load(job["student_dir"]), **runtime, **options)  # its own batching, as served
    return detector, round(time.perf_counter() - started, 2), _status_mb("VmRSS")


def _student_description(detector) -> dict[str, Any]:
    """Which student was timed, so rows from different runs can be told apart."""
    meta = detector.artifact.meta
    return {
        "detector": "student",
        "runtime": detector.runtime,
        "model": meta.base,
        "artifact_version": meta.version,
        "max_len": meta.max_len,
        "view": meta.view,
        "threshold": detector.threshold,
        "device": detector.device,
    }


def student_row(job: dict[str, Any]) -> dict[str, Any]:
    """The student's raw cost: cache off, every text distinct, so every call runs the model.

    After the timed passes it scores the labelled sessions (``eval``) in one call, with the
    detector's in-call deduplication, and returns their probabilities for the parent's F1.
    """
    detector, load_s, loaded_mb = _student_detector(job, cache_size=0)
    sessions, n, repeats = job["sessions"], job["compare"], job["repeats"]
    warm_up(detector.predict_proba, sessions)
    detector.clear_cache()
    note("student", f"loaded in {load_s} s; {repeats} batch-1 pass(es) over {len(sessions)} sessions")
    calls = time_calls(detector.predict_proba, sessions, repeats)
    peak_batch1_mb = _status_mb("VmHWM")  # batched requests come next and need more activation memory
    note("student", f"batch-1 p50 {np.median(calls) * 1000:.1f} ms; batched passes")
    batched = batched_rate(detector.predict_proba, sessions, job["batch_size"], repeats)
    same = {
        "sessions": n,
        "batch1": latency_summary(calls[:, :n]),
        "batched": batched_rate(detector.predict_proba, sessions[:n], job["batch_size"], repeats),
    }
    info = detector.cache_info()
    peak_timed_mb = _status_mb("VmHWM")
    evaluated = job.get("eval") or []
    eval_probs = [float(p) for p in detector.predict_proba(evaluated)] if evaluated else []
    return {
        **_student_description(detector),
        "sessions": len(sessions),
        "load_s": load_s,
        "rss_after_load_mb": loaded_mb,
        "peak_rss_batch1_mb": peak_batch1_mb,
        "peak_rss_timed_mb": peak_timed_mb,
        "eval_probs": eval_probs,
        "batch1": latency_summary(calls),
        "batched": batched,
        "same_sessions": same,
        "cache_size": info["max_size"],
        "cache_hits": info["hits"],
        "cache_misses": info["misses"],
    }


def cached_stream_row(job: dict[str, Any]) -> dict[str, Any]:
    """The student as the detector service runs it (its runtime, default LRU cache) on a stream with the data's repetition.

    One batch-1 pass starting from an empty cache, cold start included. No batched pass: a miss
    costs what the raw row measures and a hit skips the model in any batch, so it would add
    minutes of run time and nothing new.
    """
    detector, load_s, loaded_mb = _student_detector(job)
    stream = job["sessions"]
    warm_up(detector.predict_proba, stream)
    detector.clear_cache()
    note("student_stream", f"loaded in {load_s} s; batch-1 pass over a stream of {len(stream)} sessions")
    calls = time_calls(detector.predict_proba, stream, repeats=1)
    info = detector.cache_info()
    return {
        **_student_description(detector),
        "sessions": len(stream),
        "load_s": load_s,
        "rss_after_load_mb": loaded_mb,
        "batch1": latency_summary(calls),
        "cache_size": info["max_size"],
        "cache_hits": info["hits"],
        "cache_misses": info["misses"],
        "hit_rate": round(info["hits"] / len(stream), 4),
    }


def load_teacher(model_ref: str, adapter_file: str | None, quantization: str) -> tuple[Any, Any, dict[str, Any]]:
    """The teacher as a client holds it, base LM plus LoRA; returns (model, tokenizer, adapter description)."""
    from feddale.method import adapters, models

    base, tokenizer = models.load_causal_lm(model_ref, quantization)
    if adapter_file is None:
        model = models.add_lora(base, task="causal")
        return model, tokenizer, {"source": "fresh untrained LoRA", "rank": models.lora_meta(model)["rank"]}
    blob = Path(adapter_file).read_bytes()
    state, meta = adapters.adapter_from_bytes(blob)
    model = models.add_lora(
        base, rank=int(meta["rank"]), alpha=int(meta["alpha"]), dropout=float(meta["dropout"]), task="causal"
    )
    built_for = models.lora_meta(model)["base"]
    if meta.get("base") != built_for:
        raise ValueError(f"adapter {adapter_file} was trained on {meta.get('base')!r}, not on {built_for!r}")
    adapters.load_adapter_state(model, state)
    origin = {"source": str(adapter_file), "sha256": hashlib.sha256(blob).hexdigest(), "rank": int(meta["rank"])}
    return model, tokenizer, origin


def teacher_row(job: dict[str, Any]) -> dict[str, Any]:
    """Teacher scoring as a detector: top-k accuracy below the public sample's Otsu cut is anomalous.

    The teacher keeps no cache across calls and the texts are distinct, so every session
    requested is scored (``cache_hits`` is 0 by construction, ``cache_misses`` counts them).
    """
    from feddale.method import models, teacher
    from feddale.method.threshold import otsu_threshold

    cfg = teacher.ScoreConfig.model_validate(job["score_cfg"])
    started = time.perf_counter()
    model, tokenizer, adapter = load_teacher(job["teacher_model"], job["teacher_adapter"], job["quantization"])
    load_s, loaded_mb = round(time.perf_counter() - started, 2), _status_mb("VmRSS")

    def score(sessions: Sessions) -> np.ndarray:
        texts = [session_text(s) for s in sessions]
        return teacher.score_texts(model, tokenizer, texts, cfg, progress=False)

    note("teacher", f"loaded in {load_s} s; scoring {len(job['public'])} public sessions for the Otsu cut")
    started = time.perf_counter()
    cut = otsu_threshold(score(job["public"]))
    calibrate_s = round(time.perf_counter() - started, 2)
    scored = [0]

    def detect(sessions: Sessions) -> np.ndarray:
        scored[0] += len(sessions)
        return score(sessions) < cut

    sessions, repeats = job["sessions"], job["repeats"]
    warm_up(detect, sessions)
    scored[0] = 0
    note("teacher", f"cut {cut:.4f} in {calibrate_s} s; {repeats} batch-1 pass(es) over {len(sessions)} sessions")
    calls = time_calls(detect, sessions, repeats)
    peak_batch1_mb = _status_mb("VmHWM")
    note("teacher", f"batch-1 p50 {np.median(calls) * 1000:.1f} ms; batched passes")
    described = models.describe(model)
    return {
        "detector": "teacher",
        "model": job["teacher_model"],
        "adapter": adapter,
        "quantization": job["quantization"],
        "dtype": described["dtype"],
        "device": described["device"],
        "score": cfg.model_dump(mode="json"),
        "threshold_accuracy": round(float(cut), 6),
        "public_sessions": len(job["public"]),
        "calibrate_s": calibrate_s,
        "sessions": len(sessions),
        "load_s": load_s,
        "rss_after_load_mb": loaded_mb,
        "peak_rss_batch1_mb": peak_batch1_mb,
        "batch1": latency_summary(calls),
        "batched": batched_rate(detect, sessions, job["batch_size"], repeats),
        "cache_size": 0,
        "cache_hits": 0,
        "cache_misses": scored[0],
    }


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "baseline": baseline_row,
    "student": student_row,
    "student_stream": cached_stream_row,
    "teacher": teacher_row,
}


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m feddale.harness.bench.cost``: measure the table on a data set and write it as JSON."""
    parser = argparse.ArgumentParser(prog="python -m feddale.harness.bench.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--student", type=Path, help="student artifact directory")
    parser.add_argument("--teacher-model", help="teacher model reference (default: the config's)")
    parser.add_argument("--teacher-adapter", type=Path, help="teacher LoRA safetensors (default: fresh LoRA)")
    parser.add_argument("--data", help="data spec, e.g. hdfs-csv:DIR or jsonl:FILE (feddale.data.sources)")
    parser.add_argument("--config", default="cpu", help="profile or file giving the score config (default cpu)")
    parser.add_argument("--pool", type=int, default=5000, help="sessions drawn as traffic (default 5000)")
    parser.add_argument("--n-public", type=int, default=100, help="public sessions for the Otsu cut (default 100)")
    parser.add_argument("--n-student", type=int, default=500)
    parser.add_argument("--n-teacher", type=int, default=50)
    parser.add_argument("--stream", type=int, default=2000, help="cached-stream length (default 2000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtimes", default=",".join(STUDENT_RUNTIMES),
                        help=f"student rows, comma-separated (default {','.join(STUDENT_RUNTIMES)})")
    parser.add_argument("--no-f1", action="store_true",
                        help="skip the F1 of each student row on the config's held-out test split")
    parser.add_argument("--out", type=Path, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.worker:
        run_job(args.worker)
        return 0
    required = {"--student": args.student, "--data": args.data, "--out": args.out}
    missing = [flag for flag, value in required.items() if not value]
    if missing:
        parser.error(f"missing {', '.join(missing)}")

    from feddale.data.sources import load_dataset
    from feddale.method.config import load_config

    cfg = load_config(args.config)
    pool, public = sample_sessions(load_dataset(args.data, seed=args.seed), args.pool, args.n_public, args.seed)
    labeled = None if args.no_f1 else held_out_sessions(cfg, args.seed, args.data)
    result = measure_cost(
        args.student,
        args.teacher_model or cfg.teacher_model,
        args.teacher_adapter,
        cfg.score,
        pool,
        public,
        quantization=cfg.quantization,
        n_student=args.n_student,
        n_teacher=args.n_teacher,
        stream_length=args.stream,
        repeats=args.repeats,
        batch_size=args.batch_size,
        seed=args.seed,
        labeled=labeled,
        runtimes=[r.strip() for r in args.runtimes.split(",") if r.strip()],
    )
    result["setup"].update({"data": args.data, "config": args.config, "student_dir": str(args.student)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratio": result["ratio"], "runtime_ratios": result["runtime_ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
