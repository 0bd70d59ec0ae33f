"""``feddale logs bench-parse``: template quality on Loghub-2k, against stock Drain3, same run.

For every system folder of Loghub-2k (2,000 raw lines with ground-truth ``EventId`` and
``EventTemplate`` per line) the lines are split with the system's preset and the Content is fed
to two parsers, one after the other, in the same process:

* **ours**: :class:`~feddale.ingest.masking.Masker` then :class:`~feddale.ingest.templates.TemplateStore`
  with its one global setting;
* **stock Drain3**: ``drain3.TemplateMiner`` with its default settings (sim_th 0.4, depth 4) and
  generic masking of the kind its documentation suggests (IP addresses, hex, numbers).

Scores, per system and as the mean over systems:

* **grouping accuracy**: a line counts as correct when the set of lines that share its
  template id is exactly the set of lines that share its ground-truth ``EventId``. Ids are read
  once all lines are in (the standard batch reading); for ours the ids as they were handed out
  while streaming are scored too (``grouping_accuracy_streaming``).
* **parsing accuracy**: a line counts as correct when its template equals the ground-truth
  template after both are normalised the same way: ``/<*>`` becomes ``<*>`` (FedDALE's masks
  keep the root slash of an absolute path, as the HDFS templates do; Loghub's templates do
  not), whitespace runs become one space, and a run of wildcards separated only by spaces or
  punctuation (``<*>:<*>``, ``<*>.<*>``) becomes one ``<*>``. The rest is strict, so conventions
  still count against ours: the masks take every digit, also inside names (``jk2_init`` becomes
  ``jk<*>_init``), where the ground truth often keeps them.
* **lines per second**: masking and mining only (the line split is the same for both), on one
  core.
"""

from __future__ import annotations

import csv
import json
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drain3 import TemplateMiner
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

import feddale
from feddale.ingest.masking import Masker
from feddale.ingest.parsing import LineParser
from feddale.ingest.presets import LOGHUB_NAMES, preset
from feddale.ingest.reader import read_lines
from feddale.ingest.templates import MinerSettings, TemplateStore

_WILDCARD_RUN = re.compile(r"<\*>(?:[^\w<]*<\*>)+")
# Generic masking for stock Drain3: whole-token IPv4 addresses, hex and numbers, as Drain3's
# documentation suggests for logs it knows nothing about.
_STOCK_MASKS = (
    (r"((?<=[^A-Za-z0-9])|^)(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})((?=[^A-Za-z0-9])|$)", "IP"),
    (r"((?<=[^A-Za-z0-9])|^)(0x[a-fA-F0-9]+)((?=[^A-Za-z0-9])|$)", "HEX"),
    (r"((?<=[^A-Za-z0-9])|^)([0-9a-f]{6,} ?){3,}((?=[^A-Za-z0-9])|$)", "SEQ"),
    (r"((?<=[^A-Za-z0-9])|^)([\-\+]?\d+)((?=[^A-Za-z0-9])|$)", "NUM"),
)


def repo_root() -> Path:
    """The checkout this package runs from (``shared/feddale`` lives two levels below it)."""
    return Path(feddale.__file__).resolve().parents[2]


def default_data_dir() -> Path:
    return repo_root().parent / "shared" / "data" / "loghub-2k"


def normalise(template: str) -> str:
    """A template in the form parsing accuracy compares (see the module docstring)."""
    text = " ".join(template.replace("/<*>", "<*>").replace("<*>", " <*> ").split())
    text = _WILDCARD_RUN.sub("<*>", text)
    return re.sub(r"\s*<\*>\s*", "<*>", text)


def grouping_accuracy(predicted: list[Any], truth: list[str]) -> float:
    """Share of lines whose predicted group is exactly their ground-truth group."""
    groups: dict[Any, list[int]] = {}
    for index, label in enumerate(predicted):
        groups.setdefault(label, []).append(index)
    truth_sizes: dict[str, int] = {}
    for label in truth:
        truth_sizes[label] = truth_sizes.get(label, 0) + 1
    correct = 0
    for members in groups.values():
        labels = {truth[i] for i in members}
        if len(labels) == 1 and truth_sizes[truth[members[0]]] == len(members):
            correct += len(members)
    return correct / len(truth)


def parsing_accuracy(predicted: list[str], truth: list[str]) -> float:
    return sum(normalise(p) == normalise(t) for p, t in zip(predicted, truth)) / len(truth)


@dataclass(frozen=True)
class System:
    """One Loghub-2k system: each line's Content and its ground truth."""

    name: str
    contents: list[str]
    event_ids: list[str]
    templates: list[str]
    unparsed: int


def load_system(folder: Path, preset_name: str) -> System:
    name = folder.name
    source = preset(preset_name)
    parser = LineParser(source)
    contents = []
    for raw in read_lines(folder / f"{name}_2k.log"):
        parsed = parser.parse(raw)
        contents.append(parsed.content if parsed.fields else (raw.text or ""))
    with (folder / f"{name}_2k.log_structured.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) != len(contents):
        raise ValueError(f"{folder}: {len(contents)} log lines but {len(rows)} ground-truth rows")
    return System(
        name, contents, [r["EventId"] for r in rows], [r["EventTemplate"] for r in rows], parser.unparsed
    )


def run_ours(system: System, settings: MinerSettings) -> dict[str, Any]:
    masker = Masker(preset(system.name).mask_patterns)
    store = TemplateStore(settings)
    start = time.perf_counter()
    masked = [masker(content) for content in system.contents]
    matches = [store.add(text) for text in masked]
    seconds = time.perf_counter() - start
    final = [store.resolve(m.cluster_id, text) for m, text in zip(matches, masked)]
    return {
        "grouping_accuracy": grouping_accuracy([m.template_id for m in final], system.event_ids),
        "grouping_accuracy_streaming": grouping_accuracy([m.template_id for m in matches], system.event_ids),
        "parsing_accuracy": parsing_accuracy([m.template for m in final], system.templates),
        "templates": len({m.template_id for m in final}),
        "seconds": seconds,
        "lines_per_second": len(masked) / seconds,
    }


def run_stock(system: System) -> dict[str, Any]:
    config = TemplateMinerConfig()  # Drain3's defaults: sim_th 0.4, depth 4
    config.masking_instructions = [MaskingInstruction(p, m) for p, m in _STOCK_MASKS]
    config.mask_prefix, config.mask_suffix = "<:", ":>"
    miner = TemplateMiner(config=config)
    start = time.perf_counter()
    ids = [miner.add_log_message(content)["cluster_id"] for content in system.contents]
    seconds = time.perf_counter() - start
    # Stock templates spell masked values <:NUM:> and Drain wildcards <*>; both are variables.
    templates = {
        cid: re.sub(r"<:[A-Z]+:>", "<*>", cluster.get_template())
        for cid, cluster in miner.drain.id_to_cluster.items()
    }
    return {
        "grouping_accuracy": grouping_accuracy(ids, system.event_ids),
        "parsing_accuracy": parsing_accuracy([templates[i] for i in ids], system.templates),
        "templates": len(set(ids)),
        "seconds": seconds,
        "lines_per_second": len(ids) / seconds,
    }


def bench_parse(data_dir: Path, settings: MinerSettings | None = None) -> dict[str, Any]:
    """Score every Loghub-2k system found in ``data_dir``; return the report as a dict."""
    settings = settings or MinerSettings()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Loghub-2k folder not found: {data_dir}")
    by_folder = {folder: key for key, folder in LOGHUB_NAMES.items()}
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and p.name in by_folder)
    if not folders:
        raise ValueError(f"{data_dir} holds no Loghub-2k system folder ({', '.join(sorted(by_folder))})")
    rows = []
    for folder in folders:
        system = load_system(folder, by_folder[folder.name])
        rows.append({
            "system": folder.name,
            "lines": len(system.contents),
            "unparsed_lines": system.unparsed,
            "ground_truth_templates": len(set(system.event_ids)),
            "ours": run_ours(system, settings),
            "stock_drain3": run_stock(system),
        })
    return {"settings": settings.model_dump(), "summary": _summary(rows), "systems": rows,
            "machine": {"python": platform.python_version(), "processor": platform.machine()}}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"systems": len(rows), "lines": sum(r["lines"] for r in rows)}
    for side in ("ours", "stock_drain3"):
        seconds = sum(r[side]["seconds"] for r in rows)
        summary[side] = {
            metric: statistics.fmean(r[side][metric] for r in rows)
            for metric in ("grouping_accuracy", "parsing_accuracy")
        }
        summary[side]["lines_per_second"] = summary["lines"] / seconds
    summary["ours"]["grouping_accuracy_streaming"] = statistics.fmean(
        r["ours"]["grouping_accuracy_streaming"] for r in rows
    )
    summary["throughput_ratio"] = summary["ours"]["lines_per_second"] / summary["stock_drain3"]["lines_per_second"]
    return summary


def write_report(report: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what docs/ingest.md shows)."""
    lines = [
        "| system | grouping acc. (ours) | grouping acc. (stock Drain3) | parsing acc. (ours) | "
        "parsing acc. (stock) | templates: truth / ours / stock |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["systems"]:
        ours, stock = r["ours"], r["stock_drain3"]
        lines.append(
            f"| {r['system']} | {ours['grouping_accuracy']:.3f} | {stock['grouping_accuracy']:.3f} | "
            f"{ours['parsing_accuracy']:.3f} | {stock['parsing_accuracy']:.3f} | "
            f"{r['ground_truth_templates']} / {ours['templates']} / {stock['templates']} |"
        )
    s = report["summary"]
    lines.append(
        f"| **mean** | **{s['ours']['grouping_accuracy']:.3f}** | {s['stock_drain3']['grouping_accuracy']:.3f} | "
        f"{s['ours']['parsing_accuracy']:.3f} | {s['stock_drain3']['parsing_accuracy']:.3f} | |"
    )
    lines.append("")
    lines.append(
        f"Lines per second (masking + mining, one core): ours {s['ours']['lines_per_second']:,.0f}, "
        f"stock Drain3 {s['stock_drain3']['lines_per_second']:,.0f} "
        f"(ratio {s['throughput_ratio']:.2f}). Streaming ids (as handed out, before the last line): "
        f"mean grouping accuracy {s['ours']['grouping_accuracy_streaming']:.3f}."
    )
    return "\n".join(lines)
