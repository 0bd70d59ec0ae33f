"""Promotion and rollback reach a running detector within one poll; `feddale students`; JSON logs.

Real processes on loopback (Redis, coordinator, student-trainer, detector, two client nodes),
every service logging JSON (FEDDALE_LOG_FORMAT=json). The promotion margin is 1.0 here so both
runs' students are promoted whatever their agreement: which student wins the rule is tested
with chosen numbers in tests/test_lifecycle.py; this file tests that detectors follow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from service_helpers import fast_config

from feddale.ops.launcher import LocalFederation
from feddale.service.http import poll_until

pytestmark = pytest.mark.e2e

POLL_S = 1.0
# One poll interval, plus loading the student (from the detector's cache after a rollback) on a
# busy 2-core machine: what "within one poll" can mean for a running process.
FOLLOW_S = POLL_S + 20.0


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    work = tmp_path_factory.mktemp("lifecycle")
    env = {"FEDDALE_TICK_S": "0.2", "FEDDALE_STUDENT_POLL_S": str(POLL_S), "FEDDALE_LOG_FORMAT": "json",
           "FEDDALE_PROMOTION_MARGIN": "1.0"}
    with LocalFederation(2, config=str(fast_config(work)), log_dir=work, extra_env=env) as federation:
        yield federation


def serving(fed: LocalFederation) -> str | None:
    response = httpx.get(f"{fed.detector_url}/v1/model", timeout=10)
    return response.json()["version"] if response.status_code == 200 else None


def follows(fed: LocalFederation, version: str) -> float:
    """Seconds until the detector serves ``version`` (fails after FOLLOW_S)."""
    start = time.monotonic()
    assert poll_until(lambda: serving(fed) == version, FOLLOW_S, 0.1), f"detector still serves {serving(fed)}"
    return time.monotonic() - start


def test_promote_and_rollback_reach_the_detector_within_one_poll(cli, fed: LocalFederation) -> None:
    code, out, _ = cli("students", "list")
    assert code == 0 and out.strip() == "serving nothing yet"
    code, _, err = cli("students", "rollback")
    assert code == 2 and "no earlier promoted student" in err and err.count("\n") == 1

    versions = []
    for k in ("4", "3"):  # a different k: other pseudo-labels, another student (same ones give the same version)
        code, out, err = cli("runs", "start", "--min-clients", "2", "--set", f"k={k}", "--wait")
        assert code == 0, err
        versions.append(out.split("published student ")[1].split()[0])
    first, second = versions
    assert first != second
    follows(fed, second)

    code, out, _ = cli("students", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"serving {second}"
    assert lines[1].startswith(f"* {second}") and "promoted: agreement" in lines[1]
    assert lines[2].startswith(f"  {first}") and "promoted: first student" in lines[2]

    code, out, _ = cli("students", "rollback")
    assert code == 0 and out.strip() == f"serving {first}"
    follows(fed, first)
    code, out, _ = cli("students", "promote", second)
    assert code == 0 and out.strip() == f"serving {second}"
    follows(fed, second)

    code, out, _ = cli("students", "show", first)
    shown = json.loads(out)
    provenance = shown["info"]["provenance"]
    assert code == 0 and shown["promoted"] is False and len(provenance["payload_digests"]) == 2
    assert len(provenance["commit"]) == 40 and provenance["public_digest"] and provenance["config_digest"]
    assert 0.0 <= shown["info"]["pseudo_labels"]["agreement"] <= 1.0

    detected = httpx.post(f"{fed.detector_url}/v1/detect", json={"sessions": [{"id": "s1", "messages": [
        "Receiving block blk_1 src: /10.0.0.1:5 dest: /10.0.0.2:50010"]}]}, timeout=60)
    assert detected.status_code == 200 and detected.json()["model_version"] == second
    metrics = httpx.get(f"{fed.detector_url}/metrics", timeout=10).text
    assert f'feddale_detector_model_info{{runtime="onnx-fp32",version="{second}"}} 1.0' in metrics
    assert 'feddale_detector_verdicts_total{source="api"' in metrics

    code, out, err = cli("students", "pin", first)  # pin = promote and hold every newer student back
    assert code == 0 and out.startswith(f"serving {first} (pinned"), err
    follows(fed, first)
    code, out, err = cli("students", "unpin")
    assert code == 0 and out.strip() == f"serving {first}", err  # served as before, no longer pinned

    code, _, err = cli("students", "promote", "no-such-student")
    assert code == 2 and "404" in err and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = cli("students", "show", "no-such-student")
    assert code == 2 and "unknown student version" in err


def test_json_logs_carry_the_request_id(cli, fed: LocalFederation) -> None:
    code, out, _ = cli("schedule")
    assert code == 0 and out.startswith("no schedule (FEDDALE_SCHEDULE unset)")
    with fed.admin() as admin:
        unpinned = admin.post("/v1/students/unpin", headers={"X-Request-ID": "e2e-unpin-1"})
        assert unpinned.status_code == 200 and unpinned.headers["x-request-id"] == "e2e-unpin-1"
        made_up = admin.post("/v1/students/unpin", headers={"X-Request-ID": 'bad id {"level": "forged"}'})
        assert made_up.status_code == 200 and len(made_up.headers["x-request-id"]) == 32  # a fresh one

    def records(name: str) -> list[dict]:
        text = (fed.work_dir / "logs" / f"{name}.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object

    assert poll_until(lambda: any(r.get("request_id") == "e2e-unpin-1" for r in records("coordinator")), 10, 0.1)
    line = next(r for r in records("coordinator") if r.get("request_id") == "e2e-unpin-1")
    assert line["message"] == "student promotion unpinned"
    assert line["service"] == "coordinator" and line["level"] == "INFO" and line["time"]
    assert not any("forged" in json.dumps(r) for r in records("coordinator"))
    assert all(r["service"] == "detector" for r in records("detector"))
