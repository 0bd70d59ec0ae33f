"""Benchmark tables 1, 2 and 4: detection quality vs FedAvg rounds, communication, ablation.

All three come from the same progressive federations (``simulate.run_federation``): per seed,
clients train for max(rounds)+1 rounds and the server distils after each number of FedAvg
rounds asked for, next to the FedAvg-only teacher detector after the same client training.
The ablation re-uses a snapshot's client scores with another filter, k or top-k, so it costs
student trainings only; filter and k run at ``bench.ablation_rounds`` (one-shot and 3 rounds by
default, as in the paper), top-k at ``bench.top_k_rounds`` (one-shot). Results go to
``quality.json`` after every seed: a re-run skips the seeds already there (resume), ``--fresh``
starts over.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feddale.files import atomic_write
from feddale.method.config import RunConfig
from feddale.harness.provenance import git_commit, machine
from feddale.harness.simulate import Variant, run_federation

log = logging.getLogger(__name__)

METRICS = ("f1", "precision", "recall", "roc_auc")
NATURAL_METRICS = ("f1", "precision", "recall", "pr_auc", "false_alarms_per_10k")


def ablation_plan(cfg: RunConfig) -> dict[int, list[Variant]]:
    """The extra students per snapshot: filter (mean, max, none) and k at ``bench.ablation_rounds``,
    the accuracy metric's top-k at ``bench.top_k_rounds``; one setting varied at a time.

    The default variant (the profile's own settings) is the snapshot's main student, so it is
    not repeated here.
    """
    sizes = cfg.bench
    default = (cfg.filter, cfg.k_normal, cfg.k_anomalous, cfg.score.top_k)
    selection = [
        Variant(f"filter={f}", f, cfg.k_normal, cfg.k_anomalous, cfg.score.top_k) for f in ("mean", "max", "none")
    ]
    selection += [Variant(f"k={k}", cfg.filter, k, k, cfg.score.top_k) for k in sizes.ablation_ks(cfg.k_normal)]
    metric = [Variant(f"top_k={t}", cfg.filter, cfg.k_normal, cfg.k_anomalous, t) for t in sizes.top_ks]
    plan: dict[int, list[Variant]] = {}
    for rounds in sorted(set(sizes.ablation_rounds) | set(sizes.top_k_rounds)):
        wanted = selection if rounds in sizes.ablation_rounds else []
        wanted = wanted + (metric if rounds in sizes.top_k_rounds else [])
        seen: set[tuple] = {default}
        plan[rounds] = []
        for variant in wanted:
            key = (variant.filter, variant.k_normal, variant.k_anomalous, variant.top_k)
            if key not in seen:
                seen.add(key)
                plan[rounds].append(variant)
    return plan


def run_quality(
    cfg: RunConfig,
    out_dir: Path,
    seeds: Sequence[int],
    ablation_seeds: Sequence[int],
    progress: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the progressive federations over ``cfg.bench.rounds`` and write ``quality.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "quality.json"
    rounds = sorted(set(cfg.bench.rounds))
    done: dict[str, Any] = {}
    if path.exists() and not fresh:
        done = json.loads(path.read_text())
        if done.get("config") != cfg.model_dump(mode="json") or done.get("rounds") != rounds:
            raise ValueError(f"{path} was written for another config or rounds; pass --fresh to start over")
    results: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "rounds": rounds, "runs": done.get("runs", [])}
    have = {run["seed"] for run in results["runs"]}
    plan = ablation_plan(cfg)
    for seed in seeds:
        if seed in have:
            log.info("seed %d: already in %s, skipped", seed, path)
            continue
        chosen = plan if seed in ablation_seeds else {}
        log.info("seed %d: federation over rounds %s, %d ablation students", seed, rounds,
                 sum(len(v) for v in chosen.values()))
        snapshots = run_federation(cfg, seed, out_dir / "students", rounds, chosen, progress=progress)
        results["runs"].append({"seed": seed, "git_commit": git_commit(), "machine": machine(), "snapshots": snapshots})
        results["tables"] = tables(results["runs"])
        _write_json(path, results)
    results["tables"] = tables(results["runs"])
    _write_json(path, results)
    return results


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2))


def _spread(values: list[float]) -> dict[str, float | int]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def tables(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds for each table, keyed by FedAvg rounds."""
    by_rounds: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        for snap in run["snapshots"]:
            by_rounds.setdefault(snap["fedavg_rounds"], []).append(snap)
    quality, communication, ablation = {}, {}, {}
    for rounds, snaps in sorted(by_rounds.items()):
        row: dict[str, Any] = {}
        for m in METRICS:
            row[f"student_{m}"] = _spread([s["student"]["test"][m] for s in snaps])
            baselines = [s["fedavg_teacher_after_distill_round"] for s in snaps if s["fedavg_teacher_after_distill_round"]]
            if baselines:
                row[f"fedavg_teacher_{m}"] = _spread([b[m] for b in baselines])
        naturals = [s["student"]["natural"] for s in snaps if "natural" in s["student"]]
        for m in NATURAL_METRICS if naturals else ():
            row[f"student_natural_{m}"] = _spread([n[m] for n in naturals if n[m] is not None])
        row["purity_anomalous"] = _spread([s["pseudo_labels"]["purity_anomalous"] for s in snaps])
        row["purity_normal"] = _spread([s["pseudo_labels"]["purity_normal"] for s in snaps])
        quality[rounds] = row
        communication[rounds] = communication_row(snaps[0], rounds)
        variants: dict[str, list[dict[str, Any]]] = {}
        for s in snaps:
            variants.setdefault("default", []).append(s)
            for name, result in s.get("ablation", {}).items():
                variants.setdefault(name, []).append(result)
        ablation[rounds] = {
            name: {
                "student_f1": _spread([r["student"]["test"]["f1"] for r in results]),
                "purity_anomalous": _spread([r["pseudo_labels"]["purity_anomalous"] for r in results]),
                "purity_normal": _spread([r["pseudo_labels"]["purity_normal"] for r in results]),
            }
            for name, results in variants.items()
        }
    return {"quality": quality, "communication": communication, "ablation": ablation}


def communication_row(snapshot: dict[str, Any], rounds: int) -> dict[str, Any]:
    """FedDALE's bytes for this snapshot against FedAvg of teacher adapters for as many rounds.

    The FedAvg-only reference sends one adapter up and one down per client per round; its
    adapter size is the measured size of this run's serialized adapters. ``rounds`` = 0 is
    compared with the usual 5-round FedAvg (the paper's comparison) and with one round.
    """
    comm = snapshot["communication"]
    clients = comm["clients"]
    by_kind = comm["total_bytes_by_kind"]
    adapter = snapshot["adapter_bytes"]
    feddale_total = comm["total_up"] + comm["total_down"]
    per_client = {kind: total / clients for kind, total in by_kind.items()}
    out: dict[str, Any] = {
        "clients": clients,
        "adapter_bytes": adapter,
        "per_client_bytes_by_kind": per_client,
        "accuracy_bytes_per_public_session": comm["accuracy_bytes_per_public_session"],
        "feddale_total_bytes": feddale_total,
        "feddale_uplink_total_bytes": comm["total_up"],
    }
    for fedavg_rounds in sorted({max(rounds, 1), 5}):
        fedavg_total = 2 * adapter * clients * fedavg_rounds
        out[f"fedavg_{fedavg_rounds}_rounds_total_bytes"] = fedavg_total
        out[f"reduction_vs_fedavg_{fedavg_rounds}_rounds_pct"] = round(100 * (1 - feddale_total / fedavg_total), 2)
    return out
