#!/usr/bin/env python
"""Bounded load test of the detector on loopback: N concurrent clients for T seconds.

By default it starts everything it needs: a student (a tiny random one in seconds, or a real
MiniLM student trained briefly on synthetic HDFS sessions), a stub coordinator in this process
that publishes just that student, and a real detector process (`python -m feddale_detector`)
that registers with the stub, downloads the student and serves `POST /v1/detect`. With `--url`
it drives a detector that is already running instead.

Each client is a closed loop (send, wait for the answer, send again) over its own keep-alive
connection, posting `--sessions` synthetic HDFS sessions per request. The detector caches
scores by masked session text, and masked HDFS sessions repeat a lot; by default every session
sent ends with a unique marker line, so each one is scored by the model (`--cache-hits` sends
the synthetic sessions as they are, which after the first round are all cache hits). After `--warmup` seconds
the measurement runs for `--duration` seconds and reports, as one JSON object on stdout:
requests and sessions per second, latency p50/p90/p99/max, errors (any non-200, transport
error or answer without a model version), and the detector's resident memory (RSS) at the
start and end of the measurement and its maximum, sampled every half second.

    .venv/bin/python scripts/load_detector.py --clients 32 --duration 60 --student minilm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the student


def synthetic_sessions(n_normal: int, n_anomalous: int, seed: int = 0) -> tuple[list[list[str]], list[int]]:
    from feddale.data.synthetic import generate

    data = generate(n_normal, n_anomalous, seed)
    assert data.labels is not None
    return [list(s.messages) for s in data.sessions], list(data.labels)


def build_student(kind: str, seed: int = 0) -> bytes:
    """Artifact bytes: ``tiny`` (random tiny BERT), ``minilm`` (bundled MiniLM, a short training
    on synthetic sessions: the real model size, not a tuned model) or a path to an artifact
    directory (``student.json`` + ``student.safetensors``) or a ``.bin`` blob."""
    from feddale.method.student import StudentArtifact, StudentConfig, train_student

    path = Path(kind)
    if path.is_dir():
        return StudentArtifact.load(path).to_bytes()
    if path.is_file():
        return StudentArtifact.from_bytes(path.read_bytes()).to_bytes()
    sessions, labels = synthetic_sessions(48, 48, seed)
    texts = [" ;-; ".join(s) for s in sessions]
    if kind == "tiny":
        cfg = StudentConfig(base="tiny:bert", steps=2, batch_size=8, micro_batch=8, max_len=64, seed=seed)
    elif kind == "minilm":
        cfg = StudentConfig(base="builtin:minilm-l6", view="compact", steps=4, batch_size=16, micro_batch=16,
                            max_len=256, lr=0.003, seed=seed)
    else:
        raise SystemExit(f"--student must be tiny, minilm or an artifact path, got {kind!r}")
    return train_student(texts, labels, cfg, progress=False).to_bytes()


# --------------------------------------------------------------------------- stub coordinator + detector


def stub_coordinator(blob: bytes) -> Any:
    """The three coordinator endpoints a detector uses, publishing one student."""
    from fastapi import FastAPI, Response

    from feddale.method.student import StudentArtifact

    artifact = StudentArtifact.from_bytes(blob)
    info = {"version": artifact.version, "run_id": "run-load", "base_model": artifact.meta.base,
            "published_at": time.time(), "bytes": len(blob), "sha256": artifact.digest,
            "path": f"/v1/students/{artifact.version}"}
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/clients/register", status_code=201)
    def register() -> dict[str, Any]:
        return {"client_id": "d-loadtest0000", "token": "d-loadtest0000.stub", "role": "detector"}

    @app.get("/v1/students/current")  # what detectors follow: the promoted student
    def current() -> dict[str, Any]:
        return info

    @app.get("/v1/students/{version}")
    def student(version: str) -> Response:
        return Response(blob, media_type="application/octet-stream")

    return app


@contextmanager
def serve_thread(app: Any) -> Iterator[str]:
    import uvicorn

    from feddale.ops.launcher import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("stub coordinator did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def detector_process(coordinator_url: str, log_path: Path, threads: int | None) -> Iterator[tuple[str, int]]:
    from feddale.ops.launcher import Service, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDDALE_")}
    env.update({"FEDDALE_COORDINATOR_URL": coordinator_url, "FEDDALE_BOOTSTRAP_SECRET": "load-test-bootstrap-secret",
                "FEDDALE_PORT": str(port), "FEDDALE_HOST": "127.0.0.1", "FEDDALE_STUDENT_POLL_S": "1",
                "FEDDALE_NODE_NAME": "detector-load", "FEDDALE_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    detector = Service("detector", [sys.executable, "-m", "feddale_detector"], env, log_path)
    detector.start()
    assert detector.process is not None
    try:
        yield f"http://127.0.0.1:{port}", detector.process.pid
    finally:
        detector.stop()


def wait_serving(url: str, timeout: float, pid: int | None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            raise RuntimeError("the detector process exited; see its log")
        try:
            response = httpx.get(f"{url}/v1/model", timeout=5)
            if response.status_code == 200:
                return str(response.json()["version"])
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the detector at {url} serves no student after {timeout:.0f} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists"; psutil tells the difference
    import psutil

    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


# --------------------------------------------------------------------------- the load


def marker(n: int) -> str:
    """A log line unique to ``n`` that survives masking (letters only: digits would be masked)."""
    letters = ""
    n += 26**3  # at least four letters
    while n:
        n, r = divmod(n, 26)
        letters += chr(ord("a") + r)
    return f"load-test marker {letters}"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


async def drive(url: str, clients: int, duration: float, warmup: float, per_request: int,
                pool: list[list[str]], distinct: bool = True) -> dict[str, Any]:
    """Closed-loop clients; only requests that start after the warm-up and end before the
    deadline are measured."""
    start = time.monotonic() + warmup
    end = start + duration
    latencies: list[float] = []
    errors: list[str] = []
    versions: dict[str, int] = {}
    sessions_done = 0

    async def client(i: int) -> None:
        nonlocal sessions_done
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            k = 0
            while time.monotonic() < end:
                batch = []
                for j in range(per_request):
                    n = (k + j) * clients + i  # unique over all clients and requests
                    messages = pool[n % len(pool)]
                    batch.append({"id": f"s{n}", "messages": [*messages, marker(n)] if distinct else messages})
                k += per_request
                t0 = time.monotonic()
                try:
                    response = await http.post("/v1/detect", json={"sessions": batch})
                    ok = response.status_code == 200
                    version = response.json().get("model_version") if ok else None
                    problem = None if ok and version else f"HTTP {response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError) as exc:
                    problem, version = repr(exc), None
                t1 = time.monotonic()
                if t0 < start or t1 > end:
                    continue
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(t1 - t0)
                    sessions_done += per_request
                    versions[version] = versions.get(version, 0) + 1  # type: ignore[index]

    await asyncio.gather(*(client(i) for i in range(clients)))
    latencies.sort()
    return {
        "requests": len(latencies) + len(errors), "errors": len(errors), "error_examples": errors[:5],
        "requests_per_s": round(len(latencies) / duration, 2), "sessions_per_s": round(sessions_done / duration, 2),
        "latency_ms": {name: round(1000 * percentile(latencies, q), 1)
                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "model_versions": versions,
    }


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            samples.append((time.monotonic(), process.memory_info().rss))
        except psutil.Error:
            return
        stop.wait(0.5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pool, _ = synthetic_sessions(200, 20, seed=1)
    with tempfile.TemporaryDirectory(prefix="feddale-load-") as tmp:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
            version = wait_serving(url, 30, None)
            return measure(args, url, pid, pool, version, student="(already running)")
        t0 = time.monotonic()
        blob = build_student(args.student)
        built_s = time.monotonic() - t0
        if args.save_student:
            args.save_student.write_bytes(blob)
        with serve_thread(stub_coordinator(blob)) as coordinator, \
                detector_process(coordinator, Path(tmp) / "detector.log", args.threads) as (url, pid):
            try:
                version = wait_serving(url, 300, pid)
            except (RuntimeError, TimeoutError):
                print((Path(tmp) / "detector.log").read_text()[-3000:], file=sys.stderr)
                raise
            result = measure(args, url, pid, pool, version, student=args.student)
            result["student_build_s"] = round(built_s, 1)
            return result


def measure(args: argparse.Namespace, url: str, pid: int | None, pool: list[list[str]], version: str,
            student: str) -> dict[str, Any]:
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = None
    if pid is not None:
        sampler = threading.Thread(target=sample_rss, args=(pid, stop, samples), daemon=True)
        sampler.start()
    began = time.monotonic()
    try:
        result = asyncio.run(drive(url, args.clients, args.duration, args.warmup, args.sessions, pool,
                                   distinct=not args.cache_hits))
    finally:
        stop.set()
        if sampler is not None:
            sampler.join(5)
    measured = [rss for t, rss in samples if t >= began + args.warmup]
    mib = 1024 * 1024
    result.update({
        "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
        "sessions_per_request": args.sessions, "student": student, "serving_version": version,
        "sessions_scored_by": "detector cache" if args.cache_hits else "model (every session distinct)",
        "detector_threads": args.threads or "default",
        "cpu_count": os.cpu_count(),
    })
    if measured:
        result["detector_rss_mib"] = {"start": round(measured[0] / mib, 1), "end": round(measured[-1] / mib, 1),
                                      "max": round(max(measured) / mib, 1)}
        # the highest RSS in each 10-second window of the measurement: a leak keeps climbing,
        # allocator high-water marks level off
        windows: dict[int, int] = {}
        for t, rss in samples:
            if t >= began + args.warmup:
                w = int((t - began - args.warmup) // 10)
                windows[w] = max(windows.get(w, 0), rss)
        result["detector_rss_mib_max_per_10s"] = [round(windows[w] / mib, 1) for w in sorted(windows)]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients (32)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds (60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first (5)")
    parser.add_argument("--sessions", type=int, default=1, help="sessions per request (1)")
    parser.add_argument("--cache-hits", action="store_true",
                        help="send repeating sessions (served from the detector's cache) instead of distinct ones")
    parser.add_argument("--student", default="tiny", help="tiny | minilm | artifact dir or .bin (tiny)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the detector (OMP_NUM_THREADS) and for building the student")
    parser.add_argument("--save-student", type=Path, help="write the student artifact bytes here (reuse: --student)")
    parser.add_argument("--url", help="drive this running detector instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the detector's pid, for memory sampling")
    parser.add_argument("--json-out", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.sessions < 1:
        parser.error("need --clients >= 1, --duration > 0, --warmup >= 0, --sessions >= 1")
    sys.path.insert(0, str(ROOT / "shared"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # for building the student here
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
