"""Detection-quality sweep: one teacher pass per client, many scoring/selection/student variants.

Teacher training and scoring dominate the cost on a CPU, and every session-score kind
(`mean`, `worst_message`, `mean_worst`) derives from the same per-message hit rates, so this
script trains and scores once per (seed, client), caches the per-message hit rates, and then
evaluates scoring kinds x aggregation filters x selection strategies on the cached numbers.
Students are trained only for the variants named with --students.

Labels: public-set labels are read only to report teacher AUC and purity; the validation split
picks among variants; the test split is reported, never used to choose.

    python scripts/quality_sweep.py --data hdfs-csv:../shared/data/hdfs --seeds 0 --out runs/sweep
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import time
from pathlib import Path

import numpy as np

from feddale.method import adapters, federation, metrics, models, teacher
from feddale.method.config import load_config, parse_override
from feddale.data.sources import load_dataset
from feddale.data.splits import make_split
from feddale.method.detector import Detector
from feddale.harness.simulate import teacher_diagnostics
from feddale.method.student import train_student

log = logging.getLogger("quality_sweep")
KINDS = ("mean", "worst_message", "worst_message_noend", "surprise", "surprise_noend", "mean_logp")


def session_scores(token_mean: np.ndarray, details: list[dict], kind: str) -> np.ndarray:
    """Session scores from one scoring pass, as teacher.score_texts would combine them.

    `*_noend` ignore the end-of-session marker (the last "message") when scoring.
    """
    if kind == "mean":
        return token_mean
    out = []
    for d in details:
        rates, logp = d["hit_rate"], d["logp"]
        if kind.endswith("_noend"):
            rates, logp = rates[:-1], logp[:-1]
        if kind.startswith("worst_message"):
            out.append(float(np.nanmin(rates)))
        elif kind.startswith("surprise"):
            out.append(teacher.surprise_score(float(np.nanmin(logp))))
        else:
            out.append(teacher.surprise_score(float(np.nanmean(logp))))
    return np.asarray(out)


def teacher_pass(cfg, split, seed: int, cache: Path) -> list[tuple[np.ndarray, list[dict]]]:
    """Per client: train its teacher on its private shard; token-mean accuracy and per-message details."""
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    base, tokenizer = models.load_causal_lm(cfg.teacher_model, cfg.quantization, seed=seed)
    model = models.add_lora(base, rank=cfg.teacher_lora_rank, task="causal")

    init = adapters.adapter_state(model)
    public = [s.text for s in split.public]
    per_client = []
    for client, shard in enumerate(split.clients):
        adapters.load_adapter_state(model, init)
        started = time.perf_counter()
        stats = teacher.train_teacher(
            model, tokenizer, [s.text for s in shard], cfg.teacher.model_copy(update={"seed": seed * 100 + client})
        )
        trained = time.perf_counter()
        score_cfg = cfg.score.model_copy(update={"kind": "mean"})
        per_message = teacher.score_texts(model, tokenizer, public, score_cfg, return_details=True)
        log.info(
            "seed %d client %d: train %.0f s (loss %.3f -> %.3f), score %.0f s",
            seed, client, trained - started, stats["loss_first"], stats["loss_last"],
            time.perf_counter() - trained,
        )
        per_client.append(per_message)
    cache.write_bytes(pickle.dumps(per_client))
    return per_client


def distil(cfg, sel, split, seed: int) -> dict:
    """Train the student on one selection; validation and test metrics."""
    artifact = train_student(
        sel.texts, sel.labels, cfg.student.model_copy(update={"seed": seed}), weights=sel.weights
    )
    detector = Detector(artifact)
    out = {}
    for part_name, part in (("validation", split.validation), ("test", split.test)):
        probs = detector.predict_proba([ls.session.messages for ls in part])
        out[part_name] = metrics.binary_report([ls.label for ls in part], probs, 0.5)
    log.info("seed %d: val F1 %.3f test F1 %.3f", seed, out["validation"]["f1"], out["test"]["f1"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--recipe", default="feddale", choices=["feddale", "paper"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--tag", default="", help="distinguishes teacher caches of different settings")
    parser.add_argument("--students", default="", help="variants to distil, e.g. worst_message/mean/distinct")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    overrides = dict(parse_override(item) for item in args.set)
    overrides["data.source"] = args.data
    cfg = load_config(args.config, overrides, recipe=args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        dataset = load_dataset(cfg.data.source, seed=seed)
        split = make_split(
            dataset, cfg.data.n_clients, public=cfg.data.public, test=cfg.data.test,
            validation=cfg.data.validation, client_anomaly_rate=cfg.data.client_anomaly_rate,
            partition=cfg.data.partition, max_client_sessions=cfg.data.max_client_sessions, seed=seed,
        )
        per_client = teacher_pass(cfg, split, seed, out / f"teacher-{cfg.name}-{cfg.recipe}{args.tag}-seed{seed}.pkl")
        public = [s.text for s in split.public]
        for kind in KINDS:
            matrix = np.stack([session_scores(mean, details, kind) for mean, details in per_client])
            for how in ("mean", "max", "rank_mean"):
                agg = federation.aggregate_scores(matrix, how)
                for strategy in ("plain", "distinct"):
                    sel = federation.select_pseudo_labels(agg, public, cfg.k_normal, cfg.k_anomalous, strategy)
                    diag = teacher_diagnostics(agg, public, split.public_labels, sel)
                    row = {"seed": seed, "kind": kind, "filter": how, "selection": strategy, **diag}
                    name = f"{kind}/{how}/{strategy}"
                    if name in args.students.split(","):
                        row.update(distil(cfg, sel, split, seed))
                    rows.append(row)
                    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(
            f"{row['seed']} {row['kind']:>13} {row['filter']:>9} {row['selection']:>8} "
            f"AUC {row['teacher_auc_sessions']:.3f}/{row['teacher_auc_distinct']:.3f} "
            f"purity A {row['purity_anomalous']:.2f} N {row['purity_normal']:.2f} "
            f"distinct A {row['selected_anomalous_distinct']} N {row['selected_normal_distinct']}"
            + (f" valF1 {row['validation']['f1']:.3f} testF1 {row['test']['f1']:.3f}" if "test" in row else "")
        )


if __name__ == "__main__":
    main()
