"""Does the raw-log path split HDFS exactly as the event-sequence path does? (issue 13, item 6)

The raw-vs-event measurement compares the F1 of a federation run on ``hdfs-csv:DIR`` with one on
the same sessions rendered as a raw ``HDFS.log`` and grouped back (``feddale logs render-hdfs``,
``feddale logs sessions``). That only compares the two paths if ``federation_split`` draws the
same sessions for every part from both data sets; it reads their order, labels and texts (ids
only to check they are distinct). Session ids differ by design: the raw log knows block ids,
tied back to ``sessions.csv`` rows by ``blocks.csv``. This script checks, without training,

* the data sets: same sessions (through ``blocks.csv``), in the same order, same labels, same texts;
* every part of the split (each client, public, validation, test, ...): same sessions in the same
  order, same texts and labels.

When everything is identical the simulator sees the same inputs on both paths, so the raw path's
F1 equals the event path's by construction. Cheap: a few seconds on all 33,693 sessions.

    feddale logs render-hdfs ../shared/data/hdfs --out /tmp/hdfs-raw
    feddale logs sessions /tmp/hdfs-raw/HDFS.log --preset hdfs \\
        --labels /tmp/hdfs-raw/anomaly_label.csv --out /tmp/hdfs-raw/sessions.jsonl
    python scripts/check_raw_split.py --events ../shared/data/hdfs --raw /tmp/hdfs-raw --config cpu --seed 0
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from feddale.data.deployment import federation_split
from feddale.data.sources import load_dataset
from feddale.data.types import Dataset, FederationSplit, LabeledSession, Session
from feddale.method.config import DataConfig, load_config

Item = tuple[str, str, int | None]  # (session id, text, label or None)


def block_map(raw_dir: Path) -> dict[str, str]:
    """``blocks.csv``: rendered block id -> the ``sessions.csv`` row it was rendered from."""
    with (raw_dir / "blocks.csv").open(newline="", encoding="utf-8") as handle:
        return {row["BlockId"]: row["session_id"] for row in csv.DictReader(handle)}


def _items(value: Any) -> list[Item]:
    """A split part (sessions, labeled sessions, or per-client tuples of them) as flat items."""
    items: list[Item] = []
    for entry in value:
        if isinstance(entry, LabeledSession):
            items.append((entry.session.id, entry.session.text, entry.label))
        elif isinstance(entry, Session):
            items.append((entry.id, entry.text, None))
        elif isinstance(entry, int):
            items.append(("", "", entry))  # public_labels
        else:
            items.extend(_items(entry))
    return items


def _parts(split: FederationSplit) -> dict[str, list[Item]]:
    parts: dict[str, list[Item]] = {}
    for field in dataclasses.fields(split):
        value = getattr(split, field.name)
        if field.name == "clients":
            parts.update({f"client-{i + 1}": _items(shard) for i, shard in enumerate(value)})
        else:
            parts[field.name] = _items(value)
    return parts


def _compare(event: list[Item], raw: list[Item], blocks: dict[str, str]) -> dict[str, int]:
    """How many positions differ in session (through blocks.csv), text and label."""
    return {
        "sessions": len(event),
        "raw_sessions": len(raw),
        "other_session": sum(e[0] != blocks.get(r[0], r[0]) for e, r in zip(event, raw)) + abs(len(event) - len(raw)),
        "other_text": sum(e[1] != r[1] for e, r in zip(event, raw)),
        "other_label": sum(e[2] != r[2] for e, r in zip(event, raw)),
    }


def _dataset_items(dataset: Dataset) -> list[Item]:
    labels = dataset.labels or (None,) * len(dataset.sessions)
    return [(s.id, s.text, label) for s, label in zip(dataset.sessions, labels)]


def compare(events: str, raw_dir: Path, data: DataConfig, seed: int) -> dict[str, dict[str, int]]:
    """Per data set and split part, what differs between the event spec and ``raw_dir/sessions.jsonl``."""
    raw_spec = f"jsonl:{raw_dir / 'sessions.jsonl'}"
    blocks = block_map(raw_dir)
    report = {"dataset": _compare(_dataset_items(load_dataset(events, seed=seed)),
                                  _dataset_items(load_dataset(raw_spec, seed=seed)), blocks)}
    event_parts = _parts(federation_split(data, seed, events))
    raw_parts = _parts(federation_split(data, seed, raw_spec))
    for name, items in event_parts.items():
        report[name] = _compare(items, raw_parts.get(name, []), blocks)
    return report


def identical(report: dict[str, dict[str, int]]) -> bool:
    return all(
        row["sessions"] == row["raw_sessions"] and not (row["other_session"] or row["other_text"] or row["other_label"])
        for row in report.values()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", default="hdfs-csv:../shared/data/hdfs", help="event-sequence data spec")
    parser.add_argument("--raw", required=True, type=Path, help="folder with sessions.jsonl and blocks.csv")
    parser.add_argument("--config", default="cpu", help="profile or config file whose data section splits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    events = args.events if ":" in args.events else f"hdfs-csv:{args.events}"
    report = compare(events, args.raw, load_config(args.config).data, args.seed)
    for name, row in report.items():
        print(f"{name:12} {json.dumps(row)}")
    same = identical(report)
    print("identical: the raw path's split and texts equal the event path's" if same
          else "DIFFERENT: the two paths do not see the same sessions")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
