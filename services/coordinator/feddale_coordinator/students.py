"""Which student detectors serve: promotion, pinning, rollback and the automatic promotion rule.

Publishing a student and serving it are separate steps. Detectors and client nodes follow the
*promoted* student (``GET /v1/students/current``), so an operator can go back to an earlier
student or hold a version while runs keep publishing, and a new student that looks worse than
the one serving is kept back. Each newly published student is decided on once:

- the first student ever is promoted;
- while the promotion is pinned, new students are held back;
- otherwise a student is promoted when its pseudo-label agreement (how far the teachers agree on
  the pseudo-labels it learned from, ``PseudoLabelSummary.agreement``; no labels) is at least the
  promoted student's minus FEDDALE_PROMOTION_MARGIN, and held back when it is lower.

The decision, with both numbers, is stored and logged. Promotions form a stack: rollback pops
the current version and serves the one promoted before it. All of it lives in Redis under one
lock, next to the rest of the coordinator's state, so a restarted coordinator serves what it did.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, Path

from feddale.protocol.messages import (
    SAFE_ID, PromotionDecision, PromotionEvent, ScheduleView, StudentEntry, StudentInfo, StudentsView,
)
from feddale.service.observability import Metrics

from feddale_coordinator.runs import ApiError
from feddale_coordinator.schedule import Scheduler, schedule_view
from feddale_coordinator.store import P, Store

log = logging.getLogger(__name__)

PROMOTED, STACK, PINNED = P + "student:promoted", P + "student:stack", P + "student:pinned"
DECISIONS, EVENTS = P + "student:decisions", P + "student:events"
EVENTS_KEPT = 200
STACK_KEPT = 100
VersionPath = Annotated[str, Path(pattern=SAFE_ID)]


def promotion_rule(
    agreement: float | None, current_version: str | None, current_agreement: float | None, margin: float,
    pinned: bool,
) -> tuple[bool, str]:
    """Whether a newly published student is promoted on its own, and why (the rule in the module doc)."""
    if current_version is None:
        return True, "first student"
    if pinned:
        return False, f"promotion is pinned to {current_version}"
    if agreement is None:
        return False, "its trainer reported no pseudo-label agreement to compare"
    if current_agreement is None:
        return True, f"{current_version} has no pseudo-label agreement to compare with"
    if agreement >= current_agreement - margin:
        return True, (f"agreement {agreement:.4f} is not worse than {current_version}'s "
                      f"{current_agreement:.4f} by more than {margin:g}")
    return False, (f"agreement {agreement:.4f} is worse than {current_version}'s {current_agreement:.4f} "
                   f"by more than {margin:g}")


class Lifecycle:
    """The promoted student, its history, and the decisions on newly published students."""

    def __init__(self, r: redis.Redis, store: Store, margin: float, metrics: Metrics) -> None:
        self.r, self.store, self.margin, self.metrics = r, store, margin, metrics
        metrics.describe("promotion_decisions_total", "newly published students promoted or held back, by outcome")
        metrics.describe("student_promotions_total", "changes of the promoted student, by action")
        metrics.info_fn("student_promoted_info", "the promoted student: what detectors should serve",
                        lambda: {"version": v} if (v := self.current_version()) else None)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with self.r.lock(P + "lock:students", timeout=15, blocking_timeout=15):
            yield

    # ----------------------------------------------------------------- reading

    def current_version(self) -> str | None:
        """The promoted version; before any decision (a coordinator upgraded with students), the latest."""
        raw = self.r.get(PROMOTED)
        if raw is not None:
            return raw.decode()
        latest = self.store.latest_student()
        return latest["version"] if latest else None

    def current(self) -> StudentInfo | None:
        version = self.current_version()
        info = self.store.student(version) if version else None
        return StudentInfo.model_validate(info) if info else None

    def pinned(self) -> bool:
        return bool(self.r.exists(PINNED))

    def decision(self, version: str) -> PromotionDecision | None:
        raw = self.r.hget(DECISIONS, version)
        return PromotionDecision.model_validate_json(raw) if raw else None

    def view(self) -> StudentsView:
        current = self.current_version()
        decisions = {k.decode(): PromotionDecision.model_validate_json(v) for k, v in self.r.hgetall(DECISIONS).items()}
        infos = sorted((StudentInfo.model_validate(json.loads(v)) for v in self.r.hvals(P + "students")),
                       key=lambda info: info.published_at, reverse=True)
        return StudentsView(
            current=current, pinned=self.pinned(), margin=self.margin,
            students=[StudentEntry(info=i, promoted=i.version == current, decision=decisions.get(i.version))
                      for i in infos],
            history=[PromotionEvent.model_validate_json(e) for e in self.r.lrange(EVENTS, 0, -1)],
        )

    # ----------------------------------------------------------------- deciding

    def decide(self, info: StudentInfo) -> PromotionDecision:
        """Decide once whether a newly published student is promoted (a repeat returns the first decision)."""
        with self._lock():
            earlier = self.decision(info.version)
            if earlier is not None:
                return earlier
            current = self.r.get(PROMOTED)
            current_version = current.decode() if current else None
            current_info = self.store.student(current_version) if current_version else None
            current_agreement = ((current_info or {}).get("pseudo_labels") or {}).get("agreement")
            agreement = info.pseudo_labels.agreement if info.pseudo_labels else None
            if current_version == info.version:
                promoted, reason = True, "already the promoted student"
            else:
                promoted, reason = promotion_rule(agreement, current_version, current_agreement, self.margin,
                                                  self.pinned())
            decision = PromotionDecision(
                version=info.version, at=time.time(), promoted=promoted, reason=reason, agreement=agreement,
                current_version=current_version, current_agreement=current_agreement, margin=self.margin,
            )
            self.r.hset(DECISIONS, info.version, decision.model_dump_json())
            if promoted and current_version != info.version:
                self._promote(info.version, current_version, "auto")
        self.metrics.inc("promotion_decisions_total", outcome="promoted" if promoted else "held_back")
        (log.info if promoted else log.warning)(
            "student %s (run %s) %s: %s", info.version, info.run_id, "promoted" if promoted else "held back", reason)
        return decision

    def reconcile(self) -> None:
        """Decide on the latest published student if no decision was stored (a coordinator that died in
        between, or one upgraded from before promotion existed)."""
        latest = self.store.latest_student()
        if latest is not None and not self.r.hexists(DECISIONS, latest["version"]):
            self.decide(StudentInfo.model_validate(latest))

    # ----------------------------------------------------------------- operating

    def promote(self, version: str, action: Literal["promote", "pin"] = "promote") -> StudentsView:
        """Serve ``version`` (any published student); ``pin`` also stops automatic promotion."""
        with self._lock():
            if self.store.student(version) is None:
                raise ApiError(404, f"unknown student version {version!r}")
            current = self.current_version()
            if action == "pin":
                self.r.set(PINNED, "1")
            if current != version or action == "pin":
                self._promote(version, current, action)
        log.info("student %s %s by the operator", version, "pinned" if action == "pin" else "promoted")
        return self.view()

    def unpin(self) -> StudentsView:
        """Let newly published students be promoted automatically again (the served one stays)."""
        with self._lock():
            if self.r.delete(PINNED) and (current := self.current_version()) is not None:
                self._event(PromotionEvent(version=current, previous=current, action="unpin", at=time.time()))
        log.info("student promotion unpinned")
        return self.view()

    def rollback(self) -> StudentsView:
        """Serve the student promoted before the current one (409 when there is none)."""
        with self._lock():
            stack = [v.decode() for v in self.r.lrange(STACK, 0, -1)]
            if len(stack) < 2:
                raise ApiError(409, "no earlier promoted student to roll back to")
            current, previous = stack[-1], stack[-2]
            pipe = self.r.pipeline()
            pipe.rpop(STACK)
            pipe.set(PROMOTED, previous)
            pipe.execute()
            self._event(PromotionEvent(version=previous, previous=current, action="rollback", at=time.time()))
        self.metrics.inc("student_promotions_total", action="rollback")
        log.warning("student rolled back from %s to %s", current, previous)
        return self.view()

    def _promote(self, version: str, previous: str | None, action: Literal["auto", "promote", "pin"]) -> None:
        """Make ``version`` the promoted student (caller holds the lock); the old one stays on the stack."""
        stack = [v.decode() for v in self.r.lrange(STACK, 0, -1)]
        pipe = self.r.pipeline()
        if previous is not None and not stack:  # served before promotion existed: keep it to roll back to
            pipe.rpush(STACK, previous)
        if not stack or stack[-1] != version:  # pinning the served student adds no step to roll back
            pipe.rpush(STACK, version)
            pipe.ltrim(STACK, -STACK_KEPT, -1)
        pipe.set(PROMOTED, version)
        pipe.execute()
        self._event(PromotionEvent(version=version, previous=previous, action=action, at=time.time()))
        self.metrics.inc("student_promotions_total", action=action)

    def _event(self, event: PromotionEvent) -> None:
        pipe = self.r.pipeline()
        pipe.rpush(EVENTS, event.model_dump_json())
        pipe.ltrim(EVENTS, -EVENTS_KEPT, -1)
        pipe.execute()


def students_router(
    lifecycle: Lifecycle, scheduler: Scheduler | None, r: redis.Redis,
    admin: Callable[..., None], principal: Callable[..., Any],
) -> APIRouter:
    """The promoted student for detectors and client nodes; listing, promotion and the schedule for the admin."""
    router = APIRouter()

    @router.get("/v1/students/current", response_model=StudentInfo, tags=["students"])
    def current_student(_: Any = Depends(principal)) -> StudentInfo:
        """The student to serve: the promoted one (404 before any student was published)."""
        info = lifecycle.current()
        if info is None:
            raise ApiError(404, "no student has been published yet")
        return info

    @router.get("/v1/students", response_model=StudentsView, tags=["admin"])
    def list_students(_: None = Depends(admin)) -> StudentsView:
        """Every published student (newest first) with its provenance and promotion decision, and the promotion state."""
        return lifecycle.view()

    @router.post("/v1/students/rollback", response_model=StudentsView, tags=["admin"])
    def rollback(_: None = Depends(admin)) -> StudentsView:
        """Serve the student promoted before the current one (409 when there is none)."""
        return lifecycle.rollback()

    @router.post("/v1/students/unpin", response_model=StudentsView, tags=["admin"])
    def unpin(_: None = Depends(admin)) -> StudentsView:
        """Promote newly published students automatically again (by the promotion rule)."""
        return lifecycle.unpin()

    @router.post("/v1/students/{version}/promote", response_model=StudentsView, tags=["admin"])
    def promote(version: VersionPath, _: None = Depends(admin)) -> StudentsView:
        """Serve this published student from the detectors' next poll on."""
        return lifecycle.promote(version)

    @router.post("/v1/students/{version}/pin", response_model=StudentsView, tags=["admin"])
    def pin(version: VersionPath, _: None = Depends(admin)) -> StudentsView:
        """Serve this student and hold back newly published ones until unpinned."""
        return lifecycle.promote(version, "pin")

    @router.get("/v1/schedule", response_model=ScheduleView, tags=["admin"])
    def schedule(_: None = Depends(admin)) -> ScheduleView:
        """FEDDALE_SCHEDULE's interval, when the next run is due, and what the last due runs did."""
        return schedule_view(r, scheduler)

    return router
