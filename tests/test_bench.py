"""feddale bench: progressive snapshots, communication accounting, ablation and the report (tiny models)."""

import json


from feddale.ops.cli import main
from feddale.method.config import load_config
from feddale.harness.bench import quality
from feddale.harness.simulate import _snapshot_traffic

SMALL = [
    "--set", "data.n_clients=2", "--set", "data.public=[30,30]", "--set", "data.test=[20,20]",
    "--set", "data.validation=[10,10]", "--set", "k_normal=10", "--set", "k_anomalous=10",
    "--set", "baseline_max_test=10",
]


def test_snapshot_traffic_keeps_only_what_that_run_sends():
    rows = [
        {"round": r, "client": 0, "kind": kind, "bytes": 1}
        for r in (1, 2, 3)
        for kind in ("adapter_down", "adapter_up", "accuracy_up")
    ]
    one_shot = _snapshot_traffic(rows, 0)
    assert [(r["round"], r["kind"]) for r in one_shot] == [(1, "accuracy_up")]
    two = {(r["round"], r["kind"]) for r in _snapshot_traffic(rows, 2)}
    assert two == {
        (1, "adapter_down"), (1, "adapter_up"), (2, "adapter_down"), (2, "adapter_up"),
        (3, "adapter_down"), (3, "accuracy_up"),
    }


def test_ablation_plan_varies_one_thing_at_a_time_where_asked_and_skips_the_default():
    cfg = load_config("tiny", {
        "k_normal": 100, "k_anomalous": 100, "bench.ks": [50, 100], "bench.top_ks": [1, 3],
        "bench.ablation_rounds": [0, 3], "bench.top_k_rounds": [0, 5],
    })
    names = {r: [v.name for v in variants] for r, variants in quality.ablation_plan(cfg).items()}
    assert names == {
        0: ["filter=max", "filter=none", "k=50", "top_k=1"],
        3: ["filter=max", "filter=none", "k=50"],
        5: ["top_k=1"],
    }


def test_ablation_ks_default_to_the_papers_spread_around_the_profiles_k():
    assert load_config("tiny", {"k_normal": 200}).bench.ablation_ks(200) == [50, 100, 200, 400]
    cpu = load_config("cpu")
    assert cpu.bench.ablation_ks(cpu.k_normal) == [round(cpu.k_normal * f) for f in (0.25, 0.5, 1, 2)]
    assert load_config("tiny", {"bench.ks": [7]}).bench.ablation_ks(20) == [7]


def test_bench_profile_is_the_cpu_recipe_at_a_smaller_size():
    """`make bench` must fit an hour on 2 cores: same models and scoring, smaller budgets and sets."""
    cpu, bench = load_config("cpu"), load_config("bench")
    assert (bench.teacher_model, bench.student.base) == (cpu.teacher_model, cpu.student.base)
    assert bench.score == cpu.score and bench.selection == cpu.selection and bench.filter == cpu.filter
    assert bench.teacher.steps * bench.teacher.batch_size < cpu.teacher.steps * cpu.teacher.batch_size
    assert sum(bench.data.public) < sum(cpu.data.public) and bench.baseline
    assert bench.bench.rounds == [0, 3, 5] and bench.bench.ablation_rounds == [0, 3]
    assert bench.bench.top_k_rounds == [0]


def test_bench_tiny_writes_tables_plots_and_report_and_resumes(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--config", "tiny", "--quiet", "--out", str(out), "--seeds", "0", "--rounds", "0,1",
            "--ablation-rounds", "0", "--top-k-rounds", "0", "--tables", "quality,report", "--ks", "5",
            "--top-ks", "1", *SMALL]
    assert main(args) == 0
    data = json.loads((out / "quality.json").read_text())
    (run,) = data["runs"]
    assert run["seed"] == 0 and run["machine"]["cores"] >= 1 and "git_commit" in run
    assert [s["fedavg_rounds"] for s in run["snapshots"]] == [0, 1]
    zero, one = run["snapshots"]
    # one-shot sends no adapters; one FedAvg round sends one up per client and one down (round 2
    # starts from the average; round 1 from the seeded adapter every client derives itself)
    assert "adapter_up" not in zero["communication"]["total_bytes_by_kind"]
    kinds = one["communication"]["total_bytes_by_kind"]
    assert kinds["adapter_up"] == 2 * one["adapter_bytes"]
    assert kinds["adapter_down"] == 2 * one["adapter_bytes"]
    assert zero["fedavg_teacher_after_distill_round"]["n"] == 10
    assert set(zero["ablation"]) == {"filter=max", "filter=none", "k=5", "top_k=1"}
    assert one["ablation"] == {}  # only the snapshots in --ablation-rounds train the extra students
    tables = data["tables"]
    assert set(tables["quality"]) == {"0", "1"}
    comm = tables["communication"]["0"]
    assert comm["fedavg_5_rounds_total_bytes"] == 2 * 2 * 5 * zero["adapter_bytes"]
    # (tiny models: the student's ONNX graph outweighs five rounds of tiny adapters, so only the
    # arithmetic is checked here; docs/results.md has the real-model figures)
    expected = round(100 * (1 - comm["feddale_total_bytes"] / comm["fedavg_5_rounds_total_bytes"]), 2)
    assert comm["reduction_vs_fedavg_5_rounds_pct"] == expected
    assert set(tables["ablation"]["0"]) == {"default", "filter=max", "filter=none", "k=5", "top_k=1"}
    for png in ("quality.png", "communication.png", "ablation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "## 1. Detection quality vs FedAvg rounds" in text and "## 4. Ablation" in text
    assert "![quality vs rounds](quality.png)" in text
    # a second invocation resumes: the seed is already there, nothing is retrained
    before = (out / "quality.json").read_text()
    assert main(args) == 0
    assert json.loads((out / "quality.json").read_text())["runs"] == json.loads(before)["runs"]


def test_bench_refuses_to_mix_configs_and_unknown_tables(tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "quality.json").write_text(json.dumps({"config": {"name": "other"}, "rounds": [0], "runs": []}))
    assert main(["bench", "--config", "tiny", "--out", str(out), "--tables", "quality", *SMALL]) == 2
    assert "--fresh" in capsys.readouterr().err
    assert main(["bench", "--config", "tiny", "--out", str(out), "--tables", "plots"]) == 2
    assert "unknown tables" in capsys.readouterr().err
