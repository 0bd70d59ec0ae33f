"""Sources (YAML/JSON documents), the built-in presets, and their checks on Loghub-2k."""

import csv
import json
from pathlib import Path

import pytest

from feddale.ingest.presets import LOGHUB_NAMES, PRESETS, preset
from feddale.ingest.reader import read_lines
from feddale.ingest.sources import build_source, load_source, source_from_format

LOGHUB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "loghub-2k"
needs_loghub = pytest.mark.skipif(not (LOGHUB / "formats.json").is_file(), reason="Loghub-2k data absent")


def test_sixteen_presets_by_lowercase_name_and_case_insensitive():
    assert len(PRESETS) == 16 and "bgl" in PRESETS
    assert set(LOGHUB_NAMES) == set(PRESETS)
    for name in PRESETS:
        source = preset(name)
        assert source.name == name
        assert source.key is not None or source.window is not None
    assert preset("OpenSSH").name == "openssh"


def test_bgl_preset_reads_a_bgl_line_with_its_label():
    line = ("APPREAD 1117869872 2005.06.04 R04-M1-N4-I:J18-U11 2005-06-04-00.24.32.432192 "
            "R04-M1-N4-I:J18-U11 RAS APP FATAL ciod: failed to read message prefix on control stream")
    fields = preset("bgl").line_format.split(line)
    assert fields["Label"] == "APPREAD" and fields["Level"] == "FATAL"
    assert fields["Content"].startswith("ciod: failed")
    assert preset("bgl").timestamp.parse(fields) == 1117869872.0


def test_source_documents_in_yaml_and_json(tmp_path):
    (tmp_path / "app.yaml").write_text(
        'name: myapp\nformat: "<Date> <Time> <Level> <Content>"\nmasks: ["req-[0-9a-f]+"]\n'
        'key: "order=(\\\\d+)"\ntimestamp: {fields: [Date, Time], format: "%Y-%m-%d %H:%M:%S"}\n'
        "idle_seconds: 60\n"
    )
    source = load_source(tmp_path / "app.yaml")
    assert source.name == "myapp" and source.key_pattern.groups == 1 and len(source.mask_patterns) == 1
    (tmp_path / "app.json").write_text(json.dumps({"preset": "hdfs", "idle_seconds": 3600}))
    derived = load_source(tmp_path / "app.json")
    assert derived.name == "hdfs" and derived.key == preset("hdfs").key and derived.idle_seconds == 3600


@pytest.mark.parametrize(
    "document, reason",
    [
        ({"format": "<Date> <Level>"}, "no <Content>"),
        ({"format": "<A> <Content>", "masks": ["[x"]}, "mask regex"),
        ({"format": "<A> <Content>", "key": "(a"}, "key regex"),
        ({"format": "<A> <Content>", "key": "a*"}, "empty string"),
        ({"format": "<A> <Content>", "key": "(a)(b)"}, "at most one"),
        ({"format": "<A> <Content>", "key": "a", "window": {"by": "A", "seconds": 1},
          "timestamp": {"fields": ["A"], "format": "epoch"}}, "not both"),
        ({"format": "<A> <Content>", "window": {"by": "B", "seconds": 1},
          "timestamp": {"fields": ["A"], "format": "epoch"}}, "not a field"),
        ({"format": "<A> <Content>", "window": {"by": "A", "seconds": 1}}, "need a timestamp"),
        ({"format": "<A> <Content>", "label_field": "A"}, "go together"),
        ({"format": "<A> <Content>", "colour": "blue"}, "colour"),
        ({"preset": "nonesuch"}, "unknown preset"),
    ],
)
def test_bad_sources_are_one_clear_error(document, reason):
    with pytest.raises(ValueError, match=reason):
        build_source(document)


def test_bad_source_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_source(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("format: [1\n")
    with pytest.raises(ValueError, match="not a YAML/JSON"):
        load_source(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="mapping"):
        load_source(tmp_path / "list.yaml")


def test_a_format_string_alone_makes_a_source():
    source = source_from_format(r"<Time> \[<Thread>\] <Content>")
    assert source.line_format.split("12:00:01 [main] hello 42") == {
        "Time": "12:00:01", "Thread": "main", "Content": "hello 42"
    }


def test_timestamps_without_a_year_still_parse_the_29th_of_february():
    stamp = preset("openssh").timestamp
    assert stamp.parse({"Date": "Feb", "Day": "29", "Time": "10:00:00"}) is not None
    assert stamp.parse({"Date": "Feb", "Day": "xx", "Time": "10:00:00"}) is None


@needs_loghub
@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n != "bgl"))
def test_each_preset_reads_every_loghub_line_as_the_ground_truth_does(name):
    folder = LOGHUB / LOGHUB_NAMES[name]
    source = preset(name)
    formats = json.loads((LOGHUB / "formats.json").read_text())
    assert source.format == formats[LOGHUB_NAMES[name]]["log_format"]
    with (folder / f"{folder.name}_2k.log_structured.csv").open(encoding="utf-8", newline="") as handle:
        truth = list(csv.DictReader(handle))
    lines = list(read_lines(folder / f"{folder.name}_2k.log"))
    assert len(lines) == len(truth) == 2000
    for raw, row in zip(lines, truth):
        fields = source.line_format.split(raw.text)
        assert fields is not None, raw.text
        assert fields["Content"] == row["Content"]
        assert source.timestamp.parse(fields) is not None, raw.text
