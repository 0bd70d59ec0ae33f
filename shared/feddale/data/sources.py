"""Naming a data set with one string, as configs and the command line do.

Specs:

* ``synthetic`` or ``synthetic:N_NORMAL,N_ANOMALOUS``: the seeded generator (default size fits
  :func:`feddale.data.splits.make_split`'s defaults with data to spare for the clients);
* ``hdfs-csv:DIR``: ``templates.csv`` + ``sessions.csv``;
* ``hdfs-raw:LOGFILE[,LABELFILE]``: a raw Loghub ``HDFS.log`` (+ ``anomaly_label.csv``);
* ``jsonl:PATH``: a prepared import (``sessions.jsonl``, or the folder holding it);
* a plain path: a folder with ``sessions.jsonl`` or ``sessions.csv``, a ``*.jsonl`` file or a
  ``*.log`` file.
"""

from __future__ import annotations

import os
from pathlib import Path

from feddale.data.hdfs import SESSIONS_JSONL, load_event_csv, load_raw_log, load_sessions_jsonl
from feddale.data.synthetic import generate
from feddale.data.types import Dataset

DEFAULT_SYNTHETIC = (12_000, 3_000)  # (normal, anomalous)
DATA_DIR_ENV = "FEDDALE_DATA_DIR"


def default_data_dir() -> Path:
    """Where ``feddale data fetch hdfs`` puts the prepared HDFS import."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "feddale" / "data" / "hdfs"


def default_source() -> str:
    """The prepared HDFS import if one exists, else the synthetic data set."""
    prepared = default_data_dir()
    if (prepared / SESSIONS_JSONL).is_file():
        return f"jsonl:{prepared}"
    return "synthetic"


def _synthetic(argument: str, seed: int) -> Dataset:
    if not argument:
        return generate(*DEFAULT_SYNTHETIC, seed=seed)
    parts = argument.split(",")
    try:
        n_normal, n_anomalous = (int(part) for part in parts)
    except ValueError:
        raise ValueError(
            f"synthetic spec wants 'synthetic:N_NORMAL,N_ANOMALOUS', got 'synthetic:{argument}'"
        ) from None
    return generate(n_normal, n_anomalous, seed=seed)


def _raw(argument: str) -> Dataset:
    log_path, _, label_path = argument.partition(",")
    return load_raw_log(log_path, label_path or None)


def _plain_path(spec: str) -> Dataset:
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / SESSIONS_JSONL).is_file():
            return load_sessions_jsonl(path)
        if (path / "sessions.csv").is_file():
            return load_event_csv(path)
        raise ValueError(f"{path} holds neither {SESSIONS_JSONL} nor sessions.csv")
    if path.is_file() and path.suffix == ".jsonl":
        return load_sessions_jsonl(path)
    if path.is_file() and path.suffix == ".log":
        return load_raw_log(path)
    raise ValueError(
        f"unknown data spec {spec!r}: expected synthetic[:N_NORMAL,N_ANOMALOUS], "
        "hdfs-csv:DIR, hdfs-raw:LOGFILE[,LABELFILE], jsonl:PATH, or an existing folder, "
        "*.jsonl or *.log file"
    )


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """Load the data set named by ``spec`` (see the module docstring); ``seed`` only
    matters for synthetic data."""
    kind, colon, argument = spec.partition(":")
    if kind == "synthetic":
        return _synthetic(argument, seed)
    if colon and not argument:
        raise ValueError(f"data spec {spec!r} names no path")
    if colon and kind == "hdfs-csv":
        return load_event_csv(argument)
    if colon and kind == "hdfs-raw":
        return _raw(argument)
    if colon and kind == "jsonl":
        return load_sessions_jsonl(argument)
    return _plain_path(spec)
