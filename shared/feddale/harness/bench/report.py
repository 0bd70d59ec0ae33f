"""The benchmark's Markdown report, built only from the JSON files a bench run wrote.

Why separate from running: a report can be rebuilt (or a table re-run) without repeating hours
of training, and every number in it traces back to a JSON file with its commit and machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGET_F1 = 0.95
TARGET_BYTES_PER_SESSION = 1.1
TARGET_REDUCTION_PCT = 95.0


def _ms(x: dict[str, Any]) -> str:
    return f"{x['mean']:.3f} ± {x['std']:.3f} (n={x['n']})"


def _change(reduction_pct: float) -> str:
    """A reduction as a signed change: 99.2 -> "−99.2%", -10.8 (FedDALE sent more) -> "+10.8%"."""
    return f"−{reduction_pct:.1f}%" if reduction_pct >= 0 else f"+{-reduction_pct:.1f}%"


def quality_section(data: dict[str, Any], figures: dict[str, str]) -> list[str]:
    tables = data["tables"]
    lines = ["## 1. Detection quality vs FedAvg rounds", ""]
    lines += [
        "Held-out test split; FedDALE's student against the FedAvg-only teacher detector after the same",
        "client training (threshold: Otsu cut of its scores on the unlabeled public set). Mean ± std over",
        f"seeds {sorted(run['seed'] for run in data['runs'])}.",
        "",
        "| FedAvg rounds | student F1 | precision | recall | ROC-AUC | FedAvg teacher F1 | purity A / N |",
        "|---|---|---|---|---|---|---|",
    ]
    for rounds, row in sorted(tables["quality"].items(), key=lambda kv: int(kv[0])):
        teacher = _ms(row["fedavg_teacher_f1"]) if "fedavg_teacher_f1" in row else "not run"
        lines.append(
            f"| {rounds} | {_ms(row['student_f1'])} | {_ms(row['student_precision'])} | {_ms(row['student_recall'])}"
            f" | {_ms(row['student_roc_auc'])} | {teacher}"
            f" | {row['purity_anomalous']['mean']:.3f} / {row['purity_normal']['mean']:.3f} |"
        )
    natural_rows = {r: row for r, row in tables["quality"].items() if "student_natural_f1" in row}
    if natural_rows:
        lines += [
            "",
            "The same students at the natural anomaly rate (2.9%, a test split of its own) and at the",
            "threshold each ships with (chosen without labels):",
            "",
            "| FedAvg rounds | natural-rate F1 | precision | recall | PR-AUC | false alarms per 10k normal |",
            "|---|---|---|---|---|---|",
        ]
        for rounds, row in sorted(natural_rows.items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {rounds} | {_ms(row['student_natural_f1'])} | {_ms(row['student_natural_precision'])}"
                f" | {_ms(row['student_natural_recall'])} | {_ms(row['student_natural_pr_auc'])}"
                f" | {_ms(row['student_natural_false_alarms_per_10k'])} |"
            )
    one_shot = tables["quality"].get("0") or tables["quality"].get(0)
    if one_shot:
        f1 = one_shot["student_f1"]["mean"]
        lines += ["", f"Target: one-shot student F1 ≥ {TARGET_F1}: measured {f1:.3f} — "
                  f"**{'met' if f1 >= TARGET_F1 else 'not met'}**."]
    if "quality" in figures:
        lines += ["", f"![quality vs rounds]({figures['quality']})"]
    return lines


def communication_section(data: dict[str, Any], figures: dict[str, str]) -> list[str]:
    comm = data["tables"]["communication"]
    lines = ["", "## 2. Communication", ""]
    lines += [
        "Bytes are the exact bodies the services send (the serializers the coordinator's HTTP accounting",
        "counts): safetensors adapters, accuracy payloads, student artifacts. FedAvg-only sends one adapter",
        "up and one down per client per round. FedDALE after R FedAvg rounds sends those R rounds plus",
        "the distillation round (the global adapter down, accuracies up, the student down).",
        "",
        "| setting | adapter (B) | accuracy payload per client (B) | B per public session | student down per client (B)"
        " | FedDALE total (B) | vs FedAvg, same rounds (1 for one-shot) | vs FedAvg 5 rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rounds, row in sorted(comm.items(), key=lambda kv: int(kv[0])):
        per = row["per_client_bytes_by_kind"]
        same = row[f"reduction_vs_fedavg_{max(int(rounds), 1)}_rounds_pct"]
        lines.append(
            f"| {'one-shot' if int(rounds) == 0 else f'{rounds} FedAvg rounds'} | {row['adapter_bytes']:,}"
            f" | {per.get('accuracy_up', 0):,.0f} | {row['accuracy_bytes_per_public_session']:.3f}"
            f" | {per.get('student_down', 0):,.0f} | {row['feddale_total_bytes']:,}"
            f" | {_change(same)} | {_change(row['reduction_vs_fedavg_5_rounds_pct'])} |"
        )
    zero = comm.get("0") or comm.get(0)
    if zero:
        b = zero["accuracy_bytes_per_public_session"]
        r = zero["reduction_vs_fedavg_5_rounds_pct"]
        lines += [
            "",
            f"Targets: uplink ≤ {TARGET_BYTES_PER_SESSION} B per public session: {b:.3f} — "
            f"**{'met' if b <= TARGET_BYTES_PER_SESSION else 'not met'}**; one-shot total ≥ {TARGET_REDUCTION_PCT:.0f}%"
            f" below 5 FedAvg rounds: {_change(r)} — **{'met' if r >= TARGET_REDUCTION_PCT else 'not met'}**.",
        ]
    if "communication" in figures:
        lines += ["", f"![communication]({figures['communication']})"]
    return lines


def cost_section(cost: dict[str, Any]) -> list[str]:
    s, t, c, r = cost["student"], cost["teacher"], cost["student_cached_stream"], cost["ratio"]
    lines = ["", "## 3. Detection cost", ""]
    lines += [
        f"Machine: {cost['machine']['cpu']}, {cost['machine']['usable_cpus']} CPUs, torch threads "
        f"{cost['machine']['torch_threads']}; load average before/after {cost['machine']['loadavg_before'][0]} / "
        f"{cost['machine']['loadavg_after'][0]}. Each row ran in its own process; peak RSS is that process's",
        "`VmHWM` at batch 1 and after the batched requests.",
        "",
        "| detector | sessions | p50 batch 1 (ms) | p99 batch 1 (ms) | batched (sessions/s) | peak RSS batch 1 / batched (MB) |",
        "|---|---|---|---|---|---|",
    ]
    same = s["same_sessions"]
    rows = [
        ("student, the teacher's sessions", same["sessions"], same["batch1"], same["batched"], s),
        ("student, all measured sessions", s["sessions"], s["batch1"], s["batched"], s),
        ("teacher scoring", r["sessions_compared"], t["batch1"], t["batched"], t),
    ]
    for name, n, one, batched, proc in rows:
        lines.append(
            f"| {name} | {n} | {one['p50_ms']:.1f} | {one['p99_ms']:.1f} | {batched['sessions_per_s']:.1f}"
            f" | {proc['peak_rss_batch1_mb']:.0f} / {proc['peak_rss_mb']:.0f} |"
        )
    lines += runtime_section(cost)
    cached = c["batch1"]
    lines += [
        "",
        f"Student ≥ 20× faster per session (p50): {r['speedup_p50']}× (mean {r['speedup_mean']}×, batched"
        f" {r['speedup_batched']}×) — **{'met' if r['speedup_met'] else 'not met'}**; student ≤ 500 MB resident:"
        f" {s['peak_rss_batch1_mb']:.0f} MB at batch 1, {s['peak_rss_mb']:.0f} MB batched —"
        f" **{'met' if r['student_rss_met'] else 'not met'}**.",
        "",
        "The detector's cache, a separate row: a repetitive stream replayed one session per request.",
        "",
        "| detector | sessions | cache hit rate | p50 (ms) | p99 (ms) | mean (ms) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
        f"| student with its LRU cache | {c['sessions']} | {c['hit_rate']:.2f} | {cached['p50_ms']:.2f}"
        f" | {cached['p99_ms']:.1f} | {cached['mean_ms']:.1f} | {c['peak_rss_mb']:.0f} |",
    ]
    return lines


def runtime_section(cost: dict[str, Any]) -> list[str]:
    """The student on torch, ONNX fp32 and ONNX int8: same sessions, one fresh process each."""
    variants, ratios = cost.get("student_runtimes") or {}, cost.get("runtime_ratios") or {}
    if len(variants) < 2:
        return []
    lines = [
        "",
        "The student's runtimes, uncached, on the same sessions (each in its own process; test F1 at"
        " threshold 0.5 on the held-out split):",
        "",
        "| runtime | p50 batch 1 (ms) | p99 batch 1 (ms) | sessions/s in requests of"
        f" {cost['setup']['batch_size']} | peak RSS (MB) | test F1 | vs torch: throughput / p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in variants.items():
        f1 = f"{row['test']['f1']:.4f}" if "test" in row else "—"
        ratio = ratios.get(name)
        versus = f"{ratio['throughput_x']:.2f}× / {ratio['p50_fraction']:.2f}×" if ratio else "1× / 1×"
        lines.append(
            f"| {name} | {row['batch1']['p50_ms']:.1f} | {row['batch1']['p99_ms']:.1f}"
            f" | {row['batched']['sessions_per_s']:.1f} | {row['peak_rss_mb']:.0f} | {f1} | {versus} |"
        )
    targets = ratios.get("targets")
    if targets:
        lines.append("")
        for name, r in ratios.items():
            if name == "targets":
                continue
            checks = [
                f"throughput ≥ {targets['throughput_x']:g}×: **{_met(r['throughput_met'])}**",
                f"p50 ≤ {targets['p50_fraction']:g}×: **{_met(r['p50_met'])}**",
                f"peak RSS ≤ {targets['peak_rss_mb']:.0f} MB: **{_met(r['rss_met'])}**",
            ]
            if "f1_met" in r:
                checks.append(f"F1 within {targets['f1_loss']} of torch ({r['f1_minus_torch']:+.4f}): **{_met(r['f1_met'])}**")
            if "int8_f1_met" in r:
                checks.append(f"int8 loses ≤ {targets['f1_loss']} F1 against ONNX fp32 ({r['f1_minus_onnx_fp32']:+.4f}):"
                              f" **{_met(r['int8_f1_met'])}**")
            lines.append(f"- {name}: " + "; ".join(checks) + ".")
    return lines


def _met(flag: bool) -> str:
    return "met" if flag else "not met"


def ablation_section(data: dict[str, Any], figures: dict[str, str]) -> list[str]:
    ablation = data["tables"]["ablation"]
    lines = ["", "## 4. Ablation", ""]
    lines += [
        "Student test F1 and pseudo-label purity when the same client scores are filtered, cut or",
        "scored differently (`default` = the profile's own settings).",
        "",
        "| FedAvg rounds | variant | student F1 | purity A / N |",
        "|---|---|---|---|",
    ]
    for rounds, variants in sorted(ablation.items(), key=lambda kv: int(kv[0])):
        for name, row in sorted(variants.items(), key=lambda kv: (kv[0] != "default", kv[0])):
            lines.append(
                f"| {rounds} | {name} | {_ms(row['student_f1'])}"
                f" | {row['purity_anomalous']['mean']:.3f} / {row['purity_normal']['mean']:.3f} |"
            )
    if "ablation" in figures:
        lines += ["", f"![ablation]({figures['ablation']})"]
    return lines


def write_report(out_dir: Path, header: dict[str, Any]) -> Path:
    """Figures and ``report.md`` from whichever of quality.json and cost.json exist in ``out_dir``."""
    from feddale.harness.bench import plots

    lines = ["# FedDALE benchmark report", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    figures: dict[str, str] = {}
    quality_path = out_dir / "quality.json"
    if quality_path.exists():
        data = json.loads(quality_path.read_text())
        tables = data["tables"]
        figures["quality"] = plots.plot_quality(tables["quality"], out_dir / "quality.png").name
        figures["communication"] = plots.plot_communication(tables["communication"], out_dir / "communication.png").name
        if any(len(v) > 1 for v in tables["ablation"].values()):
            figures["ablation"] = plots.plot_ablation(tables["ablation"], out_dir / "ablation.png").name
        lines += [""] + quality_section(data, figures) + communication_section(data, figures)
    cost_path = out_dir / "cost.json"
    if cost_path.exists():
        lines += cost_section(json.loads(cost_path.read_text()))
    if quality_path.exists() and "ablation" in figures:
        lines += ablation_section(json.loads(quality_path.read_text()), figures)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
