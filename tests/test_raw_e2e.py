"""End to end from raw log files: client nodes follow rendered HDFS logs (a rotated .gz archive and
the live file), the federation publishes a student, and the detector process is fed raw lines
over OTLP/JSON and answers with sessions and verdicts. Tiny models, real processes on loopback.

The two raw client nodes run in this process (``ClientAgent`` with ``sources=``), talking HTTP to
the launched coordinator, because the client-node process does not yet hand FEDDALE_SOURCES to
its agent (``feddale_client_node/app.py``); the launcher's own client node is stopped before the
run, so every node of the run reads raw files.
"""

from __future__ import annotations

import csv
import gzip
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import RecordingTransport, fast_config

from feddale.data.synthetic import EVENT_TEMPLATES, generate_events
from feddale.ingest.render_hdfs import render_hdfs
from feddale.ops.launcher import LocalFederation
from feddale.service.http import CoordinatorSession, poll_until

from feddale_client_node.agent import ClientAgent

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 300.0


def rendered_log(folder: Path, normal: int, anomalous: int, seed: int) -> list[str]:
    """Synthetic HDFS sessions rendered as a raw HDFS.log (what `feddale logs render-hdfs` writes)."""
    events = folder / "events"
    events.mkdir(parents=True)
    with (events / "templates.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("event_id", "template"), *EVENT_TEMPLATES.items()])
    with (events / "sessions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("session_id", "events", "label"))
        writer.writerows((f"s{i}", " ".join(ids), label)
                         for i, (ids, label) in enumerate(generate_events(normal, anomalous, seed=seed)))
    return render_hdfs(events, folder / "raw", seed=seed).log.read_text().splitlines()


def node_logs(folder: Path, seed: int) -> Path:
    """A node's log folder: the older half rotated and compressed, the newer half live; its sources file."""
    lines = rendered_log(folder, 57, 3, seed)
    logs = folder / "logs"
    logs.mkdir()
    half = len(lines) // 2
    (logs / "hdfs.log.1.gz").write_bytes(gzip.compress(("\n".join(lines[:half]) + "\n").encode()))
    (logs / "hdfs.log").write_text("\n".join(lines[half:]) + "\n")
    (folder / "sources.yaml").write_text("- preset: hdfs\n  paths: [logs/hdfs.log*]\n")
    return folder / "sources.yaml"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    work = tmp_path_factory.mktemp("raw-federation")
    with LocalFederation(
        1, config=str(fast_config(work)), log_dir=work,
        extra_env={"FEDDALE_STUDENT_POLL_S": "1", "FEDDALE_TICK_S": "0.2", "FEDDALE_CLIENT_TTL_S": "3",
                   "FEDDALE_SESSION_IDLE_S": "1"},
    ) as fed:
        yield fed


def clients(fed: LocalFederation) -> dict[str, bool]:
    with fed.admin() as admin:
        return {c["name"]: c["alive"] for c in admin.get("/v1/clients").json()}


def metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_federation_of_raw_log_nodes_publishes_and_the_detector_scores_streamed_lines(
        federation: LocalFederation, tmp_path: Path) -> None:
    federation.services["client-1"].stop()  # the launcher's node trains on a shard, not on raw files
    stop = threading.Event()
    transports: list[RecordingTransport] = []
    agents: list[ClientAgent] = []
    for number in (1, 2):
        transport = RecordingTransport(httpx.HTTPTransport())
        session = CoordinatorSession(federation.coordinator_url, federation.bootstrap_secret, f"raw-{number}",
                                     "client", transport=transport, stop=stop)
        agent = ClientAgent(session, sources=str(node_logs(tmp_path / f"node{number}", seed=number)),
                            state_dir=tmp_path / f"node{number}" / "state", sources_poll_s=0.5)
        agent.start()
        assert len(agent.sessions) == 60  # every rendered session, from the archive and the live file
        threading.Thread(target=agent.run, args=(stop,), daemon=True).start()
        transports.append(transport)
        agents.append(agent)
    try:
        expected = {"client-1": False, "raw-1": True, "raw-2": True}
        assert poll_until(lambda: expected.items() <= clients(federation).items(), 60, 0.5)
        with federation.admin() as admin:
            run_id = admin.post("/v1/runs", json={"mode": "one_shot", "min_clients": 2}).json()["run_id"]
            view: dict = {}

            def finished() -> bool:
                view.update(admin.get(f"/v1/runs/{run_id}").json())
                return view["status"] in ("published", "failed")

            assert poll_until(finished, RUN_TIMEOUT_S, 0.5), f"run stuck in {view.get('status')}"
        assert view["status"] == "published", view.get("reason")
        assert sorted(c["name"] for c in view["clients"].values() if c["bytes_up"] > 0) == ["raw-1", "raw-2"]
    finally:
        stop.set()

    # nothing of the raw logs went up: no block id, no address of the followed files
    sent = b"".join(r.body for t in transports for r in t.requests)
    raw = (tmp_path / "node1" / "logs" / "hdfs.log").read_text().split()
    assert not [word for word in raw if (word.startswith("blk_") or word.startswith("/10.")) and word.encode() in sent]

    url, version = federation.detector_url, view["student_version"]
    assert poll_until(lambda: httpx.get(f"{url}/v1/model", timeout=5).json().get("version") == version, 60)
    lines = rendered_log(tmp_path / "stream", 18, 2, seed=9)
    export = {"resourceLogs": [{
        "resource": {"attributes": [{"key": "feddale.source", "value": {"stringValue": "hdfs"}}]},
        "scopeLogs": [{"logRecords": [{"body": {"stringValue": line}} for line in lines]}],
    }]}
    accepted = httpx.post(f"{url}/v1/logs", json=export, timeout=60)
    assert accepted.status_code == 200 and accepted.json() == {}, accepted.text

    def scored() -> float:
        return metric_total(httpx.get(f"{url}/metrics", timeout=5).text, "feddale_detector_intake_sessions_total")

    assert poll_until(lambda: scored() >= 20, 120, 0.5)
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'verdict="unscored"' not in metrics and scored() == 20  # 20 sessions, each scored once
    found = httpx.get(f"{url}/v1/anomalies", timeout=5).json()
    assert all(a["source"] == "hdfs" and a["id"].startswith("blk_") and a["model_version"] == version
               for a in found["anomalies"])

    answer = httpx.post(f"{url}/v1/detect/lines", json={"source": "hdfs", "lines": lines}, timeout=60).json()
    assert answer["model_version"] == version and answer["unparsed"] == 0
    assert len(answer["results"]) == 20 and all(r["id"].startswith("blk_") and r["lines"] > 0 for r in answer["results"])
    anomalous = {a["id"] for a in found["anomalies"]}
    assert anomalous == {r["id"] for r in answer["results"] if r["anomaly"]}  # the stream and the batch agree
