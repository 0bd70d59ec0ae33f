"""Continuous operation: FEDDALE_SCHEDULE starts a run every interval, on its own.

A scheduled run is the default run request (``{"mode": "one_shot"}`` over the configured
profile), so it is the run an operator gets from ``feddale runs start``. When one is due and a
run is still active (scheduled or not), or no client node is alive, that slot is skipped, not
queued: the next run is due one interval later. Whether the resulting student is served is
the promotion rule's call (:mod:`feddale_coordinator.students`), not the schedule's.

The next due time lives in Redis, so restarting the coordinator neither fires a run at once
nor forgets one; a changed interval takes effect from the restart on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from feddale.protocol.messages import RunRequest, ScheduleEvent, ScheduleView
from feddale.service.observability import Metrics

from feddale_coordinator.runs import ApiError, RunEngine
from feddale_coordinator.store import P, Store

log = logging.getLogger(__name__)

NEXT_AT, INTERVAL, EVENTS = P + "schedule:next_at", P + "schedule:interval_s", P + "schedule:events"
EVENTS_KEPT = 50


class Scheduler:
    """Starts the default run whenever one is due (call :meth:`tick` from the coordinator's loop)."""

    def __init__(
        self, r: redis.Redis, store: Store, engine: RunEngine, interval_s: float, client_ttl_s: float,
        metrics: Metrics, clock: Callable[[], float] = time.time,
    ) -> None:
        self.r, self.store, self.engine, self.interval_s = r, store, engine, interval_s
        self.client_ttl_s, self.metrics, self.clock = client_ttl_s, metrics, clock
        metrics.describe("scheduled_runs_total", "runs the schedule was due to start, by outcome (started, skipped)")

    def tick(self) -> ScheduleEvent | None:
        """Start the default run if one is due; the event when one was due, else None."""
        now = self.clock()
        raw_next, raw_interval = self.r.mget(NEXT_AT, INTERVAL)
        if raw_next is None or raw_interval is None or float(raw_interval) != self.interval_s:
            # first start, or a new interval: the first run is one interval away, not at once
            self.r.mset({NEXT_AT: now + self.interval_s, INTERVAL: self.interval_s})
            return None
        if now < float(raw_next):
            return None
        self.r.set(NEXT_AT, now + self.interval_s)  # before starting: an error below never fires every tick
        event = self._start(now)
        pipe = self.r.pipeline()
        pipe.rpush(EVENTS, event.model_dump_json())
        pipe.ltrim(EVENTS, -EVENTS_KEPT, -1)
        pipe.execute()
        self.metrics.inc("scheduled_runs_total", outcome=event.outcome)
        (log.info if event.outcome == "started" else log.warning)("scheduled run %s: %s", event.outcome, event.reason)
        return event

    def _start(self, now: float) -> ScheduleEvent:
        active = self.store.active_run_id()
        if active is not None:
            return ScheduleEvent(at=now, outcome="skipped", run_id=active, reason=f"run {active} is still active")
        clients = {c.client_id for c in self.store.clients("client")}
        if not self.store.alive(self.client_ttl_s) & clients:
            return ScheduleEvent(at=now, outcome="skipped", reason="no client node is alive")
        try:
            run = self.engine.create(RunRequest(mode="one_shot"))
        except ApiError as exc:  # another run claimed the slot in between (409), or the profile is unusable
            return ScheduleEvent(at=now, outcome="skipped", reason=exc.message)
        return ScheduleEvent(at=now, outcome="started", run_id=run.run_id, reason="due")

    def view(self) -> ScheduleView:
        raw_next = self.r.get(NEXT_AT)
        return ScheduleView(
            interval_s=self.interval_s, next_at=float(raw_next) if raw_next else None,
            recent=[ScheduleEvent.model_validate_json(e) for e in self.r.lrange(EVENTS, 0, -1)],
        )


def schedule_view(r: redis.Redis, scheduler: Scheduler | None) -> ScheduleView:
    """What ``GET /v1/schedule`` answers: the scheduler's view, or its past events when it is off."""
    if scheduler is not None:
        return scheduler.view()
    return ScheduleView(interval_s=None, next_at=None,
                        recent=[ScheduleEvent.model_validate_json(e) for e in r.lrange(EVENTS, 0, -1)])
