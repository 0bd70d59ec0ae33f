"""Coordinator API in process (real app, real Redis, real tiny models): auth, validation,
rounds, uploads, deadlines, and a whole one-shot and few-shot run driven by in-process
client agents whose every request is recorded, to prove raw logs never leave a client."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from rq.job import JobStatus
from service_helpers import BOOTSTRAP, UPLOAD_LIMIT, RecordingTransport, admin_headers, register, wait_run

from feddale.method import adapters, models
from feddale.service.auth import auth_headers
from feddale.service.http import Backoff, CoordinatorSession, RetryableStatus
from feddale.method.payload import VERSION, PayloadHeader, encode_scores
from feddale.method.config import RunConfig
from feddale.protocol.messages import Task, TaskResponse
from feddale.protocol.rounds import load_teacher
from feddale.service.queue import fetch_job

from feddale_client_node.agent import ClientAgent
from feddale_student_trainer.jobs import train_student_job


def make_agent(coordinator: TestClient, name: str, tmp: Path) -> tuple[ClientAgent, RecordingTransport]:
    transport = RecordingTransport(coordinator._transport)
    session = CoordinatorSession("http://testserver", BOOTSTRAP, name, "client", transport=transport)
    agent = ClientAgent(session, state_dir=tmp / name)
    agent.start()
    return agent, transport


def do_task(agent: ClientAgent) -> Task | None:
    task = TaskResponse.model_validate(agent.session.request("GET", "/v1/tasks").json()).task
    if task is not None:
        agent.do_task(task)
    return task


def run_student_job(coordinator: TestClient, redis_client, run_id: str) -> dict:
    """What the RQ worker does, in process: the job's token comes from the enqueued job."""
    run = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()
    assert run["status"] == "student_training", run
    job = fetch_job(f"student-{run_id}", redis_client)
    return train_student_job(
        run_id, job.kwargs["job_token"], "http://testserver", transport=RecordingTransport(coordinator._transport)
    )


def start_run(coordinator: TestClient, **body: object) -> str:
    response = coordinator.post("/v1/runs", json=body, headers=admin_headers())
    assert response.status_code == 201, response.text
    return response.json()["run_id"]


# --------------------------------------------------------------------------- auth and validation


def test_ops_endpoints(coordinator: TestClient) -> None:
    assert coordinator.get("/healthz").json() == {"status": "ok"}
    ready = coordinator.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": True}
    text = coordinator.get("/metrics").text
    assert "# TYPE feddale_coordinator_http_requests_total counter" in text
    assert coordinator.get("/docs").status_code == 200


def test_auth_is_required_and_roles_are_enforced(coordinator: TestClient) -> None:
    assert coordinator.post("/v1/runs", json={"mode": "one_shot"}).status_code == 401
    assert coordinator.post("/v1/runs", json={"mode": "one_shot"}, headers=auth_headers("nope")).status_code == 401
    bad_bootstrap = coordinator.post("/v1/clients/register", json={"name": "x"}, headers=auth_headers("wrong"))
    assert bad_bootstrap.status_code == 401
    client = register(coordinator, "node-a")
    detector = register(coordinator, "det-a", role="detector")
    assert coordinator.post("/v1/runs", json={"mode": "one_shot"},
                            headers=auth_headers(client["token"])).status_code == 403
    assert coordinator.get("/v1/tasks", headers=admin_headers()).status_code == 403
    assert coordinator.get("/v1/tasks", headers=auth_headers(detector["token"])).status_code == 403
    forged = client["client_id"] + ".not-the-secret"
    assert coordinator.get("/v1/tasks", headers=auth_headers(forged)).status_code == 401
    assert coordinator.get("/v1/tasks", headers=auth_headers(client["token"])).json()["task"] is None
    # tokens are stored hashed: the plaintext is nowhere in Redis
    dump = b"".join(v for v in coordinator.app.state.store.r.hvals("feddale:clients"))
    assert client["token"].encode() not in dump and client["token"].split(".")[1].encode() not in dump


def test_replicas_get_distinct_shards_and_a_restarted_node_keeps_its_own(coordinator: TestClient) -> None:
    regs = [register(coordinator, f"replica-{i}") for i in range(3)]
    assert sorted(r["shard"] for r in regs) == [0, 1, 2]
    assert all(r["num_shards"] == 3 for r in regs)
    # a restarted node rejoins with the token it kept: same id, shard and token (200, not a new identity)
    again = coordinator.post("/v1/clients/register", json={}, headers=auth_headers(regs[1]["token"]))
    assert again.status_code == 200
    assert {k: again.json()[k] for k in ("client_id", "shard", "token")} == \
        {k: regs[1][k] for k in ("client_id", "shard", "token")}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mode": "sometimes"}, ["body", "mode"]),
        ({"mode": "few_shot", "fedavg_rounds": 0}, ["body", "fedavg_rounds"]),
        ({"mode": "one_shot", "teacher": {"steps": 0}}, ["body", "teacher", "steps"]),
        ({"mode": "one_shot", "filter": "mode"}, ["body", "filter"]),
        ({"mode": "one_shot", "min_clients": 0}, ["body", "min_clients"]),
        ({"mode": "one_shot", "surprise": 1}, ["body", "surprise"]),
    ],
)
def test_invalid_run_requests_are_422_naming_the_field(coordinator: TestClient, body: dict, field: list) -> None:
    response = coordinator.post("/v1/runs", json=body, headers=admin_headers())
    assert response.status_code == 422, response.text
    assert field in [e["loc"] for e in response.json()["detail"]], response.json()


def test_one_run_at_a_time(coordinator: TestClient) -> None:
    start_run(coordinator, mode="one_shot")
    assert coordinator.post("/v1/runs", json={"mode": "one_shot"}, headers=admin_headers()).status_code == 409


# --------------------------------------------------------------------------- whole runs


def test_one_shot_run_publishes_and_raw_logs_never_leave_clients(
    coordinator: TestClient, redis_client, tmp_path: Path
) -> None:
    (a, rec_a), (b, rec_b) = make_agent(coordinator, "node-a", tmp_path), make_agent(coordinator, "node-b", tmp_path)
    run_id = start_run(coordinator, mode="one_shot", min_clients=2)
    assert do_task(a).kind == "distill"
    assert do_task(a) is None  # uploaded: nothing more to do this round
    # a duplicate upload is idempotent: last one wins, counted once
    header = PayloadHeader(VERSION, coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()
                           ["public_digest"], run_id, 1, a.session.registration["client_id"], 16)
    again = a.session.request("PUT", f"/v1/runs/{run_id}/rounds/1/scores",
                              content=encode_scores(np.full(16, 0.5), header))
    assert again.json()["replaced"] is True
    view = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()
    assert view["uploaded"] == [a.session.registration["client_id"]] and view["status"] == "distill"

    do_task(b)
    wait_run(coordinator, run_id, ("student_training",))
    published = run_student_job(coordinator, redis_client, run_id)
    view = wait_run(coordinator, run_id, ("published",))
    assert view["student_version"] == published["version"]
    assert view["history"][0]["closed_by"] == "all" and len(view["history"][0]["participants"]) == 2
    latest = coordinator.get("/v1/students/latest", headers=auth_headers(a.session.registration["token"]))
    assert latest.json()["version"] == published["version"]

    # bytes accounting = what crossed HTTP: both uploads of a, one of b, the public set down twice
    uploads = [r for r in rec_a.requests + rec_b.requests if r.method == "PUT"]
    assert view["bytes_up"] == sum(len(r.body) for r in uploads)
    assert view["bytes_down"] > 0
    assert all(len(r.body) <= 200 + 16 for r in uploads)  # ~1 byte per public session + header

    for agent, recorder in ((a, rec_a), (b, rec_b)):
        private = {m for s in agent.sessions for m in s.messages} | {s.text for s in agent.sessions}
        sent = b"".join(r.body for r in recorder.requests)
        assert sent, "the agent sent nothing?"
        leaked = [m for m in private if m.encode() in sent]
        assert not leaked, f"raw log content left the client: {leaked[:3]}"
        assert not any(s.id.encode() in sent for s in agent.sessions)


def test_wrong_accuracy_payloads_are_refused_and_the_round_is_unharmed(coordinator: TestClient) -> None:
    node = register(coordinator, "node-a")
    run_id = start_run(coordinator, mode="one_shot")
    digest = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["public_digest"]
    me, headers = node["client_id"], auth_headers(node["token"])

    def put(header: PayloadHeader, n: int, round_no: int = 1) -> int:
        blob = encode_scores(np.linspace(0, 1, n), header)
        return coordinator.put(f"/v1/runs/{run_id}/rounds/{round_no}/scores", content=blob, headers=headers).status_code

    assert put(PayloadHeader(VERSION, "0" * 64, run_id, 1, me, 16), 16) == 422  # another public set
    assert put(PayloadHeader(VERSION, digest, run_id, 2, me, 16), 16) == 422  # header round
    assert put(PayloadHeader(VERSION, digest, run_id, 1, me, 15), 15) == 422  # count
    assert put(PayloadHeader(VERSION, digest, "run-other", 1, me, 16), 16) == 422  # run
    assert put(PayloadHeader(VERSION, digest, run_id, 1, "c-someoneelse", 16), 16) == 403
    assert put(PayloadHeader(VERSION, digest, run_id, 1, me, 16), 16, round_no=2) == 409
    junk = coordinator.put(f"/v1/runs/{run_id}/rounds/1/scores", content=b"not a payload", headers=headers)
    assert junk.status_code == 422 and "magic" in junk.json()["detail"]
    huge = coordinator.put(f"/v1/runs/{run_id}/rounds/1/scores", content=b"x" * (UPLOAD_LIMIT + 1),
                           headers=headers)
    assert huge.status_code == 413
    assert coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["uploaded"] == []
    assert put(PayloadHeader(VERSION, digest, run_id, 1, me, 16), 16) == 200


def _raw_safetensors(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={adapters.META_KEY: json.dumps(meta or {})})


def test_few_shot_run_validates_adapters_then_publishes(coordinator: TestClient, redis_client, tmp_path: Path) -> None:
    a, _ = make_agent(coordinator, "node-a", tmp_path)
    run_id = start_run(coordinator, mode="few_shot", fedavg_rounds=1)
    view = wait_run(coordinator, run_id, ("fedavg",))
    assert view["round"] == 1
    headers = auth_headers(a.session.registration["token"])
    url = f"/v1/runs/{run_id}/rounds/1/adapter?samples=10"

    # Round 1 has no global adapter to download: every client starts from the run's seeded one.
    assert coordinator.get(f"/v1/runs/{run_id}/rounds/0/global", headers=headers).status_code == 404
    teacher = load_teacher(RunConfig.model_validate(view["config"]))
    state = teacher.initial
    meta = models.lora_meta(teacher.model)
    init = adapters.adapter_to_bytes(state, meta)
    key = sorted(state)[0]
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state[key][0, 0] = math.nan
    smuggled = {**{k: v.half() for k, v in state.items()}, "model.embed_tokens.weight": torch.zeros(4, 4).half()}
    other_rank = models.add_lora(models.load_causal_lm("tiny:llama", "none")[0], rank=4)
    bad = {
        "not safetensors": b"definitely not safetensors",
        "truncated": init[: len(init) // 2],
        "header lies": struct.pack("<Q", 10**9) + b"{}",
        "wrong shapes": adapters.adapter_to_bytes(adapters.adapter_state(other_rank), models.lora_meta(other_rank)),
        "missing keys": _raw_safetensors({k: v.half() for k, v in list(state.items())[1:]}, meta),
        "extra base weights": _raw_safetensors(smuggled, meta),
        "NaN": _raw_safetensors({k: v.half() for k, v in nan_state.items()}, meta),
        "Inf": _raw_safetensors({k: (v * 1e6).half() for k, v in state.items()}, meta),
        "integer dtype": _raw_safetensors({k: v.to(torch.int32) for k, v in state.items()}, meta),
    }
    for what, blob in bad.items():
        response = coordinator.put(url, content=blob, headers=headers)
        assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
    assert coordinator.put(url, content=b"x" * (UPLOAD_LIMIT + 1), headers=headers).status_code == 413
    assert coordinator.put(f"/v1/runs/{run_id}/rounds/1/adapter", content=init, headers=headers).status_code == 422
    assert coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["uploaded"] == []

    assert do_task(a).kind == "fedavg"
    view = wait_run(coordinator, run_id, ("distill",))
    assert view["round"] == 2 and view["history"][0]["kind"] == "fedavg"
    global_1 = coordinator.get(f"/v1/runs/{run_id}/rounds/1/global", headers=headers).content
    averaged, _ = adapters.adapter_from_bytes(global_1, {k: tuple(v.shape) for k, v in state.items()})
    assert any(not torch.equal(averaged[k], state[k]) for k in state), "FedAvg left the initial adapter unchanged"
    task = do_task(a)
    assert task.kind == "distill" and task.global_adapter.endswith("/rounds/1/global")
    wait_run(coordinator, run_id, ("student_training",))
    run_student_job(coordinator, redis_client, run_id)
    view = wait_run(coordinator, run_id, ("published",))
    assert [h["kind"] for h in view["history"]] == ["fedavg", "distill"]


# --------------------------------------------------------------------------- deadlines


def upload_scores(coordinator: TestClient, node: dict, run_id: str, round_no: int = 1) -> int:
    """A valid accuracy payload straight from a registered node (the round logic is under test)."""
    digest = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["public_digest"]
    blob = encode_scores(np.linspace(0, 1, 16),
                         PayloadHeader(VERSION, digest, run_id, round_no, node["client_id"], 16))
    return coordinator.put(f"/v1/runs/{run_id}/rounds/{round_no}/scores", content=blob,
                           headers=auth_headers(node["token"])).status_code


def test_dead_client_round_closes_at_min_clients_after_deadline(coordinator: TestClient) -> None:
    nodes = [register(coordinator, f"node-{i}") for i in range(3)]  # all alive when the round opens
    run_id = start_run(coordinator, mode="one_shot", min_clients=2, round_deadline_s=2)
    assert len(coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["expected"]) == 3
    assert upload_scores(coordinator, nodes[0], run_id) == 200
    assert upload_scores(coordinator, nodes[1], run_id) == 200  # nodes[2] died: it never uploads
    view = wait_run(coordinator, run_id, ("student_training",), timeout=30)
    assert view["history"][0]["closed_by"] == "deadline"
    assert view["history"][0]["participants"] == sorted(n["client_id"] for n in nodes[:2])


def test_too_few_clients_fail_the_run_with_the_reason(coordinator: TestClient) -> None:
    nodes = [register(coordinator, f"node-{i}") for i in range(2)]
    run_id = start_run(coordinator, mode="one_shot", min_clients=2, round_deadline_s=1)
    assert upload_scores(coordinator, nodes[0], run_id) == 200
    view = wait_run(coordinator, run_id, ("failed",), timeout=30)
    assert "min_clients=2" in view["reason"]
    start_run(coordinator, mode="one_shot")  # the failed run no longer blocks new ones


# --------------------------------------------------------------------------- failure transitions


def test_an_unknown_teacher_is_refused_when_the_run_is_created(coordinator: TestClient) -> None:
    """The coordinator derives adapter shapes from the teacher's config at creation: no run to fail later."""
    response = coordinator.post("/v1/runs", json={"mode": "few_shot", "teacher_model": "tiny:no-such-family"},
                                headers=admin_headers())
    assert response.status_code == 422 and "tiny:no-such-family" in response.json()["detail"]
    assert coordinator.get("/v1/runs", headers=admin_headers()).json() == []
    start_run(coordinator, mode="one_shot")  # nothing was left active


def valid_adapter(coordinator: TestClient, run_id: str) -> bytes:
    view = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()
    teacher = load_teacher(RunConfig.model_validate(view["config"]))
    return adapters.adapter_to_bytes(teacher.initial, models.lora_meta(teacher.model))


def test_an_unreadable_upload_drops_its_client_and_too_few_left_fail_the_run(coordinator: TestClient) -> None:
    engine = coordinator.app.state.engine

    def lose_upload(run_id: str, client_id: str) -> None:
        """The disk loses the stored file before the round closes."""
        engine.artifacts.path(*engine.store.uploads(run_id, 1)[client_id]["path"]).unlink()

    nodes = [register(coordinator, f"node-{i}") for i in range(3)]
    run_id = start_run(coordinator, mode="few_shot", fedavg_rounds=1, min_clients=2)
    blob = valid_adapter(coordinator, run_id)
    url = f"/v1/runs/{run_id}/rounds/1/adapter?samples=5"
    for node in nodes[:2]:
        assert coordinator.put(url, content=blob, headers=auth_headers(node["token"])).status_code == 200
    lose_upload(run_id, nodes[0]["client_id"])
    assert coordinator.put(url, content=blob, headers=auth_headers(nodes[2]["token"])).status_code == 200
    view = wait_run(coordinator, run_id, ("distill",), timeout=30)
    closed = view["history"][0]
    assert closed["dropped"] == [nodes[0]["client_id"]]
    assert closed["participants"] == sorted(n["client_id"] for n in nodes[1:])

    for node in nodes:  # the distillation round: this time too few readable uploads remain
        assert upload_scores(coordinator, node, run_id, round_no=2) == 200
        if node is not nodes[2]:
            lose_upload2 = engine.store.uploads(run_id, 2)[node["client_id"]]["path"]
            engine.artifacts.path(*lose_upload2).unlink()
    view = wait_run(coordinator, run_id, ("failed",), timeout=30)
    assert view["reason"].startswith("round 2: only 1 readable upload(s)"), view["reason"]
    start_run(coordinator, mode="one_shot")


@pytest.mark.parametrize("job_status, reason", [
    (JobStatus.FAILED, "student training failed after retries"),
    (JobStatus.FINISHED, "student job finished without publishing a student"),
    (JobStatus.CANCELED, "student job was canceled"),
])
def test_a_student_job_that_ends_without_a_student_fails_the_run(
    coordinator: TestClient, redis_client, job_status: JobStatus, reason: str
) -> None:
    node = register(coordinator, "node-0")
    run_id = start_run(coordinator, mode="one_shot", min_clients=1)
    assert upload_scores(coordinator, node, run_id) == 200
    wait_run(coordinator, run_id, ("student_training",), timeout=30)
    fetch_job(f"student-{run_id}", redis_client).set_status(job_status)
    view = wait_run(coordinator, run_id, ("failed",), timeout=30)
    assert view["reason"].startswith(reason), view["reason"]


def test_a_job_token_expires(coordinator: TestClient, redis_client) -> None:
    node = register(coordinator, "node-0")
    run_id = start_run(coordinator, mode="one_shot", min_clients=1)
    assert upload_scores(coordinator, node, run_id) == 200
    wait_run(coordinator, run_id, ("student_training",), timeout=30)
    token = fetch_job(f"student-{run_id}", redis_client).kwargs["job_token"]
    assert coordinator.get(f"/v1/runs/{run_id}/student-inputs", headers=auth_headers(token)).status_code == 200
    store = coordinator.app.state.store
    with store.run_lock(run_id):
        run = store.run(run_id)
        run.job_token_expires_at = 0.0
        store.save_run(run)
    expired = coordinator.get(f"/v1/runs/{run_id}/student-inputs", headers=auth_headers(token))
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]


def test_a_pickled_job_pushed_into_redis_does_not_run(redis_client, tmp_path: Path) -> None:
    """The trainer's queue speaks JSON: a pickle-serialized job (code, to RQ's default) never executes."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from feddale.service.queue import STUDENT_QUEUE, student_queue
    from feddale_student_trainer.worker import StudentWorker

    marker = tmp_path / "the-pickled-job-ran"
    Queue(STUDENT_QUEUE, connection=redis_client).enqueue("os.mkdir", str(marker))  # RQ's default: pickle
    queue = student_queue(redis_client)
    worker = StudentWorker([queue], connection=redis_client, serializer=JSONSerializer)
    worker.work(burst=True)
    assert not marker.exists()
    assert len(queue) == 0  # taken off the queue, not left to be retried forever


def test_an_outage_while_publishing_does_not_retrain(
    coordinator: TestClient, redis_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's publishing retries run out; RQ's retry publishes the student already trained."""
    import feddale_student_trainer.jobs as jobs

    monkeypatch.setenv("FEDDALE_STATE_DIR", str(tmp_path / "trainer"))
    monkeypatch.setattr(jobs, "HTTP_ATTEMPTS", 2)
    monkeypatch.setattr(jobs, "Backoff", lambda *args: Backoff(0.01, 0.02))  # no minute-long waits here
    node = register(coordinator, "node-0")
    run_id = start_run(coordinator, mode="one_shot", min_clients=1)
    assert upload_scores(coordinator, node, run_id) == 200
    wait_run(coordinator, run_id, ("student_training",), timeout=30)
    token = fetch_job(f"student-{run_id}", redis_client).kwargs["job_token"]

    class PublishingOutage(httpx.BaseTransport):
        """The coordinator answers everything but the student upload, which gets 503."""

        def __init__(self, inner: httpx.BaseTransport) -> None:
            self.inner, self.puts = inner, 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "PUT":
                self.puts += 1
                return httpx.Response(503, json={"detail": "restarting"}, request=request)
            return RecordingTransport(self.inner).handle_request(request)

    outage = PublishingOutage(coordinator._transport)
    with pytest.raises(RetryableStatus):  # what RQ records as the failure, then retries the job
        jobs.train_student_job(run_id, token, "http://testserver", transport=outage)
    assert outage.puts == 2 and (tmp_path / "trainer" / run_id / jobs.STUDENT_FILE).is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the retry trained a second student")

    monkeypatch.setattr(jobs, "distil", no_training)
    published = jobs.train_student_job(run_id, token, "http://testserver",
                                       transport=RecordingTransport(coordinator._transport))
    view = wait_run(coordinator, run_id, ("published",), timeout=30)
    assert view["student_version"] == published["version"]
    assert not (tmp_path / "trainer" / run_id).exists()  # nothing kept once published


def test_a_write_error_while_storing_an_upload_is_a_503_and_records_nothing(
    coordinator: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = register(coordinator, "node-0")
    run_id = start_run(coordinator, mode="one_shot", min_clients=1, round_deadline_s=600)
    engine = coordinator.app.state.engine

    def disk_full(parts, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.artifacts, "write", disk_full)
    assert upload_scores(coordinator, node, run_id) == 503
    view = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()
    assert view["status"] == "distill" and view["uploaded"] == []  # the run goes on; the client retries
    monkeypatch.undo()
    assert upload_scores(coordinator, node, run_id) == 200
