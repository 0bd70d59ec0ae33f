"""The coordinator's public set given as raw logs + a source (FEDDALE_PUBLIC_LOGS, FEDDALE_PUBLIC_SOURCE):
grouped exactly as `feddale logs sessions` groups the same files, capped by a seeded sample, and
bad input stopping start-up with one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from service_helpers import coordinator_settings, register

from feddale.data.deployment import public_digest
from feddale.data.sources import load_dataset
from feddale.data.synthetic import EVENT_TEMPLATES, generate_events
from feddale.ingest.batch import sample_sessions
from feddale.ingest.render_hdfs import render_hdfs
from feddale.ops.cli import main
from feddale.service.auth import auth_headers
from feddale.service.settings import load_settings

from feddale_coordinator.app import create_app
from feddale_coordinator.settings import Settings

FAST_PUBLIC = 16  # service_helpers.FAST: data.public [8, 8]


def raw_hdfs(tmp: Path, sessions: int) -> Path:
    """A rendered raw HDFS.log of ``sessions`` synthetic blocks."""
    events = tmp / "events"
    events.mkdir()
    with (events / "templates.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("event_id", "template"), *EVENT_TEMPLATES.items()])
    with (events / "sessions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["session_id", "events"])
        for index, (ids, _) in enumerate(generate_events(sessions - sessions // 4, sessions // 4, seed=5)):
            writer.writerow([f"s{index}", " ".join(ids)])
    return render_hdfs(events, tmp / "raw").log


def cli_sessions(log: Path, tmp: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp / "cli-sessions.jsonl"
    assert main(["logs", "sessions", str(log), "--preset", "hdfs", "--out", str(out)]) == 0
    capsys.readouterr()
    return load_dataset(f"jsonl:{out}").sessions


def served_public(tmp: Path, redis_client: redis.Redis, **settings: object) -> tuple[str, list[tuple[str, str]]]:
    """Start the coordinator with ``settings``; the digest it serves and the (id, text) behind it."""
    app = create_app(coordinator_settings(tmp, "unused", **settings), redis_client=redis_client)
    with TestClient(app) as coordinator:
        digest = app.state.engine.public.digest
        node = register(coordinator, f"node-{os.urandom(4).hex()}")  # Redis outlives a restart
        answer = coordinator.get(f"/v1/public/{digest}", headers=auth_headers(node["token"]))
        assert answer.status_code == 200, answer.text
        body = answer.json()
    return body["digest"], [(s["id"], " ;-; ".join(s["messages"])) for s in body["sessions"]]


def test_raw_public_logs_serve_what_feddale_logs_sessions_writes(
    tmp_path: Path, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str],
) -> None:
    log = raw_hdfs(tmp_path, 12)
    expected = cli_sessions(log, tmp_path, capsys)
    assert len(expected) == 12 < FAST_PUBLIC
    digest, served = served_public(tmp_path, redis_client, public_logs=str(tmp_path / "raw" / "*.log"),
                                   public_source="hdfs")
    assert served == [(s.id, s.text) for s in expected]
    assert digest == public_digest(expected)


def test_more_sessions_than_the_profile_asks_for_are_a_seeded_sample_in_log_order(
    tmp_path: Path, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str],
) -> None:
    log = raw_hdfs(tmp_path, 40)
    everything = cli_sessions(log, tmp_path, capsys)
    source = tmp_path / "hdfs.yaml"
    source.write_text("preset: hdfs\nname: public-hdfs\n")  # a source document works as well as a name
    first = served_public(tmp_path, redis_client, public_logs=str(log), public_source=str(source))
    again = served_public(tmp_path, redis_client, public_logs=str(log), public_source=str(source))
    assert first == again  # the same files give the same public set after a restart
    _, served = first
    assert len(served) == FAST_PUBLIC
    assert served == [(s.id, s.text) for s in sample_sessions(everything, FAST_PUBLIC, seed=0)]
    positions = [[s.id for s in everything].index(id_) for id_, _ in served]
    assert positions == sorted(positions)


def _one_line(error: SystemExit) -> str:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("logs, source, expected", [
    ("{tmp}/missing.log", "hdfs", "log file not found"),
    ("{tmp}/nothing-*.log", "hdfs", "no file matches"),
    ("{tmp}/public.log", "nonesuch", "unknown preset 'nonesuch'"),
    ("{tmp}/public.log", "{tmp}/no-such-source.yaml", "source file not found"),
    ("{tmp}/public.log", None, "must be set together"),
])
def test_bad_settings_stop_start_up_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: str, source: str | None, expected: str,
) -> None:
    (tmp_path / "public.log").write_text("081109 203518 143 INFO dfs.DataNode: Receiving block blk_1\n")
    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", "a" * 32)
    monkeypatch.setenv("FEDDALE_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("FEDDALE_PUBLIC_LOGS", logs.format(tmp=tmp_path))
    monkeypatch.delenv("FEDDALE_PUBLIC_SOURCE", raising=False)
    if source is not None:
        monkeypatch.setenv("FEDDALE_PUBLIC_SOURCE", source.format(tmp=tmp_path))
    if expected == "log file not found":  # a plain path is checked when it is read, at start-up
        settings = load_settings(Settings)
        with pytest.raises(SystemExit) as stopped:
            create_app(settings, redis_client=redis.Redis())
    else:
        with pytest.raises(SystemExit) as stopped:
            load_settings(Settings)
    assert expected in _one_line(stopped.value)


@pytest.mark.parametrize("content, expected", [
    ("", "no log lines"),
    ("not an HDFS line\n", "no line of"),
    ("081109 203518 143 INFO dfs.DataNode: a line about no block\n", "no sessions in"),
])
def test_raw_logs_without_sessions_stop_start_up_with_one_line(
    tmp_path: Path, redis_client: redis.Redis, content: str, expected: str,
) -> None:
    (tmp_path / "public.log").write_text(content)
    with pytest.raises(SystemExit) as stopped:
        create_app(coordinator_settings(tmp_path, "unused", public_logs=str(tmp_path / "public.log"),
                                        public_source="hdfs"), redis_client=redis_client)
    assert expected in _one_line(stopped.value)


def test_the_coordinator_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "public.log").write_text("081109 203518 143 INFO dfs.DataNode: a line about no block\n")
    env = {**os.environ, "FEDDALE_ADMIN_TOKEN": "a" * 32, "FEDDALE_ARTIFACT_DIR": str(tmp_path / "artifacts"),
           "FEDDALE_PUBLIC_LOGS": str(tmp_path / "public.log"), "FEDDALE_PUBLIC_SOURCE": "hdfs",
           "FEDDALE_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "feddale_coordinator"], env=env, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert lines[-1].startswith("cannot build the public set from FEDDALE_PUBLIC_LOGS: no sessions in"), done.stderr
    assert len([line for line in lines if "FEDDALE_PUBLIC_LOGS" in line]) == 1
