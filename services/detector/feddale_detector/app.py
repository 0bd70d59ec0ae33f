"""The detector's HTTP API: /v1/detect and /v1/model over the latest published student.

A follower thread polls the coordinator and loads each newly published student next to the
one serving; the swap is atomic, so no request fails or mixes versions during an update.
The detector registers as role `detector` (with the enrollment token the admin issued it, or
the bootstrap secret): its token can read students and nothing else. Students run on ONNX
Runtime (fp32, or int8 with FEDDALE_DETECTOR_PRECISION=int8); this service imports neither
torch nor transformers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from feddale.service.heartbeat import HeartbeatSender, detector_stats, heartbeat
from feddale.service.http import CoordinatorSession
from feddale.service.intake import add_intake_routes, known_sources
from feddale.service.observability import Metrics, add_ops_routes
from feddale.service.serving import MicroBatcher, ModelSlot, add_detect_routes, coordinator_follower

from feddale_detector.settings import Settings


def create_app(settings: Settings, transport: httpx.BaseTransport | None = None) -> FastAPI:
    stop = threading.Event()
    session = CoordinatorSession(
        settings.coordinator_url, settings.bootstrap_secret, settings.name, "detector", transport=transport, stop=stop,
        ca=settings.tls_ca, enrollment_token=settings.enrollment_token, credential_file=settings.credential_file,
    )
    metrics = Metrics("feddale_detector")
    slot = ModelSlot()
    batcher = MicroBatcher(slot, max_batch=settings.batch_sessions, max_wait_s=settings.batch_wait_ms / 1000,
                           max_queue=settings.queue_requests, metrics=metrics)
    follower = coordinator_follower(session, slot, cache_dir=settings.state_dir, options=settings.serving())
    started_at = time.time()
    beats = HeartbeatSender(session, lambda: heartbeat(
        "serving" if slot.current else "waiting for a student",
        model_version=slot.current.version if slot.current else None,
        detector=detector_stats(metrics, started_at),
    ))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        thread = threading.Thread(target=follower.run, args=(stop, settings.student_poll_s), daemon=True)
        thread.start()
        beats.start(stop)
        try:
            yield
        finally:
            stop.set()
            await batcher.stop()
            session.close()

    app = FastAPI(title="FedDALE detector", version="0.1.0", lifespan=lifespan,
                  description="Log-session anomaly detection with the latest published student.")
    app.state.slot = slot

    def readiness() -> dict[str, bool]:
        """Ready = able to answer /v1/detect: a student is loaded (the coordinator may be away)."""
        return {"student": slot.current is not None}

    add_ops_routes(app, metrics, readiness)
    add_detect_routes(app, slot, batcher, metrics)
    add_intake_routes(app, slot, metrics, known_sources(settings.sources), settings.intake(), stop=stop,
                      score=batcher.detect)
    metrics.gauge_fn("model_loaded", lambda: 0.0 if slot.current is None else 1.0)
    return app
