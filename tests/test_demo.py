"""`make demo` end to end with tiny models: real processes, one one-shot run, the printed table."""

from __future__ import annotations

import json

import pytest
from service_helpers import fast_config

from feddale.harness.demo import demo

pytestmark = pytest.mark.e2e


def test_demo_publishes_evaluates_through_the_detector_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDDALE_STUDENT_POLL_S", "1")
    monkeypatch.setenv("FEDDALE_TICK_S", "0.2")
    assert demo(clients=2, config=str(fast_config(tmp_path, **{"data.natural": [97, 3]}))) == 0
    out = capsys.readouterr().out
    for row in ("F1", "precision", "recall", "client-1 bytes up / down", "FedAvg, per client per round",
                "detector latency", "wall time", "decision threshold", "natural-rate F1 (P / R)",
                "false alarms per 10k normal"):
        assert row in out
    (path,) = tmp_path.glob("runs/demo-*/demo-results.json")
    results = json.loads(path.read_text())
    run, evaluation = results["run"], results["evaluation"]
    assert run["status"] == "published"
    assert evaluation["model_versions"] == [run["student_version"]]  # answered by the published student
    assert evaluation["n"] == evaluation["tp"] + evaluation["fp"] + evaluation["tn"] + evaluation["fn"] > 0
    # The report is computed at the detector's threshold: its positives are the detector's verdicts.
    for report in (evaluation, results["natural"]):
        assert report["tp"] + report["fp"] == report["flagged"]
    assert results["natural"]["n"] == 100 and results["natural"]["tp"] + results["natural"]["fn"] == 3
    uplink = max(c["bytes_up"] for c in run["clients"].values())
    assert 0 < uplink < results["fedavg_adapter_bytes"]
