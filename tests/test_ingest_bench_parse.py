"""The parsing benchmark: its metrics on toy data, and the done-when targets on Loghub-2k."""

import json
from pathlib import Path

import pytest

from feddale.ingest.bench_parse import bench_parse, grouping_accuracy, normalise, parsing_accuracy, table
from feddale.ops.cli import main

LOGHUB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "loghub-2k"
needs_loghub = pytest.mark.skipif(not (LOGHUB / "formats.json").is_file(), reason="Loghub-2k data absent")


def test_grouping_accuracy_counts_lines_whose_group_is_exactly_their_truth():
    truth = ["A", "A", "B", "B", "C"]
    assert grouping_accuracy([1, 1, 2, 2, 3], truth) == 1.0
    assert grouping_accuracy([1, 1, 1, 1, 3], truth) == pytest.approx(1 / 5)  # A and B merged
    assert grouping_accuracy([1, 2, 3, 3, 4], truth) == pytest.approx(3 / 5)  # A split
    assert grouping_accuracy(["x", "x", "y", "y", "x"], truth) == pytest.approx(2 / 5)


def test_parsing_accuracy_compares_normalised_templates():
    assert normalise("<*>:<*> open  through proxy <*>:<*> HTTPS") == normalise("<*> open through proxy <*> HTTPS")
    assert normalise("time: <*>.<*>") == normalise("time: <*>")
    assert normalise("user <*>") != normalise("user root")
    assert parsing_accuracy(["a <*>", "b"], ["a <*>", "c"]) == 0.5


def test_a_folder_without_systems_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no Loghub-2k system"):
        bench_parse(tmp_path)
    with pytest.raises(FileNotFoundError):
        bench_parse(tmp_path / "missing")


@needs_loghub
def test_bench_parse_meets_the_targets_against_stock_drain3(tmp_path, capsys):
    out = tmp_path / "parsing.json"
    assert main(["logs", "bench-parse", str(LOGHUB), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["systems"] == 15 and summary["lines"] == 30_000
    assert summary["ours"]["grouping_accuracy"] >= 0.90
    assert summary["stock_drain3"]["grouping_accuracy"] < 0.80
    assert summary["ours"]["parsing_accuracy"] > summary["stock_drain3"]["parsing_accuracy"]
    assert all(r["unparsed_lines"] == 0 for r in report["systems"])
    assert table(report) in capsys.readouterr().out
