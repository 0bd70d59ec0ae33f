"""The in-process federation end to end on the tiny profile, and the config it runs from."""

import json

import pytest

from feddale.ops.cli import main
from feddale.method.config import load_config, parse_override

SMALL = [
    "--set", "data.n_clients=2", "--set", "data.public=[30,30]", "--set", "data.test=[20,20]",
    "--set", "data.validation=[10,10]", "--set", "k_normal=10", "--set", "k_anomalous=10",
    "--set", "baseline_max_test=10",
]


def test_simulate_tiny_writes_a_complete_report(tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", "--config", "tiny", "--quiet", "--out", str(out), *SMALL]) == 0
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert run["clients"] == [120, 120]
    student = run["student"]
    assert set(student) == {"validation", "test", "novel", "threshold_rules"}  # no natural split asked for
    assert student["test"]["n"] == 40
    # Novel: the test sessions whose text is in no client shard and not in the public set.
    overlap = run["data_overlap"]["test"]
    seen = sum(round(overlap[kind]["in_either"] * overlap[kind]["sessions"]) for kind in ("normal", "anomalous"))
    assert student["novel"]["n"] == 40 - seen
    # Every report is at the threshold the student ships with; both rules are compared on validation.
    artifact = json.loads((out / "student-seed0" / "student.json").read_text())
    assert student["test"]["threshold"] == artifact.get("threshold", 0.5) == student["threshold_rules"]["fixed"]["threshold"]
    assert set(student["threshold_rules"]) == {"fixed", "otsu"}
    assert "f1_at_natural_rate" in student["threshold_rules"]["otsu"]["validation"]
    assert 0.0 <= run["pseudo_labels"]["purity_anomalous"] <= 1.0
    comm = run["communication"]
    # at most one byte per public session plus a fixed header (the 1.1 B/session target is for 2,000)
    assert comm["per_client_accuracy_up"] <= 60 + 128
    assert comm["total_bytes_by_kind"]["accuracy_up"] > 0
    assert "adapter_down" not in comm["total_bytes_by_kind"]  # one-shot: no adapter traffic
    assert (out / "student-seed0" / "student.json").is_file()
    assert results["summary"]["student_test_f1"]["n"] == 1


def test_recipes_and_overrides():
    paper = load_config("tiny", recipe="paper")
    assert paper.recipe == "paper" and paper.selection == "plain" and paper.score.kind == "mean"
    assert not paper.score.end_marker and not paper.teacher.end_marker
    assert load_config("cpu", recipe="paper").score.view == "full" == load_config("cpu", recipe="paper").teacher.view
    cpu = load_config("cpu", {"teacher.steps": 5})
    assert cpu.score.view == "full" == cpu.teacher.view and cpu.student.view == "compact"
    assert cpu.teacher.steps == 5 and cpu.teacher_model == "builtin:smollm2-135m"
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config("tiny", recipe="nope")
    with pytest.raises(FileNotFoundError, match="neither a profile"):
        load_config("no-such-profile")
    with pytest.raises(ValueError):
        load_config("tiny", {"teacher.bogus": 1})


def test_overrides_keep_yaml_words_that_are_choices():
    """`off` is an autocast choice, not YAML 1.1's false; true/false and numbers still parse."""
    assert parse_override("teacher.autocast=off") == ("teacher.autocast", "off")
    assert parse_override("student.onnx=false") == ("student.onnx", False)
    assert parse_override("data.public=[10, 20]") == ("data.public", [10, 20])
    cfg = load_config("tiny", dict(parse_override(s) for s in ("teacher.autocast=off", "score.autocast=off")))
    assert cfg.teacher.autocast == "off" == cfg.score.autocast


def test_cli_reports_bad_config_as_an_error(capsys):
    assert main(["simulate", "--config", "no-such-profile"]) == 2
    assert "neither a profile" in capsys.readouterr().err


def test_cli_reports_broken_files_in_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: {steps: [unclosed\n")
    assert main(["simulate", "--config", str(broken), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("feddale: error: config file") and "not valid YAML" in err and "\n" not in err

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "results"  # a folder below a regular file cannot be created
    assert main(["simulate", "--config", "tiny", "--quiet", "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("feddale: error:") and "Traceback" not in err


def test_paper_profile_runs_its_own_settings_at_tiny_scale(tmp_path):
    """The GPU users' profile (plain top/bottom-k, batch 16, 10 steps) with tiny stand-in models.

    Only the models, quantization, set sizes and client count (10 tiny clients take minutes on
    2 cores) are overridden, so a broken paper profile fails here, not on a GPU.
    """
    out = tmp_path / "paper"
    tiny = [
        "--set", "teacher_model=tiny:llama", "--set", "student.base=tiny:llama", "--set", "quantization=none",
        "--set", "teacher.max_len=128", "--set", "score.max_len=256", "--set", "score.overlap=32",
        "--set", "student.max_len=128", "--set", "data.max_client_sessions=40", "--set", "student.steps=5",
        *SMALL,
    ]
    args = ["simulate", "--config", "paper", "--data", "synthetic:900,300", "--seeds", "0", "--quiet",
            "--out", str(out), *tiny]
    assert main(args) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert len(run["clients"]) == 2
    assert run["teacher_train"][0]["steps"] == 10
    labels = run["pseudo_labels"]
    assert labels["selected_anomalous"] == labels["selected_normal"] == 10  # plain: exactly k sessions a side
    assert run["fedavg_teacher_after_distill_round"]["n"] == 10


def test_paper_profile_refuses_cpu_4bit_with_a_clear_error(tmp_path, capsys):
    args = ["simulate", "--config", "paper", "--data", "synthetic:900,300", "--seeds", "0", "--quiet",
            "--out", str(tmp_path / "p"), "--set", "teacher_model=tiny:llama", *SMALL]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("feddale: error:") and "4bit" in err
