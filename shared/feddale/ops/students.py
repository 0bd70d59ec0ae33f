"""`feddale students ...` and `feddale schedule`: which student detectors serve, and the run schedule.

Detectors and client nodes serve the *promoted* student and pick up a change at their next
poll. ``list`` and ``show`` print each student's provenance and the automatic promotion
decision with both agreement numbers; ``promote``, ``pin``, ``unpin`` and ``rollback`` change
what is served. Like `feddale runs`, the coordinator comes from ``--url`` or ``FEDDALE_URL`` and
the admin token from ``FEDDALE_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import time

from feddale.ops.client import ClientError, Coordinator
from feddale.ops.operate import url_option
from feddale.protocol.messages import PromotionDecision, StudentsView


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


def _decision(decision: PromotionDecision | None) -> str:
    if decision is None:
        return "no decision"
    return f"{'promoted' if decision.promoted else 'held back'}: {decision.reason}"


def _print_state(view: StudentsView) -> None:
    pinned = " (pinned: new students are held back)" if view.pinned else ""
    print(f"serving {view.current or 'nothing yet'}{pinned}")


def _list(args: argparse.Namespace) -> int:
    with Coordinator(url=args.url) as coordinator:
        view = coordinator.students()
    _print_state(view)
    for entry in view.students:
        info, labels = entry.info, entry.info.pseudo_labels
        agreement = f"{labels.agreement:.4f}" if labels and labels.agreement is not None else "-"
        print(f"{'*' if entry.promoted else ' '} {info.version}  {_when(info.published_at)}  {info.run_id}  "
              f"agreement {agreement}  {_decision(entry.decision)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    with Coordinator(url=args.url) as coordinator:
        view = coordinator.students()
    entry = next((e for e in view.students if e.info.version == args.version), None)
    if entry is None:
        raise ClientError(f"unknown student version {args.version!r} (see `feddale students list`)")
    print(json.dumps(entry.model_dump(mode="json", exclude={"info": {"score_histogram"}}), indent=2))
    return 0


def _change(args: argparse.Namespace) -> int:
    with Coordinator(url=args.url) as coordinator:
        if args.action in ("promote", "pin"):
            view = getattr(coordinator, args.action)(args.version)
        else:
            view = getattr(coordinator, args.action)()
    _print_state(view)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    with Coordinator(url=args.url) as coordinator:
        view = coordinator.schedule()
    if view.interval_s is None:
        print("no schedule (FEDDALE_SCHEDULE unset): runs start only on request")
    else:
        print(f"a run every {view.interval_s:g} s; next due {_when(view.next_at)}")
    for event in view.recent:
        print(f"{_when(event.at)}  {event.outcome:<8} {event.run_id or '':<16} {event.reason}")
    return 0


def add_student_commands(sub: argparse._SubParsersAction) -> None:
    """Register `students` and `schedule` on the main parser."""
    url = url_option()

    students = sub.add_parser(
        "students", help="published students: which one detectors serve, promote, pin, unpin, roll back",
        description="Detectors and client nodes serve the promoted student and follow a change at their next "
                    "poll (FEDDALE_STUDENT_POLL_S). A newly published student is promoted automatically unless "
                    "promotion is pinned or its pseudo-label agreement is lower than the served one's by more "
                    "than FEDDALE_PROMOTION_MARGIN (docs/operations.md).",
    )
    commands = students.add_subparsers(dest="students_command", required=True)
    listing = commands.add_parser("list", parents=[url],
                                  help="every student, newest first: * marks the served one; agreement and decision")
    listing.set_defaults(func=_list)
    show = commands.add_parser("show", parents=[url],
                               help="one student as JSON: provenance (run, config and data digests, commit), decision")
    show.add_argument("version", help="a student version from `feddale students list`")
    show.set_defaults(func=_show)
    promote = commands.add_parser("promote", parents=[url],
                                  help="serve VERSION (any published student); a pin stays as it is")
    promote.add_argument("version", help="a student version from `feddale students list`")
    promote.set_defaults(func=_change, action="promote")
    pin = commands.add_parser("pin", parents=[url],
                              help="serve VERSION and hold back newly published students until `unpin`")
    pin.add_argument("version", help="a student version from `feddale students list`")
    pin.set_defaults(func=_change, action="pin")
    unpin = commands.add_parser("unpin", parents=[url],
                                help="promote newly published students automatically again (the served one stays)")
    unpin.set_defaults(func=_change, action="unpin")
    rollback = commands.add_parser("rollback", parents=[url],
                                   help="serve the student promoted before the current one (error if none)")
    rollback.set_defaults(func=_change, action="rollback")

    schedule = sub.add_parser("schedule", parents=[url],
                              help="FEDDALE_SCHEDULE: how often runs start on their own, and what the last ones did")
    schedule.set_defaults(func=_schedule)
