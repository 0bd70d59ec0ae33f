"""`feddale runs ...` and `feddale clients ...`: operate a running coordinator without curl.

Each command is a few lines over :class:`feddale.ops.client.Coordinator`; the coordinator's URL
comes from ``--url`` or ``FEDDALE_URL`` and the admin token from ``FEDDALE_ADMIN_TOKEN`` (never a
flag, so it stays out of shell history and process lists).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from feddale.method.config import parse_override
from feddale.ops.client import Coordinator
from feddale.protocol.messages import RunView


def _coordinator(args: argparse.Namespace) -> Coordinator:
    return Coordinator(url=args.url)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _start(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"mode": args.mode, "min_clients": args.min_clients}
    if args.rounds is not None:
        body["fedavg_rounds"] = args.rounds
    for key, value in (parse_override(item) for item in args.set):
        body[key] = value
    with _coordinator(args) as coordinator:
        created = coordinator.start_run(**body)
        print(created.run_id)
        if args.wait:
            return _follow(coordinator, created.run_id)
    return 0


def _follow(coordinator: Coordinator, run_id: str) -> int:
    """A live progress bar over the run's rounds and its student; exit 1 unless it is published."""
    bar = tqdm(total=None, desc=run_id, unit="step", dynamic_ncols=True)

    def show(view: RunView) -> None:
        bar.total = view.fedavg_rounds + 2  # the FedAvg rounds, the distillation round, the student
        bar.n = len(view.history) + (1 if view.status == "published" else 0)
        bar.set_postfix_str(f"{view.status} round {view.round} ({len(view.uploaded)}/{len(view.expected)} uploaded)")
        bar.refresh()

    view = coordinator.wait(run_id, on_change=show)
    bar.close()
    if view.status == "published":
        print(f"published student {view.student_version}")
        return 0
    print(f"run {run_id} {view.status}: {view.reason}")
    return 1


def _wait(args: argparse.Namespace) -> int:
    with _coordinator(args) as coordinator:
        return _follow(coordinator, args.run_id)


def _list(args: argparse.Namespace) -> int:
    with _coordinator(args) as coordinator:
        for run in coordinator.runs():
            print(f"{run['run_id']}  {run['status']:<16} {run['mode']:<9} round {run['round']}  "
                  f"{run.get('student_version') or ''}")
    return 0


def _show(args: argparse.Namespace) -> int:
    with _coordinator(args) as coordinator:
        _print(coordinator.run(args.run_id).model_dump(exclude={"config"} if not args.config else set()))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _coordinator(args) as coordinator:
        view = coordinator.cancel(args.run_id)
    print(f"run {view.run_id} {view.status}")
    return 0


def _clients(args: argparse.Namespace) -> int:
    """One line per node; "last seen" is how long ago its last heartbeat or request reached the coordinator."""
    with _coordinator(args) as coordinator:
        now = time.time()
        for client in coordinator.clients():
            alive = "alive" if client.get("alive") else "silent"
            seen = client.get("last_seen")
            ago = f"last seen {now - seen:.0f} s ago" if seen else "never seen"
            print(f"{client['client_id']}  {client['role']:<8} {client['name']:<24} shard {client.get('shard')}  {alive}  "
                  f"{ago}  joined by {client.get('joined_by', 'bootstrap')}")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    """The token goes to stdout alone (``TOKEN=$(feddale clients enroll NAME)``), the rest to stderr."""
    with _coordinator(args) as coordinator:
        enrollment = coordinator.enroll(args.name, args.role, args.ttl)
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(enrollment.expires_at))
    print(enrollment.token)
    print(f"one-time enrollment token for {enrollment.role} {enrollment.name!r}, valid until {expires}; "
          "give it to that node as FEDDALE_ENROLLMENT_TOKEN (it is not shown again)", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _coordinator(args) as coordinator:
        revoked = coordinator.revoke(args.name)
    what = revoked.client_id or "its pending enrollment"
    print(f"revoked {revoked.role} {revoked.name} ({what})")
    return 0


def url_option() -> argparse.ArgumentParser:
    """The ``--url`` option every operator command shares (a parent parser)."""
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--url", help="the coordinator (default $FEDDALE_URL, else http://127.0.0.1:8000); "
                                   "the admin token comes from $FEDDALE_ADMIN_TOKEN")
    return url


def add_operator_commands(sub: argparse._SubParsersAction) -> None:
    """Register `runs` and `clients` on the main parser."""
    url = url_option()

    runs = sub.add_parser("runs", help="start, watch, list, show and cancel federated runs")
    commands = runs.add_subparsers(dest="runs_command", required=True)
    start = commands.add_parser("start", parents=[url], help="start a run (prints its id)")
    start.add_argument("--mode", default="one_shot", choices=["one_shot", "few_shot"],
                       help="one_shot: distil at once; few_shot: FedAvg rounds first (default one_shot)")
    start.add_argument("--rounds", type=int, help="FedAvg rounds of a few_shot run (default 3)")
    start.add_argument("--min-clients", type=int, default=1, help="uploads a round needs to close (default 1)")
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other run field, e.g. --set filter=median --set k=100 (repeatable)")
    start.add_argument("--wait", action="store_true", help="then follow it like `runs wait`")
    start.set_defaults(func=_start)
    wait = commands.add_parser("wait", parents=[url], help="follow a run with a progress bar; exit 1 unless published")
    wait.add_argument("run_id")
    wait.set_defaults(func=_wait)
    listing = commands.add_parser("list", parents=[url], help="every run, newest last")
    listing.set_defaults(func=_list)
    show = commands.add_parser("show", parents=[url], help="one run's status as JSON")
    show.add_argument("run_id")
    show.add_argument("--config", action="store_true", help="include the run's full config")
    show.set_defaults(func=_show)
    cancel = commands.add_parser("cancel", parents=[url], help="end a run now (no more tasks; its student job cancelled)")
    cancel.add_argument("run_id")
    cancel.set_defaults(func=_cancel)

    clients = sub.add_parser("clients", help="list, enroll and revoke the coordinator's client nodes and detectors")
    client_commands = clients.add_subparsers(dest="clients_command", required=True)
    client_list = client_commands.add_parser("list", parents=[url], help="every registered node, with liveness")
    client_list.set_defaults(func=_clients)
    enroll = client_commands.add_parser("enroll", parents=[url],
                                        help="reserve NAME and print its one-time enrollment token (shown once)")
    enroll.add_argument("name")
    enroll.add_argument("--role", default="client", choices=["client", "detector"],
                        help="fixed by you, never by the node (default client; a detector can only pull students)")
    enroll.add_argument("--ttl", type=float, metavar="SECONDS",
                        help="the token expires unused after this (default: the coordinator's, 24 h)")
    enroll.set_defaults(func=_enroll)
    revoke = client_commands.add_parser("revoke", parents=[url],
                                        help="revoke NAME: its token stops working at once, the name can be enrolled again")
    revoke.add_argument("name")
    revoke.set_defaults(func=_revoke)
