"""The operator dashboard: `GET /ui` (a static page) and `GET /v1/ui/state` (everything it shows).

The page and its scripts are public and hold no data; the browser asks for the admin token in a
login form, keeps it in sessionStorage (gone with the tab) and sends it as a Bearer header on
each `GET /v1/ui/state`, which is checked like every admin endpoint. One request every 2 s
carries the whole picture (runs, clients, students, detectors), so the page never shows a run
from one moment next to clients from another. Everything is served from the package: no CDN,
the chart library (uPlot, MIT) is vendored with its license under `static/vendor/`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel

from feddale.protocol.messages import SAFE_ID, DetectorStats, PromotionDecision, RunView, StudentInfo, StudentsView

from feddale_coordinator.store import RunRecord, Store

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# The files the page may load, fixed when the module loads: a request names one of these or gets 404,
# so no path it sends reaches the filesystem.
FILES = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}
MEDIA = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
RUNS_SHOWN = 20


class RunSummary(BaseModel):
    run_id: str
    mode: str
    status: str
    round: int
    student_version: str | None
    created_at: float


class ClientRow(BaseModel):
    """One registered client node or detector with its liveness and what its last heartbeat said."""

    client_id: str
    name: str
    role: str
    shard: int | None
    registered_at: float
    alive: bool
    last_seen: float | None
    state: str | None
    software: str | None
    model_version: str | None
    sessions: int | None


class DetectorSample(DetectorStats):
    at: float


class DetectorRow(BaseModel):
    client_id: str
    name: str
    alive: bool
    model_version: str | None
    samples: list[DetectorSample]  # cumulative counters, oldest first: rates are their differences


class StudentRow(StudentInfo):
    promoted: bool  # the version detectors and client nodes are told to serve
    decision: PromotionDecision | None  # promoted automatically on publishing, or held back, and why
    served_by: list[str]  # detectors whose last heartbeat named this version


class DashboardState(BaseModel):
    now: float
    ttl_s: float
    runs: list[RunSummary]
    run: RunView | None  # the run asked for, else the active one, else the newest
    fedavg_adapter_bytes: int | None  # one teacher LoRA adapter (fp16): FedAvg's cost per client per round
    clients: list[ClientRow]
    students: list[StudentRow]
    pinned: bool  # automatic promotion is off until unpinned
    detectors: list[DetectorRow]


@functools.lru_cache(maxsize=16)
def adapter_bytes(teacher_model: str, rank: int) -> int | None:
    """Bytes of one fp16 teacher adapter, from the model's config alone (no weights are loaded).

    None when the model cannot be described here (e.g. a Hub id the coordinator has no copy of).
    """
    from feddale.method.models import lora_shapes

    try:
        shapes = lora_shapes(teacher_model, rank)
    except Exception as exc:  # any loader error only costs the comparison, never the dashboard
        log.warning("no FedAvg comparison for %s: %s", teacher_model, exc)
        return None
    return 2 * sum(math.prod(shape) for shape in shapes.values())


def ui_router(
    store: Store, ttl_s: float, admin: Callable[..., None], run_view: Callable[[RunRecord], RunView],
    students: Callable[[], StudentsView],
) -> APIRouter:
    router = APIRouter()

    @router.get("/ui", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @router.get("/ui/static/{name:path}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = FILES.get(name)
        if path is None:
            raise HTTPException(404, "no such file")
        return FileResponse(path, media_type=MEDIA.get(path.suffix, "text/plain"))

    @router.get("/v1/ui/state", response_model=DashboardState, tags=["admin"])
    def state(
        run: str | None = Query(None, pattern=SAFE_ID, description="the run to detail; default: active, else newest"),
        _: None = Depends(admin),
    ) -> DashboardState:
        """Everything the dashboard shows, in one consistent read."""
        records = [r for r in (store.run(i) for i in store.run_ids()) if r is not None]
        records.sort(key=lambda r: r.created_at, reverse=True)
        chosen = store.run(run) if run else None
        if chosen is None and records:
            active = store.active_run_id()
            chosen = next((r for r in records if r.run_id == active), records[0])
        fedavg = None
        if chosen is not None:
            teacher = chosen.config.get("teacher_model")
            rank = chosen.config.get("teacher_lora_rank")
            fedavg = adapter_bytes(teacher, rank) if isinstance(teacher, str) and isinstance(rank, int) else None

        alive, seen, statuses = store.alive(ttl_s), store.last_seen(), store.statuses()
        clients = [
            ClientRow(
                client_id=c.client_id, name=c.name, role=c.role, shard=c.shard, registered_at=c.registered_at,
                alive=c.client_id in alive, last_seen=seen.get(c.client_id),
                state=statuses.get(c.client_id, {}).get("state"),
                software=statuses.get(c.client_id, {}).get("software"),
                model_version=statuses.get(c.client_id, {}).get("model_version"),
                sessions=statuses.get(c.client_id, {}).get("sessions"),
            )
            for c in store.clients()
        ]
        detectors = [
            DetectorRow(
                client_id=c.client_id, name=c.name, alive=c.alive, model_version=c.model_version,
                samples=[DetectorSample(**b["detector"], at=b["at"]) for b in store.beats(c.client_id)
                         if b.get("detector")],
            )
            for c in clients if c.role == "detector"
        ]
        lifecycle = students()
        rows = [
            StudentRow(**entry.info.model_dump(), promoted=entry.promoted, decision=entry.decision,
                       served_by=[d.name for d in detectors if d.alive and d.model_version == entry.info.version])
            for entry in lifecycle.students
        ]
        return DashboardState(
            now=time.time(), ttl_s=ttl_s,
            runs=[RunSummary(run_id=r.run_id, mode=r.mode, status=r.status, round=r.round,
                             student_version=r.student_version, created_at=r.created_at)
                  for r in records[:RUNS_SHOWN]],
            run=run_view(chosen) if chosen is not None else None, fedavg_adapter_bytes=fedavg,
            clients=clients, students=rows, pinned=lifecycle.pinned, detectors=detectors,
        )

    return router

