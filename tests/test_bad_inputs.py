"""Hostile and broken input to the public HTTP APIs: every case gets a 4xx (never a 500, never a
hang) and changes nothing it should not.

The coordinator runs in process against a real Redis; raw-socket cases (a Content-Length that
lies) use a real uvicorn server on loopback. What is already covered elsewhere is not repeated:
adapter validation in ``test_services_coordinator.py`` (truncated, forged header, wrong shapes,
missing and extra keys, NaN/Inf, integer dtype) and ``test_adapters.py``; payload header
mismatches (other run, round, public set, count, client) in both; detect schema errors in
``test_e2e.py``. Here: mutation fuzzing of both binary decoders, request size limits per
endpoint (declared, chunked, lying), path traversal in every id and name, token forgery,
rotation and cross-role use, a client reaching for another client's data or uploading on its
behalf, replays across clients and runs, and JSON that is deep, huge or not finite.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import (
    ADMIN, BOOTSTRAP, UPLOAD_LIMIT, admin_headers, coordinator_settings, detector_app_with_tiny_student, register,
    serve_in_thread, wait_run,
)

from feddale.method import adapters, models
from feddale.method.adapters import AdapterError
from feddale.service.auth import auth_headers
from feddale.method.payload import VERSION, PayloadError, PayloadHeader, decode_scores, encode_scores
from feddale.service.serving import MAX_BODY_BYTES
from feddale.service.queue import fetch_job

from feddale_coordinator.artifacts import ArtifactStore

MiB = 1024 * 1024
LIMIT = UPLOAD_LIMIT  # the coordinator fixture's FEDDALE_MAX_UPLOAD_BYTES


def start_run(client: TestClient, **body: object) -> str:
    response = client.post("/v1/runs", json=body, headers=admin_headers())
    assert response.status_code == 201, response.text
    return response.json()["run_id"]


def digest_of(client: TestClient, run_id: str) -> str:
    return client.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["public_digest"]


def scores_for(client: TestClient, run_id: str, client_id: str, seed: int = 0) -> bytes:
    header = PayloadHeader(VERSION, digest_of(client, run_id), run_id, 1, client_id, 16)
    return encode_scores(np.random.default_rng(seed).random(16), header)


def put_scores(client: TestClient, run_id: str, token: str, blob: bytes) -> httpx.Response:
    return client.put(f"/v1/runs/{run_id}/rounds/1/scores", content=blob, headers=auth_headers(token))


def is_client_error(response: httpx.Response) -> bool:
    return 400 <= response.status_code < 500


# --------------------------------------------------------------------------- binary decoders


@pytest.fixture(scope="module")
def adapter_blob() -> tuple[bytes, dict[str, tuple[int, ...]]]:
    peft = models.add_lora(models.load_causal_lm("tiny:llama", "none")[0], rank=2)
    state = adapters.adapter_state(peft)
    return adapters.adapter_to_bytes(state, models.lora_meta(peft)), adapters.adapter_shapes(peft)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_adapters_are_refused_or_exactly_valid(adapter_blob, data) -> None:
    """Flip, cut, insert: the decoder either refuses with AdapterError or returns an adapter
    that passes every rule (names, shapes, finite floats); it never crashes otherwise."""
    blob, shapes = adapter_blob
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if kind == "cut":
            del mutated[data.draw(st.integers(0, len(mutated) - 1)):]
        elif kind == "insert":
            at = data.draw(st.integers(0, len(mutated)))
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif mutated:
            # "header" aims at the 8-byte length and the JSON header, where forgery matters most
            top = min(len(mutated), 400) if kind == "header" else len(mutated)
            at = data.draw(st.integers(0, top - 1))
            mutated[at] = data.draw(st.integers(0, 255))
        if not mutated:
            break
    try:
        state, _ = adapters.adapter_from_bytes(bytes(mutated), shapes, max_bytes=len(blob) + 64)
    except AdapterError:
        return
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert all(v.is_floating_point() and bool(torch.isfinite(v).all()) for v in state.values())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_accuracy_payloads_are_refused_or_exactly_valid(data) -> None:
    header = PayloadHeader(VERSION, "ab" * 32, "run-1", 1, "c-1", 40)
    blob = bytearray(encode_scores(np.linspace(0, 1, 40), header))
    for _ in range(data.draw(st.integers(1, 3))):
        if not blob:
            break
        if data.draw(st.booleans()) and len(blob) > 1:
            del blob[data.draw(st.integers(0, len(blob) - 1)):]
        else:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        got, scores = decode_scores(bytes(blob), public_digest="ab" * 32, run_id="run-1", round=1, count=40)
    except PayloadError:
        return
    # run, round, public set and count are pinned by the caller; the client id is compared with
    # the uploader's token by the coordinator (403), so a flipped id decodes but cannot be used
    assert (got.run_id, got.round, got.public_digest, got.count) == ("run-1", 1, "ab" * 32, 40)
    assert scores.shape == (40,) and np.all((scores >= 0) & (scores <= 1))


# --------------------------------------------------------------------------- request size limits


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A streamed (chunked, no Content-Length) body of ``total`` bytes."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


def test_json_endpoints_refuse_big_bodies_before_parsing_or_auth(coordinator: TestClient) -> None:
    # unauthenticated, chunked: FastAPI would otherwise buffer and parse it all before the secret check
    response = coordinator.post("/v1/clients/register", content=chunks(2 * MiB),
                                headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    padded = {"mode": "one_shot", "teacher": {"note": "x" * 100_000}}
    assert coordinator.post("/v1/runs", json=padded, headers=admin_headers()).status_code == 413
    assert coordinator.post("/v1/runs", json={"mode": "one_shot"}, headers=admin_headers()).status_code == 201


def test_upload_endpoints_refuse_bodies_over_the_upload_limit(coordinator: TestClient) -> None:
    node = register(coordinator, "node-a")
    run_id = start_run(coordinator, mode="one_shot")
    streamed = coordinator.put(f"/v1/runs/{run_id}/rounds/1/scores", content=chunks(LIMIT + 1),
                               headers=auth_headers(node["token"]))
    assert streamed.status_code == 413
    student = coordinator.put(f"/v1/runs/{run_id}/student", content=b"x" * (LIMIT + 1),
                              headers=auth_headers("some-job-token"))
    assert student.status_code == 413
    assert coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["uploaded"] == []


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 20.0) -> tuple[int, bytes]:
    """Send bytes as they are (a lying Content-Length, no body) and read the status line."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ")[1]), data


@pytest.fixture
def coordinator_url(tmp_path: Path, redis_server: str, redis_client: redis.Redis) -> Iterator[str]:
    from feddale_coordinator.app import create_app

    with serve_in_thread(create_app(coordinator_settings(tmp_path, redis_server, body_timeout_s=2.0))) as url:
        yield url


def test_a_huge_declared_content_length_is_refused_at_once(coordinator_url: str) -> None:
    node = httpx.post(f"{coordinator_url}/v1/clients/register", json={"name": "node-a"},
                      headers=auth_headers(BOOTSTRAP)).json()
    for path, auth in [("/v1/clients/register", BOOTSTRAP), ("/v1/runs", ADMIN),
                       ("/v1/runs/run-x/rounds/1/scores", node["token"])]:
        method = "PUT" if path.endswith("scores") else "POST"
        status, _ = raw_request(coordinator_url, f"{method} {path} HTTP/1.1\nHost: x\nAuthorization: Bearer {auth}\n"
                                                 f"Content-Type: application/json\nContent-Length: {10**12}\n")
        assert status == 413, path
    status, _ = raw_request(coordinator_url, "POST /v1/runs HTTP/1.1\nHost: x\nContent-Length: lots\n")
    assert status == 400


def test_a_body_shorter_than_its_content_length_times_out_instead_of_hanging(coordinator_url: str) -> None:
    node = httpx.post(f"{coordinator_url}/v1/clients/register", json={"name": "node-a"},
                      headers=auth_headers(BOOTSTRAP)).json()
    status, _ = raw_request(
        coordinator_url,
        f"PUT /v1/runs/run-x/rounds/1/scores HTTP/1.1\nHost: x\nAuthorization: Bearer {node['token']}\n"
        "Content-Length: 1000\n", body=b"only a little", timeout=30)
    assert status == 408


# --------------------------------------------------------------------------- the detector


@pytest.fixture(scope="module")
def detector() -> Iterator[TestClient]:
    """The real detector app with a tiny student, its coordinator stubbed (nothing to follow)."""
    with TestClient(detector_app_with_tiny_student()) as client:
        yield client


@pytest.mark.parametrize(
    ("what", "body"),
    [
        ("too many messages", {"sessions": [{"id": "a", "messages": ["x"] * 4097}]}),
        ("a message too long", {"sessions": [{"id": "a", "messages": ["x" * 16_385]}]}),
        ("an id too long", {"sessions": [{"id": "a" * 257, "messages": ["x"]}]}),
        ("an empty id", {"sessions": [{"id": "", "messages": ["x"]}]}),
        ("a numeric id", {"sessions": [{"id": 7, "messages": ["x"]}]}),
        ("a nested message", {"sessions": [{"id": "a", "messages": [["x"]]}]}),
        ("an extra field", {"sessions": [{"id": "a", "messages": ["x"], "label": 1}]}),
        ("null sessions", {"sessions": None}),
    ],
)
def test_detect_refuses_malformed_sessions(detector: TestClient, what: str, body: dict) -> None:
    response = detector.post("/v1/detect", json=body)
    assert response.status_code == 422, (what, response.text)


@pytest.mark.parametrize(
    "raw",
    [b"{", b"\xff\xfe\x00", b"[" * 50_000 + b"]" * 50_000, b'{"sessions": NaN}', b"null", b"", b'"x"'],
)
def test_detect_refuses_broken_json_with_4xx(detector: TestClient, raw: bytes) -> None:
    response = detector.post("/v1/detect", content=raw, headers={"Content-Type": "application/json"})
    assert is_client_error(response), response.text


def test_detect_scores_odd_but_valid_text(detector: TestClient) -> None:
    odd = ["\x00\x01 control", "emoji \U0001f4a5 and RTL \u202e", "../../etc/passwd", "<script>", " " * 100, "x" * 16_384]
    response = detector.post("/v1/detect", json={"sessions": [{"id": f"s{i}", "messages": [m]}
                                                              for i, m in enumerate(odd)]})
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["results"]] == [f"s{i}" for i in range(len(odd))]


def test_detect_refuses_a_streamed_body_over_its_limit(detector: TestClient) -> None:
    response = detector.post("/v1/detect", content=chunks(MAX_BODY_BYTES + 1, 1024 * 1024),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    # every other route takes small bodies only (a declared one over 64 KiB is refused unread)
    assert detector.request("GET", "/v1/model", content=b"x" * (128 * 1024)).status_code == 413


# --------------------------------------------------------------------------- path traversal


TRAVERSALS = ["..", "..%2F..%2Fsecret", "%2e%2e", "..%5C..%5Csecret", "a%00b", "%2Fetc%2Fpasswd", "x" * 65,
              "run-%C3%A9", "-leading-dash", ".hidden"]


def test_traversal_in_path_ids_never_reaches_the_disk(coordinator: TestClient, tmp_path: Path) -> None:
    secret = b"SECRET-OUTSIDE-THE-STORE"
    (tmp_path / "secret").write_bytes(secret)
    (tmp_path / "artifacts" / "secret.json").write_bytes(secret)
    node = register(coordinator, "node-a")
    who = auth_headers(node["token"])
    for bad in TRAVERSALS:
        responses = [
            coordinator.get(f"/v1/runs/{bad}", headers=admin_headers()),
            coordinator.get(f"/v1/runs/{bad}/rounds/0/global", headers=who),
            coordinator.put(f"/v1/runs/{bad}/rounds/1/scores", content=b"x", headers=who),
            coordinator.put(f"/v1/runs/{bad}/rounds/1/adapter?samples=1", content=b"x", headers=who),
            coordinator.get(f"/v1/students/{bad}", headers=who),
            coordinator.get(f"/v1/public/{bad}", headers=who),
            coordinator.get(f"/v1/runs/{bad}/student-inputs", headers=who),
        ]
        for response in responses:
            assert response.status_code in (401, 404, 405, 422), (bad, response.request.url, response.status_code)
            assert secret not in response.content
    listing = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "artifacts").rglob("*") if p.is_file())
    assert listing == ["artifacts/public/" + p.name for p in (tmp_path / "artifacts" / "public").iterdir()] + \
        ["artifacts/secret.json"]


@pytest.mark.parametrize("name", ["../../etc", "a/b", "a\\b", "", ".", "x" * 129, "node\x00", "név", " node"])
def test_registration_names_are_plain(coordinator: TestClient, name: str) -> None:
    response = coordinator.post("/v1/clients/register", json={"name": name}, headers=auth_headers(BOOTSTRAP))
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("part", ["..", "../x", "a/b", "", ".hidden", "x\x00", "a" * 200, "/abs"])
def test_artifact_store_refuses_unsafe_names(tmp_path: Path, part: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError):
        store.write(("runs", part), b"x")
    assert list(tmp_path.rglob("*")) == []


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    "authorization",
    ["Bearer c-000000000000.unknown-client", "Bearer no-dot-at-all", "Bearer .", "Bearer ", "Basic dXNlcjpwYXNz",
     "bearer", f"Bearer {'x' * 8000}", f"Bearer {BOOTSTRAP}"],
)
def test_unknown_and_malformed_tokens_get_401(coordinator: TestClient, authorization: str) -> None:
    for method, path in [("GET", "/v1/tasks"), ("POST", "/v1/runs"), ("GET", "/v1/students/latest")]:
        response = coordinator.request(method, path, headers={"Authorization": authorization}, json={"mode": "one_shot"})
        assert response.status_code == 401, (authorization[:40], path, response.text)


def test_revoked_tokens_stop_working_for_every_role(coordinator: TestClient) -> None:
    old_client, old_detector = register(coordinator, "node-a"), register(coordinator, "det-a", "detector")
    new_client, new_detector = register(coordinator, "node-b"), register(coordinator, "det-b", "detector")
    for name in ("node-a", "det-a"):
        assert coordinator.delete(f"/v1/clients/{name}", headers=admin_headers()).status_code == 200
    assert coordinator.get("/v1/tasks", headers=auth_headers(old_client["token"])).status_code == 401
    assert coordinator.get("/v1/students/latest", headers=auth_headers(old_detector["token"])).status_code == 401
    assert coordinator.get("/v1/tasks", headers=auth_headers(new_client["token"])).status_code == 200
    assert coordinator.get("/v1/students/latest", headers=auth_headers(new_detector["token"])).status_code == 404
    # a token's secret half under another id is no token at all
    forged = f"{new_detector['client_id']}.{new_client['token'].split('.', 1)[1]}"
    assert coordinator.get("/v1/students/latest", headers=auth_headers(forged)).status_code == 401


def test_job_tokens_are_per_run_and_die_when_the_job_is_reissued(coordinator: TestClient, redis_client) -> None:
    node = register(coordinator, "node-a")
    run_id = start_run(coordinator, mode="one_shot")
    assert put_scores(coordinator, run_id, node["token"], scores_for(coordinator, run_id, node["client_id"])).status_code == 200
    wait_run(coordinator, run_id, ("student_training",), timeout=30)
    first = fetch_job(f"student-{run_id}", redis_client).kwargs["job_token"]
    assert coordinator.get(f"/v1/runs/{run_id}/student-inputs", headers=auth_headers(first)).status_code == 200
    for wrong in (node["token"], ADMIN, first + "x", first[:-1]):
        assert coordinator.get(f"/v1/runs/{run_id}/student-inputs", headers=auth_headers(wrong)).status_code == 401
    assert coordinator.get("/v1/runs/run-other/student-inputs", headers=auth_headers(first)).status_code == 401

    fetch_job(f"student-{run_id}", redis_client).delete()  # lost: the coordinator re-issues it
    assert wait_until_reissued(redis_client, run_id, first)
    second = fetch_job(f"student-{run_id}", redis_client).kwargs["job_token"]
    assert coordinator.get(f"/v1/runs/{run_id}/student-inputs", headers=auth_headers(first)).status_code == 401
    assert coordinator.get(f"/v1/runs/{run_id}/student-inputs", headers=auth_headers(second)).status_code == 200
    assert coordinator.put(f"/v1/runs/{run_id}/student", content=b"not a student",
                           headers=auth_headers(first)).status_code == 401


def wait_until_reissued(r, run_id: str, old_token: str) -> bool:
    from feddale.service.http import poll_until

    def reissued() -> bool:
        try:
            return fetch_job(f"student-{run_id}", r).kwargs["job_token"] != old_token
        except Exception:
            return False

    return poll_until(reissued, 30, 0.05)


def test_auth_compares_in_constant_time(coordinator: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every secret check goes through hmac.compare_digest (timing cannot be asserted; the call can)."""
    import hmac

    import feddale.service.auth as auth

    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a, b) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    node = register(coordinator, "node-a")
    for headers, path in [(admin_headers(), "/v1/runs"), (auth_headers(node["token"]), "/v1/tasks"),
                          (auth_headers("c-000.wrong"), "/v1/tasks")]:
        before = len(calls)
        coordinator.get(path, headers=headers)
        assert len(calls) > before, path
    before = len(calls)
    register(coordinator, "node-b")
    assert len(calls) > before


# --------------------------------------------------------------------------- other clients' data


def test_a_client_cannot_read_others_data_or_act_for_them(coordinator: TestClient) -> None:
    a, b = register(coordinator, "node-a"), register(coordinator, "node-b")
    det = register(coordinator, "det-a", "detector")
    run_id = start_run(coordinator, mode="one_shot", min_clients=2)
    as_a, as_det = auth_headers(a["token"]), auth_headers(det["token"])
    for method, path in [("GET", f"/v1/runs/{run_id}"), ("GET", "/v1/runs"), ("GET", "/v1/clients"),
                         ("POST", "/v1/runs")]:
        assert coordinator.request(method, path, headers=as_a, json={"mode": "one_shot"}).status_code == 403, path
    assert coordinator.get(f"/v1/runs/{run_id}/student-inputs", headers=as_a).status_code == 401  # all payloads
    assert coordinator.put(f"/v1/runs/{run_id}/student", content=b"x", headers=as_a).status_code == 401
    for method, path in [("GET", "/v1/tasks"), ("GET", f"/v1/public/{digest_of(coordinator, run_id)}"),
                         ("PUT", f"/v1/runs/{run_id}/rounds/1/scores")]:
        assert coordinator.request(method, path, headers=as_det, content=b"x").status_code == 403, path

    mine = scores_for(coordinator, run_id, a["client_id"])
    assert put_scores(coordinator, run_id, b["token"], mine).status_code == 403  # b replays / forges a's payload
    assert coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["uploaded"] == []
    assert put_scores(coordinator, run_id, a["token"], mine).status_code == 200
    theirs = scores_for(coordinator, run_id, b["client_id"], seed=1)
    assert put_scores(coordinator, run_id, b["token"], theirs).status_code == 200
    stored = coordinator.app.state.store.uploads(run_id, 1)
    assert stored[a["client_id"]]["sha256"] == hashlib.sha256(mine).hexdigest()  # untouched by b
    assert stored[b["client_id"]]["sha256"] == hashlib.sha256(theirs).hexdigest()


def test_an_upload_replayed_into_a_later_run_is_refused(coordinator: TestClient) -> None:
    a = register(coordinator, "node-a")
    first = start_run(coordinator, mode="one_shot", round_deadline_s=1)
    old = scores_for(coordinator, first, a["client_id"])
    assert put_scores(coordinator, first, a["token"], old).status_code == 200
    wait_run(coordinator, first, ("student_training",), timeout=30)
    coordinator.app.state.store.release_active(first)  # let a second run start without a worker
    second = start_run(coordinator, mode="one_shot")
    replay = put_scores(coordinator, second, a["token"], old)
    assert replay.status_code == 422 and "run" in replay.json()["detail"]
    assert put_scores(coordinator, first, a["token"], old).status_code == 409  # that round is closed


# --------------------------------------------------------------------------- JSON edge cases


@pytest.mark.parametrize(
    "raw",
    [
        b'{"mode": "one_shot", "round_deadline_s": NaN}',
        b'{"mode": "one_shot", "round_deadline_s": Infinity}',
        b'{"mode": "one_shot", "round_deadline_s": -Infinity}',
        b'{"mode": "one_shot", "k": 1e400}',
        b'{"mode": "one_shot", "min_clients": 99999999999999999999999999}',
        b'{"mode": "one_shot", "teacher": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"mode": "one_shot", "mode": "sometimes"}',
        b'{"mode": "few_shot", "fedavg_rounds": "three"}',
        b'{"mode": "one_shot", "teacher": {"steps": 1, "__class__": "x"}}',
        b'{"mode": "one_shot", "score": {"k": []}}',
        b"\xef\xbb\xbf{}",
        b"[]",
    ],
)
def test_odd_run_requests_are_4xx(coordinator: TestClient, raw: bytes) -> None:
    response = coordinator.post("/v1/runs", content=raw, headers={**admin_headers(), "Content-Type": "application/json"})
    assert is_client_error(response), (raw[:60], response.status_code, response.text[:200])


@pytest.mark.parametrize("round_no", ["-1", "10001", "99999999999999999999", "1.5", "one"])
def test_round_numbers_out_of_range_are_422(coordinator: TestClient, round_no: str) -> None:
    node = register(coordinator, "node-a")
    response = coordinator.get(f"/v1/runs/run-x/rounds/{round_no}/global", headers=auth_headers(node["token"]))
    assert response.status_code == 422


def test_concurrent_duplicate_uploads_are_counted_once(coordinator: TestClient) -> None:
    a = register(coordinator, "node-a")
    run_id = start_run(coordinator, mode="one_shot", min_clients=2)
    blob = scores_for(coordinator, run_id, a["client_id"])
    codes: list[int] = []

    def put() -> None:
        codes.append(put_scores(coordinator, run_id, a["token"], blob).status_code)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 8
    view = coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()
    assert view["uploaded"] == [a["client_id"]] and view["status"] == "distill"
    files = list((coordinator.app.state.engine.artifacts.root / "runs" / run_id).rglob("*.bin"))
    assert len(files) == 1 and files[0].read_bytes() == blob  # content-addressed: one file, whole


def test_an_unauthenticated_student_upload_is_refused_before_its_body_is_read(tmp_path: Path, redis_client) -> None:
    """60 MiB announced under the 64 MiB limit, no body sent: the wrong token alone earns the 401."""
    from feddale_coordinator.app import create_app

    app = create_app(coordinator_settings(tmp_path, "unused", max_upload_bytes=64 * 1024 * 1024),
                     redis_client=redis_client)
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(
                b"PUT /v1/runs/run-abc/student HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not-the-job-token\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: " + str(60 * 1024 * 1024).encode()
                + b"\r\n\r\n"
            )
            status_line = conn.recv(4096).split(b"\r\n", 1)[0]  # answered without waiting for the body
    assert status_line.startswith(b"HTTP/1.1 401"), status_line
