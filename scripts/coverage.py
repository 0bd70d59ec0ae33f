"""Coverage ideas of the quality issue (14, item 3) measured on validation: student seeds, an ensemble, self-training.

The honest teacher pass of ``scripts/poisoning.py`` (5 clients, the regression guard's small
recipe, real weights, real HDFS; cached under ``--cache``, so no teacher is trained again when
that experiment already ran) gives one aggregated score matrix. On it:

- ``seed N``: the protocol's own student (``rounds.distil``) with student seed N, same
  pseudo-labels: how much of the spread in ``docs/quality.md`` §10 is the student's own training;
- ``ensemble``: the mean P(anomalous) of those students, cut by the same label-free rule
  (Otsu on the public set); a detector would run every member;
- ``self-training``: the seed-0 student relabels the public set (its most and least confident
  distinct texts, the same k per side) and a second student learns from that instead.

Each variant is judged on the balanced **validation** split (F1 re-weighted to HDFS's 2.9%, the
way ``docs/quality.md`` §9 judges threshold rules); the natural-rate split is reported beside it
and chooses nothing. Labels never reach training, selection or thresholds.

    .venv/bin/python scripts/coverage.py --data hdfs-csv:../shared/data/hdfs
    .venv/bin/python scripts/coverage.py --sample-by texts --out runs/coverage-texts.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from feddale.data.deployment import federation_split, public_digest, resolve_source
from feddale.data.types import FederationSplit, LabeledSession
from feddale.files import atomic_write
from feddale.harness.provenance import git_commit, machine
from feddale.harness.simulate import NATURAL_RATE, PhaseClock
from feddale.method import metrics
from feddale.method.detector import Detector
from feddale.method.threshold import decision_threshold
from feddale.protocol import rounds
from feddale.protocol.messages import PublicRef

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The same cached teacher pass as the poisoning experiment: same recipe, same clients.
from poisoning import experiment_config, honest_pass  # noqa: E402

log = logging.getLogger("coverage")


def scores_on(detectors: Sequence[Detector], part: Sequence[LabeledSession]) -> np.ndarray:
    """Mean P(anomalous) of ``detectors`` on each session of ``part`` (one detector: its own)."""
    return np.mean([d.predict_proba([ls.session.messages for ls in part]) for d in detectors], axis=0)


def judged(detectors: Sequence[Detector], split: FederationSplit, public_texts: Sequence[str]) -> dict[str, Any]:
    """Validation (the judge) and natural-rate (reported) figures at the label-free Otsu cut."""
    public = np.mean([rounds.public_probabilities(d, public_texts) for d in detectors], axis=0)
    cut = decision_threshold(public, "otsu")
    out: dict[str, Any] = {"threshold": round(cut, 4)}
    for name, part in (("validation", split.validation), ("natural", split.natural)):
        report = metrics.binary_report([ls.label for ls in part], scores_on(detectors, part), cut)
        keep = ("f1", "precision", "recall", "pr_auc", "roc_auc", "false_alarms_per_10k")
        out[name] = {k: (round(report[k], 4) if isinstance(report[k], float) else report[k]) for k in keep}
        if name == "validation":
            fpr = report["fp"] / max(1, report["fp"] + report["tn"])
            out[name]["f1_at_natural_rate"] = round(metrics.f1_at_rate(report["recall"], fpr, NATURAL_RATE), 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="hdfs-csv:../shared/data/hdfs")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (split, clients, teachers)")
    parser.add_argument("--student-seeds", default="0,1,2", help="student seeds; the first one self-trains")
    parser.add_argument("--cache", type=Path, default=Path("runs/poisoning"))
    parser.add_argument("--out", type=Path, default=Path("runs/coverage.json"))
    parser.add_argument("--sample-by", choices=("sessions", "texts"), default="sessions",
                        help="what one student training draw stands for (student.sample_by)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    clock = PhaseClock()
    cfg = experiment_config(args.data, args.seed)
    # The teacher pass's cache key leaves the student's section out, so this re-uses the pass.
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"sample_by": args.sample_by})})
    source = resolve_source(cfg.data)
    split = federation_split(cfg.data, args.seed, source)
    public_texts = [s.text for s in split.public]
    public_ref = PublicRef(digest=public_digest(split.public), count=len(split.public), path="in-process")
    run_id = f"poisoning-{args.seed}"
    uploads = honest_pass(cfg, split, public_ref, run_id, args.cache, clock)
    payloads = {f"client-{c}": u.scores[cfg.score.top_k] for c, u in enumerate(uploads)}
    matrix = rounds.score_matrix(payloads, digest=public_ref.digest, run_id=run_id, round_no=1, count=public_ref.count)
    result: dict[str, Any] = {
        "command": " ".join(["python", "scripts/coverage.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(), "machine": machine(), "data_source": source, "variants": {},
    }

    def record(name: str, detectors: Sequence[Detector], extra: Mapping[str, Any] | None = None) -> None:
        with clock("evaluate"):
            result["variants"][name] = {**judged(detectors, split, public_texts), **(extra or {})}
        result["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 1)}
        atomic_write(args.out, json.dumps(result, indent=2))
        log.info("%s: %s", name, json.dumps(result["variants"][name]))

    seeds = [int(s) for s in args.student_seeds.split(",")]
    members: list[Detector] = []
    for seed in seeds:
        with clock("student"):
            distilled = rounds.distil(cfg.model_copy(update={"seeds": [seed]}), public_texts, matrix)
        members.append(Detector(distilled.artifact))
        record(f"seed {seed}", members[-1:])
    if len(members) > 1:
        record("ensemble", members, {"members": len(members)})
    relabel = 1.0 - rounds.public_probabilities(members[0], public_texts)  # high = normal, as teacher scores
    with clock("student"):
        second = rounds.distil(cfg.model_copy(update={"seeds": seeds[:1]}), public_texts, relabel[None, :])
    record("self-training", [Detector(second.artifact)])
    print(json.dumps(result["variants"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
