"""Heartbeats: client nodes and detectors tell the coordinator they are alive from a thread of their own.

Liveness used to come from a node's task polls, which stop while it trains or scores, so a node
busy for minutes read as dead (`make demo` printed `clients alive 0/2`). A beat is a small
`POST /v1/heartbeat` on a timer the coordinator sets (a quarter of its liveness TTL), sent from a
daemon thread that nothing else blocks: training holds the GIL only in short stretches between
torch kernels, which release it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import httpx

from feddale import __version__
from feddale.protocol.messages import DetectorStats, Heartbeat, HeartbeatAck
from feddale.service.http import CoordinatorSession
from feddale.service.observability import Metrics

log = logging.getLogger(__name__)

DETECT_ROUTES = ("/v1/detect", "/v1/detect/lines")


class HeartbeatSender:
    """Posts ``status()`` to the coordinator every ``interval_s`` (as the coordinator last asked) until stopped."""

    def __init__(self, session: CoordinatorSession, status: Callable[[], Heartbeat], interval_s: float = 5.0) -> None:
        self.session, self.status, self.interval_s = session, status, interval_s

    def beat_once(self) -> None:
        answer = self.session.request("POST", "/v1/heartbeat", json=self.status().model_dump(mode="json"))
        self.interval_s = max(0.1, HeartbeatAck.model_validate(answer.json()).interval_s)

    def run(self, stop: threading.Event) -> None:
        # Beat only once the node's own work registered it: a second, concurrent registration from
        # here would rotate the token the work loop was just given.
        while self.session.registration is None:
            if stop.wait(0.2):
                return
        while not stop.is_set():
            try:
                self.beat_once()
            except httpx.HTTPStatusError as exc:  # e.g. an older coordinator without the endpoint: keep trying
                log.warning("heartbeat refused: %s", exc)
            except Exception:
                if stop.is_set():  # the session was closed under us on shutdown
                    return
                log.exception("heartbeat failed")
            stop.wait(self.interval_s)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="heartbeat", daemon=True)
        thread.start()
        return thread


def heartbeat(state: str, *, model_version: str | None = None, sessions: int | None = None,
              detector: DetectorStats | None = None) -> Heartbeat:
    """A heartbeat body carrying this process's feddale version."""
    return Heartbeat(state=state, software=__version__, model_version=model_version, sessions=sessions,
                     detector=detector)


def _total(metrics: Metrics, name: str, label: str | None = None, values: Iterable[str] = ()) -> float:
    """Sum of a series' samples over all its labels (only those whose ``label`` is in ``values``, when given)."""
    wanted, values = f"{metrics.namespace}_{name}", set(values)
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == wanted and (label is None or sample.labels.get(label) in values):
                total += sample.value
    return total


def detector_stats(metrics: Metrics, started_at: float) -> DetectorStats:
    """A serving process's cumulative detection counters, read from its own Prometheus series.

    Sessions and anomalies come from ``verdicts_total`` (every judged session, whatever route or
    stream it came in by), so their ratio is the anomaly rate the alerts watch too.
    """
    return DetectorStats(
        requests=int(_total(metrics, "http_requests_total", "route", DETECT_ROUTES)),
        sessions=int(_total(metrics, "verdicts_total")),
        anomalies=int(_total(metrics, "verdicts_total", "verdict", ["anomaly"])),
        latency_s_sum=_total(metrics, "http_request_seconds_sum", "route", DETECT_ROUTES),
        started_at=started_at,
    )
