"""Sessions from a fixed batch of log files, read start to finish.

Two callers need this and must agree to the letter: ``feddale logs sessions`` (which writes the
import ``--data jsonl:`` reads) and a coordinator whose public set is given as raw logs
(``FEDDALE_PUBLIC_LOGS`` + ``FEDDALE_PUBLIC_SOURCE``). One function for both is what makes the
coordinator's public texts equal what the command writes for the same files. A client node's
files are different: they grow while it runs, so it follows them (:mod:`feddale.ingest.node`).
"""

from __future__ import annotations

import glob
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from feddale.data.types import Dataset, Session
from feddale.ingest.parsing import LineParser
from feddale.ingest.reader import read_lines
from feddale.ingest.sessions import SessionBuilder
from feddale.ingest.sources import Source, load_source

_DOCUMENT_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Batch:
    """The sessions of a batch of files and the two summary lines the operator is shown."""

    dataset: Dataset
    lines: str  # lines read, parsed, not parsed and why
    grouping: str  # sessions made, lines in no session and why


def check_parsed(parser: LineParser, files: Sequence[str], hint: str) -> None:
    """An input with no line, or with no line in the format, is an error (``hint``: what to check)."""
    if parser.lines == 0:
        raise ValueError(f"no log lines in {', '.join(files)} (empty input)")
    if parser.counts["parsed"] == 0:
        raise ValueError(
            f"no line of {', '.join(files)} matches the format {parser.source.format!r} "
            f"({parser.summary()}); {hint}"
        )


def read_sessions(
    files: Sequence[str], source: Source, labels: dict[str, int] | None = None,
    hint: str = "wrong --preset or --source?",
) -> Batch:
    """Parse, mask and group ``files`` in the order given; errors name the input (ValueError,
    FileNotFoundError), also when no line forms a session."""
    parser = LineParser(source)
    builder = SessionBuilder(source, labels)
    for name in files:
        for raw in read_lines(name):
            builder.add(parser.parse(raw))
    check_parsed(parser, files, hint)
    dataset = builder.dataset()
    if not dataset.sessions:
        raise ValueError(f"no sessions in {', '.join(files)}: {builder.summary()}")
    return Batch(dataset, parser.summary(), builder.summary())


def named_source(spec: str) -> Source:
    """A source named by a setting: a source document (YAML/JSON) when ``spec`` is a path,
    else a preset by name (``hdfs``, ``openssh``, ...)."""
    from feddale.ingest.presets import preset

    path = Path(spec)
    if path.is_file() or path.suffix in _DOCUMENT_SUFFIXES or "/" in spec:
        return load_source(path)
    return preset(spec)


def expand_paths(patterns: str) -> list[str]:
    """Comma-separated paths or globs as files, in the order given, each glob's matches sorted by
    name (as a shell lists them). A glob matching no file is an error; a plain path is checked
    when it is read."""
    files: list[str] = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no file matches {pattern}")
            files.extend(matches)
        else:
            files.append(pattern)
    if not files:
        raise ValueError("names no file")
    return list(dict.fromkeys(files))


def sample_sessions(sessions: Sequence[Session], size: int, seed: int) -> tuple[Session, ...]:
    """At most ``size`` sessions: all of them, or a seeded uniform sample kept in log order, so
    the same files and seed always give the same sessions (and public-set digest)."""
    if len(sessions) <= size:
        return tuple(sessions)
    keep = sorted(random.Random(seed).sample(range(len(sessions)), size))
    return tuple(sessions[i] for i in keep)


def public_sessions(patterns: str, source: str, size: int, seed: int) -> tuple[tuple[Session, ...], str]:
    """A coordinator's public set from raw logs, and a line saying what was read and kept.

    The files are grouped exactly as ``feddale logs sessions`` groups them (labels, if the source
    has any, are not read); when that gives more than ``size`` sessions (the profile's
    ``data.public``, normal plus anomalous), :func:`sample_sessions` keeps ``size`` of them.
    All files are read into memory once, at start-up: give a sample of logs, not an archive.
    """
    batch = read_sessions(expand_paths(patterns), named_source(source), hint="wrong FEDDALE_PUBLIC_SOURCE?")
    sessions = sample_sessions(batch.dataset.sessions, size, seed)
    kept = f"{len(sessions)} of {len(batch.dataset.sessions)} sessions kept (seeded sample of {size})" \
        if len(sessions) < len(batch.dataset.sessions) else f"all {len(sessions)} sessions kept"
    return sessions, f"{batch.lines}; {batch.grouping}; {kept}"
