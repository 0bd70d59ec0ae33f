"""Parsed lines into sessions: by key (with idle timeout), by time window, with labels."""

import pytest

from feddale.data.hdfs import write_sessions_jsonl
from feddale.data.sources import load_dataset
from feddale.ingest.parsing import LineParser
from feddale.ingest.presets import preset
from feddale.ingest.reader import RawLine
from feddale.ingest.sessions import SessionBuilder
from feddale.ingest.sources import build_source

HDFS_LINES = [
    "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-16 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "081109 203518 35 INFO dfs.FSNamesystem: BLOCK* NameSystem.allocateBlock: /mnt/job_1/part-0. blk_-16",
    "not an HDFS line",
    "081109 203519 145 INFO dfs.DataNode$PacketResponder: PacketResponder 2 for block blk_77 terminating",
    "081109 203520 19 INFO dfs.FSNamesystem: BLOCK* ask 10.250.18.114:50010 to delete  blk_-16 blk_77",
    "081109 203521 7 INFO dfs.DataNode: shutting down, no block here",
]


def _build(source, lines, labels=None):
    parser, builder = LineParser(source), SessionBuilder(source, labels)
    for number, text in enumerate(lines, start=1):
        builder.add(parser.parse(RawLine("t.log", number, text)))
    return parser, builder


def test_hdfs_lines_group_by_block_like_the_raw_importer():
    parser, builder = _build(preset("hdfs"), HDFS_LINES)
    dataset = builder.dataset()
    assert [s.id for s in dataset.sessions] == ["blk_-16", "blk_77"]
    assert dataset.sessions[0].messages == (
        "Receiving block blk_<*> src: /<*> dest: /<*>",
        "BLOCK* NameSystem.allocateBlock: /<*> blk_<*>",
        "BLOCK* ask <*> to delete blk_<*>",
    )
    assert dataset.sessions[1].messages[-1] == "BLOCK* ask <*> to delete blk_<*>"
    assert parser.counts["no_match"] == 1 and builder.counts["no_key"] == 1
    assert "1 without a key" in builder.summary() and "1 not parsed (1 no match)" in parser.summary()
    assert dataset.labels is None


def test_a_key_that_comes_back_after_the_idle_time_is_a_new_session():
    source = build_source({"preset": "hdfs", "idle_seconds": 60})
    lines = [
        "081109 203518 1 INFO dfs.X: Verification succeeded for blk_1",
        "081109 203548 1 INFO dfs.X: Verification succeeded for blk_1",
        "081109 203800 1 INFO dfs.X: Verification succeeded for blk_1",
    ]
    dataset = _build(source, lines)[1].dataset()
    assert [(s.id, len(s.messages)) for s in dataset.sessions] == [("blk_1", 2), ("blk_1#2", 1)]


def test_a_key_with_a_group_names_the_session_by_the_group():
    source = build_source({"name": "os", "format": "<Level> <Content>", "key": r"instance: ([0-9a-f-]+)"})
    dataset = _build(source, ["INFO [instance: ab-12] VM Started", "INFO [instance: ab-12] VM Stopped"])[1].dataset()
    assert [s.id for s in dataset.sessions] == ["ab-12"]


def test_windows_per_field_value_and_labels_from_a_field():
    source = build_source({
        "name": "tb", "format": "<Label> <Timestamp> <Node> <Content>",
        "timestamp": {"fields": ["Timestamp"], "format": "epoch"},
        "window": {"by": "Node", "seconds": 60},
        "label_field": "Label", "normal_label": "-",
    })
    lines = ["- 120 n1 ok 1", "- 130 n2 ok 2", "KERNDTLB 150 n1 failure 3", "- 185 n1 ok 4", "- abc n1 bad time"]
    parser, builder = _build(source, lines)
    dataset = builder.dataset()
    assert [s.id for s in dataset.sessions] == ["n1@1970-01-01T00:02:00Z", "n2@1970-01-01T00:02:00Z",
                                               "n1@1970-01-01T00:03:00Z"]
    assert [len(s.messages) for s in dataset.sessions] == [2, 1, 1]
    assert dataset.labels == (1, 0, 0)
    assert builder.counts["no_time"] == 1


def test_labels_from_a_file_must_cover_every_session(tmp_path):
    dataset = _build(preset("hdfs"), HDFS_LINES, labels={"blk_-16": 1, "blk_77": 0})[1].dataset()
    assert dataset.labels == (1, 0)
    with pytest.raises(ValueError, match="no label for 1 sessions"):
        _build(preset("hdfs"), HDFS_LINES, labels={"blk_-16": 1})[1].dataset()
    with pytest.raises(ValueError, match="contradict"):
        SessionBuilder(preset("thunderbird"), {"x": 0})


def test_a_source_without_a_session_rule_is_refused():
    with pytest.raises(ValueError, match="says nothing about sessions"):
        SessionBuilder(build_source({"format": "<Content>"}))


def test_the_written_sessions_load_as_jsonl_data(tmp_path):
    dataset = _build(preset("hdfs"), HDFS_LINES, labels={"blk_-16": 1, "blk_77": 0})[1].dataset()
    path = write_sessions_jsonl(dataset, tmp_path / "sessions.jsonl")
    loaded = load_dataset(f"jsonl:{path}")
    assert loaded.sessions == dataset.sessions and loaded.labels == (1, 0)
