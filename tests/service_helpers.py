"""Helpers for the service tests: tokens, the fast test profile, recording HTTP, live servers.

Client nodes and the student job talk to the in-process coordinator through an httpx transport
that records every request, which is how the raw-logs-never-leave test sees exactly what a
client sent. The fixtures built on these (Redis, the coordinator app) live in conftest.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from feddale.service.auth import auth_headers
from feddale.service.http import poll_until
from feddale.ops.launcher import free_port

ADMIN = "admin-token-for-tests"
# The coordinator's upload limit in the in-process tests: above a tiny student with its ONNX bundle
# (the tiny BERT's weights travel inside it; a MiniLM student only references its base weights).
UPLOAD_LIMIT = 16 * 1024 * 1024
BOOTSTRAP = "bootstrap-secret-for-tests"


@dataclass
class Recorded:
    method: str
    path: str
    body: bytes


@dataclass
class RecordingTransport(httpx.BaseTransport):
    """Forwards to ``inner`` and keeps every request's method, path and body."""

    inner: httpx.BaseTransport
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        with self.lock:
            self.requests.append(Recorded(request.method, request.url.path, body))
        response = self.inner.handle_request(request)
        # TestClient's transport answers with a stream httpx.Client will not accept: re-wrap it.
        return httpx.Response(response.status_code, headers=response.headers, content=response.read(),
                              request=request)


# The tiny profile, made cheaper still: scoring cost grows with the public set (the tiny teacher
# still has SmolLM2's 49k-token vocabulary), so the services' tests use 16 public sessions.
FAST = {
    "data.public": [8, 8], "k_normal": 4, "k_anomalous": 4,
    "teacher.steps": 2, "teacher.batch_size": 2, "teacher.micro_batch": 2, "teacher.max_len": 64,
    "score.kind": "mean", "score.micro_batch": 16, "student.steps": 3,
}


def fast_config(tmp: Path, **extra: object) -> Path:
    """The fast test profile written as a config file (what FEDDALE_CONFIG points at)."""
    from feddale.method.config import load_config

    path = tmp / "fast-config.json"
    path.write_text(json.dumps(load_config("tiny", {**FAST, **extra}).model_dump(mode="json")))
    return path


def coordinator_settings(tmp: Path, redis_url: str, **changes: object):
    from feddale_coordinator.settings import Settings

    base = dict(
        redis_url=redis_url, admin_token=ADMIN, bootstrap_secret=BOOTSTRAP, artifact_dir=tmp / "artifacts",
        config=str(fast_config(tmp)), data=None, max_upload_bytes=UPLOAD_LIMIT, client_ttl_s=60.0, tick_s=0.05,
    )
    base.update(changes)
    return Settings(**base)  # type: ignore[arg-type]


def admin_headers() -> dict[str, str]:
    return auth_headers(ADMIN)


def register(client: TestClient, name: str, role: str = "client") -> dict:
    response = client.post("/v1/clients/register", json={"name": name, "role": role},
                           headers=auth_headers(BOOTSTRAP))
    assert response.status_code == 201, response.text
    return response.json()


def wait_run(client: TestClient, run_id: str, statuses: tuple[str, ...], timeout: float = 120.0) -> dict:
    """Poll GET /v1/runs/{id} until its status is one of ``statuses``."""
    seen: dict = {}

    def done() -> bool:
        seen.update(client.get(f"/v1/runs/{run_id}", headers=admin_headers()).json())
        return seen.get("status") in statuses

    assert poll_until(done, timeout, 0.1), f"run {run_id} stuck: {seen.get('status')} {seen.get('reason')}"
    return seen


@contextmanager
def serve_in_thread(app, **config: object) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread (real sockets: stalls,
    raw Content-Length headers and TLS need them); yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, **config))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    assert poll_until(lambda: server.started or not thread.is_alive(), 60, 0.05) and server.started, \
        "uvicorn did not start"
    scheme = "https" if config.get("ssl_certfile") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def detector_app_with_tiny_student():
    """The real detector app already serving a tiny student; its coordinator is stubbed and reachable.

    The stub registers the detector and answers /healthz and nothing else (/readyz is 200 because a
    student is loaded):
    there is no newer student to follow.
    """
    from feddale.service.serving import load_student
    from feddale.method.student import StudentConfig, train_student
    from feddale_detector.app import create_app
    from feddale_detector.settings import Settings

    def coordinator(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/clients/register":
            return httpx.Response(201, json={"client_id": "d-0", "token": "d-0.x"})
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(404, json={"detail": "none"})

    texts = ["Receiving block blk_<*> src: /<*> dest: /<*>", "PacketResponder <*> for block blk_<*> terminating",
             "Got exception while serving blk_<*> to /<*>:", "writeBlock blk_<*> received exception"]
    cfg = StudentConfig(base="tiny:bert", steps=1, batch_size=4, micro_batch=4, max_len=32)
    blob = train_student(texts, [0, 0, 1, 1], cfg, progress=False).to_bytes()
    settings = Settings(coordinator_url="http://coordinator", bootstrap_secret=BOOTSTRAP, node_name="det",
                        state_dir=None, student_poll_s=3600, batch_sessions=64, batch_wait_ms=1)
    app = create_app(settings, transport=httpx.MockTransport(coordinator))
    app.state.slot.swap(load_student(blob))
    return app


def run_to_end(fed, body: dict, timeout: float = 240.0) -> dict:
    """Start a run on a ``LocalFederation`` through its REST API and poll it to published or failed."""
    with fed.admin() as admin:
        created = admin.post("/v1/runs", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["run_id"]
        view: dict = {}

        def finished() -> bool:
            view.update(admin.get(f"/v1/runs/{run_id}").json())
            return view["status"] in ("published", "failed")

        assert poll_until(finished, timeout, 0.5), f"run stuck in {view.get('status')}; logs: {fed.work_dir}"
    return view
