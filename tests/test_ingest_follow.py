"""Client nodes following raw log files: the sources file, appends, rotation, archives, the
bounded session store and its crash-safe state."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from feddale.ingest.catalog import load_sources
from feddale.ingest.follow import FileFollower
from feddale.ingest.node import RawLogs
from feddale.ingest.parsing import LineParser
from feddale.ingest.presets import preset
from feddale.ingest.reader import RawLine
from feddale.ingest.store import SessionStore


def hdfs(second: int, block: str, text: str = "Receiving block {b} src: /10.0.0.1:5 dest: /10.0.0.2:50010") -> str:
    return f"081109 2035{second:02d} 143 INFO dfs.DataNode$DataXceiver: {text.format(b=block)}"


def texts(follower: FileFollower) -> list[str | None]:
    return [line.text for line in follower.poll()]


def write(path: Path, *lines: str, mode: str = "a") -> None:
    with path.open(mode, encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)


# ----------------------------------------------------------------- sources file


def test_the_sources_file_names_sources_and_their_paths(tmp_path: Path) -> None:
    (tmp_path / "sources.yaml").write_text(
        "- preset: hdfs\n  paths: [hdfs/*.log]\n  max_sessions: 10\n"
        "- name: myapp\n  format: '<Level> <Content>'\n  key: 'order=(\\d+)'\n  paths: /abs/app.log\n"
    )
    first, second = load_sources(tmp_path / "sources.yaml")
    assert first.source.name == "hdfs" and first.paths == (str(tmp_path / "hdfs/*.log"),) and first.max_sessions == 10
    assert second.source.name == "myapp" and second.paths == ("/abs/app.log",)


@pytest.mark.parametrize(("text", "message"), [
    ("preset: hdfs\n", "expected a non-empty list"),
    ("- preset: nosuch\n  paths: [x]\n", "unknown preset"),
    ("- preset: hdfs\n  paths: [x]\n- preset: hdfs\n  paths: [y]\n", "used more than once"),
    ("- preset: hdfs\n  paths: [1]\n", "paths must be a list"),
    ("- preset: hdfs\n  paths: [x]\n  max_sessions: 0\n", "max_sessions"),
    ("- preset: hdfs\n  paths: [x]\n  colour: red\n", "colour"),
    ("- [unclosed\n", "not a YAML/JSON sources file"),
])
def test_a_bad_sources_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "sources.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_sources(tmp_path / "sources.yaml")


def test_a_missing_sources_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sources file not found"):
        load_sources(tmp_path / "nope.yaml")


# ----------------------------------------------------------------- follower


def test_appends_are_read_once_and_a_half_written_line_waits(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    write(log, "one", "two", mode="w")
    follower = FileFollower([str(tmp_path / "*.log")])
    assert texts(follower) == ["one", "two"]
    assert texts(follower) == []
    with log.open("a") as handle:
        handle.write("thr")
    assert texts(follower) == []  # no newline yet: a writer is halfway through it
    with log.open("a") as handle:
        handle.write("ee\nfour\n")
    lines = list(follower.poll())
    assert [(line.text, line.number) for line in lines] == [("three", 3), ("four", 4)]


def test_rotation_by_rename_then_compression_reads_every_line_once(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    write(log, "a1", "a2", mode="w")
    follower = FileFollower([str(tmp_path / "app.log*")])
    assert texts(follower) == ["a1", "a2"]
    write(log, "a3")  # written after the last poll, just before rotation
    log.rename(tmp_path / "app.log.1")
    write(log, "b1", mode="w")
    assert sorted(texts(follower)) == ["a3", "b1"]
    rotated = tmp_path / "app.log.1"
    (tmp_path / "app.log.1.gz").write_bytes(gzip.compress(rotated.read_bytes()))
    rotated.unlink()
    write(log, "b2")
    assert texts(follower) == ["b2"]  # the archive holds what was read already
    assert follower.counts["renamed"] >= 1


def test_an_archive_found_first_is_read_whole_and_not_again(tmp_path: Path) -> None:
    (tmp_path / "old.log.gz").write_bytes(gzip.compress(b"x1\nx2"))  # no final newline: archives are complete
    follower = FileFollower([str(tmp_path / "*.gz")])
    assert texts(follower) == ["x1", "x2"]
    assert texts(follower) == []


def test_truncation_in_place_reads_the_new_content(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    write(log, "a long first line that is gone after truncation", "another", mode="w")
    follower = FileFollower([str(log)])
    assert len(texts(follower)) == 2
    write(log, "new", mode="w")
    assert texts(follower) == ["new"]


def test_binary_files_broken_archives_and_long_lines_never_stop_the_follower(tmp_path: Path) -> None:
    (tmp_path / "core.log").write_bytes(b"\x7fELF\x00\x00\x01" * 100)
    (tmp_path / "bad.log.gz").write_bytes(b"\x1f\x8b" + os.urandom(64))
    write(tmp_path / "ok.log", "fine", "x" * 200, "after", mode="w")
    follower = FileFollower([str(tmp_path / "*")], max_line_bytes=64)
    assert texts(follower) == ["fine", None, "after"]  # None: the too-long line, reported
    assert texts(follower) == []
    assert follower.counts["binary"] == 1 and follower.counts["unreadable"] == 1


def test_a_long_line_still_being_written_is_skipped_to_its_end_across_polls(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("y" * 100)
    follower = FileFollower([str(log)], max_line_bytes=64)
    assert texts(follower) == [None]
    with log.open("a") as handle:
        handle.write("y" * 100 + "\nnext\n")
    assert texts(follower) == ["next"]


def test_the_position_survives_a_restart(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    write(log, "one", mode="w")
    first = FileFollower([str(log)])
    assert texts(first) == ["one"]
    write(log, "two")
    again = FileFollower([str(log)])
    again.restore(json.loads(json.dumps(first.state())))
    assert [(line.text, line.number) for line in again.poll()] == [("two", 2)]


def test_a_poll_budget_leaves_the_rest_for_the_next_poll(tmp_path: Path) -> None:
    write(tmp_path / "app.log", *[f"l{i}" for i in range(5)], mode="w")
    follower = FileFollower([str(tmp_path / "app.log")])
    assert [line.text for line in follower.poll(budget=3)] == ["l0", "l1", "l2"]
    assert texts(follower) == ["l3", "l4"]


# ----------------------------------------------------------------- store


def parsed(source, *lines: str):
    parser = LineParser(source)
    return [parser.parse(RawLine("t", i, text)) for i, text in enumerate(lines, 1)]


def test_the_store_groups_like_the_batch_builder_and_stays_bounded() -> None:
    store = SessionStore(preset("hdfs"), max_sessions=2, max_messages=2)
    for line in parsed(preset("hdfs"), hdfs(1, "blk_1"), hdfs(2, "blk_2"), hdfs(3, "blk_1"), hdfs(4, "blk_1"),
                       "garbage", hdfs(5, "blk_3", "no block in this one")):
        store.add(line)
    assert [(s.id, len(s.messages)) for s in store.sessions()] == [("blk_2", 1), ("blk_1", 2)]
    assert store.counts["dropped_messages"] == 1 and store.counts["no_key"] == 1
    store.add(parsed(preset("hdfs"), hdfs(6, "blk_3"))[0])
    assert [s.id for s in store.sessions()] == ["blk_1", "blk_3"] and store.counts["evicted"] == 1
    assert all(m == "Receiving block blk_<*> src: /<*> dest: /<*>" for s in store.sessions() for m in s.messages)


# ----------------------------------------------------------------- a node's raw logs


def sources_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "sources.yaml"
    path.write_text(f"- preset: hdfs\n  paths: [logs/*.log, logs/*.log.*]\n{extra}")
    (tmp_path / "logs").mkdir(exist_ok=True)
    return path


def test_a_node_keeps_its_sessions_across_a_restart_without_reading_a_line_twice(tmp_path: Path) -> None:
    config, state = sources_file(tmp_path), tmp_path / "state"
    log = tmp_path / "logs" / "hdfs.log"
    write(log, hdfs(1, "blk_1"), hdfs(2, "blk_2"), "not hdfs", mode="w")
    node = RawLogs.from_file(config, state)
    assert node.poll() == 3
    assert [s.id for s in node.sessions()] == ["blk_1", "blk_2"]
    saved = (state / "raw-logs" / "hdfs.json").read_text()
    assert "10.0.0.1" not in saved and "Receiving block blk_<*>" in saved  # masked messages only

    write(log, hdfs(3, "blk_1"))
    restarted = RawLogs.from_file(config, state)
    assert [s.id for s in restarted.sessions()] == ["blk_1", "blk_2"]
    assert restarted.poll() == 1
    assert {s.id: len(s.messages) for s in restarted.sessions()} == {"blk_1": 2, "blk_2": 1}
    summary = restarted.summary()["hdfs"]
    assert (summary["lines"], summary["unparsed"], summary["sessions"]) == (4, 1, 2)


def test_a_damaged_or_outdated_state_starts_over_from_the_files(tmp_path: Path) -> None:
    config, state = sources_file(tmp_path), tmp_path / "state"
    write(tmp_path / "logs" / "hdfs.log", hdfs(1, "blk_1"), mode="w")
    RawLogs.from_file(config, state).poll()
    (state / "raw-logs" / "hdfs.json").write_text("{half a file")
    node = RawLogs.from_file(config, state)
    assert node.sessions() == () and node.poll() == 1 and len(node.sessions()) == 1

    changed = RawLogs.from_file(sources_file(tmp_path, "  idle_seconds: 60\n"), state)
    assert changed.sessions() == () and changed.poll() == 1


def test_a_source_without_paths_cannot_be_followed(tmp_path: Path) -> None:
    (tmp_path / "sources.yaml").write_text("- preset: hdfs\n")
    with pytest.raises(ValueError, match="no paths to follow"):
        RawLogs.from_file(tmp_path / "sources.yaml")
