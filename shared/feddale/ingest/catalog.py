"""The sources file (``FEDDALE_SOURCES``): which systems' logs a node reads, and from where.

A YAML or JSON list; each item is a source document (:mod:`feddale.ingest.sources`, so
``preset: hdfs`` works) plus ``paths``, the files it follows (globs; ``.gz`` archives too)::

    - preset: hdfs
      paths: ["/var/log/hadoop/hdfs/*.log", "/var/log/hadoop/hdfs/*.log.*.gz"]
    - name: myapp
      format: "<Date> <Time> <Level> <Content>"
      key: "order=(\\d+)"
      paths: [myapp/*.log]            # relative: to the sources file's folder
      max_sessions: 2000              # what a client node keeps (default 5,000)

A client node follows the ``paths``; a detector reads the same file only for the sources
(its lines arrive over HTTP), so ``paths`` may be left out there. Everything is checked when
the file is read, so a typo is one start-up error, not a node that silently reads nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from feddale.ingest.sources import Source, build_source
from feddale.ingest.store import MAX_SESSIONS


@dataclass(frozen=True)
class SourceEntry:
    """One source of the file and the path globs (absolute) its lines come from."""

    source: Source
    paths: tuple[str, ...]
    max_sessions: int = MAX_SESSIONS  # what a client node keeps of this source (the oldest go first)


def _paths(value: Any, where: str, base: Path) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) and p.strip() for p in items):
        raise ValueError(f"{where}: paths must be a list of file paths or globs")
    return tuple(str(base / p) if not Path(p).is_absolute() else p for p in items)


def parse_sources(document: Any, where: str, base: Path) -> list[SourceEntry]:
    """Entries from a parsed sources document (a list of source documents with ``paths``)."""
    if not isinstance(document, list) or not document:
        raise ValueError(f"{where}: expected a non-empty list of sources (- preset: hdfs\\n  paths: [...])")
    entries: list[SourceEntry] = []
    for number, item in enumerate(document, start=1):
        label = f"{where} source {number}"
        if not isinstance(item, dict):
            raise ValueError(f"{label}: expected a mapping, got {type(item).__name__}")
        settings = dict(item)
        paths = _paths(settings.pop("paths", []), label, base)
        keep = settings.pop("max_sessions", MAX_SESSIONS)
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"{label}: max_sessions must be a whole number of at least 1, got {keep!r}")
        entries.append(SourceEntry(build_source(settings, label), paths, keep))
    names = [e.source.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{where}: source name(s) {twice} used more than once; give each its own name")
    return entries


def load_sources(path: str | Path) -> list[SourceEntry]:
    """Read a sources file (YAML, or JSON by a ``.json`` suffix); relative paths are to its folder."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sources file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
        document = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{file}: not a YAML/JSON sources file ({str(error).splitlines()[0]})") from None
    return parse_sources(document, str(file), file.resolve().parent)


def check_sources_file(path: str | None) -> str | None:
    """A settings validator: the sources file must read, so a typo stops a service at start-up
    with one line (``FEDDALE_SOURCES: ...``) instead of a traceback or a node that reads nothing."""
    if path:
        try:
            load_sources(path)
        except (OSError, ValueError) as error:
            raise ValueError(str(error)) from None
    return path
