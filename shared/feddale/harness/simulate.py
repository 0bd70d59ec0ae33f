"""A whole federation in one process: the method end to end, plus the evaluation harness.

The harness is the only place that reads labels, and only to *report*: pseudo-label purity, teacher
ROC-AUC and the student's held-out metrics. Nothing computed from labels flows back into training,
selection or thresholds. One base model is loaded once and clients take turns with their own LoRA
adapter on it, which is what lets four 135M-parameter teachers fit a 2-core laptop.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feddale.data.deployment import federation_split, public_digest, resolve_source
from feddale.data.types import FederationSplit
from feddale.files import atomic_write
from feddale.harness.provenance import git_commit
from feddale.method import adapters, federation, metrics, models, teacher
from feddale.method.config import RunConfig
from feddale.method.detector import Detector
from feddale.method.artifact import StudentArtifact
from feddale.method.threshold import THRESHOLD_RULES, decision_threshold, otsu_threshold
from feddale.protocol import rounds
from feddale.protocol.messages import PublicRef, Task

log = logging.getLogger(__name__)

HEADLINE = ("f1", "precision", "recall", "roc_auc")
NATURAL_HEADLINE = ("f1", "precision", "recall", "pr_auc", "false_alarms_per_10k")
# HDFS_v1's anomaly rate (16,838 of 575,061 blocks): validation F1 is re-weighted to it.
NATURAL_RATE = 0.029


class PhaseClock:
    """Wall time per named phase, summed when a phase repeats (one per client, say)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("phase %s ...", phase)
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + took, 2)
            log.info("phase %s done in %.1f s", phase, took)


def teacher_diagnostics(
    scores: np.ndarray, texts: Sequence[str], labels: Sequence[int], selection: federation.Selection
) -> dict[str, Any]:
    """How well the aggregated teacher scores rank the public set and how pure the pseudo-labels are."""
    y = np.asarray(labels)
    if scores.ndim == 2:  # filter "none" keeps clients apart; rank by their mean for the report only
        scores = scores.mean(axis=0)
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        by_text.setdefault(text, []).append(i)
    distinct_scores = np.array([scores[idx[0]] for idx in by_text.values()])
    distinct_labels = np.array([int(y[idx].mean() >= 0.5) for idx in by_text.values()])

    def auc(labels_: np.ndarray, anomaly_score: np.ndarray) -> float | None:
        if labels_.min() == labels_.max():
            return None
        return metrics.binary_report(labels_, anomaly_score, threshold=0.5)["roc_auc"]

    anomalous = np.asarray(selection.anomalous_idx, dtype=int)
    normal = np.asarray(selection.normal_idx, dtype=int)
    return {
        "public_sessions": len(texts),
        "public_distinct_texts": len(by_text),
        "teacher_auc_sessions": auc(y, -scores),
        "teacher_auc_distinct": auc(distinct_labels, -distinct_scores),
        "selected_anomalous": int(anomalous.size),
        "selected_normal": int(normal.size),
        "selected_anomalous_distinct": len({texts[i] for i in anomalous}),
        "selected_normal_distinct": len({texts[i] for i in normal}),
        "purity_anomalous": metrics.purity(anomalous, y, positive=1),
        "purity_normal": metrics.purity(normal, y, positive=0),
    }


def _evaluate_teacher(
    model: Any,
    tokenizer: Any,
    split: FederationSplit,
    cfg: RunConfig,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """FedAvg-teacher baseline: score sessions with the global teacher, threshold from public scores."""
    public = list(split.public)
    test = list(split.test)
    if cfg.baseline_max_test and len(test) > cfg.baseline_max_test:
        test = [test[i] for i in sorted(rng.choice(len(test), cfg.baseline_max_test, replace=False))]
        public = [public[i] for i in sorted(rng.choice(len(public), cfg.baseline_max_test, replace=False))]
    public_scores = teacher.score_texts(model, tokenizer, [s.text for s in public], cfg.score)
    cut = otsu_threshold(public_scores)
    test_scores = teacher.score_texts(model, tokenizer, [ls.session.text for ls in test], cfg.score)
    # Low accuracy means anomalous: flip so that "higher = more anomalous" for the report.
    report = metrics.binary_report([ls.label for ls in test], -test_scores, threshold=-cut)
    report["threshold_accuracy"] = cut
    return report


@dataclass(frozen=True)
class Variant:
    """Another way to turn the same client scores into a student: what an ablation varies."""

    name: str
    filter: str
    k_normal: int
    k_anomalous: int
    top_k: int


def _snapshot_traffic(rows: list[dict[str, Any]], fedavg_rounds: int) -> list[dict[str, Any]]:
    """The messages a run with ``fedavg_rounds`` FedAvg rounds sends, out of a longer progressive run.

    Rounds 1..R upload adapters and round R+1 distils; clients download the global adapter at
    the start of every round when R > 0 (a one-shot client starts from a seeded init).
    """
    distill = fedavg_rounds + 1
    keep = []
    for row in rows:
        kind, round_no = row["kind"], row["round"]
        if (
            (kind == "adapter_up" and round_no <= fedavg_rounds)
            or (kind == "adapter_down" and fedavg_rounds > 0 and round_no <= distill)
            or (kind in ("accuracy_up", "student_down") and round_no == distill)
        ):
            keep.append(row)
    return keep


def run_seed(cfg: RunConfig, seed: int, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """One federation with one seed and ``cfg.fedavg_rounds``; returns the JSON-ready result row."""
    return run_federation(cfg, seed, out_dir, [cfg.fedavg_rounds], progress=progress)[0]


def run_federation(
    cfg: RunConfig,
    seed: int,
    out_dir: Path,
    snapshots: Sequence[int],
    ablation_plan: Mapping[int, Sequence[Variant]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One seed, distilled after each number of FedAvg rounds in ``snapshots``; one row each.

    The rounds are the deployment's own (:mod:`feddale.protocol.rounds`); only the transport is
    in-process: clients take turns on one loaded teacher, and every blob goes through its wire
    encoding. Why one progressive run: the local training of round R+1 is both FedAvg round R+1
    and the distillation round of a run with R FedAvg rounds (same seeds, same starting adapter),
    so one pass over max(snapshots)+1 rounds yields every snapshot at the cost of the longest.
    ``ablation_plan`` maps a snapshot to variants that re-use its client scores with another filter,
    k or top-k. The FedAvg-teacher baseline is evaluated where a snapshot distils, the only
    rounds a report compares.
    """
    snapshots = sorted(set(snapshots))
    if not snapshots or snapshots[0] < 0:
        raise ValueError(f"snapshots must be FedAvg round counts >= 0, got {snapshots}")
    cfg = cfg.model_copy(update={"seeds": [seed]})
    clock = PhaseClock()
    rng = np.random.default_rng(seed)
    source = resolve_source(cfg.data)
    with clock("data"):
        split = federation_split(cfg.data, seed, source)
    public_texts = [s.text for s in split.public]
    public_ref = PublicRef(digest=public_digest(split.public), count=len(split.public), path="in-process")
    sizes = [len(shard) for shard in split.clients]
    plan = ablation_plan or {}
    top_ks = sorted({cfg.score.top_k, *(v.top_k for variants in plan.values() for v in variants)})
    run_id = f"sim-{seed}"

    with clock("load_teacher"):
        model = rounds.load_teacher(cfg)
    traffic: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    global_adapter: bytes | None = None

    for round_no in range(1, snapshots[-1] + 2):
        distills = (round_no - 1) in snapshots
        uploads = round_no <= snapshots[-1]
        task = Task(
            run_id=run_id, round=round_no, kind="fedavg" if uploads else "distill",
            config=cfg.model_dump(mode="json"), global_adapter=None,
            public=public_ref if distills else None, deadline_at=float("inf"),
        )
        send: list[rounds.Upload] = (["adapter"] if uploads else []) + (["scores"] if distills else [])
        results = []
        for client, shard in enumerate(split.clients):
            model.reset()  # a node of its own: the seeded start, then the global adapter if any
            if global_adapter is not None:
                traffic.append({"round": round_no, "client": client, "kind": "adapter_down",
                                "bytes": len(global_adapter)})
            with clock("teacher_train_and_score"):
                result = rounds.client_round(
                    task, model, shard, shard=client, client_id=f"client-{client}",
                    global_adapter=global_adapter, public=split.public if distills else None,
                    send=send, top_ks=top_ks, progress=progress,
                )
            results.append(result)
            if result.adapter is not None:
                traffic.append({"round": round_no, "client": client, "kind": "adapter_up",
                                "bytes": len(result.adapter)})
            if distills:
                traffic.append({"round": round_no, "client": client, "kind": "accuracy_up",
                                "bytes": len(result.scores[cfg.score.top_k])})
        train_stats = [r.train_stats for r in results]
        if uploads:
            closed = rounds.close_round("fedavg", round_no, [(r.adapter, r.samples) for r in results])
            assert isinstance(closed, rounds.NextRound)
            global_adapter = closed.global_adapter
        baseline = None
        if cfg.baseline and distills:
            # The FedAvg-only detector after the same amount of client training.
            model.reset()
            if global_adapter is not None:
                state, _ = adapters.adapter_from_bytes(global_adapter, adapters.adapter_shapes(model.model))
                adapters.load_adapter_state(model.model, state)
            with clock("baseline_eval"):
                baseline = _evaluate_teacher(model.model, model.tokenizer, split, cfg, rng)
        if uploads:
            history.append({"round": round_no, "teacher_train": train_stats, "fedavg_teacher": baseline})
        if not distills:
            continue
        fedavg_rounds = round_no - 1
        matrices = {
            k: rounds.score_matrix(
                {f"client-{c}": r.scores[k] for c, r in enumerate(results)},
                digest=public_ref.digest, run_id=run_id, round_no=round_no, count=public_ref.count,
            )
            for k in top_ks
        }
        name = f"student-seed{seed}" if len(snapshots) == 1 else f"student-seed{seed}-r{fedavg_rounds}"
        default = Variant("default", cfg.filter, cfg.k_normal, cfg.k_anomalous, cfg.score.top_k)
        row_traffic = _snapshot_traffic(traffic, fedavg_rounds)
        with clock("student"):
            outcome = _distil(cfg, split, public_texts, matrices, default, out_dir / name, progress)
        student_bytes = outcome.pop("student_bytes")
        row_traffic += [
            {"round": round_no, "client": client, "kind": "student_down", "bytes": student_bytes}
            for client in range(len(split.clients))
        ]
        ablation = {}
        for variant in plan.get(fedavg_rounds, ()):
            with clock("ablation"):
                result_row = _distil(cfg, split, public_texts, matrices, variant, None, progress)
            result_row.pop("student_bytes")
            ablation[variant.name] = {"variant": variant.__dict__, **result_row}
        rows.append({
            "seed": seed,
            "outlier_clients": rounds.flag_outliers(
                matrices[cfg.score.top_k], [f"client-{c}" for c in range(len(results))]
            ),
            "data_source": source,
            "clients": sizes,
            "data_overlap": split_overlap(split),
            "public_digest": public_ref.digest,
            "fedavg_rounds": fedavg_rounds,
            "adapter_bytes": len(adapters.adapter_to_bytes(adapters.adapter_state(model.model),
                                                           models.lora_meta(model.model))),
            "rounds": [r for r in history if r["round"] <= fedavg_rounds],
            "distillation_round": round_no,
            "teacher_train": train_stats,
            **outcome,
            "fedavg_teacher_after_distill_round": baseline,
            "ablation": ablation,
            "communication": summarize_traffic(row_traffic, len(public_texts)),
            "seconds": dict(clock.seconds),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        })
    return rows


def _distil(
    cfg: RunConfig,
    split: FederationSplit,
    public_texts: list[str],
    matrices: dict[int, np.ndarray],
    variant: Variant,
    save_to: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """The distillation round's server side for one variant, then the harness's evaluation of it."""
    distilled = rounds.distil(
        cfg, public_texts, matrices[variant.top_k], filter=variant.filter, k_normal=variant.k_normal,
        k_anomalous=variant.k_anomalous, progress=progress,
    )
    diagnostics = teacher_diagnostics(distilled.aggregated, public_texts, split.public_labels, distilled.selection)
    log.info("pseudo-labels (%s): %s", variant.name, json.dumps(diagnostics))
    evaluation = evaluate_student(distilled.artifact, split, public_texts)
    out: dict[str, Any] = {
        "pseudo_labels": {**diagnostics, "selection_digest": distilled.summary.digest},
        "student": evaluation,
        "student_version": distilled.artifact.version,
        "student_bytes": len(distilled.artifact.to_bytes()),
    }
    if save_to is not None:
        out["student_artifact"] = str(distilled.artifact.save(save_to))
    return out


def split_overlap(split: FederationSplit) -> dict[str, dict[str, Any]]:
    """Per evaluation part and class: how many sessions have an exact textual copy in the training data.

    A copy in the public set is a text the student may have been trained on; a copy in a client
    shard is one the teachers saw. HDFS is repetitive enough that most test sessions have one.
    """
    public = {s.text for s in split.public}
    clients = {s.text for shard in split.clients for s in shard}
    out: dict[str, dict[str, Any]] = {}
    for name, part in (("validation", split.validation), ("test", split.test), ("natural", split.natural)):
        for label, kind in ((0, "normal"), (1, "anomalous")):
            texts = [ls.session.text for ls in part if ls.label == label]
            if texts:
                out.setdefault(name, {})[kind] = {
                    "sessions": len(texts),
                    "in_public": round(sum(t in public for t in texts) / len(texts), 4),
                    "in_clients": round(sum(t in clients for t in texts) / len(texts), 4),
                    "in_either": round(sum(t in public or t in clients for t in texts) / len(texts), 4),
                }
    return out


def evaluate_student(artifact: StudentArtifact, split: FederationSplit, public_texts: list[str]) -> dict[str, Any]:
    """The student as a detector sees it, at the threshold it ships with; labels only report here.

    ``validation`` and ``test`` are balanced; ``natural`` is the test at the natural anomaly rate
    and ``novel`` its sessions whose text occurs in no client shard and not in the public set
    (the balanced test when there is no natural split). ``threshold_rules`` compares every
    label-free rule on validation (recall, FPR, and F1 re-weighted to :data:`NATURAL_RATE`):
    the evidence a profile's rule is chosen on. Each rule's natural-split figures are reported
    beside it so a rule change needs no re-run; they never choose the rule.
    """
    detector = Detector(artifact)
    parts = {"validation": split.validation, "test": split.test, "natural": split.natural}
    seen = set(public_texts) | {s.text for shard in split.clients for s in shard}
    parts["novel"] = tuple(ls for ls in (split.natural or split.test) if ls.session.text not in seen)
    probs = {name: detector.predict_proba([ls.session.messages for ls in part]) for name, part in parts.items() if part}
    evaluation: dict[str, Any] = {
        name: {**metrics.binary_report([ls.label for ls in parts[name]], p, threshold=detector.threshold),
               "anomalous": sum(ls.label for ls in parts[name])}
        for name, p in probs.items()
    }
    if "validation" in probs:
        public_probs = rounds.public_probabilities(detector, public_texts)
        rules = {}
        for rule in THRESHOLD_RULES:
            cut = decision_threshold(public_probs, rule)
            reports = {name: metrics.binary_report([ls.label for ls in parts[name]], probs[name], cut)
                       for name in ("validation", "natural") if name in probs}
            fpr = reports["validation"]["fp"] / max(1, reports["validation"]["fp"] + reports["validation"]["tn"])
            reports["validation"]["f1_at_natural_rate"] = round(
                metrics.f1_at_rate(reports["validation"]["recall"], fpr, NATURAL_RATE), 4)
            rules[rule] = {"threshold": cut, **reports}
        evaluation["threshold_rules"] = rules
    return evaluation


def summarize_traffic(rows: list[dict[str, Any]], public_sessions: int) -> dict[str, Any]:
    """Bytes per client per round and totals, split by message kind."""
    per_kind: dict[str, int] = {}
    for row in rows:
        per_kind[row["kind"]] = per_kind.get(row["kind"], 0) + row["bytes"]
    clients = len({row["client"] for row in rows}) or 1
    accuracy = [row["bytes"] for row in rows if row["kind"] == "accuracy_up"]
    return {
        "rows": rows,
        "total_bytes_by_kind": per_kind,
        "total_up": sum(v for k, v in per_kind.items() if k.endswith("_up")),
        "total_down": sum(v for k, v in per_kind.items() if k.endswith("_down")),
        "per_client_accuracy_up": (sum(accuracy) / len(accuracy)) if accuracy else None,
        "accuracy_bytes_per_public_session": (
            (sum(accuracy) / len(accuracy) / public_sessions) if accuracy else None
        ),
        "clients": clients,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the numbers a reader looks at first."""
    picks = {
        **{f"student_test_{m}": ("student", "test", m) for m in HEADLINE},
        **{f"student_validation_{m}": ("student", "validation", m) for m in HEADLINE},
        **{f"student_natural_{m}": ("student", "natural", m) for m in NATURAL_HEADLINE},
        "student_test_false_alarms_per_10k": ("student", "test", "false_alarms_per_10k"),
        "student_novel_false_alarms_per_10k": ("student", "novel", "false_alarms_per_10k"),
        "student_novel_recall": ("student", "novel", "recall"),
        "student_threshold": ("student", "test", "threshold"),
        "teacher_auc_sessions": ("pseudo_labels", "teacher_auc_sessions"),
        "teacher_auc_distinct": ("pseudo_labels", "teacher_auc_distinct"),
        "purity_anomalous": ("pseudo_labels", "purity_anomalous"),
        "purity_normal": ("pseudo_labels", "purity_normal"),
        "selected_anomalous_distinct": ("pseudo_labels", "selected_anomalous_distinct"),
        "selected_normal_distinct": ("pseudo_labels", "selected_normal_distinct"),
        "accuracy_bytes_per_public_session": ("communication", "accuracy_bytes_per_public_session"),
    }
    if rows and rows[0].get("fedavg_teacher_after_distill_round"):
        picks["fedavg_teacher_test_f1"] = ("fedavg_teacher_after_distill_round", "f1")
    out: dict[str, Any] = {}
    for name, path in picks.items():
        values = []
        for row in rows:
            node: Any = row
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, (int, float)):
                values.append(float(node))
        if values:
            out[name] = {
                "mean": round(statistics.fmean(values), 4),
                "std": round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return out


def simulate(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Run every seed of `cfg`, write `results.json` after each seed (nothing lost on a crash)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "git_commit": git_commit(),
        "runs": [],
    }
    path = out_dir / "results.json"
    for seed in cfg.seeds:
        log.info("seed %d: starting", seed)
        results["runs"].append(run_seed(cfg, seed, out_dir, progress=progress))
        results["summary"] = summarize(results["runs"])
        atomic_write(path, json.dumps(results, indent=2))
    return results
