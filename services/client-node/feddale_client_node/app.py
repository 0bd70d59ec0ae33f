"""The client node's HTTP face: /v1/detect on its own student, status, and ops routes.

The agent (registration, polling, training, uploads) and the student follower run in
background threads started by the app's lifespan, so one process is one node.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from feddale.service.heartbeat import HeartbeatSender, heartbeat
from feddale.service.http import CoordinatorSession, RegistrationRefused
from feddale.service.observability import Metrics, add_ops_routes
from feddale.service.serving import MicroBatcher, ModelSlot, add_detect_routes, coordinator_follower

from feddale_client_node.agent import ClientAgent
from feddale_client_node.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, transport: httpx.BaseTransport | None = None) -> FastAPI:
    stop = threading.Event()
    session = CoordinatorSession(
        settings.coordinator_url, settings.bootstrap_secret, settings.name, "client", transport=transport, stop=stop,
        ca=settings.tls_ca, enrollment_token=settings.enrollment_token, credential_file=settings.credential_file,
    )
    metrics = Metrics("feddale_client_node")
    agent = ClientAgent(session, data=settings.data, log_dir=settings.log_dir, state_dir=settings.state_dir,
                        metrics=metrics, sources=settings.sources, sources_poll_s=settings.sources_poll_s)
    slot = ModelSlot()
    batcher = MicroBatcher(slot, metrics=metrics)
    follower = coordinator_follower(session, slot, cache_dir=settings.state_dir, on_swap=agent.detect_own_logs)
    # Beats from their own thread from the start, so loading a shard or training for minutes never reads as dead.
    beats = HeartbeatSender(session, lambda: heartbeat(
        agent.status.get("state", "starting"), model_version=slot.current.version if slot.current else None,
        sessions=len(agent.sessions) if agent.sessions else None,
    ))

    def work() -> None:
        beats.start(stop)
        try:
            agent.start()
        except RegistrationRefused as exc:  # an operator must act; say what, in one line
            log.error("client node cannot join: %s", exc)
            agent.status = {"state": "cannot join", "reason": str(exc)}
            return
        except Exception:
            if not stop.is_set():
                log.exception("client node could not start")
            return
        threading.Thread(target=follower.run, args=(stop, settings.student_poll_s), daemon=True).start()
        agent.run(stop)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        worker = threading.Thread(target=work, name="client-agent", daemon=True)
        worker.start()
        try:
            yield
        finally:
            stop.set()
            await batcher.stop()
            session.close()

    app = FastAPI(title="FedDALE client node", version="0.1.0", lifespan=lifespan,
                  description="Local teacher training and detection on this node's own logs.")
    app.state.agent = agent

    def readiness() -> dict[str, bool]:
        try:
            coordinator = session.http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            coordinator = False
        return {"coordinator": coordinator, "registered": session.registration is not None}

    add_ops_routes(app, metrics, readiness)
    add_detect_routes(app, slot, batcher, metrics)

    @app.get("/v1/status", tags=["node"])
    def status() -> dict[str, Any]:
        """What this node is doing, and what the latest student found in its own logs."""
        current = slot.current
        return {**agent.status, "model_version": current.version if current else None, "own_logs": agent.report}

    return app
