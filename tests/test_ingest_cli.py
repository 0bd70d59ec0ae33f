"""`feddale logs ...` end to end through the main CLI, bad input included (one line, exit 2)."""

import gzip
import io
import json
import sys

import pytest

from feddale.data.sources import load_dataset
from feddale.ops.cli import main

LINES = [
    "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-16 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "garbage",
    "081109 203519 145 INFO dfs.DataNode$PacketResponder: PacketResponder 2 for block blk_77 terminating",
    "",
    "081109 203520 145 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_-16 terminating",
]


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "HDFS.log"
    path.write_text("\n".join(LINES) + "\n")
    return path


def _records(text):
    return [json.loads(line) for line in text.splitlines()]


def test_parse_writes_one_object_per_input_line_in_order(log, tmp_path, capsys):
    out = tmp_path / "parsed.jsonl"
    assert main(["logs", "parse", str(log), "--preset", "hdfs", "--out", str(out)]) == 0
    records = _records(out.read_text())
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    first = records[0]
    assert set(first) == {"line", "fields", "template_id", "template", "masked"}
    assert first["fields"]["Component"] == "dfs.DataNode$DataXceiver"
    assert first["masked"] == "Receiving block blk_<*> src: /<*> dest: /<*>"
    assert records[2]["template_id"] == records[4]["template_id"]
    assert records[1]["unparsed"] == "no_match" and records[1]["template_id"] is None
    assert records[3]["unparsed"] == "blank"
    assert "5 lines, 3 parsed, 2 not parsed (1 no match, 1 blank)" in capsys.readouterr().err


def test_parse_reads_gzip_and_standard_input_and_a_format_alone(log, tmp_path, capsys, monkeypatch):
    packed = tmp_path / "HDFS.log.gz"
    packed.write_bytes(gzip.compress(log.read_bytes()))
    assert main(["logs", "parse", str(packed), "--preset", "hdfs"]) == 0
    assert len(_records(capsys.readouterr().out)) == 5
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"12:00 [main] started 3 workers\n")))
    assert main(["logs", "parse", "-", "--format", r"<Time> \[<Thread>\] <Content>"]) == 0
    (record,) = _records(capsys.readouterr().out)
    assert record["fields"]["Thread"] == "main" and record["masked"] == "started <*> workers"


def test_parse_keeps_template_ids_across_runs_with_a_state_folder(log, tmp_path, capsys):
    state = tmp_path / "state"
    main(["logs", "parse", str(log), "--preset", "hdfs", "--state", str(state)])
    first = _records(capsys.readouterr().out)
    main(["logs", "parse", str(log), "--preset", "hdfs", "--state", str(state)])
    assert [r["template_id"] for r in _records(capsys.readouterr().out)] == [r["template_id"] for r in first]
    assert (state / "hdfs" / "drain3.state").is_file()


def test_sessions_writes_what_data_jsonl_reads(log, tmp_path, capsys):
    labels = tmp_path / "anomaly_label.csv"
    labels.write_text("BlockId,Label\nblk_-16,Anomaly\nblk_77,Normal\n")
    out = tmp_path / "sessions.jsonl"
    assert main(["logs", "sessions", str(log), "--preset", "hdfs", "--labels", str(labels), "--out", str(out)]) == 0
    dataset = load_dataset(f"jsonl:{out}")
    assert [s.id for s in dataset.sessions] == ["blk_-16", "blk_77"] and dataset.labels == (1, 0)
    assert "2 sessions from 3 lines" in capsys.readouterr().err


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("feddale: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_bad_input_is_a_one_line_error(log, tmp_path, capsys):
    assert "no <Content>" in _one_line_error(capsys, ["logs", "parse", str(log), "--format", "<Date> <Time>"])
    assert "not a valid pattern" in _one_line_error(capsys, ["logs", "parse", str(log), "--format", "<A> (<Content>"])
    binary = tmp_path / "core.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    assert "binary" in _one_line_error(capsys, ["logs", "parse", str(binary), "--preset", "hdfs"])
    empty = tmp_path / "empty.log"
    empty.write_text("")
    assert "empty" in _one_line_error(capsys, ["logs", "parse", str(empty), "--preset", "hdfs"])
    assert "not found" in _one_line_error(capsys, ["logs", "parse", str(tmp_path / "missing.log"), "--preset", "hdfs"])
    assert "unknown preset" in _one_line_error(capsys, ["logs", "parse", str(log), "--preset", "nonesuch"])
    assert "no line of" in _one_line_error(capsys, ["logs", "parse", str(log), "--preset", "apache"])
    source = tmp_path / "bad.yaml"
    source.write_text('format: "<A> <Content>"\nkey: "(unclosed"\n')
    assert "key regex" in _one_line_error(
        capsys, ["logs", "sessions", str(log), "--source", str(source), "--out", str(tmp_path / "s.jsonl")]
    )
    assert "is a folder" in _one_line_error(capsys, ["logs", "parse", str(tmp_path), "--preset", "hdfs"])
    broken = tmp_path / "broken.log.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    assert "cannot read" in _one_line_error(capsys, ["logs", "parse", str(broken), "--preset", "hdfs"])
    truncated = tmp_path / "truncated.log.gz"
    truncated.write_bytes(gzip.compress(log.read_bytes() * 50)[:200])
    assert "cannot read" in _one_line_error(capsys, ["logs", "parse", str(truncated), "--preset", "hdfs"])


def test_a_ten_megabyte_line_is_reported_not_fatal(tmp_path, capsys):
    path = tmp_path / "big.log"
    path.write_text("081109 203518 1 INFO dfs.X: " + "a" * 10_000_000 + "\n" + LINES[0] + "\n")
    assert main(["logs", "parse", str(path), "--preset", "hdfs"]) == 0
    captured = capsys.readouterr()
    records = _records(captured.out)
    assert records[0]["unparsed"] == "too_long" and records[1]["template_id"] == "T1"
    assert "1 too long" in captured.err


def test_presets_are_listed(capsys):
    assert main(["logs", "presets"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 16
