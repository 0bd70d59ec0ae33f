"""``feddale logs``: raw logs of any system in (parse, sessions, bench-parse, render-hdfs).

Registered on the main command line by :func:`add_logs_commands`; every command reports bad
input as one line (``feddale: error: ...``, exit 2) through the main CLI's handler, so errors
here are raised as ValueError or FileNotFoundError with a message that names the input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from feddale.ingest.parsing import LineParser, ParsedLine
from feddale.ingest.reader import read_lines
from feddale.ingest.sources import Source, load_source, source_from_format


def _source(args: argparse.Namespace) -> Source:
    from feddale.ingest.presets import preset

    if getattr(args, "preset", None):
        return preset(args.preset)
    if getattr(args, "format", None) is not None:
        return source_from_format(args.format)
    return load_source(args.source)


def _parsed(files: list[str], parser: LineParser) -> Iterator[ParsedLine]:
    for name in files:
        for raw in read_lines(name):
            yield parser.parse(raw)


def _check_counts(parser: LineParser, files: list[str]) -> None:
    """Say what was read on stderr; an input with no line, or with no line in the format, is an error."""
    from feddale.ingest.batch import check_parsed

    check_parsed(parser, files, "wrong --preset or --format?")
    print(f"feddale logs: {parser.summary()}", file=sys.stderr)


@contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    """Standard output, or a file written through a temporary name and renamed when complete."""
    if path is None or path == "-":
        yield sys.stdout
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.", delete=False
    )
    try:
        with handle:
            yield handle
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _parse(args: argparse.Namespace) -> int:
    from feddale.ingest.templates import TemplateStore

    source = _source(args)
    parser = LineParser(source)
    store = TemplateStore(state_dir=Path(args.state) / source.name if args.state else None)
    several = len(args.files) > 1
    with _output(args.out) as out:
        for line in _parsed(args.files, parser):
            record: dict[str, object] = {"line": line.raw.number}
            if several:
                record["file"] = line.raw.path
            if line.masked is None:
                record.update(fields=None, template_id=None, template=None, masked=None, unparsed=line.problem)
            else:
                match = store.add(line.masked)
                record.update(
                    fields=line.fields, template_id=match.template_id, template=match.template, masked=line.masked
                )
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        _check_counts(parser, args.files)
    store.save()
    print(f"feddale logs: {store.template_count} templates", file=sys.stderr)
    return 0


def _sessions(args: argparse.Namespace) -> int:
    from feddale.data.hdfs import read_block_labels, write_sessions_jsonl
    from feddale.ingest.batch import read_sessions

    labels = read_block_labels(args.labels) if args.labels else None
    batch = read_sessions(args.files, _source(args), labels)
    print(f"feddale logs: {batch.lines}", file=sys.stderr)
    write_sessions_jsonl(batch.dataset, args.out)
    print(f"feddale logs: {batch.grouping} -> {args.out}", file=sys.stderr)
    return 0


def _bench_parse(args: argparse.Namespace) -> int:
    from feddale.ingest.bench_parse import bench_parse, default_data_dir, repo_root, table, write_report

    data = Path(args.dir) if args.dir else default_data_dir()
    report = bench_parse(data)
    out = Path(args.out) if args.out else repo_root() / "docs" / "results" / "parsing.json"
    write_report(report, out)
    print(table(report))
    print(f"report: {out}")
    return 0


def _render_hdfs(args: argparse.Namespace) -> int:
    from feddale.ingest.render_hdfs import render_hdfs

    written = render_hdfs(Path(args.dir), Path(args.out), limit=args.limit, seed=args.seed)
    print(f"feddale logs: {written.lines} lines, {written.sessions} sessions -> {written.log}, {written.labels}",
          file=sys.stderr)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from feddale.ingest.presets import PRESETS

    for name, settings in PRESETS.items():
        grouping = f"key {settings['key']}" if "key" in settings else (
            f"window {settings['window']['seconds']:g}s by {settings['window']['by'] or '-'}"
        )
        print(f"{name:12} {grouping:28} {settings['format']}")
    return 0


Command = Callable[[argparse.Namespace], int]


def _guarded(command: Command) -> Command:
    """OS errors other than a missing file (permissions, a full disk, a closed pipe) become
    the one-line errors the main CLI prints, instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except FileNotFoundError:
            raise
        except BrokenPipeError:
            return 0
        except OSError as error:
            raise ValueError(f"{error.filename or 'input/output'}: {error.strerror or error}") from None

    return run


def add_logs_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``feddale logs ...`` on the main CLI's subcommands."""
    logs = sub.add_parser("logs", help="raw logs of any system: parse, sessions, parsing benchmark")
    cmds = logs.add_subparsers(dest="logs_command", required=True)

    def source_options(command: argparse.ArgumentParser, allow_format: bool) -> None:
        group = command.add_mutually_exclusive_group(required=True)
        group.add_argument("--preset", help="built-in source by system name (feddale logs presets)")
        if allow_format:
            group.add_argument("--format", help="line format in Loghub notation, e.g. '<Date> <Time> <Level> <Content>'")
        group.add_argument("--source", help="source document (YAML/JSON)")

    parse = cmds.add_parser("parse", help="lines -> JSON Lines with fields, template id, template, masked text")
    parse.add_argument("files", nargs="+", metavar="FILE", help="log files (.gz too; - for standard input)")
    source_options(parse, allow_format=True)
    parse.add_argument("--out", help="output file (default: standard output)")
    parse.add_argument("--state", help="folder for template state, kept per source so ids stay stable across runs")
    parse.set_defaults(func=_guarded(_parse))

    sessions = cmds.add_parser("sessions", help="lines -> sessions.jsonl (what --data jsonl:PATH reads)")
    sessions.add_argument("files", nargs="+", metavar="FILE", help="log files (.gz too; - for standard input)")
    source_options(sessions, allow_format=False)
    sessions.add_argument("--out", required=True, help="sessions.jsonl to write")
    sessions.add_argument("--labels", help="CSV of session key,label (Loghub anomaly_label.csv: BlockId,Label)")
    sessions.set_defaults(func=_guarded(_sessions))

    bench = cmds.add_parser("bench-parse", help="grouping/parsing accuracy on Loghub-2k vs stock Drain3")
    bench.add_argument("dir", nargs="?", help="Loghub-2k folder (default ../shared/data/loghub-2k beside the checkout)")
    bench.add_argument("--out", help="report JSON (default docs/results/parsing.json in the checkout)")
    bench.set_defaults(func=_guarded(_bench_parse))

    render = cmds.add_parser("render-hdfs", help="HDFS event sequences (sessions.csv + templates.csv) -> raw HDFS.log")
    render.add_argument("dir", help="folder with sessions.csv and templates.csv")
    render.add_argument("--out", required=True, help="folder for HDFS.log and anomaly_label.csv")
    render.add_argument("--limit", type=int, help="render only the first N sessions")
    render.add_argument("--seed", type=int, default=0)
    render.set_defaults(func=_guarded(_render_hdfs))

    presets = cmds.add_parser("presets", help="list the built-in sources")
    presets.set_defaults(func=_presets)
