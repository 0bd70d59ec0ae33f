"""The detector's raw-line intake on an app built here: /v1/detect/lines, the OTLP logs receiver
(JSON and protobuf, gzip), open sessions closing by idleness, length and eviction, anomalies,
the per-source counter, the alert webhook, and bad input answered with a 4xx."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from feddale.ingest.sources import build_source
from feddale.service.intake import IntakeOptions, Intake, add_intake_routes, known_sources
from feddale.service.observability import Metrics, add_ops_routes
from feddale.service.serving import LoadedModel, MicroBatcher, ModelInfo, ModelSlot, add_detect_routes

RECEIVE = "081109 2035{s:02d} 143 INFO dfs.DataNode$DataXceiver: Receiving block {b} src: /10.0.0.1:5 dest: /10.0.0.2:50010"
FAILED = "081109 2035{s:02d} 143 WARN dfs.DataNode$DataXceiver: writeBlock {b} received exception java.io.IOException"


class FakeDetector:
    """Anomalous when any message mentions an exception; records what it was asked."""

    threshold = 0.5

    def __init__(self) -> None:
        self.calls: list[list[list[str]]] = []

    def predict_proba(self, sessions: list[list[str]]) -> list[float]:
        self.calls.append([list(s) for s in sessions])
        return [0.9 if any("exception" in m for m in s) else 0.1 for s in sessions]


def loaded(detector: Any, version: str = "v1") -> LoadedModel:
    info = ModelInfo(version=version, base_model="fake", runtime="fake", threshold=detector.threshold,
                     threshold_rule=None, published_at=None, loaded_at=time.time())
    return LoadedModel(version, detector, info)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self, options: IntakeOptions, webhook: httpx.BaseTransport | None = None) -> None:
        self.app = FastAPI()
        self.metrics = Metrics("t")
        self.slot = ModelSlot()
        self.detector = FakeDetector()
        add_ops_routes(self.app, self.metrics, lambda: {})
        add_detect_routes(self.app, self.slot, MicroBatcher(self.slot), self.metrics)  # as the detector does
        custom = build_source({"name": "shop", "format": "<Level> <Content>", "key": r"order=(\d+)"})
        self.intake: Intake = add_intake_routes(self.app, self.slot, self.metrics, {**known_sources(), "shop": custom},
                                                options)
        self.clock = Clock()
        self.intake.open.clock = self.clock
        if webhook is not None:
            self.intake._http = httpx.Client(transport=webhook)


@pytest.fixture
def setup() -> Iterator[Setup]:
    yield Setup(IntakeOptions(idle_s=30, max_session_lines=5, max_open_sessions=3))


@pytest.fixture
def client(setup: Setup) -> Iterator[TestClient]:
    with TestClient(setup.app) as client:
        yield client


def otlp_json(lines: list[str], source: str | None = "hdfs", on_resource: bool = False) -> dict:
    attrs = [{"key": "feddale.source", "value": {"stringValue": source}}] if source else []
    records = [{"timeUnixNano": "1", "body": {"stringValue": line}, "attributes": [] if on_resource else attrs,
                "unknownField": 7} for line in lines]
    resource = {"attributes": attrs if on_resource else []}
    return {"resourceLogs": [{"resource": resource, "scopeLogs": [{"scope": {"name": "t"}, "logRecords": records}]}]}


def otlp_protobuf(lines: list[str], source: str = "hdfs") -> bytes:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    request = ExportLogsServiceRequest()
    scope = request.resource_logs.add().scope_logs.add()
    for line in lines:
        record = scope.log_records.add()
        record.body.string_value = line
        attribute = record.attributes.add()
        attribute.key, attribute.value.string_value = "feddale.source", source
    return request.SerializeToString()


# ----------------------------------------------------------------- /v1/detect/lines


def test_detect_lines_groups_by_the_source_and_answers_per_session(setup: Setup, client: TestClient) -> None:
    setup.slot.swap(loaded(setup.detector))
    lines = [RECEIVE.format(s=1, b="blk_1"), RECEIVE.format(s=2, b="blk_2"), "garbage",
             FAILED.format(s=3, b="blk_2"), RECEIVE.format(s=4, b="no block")]
    answer = client.post("/v1/detect/lines", json={"source": "HDFS", "lines": lines})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == "v1" and body["unparsed"] == 2
    assert [(r["id"], r["anomaly"], r["lines"]) for r in body["results"]] == [("blk_1", False, 1), ("blk_2", True, 2)]
    assert setup.detector.calls[-1][1] == ["Receiving block blk_<*> src: /<*> dest: /<*>",
                                           "writeBlock blk_<*> received exception java.io.IOException"]
    shop = client.post("/v1/detect/lines", json={"source": "shop", "lines": ["INFO paid order=7", "ERR exception order=7"]})
    assert [(r["id"], r["anomaly"]) for r in shop.json()["results"]] == [("7", True)]


@pytest.mark.parametrize(("body", "status"), [
    ({"source": "nosuch", "lines": ["x"]}, 422),
    ({"source": "hdfs", "lines": []}, 422),
    ({"source": "hdfs", "lines": [1]}, 422),
    ({"source": "hdfs", "lines": ["x" * (10 * 1024 * 1024)]}, 422),
    ({"source": "hdfs", "lines": ["x"], "extra": 1}, 422),
    ({"lines": ["x"]}, 422),
])
def test_detect_lines_refuses_bad_bodies_with_4xx(setup: Setup, client: TestClient, body: dict, status: int) -> None:
    setup.slot.swap(loaded(setup.detector))
    answer = client.post("/v1/detect/lines", json=body)
    assert answer.status_code == status, answer.text
    if body.get("source") == "nosuch":
        assert "unknown source 'nosuch'" in answer.text and "hdfs" in answer.text


def test_binary_garbage_and_no_student_are_4xx_and_503(setup: Setup, client: TestClient) -> None:
    garbage = client.post("/v1/detect/lines", content=os.urandom(4096), headers={"Content-Type": "application/json"})
    assert 400 <= garbage.status_code < 500
    waiting = client.post("/v1/detect/lines", json={"source": "hdfs", "lines": [RECEIVE.format(s=1, b="blk_1")]})
    assert waiting.status_code == 503 and waiting.headers["Retry-After"] == "5"
    setup.slot.swap(loaded(setup.detector))
    lines = ["\x00\x01\x02" * 50, RECEIVE.format(s=1, b="blk_1")]
    assert client.post("/v1/detect/lines", json={"source": "hdfs", "lines": lines}).json()["unparsed"] == 1


# ----------------------------------------------------------------- the OTLP receiver


def test_streamed_json_lines_close_by_idleness_and_report_anomalies(setup: Setup, client: TestClient) -> None:
    setup.slot.swap(loaded(setup.detector))
    lines = [RECEIVE.format(s=1, b="blk_1"), RECEIVE.format(s=1, b="blk_2"), FAILED.format(s=2, b="blk_2")]
    answer = client.post("/v1/logs", json=otlp_json(lines))
    assert answer.status_code == 200 and answer.json() == {}
    assert setup.intake.tick() == 0  # still open
    setup.clock.now += 31
    started = time.time()
    assert setup.intake.tick() == 2
    found = client.get("/v1/anomalies").json()["anomalies"]
    assert [(a["source"], a["id"], a["lines"], a["reason"], a["model_version"]) for a in found] == [
        ("hdfs", "blk_2", 2, "idle", "v1")]
    assert client.get("/v1/anomalies", params={"since": started + 3600}).json()["anomalies"] == []
    assert setup.metrics.value("intake_sessions_total", source="hdfs", verdict="anomaly") == 1
    assert setup.metrics.value("intake_sessions_total", source="hdfs", verdict="normal") == 1
    assert 't_intake_sessions_total{source="hdfs",verdict="anomaly"} 1.0' in client.get("/metrics").text


def test_protobuf_with_gzip_is_read_and_answered_in_protobuf(setup: Setup, client: TestClient) -> None:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

    setup.slot.swap(loaded(setup.detector))
    body = gzip.compress(otlp_protobuf([RECEIVE.format(s=1, b="blk_9"), "not hdfs at all"]))
    answer = client.post("/v1/logs", content=body, headers={"Content-Type": "application/x-protobuf",
                                                            "Content-Encoding": "gzip"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-protobuf"
    response = ExportLogsServiceResponse.FromString(answer.content)
    assert response.partial_success.rejected_log_records == 1
    assert "not in their source's format" in response.partial_success.error_message
    assert setup.intake.flush() == 1 and setup.detector.calls[-1] == [["Receiving block blk_<*> src: /<*> dest: /<*>"]]


def test_the_source_may_come_from_the_resource_or_the_query(setup: Setup, client: TestClient) -> None:
    setup.slot.swap(loaded(setup.detector))
    assert client.post("/v1/logs", json=otlp_json([RECEIVE.format(s=1, b="blk_1")], on_resource=True)).json() == {}
    assert client.post("/v1/logs?source=hdfs", json=otlp_json([RECEIVE.format(s=1, b="blk_2")], source=None)).json() == {}
    assert setup.intake.flush() == 2


def test_sessions_close_at_the_line_limit_and_evictions_keep_memory_bounded(setup: Setup, client: TestClient) -> None:
    setup.slot.swap(loaded(setup.detector))
    long_one = [RECEIVE.format(s=i, b="blk_7") for i in range(6)]  # limit 5: closes, the 6th opens a new one
    client.post("/v1/logs", json=otlp_json(long_one))
    assert setup.intake.tick() == 1 and len(setup.intake.open) == 1
    client.post("/v1/logs", json=otlp_json([FAILED.format(s=1, b=f"blk_{i}") for i in range(10, 14)]))
    assert len(setup.intake.open) == 3  # at most 3 open: the two oldest were closed early
    assert setup.metrics.value("intake_evicted_total", source="hdfs") == 2
    assert setup.intake.tick() == 2
    assert {a.id for a in setup.intake.anomalies} == {"blk_10"} and len(setup.intake.open) == 3


def test_window_sources_stream_per_process_and_minute(setup: Setup, client: TestClient) -> None:
    setup.slot.swap(loaded(setup.detector))
    lines = ["Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186",
             "Dec 10 06:55:48 LabSZ sshd[24200]: Failed password: exception in auth",
             "Dec 10 06:55:48 LabSZ sshd[24201]: Connection closed by 173.234.31.186 [preauth]",
             "Dec 10 06:56:01 LabSZ sshd[24200]: Received disconnect from 173.234.31.186: 11: Bye Bye [preauth]"]
    assert client.post("/v1/logs?source=openssh", json=otlp_json(lines, source=None)).json() == {}
    assert setup.intake.flush() == 3
    assert [(a.id, a.lines) for a in setup.intake.anomalies] == [("24200@2000-12-10T06:55:00Z", 2)]


def test_sessions_closed_before_any_student_are_counted_as_unscored(setup: Setup, client: TestClient) -> None:
    client.post("/v1/logs", json=otlp_json([RECEIVE.format(s=1, b="blk_1")]))
    assert setup.intake.flush() == 0
    assert setup.metrics.value("intake_sessions_total", source="hdfs", verdict="unscored") == 1


@pytest.mark.parametrize(("content", "headers", "status"), [
    (b"\xff\xfe garbage \x00\x01", {"Content-Type": "application/x-protobuf"}, 400),
    (b"{not json", {"Content-Type": "application/json"}, 400),
    (json.dumps({"resourceLogs": "nope"}).encode(), {"Content-Type": "application/json"}, 400),
    (b"{}", {"Content-Type": "application/json"}, 400),
    (b"line", {"Content-Type": "text/plain"}, 415),
    (b"not gzip", {"Content-Type": "application/json", "Content-Encoding": "gzip"}, 400),
    (gzip.compress(b" " * (17 * 1024 * 1024)), {"Content-Type": "application/json", "Content-Encoding": "gzip"}, 413),
    (json.dumps(otlp_json(["x"], source="nosuch")).encode(), {"Content-Type": "application/json"}, 400),
    (json.dumps(otlp_json(["x"], source=None)).encode(), {"Content-Type": "application/json"}, 400),
    (json.dumps(otlp_json(["x" * (10 * 1024 * 1024)])).encode(), {"Content-Type": "application/json"}, 400),
])
def test_the_receiver_answers_bad_input_with_4xx(setup: Setup, client: TestClient, content: bytes,
                                                 headers: dict, status: int) -> None:
    setup.slot.swap(loaded(setup.detector))
    answer = client.post("/v1/logs", content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert client.get("/healthz").status_code == 200


def test_a_body_over_the_limit_is_413_and_a_large_one_under_it_passes(setup: Setup, client: TestClient) -> None:
    setup.slot.swap(loaded(setup.detector))
    big = otlp_json([RECEIVE.format(s=1, b=f"blk_{i}") for i in range(5000)])  # ~0.8 MB: over the 64 KiB default
    assert client.post("/v1/logs", json=big).status_code == 200
    huge = b"{" + b" " * (17 * 1024 * 1024) + b"}"
    assert client.post("/v1/logs", content=huge, headers={"Content-Type": "application/json"}).status_code == 413


# ----------------------------------------------------------------- alerts


def test_anomalies_go_to_the_webhook_as_alertmanager_alerts_and_failures_are_counted() -> None:
    posted: list[Any] = []
    failing = {"on": False}

    def receiver(request: httpx.Request) -> httpx.Response:
        if failing["on"]:
            raise httpx.ConnectError("refused")
        posted.append(json.loads(request.content))
        return httpx.Response(200)

    setup = Setup(IntakeOptions(idle_s=30, alert_webhook="http://alertmanager:9093/api/v2/alerts"),
                  httpx.MockTransport(receiver))
    setup.slot.swap(loaded(setup.detector))
    with TestClient(setup.app) as client:
        client.post("/v1/logs", json=otlp_json([FAILED.format(s=1, b="blk_5"), RECEIVE.format(s=1, b="blk_6")]))
        assert setup.intake.flush() == 2
        (alert,) = posted[0]
        assert alert["labels"] == {"alertname": "FeddaleAnomalousSession", "source": "hdfs", "session": "blk_5",
                                   "severity": "warning"}
        assert alert["startsAt"].endswith("Z") and float(alert["annotations"]["score"]) == pytest.approx(0.9)
        failing["on"] = True
        client.post("/v1/logs", json=otlp_json([FAILED.format(s=2, b="blk_8")]))
        assert setup.intake.flush() == 1  # scored and kept although the webhook is down
        assert setup.metrics.value("alert_webhook_failures_total") == 1
        assert [a["id"] for a in client.get("/v1/anomalies").json()["anomalies"]] == ["blk_5", "blk_8"]


def test_the_background_thread_closes_idle_sessions() -> None:
    import threading

    app, slot, metrics, stop = FastAPI(), ModelSlot(), Metrics("t"), threading.Event()
    detector = FakeDetector()
    slot.swap(loaded(detector))
    intake = add_intake_routes(app, slot, metrics, known_sources(), IntakeOptions(idle_s=0.05, tick_s=0.02), stop=stop)
    try:
        with TestClient(app) as client:
            client.post("/v1/logs", json=otlp_json([FAILED.format(s=1, b="blk_1")]))
            deadline = time.monotonic() + 30
            while not intake.anomalies and time.monotonic() < deadline:
                time.sleep(0.02)
        assert [a.id for a in intake.anomalies] == ["blk_1"]
    finally:
        stop.set()


# ----------------------------------------------------------------- sources and imports


def test_the_detectors_sources_file_adds_to_the_presets(tmp_path) -> None:
    (tmp_path / "sources.yaml").write_text("- name: shop\n  format: '<Level> <Content>'\n  key: 'order=(\\d+)'\n")
    known = known_sources(tmp_path / "sources.yaml")
    assert {"hdfs", "openssh", "bgl", "shop"} <= set(known) and len(known) == 17


def test_the_detector_settings_give_the_intake_its_bounds(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from feddale.service.settings import load_settings

    from feddale_detector.settings import Settings

    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", "b" * 32)
    monkeypatch.setenv("FEDDALE_SESSION_IDLE_S", "5")
    monkeypatch.setenv("FEDDALE_SESSION_MAX_LINES", "64")
    monkeypatch.setenv("FEDDALE_MAX_OPEN_SESSIONS", "100")
    monkeypatch.setenv("FEDDALE_ALERT_WEBHOOK", "http://am:9093/api/v2/alerts")
    options = load_settings(Settings).intake()
    assert (options.idle_s, options.max_session_lines, options.max_open_sessions, options.alert_webhook) == (
        5.0, 64, 100, "http://am:9093/api/v2/alerts")
    monkeypatch.setenv("FEDDALE_MAX_OPEN_SESSIONS", "0")
    with pytest.raises(SystemExit, match="FEDDALE_MAX_OPEN_SESSIONS"):
        load_settings(Settings)
    monkeypatch.setenv("FEDDALE_MAX_OPEN_SESSIONS", "100")
    monkeypatch.setenv("FEDDALE_SOURCES", str(tmp_path / "nope.yaml"))
    with pytest.raises(SystemExit, match="FEDDALE_SOURCES: sources file not found"):
        load_settings(Settings)


def test_the_intake_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'peft'):\n"
        "    sys.modules[name] = None\n"
        "import feddale.service.intake, feddale.ingest.otlp, feddale.ingest.stream, feddale.ingest.node\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
