"""Liveness from heartbeats: a node busy in a long step stays alive; a node that stops beating does not.

The real client-node app talks to the real coordinator app in process (its Redis is real); the
coordinator's TTL is 2 s, so nodes beat every 0.5 s. The busy step is a pure-Python loop, which
holds the GIL as much as anything a node does: training and scoring spend their time in torch
kernels that release it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from service_helpers import BOOTSTRAP, RecordingTransport, admin_headers, coordinator_settings, register

from feddale.protocol.messages import Task
from feddale.service.http import poll_until

TTL_S = 2.0


@pytest.fixture
def coordinator(tmp_path: Path, redis_client: redis.Redis) -> Iterator[TestClient]:
    from feddale_coordinator.app import create_app

    app = create_app(coordinator_settings(tmp_path, "unused", tick_s=0.05, client_ttl_s=TTL_S), redis_client=redis_client)
    with TestClient(app) as client:
        yield client


def clients(coordinator: TestClient) -> dict[str, dict]:
    response = coordinator.get("/v1/clients", headers=admin_headers())
    assert response.status_code == 200, response.text
    return {c["name"]: c for c in response.json()}


def test_a_busy_node_stays_alive_and_a_stopped_one_goes_silent_after_the_ttl(
    coordinator: TestClient, tmp_path: Path
) -> None:
    from feddale_client_node.app import create_app
    from feddale_client_node.settings import Settings

    settings = Settings(coordinator_url="http://testserver", bootstrap_secret=BOOTSTRAP, node_name="busy-node",
                        state_dir=tmp_path / "node", student_poll_s=3600)
    node = create_app(settings, transport=RecordingTransport(coordinator._transport))
    agent = node.state.agent
    busy, release = threading.Event(), threading.Event()

    def long_step(task: Task) -> None:  # stands in for minutes of training: no request, GIL-bound
        agent.status = {**agent.status, "state": f"training ({task.kind} round {task.round} of {task.run_id})"}
        busy.set()
        x = 0
        while not release.is_set():
            x = (x * 31 + 7) % 1_000_003

    agent.do_task = long_step
    with TestClient(node):
        run = coordinator.post("/v1/runs", json={"mode": "one_shot"}, headers=admin_headers())
        assert run.status_code == 201, run.text
        assert busy.wait(60), "the node never got its task"
        try:
            deadline = time.monotonic() + 3 * TTL_S  # three TTLs without a single task poll
            while time.monotonic() < deadline:
                me = clients(coordinator)["busy-node"]
                assert me["alive"], f"a node busy training read as dead: {me}"
                time.sleep(0.25)
            assert me["status"]["state"].startswith("training (distill round 1")
            assert me["status"]["sessions"] > 0 and me["status"]["software"]
            view = coordinator.get(f"/v1/runs/{run.json()['run_id']}", headers=admin_headers()).json()
            assert [c["alive"] for c in view["clients"].values()] == [True]
        finally:
            release.set()
    # The app is shut down: no more beats. Alive until the TTL passes, then not.
    stopped = time.time()
    assert clients(coordinator)["busy-node"]["alive"]
    assert poll_until(lambda: not clients(coordinator)["busy-node"]["alive"], TTL_S + 5, 0.1)
    assert time.time() - stopped >= TTL_S - 1.0  # ~TTL after the last beat, not at once


def test_heartbeats_need_a_node_token_and_tell_nodes_how_often_to_beat(coordinator: TestClient) -> None:
    body = {"state": "serving", "software": "0.1.0", "model_version": None,
            "detector": {"requests": 3, "sessions": 10, "anomalies": 2, "latency_s_sum": 0.3, "started_at": 1.0}}
    assert coordinator.post("/v1/heartbeat", json=body).status_code == 401
    assert coordinator.post("/v1/heartbeat", json=body, headers=admin_headers()).status_code == 403
    detector = register(coordinator, "det-1", role="detector")
    auth = {"Authorization": f"Bearer {detector['token']}"}
    answer = coordinator.post("/v1/heartbeat", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"interval_s": TTL_S / 4, "ttl_s": TTL_S}
    assert coordinator.post("/v1/heartbeat", json={**body, "state": "x" * 300}, headers=auth).status_code == 422
    assert coordinator.post("/v1/heartbeat", json={**body, "extra": 1}, headers=auth).status_code == 422
    me = clients(coordinator)["det-1"]
    assert me["alive"] and me["status"]["detector"]["anomalies"] == 2
