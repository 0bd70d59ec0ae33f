"""Shared service plumbing: tokens, backoff/retries, metrics text, body limits, the coordinator
session, and the /v1/detect serving pieces (schemas, atomic swap, micro-batching) on real tiny
students."""

from __future__ import annotations

import asyncio
from pathlib import Path
import random
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import httpx
from prometheus_client.parser import text_string_to_metric_families
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from feddale.service.auth import hash_token, token_matches
from feddale.service.http import Backoff, CoordinatorSession, RetryableStatus, check, poll_until, with_retries
from feddale.service.limits import read_body
from feddale.service.observability import Metrics, add_ops_routes
from feddale.service.serving import MicroBatcher, ModelSlot, StudentFollower, add_detect_routes, load_student
from feddale.method.student import StudentConfig, train_student

TEXTS = ["Receiving block blk_<*> src: /<*> dest: /<*>", "PacketResponder <*> for block blk_<*> terminating",
         "Got exception while serving blk_<*> to /<*>:", "writeBlock blk_<*> received exception java.io.IOException"]


@pytest.fixture(scope="module")
def students() -> tuple[bytes, bytes]:
    """Two genuinely different tiny students (different budgets), as artifact bytes."""
    blobs = []
    for steps in (1, 2):
        cfg = StudentConfig(base="tiny:bert", steps=steps, batch_size=4, micro_batch=4, max_len=32)
        blobs.append(train_student(TEXTS, [0, 0, 1, 1], cfg, progress=False).to_bytes())
    assert blobs[0] != blobs[1]
    return blobs[0], blobs[1]


def test_tokens_are_hashed_and_compared() -> None:
    assert hash_token("abc") != "abc" and len(hash_token("abc")) == 64
    assert token_matches("abc", hash_token("abc")) and not token_matches("abd", hash_token("abc"))


def test_backoff_grows_with_jitter_caps_and_resets() -> None:
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(6)]
    assert all(0.5 <= d <= 1.0 for d in delays[:1]) and all(d <= 8.0 for d in delays)
    assert delays[3] >= 4.0  # 2**3 = 8 -> jitter in [4, 8]
    backoff.reset()
    assert backoff.next_delay() <= 1.0
    with pytest.raises(ValueError):
        Backoff(base=0)


def test_with_retries_retries_transport_errors_only() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("coordinator away")
        return "ok"

    assert with_retries(flaky, backoff=Backoff(base=0.001, cap=0.002)) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        with_retries(lambda: (_ for _ in ()).throw(ValueError("bug")), backoff=Backoff(base=0.001, cap=0.002))
    with pytest.raises(httpx.ConnectError):
        with_retries(lambda: (_ for _ in ()).throw(httpx.ConnectError("x")), attempts=2,
                     backoff=Backoff(base=0.001, cap=0.002))
    request = httpx.Request("GET", "http://x/")
    with pytest.raises(RetryableStatus):
        check(httpx.Response(503, request=request))
    with pytest.raises(httpx.HTTPStatusError):
        check(httpx.Response(404, request=request))


def test_metrics_render_prometheus_text_and_ops_routes() -> None:
    app = FastAPI()
    metrics = Metrics("feddale_test")
    metrics.inc("things_total", 2, kind="a")
    metrics.observe("took_seconds", 0.02)
    add_ops_routes(app, metrics, lambda: {"redis": False})

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"n": len(await read_body(request, 10))}

    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.post("/echo", content=b"12345").json() == {"n": 5}
        assert client.post("/echo", content=b"x" * 11).status_code == 413
        assert client.post("/echo", content=b"").status_code == 400
        text = client.get("/metrics").text
    assert 'feddale_test_things_total{kind="a"} 2' in text
    assert 'feddale_test_took_seconds_bucket{le="0.025"} 1' in text and "feddale_test_took_seconds_count 1" in text
    assert 'feddale_test_http_requests_total{method="POST",route="/echo",status="413"} 1' in text


def test_metrics_escape_label_values_and_fit_buckets_per_histogram() -> None:
    metrics = Metrics("t")
    metrics.inc("odd_total", route='a"b\\c\nd')
    metrics.describe("batch", "sessions per batch", buckets=(1, 2, 4))
    metrics.observe("batch", 2)
    metrics.observe("latency_seconds", 0.2)
    text = metrics.render()
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the exposition parses back
    (odd,) = families["t_odd"].samples
    assert odd.labels == {"route": 'a"b\\c\nd'} and odd.value == 1
    batch = {s.labels.get("le"): s.value for s in families["t_batch"].samples if s.name == "t_batch_bucket"}
    assert batch == {"1.0": 0, "2.0": 1, "4.0": 1, "+Inf": 1}
    latency = {s.labels.get("le") for s in families["t_latency_seconds"].samples if s.name.endswith("_bucket")}
    assert "0.25" in latency and "4.0" not in latency


def test_coordinator_session_registers_and_reregisters_after_401() -> None:
    issued: list[str] = []

    def coordinator(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/clients/register":
            if request.headers["authorization"] != "Bearer boot":
                return httpx.Response(401)  # its own token is unknown: a wiped registry
            issued.append(f"c-1.secret{len(issued)}")
            return httpx.Response(201, json={"client_id": "c-1", "token": issued[-1]})
        if request.headers["authorization"] != f"Bearer {issued[-1]}" or len(issued) < 2:
            return httpx.Response(401)  # the first token died with the registry
        return httpx.Response(200, json={"task": None})

    session = CoordinatorSession("http://coordinator", "boot", "node", "client",
                                 transport=httpx.MockTransport(coordinator))
    assert session.request("GET", "/v1/tasks").json() == {"task": None}
    assert issued == ["c-1.secret0", "c-1.secret1"]


def test_detect_schema_swap_and_version_per_response(students: tuple[bytes, bytes]) -> None:
    slot = ModelSlot()
    metrics = Metrics("feddale_test")
    batcher = MicroBatcher(slot, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(lifespan=lifespan)
    add_detect_routes(app, slot, batcher, metrics)
    body = {"sessions": [{"id": "a", "messages": ["Receiving block blk_123 src: /10.0.0.1:50010 dest: /10.0.0.2"]}]}
    with TestClient(app) as client:
        assert client.post("/v1/detect", json=body).status_code == 503
        assert client.get("/v1/model").status_code == 503
        for bad in ({"sessions": []}, {"sessions": [{"id": "a", "messages": [3]}]}, {"sessions": [{"id": "a"}]}):
            assert client.post("/v1/detect", json=bad).status_code == 422
        first, second = (load_student(b) for b in students)
        slot.swap(first)
        answer = client.post("/v1/detect", json=body).json()
        assert answer["model_version"] == first.version and 0 <= answer["results"][0]["score"] <= 1
        info = client.get("/v1/model").json()
        assert info["version"] == first.version and info["threshold"] == first.detector.threshold

        def call(_: int) -> str:
            response = client.post("/v1/detect", json=body)
            assert response.status_code == 200
            return response.json()["model_version"]

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call, i) for i in range(24)]
            slot.swap(second)  # mid-load: nothing fails, every answer names a real version
            versions = {f.result() for f in futures}
        assert versions <= {first.version, second.version}
        assert client.post("/v1/detect", json=body).json()["model_version"] == second.version


def test_micro_batcher_scores_concurrent_requests_in_one_pass(students: tuple[bytes, bytes]) -> None:
    slot = ModelSlot()
    slot.swap(load_student(students[0]))
    metrics = Metrics("feddale_test")

    async def scenario() -> list:
        batcher = MicroBatcher(slot, max_batch=5, max_wait_s=5.0, metrics=metrics)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.detect([[t]]) for t in TEXTS + TEXTS[:1]))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [len(probs) for _, probs in results] == [1] * 5
    assert "feddale_test_batch_sessions_count 1" in metrics.render()  # five requests, one forward pass
    assert "feddale_test_batch_sessions_sum 5" in metrics.render()


def test_student_follower_swaps_only_on_a_new_version(students: tuple[bytes, bytes], tmp_path) -> None:
    slot, published = ModelSlot(), {"info": None}
    downloads: list[str] = []
    versions = {load_student(b).version: b for b in students}

    def download(version: str) -> bytes:
        downloads.append(version)
        return versions[version]

    follower = StudentFollower(slot, lambda: published["info"], download, cache_dir=tmp_path)
    assert follower.poll_once() is False and slot.current is None
    v1, v2 = list(versions)
    published["info"] = {"version": v1, "published_at": 1.0}
    assert follower.poll_once() is True and slot.current.version == v1
    assert follower.poll_once() is False
    published["info"] = {"version": v2, "published_at": 2.0}
    (tmp_path / f"student-{v2}.bin").write_bytes(b"corrupt cache")
    with pytest.raises(ValueError):
        follower.poll_once()
    assert slot.current.version == v1  # the old student keeps serving
    assert follower.poll_once() is True and slot.current.version == v2 and downloads == [v1, v2]
    stop = threading.Event()
    stop.set()
    follower.run(stop, 0.01)  # returns at once when stopped


def test_a_request_that_outlives_its_deadline_is_answered_504() -> None:
    import asyncio

    from feddale.service.limits import RequestDeadline

    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(5)
        return {"done": "late"}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {"done": "now"}

    with TestClient(RequestDeadline(app, 0.2)) as client:
        late = client.get("/slow")
        assert late.status_code == 504 and "0.2 s" in late.json()["detail"]
        assert client.get("/fast").json() == {"done": "now"}


def test_serve_applies_the_deadline_and_the_connection_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from feddale.service.limits import RequestDeadline
    from feddale.service.server import serve

    from feddale_coordinator.settings import Settings

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    settings = Settings(admin_token="a" * 32, bootstrap_secret="b" * 32, request_timeout_s=12, max_connections=7)
    app = FastAPI()
    serve(app, settings)
    assert isinstance(seen["app"], RequestDeadline) and seen["app"].app is app and seen["app"].seconds == 12
    assert seen["limit_concurrency"] == 7 and seen["port"] == 8000


# --------------------------------------------------------------------------- detector availability


def test_a_detector_restarted_during_a_coordinator_outage_serves_its_cached_student(tmp_path: Path) -> None:
    """Ready means a student is loaded: from the state dir at start-up, while the coordinator is down."""
    from service_helpers import BOOTSTRAP

    from feddale_detector.app import create_app
    from feddale_detector.settings import Settings

    cfg = StudentConfig(base="tiny:bert", steps=1, batch_size=4, micro_batch=4, max_len=32, onnx=False)
    artifact = train_student(["a b c", "d e f", "g h i", "j k l"], [0, 0, 1, 1], cfg, progress=False)

    def coordinator_down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("coordinator down", request=request)

    settings = Settings(coordinator_url="http://coordinator", bootstrap_secret=BOOTSTRAP, node_name="det",
                        state_dir=tmp_path, student_poll_s=0.05)
    with TestClient(create_app(settings, transport=httpx.MockTransport(coordinator_down))) as empty:
        assert empty.get("/readyz").json() == {"ready": False, "checks": {"student": False}}
        assert empty.post("/v1/detect", json={"sessions": [{"id": "s", "messages": ["a b c"]}]}).status_code == 503

    (tmp_path / f"student-{artifact.version}.bin").write_bytes(artifact.to_bytes())  # served before the outage
    with TestClient(create_app(settings, transport=httpx.MockTransport(coordinator_down))) as restarted:
        assert poll_until(lambda: restarted.get("/readyz").status_code == 200, 30)
        answer = restarted.post("/v1/detect", json={"sessions": [{"id": "s", "messages": ["a b c"]}]})
        assert answer.status_code == 200 and answer.json()["model_version"] == artifact.version


def test_a_full_queue_sheds_load_with_429(students: tuple[bytes, bytes]) -> None:
    """Requests beyond the queue bound are refused at once with Retry-After, never queued without end."""
    from feddale.service.serving import Overloaded

    slot = ModelSlot()
    slot.swap(load_student(students[0]))

    async def scenario() -> None:
        batcher = MicroBatcher(slot, max_queue=2)
        batcher.start()
        assert batcher._task is not None
        batcher._task.cancel()  # nothing drains the queue: it fills
        waiting = [asyncio.create_task(batcher.detect([["a"]])) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.detect([["a"]])
        for task in waiting:
            task.cancel()

    asyncio.run(scenario())

    app = FastAPI()
    metrics = Metrics("t")
    batcher = MicroBatcher(slot, metrics=metrics)

    async def overloaded(sessions: list[list[str]]):
        raise Overloaded()

    batcher.detect = overloaded  # type: ignore[method-assign]
    add_detect_routes(app, slot, batcher, metrics)
    with TestClient(app) as client:
        shed = client.post("/v1/detect", json={"sessions": [{"id": "s", "messages": ["x"]}]})
    assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
    assert metrics.value("requests_shed_total") == 1
