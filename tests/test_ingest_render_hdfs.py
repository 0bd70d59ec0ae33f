"""render-hdfs: event sequences as a raw HDFS.log that groups back to the same session texts."""

import csv
import importlib.util
from pathlib import Path

import pytest

from feddale.data.hdfs import load_event_csv
from feddale.data.sources import load_dataset
from feddale.data.synthetic import EVENT_TEMPLATES, generate_events
from feddale.ingest.render_hdfs import render_hdfs
from feddale.method.config import DataConfig
from feddale.ops.cli import main

ROOT = Path(__file__).resolve().parents[1]
HDFS = ROOT.parent / "shared" / "data" / "hdfs"
needs_hdfs = pytest.mark.skipif(not (HDFS / "sessions.csv").is_file(), reason="real HDFS data absent")


def _event_dir(tmp_path, n_normal=40, n_anomalous=10):
    folder = tmp_path / "events"
    folder.mkdir()
    with (folder / "templates.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["event_id", "template"])
        writer.writerows(EVENT_TEMPLATES.items())
    with (folder / "sessions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["session_id", "label", "events"])
        for index, (events, label) in enumerate(generate_events(n_normal, n_anomalous, seed=3)):
            writer.writerow([f"s{index:05d}", label, " ".join(events)])
    # every template at least once, so all 29 renderings are exercised
    with (folder / "sessions.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(["s-all", 1, " ".join(EVENT_TEMPLATES)])
    return folder


def _round_trip(events_dir, out, capsys, limit=None):
    argv = ["logs", "render-hdfs", str(events_dir), "--out", str(out)] + (["--limit", str(limit)] if limit else [])
    assert main(argv) == 0
    sessions = out / "sessions.jsonl"
    assert main(["logs", "sessions", str(out / "HDFS.log"), "--preset", "hdfs",
                 "--labels", str(out / "anomaly_label.csv"), "--out", str(sessions)]) == 0
    capsys.readouterr()
    raw = load_dataset(f"jsonl:{sessions}")
    original = load_event_csv(events_dir)
    by_id = {s.id: (s, label) for s, label in zip(original.sessions, original.labels)}
    with (out / "blocks.csv").open(newline="") as handle:
        block_to_session = {row["BlockId"]: row["session_id"] for row in csv.DictReader(handle)}
    assert len(raw.sessions) == len(block_to_session) == (limit or len(original.sessions))
    for session, label in zip(raw.sessions, raw.labels):
        expected, expected_label = by_id[block_to_session[session.id]]
        assert session.text == expected.text
        assert label == expected_label
    return raw


def test_rendered_log_groups_back_to_the_event_sequence_texts(tmp_path, capsys):
    _round_trip(_event_dir(tmp_path), tmp_path / "raw", capsys)
    lines = (tmp_path / "raw" / "HDFS.log").read_text().splitlines()
    assert lines[0].split()[0] == "081109"
    assert any(" WARN dfs.FSNamesystem: " in line for line in lines)
    stamps = [line[:13] for line in lines]
    assert stamps == sorted(stamps)  # one time line, sessions interleaved in it
    blocks = [line.split("blk_")[1].split()[0] for line in lines[:50]]
    assert len(set(blocks)) > 5 and blocks != sorted(blocks, key=blocks.index)  # interleaved


def test_rendering_is_seeded(tmp_path):
    folder = _event_dir(tmp_path, 5, 1)
    render_hdfs(folder, tmp_path / "a", seed=1)
    render_hdfs(folder, tmp_path / "b", seed=1)
    assert (tmp_path / "a" / "HDFS.log").read_bytes() == (tmp_path / "b" / "HDFS.log").read_bytes()


def test_unknown_templates_and_missing_files_are_errors(tmp_path):
    folder = _event_dir(tmp_path, 2, 0)
    (folder / "templates.csv").write_text("event_id,template\nE1,Something else <*>\n")
    with pytest.raises(ValueError, match="cannot render"):
        render_hdfs(folder, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="templates.csv"):
        render_hdfs(empty, tmp_path / "x")


@needs_hdfs
def test_real_sessions_render_and_group_back(tmp_path, capsys):
    _round_trip(HDFS, tmp_path / "raw", capsys, limit=400)


def _check_raw_split():
    spec = importlib.util.spec_from_file_location("check_raw_split", ROOT / "scripts" / "check_raw_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_the_raw_log_splits_exactly_as_the_event_sequences(tmp_path, capsys, partition):
    """Blocks first appear in sessions.csv order, so the grouped log is the same data set in the
    same order and federation_split draws the same sessions for every part (the raw-vs-event
    measurement compares the two paths on one split)."""
    events = _event_dir(tmp_path)
    _round_trip(events, tmp_path / "raw", capsys)
    data = DataConfig(n_clients=2, public=(4, 2), test=(4, 2), validation=(2, 1), partition=partition)
    check = _check_raw_split()
    report = check.compare(f"hdfs-csv:{events}", tmp_path / "raw", data, seed=3)
    assert check.identical(report), report
    assert report["dataset"]["sessions"] == 51 and report["public"]["sessions"] == 6
    assert {"client-1", "client-2", "validation", "test"} <= report.keys()
