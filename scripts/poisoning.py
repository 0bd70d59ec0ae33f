"""Poisoning experiment (issue 16 item 2): 1 of 5 clients hostile, student quality with and without the defence.

One pass of honest client rounds on real weights and real HDFS (the small recipe of
``tests/test_quality_guard.py`` with 5 clients) gives every client's accuracy payload and
adapter. Client 4's payload is then replaced, through the wire codec, by a hostile one:

- ``random``: uniform scores, i.e. no information;
- ``inverted``: ``1 - score``, claiming the normal sessions are the anomalous ones.

Each case selects pseudo-labels with the protocol's own ``rounds.select`` under the plain
``mean`` filter (no defence) and under the defences the coordinator offers (``median``,
``trimmed_mean``, and dropping the clients ``rounds.flag_outliers`` names before a plain
mean), and reports their purity for every case (cheap). Students (``rounds.distil``, the
harness's ``evaluate_student``) are trained for ``--students`` in priority order until
``--budget-min`` is spent, so the script ends in its time budget on a busy machine; two cases
with the same pseudo-labels (same selection digest) share one student.

The scaled-adapter attack is measured on the adapters of the same pass: client 4 uploads its
adapter x10 and declares 1e9 samples; the global adapter is built with plain sample-weighted
``federation.fedavg`` (no defence) and with ``rounds.aggregate_adapters`` (bounded weights and
norm clipping), and compared with the honest-only average. A student after that round would
need a second teacher pass per client and is not measured here; what is measured is the global
adapter as a detector itself: its teacher's ROC-AUC and PR-AUC on the validation split (the
anomalous score is one minus the teacher's top-k accuracy, as in every payload), one scoring
pass per global adapter.

Labels are read only to report. The teacher pass is cached under ``--cache`` (keyed by the
config) so a crash in the student stage does not repeat it.

    nice -n 10 .venv/bin/python scripts/poisoning.py --data hdfs-csv:../shared/data/hdfs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddale.data.deployment import federation_split, public_digest, resolve_source
from feddale.data.types import FederationSplit
from feddale.files import atomic_write
from feddale.harness.provenance import git_commit, machine
from feddale.harness.simulate import PhaseClock, evaluate_student, teacher_diagnostics
from feddale.method import adapters, federation, metrics, payload, teacher
from feddale.method.config import RunConfig, load_config
from feddale.protocol import rounds
from feddale.protocol.messages import PublicRef, Task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# The recipe the regression guard holds to its floor: importing it (not copying it) keeps the
# experiment on the same recipe if the guard's sizes change.
from test_quality_guard import GUARD  # noqa: E402

log = logging.getLogger("poisoning")

HOSTILE = "client-4"
ATTACKS = ("honest", "random", "inverted")
DEFENCES = ("mean", "median", "trimmed_mean", "drop_flagged")  # "mean" is no defence
# Students in this order until the time budget runs out: the baseline, then each attack without and with
# the defence, the inverted one first (the stronger attack).
STUDENT_CASES = ("honest/mean", "inverted/mean", "inverted/median", "random/mean", "random/median",
                 "inverted/drop_flagged", "random/drop_flagged", "inverted/trimmed_mean", "random/trimmed_mean",
                 "honest/median")
# Sized so 5 clients stay small; test [200, 200] adds a balanced test split beside validation.
OVERRIDES: dict[str, Any] = {"data.n_clients": 5, "data.max_client_sessions": 1000, "data.test": [200, 200]}


def experiment_config(source: str, seed: int) -> RunConfig:
    """The guard's recipe on the ``cpu`` profile with 5 small clients, on ``source``."""
    cfg = load_config("cpu", {**GUARD, **OVERRIDES, "data.source": source})
    return cfg.model_copy(update={"seeds": [seed]})


# --------------------------------------------------------------------------- honest teacher pass


def honest_pass(
    cfg: RunConfig, split: FederationSplit, public_ref: PublicRef, run_id: str, cache: Path, clock: PhaseClock
) -> list[rounds.ClientUpload]:
    """Every client's one-shot distillation round (adapter and payload both kept), cached on disk.

    One teacher is loaded once and clients take turns on it from the seeded start, as the
    simulator does; the cache key is the config the teachers use (all but the student's section)
    and the public digest, so a changed teacher recipe never reads a stale pass and a student
    variant re-uses it.
    """
    key = hashlib.sha256((cfg.model_dump_json(exclude={"student"}) + public_ref.digest).encode()).hexdigest()[:16]
    folder = cache / key
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        log.info("teacher pass: cached in %s", folder)
        meta = json.loads(meta_path.read_text())
        return [
            rounds.ClientUpload(
                round=1, samples=row["samples"], adapter=(folder / f"client-{c}.adapter").read_bytes(),
                scores={cfg.score.top_k: (folder / f"client-{c}.scores").read_bytes()},
                train_stats=row["train_stats"],
            )
            for c, row in enumerate(meta["clients"])
        ]
    task = Task(run_id=run_id, round=1, kind="distill", config=cfg.model_dump(mode="json"), global_adapter=None,
                public=public_ref, deadline_at=float("inf"))
    with clock("load_teacher"):
        model = rounds.load_teacher(cfg)
    results = []
    for client, shard in enumerate(split.clients):
        model.reset()
        with clock("teacher_train_and_score"):
            results.append(rounds.client_round(
                task, model, shard, shard=client, client_id=f"client-{client}", public=split.public,
                send=["adapter", "scores"], progress=False,
            ))
        log.info("client %d done (%s)", client, json.dumps(clock.seconds))
    folder.mkdir(parents=True, exist_ok=True)
    for c, result in enumerate(results):
        assert result.adapter is not None
        (folder / f"client-{c}.adapter").write_bytes(result.adapter)
        (folder / f"client-{c}.scores").write_bytes(result.scores[cfg.score.top_k])
    initial = adapters.adapter_to_bytes(model.initial, {})
    (folder / "initial.adapter").write_bytes(initial)
    atomic_write(meta_path, json.dumps({"clients": [
        {"samples": r.samples, "train_stats": r.train_stats} for r in results
    ]}, default=str))
    return results


def initial_adapter(cache: Path, cfg: RunConfig, public_ref: PublicRef) -> dict[str, torch.Tensor]:
    """The seeded adapter every client started from (written beside the cached pass)."""
    key = hashlib.sha256((cfg.model_dump_json() + public_ref.digest).encode()).hexdigest()[:16]
    state, _ = adapters.adapter_from_bytes((cache / key / "initial.adapter").read_bytes())
    return state


# --------------------------------------------------------------------------- payload attacks


def attacked_payloads(honest: Mapping[str, bytes], attack: str, seed: int) -> dict[str, bytes]:
    """The round's payloads with the hostile client's replaced, encoded exactly as the wire carries them.

    The attack starts from the client's own decoded scores (what it would have sent), so the
    coordinator sees a well-formed payload that passes every check of ``score_matrix``.
    """
    if attack == "honest":
        return dict(honest)
    header, scores = payload.decode_scores(honest[HOSTILE])
    if attack == "random":
        forged = np.random.default_rng(seed).uniform(0.0, 1.0, scores.size)
    elif attack == "inverted":
        forged = 1.0 - scores
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return {**honest, HOSTILE: payload.encode_scores(forged, header)}


def selection_for(
    matrix: np.ndarray, clients: Sequence[str], how: str
) -> tuple[np.ndarray, str, list[str]]:
    """(score matrix, coordinator filter, dropped clients) of one defence.

    ``drop_flagged`` drops the clients ``rounds.flag_outliers`` names before a plain mean, but
    only while they are a minority: when most clients are flagged (teachers that agree on
    nothing) there is no honest majority to fall back on, and dropping them would leave nothing.
    """
    if how != "drop_flagged":
        return matrix, how, []
    flagged = rounds.flag_outliers(matrix, clients)
    if 2 * len(flagged) >= len(clients):
        return matrix, "mean", []
    keep = [i for i, c in enumerate(clients) if c not in flagged]
    return matrix[keep], "mean", flagged


def student_metrics(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the table shows: balanced F1/P/R (validation, test) and the natural-rate ones."""
    out: dict[str, Any] = {}
    for part in ("validation", "test", "natural"):
        if part in evaluation:
            out[part] = {k: evaluation[part].get(k) for k in ("f1", "precision", "recall", "false_alarms_per_10k")}
    return out


def payload_cases(
    cfg: RunConfig, split: FederationSplit, public_ref: PublicRef, run_id: str, honest: Mapping[str, bytes]
) -> list[dict[str, Any]]:
    """Every attack x defence with its pseudo-labels' purity (no student yet: selection alone is cheap)."""
    public_texts = [s.text for s in split.public]
    clients = sorted(honest)
    rows = []
    for attack in ATTACKS:
        sent = attacked_payloads(honest, attack, cfg.seeds[0])
        matrix = rounds.score_matrix(sent, digest=public_ref.digest, run_id=run_id, round_no=1, count=public_ref.count)
        flagged = rounds.flag_outliers(matrix, clients)
        for how in DEFENCES:
            used, filter_, dropped = selection_for(matrix, clients, how)
            aggregated, selection = rounds.select(cfg, public_texts, used, filter=filter_)
            diag = teacher_diagnostics(aggregated, public_texts, split.public_labels, selection)
            rows.append({
                "attack": attack, "defence": how, "flagged": flagged, "dropped": dropped, "filter": filter_,
                "selection_digest": rounds.selection_digest(selection), "matrix": used,
                "pseudo_labels": {k: diag[k] for k in ("teacher_auc_sessions", "purity_normal", "purity_anomalous",
                                                       "selected_normal_distinct", "selected_anomalous_distinct")},
            })
    return rows


def train_students(
    cfg: RunConfig, split: FederationSplit, rows: Sequence[dict[str, Any]], wanted: Sequence[str],
    deadline: float, clock: PhaseClock, save: Callable[[], None],
) -> None:
    """Distil and evaluate a student for each ``attack/defence`` in ``wanted``, in that order, until ``deadline``.

    Cases with the same pseudo-labels (selection digest) share one student: the same rows and
    seed train the same model. Results are saved after each student, so a run cut short by its
    time budget still reports every student it finished; the others say they were not trained.
    """
    public_texts = [s.text for s in split.public]
    by_case = {f"{r['attack']}/{r['defence']}": r for r in rows}
    students: dict[str, dict[str, Any]] = {}
    for case in wanted:
        row = by_case[case]
        digest = row["selection_digest"]
        if digest not in students:
            if time.monotonic() > deadline:
                continue
            with clock("student"):
                distilled = rounds.distil(cfg, public_texts, row["matrix"], filter=row["filter"])
                assert rounds.selection_digest(distilled.selection) == digest
                evaluation = evaluate_student(distilled.artifact, split, public_texts)
            students[digest] = {"case": case, "threshold": distilled.artifact.threshold,
                                "metrics": student_metrics(evaluation), "evaluation": evaluation}
            log.info("student %s: %s (%s)", case, json.dumps(students[digest]["metrics"]), json.dumps(clock.seconds))
        for other in rows:  # every case with these pseudo-labels
            if other["selection_digest"] == digest:
                other["student"] = students[digest]["metrics"]
                other["student_trained_for"] = students[digest]["case"]
                other["student_threshold"] = students[digest]["threshold"]
        save()


# --------------------------------------------------------------------------- scaled adapter


def _flat(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().double().flatten() for k in keys])


def scaled_adapter(uploads: Sequence[rounds.ClientUpload], initial: Mapping[str, torch.Tensor],
                   factor: float = 10.0, declared: int = 10**9,
                   ) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """One FedAvg round with the hostile client boosting its adapter, with and without the defence.

    Two boosts: the whole uploaded adapter x ``factor`` (what the issue names), and only its
    update from the seeded start x ``factor`` (a LoRA ``A`` starts random and equal for all, so
    scaling the whole adapter also scales that shared start). Distances are relative to the
    honest-only average (clients 0-3, sample-weighted): to its norm, and to how far it moved
    from the start (the learning signal an attacker competes with). Also returns each global
    adapter (and the honest-only average), keyed by row, for :func:`global_teacher_quality`.
    """
    states = [adapters.adapter_from_bytes(u.adapter)[0] for u in uploads if u.adapter is not None]
    samples = [u.samples for u in uploads]
    keys = sorted(states[0])
    honest_avg = federation.fedavg(states[:-1], samples[:-1])
    all_honest = federation.fedavg(states, samples)
    h, start = _flat(honest_avg, keys), _flat(initial, keys)

    def rel(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        gap = float(torch.linalg.vector_norm(_flat(state, keys) - h))
        return {"rel_to_honest_norm": round(gap / float(torch.linalg.vector_norm(h)), 5),
                "rel_to_honest_update": round(gap / float(torch.linalg.vector_norm(h - start)), 5)}

    own = states[-1]
    boosts = {
        "whole_adapter_x10": {k: v * factor for k, v in own.items()},
        "update_x10": {k: initial[k] + factor * (v - initial[k]) for k, v in own.items()},
    }
    out: dict[str, Any] = {"factor": factor, "declared_samples": declared, "honest_samples": samples[:-1],
                           "all_five_honest": rel(all_honest)}
    globals_: dict[str, dict[str, dict[str, torch.Tensor]]] = {"honest_only": {"honest_only": honest_avg}}
    for name, boosted in boosts.items():
        blobs = [(adapters.adapter_to_bytes(s, {}), n) for s, n in zip(states[:-1], samples[:-1])]
        blobs.append((adapters.adapter_to_bytes(boosted, {}), declared))
        defended, _ = adapters.adapter_from_bytes(rounds.aggregate_adapters(blobs))
        # Without the defence: the blobs as the wire carries them (fp16), plain sample weights.
        wire = [adapters.adapter_from_bytes(blob)[0] for blob, _ in blobs]
        undefended = federation.fedavg(wire, [n for _, n in blobs])
        out[name] = {"hostile_itself": rel(boosted), "no_defence": rel(undefended), "defence": rel(defended)}
        globals_[name] = {"no_defence": undefended, "defence": defended}
    return out, globals_


def global_teacher_quality(
    cfg: RunConfig, split: FederationSplit, globals_: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    clock: PhaseClock,
) -> dict[str, dict[str, dict[str, float]]]:
    """Each global adapter's teacher quality on validation, threshold-free, keyed as ``globals_``.

    One teacher is loaded once; each global adapter is copied into it and scores the validation
    split (labels only report). The anomalous score is ``1 - accuracy``.
    """
    labels = [ls.label for ls in split.validation]
    texts = [ls.session.text for ls in split.validation]
    with clock("load_teacher"):
        model = rounds.load_teacher(cfg)
    quality: dict[str, dict[str, dict[str, float]]] = {}
    for row, states in globals_.items():
        for name, state in states.items():
            adapters.load_adapter_state(model.model, state)
            with clock("global_teacher_scoring"):
                accuracy = teacher.score_texts(model.model, model.tokenizer, texts, cfg.score, progress=False)
            report = metrics.binary_report(labels, 1.0 - np.asarray(accuracy), threshold=0.5)
            quality.setdefault(row, {})[name] = {"validation_roc_auc": round(report["roc_auc"], 4),
                                                 "validation_pr_auc": round(report["pr_auc"], 4)}
            log.info("global adapter %s/%s: %s", row, name, quality[row][name])
    return quality


# --------------------------------------------------------------------------- report


def table(cases: Sequence[dict[str, Any]], adapter: Mapping[str, Any]) -> str:
    """The Markdown tables docs/reliability.md shows."""
    lines = ["| client 4 sends | aggregation | flagged | purity normal / anomalous | teacher AUC "
             "| balanced test F1 (P / R) | natural-rate F1 (P / R) | false alarms per 10k |",
             "|---|---|---|---|---:|---|---|---:|"]
    for c in cases:
        p = c["pseudo_labels"]
        s = c.get("student")
        test = natural = alarms = "–"
        if s:
            t, n = s.get("test") or s["validation"], s.get("natural") or s.get("test") or s["validation"]
            test = f"{t['f1']:.3f} ({t['precision']:.3f} / {t['recall']:.3f})"
            natural = f"{n['f1']:.3f} ({n['precision']:.3f} / {n['recall']:.3f})"
            alarms = f"{n['false_alarms_per_10k']:.1f}"
        dropped = f" (drops {', '.join(c['dropped'])})" if c["dropped"] else ""
        lines.append(f"| {c['attack']} | {c['defence']}{dropped} | {', '.join(c['flagged']) or 'none'} "
                     f"| {p['purity_normal']:.3f} / {p['purity_anomalous']:.3f} | {p['teacher_auc_sessions']:.3f} "
                     f"| {test} | {natural} | {alarms} |")
    def auc(row: Mapping[str, Any], name: str) -> str:
        q = row["teacher_on_validation"][name]
        return f"teacher ROC-AUC {q['validation_roc_auc']:.3f}, PR-AUC {q['validation_pr_auc']:.3f}"

    lines += ["", "| client 4 uploads (declares 1e9 samples) | global vs honest-only average: no defence "
              "| with bounded weights + clipping |", "|---|---|---|"]
    for name in ("whole_adapter_x10", "update_x10"):
        row = adapter[name]
        lines.append(f"| {name} (itself: {row['hostile_itself']['rel_to_honest_norm']:.3f}) "
                     f"| {row['no_defence']['rel_to_honest_norm']:.3f} of its norm, "
                     f"{row['no_defence']['rel_to_honest_update']:.2f} of its update; {auc(row, 'no_defence')} "
                     f"| {row['defence']['rel_to_honest_norm']:.3f} of its norm, "
                     f"{row['defence']['rel_to_honest_update']:.2f} of its update; {auc(row, 'defence')} |")
    ref = adapter["all_five_honest"]
    lines.append(f"| honest client 4 (all five honest) | {ref['rel_to_honest_norm']:.3f} of its norm, "
                 f"{ref['rel_to_honest_update']:.2f} of its update | – |")
    lines.append(f"| (the honest clients' own average) | {auc(adapter['honest_only'], 'honest_only')} | – |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="hdfs-csv:../shared/data/hdfs", help="data source (real HDFS by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--students", default=",".join(STUDENT_CASES),
                        help="attack/defence cases that get a student, in priority order")
    parser.add_argument("--budget-min", type=float, default=25.0,
                        help="no new student starts after this many minutes of the whole run")
    parser.add_argument("--config", default=None, help="a profile instead of the guard recipe (smoke test: tiny)")
    parser.add_argument("--cache", type=Path, default=Path("runs/poisoning"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/poisoning.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    deadline = time.monotonic() + 60 * args.budget_min
    clock = PhaseClock()
    if args.config:
        cfg = load_config(args.config, {"data.n_clients": 5, "data.source": args.data}).model_copy(
            update={"seeds": [args.seed]})
    else:
        cfg = experiment_config(args.data, args.seed)
    source = resolve_source(cfg.data)
    with clock("data"):
        split = federation_split(cfg.data, args.seed, source)
    public_ref = PublicRef(digest=public_digest(split.public), count=len(split.public), path="in-process")
    run_id = f"poisoning-{args.seed}"
    uploads = honest_pass(cfg, split, public_ref, run_id, args.cache, clock)
    honest = {f"client-{c}": u.scores[cfg.score.top_k] for c, u in enumerate(uploads)}
    with clock("selection"):
        cases = payload_cases(cfg, split, public_ref, run_id, honest)
    with clock("adapters"):
        adapter, globals_ = scaled_adapter(uploads, initial_adapter(args.cache, cfg, public_ref))
    for row, quality in global_teacher_quality(cfg, split, globals_, clock).items():
        adapter.setdefault(row, {})["teacher_on_validation"] = quality
    result: dict[str, Any] = {
        "command": " ".join(["python", "scripts/poisoning.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(), "machine": machine(), "config": cfg.model_dump(mode="json"),
        "data_source": source, "clients": [len(s) for s in split.clients], "hostile": HOSTILE,
        "cases": cases, "scaled_adapter": adapter,
        "scaled_adapter_student": "not measured: a student after a poisoned FedAvg round needs a second "
                                  "teacher pass per client",
    }

    def save() -> None:
        result["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        shown = [{k: v for k, v in c.items() if k != "matrix"} for c in cases]
        atomic_write(args.out, json.dumps({**result, "cases": shown}, indent=2, default=str))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save()
    print(table(cases, adapter), flush=True)
    wanted = [c.strip() for c in args.students.split(",") if c.strip()]
    train_students(cfg, split, cases, wanted, deadline, clock, save)
    for case in cases:
        if f"{case['attack']}/{case['defence']}" in wanted and "student" not in case:
            case["student"] = None  # not trained: the time budget ran out first
    save()
    print(table(cases, adapter))
    print(f"\n{args.out}; {result['seconds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
