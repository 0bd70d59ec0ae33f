"""A client node with FEDDALE_SOURCES: its private sessions come from the raw files it follows,
each run takes what the node holds at that moment, and no raw line goes to the coordinator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from feddale.method.config import load_config
from feddale.protocol.messages import Task
from feddale.protocol.rounds import ClientUpload
from feddale.service.http import CoordinatorSession
from feddale.service.settings import load_settings

import feddale_client_node.agent as agent_module
from feddale_client_node.agent import ClientAgent
from feddale_client_node.settings import Settings

LINE = "081109 2035{s:02d} 143 INFO dfs.DataNode$DataXceiver: Receiving block {b} src: /10.9.8.7:5 dest: /10.9.8.6:50010"


def coordinator(sent: list[httpx.Request]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path == "/v1/clients/register":
            return httpx.Response(201, json={"client_id": "c1", "name": "node", "token": "t", "role": "client", "shard": 0,
                                             "num_shards": 2, "data": {}, "seed": 0})
        return httpx.Response(200, json={})

    return httpx.MockTransport(answer)


def test_the_settings_read_and_check_the_sources_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sources.yaml").write_text("- preset: hdfs\n  paths: [logs/*.log]\n")
    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", "b" * 32)
    monkeypatch.setenv("FEDDALE_SOURCES", str(tmp_path / "sources.yaml"))
    monkeypatch.setenv("FEDDALE_SOURCES_POLL_S", "2.5")
    settings = load_settings(Settings)
    assert settings.sources == str(tmp_path / "sources.yaml") and settings.sources_poll_s == 2.5
    for broken in ("- preset: nosuch\n", "- [unclosed\n"):
        (tmp_path / "sources.yaml").write_text(broken)
        with pytest.raises(SystemExit) as stopped:
            load_settings(Settings)
        assert str(stopped.value).startswith("bad environment: FEDDALE_SOURCES: ") and "\n" not in str(stopped.value)
    monkeypatch.setenv("FEDDALE_SOURCES", str(tmp_path / "missing.yaml"))
    with pytest.raises(SystemExit, match="FEDDALE_SOURCES: sources file not found"):
        load_settings(Settings)


def test_each_run_trains_on_the_sessions_the_followed_files_hold(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "hdfs.log").write_text(LINE.format(s=1, b="blk_1") + "\n" + LINE.format(s=2, b="blk_2") + "\n")
    (tmp_path / "sources.yaml").write_text("- preset: hdfs\n  paths: [logs/*.log]\n")
    sent: list[httpx.Request] = []
    session = CoordinatorSession("http://coordinator", "secret", "node", "client", transport=coordinator(sent))
    agent = ClientAgent(session, sources=str(tmp_path / "sources.yaml"), state_dir=tmp_path / "state")
    agent.start()
    assert [s.id for s in agent.sessions] == ["blk_1", "blk_2"]  # the shard (0) is not used

    trained_on: list[tuple[str, ...]] = []

    def fake_round(task: Task, model: Any, sessions: Any, **_: Any) -> ClientUpload:
        trained_on.append(tuple(s.id for s in sessions))
        return ClientUpload(task.round, len(sessions), b"adapter", {}, {})

    monkeypatch.setattr(agent_module, "client_round", fake_round)
    monkeypatch.setattr(agent_module, "load_teacher", lambda cfg: object())
    config = load_config("tiny").model_dump(mode="json")

    def task(run: str, round_: int) -> Task:
        return Task(run_id=run, round=round_, kind="fedavg", config=config, global_adapter=None, public=None,
                    deadline_at=0.0)

    with (logs / "hdfs.log").open("a") as handle:
        handle.write(LINE.format(s=3, b="blk_3") + "\n")
    agent.raw.poll()  # what the node's poller thread does every FEDDALE_SOURCES_POLL_S
    agent.do_task(task("run-1", 1))
    with (logs / "hdfs.log").open("a") as handle:
        handle.write(LINE.format(s=4, b="blk_4") + "\n")
    agent.raw.poll()
    agent.do_task(task("run-1", 2))  # the same run keeps its sessions
    agent.do_task(task("run-2", 1))  # a new run takes what the node holds now
    assert trained_on == [("blk_1", "blk_2", "blk_3")] * 2 + [("blk_1", "blk_2", "blk_3", "blk_4")]
    assert agent.status["raw_logs"]["hdfs"]["sessions"] == 4

    uploads = b"".join(request.content for request in sent)
    assert b"10.9.8.7" not in uploads and b"blk_1" not in uploads  # nothing raw (not even masked) went up
    assert json.loads((tmp_path / "state" / "raw-logs" / "hdfs.json").read_text())["store"]["sessions"]


def test_a_bad_sources_file_stops_the_node_before_it_registers(tmp_path: Path) -> None:
    (tmp_path / "sources.yaml").write_text("- preset: hdfs\n  paths: [x]\n  key: '('\n")
    session = CoordinatorSession("http://coordinator", "secret", "node", "client", transport=coordinator([]))
    with pytest.raises(ValueError, match="key regex"):
        ClientAgent(session, sources=str(tmp_path / "sources.yaml"))
