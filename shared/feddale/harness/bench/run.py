"""`feddale bench`: run the benchmark tables and write JSON, PNG plots and a Markdown report.

Tables 1, 2 and 4 (quality vs rounds, communication, ablation) come from one set of progressive
federations (``bench.quality``); table 3 (detection cost) times the student those federations
produced against teacher scoring (``bench.cost``). Each writes its own JSON, so a table can be
re-run alone (``--tables cost``) and the report is rebuilt from whatever JSON exists.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from feddale.files import atomic_write
from feddale.harness.bench import cost, quality, report
from feddale.harness.provenance import git_commit, machine
from feddale.method.config import RunConfig
from feddale.data.sources import load_dataset
from feddale.data.deployment import resolve_source

log = logging.getLogger(__name__)

TABLES = ("quality", "cost", "report")


def bench(
    cfg: RunConfig,
    out_dir: Path,
    *,
    seeds: Sequence[int],
    tables: Sequence[str] = TABLES,
    ablation_seeds: Sequence[int] = (),
    fresh: bool = False,
    progress: bool = True,
) -> Path:
    """Run the asked-for tables into ``out_dir``, sized by ``cfg.bench``; returns the report's path."""
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; choose from {list(TABLES)}")
    sizes = cfg.bench
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"git commit": git_commit(), "config": cfg.name, "machine": json.dumps(machine())}
    started = time.perf_counter()
    if "quality" in tables:
        quality.run_quality(cfg, out_dir, seeds, ablation_seeds, progress=progress, fresh=fresh)
    if "cost" in tables:
        first = sorted(set(sizes.rounds))[0]
        student = out_dir / "students" / f"student-seed{seeds[0]}-r{first}"
        if not student.is_dir():
            raise FileNotFoundError(f"{student} does not exist: run the quality table for seed {seeds[0]} first")
        log.info("detection cost: student %s against teacher scoring", student.name)
        dataset = load_dataset(resolve_source(cfg.data), seed=seeds[0])
        pool, public = cost.sample_sessions(dataset, 2000, 200, seed=seeds[0])
        result = cost.measure_cost(
            student, cfg.teacher_model, None, cfg.score, pool, public,
            quantization=cfg.quantization, n_student=sizes.cost_sessions, n_teacher=sizes.cost_teacher_sessions,
            repeats=sizes.cost_repeats, seed=seeds[0], progress=progress,
            labeled=cost.held_out_sessions(cfg, seeds[0]),  # the F1 of each runtime on the held-out split
        )
        result["git_commit"] = git_commit()
        result["config"] = cfg.model_dump(mode="json")
        atomic_write(out_dir / "cost.json", json.dumps(result, indent=2))
    header["seconds this invocation"] = round(time.perf_counter() - started, 1)
    return report.write_report(out_dir, header)
