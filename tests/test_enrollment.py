"""Enrollment, name ownership and revocation (issue 16, item 1).

The holes: any holder of the shared bootstrap secret could register as many identities as it
liked, choose its own role, and take over any name (re-registering rotated the owner's token).
Now the admin issues one-time enrollment tokens per name with a fixed role (`POST /v1/clients`,
`feddale clients enroll`), a taken name answers 409 to everyone but its owner (who proves it with
its own token), revocation (`DELETE /v1/clients/{name}`, `feddale clients revoke`) kills a token
at once, and a detector's token can pull students and nothing else.

The e2e tests run a real coordinator process on loopback against the suite's real Redis, a real
client node process, and the `feddale` CLI in process; the rest use the in-process coordinator.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from service_helpers import ADMIN, BOOTSTRAP, admin_headers, coordinator_settings, fast_config, register, wait_run

from feddale.method.payload import VERSION, PayloadHeader, encode_scores
from feddale.ops.cli import main
from feddale.ops.launcher import Service, free_port
from feddale.service.auth import auth_headers
from feddale.service.http import CoordinatorSession, RegistrationRefused, poll_until
from feddale.service.settings import load_settings

from feddale_detector.settings import Settings as DetectorSettings

Cli = Callable[..., tuple[int, str, str]]


# --------------------------------------------------------------------------- real processes


def start(module: str, env: dict[str, str], log: Path) -> Service:
    """``module`` as the launcher runs it (its own process group, stopped with a grace period), without this
    shell's FEDDALE_ settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FEDDALE_")}
    service = Service(module, [sys.executable, "-m", module], {**base, "PYTHONUNBUFFERED": "1", **env}, log)
    service.start()
    return service


def status(url: str, path: str = "/healthz") -> int:
    try:
        return httpx.get(f"{url}{path}", timeout=5).status_code
    except httpx.HTTPError:
        return -1


@pytest.fixture(scope="module")
def coordinator_url(tmp_path_factory: pytest.TempPathFactory, process_redis: str) -> Iterator[str]:
    """A coordinator process with the bootstrap secret configured (the zero-config path stays on)."""
    work = tmp_path_factory.mktemp("enrollment")
    port = free_port()
    process = start("feddale_coordinator", {
        "FEDDALE_REDIS_URL": process_redis, "FEDDALE_ADMIN_TOKEN": ADMIN, "FEDDALE_BOOTSTRAP_SECRET": BOOTSTRAP,
        "FEDDALE_PORT": str(port), "FEDDALE_HOST": "127.0.0.1", "FEDDALE_ARTIFACT_DIR": str(work / "artifacts"),
        "FEDDALE_CONFIG": str(fast_config(work)), "FEDDALE_TICK_S": "0.2",
    }, work / "coordinator.log")
    url = f"http://127.0.0.1:{port}"
    try:
        assert poll_until(lambda: status(url) == 200, 120, 0.2), f"the coordinator did not start; see {work}"
        yield url
    finally:
        process.stop()


@pytest.fixture
def fresh(coordinator_url: str, process_redis_client: redis.Redis) -> str:
    """The coordinator process over its emptied Redis (``process_redis_client`` flushes it)."""
    return coordinator_url


@pytest.fixture
def cli(fresh: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `feddale ARGS...` in process against the coordinator process; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("FEDDALE_URL", fresh)
    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", ADMIN)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def enroll(cli: Cli, name: str, *options: str) -> str:
    code, out, err = cli("clients", "enroll", name, *options)
    assert code == 0, err
    token = out.strip()
    assert out.count("\n") == 1 and len(token) >= 32, "stdout is the token alone"
    assert "not shown again" in err and name in err
    return token


def post_register(url: str, token: str, **body: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/clients/register", json=body, headers=auth_headers(token), timeout=30)


def registry(url: str) -> dict[str, dict]:
    listing = httpx.get(f"{url}/v1/clients", headers=auth_headers(ADMIN), timeout=30).json()
    return {c["name"]: c for c in listing}


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.e2e
def test_sybil_registrations_and_name_takeover_are_refused(fresh: str, cli: Cli,
                                                          process_redis_client: redis.Redis) -> None:
    url = fresh
    first = post_register(url, BOOTSTRAP, name="node-a")
    assert first.status_code == 201
    node_a = first.json()

    # the bootstrap secret cannot take a taken name over, and the owner keeps its token
    again = post_register(url, BOOTSTRAP, name="node-a", role="client")
    assert again.status_code == 409 and "taken" in again.json()["detail"]
    assert httpx.get(f"{url}/v1/tasks", headers=auth_headers(node_a["token"]), timeout=30).status_code == 200
    # ... nor can the owner's token mint a second identity or change its role
    assert post_register(url, node_a["token"], name="node-b").status_code == 403
    assert post_register(url, node_a["token"], role="detector").status_code == 403
    rejoin = post_register(url, node_a["token"])  # what a restarted node that kept its token does
    assert rejoin.status_code == 200 and rejoin.json()["client_id"] == node_a["client_id"]
    assert rejoin.json()["token"] == node_a["token"]

    # the admin cannot enroll a taken name either
    code, out, err = cli("clients", "enroll", "node-a")
    assert code == 2 and "409" in err and one_line(err) and out == ""

    # an enrollment reserves its name; its token fixes name and role and works once
    token = enroll(cli, "edge-1")
    assert post_register(url, BOOTSTRAP, name="edge-1").status_code == 409
    assert post_register(url, token, name="edge-2").status_code == 403  # refused before the token is spent
    assert post_register(url, token, role="detector").status_code == 403  # the issuer chose the role
    joined = post_register(url, token, role="client")
    assert joined.status_code == 201
    assert (joined.json()["name"], joined.json()["role"]) == ("edge-1", "client")
    reused = post_register(url, token)
    assert reused.status_code == 401 and post_register(url, token, name="edge-3").status_code == 401
    assert post_register(url, BOOTSTRAP, name="edge-1").status_code == 409

    clients = registry(url)
    assert sorted(clients) == ["edge-1", "node-a"], "no identity beyond the two that joined"
    assert clients["edge-1"]["joined_by"] == "enrollment" and clients["node-a"]["joined_by"] == "bootstrap"
    assert clients["node-a"]["client_id"] == node_a["client_id"]
    # enrollment tokens are stored as hashes only
    dump = b"".join(process_redis_client.dump(key) or b"" for key in process_redis_client.keys("feddale:*"))
    assert token.encode() not in dump


@pytest.mark.e2e
def test_a_detector_credential_pulls_students_and_nothing_else(fresh: str, cli: Cli) -> None:
    url = fresh
    token = enroll(cli, "det-1", "--role", "detector")
    assert post_register(url, token, role="client").status_code == 403  # no promotion at redemption
    detector = post_register(url, token, role="detector").json()
    assert detector["role"] == "detector" and detector["shard"] is None
    headers = auth_headers(detector["token"])
    node = post_register(url, BOOTSTRAP, name="node-a").json()
    run_id = httpx.post(f"{url}/v1/runs", json={"mode": "few_shot", "fedavg_rounds": 1},
                        headers=auth_headers(ADMIN), timeout=60).json()["run_id"]

    def call(method: str, path: str, **kwargs: object) -> int:
        return httpx.request(method, f"{url}{path}", headers=headers, timeout=30, **kwargs).status_code  # type: ignore[arg-type]

    assert call("GET", "/v1/students/latest") == call("GET", "/v1/students/current") == 404  # allowed: none yet
    refused = {
        "tasks": call("GET", "/v1/tasks"),
        "public set": call("GET", f"/v1/public/{'0' * 64}"),
        "global adapter": call("GET", f"/v1/runs/{run_id}/rounds/1/global"),
        "adapter upload": call("PUT", f"/v1/runs/{run_id}/rounds/1/adapter?samples=1", content=b"x" * 64),
        "scores upload": call("PUT", f"/v1/runs/{run_id}/rounds/1/scores", content=b"x" * 64),
        "new name": call("POST", "/v1/clients/register", json={"name": "det-2"}),
        "client role": call("POST", "/v1/clients/register", json={"role": "client"}),
        "enroll": call("POST", "/v1/clients", json={"name": "det-3"}),
        "revoke": call("DELETE", "/v1/clients/node-a"),
        "runs": call("POST", "/v1/runs", json={"mode": "one_shot"}),
        "registry": call("GET", "/v1/clients"),
    }
    assert refused == {what: 403 for what in refused}, refused
    # a detector's own registration is the only thing it may read back, unchanged
    again = post_register(url, detector["token"])
    assert again.status_code == 200 and again.json()["client_id"] == detector["client_id"]
    assert sorted(registry(url)) == ["det-1", "node-a"] and node["role"] == "client"


@pytest.mark.e2e
def test_an_enrolled_client_node_joins_rejoins_after_a_restart_and_is_revoked(
    fresh: str, cli: Cli, tmp_path: Path
) -> None:
    url = fresh
    token = enroll(cli, "edge-7")
    state = tmp_path / "state"
    node_url = f"http://127.0.0.1:{free_port()}"
    env = {"FEDDALE_COORDINATOR_URL": url, "FEDDALE_ENROLLMENT_TOKEN": token, "FEDDALE_STATE_DIR": str(state),
           "FEDDALE_PORT": node_url.rsplit(":", 1)[1], "FEDDALE_HOST": "127.0.0.1", "FEDDALE_STUDENT_POLL_S": "1",
           "OMP_NUM_THREADS": "1"}  # no bootstrap secret and no node name: the enrollment names it
    log = tmp_path / "node.log"

    def joined() -> dict | None:
        return registry(url).get("edge-7")

    node = start("feddale_client_node", env, log)
    try:
        assert poll_until(lambda: status(node_url, "/readyz") == 200, 180, 0.5), log.read_text()[-3000:]
        first = joined()
        assert first is not None and first["role"] == "client" and first["joined_by"] == "enrollment"
        credential = state / "credential.json"
        assert stat.S_IMODE(credential.stat().st_mode) == 0o600
        kept = json.loads(credential.read_text())
        assert kept["client_id"] == first["client_id"] and kept["name"] == "edge-7"

        # restarted with the same (now spent) enrollment token: it rejoins with the credential it kept
        node.stop()
        node = start("feddale_client_node", env, log)
        assert poll_until(lambda: status(node_url, "/readyz") == 200, 180, 0.5), log.read_text()[-3000:]
        assert joined()["client_id"] == first["client_id"] and len(registry(url)) == 1

        code, out, err = cli("clients", "revoke", "edge-7")
        assert code == 0 and out.strip() == f"revoked client edge-7 ({first['client_id']})", err
        # its token is dead at once, and the node, holding no other credential, stops being ready
        tasks = httpx.get(f"{url}/v1/tasks", headers=auth_headers(kept["token"]), timeout=30)
        assert tasks.status_code == 401
        assert poll_until(lambda: status(node_url, "/readyz") == 503, 60, 0.5), log.read_text()[-3000:]
        assert joined() is None and not credential.exists()
        assert "holds no credential the coordinator accepts" in log.read_text()
    finally:
        node.stop()
    assert "Traceback" not in log.read_text()

    code, _, err = cli("clients", "revoke", "edge-7")
    assert code == 2 and "404" in err and one_line(err)
    enroll(cli, "edge-7")  # the name is free for the admin to enroll again ...
    code, _, err = cli("clients", "enroll", "edge-7")  # ... once
    assert code == 2 and "409" in err and one_line(err)
    code, out, err = cli("clients", "revoke", "edge-7")  # a pending enrollment can be revoked too
    assert code == 0 and "pending enrollment" in out
    code, _, err = cli("clients", "enroll", "../etc")
    assert code == 2 and "422" in err and one_line(err)


# --------------------------------------------------------------------------- in process


def test_enrollment_tokens_expire_and_free_their_name(coordinator: TestClient) -> None:
    issued = coordinator.post("/v1/clients", json={"name": "edge-1", "ttl_s": 0.3}, headers=admin_headers())
    assert issued.status_code == 201 and issued.json()["expires_at"] <= time.time() + 0.3
    time.sleep(0.6)
    late = coordinator.post("/v1/clients/register", json={}, headers=auth_headers(issued.json()["token"]))
    assert late.status_code == 401
    assert coordinator.post("/v1/clients", json={"name": "edge-1"}, headers=admin_headers()).status_code == 201


def test_the_default_enrollment_lifetime_is_the_coordinators(tmp_path: Path, redis_client: redis.Redis) -> None:
    from feddale_coordinator.app import create_app

    settings = coordinator_settings(tmp_path, "unused", enrollment_ttl_s=3600.0)
    with TestClient(create_app(settings, redis_client=redis_client)) as client:
        issued = client.post("/v1/clients", json={"name": "edge-1"}, headers=admin_headers()).json()
        assert 3590 < issued["expires_at"] - time.time() <= 3600
        assert 3590 < redis_client.pttl(f"feddale:enrollment:{_sha256(issued['token'])}") / 1000 <= 3600


def _sha256(token: str) -> str:
    from feddale.service.auth import hash_token

    return hash_token(token)


def test_without_a_bootstrap_secret_only_enrolled_nodes_join(tmp_path: Path, redis_client: redis.Redis) -> None:
    from feddale_coordinator.app import create_app

    settings = coordinator_settings(tmp_path, "unused", bootstrap_secret=None)
    with TestClient(create_app(settings, redis_client=redis_client)) as client:
        assert client.post("/v1/clients/register", json={"name": "node-a"},
                           headers=auth_headers(BOOTSTRAP)).status_code == 401
        refused = client.post("/v1/clients/register", json={"name": "node-a"}, headers=admin_headers())
        assert refused.status_code == 403 and "POST /v1/clients" in refused.json()["detail"]
        token = client.post("/v1/clients", json={"name": "node-a"}, headers=admin_headers()).json()["token"]
        assert client.post("/v1/clients/register", json={}, headers=auth_headers(token)).status_code == 201


def test_a_revoked_name_cannot_be_reclaimed_with_the_bootstrap_secret(coordinator: TestClient) -> None:
    register(coordinator, "node-a")
    revoked = coordinator.delete("/v1/clients/node-a", headers=admin_headers())
    assert revoked.status_code == 200 and revoked.json()["enrollment_pending"] is False
    again = coordinator.post("/v1/clients/register", json={"name": "node-a"}, headers=auth_headers(BOOTSTRAP))
    assert again.status_code == 403 and "revoked" in again.json()["detail"]
    token = coordinator.post("/v1/clients", json={"name": "node-a"}, headers=admin_headers()).json()["token"]
    assert coordinator.post("/v1/clients/register", json={}, headers=auth_headers(token)).status_code == 201


def test_revoking_a_client_takes_it_out_of_the_open_round(coordinator: TestClient) -> None:
    a, b = register(coordinator, "node-a"), register(coordinator, "node-b")
    run_id = coordinator.post("/v1/runs", json={"mode": "one_shot", "round_deadline_s": 600},
                              headers=admin_headers()).json()["run_id"]
    view = wait_run(coordinator, run_id, ("distill",), timeout=60)
    assert sorted(view["expected"]) == sorted([a["client_id"], b["client_id"]])
    blob = encode_scores(np.linspace(0, 1, view["public_count"]),
                         PayloadHeader(VERSION, view["public_digest"], run_id, 1, b["client_id"], view["public_count"]))
    assert coordinator.put(f"/v1/runs/{run_id}/rounds/1/scores", content=blob,
                           headers=auth_headers(b["token"])).status_code == 200
    time.sleep(0.3)
    assert coordinator.get(f"/v1/runs/{run_id}", headers=admin_headers()).json()["status"] == "distill"  # waits for a
    assert coordinator.delete("/v1/clients/node-a", headers=admin_headers()).status_code == 200
    view = wait_run(coordinator, run_id, ("student_training",), timeout=30)
    assert view["history"][0]["participants"] == [b["client_id"]] and view["history"][0]["closed_by"] == "all"


# --------------------------------------------------------------------------- the node's side


def test_a_node_needs_an_enrollment_token_a_bootstrap_secret_or_a_kept_credential(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("FEDDALE_BOOTSTRAP_SECRET", "FEDDALE_ENROLLMENT_TOKEN", "FEDDALE_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="FEDDALE_ENROLLMENT_TOKEN"):
        load_settings(DetectorSettings)
    monkeypatch.setenv("FEDDALE_ENROLLMENT_TOKEN", "e" * 43)
    assert load_settings(DetectorSettings).enrollment_token == "e" * 43
    monkeypatch.delenv("FEDDALE_ENROLLMENT_TOKEN")
    monkeypatch.setenv("FEDDALE_STATE_DIR", str(tmp_path))
    (tmp_path / "credential.json").write_text("{}")
    assert load_settings(DetectorSettings).credential_file == tmp_path / "credential.json"


def test_the_session_keeps_its_credential_and_stops_on_a_refusal(tmp_path: Path) -> None:
    seen: list[tuple[str, dict]] = []
    owner = {"token": "c-1.own"}

    def coordinator(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        seen.append((request.headers["authorization"].removeprefix("Bearer "), body))
        token = seen[-1][0]
        if token == "enroll-once" and len(seen) == 1:
            return httpx.Response(201, json={"client_id": "c-1", "name": "edge-1", "token": owner["token"]})
        if token == owner["token"]:
            return httpx.Response(200, json={"client_id": "c-1", "name": "edge-1", "token": owner["token"]})
        if token == "boot":
            return httpx.Response(409, json={"detail": "the name 'node' is taken"})
        return httpx.Response(401, json={"detail": "invalid, used or expired credential"})

    credential = tmp_path / "credential.json"
    transport = httpx.MockTransport(coordinator)
    session = CoordinatorSession("http://c", None, "node", "client", enrollment_token="enroll-once",
                                 credential_file=credential, transport=transport)
    assert session.register()["client_id"] == "c-1" and session.name == "edge-1"
    assert json.loads(credential.read_text())["token"] == "c-1.own" and seen[0][1] == {"role": "client"}

    restarted = CoordinatorSession("http://c", "boot", "node", "client", enrollment_token="enroll-once",
                                   credential_file=credential, transport=transport)
    assert restarted.register()["client_id"] == "c-1" and seen[-1][0] == "c-1.own"  # not the spent token

    owner["token"] = "c-1.revoked"  # the coordinator forgot it: the kept credential goes, the next is tried
    with pytest.raises(RegistrationRefused, match="409 the name 'node' is taken"):
        CoordinatorSession("http://c", "boot", "node", "client", credential_file=credential,
                           transport=transport).register()
    assert not credential.exists() and [t for t, _ in seen[-2:]] == ["c-1.own", "boot"]
