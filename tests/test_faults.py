"""Fault injection on real processes (loopback): every test breaks something and asserts the
run's final state through the REST API (and, to prove "nothing counted twice", Redis).

One federation (Redis with append-only persistence, coordinator, student-trainer, detector,
three client nodes, tiny models) serves the process-level faults, in file order:

1. a client node SIGKILLed while training: the round closes at ``min_clients`` after its
   deadline, the run publishes, and the restarted node rejoins as itself (it takes part in
   the next run, test 2);
2. the coordinator SIGKILLed mid-round and restarted: the run goes on in the same round with
   the uploads it had, each counted once;
3. the student-trainer SIGKILLed mid-job and restarted: RQ retries the job, exactly one student
   version is published, while the detector swaps to it under load without a failed request;
4. Redis stopped for a few seconds mid-round: the Redis users report not-ready and 503, then
   recover, and the run (persisted in the AOF) publishes;
5. afterwards, no token or secret appears in any service's log.

Then, without the federation: a stalled upload (a TCP proxy that black-holes it) is timed out
on both ends and retried, and the stored adapter is intact; the run lock of a killed holder
frees itself; an artifact write whose read-back differs leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq.job import JobStatus
from service_helpers import BOOTSTRAP, admin_headers, coordinator_settings, fast_config, serve_in_thread

from feddale.method import adapters, models
from feddale.method.config import RunConfig
from feddale.protocol.rounds import load_teacher
from feddale.service.auth import auth_headers
from feddale.service.http import CoordinatorSession, poll_until
from feddale.ops.launcher import LocalFederation
from feddale.service.queue import fetch_job

from feddale_coordinator.artifacts import ArtifactStore
from feddale_coordinator.runs import JOB_RETRIES
from feddale_coordinator.store import P, Store

RUN_TIMEOUT_S = 240.0
SESSIONS = [{"id": "s1", "messages": ["Receiving block blk_1 src: /10.0.0.1:5 dest: /10.0.0.2:50010"]},
            {"id": "s2", "messages": ["PacketResponder 1 for block blk_2 terminating"]}]
# a client or detector token as the coordinator issues them: "<c|d>-<12 hex>.<43 url-safe chars>"
TOKEN_SHAPE = re.compile(r"\b[cd]-[0-9a-f]{12}\.[A-Za-z0-9_-]{40,}")


# --------------------------------------------------------------------------- the federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    work = tmp_path_factory.mktemp("faults")
    with LocalFederation(
        3, config=str(fast_config(work)), log_dir=work,
        # margin 1.0: every new student is promoted, whatever its agreement (the rule: test_lifecycle.py)
        extra_env={"FEDDALE_STUDENT_POLL_S": "1", "FEDDALE_TICK_S": "0.2", "FEDDALE_JOB_HEARTBEAT_S": "1",
                   "FEDDALE_LOG_LEVEL": "INFO", "FEDDALE_PROMOTION_MARGIN": "1.0"},
    ) as federation:
        yield federation


@pytest.fixture
def settled(fed: LocalFederation) -> LocalFederation:
    """The shared federation as each test expects it, whatever ran before: every process up, no run active.

    The fault tests share one federation (starting it costs more than most tests); this makes
    their order irrelevant: a test that failed halfway cannot leave a paused node, a dead
    service or a run that blocks the next one's ``POST /v1/runs``.
    """
    for name in ("client-1", "client-2", "client-3"):
        if fed.services[name].alive:
            fed.kill(name, signal.SIGCONT)  # a no-op unless a test left it paused
    for name in fed.dead():
        fed.restart(name)
    store = store_of(fed)
    assert poll_until(lambda: store.active_run_id() is None, RUN_TIMEOUT_S, 0.5), \
        f"run {store.active_run_id()} is still active; logs in {fed.work_dir}/logs"
    return fed


def start_run(fed: LocalFederation, **body: object) -> str:
    with fed.admin() as admin:
        created = admin.post("/v1/runs", json=body)
    assert created.status_code == 201, created.text
    return created.json()["run_id"]


def run_view(fed: LocalFederation, run_id: str) -> dict:
    with fed.admin() as admin:
        response = admin.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_view(fed: LocalFederation, run_id: str, done, what: str, timeout: float = RUN_TIMEOUT_S) -> dict:
    """Poll the run until ``done(view)``; the failure message names the state it was stuck in."""
    seen: dict = {}

    def check() -> bool:
        try:
            seen.update(run_view(fed, run_id))
        except (httpx.HTTPError, AssertionError):
            return False
        return bool(done(seen))

    assert poll_until(check, timeout, 0.2), (
        f"{what}: run {run_id} stuck in {seen.get('status')} ({seen.get('reason')}); logs in {fed.work_dir}/logs")
    return dict(seen)


def finish(fed: LocalFederation, run_id: str) -> dict:
    return wait_view(fed, run_id, lambda v: v["status"] in ("published", "failed"), "finishing")


def client_ids(fed: LocalFederation) -> dict[str, str]:
    """Registered client nodes, name -> client id."""
    with fed.admin() as admin:
        return {c["name"]: c["client_id"] for c in admin.get("/v1/clients").json() if c["role"] == "client"}


def node_status(fed: LocalFederation, name: str) -> dict:
    try:
        return httpx.get(f"{fed.services[name].url}/v1/status", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


def ready(url: str) -> int:
    try:
        return httpx.get(f"{url}/readyz", timeout=15).status_code
    except httpx.HTTPError:
        return -1


def store_of(fed: LocalFederation) -> Store:
    return Store(redis.Redis.from_url(fed.redis_url))


def serving(url: str) -> str | None:
    try:
        return httpx.get(f"{url}/v1/model", timeout=5).json().get("version")
    except (httpx.HTTPError, ValueError):
        return None


class DetectLoad:
    """Threads posting /v1/detect back to back, recording (status, model_version) per answer."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url, self.stop = url, threading.Event()
        self.answers: list[list[tuple[int, str | None]]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(threads)]

    def _work(self, i: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                try:
                    response = http.post(f"{self.url}/v1/detect", json={"sessions": SESSIONS})
                    version = response.json().get("model_version") if response.status_code == 200 else None
                    self.answers[i].append((response.status_code, version))
                except httpx.HTTPError as exc:
                    self.answers[i].append((-1, repr(exc)))
                time.sleep(0.02)

    def __enter__(self) -> DetectLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def count(self, version: str) -> int:
        return sum(1 for answers in self.answers for _, v in list(answers) if v == version)


# --------------------------------------------------------------------------- 1. a client dies


@pytest.mark.e2e
def test_client_killed_while_training_round_closes_at_deadline_and_the_node_rejoins(settled: LocalFederation) -> None:
    fed = settled
    ids = client_ids(fed)
    assert sorted(ids) == ["client-1", "client-2", "client-3"]
    run_id = start_run(fed, mode="one_shot", min_clients=2, round_deadline_s=30)
    assert poll_until(lambda: node_status(fed, "client-3").get("state", "").startswith("training"), 60, 0.05), \
        "client-3 never started training"
    fed.kill("client-3", signal.SIGKILL)

    view = finish(fed, run_id)
    assert view["status"] == "published", view["reason"]
    closed = view["history"][0]
    assert closed["closed_by"] == "deadline"
    assert closed["participants"] == sorted([ids["client-1"], ids["client-2"]])
    assert ids["client-3"] in view["expected"] and ids["client-3"] not in view["uploaded"]

    fed.restart("client-3")  # waits until it is ready: registered again
    assert poll_until(lambda: node_status(fed, "client-3").get("state") == "idle", 60)
    assert client_ids(fed)["client-3"] == ids["client-3"], "the restarted node must rejoin as itself"
    assert node_status(fed, "client-3")["client_id"] == ids["client-3"]


# --------------------------------------------------------------------------- 2. the coordinator dies


@pytest.mark.e2e
def test_coordinator_killed_mid_round_resumes_the_round_with_its_uploads(settled: LocalFederation) -> None:
    fed = settled
    ids = client_ids(fed)
    store = store_of(fed)
    # client-2 is paused (alive in the registry, so expected): the round cannot close before
    # the coordinator has been killed and restarted, whatever the timing of the others.
    fed.kill("client-2", signal.SIGSTOP)
    try:
        run_id = start_run(fed, mode="one_shot", min_clients=3, round_deadline_s=600, student={"steps": 4})
        early = {ids["client-1"], ids["client-3"]}
        wait_view(fed, run_id, lambda v: set(v["uploaded"]) == early, "two uploads before the kill")
        before = store.uploads(run_id, 1)

        fed.kill("coordinator", signal.SIGKILL)
        fed.restart("coordinator")
        resumed = run_view(fed, run_id)
        assert (resumed["status"], resumed["round"]) == ("distill", 1)
        assert set(resumed["uploaded"]) == early
    finally:
        fed.kill("client-2", signal.SIGCONT)

    view = finish(fed, run_id)
    assert view["status"] == "published", view["reason"]
    assert view["history"][0]["closed_by"] == "all"
    assert view["history"][0]["participants"] == sorted(ids.values())  # client-3, restarted in test 1, rejoined
    after = store.uploads(run_id, 1)
    for client_id in early:
        assert after[client_id] == before[client_id], "an upload received before the crash was redone"
    for client_id, client in view["clients"].items():
        assert client["uploaded_rounds"] == [1]
        assert client["bytes_up"] == after[client_id]["bytes"], "an upload was counted twice"
    assert view["bytes_up"] == sum(u["bytes"] for u in after.values())


# --------------------------------------------------------------------------- 3. the trainer dies


@pytest.mark.e2e
def test_student_trainer_killed_mid_job_is_retried_publishes_once_and_the_detector_swaps_under_load(
    settled: LocalFederation,
) -> None:
    fed = settled
    store = store_of(fed)
    if store.latest_student() is None:  # run alone: publish a first student to swap away from
        assert finish(fed, start_run(fed, mode="one_shot", min_clients=3))["status"] == "published"
    old = store.latest_student()["version"]
    assert poll_until(lambda: serving(fed.detector_url) == old, 60), "the detector never served the last student"
    students_before = set(store.r.hkeys(P + "students"))
    run_id = start_run(fed, mode="one_shot", min_clients=3, student={"steps": 6})
    wait_view(fed, run_id, lambda v: v["status"] == "student_training", "waiting for the student job")

    def job_status() -> JobStatus | None:
        try:
            return fetch_job(f"student-{run_id}", store.r).get_status()
        except Exception:
            return None

    with DetectLoad(fed.detector_url) as load:
        assert poll_until(lambda: job_status() == JobStatus.STARTED, 60, 0.05), f"job never started: {job_status()}"
        fed.kill("student-trainer", signal.SIGKILL)  # the worker and its work-horse, mid-job
        fed.restart("student-trainer")
        view = finish(fed, run_id)
        assert view["status"] == "published", view["reason"]
        new = view["student_version"]
        assert poll_until(lambda: load.count(new) >= 10, 120), "the detector did not swap to the new student"

    job = fetch_job(f"student-{run_id}", store.r)
    assert job.get_status() == JobStatus.FINISHED
    assert job.retries_left == JOB_RETRIES - 1, "the kill did not land mid-job (or it was retried more than once)"
    assert set(store.r.hkeys(P + "students")) - students_before == {new.encode()}, "exactly one new student"
    assert new != old and store.latest_student()["version"] == new

    answers = [a for thread in load.answers for a in thread]
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
    assert {v for _, v in answers} == {old, new}, "every answer names the version that scored it"
    for thread in load.answers:  # per client, versions only move forward
        versions = [v for _, v in thread]
        assert versions == sorted(versions, key=lambda v: v == new)


# --------------------------------------------------------------------------- 4. Redis goes away


@pytest.mark.e2e
def test_redis_stopped_briefly_services_report_not_ready_and_the_run_recovers(settled: LocalFederation) -> None:
    fed = settled
    ids = client_ids(fed)
    trainer = fed.services["student-trainer"].url
    assert trainer is not None
    run_id = start_run(fed, mode="one_shot", min_clients=3, student={"steps": 5})
    assert run_view(fed, run_id)["status"] == "distill"

    fed.kill("redis", signal.SIGTERM)
    fed.services["redis"].process.wait(30)  # type: ignore[union-attr]
    try:
        assert poll_until(lambda: ready(fed.coordinator_url) == 503, 30), "coordinator still ready without Redis"
        assert httpx.get(f"{fed.coordinator_url}/readyz", timeout=15).json()["checks"] == {"redis": False}
        assert poll_until(lambda: ready(trainer) == 503, 30), "student-trainer still ready without Redis"
        with fed.admin() as admin:
            during = admin.get(f"/v1/runs/{run_id}")
        assert during.status_code == 503 and during.headers.get("retry-after"), during.text
        time.sleep(3.0)  # clients keep polling and uploading into 503s meanwhile
    finally:
        fed.restart("redis")
    assert poll_until(lambda: ready(fed.coordinator_url) == 200, 60), "coordinator did not become ready again"
    assert poll_until(lambda: ready(trainer) == 200, 60), "student-trainer did not become ready again"

    view = finish(fed, run_id)  # the run itself came back from the append-only file
    assert view["status"] == "published", view["reason"]
    assert view["history"][0]["participants"] == sorted(ids.values())
    assert client_ids(fed) == ids  # the registry survived too
    assert not fed.dead(), f"services died: {fed.dead()}"


# --------------------------------------------------------------------------- 5. no secrets in logs


@pytest.mark.e2e
def test_no_token_or_secret_in_any_log(settled: LocalFederation) -> None:
    fed = settled
    store = store_of(fed)
    if not store.run_ids():  # run alone: make the services log a whole run first
        assert finish(fed, start_run(fed, mode="one_shot", min_clients=3))["status"] == "published"
    job_tokens = []
    for run_id in store.run_ids():
        try:
            job_tokens.append(fetch_job(f"student-{run_id}", store.r).kwargs["job_token"])
        except Exception:
            continue
    logs = {p.name: p.read_text(errors="replace") for p in (fed.work_dir / "logs").glob("*.log")}
    assert len(logs) >= 7 and sum(len(t) for t in logs.values()) > 0
    secrets = {"admin token": fed.admin_token, "bootstrap secret": fed.bootstrap_secret,
               **{f"job token {i}": t for i, t in enumerate(job_tokens)}}
    for name, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in {name}"
        assert not TOKEN_SHAPE.search(text), f"a client/detector token is in {name}: {TOKEN_SHAPE.search(text)}"


# --------------------------------------------------------------------------- 6. a stalled upload


class StallingProxy:
    """A loopback TCP proxy whose first PUT is black-holed after ``keep`` bytes.

    The client's side is read and dropped, the coordinator's side is held open without a
    byte more: a link that stalled mid-upload, seen by neither end as closed. Everything else
    (and every later PUT) passes through.
    """

    def __init__(self, upstream_port: int, keep: int) -> None:
        self.upstream_port, self.keep = upstream_port, keep
        self.puts = 0
        self.stalled = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._serving: asyncio.Task | None = None
        started = threading.Event()

        async def serve() -> None:
            self._serving = asyncio.current_task()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            async with server:
                try:
                    await server.serve_forever()
                except asyncio.CancelledError:
                    pass

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(serve(),), daemon=True)
        self.thread.start()
        assert started.wait(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        stall = {"on": False, "sent": 0}

        async def to_server() -> None:
            while data := await reader.read(65536):
                if not stall["on"] and data.startswith(b"PUT "):
                    self.puts += 1
                    stall["on"] = self.puts == 1
                if stall["on"]:
                    room = self.keep - stall["sent"]
                    if room > 0:
                        up_writer.write(data[:room])
                        await up_writer.drain()
                        stall["sent"] += min(room, len(data))
                    if stall["sent"] >= self.keep:
                        self.stalled.set()
                    continue
                up_writer.write(data)
                await up_writer.drain()
            if not stall["on"]:
                up_writer.close()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if not stall["on"]:
                    writer.write(data)
                    await writer.drain()
            writer.close()

        try:
            await asyncio.gather(to_server(), to_client(), return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()

    def close(self) -> None:
        """Cancel every connection and wait for it to end, then stop the server and the loop's thread.

        Why wait: a task still pending when the loop closes is finalized later by the garbage
        collector, inside whatever runs then; once that was CPython's ast.parse in another test,
        which failed with "AST constructor recursion depth mismatch".
        """

        async def shutdown() -> None:
            connections = [t for t in asyncio.all_tasks() if t not in (asyncio.current_task(), self._serving)]
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            self._serving.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.thread.join(10)
        self.loop.close()


def test_a_stalled_upload_times_out_on_both_ends_is_retried_and_stored_intact(
    tmp_path: Path, redis_server: str, redis_client: redis.Redis,
) -> None:
    from feddale_coordinator.app import create_app

    settings = coordinator_settings(tmp_path, redis_server, tick_s=0.1, body_timeout_s=2.0)
    app = create_app(settings)
    with serve_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        proxy = StallingProxy(port, keep=1500)
        session = CoordinatorSession(f"http://127.0.0.1:{proxy.port}", BOOTSTRAP, "slow-node", "client", timeout=1.0)
        try:
            registration = session.register()  # alive before the run opens: it is expected
            me, token = registration["client_id"], registration["token"]
            created = httpx.post(f"{url}/v1/runs", json={"mode": "few_shot", "fedavg_rounds": 1},
                                 headers=admin_headers(), timeout=30)
            assert created.status_code == 201, created.text
            run_id = created.json()["run_id"]

            def status() -> str:
                return httpx.get(f"{url}/v1/runs/{run_id}", headers=admin_headers(), timeout=30).json()["status"]

            assert poll_until(lambda: status() == "fedavg", 120, 0.1)
            # Round 1 starts from the run's seeded adapter, which every client derives itself.
            teacher = load_teacher(RunConfig.model_validate(
                httpx.get(f"{url}/v1/runs/{run_id}", headers=admin_headers(), timeout=30).json()["config"]))
            blob = adapters.adapter_to_bytes(teacher.initial, models.lora_meta(teacher.model))
            assert len(blob) > 4 * proxy.keep
            accepted = session.request("PUT", f"/v1/runs/{run_id}/rounds/1/adapter", content=blob,
                                       params={"samples": 10}, headers={"Content-Type": "application/octet-stream"})
            assert proxy.stalled.is_set() and proxy.puts >= 2, "the first upload was not stalled and retried"
            assert accepted.json()["sha256"] == hashlib.sha256(blob).hexdigest()

            # the coordinator gave up on the stalled body (408) instead of waiting for it forever,
            # although the stalled connection is still open
            metric = 'route="/v1/runs/{run_id}/rounds/{round_no}/adapter",status="408"} 1'
            assert poll_until(lambda: metric in httpx.get(f"{url}/metrics").text, 30), \
                "no 408 for the stalled body:\n" + httpx.get(f"{url}/metrics").text
        finally:
            session.close()
            proxy.close()

        uploads = Store(redis_client).uploads(run_id, 1)
        assert list(uploads) == [me]
        stored = ArtifactStore(settings.artifact_dir).read(tuple(uploads[me]["path"]))
        assert stored == blob and uploads[me]["sha256"] == hashlib.sha256(blob).hexdigest()
        assert not [p for p in settings.artifact_dir.rglob("*") if p.name.endswith(".part")]
        assert poll_until(lambda: status() == "distill", 60, 0.1), "FedAvg over the stored adapter failed"
        averaged = httpx.get(f"{url}/v1/runs/{run_id}/rounds/1/global", headers=auth_headers(token), timeout=30)
        assert averaged.status_code == 200
        adapters.adapter_from_bytes(averaged.content)


# --------------------------------------------------------------------------- 7. a lock holder dies


HOLD_LOCK = """
import sys, time, redis
from feddale_coordinator.store import Store
with Store(redis.Redis.from_url(sys.argv[1]), lock_ttl_s=1.0).run_lock("run-held"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_the_run_lock_of_a_killed_coordinator_frees_itself(redis_server: str, redis_client: redis.Redis) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, redis_server], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        time.sleep(3.5)  # over three lock lifetimes: a live holder keeps renewing it
        assert not redis_client.lock(P + "lock:run:run-held", timeout=1).acquire(blocking=False), \
            "the lock expired under a live holder"
    finally:
        holder.kill()
        holder.wait(10)
    lock = redis_client.lock(P + "lock:run:run-held", timeout=5, blocking_timeout=20)
    assert lock.acquire(), "a SIGKILLed holder's lock never expired"
    lock.release()


# --------------------------------------------------------------------------- 8. the disk lies


def test_an_artifact_write_that_reads_back_wrong_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = ArtifactStore(tmp_path)
    store.write(("runs", "r1", "adapter.safetensors"), b"old and good")
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self)[:-1] + b"!" if self.name.endswith(".part")
                        else real(self))
    with pytest.raises(OSError, match="the bytes read back differ"):
        store.write(("runs", "r1", "adapter.safetensors"), b"new bytes, torn on the way to the disk")
    monkeypatch.undo()
    assert store.read(("runs", "r1", "adapter.safetensors")) == b"old and good"
    assert [p.name for p in (tmp_path / "runs" / "r1").iterdir()] == ["adapter.safetensors"]


# --------------------------------------------------------------------------- 9. bounded load


@pytest.mark.e2e
def test_detector_under_a_short_bounded_load_answers_every_request(tmp_path: Path) -> None:
    """scripts/load_detector.py in small: 8 clients for 5 s against a real detector process.
    Only correctness is asserted (no errors, every answer names the serving version); the
    throughput and latency it prints are measurements, recorded in docs/reliability.md."""
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "load_detector.py"),
         "--clients", "8", "--duration", "5", "--warmup", "1", "--student", "tiny", "--threads", "1",
         "--json-out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == 0 and result["requests"] > 0, result
    assert result["model_versions"] == {result["serving_version"]: result["requests"]}
    assert result["detector_rss_mib"]["max"] > 0
