"""`make demo` / `feddale demo`: a real local federation, one one-shot run, an honest scorecard.

Starts every service as its own process (:class:`~feddale.ops.launcher.LocalFederation`), starts a
one-shot run over REST, shows its progress, then evaluates the published student *through the
detector's* `POST /v1/detect` on the held-out test split. This harness is the only place labels
are read, and only to score the answers; nothing here feeds back into the run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from feddale.method import metrics
from feddale.method.config import load_config
from feddale.data.deployment import federation_split, resolve_source
from feddale.service.http import poll_until
from feddale.ops.launcher import LocalFederation

DETECT_BATCH = 32
T = TypeVar("T")


def _progress(admin: httpx.Client, run_id: str, timeout_s: float, every_s: float = 60.0) -> dict[str, Any]:
    """Poll the run, printing a line when its state changes and at least every ``every_s``.

    Why the heartbeat: on the cpu profile a round's client work takes many minutes without a
    state change, and a silent terminal looks like a hang.
    """
    start, last, printed, view = time.monotonic(), "", 0.0, {}
    while time.monotonic() - start < timeout_s:
        view = admin.get(f"/v1/runs/{run_id}").json()
        alive = sum(1 for c in view["clients"].values() if c.get("alive"))
        state = (f"{view['status']:<16} round {view['round']}  uploads {len(view['uploaded'])}/"
                 f"{len(view['expected'])}  clients alive {alive}/{len(view['clients'])}")
        now = time.monotonic()
        if state != last or now - printed >= every_s:
            print(f"  [{now - start:6.0f} s] {state}", flush=True)
            last, printed = state, now
        if view["status"] in ("published", "failed"):
            return view
        time.sleep(2.0)
    raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f} s (last status {view.get('status')})")


def _evaluate(detector_url: str, test: list[Any], threshold: float) -> dict[str, Any]:
    """Send a test split to /v1/detect in batches; F1 etc. from its answers, plus latency.

    ``threshold`` is the one the detector reports (``GET /v1/model``): the report is computed
    at it, and ``flagged`` counts the detector's own ``anomaly`` verdicts, which must agree.
    """
    scores: list[float] = []
    flagged = 0
    latencies: list[float] = []
    versions: set[str] = set()
    with httpx.Client(base_url=detector_url, timeout=300) as http:
        for batch in chunked(test, DETECT_BATCH):
            body = {"sessions": [{"id": ls.session.id, "messages": list(ls.session.messages)} for ls in batch]}
            start = time.perf_counter()
            response = http.post("/v1/detect", json=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            answer = response.json()
            versions.add(answer["model_version"])
            scores.extend(r["score"] for r in answer["results"])
            flagged += sum(r["anomaly"] for r in answer["results"])
    report = metrics.binary_report([ls.label for ls in test], scores, threshold=threshold)
    report["flagged"] = flagged
    report["model_versions"] = sorted(versions)
    report["latency_ms_p50"] = 1000 * statistics.median(latencies)
    report["latency_ms_p95"] = 1000 * float(np.percentile(latencies, 95))
    report["sessions_per_s"] = len(test) / sum(latencies)
    return report


def _adapter_bytes(cfg: Any) -> int:
    """Size of one teacher LoRA adapter on the wire: what each client would send per FedAvg round."""
    from feddale.method import adapters, models

    base, _ = models.load_causal_lm(cfg.teacher_model, cfg.quantization, seed=cfg.seeds[0])
    peft = models.add_lora(base, rank=cfg.teacher_lora_rank, task="causal", seed=cfg.seeds[0])
    return len(adapters.adapter_to_bytes(adapters.adapter_state(peft), models.lora_meta(peft)))


def demo(clients: int = 4, config: str = "cpu", data: str | None = None) -> int:
    """Run the demo; returns the process exit code (0 when a student was published and evaluated)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll would drown the progress
    overrides: dict[str, Any] = {"data.n_clients": clients}
    if data:
        overrides["data.source"] = data
    cfg = load_config(config, overrides)
    source = resolve_source(cfg.data, data)
    out = Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"FedDALE demo: {clients} client nodes, config {config!r}, data {source!r}")
    print(f"teacher {cfg.teacher_model}, student {cfg.student.base}; logs in {out / 'logs'}")
    wall = time.monotonic()
    with LocalFederation(clients, config, source, log_dir=out) as fed:
        print(f"services up in {time.monotonic() - wall:.0f} s: coordinator {fed.coordinator_url}, "
              f"detector {fed.detector_url}")
        with fed.admin() as admin:
            created = admin.post("/v1/runs", json={"mode": "one_shot", "min_clients": clients})
            created.raise_for_status()
            run_id = created.json()["run_id"]
            print(f"one-shot run {run_id} started")
            view = _progress(admin, run_id, timeout_s=3 * 3600)
        if view["status"] != "published":
            print(f"run failed: {view['reason']}")
            return 1
        version = view["student_version"]
        print(f"student {version} published; waiting for the detector to serve it ...")

        def serving() -> bool:
            try:
                return httpx.get(f"{fed.detector_url}/v1/model", timeout=5).json().get("version") == version
            except (httpx.HTTPError, ValueError):
                return False

        if not poll_until(serving, 300, 1.0):
            print("the detector did not load the published student in 300 s")
            return 1
        threshold = httpx.get(f"{fed.detector_url}/v1/model", timeout=5).json()["threshold"]
        split = federation_split(cfg.data, cfg.seeds[0], source)
        print(f"evaluating on {len(split.test)} held-out test sessions through POST /v1/detect "
              f"(threshold {threshold:.4g}, the student's own) ...")
        report = _evaluate(fed.detector_url, list(split.test), threshold)
        natural = None
        if split.natural:
            print(f"... and on {len(split.natural)} sessions at the natural anomaly rate")
            natural = _evaluate(fed.detector_url, list(split.natural), threshold)
    adapter = _adapter_bytes(cfg)
    run_seconds = time.monotonic() - wall
    _print_table(view, report, natural, adapter, run_seconds)
    (out / "demo-results.json").write_text(json.dumps(
        {"run": view, "evaluation": report, "natural": natural, "fedavg_adapter_bytes": adapter,
         "seconds": run_seconds}, indent=2
    ))
    print(f"results: {out / 'demo-results.json'}")
    return 0


def _print_table(view: dict[str, Any], report: dict[str, Any], natural: dict[str, Any] | None, adapter: int,
                 seconds: float) -> None:
    rows = [
        ("student version", view["student_version"]),
        ("decision threshold", f"{report['threshold']:.4g} (chosen without labels)"),
        ("test sessions", f"{report['n']} ({report['tp'] + report['fn']} anomalous)"),
        ("F1", f"{report['f1']:.3f}"),
        ("precision", f"{report['precision']:.3f}"),
        ("recall", f"{report['recall']:.3f}"),
        ("ROC-AUC", "n/a" if report["roc_auc"] is None else f"{report['roc_auc']:.3f}"),
    ]
    if natural is not None:
        rows += [
            ("natural-rate sessions", f"{natural['n']} ({natural['tp'] + natural['fn']} anomalous)"),
            ("natural-rate F1 (P / R)", f"{natural['f1']:.3f} ({natural['precision']:.3f} / {natural['recall']:.3f})"),
            ("false alarms per 10k normal", f"{natural['false_alarms_per_10k']:.0f}"),
        ]
    for client_id, c in sorted(view["clients"].items()):
        rows.append((f"{c['name']} bytes up / down", f"{c['bytes_up']:,} / {c['bytes_down']:,}"))
    rows += [
        ("FedAvg, per client per round", f"{adapter:,} up / {adapter:,} down (one teacher LoRA adapter)"),
        ("uplink vs one FedAvg round",
         f"{adapter / max(1, max(c['bytes_up'] for c in view['clients'].values())):,.0f}x smaller"),
        ("detector latency", f"p50 {report['latency_ms_p50']:.0f} ms, p95 {report['latency_ms_p95']:.0f} ms "
                             f"per {DETECT_BATCH}-session request ({report['sessions_per_s']:.0f} sessions/s)"),
        ("wall time", f"{seconds / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print("-" * (width + 50))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 50))


def chunked(items: list[T], size: int) -> Iterator[list[T]]:
    """``items`` in consecutive slices of at most ``size`` (the detector's request size)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
