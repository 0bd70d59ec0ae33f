"""End to end: real processes on loopback (Redis, coordinator, student-trainer, detector and three
client nodes, tiny models), driven only through the REST APIs, as a user would."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from service_helpers import fast_config, run_to_end

from feddale.service.http import poll_until
from feddale.ops.launcher import LocalFederation

pytestmark = pytest.mark.e2e

SESSIONS = [
    {"id": "normal-looking", "messages": [
        "081109 203615 148 INFO dfs.DataNode$PacketResponder: Received block blk_38865049064139660 of size "
        "67108864 from /10.251.42.84",
    ]},
    {"id": "already-masked", "messages": ["Receiving block blk_<*> src: /<*> dest: /<*>"]},
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    work = tmp_path_factory.mktemp("federation")
    with LocalFederation(
        3, config=str(fast_config(work)), log_dir=work,
        # margin 1.0: every new student is promoted, whatever its agreement (the rule: test_lifecycle.py)
        extra_env={"FEDDALE_STUDENT_POLL_S": "1", "FEDDALE_TICK_S": "0.2", "FEDDALE_LOG_LEVEL": "INFO",
                   "FEDDALE_PROMOTION_MARGIN": "1.0"},
    ) as fed:
        yield fed


def serving_version(url: str, version: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/model", timeout=5).json().get("version") == version
    except (httpx.HTTPError, ValueError):
        return False


def test_one_shot_and_few_shot_runs_publish_and_detectors_swap(federation: LocalFederation) -> None:
    assert httpx.get(f"{federation.detector_url}/v1/model").status_code == 503  # nothing published yet

    first = run_to_end(federation, {"mode": "one_shot", "min_clients": 3})
    assert first["status"] == "published", first["reason"]
    assert len(first["clients"]) == 3 and all(c["bytes_up"] > 0 for c in first["clients"].values())
    v1 = first["student_version"]
    assert poll_until(lambda: serving_version(federation.detector_url, v1), 60)
    answer = httpx.post(f"{federation.detector_url}/v1/detect", json={"sessions": SESSIONS}, timeout=30).json()
    assert answer["model_version"] == v1
    assert [r["id"] for r in answer["results"]] == ["normal-looking", "already-masked"]
    assert all(0.0 <= r["score"] <= 1.0 and isinstance(r["anomaly"], bool) for r in answer["results"])
    node = federation.client_urls()[0]
    assert poll_until(lambda: serving_version(node, v1), 60)  # client nodes pull the student too
    assert httpx.post(f"{node}/v1/detect", json={"sessions": SESSIONS}, timeout=30).json()["model_version"] == v1

    # same seed and pseudo-labels would give the same student (versions are content digests):
    # a different student budget makes the second student observably new
    second = run_to_end(federation, {"mode": "few_shot", "fedavg_rounds": 1, "min_clients": 3,
                                     "student": {"steps": 4}})
    assert second["status"] == "published", second["reason"]
    assert [h["kind"] for h in second["history"]] == ["fedavg", "distill"]
    v2 = second["student_version"]
    assert v2 != v1
    assert poll_until(lambda: serving_version(federation.detector_url, v2), 60)
    answer = httpx.post(f"{federation.detector_url}/v1/detect", json={"sessions": SESSIONS}, timeout=30).json()
    assert answer["model_version"] == v2
    metrics = httpx.get(f"{federation.detector_url}/metrics").text
    assert "feddale_detector_sessions_scored_total" in metrics


@pytest.mark.parametrize(
    "body",
    [
        {"sessions": []},
        {"sessions": [{"id": f"s{i}", "messages": ["x"]} for i in range(257)]},
        {"sessions": [{"id": "s1", "messages": [1, 2]}]},
        {"sessions": [{"id": "s1", "messages": []}]},
        {"sessions": [{"id": "s1"}]},
        {"nothing": True},
        "not an object",
    ],
)
def test_detect_refuses_bad_input_with_4xx(federation: LocalFederation, body: object) -> None:
    response = httpx.post(f"{federation.detector_url}/v1/detect", json=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text


def test_oversized_detect_body_and_unauthenticated_admin_calls_are_refused(federation: LocalFederation) -> None:
    huge = httpx.post(f"{federation.detector_url}/v1/detect", content=b"{" + b" " * (17 * 1024 * 1024) + b"}",
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert huge.status_code == 413
    assert httpx.post(f"{federation.coordinator_url}/v1/runs", json={"mode": "one_shot"}).status_code == 401
    wrong = httpx.post(f"{federation.coordinator_url}/v1/runs", json={"mode": "one_shot"},
                       headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    with federation.admin() as admin:
        bad = admin.post("/v1/runs", json={"mode": "one_shot", "student": {"steps": -1}})
    assert bad.status_code == 422 and ["body", "student", "steps"] in [e["loc"] for e in bad.json()["detail"]]
    for url in [federation.coordinator_url, federation.detector_url, *federation.client_urls()]:
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.get(f"{url}/docs").status_code == 200
