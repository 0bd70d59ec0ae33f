"""Model lifecycle and continuous operation: the promotion rule, promote/pin/rollback, scheduled runs.

The rule and the interval parser are unit-tested; promotion runs through the real coordinator
app against a real Redis, with students published through the student job's own endpoint and
agreement numbers chosen by the test (a worse student is held back, its decision stored with
both numbers); the schedule runs in the coordinator's own tick loop. That detectors follow a
promotion within one poll, and the CLI, are tested against real processes in
tests/test_lifecycle_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from service_helpers import admin_headers, coordinator_settings, register, wait_run

from feddale.method.federation import Selection, pseudo_label_agreement
from feddale.method.payload import VERSION, PayloadHeader, encode_scores
from feddale.service.auth import auth_headers
from feddale.service.http import poll_until
from feddale.service.queue import fetch_job

from feddale_coordinator.intervals import parse_interval
from feddale_coordinator.students import promotion_rule

MARGIN = 0.02


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("agreement, current, current_agreement, pinned, promoted, why", [
    (0.9, None, None, False, True, "first student"),
    (0.9, None, None, True, True, "first student"),
    (0.99, "a", 0.5, True, False, "pinned to a"),
    (0.90, "a", 0.90, False, True, "not worse"),
    (0.881, "a", 0.90, False, True, "not worse"),  # within the margin
    (0.879, "a", 0.90, False, False, "worse than a's 0.9000 by more than 0.02"),
    (None, "a", 0.90, False, False, "no pseudo-label agreement"),
    (0.5, "a", None, False, True, "a has no pseudo-label agreement"),
])
def test_the_promotion_rule(agreement, current, current_agreement, pinned, promoted, why) -> None:
    decided, reason = promotion_rule(agreement, current, current_agreement, MARGIN, pinned)
    assert decided is promoted and why in reason


@pytest.mark.parametrize("text, seconds", [("24h", 86400), ("30m", 1800), ("90s", 90), ("1h30m", 5400),
                                           ("2d", 172800), ("0.5s", 0.5), ("45", 45), (" 10M ", 600)])
def test_intervals(text: str, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "h", "0s", "-5m", "1h 30m"])
def test_bad_intervals_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_interval(text)


def test_a_bad_schedule_stops_the_coordinator_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from feddale.service.settings import load_settings

    from feddale_coordinator.settings import Settings

    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", "a" * 32)
    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", "b" * 32)
    monkeypatch.setenv("FEDDALE_SCHEDULE", "every day")
    with pytest.raises(SystemExit, match="FEDDALE_SCHEDULE: 'every day' is not an interval"):
        load_settings(Settings)
    monkeypatch.setenv("FEDDALE_SCHEDULE", "24h")
    monkeypatch.setenv("FEDDALE_PROMOTION_MARGIN", "0.05")
    settings = load_settings(Settings)
    assert settings.schedule == 86400 and settings.promotion_margin == 0.05


def test_agreement_is_the_teachers_mean_auc_on_the_pseudo_labels() -> None:
    selection = Selection("plain", (0, 1), (2, 3), (), (), ())
    agree = np.array([[0.9, 0.8, 0.1, 0.2]])  # pseudo-normal above pseudo-anomalous: 1.0
    split = np.array([[0.9, 0.1, 0.8, 0.2]])  # half the pairs in order
    ties = np.full((1, 4), 0.5)  # ties count half
    assert pseudo_label_agreement(agree, selection) == 1.0
    assert pseudo_label_agreement(split, selection) == 0.5
    assert pseudo_label_agreement(np.vstack([agree, split, ties]), selection) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- promotion, in the real app


@pytest.fixture(scope="module")
def student_blobs() -> list[bytes]:
    """Four tiny students with distinct versions (one training step each, different seeds; no ONNX export)."""
    from feddale.method.student import StudentConfig, train_student

    texts = ["Receiving block blk_<*> src: /<*> dest: /<*>", "PacketResponder <*> for block blk_<*> terminating",
             "Got exception while serving blk_<*> to /<*>:", "writeBlock blk_<*> received exception"]
    return [train_student(texts, [0, 0, 1, 1], StudentConfig(base="tiny:bert", steps=1, batch_size=4, micro_batch=4,
                                                            max_len=32, seed=seed, onnx=False),
                          progress=False).to_bytes()
            for seed in range(4)]


def publish(coordinator: TestClient, r: redis.Redis, node: dict, blob: bytes, agreement: float | None) -> dict:
    """One whole run through the API, its student published by the job endpoint with ``agreement``."""
    created = coordinator.post("/v1/runs", json={"mode": "one_shot"}, headers=admin_headers())
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    digest = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["public_digest"]
    payload = encode_scores(np.random.default_rng(0).random(16), PayloadHeader(VERSION, digest, run_id, 1,
                                                                               node["client_id"], 16))
    uploaded = coordinator.put(f"/v1/runs/{run_id}/rounds/1/scores", content=payload,
                               headers=auth_headers(node["token"]))
    assert uploaded.status_code == 200, uploaded.text
    wait_run(coordinator, run_id, ("student_training",), timeout=120)  # generous: a busy shared machine
    token = fetch_job(f"student-{run_id}", r).kwargs["job_token"]
    query: dict[str, object] = {"normal": 4, "anomalous": 4, "digest": "ab" * 32, "commit": "0123abcd" * 5,
                                "trainer_version": "0.1.0"}
    if agreement is not None:
        query["agreement"] = agreement
    published = coordinator.put(f"/v1/runs/{run_id}/student", content=blob, params=query,
                                headers={**auth_headers(token), "Content-Type": "application/octet-stream"})
    assert published.status_code == 200, published.text
    return published.json()


def students(coordinator: TestClient) -> dict:
    response = coordinator.get("/v1/students", headers=admin_headers())
    assert response.status_code == 200, response.text
    return response.json()


def served(coordinator: TestClient, detector: dict) -> str:
    return coordinator.get("/v1/students/current", headers=auth_headers(detector["token"])).json()["version"]


def test_a_worse_student_is_held_back_and_the_operator_decides(
    coordinator: TestClient, redis_client: redis.Redis, student_blobs: list[bytes]
) -> None:
    node, detector = register(coordinator, "node-a"), register(coordinator, "det-a", role="detector")
    assert coordinator.get("/v1/students/current", headers=auth_headers(detector["token"])).status_code == 404

    a = publish(coordinator, redis_client, node, student_blobs[0], 0.90)
    assert served(coordinator, detector) == a["version"]
    assert a["provenance"]["run_id"] == a["run_id"] and a["provenance"]["commit"] == "0123abcd" * 5
    assert a["provenance"]["selection_digest"] == "ab" * 32 and len(a["provenance"]["config_digest"]) == 64
    assert list(a["provenance"]["payload_digests"]) == [node["client_id"]]

    b = publish(coordinator, redis_client, node, student_blobs[1], 0.80)  # worse by 0.10 > margin
    assert served(coordinator, detector) == a["version"]
    decision = next(s for s in students(coordinator)["students"] if s["info"]["version"] == b["version"])["decision"]
    assert decision["promoted"] is False and "held back" not in decision["reason"]
    assert (decision["agreement"], decision["current_agreement"], decision["current_version"], decision["margin"]) \
        == (0.80, 0.90, a["version"], MARGIN)

    c = publish(coordinator, redis_client, node, student_blobs[2], 0.89)  # within the margin
    assert served(coordinator, detector) == c["version"]

    view = coordinator.post("/v1/students/rollback", headers=admin_headers()).json()
    assert view["current"] == a["version"] == served(coordinator, detector)
    again = coordinator.post("/v1/students/rollback", headers=admin_headers())
    assert again.status_code == 409 and "no earlier" in again.json()["detail"]

    assert coordinator.post(f"/v1/students/{b['version']}/pin", headers=admin_headers()).json()["pinned"] is True
    assert served(coordinator, detector) == b["version"]
    d = publish(coordinator, redis_client, node, student_blobs[3], 0.99)  # better, but pinned
    view = students(coordinator)
    assert view["current"] == b["version"] and view["students"][0]["info"]["version"] == d["version"]
    assert "pinned" in view["students"][0]["decision"]["reason"]
    assert coordinator.post("/v1/students/unpin", headers=admin_headers()).json()["pinned"] is False
    assert coordinator.post(f"/v1/students/{d['version']}/promote", headers=admin_headers()).json()["current"] \
        == d["version"]
    assert [e["action"] for e in students(coordinator)["history"]] == \
        ["auto", "auto", "rollback", "pin", "unpin", "promote"]

    metrics = coordinator.get("/metrics").text
    assert f'feddale_coordinator_student_promoted_info{{version="{d["version"]}"}} 1.0' in metrics
    assert 'feddale_coordinator_promotion_decisions_total{outcome="held_back"} 2.0' in metrics

    # who may do what: detectors read the current student, only the admin changes it
    assert coordinator.post(f"/v1/students/{a['version']}/promote",
                            headers=auth_headers(detector["token"])).status_code == 403
    assert coordinator.post("/v1/students/nope/promote", headers=admin_headers()).status_code == 404
    assert coordinator.get("/v1/students", headers=auth_headers(node["token"])).status_code == 403


def test_the_latest_student_without_a_decision_is_decided_by_the_tick(
    coordinator: TestClient, redis_client: redis.Redis, student_blobs: list[bytes]
) -> None:
    """A coordinator that died between publishing and deciding (or predates promotion) catches up."""
    node = register(coordinator, "node-b")
    a = publish(coordinator, redis_client, node, student_blobs[0], None)
    redis_client.delete("feddale:student:promoted", "feddale:student:stack", "feddale:student:decisions")
    assert poll_until(lambda: any(s["decision"] for s in students(coordinator)["students"]), 10, 0.05)
    assert students(coordinator)["current"] == a["version"]


# --------------------------------------------------------------------------- the schedule, in the real app


@pytest.fixture
def scheduled(tmp_path: Path, redis_client: redis.Redis) -> Iterator[TestClient]:
    from feddale_coordinator.app import create_app

    settings = coordinator_settings(tmp_path, "unused", tick_s=0.05, schedule="1s")
    with TestClient(create_app(settings, redis_client=redis_client)) as client:
        yield client


def schedule_events(client: TestClient) -> list[dict]:
    return client.get("/v1/schedule", headers=admin_headers()).json()["recent"]


def test_the_schedule_starts_runs_and_skips_while_one_is_active(scheduled: TestClient) -> None:
    # due with no client alive: skipped
    assert poll_until(lambda: len(schedule_events(scheduled)) >= 1, 10, 0.05)
    first = schedule_events(scheduled)[0]
    assert first["outcome"] == "skipped" and first["reason"] == "no client node is alive"

    node = register(scheduled, "node-s")  # registering counts as seen: alive
    assert poll_until(lambda: any(e["outcome"] == "started" for e in schedule_events(scheduled)), 10, 0.05)
    started = next(e for e in schedule_events(scheduled) if e["outcome"] == "started")
    run = scheduled.get(f"/v1/runs/{started['run_id']}", headers=admin_headers()).json()
    assert run["mode"] == "one_shot" and run["status"] == "distill"

    # the run waits for node-s's upload: the next due slot is skipped, not queued
    assert poll_until(lambda: schedule_events(scheduled)[-1]["outcome"] == "skipped", 10, 0.05)
    assert schedule_events(scheduled)[-1] == {**schedule_events(scheduled)[-1], "run_id": started["run_id"],
                                              "reason": f"run {started['run_id']} is still active"}
    assert len(scheduled.get("/v1/runs", headers=admin_headers()).json()) == 1

    scheduled.post(f"/v1/runs/{started['run_id']}/cancel", headers=admin_headers())
    scheduled.get("/v1/tasks", headers=auth_headers(node["token"]))  # still alive
    assert poll_until(lambda: len(scheduled.get("/v1/runs", headers=admin_headers()).json()) == 2, 10, 0.05)
    view = scheduled.get("/v1/schedule", headers=admin_headers()).json()
    assert view["interval_s"] == 1.0 and view["next_at"] is not None
    assert 'feddale_coordinator_scheduled_runs_total{outcome="started"} 2.0' in scheduled.get("/metrics").text


# --------------------------------------------------------------------------- the commands' help


@pytest.mark.parametrize("command", [["students", "list"], ["students", "show"], ["students", "promote"],
                                     ["students", "pin"], ["students", "unpin"], ["students", "rollback"],
                                     ["schedule"]])
def test_every_command_explains_itself(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from feddale.ops.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and "--url" in text and "FEDDALE_URL" in text and "FEDDALE_ADMIN_TOKEN" in text
    if command[-1] in ("show", "promote", "pin"):
        assert "feddale students list" in text  # where VERSION comes from
