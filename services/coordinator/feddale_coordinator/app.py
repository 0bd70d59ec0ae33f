"""The coordinator's HTTP API (FastAPI): admin, client, detector and student-job endpoints.

Who may call what:
- admin (FEDDALE_ADMIN_TOKEN): start and inspect runs, list clients, enroll and revoke nodes;
- a node holding a one-time enrollment token (issued by the admin for one name and role), or
  the bootstrap secret when one is configured (new names only): register, receiving a
  per-principal token (stored hashed); a node's own token re-registers only itself;
- client nodes: poll tasks, download the public set and global adapters, upload adapters and
  accuracy payloads, download students;
- detectors: download students;
- the student job (a per-run token carried in the RQ job): read its inputs, publish the student.
Bytes that cross HTTP on behalf of a run (uploads, public set, adapters, student) are counted
per client from the actual body sizes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from feddale.method.config import load_config
from feddale.data.deployment import federation_split
from feddale.ingest.batch import public_sessions
from feddale.protocol.messages import (
    CLIENT_NAME, SAFE_ID, ClientView, Enrollment, EnrollRequest, RegisterRequest, Registration, Revocation,
    RunCreated, RunRequest, RunView, StudentInfo, StudentInputs, TaskResponse, UploadAccepted,
)
from feddale.service.auth import bearer_token, secret_matches
from feddale.service.limits import limit_bodies, read_body
from feddale.service.observability import Metrics, add_ops_routes
from feddale.service.queue import student_queue

from feddale_coordinator.artifacts import ArtifactStore
from feddale_coordinator.liveness import liveness_router
from feddale_coordinator.runs import ApiError, PublicSet, RunEngine
from feddale_coordinator.schedule import Scheduler
from feddale_coordinator.store import FINAL
from feddale_coordinator.students import Lifecycle, students_router
from feddale_coordinator.settings import Settings
from feddale_coordinator.store import ClientRecord, Refused, RunRecord, Store
from feddale_coordinator.ui import ui_router

log = logging.getLogger(__name__)

OCTET = "application/octet-stream"
# Upload endpoints read their body themselves (streamed, size-capped); declare it in the OpenAPI
# document so clients and schema-driven fuzzers know a binary body is expected.
BINARY_BODY = {"requestBody": {"required": True, "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}}}
POLL_IDLE_S = 2.0
POLL_BUSY_S = 0.5
SafeId = Annotated[str, Path(pattern=SAFE_ID)]
Digest = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
Round = Annotated[int, Path(ge=0, le=10_000)]
ClientName = Annotated[str, Path(min_length=1, max_length=128, pattern=CLIENT_NAME)]


def _public_set(settings: Settings, artifacts: ArtifactStore) -> tuple[Any, PublicSet]:
    """The public part of the data split, or the raw logs FEDDALE_PUBLIC_LOGS names (then no split
    is loaded here). Raw input the settings could not check unread (an empty file, no line in the
    format, no session) stops start-up with one line, like a bad variable."""
    cfg = load_config(settings.config)
    if settings.public_logs and settings.public_source:
        try:
            sessions, read = public_sessions(settings.public_logs, settings.public_source,
                                             sum(cfg.data.public), cfg.seeds[0])
        except (OSError, ValueError) as error:
            raise SystemExit(f"cannot build the public set from FEDDALE_PUBLIC_LOGS: {error}") from None
        log.info("public set from raw logs: %s", read)
    else:
        sessions = federation_split(cfg.data, cfg.seeds[0], settings.data).public
    public = PublicSet.build(sessions)
    artifacts.write(("public", f"{public.digest}.json"), public.blob)
    log.info("public set %s: %d sessions", public.digest[:12], len(public.sessions))
    return cfg, public


def create_app(settings: Settings, redis_client: redis.Redis | None = None) -> FastAPI:
    """Build the app; the public set is derived and written to the artifact store at startup."""
    # Socket timeouts: a Redis that hangs (paused, partitioned) must turn into 503s and a
    # not-ready probe, not into requests that never return. The coordinator issues no blocking
    # Redis commands, so no legitimate call waits anywhere near this long.
    r = redis_client or redis.Redis.from_url(settings.redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    store = Store(r)
    artifacts = ArtifactStore(settings.artifact_dir)
    metrics = Metrics("feddale_coordinator")
    cfg, public = _public_set(settings, artifacts)
    lifecycle = Lifecycle(r, store, settings.promotion_margin, metrics)
    engine = RunEngine(
        store, artifacts, cfg, public, student_queue(r), metrics,
        client_ttl_s=settings.client_ttl_s, max_upload_bytes=settings.max_upload_bytes, on_publish=lifecycle.decide,
    )
    scheduler = (Scheduler(r, store, engine, settings.schedule, settings.client_ttl_s, metrics)
                 if settings.schedule else None)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                try:
                    await asyncio.to_thread(engine.tick)
                    await asyncio.to_thread(lifecycle.reconcile)
                    if scheduler is not None:
                        await asyncio.to_thread(scheduler.tick)
                except redis.RedisError as exc:
                    log.warning("tick skipped, Redis unavailable: %s", exc)
                except Exception:
                    log.exception("tick failed")
                await asyncio.sleep(settings.tick_s)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(
        title="FedDALE coordinator", version="0.1.0", lifespan=lifespan,
        description="Client registry, federated runs and rounds, FedAvg and student publishing.",
    )
    app.state.engine, app.state.store = engine, store
    # Uploads may be large; every other body (run requests, registrations) is small JSON, refused
    # above 64 KiB before it is parsed, i.e. before any token is checked.
    upload = settings.max_upload_bytes
    limit_bodies(app, [
        ("PUT", r"/v1/runs/[^/]+/rounds/[^/]+/(adapter|scores)", upload),
        ("PUT", r"/v1/runs/[^/]+/student", upload),
    ])

    def readiness() -> dict[str, bool]:
        return {"redis": store.ping()}

    add_ops_routes(app, metrics, readiness)
    metrics.gauge_fn("clients_registered", lambda: len(store.clients("client")))
    metrics.gauge_fn("clients_alive", lambda: len(store.alive(settings.client_ttl_s)
                                                  & {c.client_id for c in store.clients("client")}))
    for status in FINAL:  # at 0 from the start: the run-failed alert's increase() sees the first failure
        metrics.inc("runs_finished_total", 0, status=status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(redis.RedisError)
    async def redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"state store unavailable: {exc}"}, status_code=503, headers={"Retry-After": "2"})

    # ----------------------------------------------------------------- auth

    def admin(request: Request) -> None:
        token = bearer_token(request)
        if secret_matches(token, settings.admin_token):
            return
        if store.authenticate(token) is not None:
            raise HTTPException(403, "this endpoint needs the admin token")
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})

    def principal(request: Request) -> ClientRecord:
        token = bearer_token(request)
        record = store.authenticate(token)
        if record is None:
            if secret_matches(token, settings.admin_token):
                raise HTTPException(403, "this endpoint needs a client or detector token")
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return record

    def client(who: ClientRecord = Depends(principal)) -> ClientRecord:
        if who.role != "client":
            raise HTTPException(403, "this endpoint is for client nodes")
        store.touch(who.client_id)
        return who

    def count_down(who: ClientRecord, nbytes: int) -> None:
        run_id = store.active_run_id()
        if run_id and who.role == "client":
            store.add_bytes(run_id, who.client_id, down=nbytes)

    def count_up(run_id: str, who: ClientRecord, nbytes: int) -> None:
        """Every upload body received for an existing run counts, accepted or not: it crossed."""
        if store.run(run_id) is not None:
            store.add_bytes(run_id, who.client_id, up=nbytes)

    # ----------------------------------------------------------------- admin

    @app.post("/v1/runs", status_code=201, response_model=RunCreated, tags=["admin"])
    def create_run(body: RunRequest, _: None = Depends(admin)) -> RunCreated:
        """Start a one-shot or few-shot run (409 while another run is active)."""
        try:
            run = engine.create(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc
        return RunCreated(run_id=run.run_id, status=run.status)

    @app.get("/v1/runs", tags=["admin"])
    def list_runs(_: None = Depends(admin)) -> list[dict[str, Any]]:
        runs = [store.run(i) for i in store.run_ids()]
        return [
            {"run_id": x.run_id, "mode": x.mode, "status": x.status, "round": x.round, "reason": x.reason,
             "student_version": x.student_version, "created_at": x.created_at}
            for x in runs if x is not None
        ]

    @app.get("/v1/runs/{run_id}", response_model=RunView, tags=["admin"])
    def get_run(run_id: SafeId, _: None = Depends(admin)) -> RunView:
        run = store.run(run_id)
        if run is None:
            raise ApiError(404, f"unknown run {run_id!r}")
        return _run_view(store, run, settings.client_ttl_s)

    @app.post("/v1/runs/{run_id}/cancel", response_model=RunView, tags=["admin"])
    def cancel_run(run_id: SafeId, _: None = Depends(admin)) -> RunView:
        """End the run now (409 if it already ended): clients get no more tasks, its student job is cancelled."""
        return _run_view(store, engine.cancel(run_id), settings.client_ttl_s)

    @app.get("/v1/clients", tags=["admin"])
    def list_clients(_: None = Depends(admin)) -> list[dict[str, Any]]:
        alive, seen, statuses = store.alive(settings.client_ttl_s), store.last_seen(), store.statuses()
        return [
            {**c.model_dump(exclude={"token_hash"}), "alive": c.client_id in alive, "last_seen": seen.get(c.client_id),
             "status": statuses.get(c.client_id)}
            for c in store.clients()
        ]

    app.include_router(liveness_router(store, settings.client_ttl_s, principal))
    app.include_router(ui_router(store, settings.client_ttl_s, admin,
                                 lambda run: _run_view(store, run, settings.client_ttl_s), lifecycle.view))

    # ----------------------------------------------------------------- registration

    @app.post("/v1/clients", status_code=201, response_model=Enrollment, tags=["admin"])
    def enroll(body: EnrollRequest, _: None = Depends(admin)) -> Enrollment:
        """Reserve a free name for one node and issue its one-time enrollment token (409 if taken).

        The token is in this answer only (the coordinator keeps its hash); the role is the
        admin's choice, so a node can never promote itself.
        """
        record, token = store.enroll(body.name, body.role, body.ttl_s or settings.enrollment_ttl_s)
        log.info("enrolled %s %s until %.0f", record.role, record.name, record.expires_at)
        return Enrollment(name=record.name, role=record.role, token=token, expires_at=record.expires_at)

    @app.delete("/v1/clients/{name}", response_model=Revocation, tags=["admin"])
    def revoke(name: ClientName, _: None = Depends(admin)) -> Revocation:
        """Revoke a node (its token gets 401 at once) or a pending enrollment; the name is free to enroll again.

        A revoked client also leaves the open round, upload included, so it neither holds the
        round open until its deadline nor counts in it.
        """
        record, pending = store.revoke(name)
        holder = record or pending
        if holder is None:
            raise ApiError(404, f"no node or pending enrollment named {name!r}")
        if record is not None and record.role == "client":
            engine.drop_client(record.client_id)
        log.info("revoked %s %s (%s)", holder.role, name, record.client_id if record else "pending enrollment")
        return Revocation(name=name, client_id=record.client_id if record else None, role=holder.role,
                          enrollment_pending=pending is not None)

    @app.post("/v1/clients/register", status_code=201, response_model=Registration, tags=["clients"])
    def register(body: RegisterRequest, request: Request, response: Response) -> Registration:
        """Exchange a credential for this node's identity; an identity is never handed to another caller.

        - an enrollment token (admin-issued, single use): the name and role the admin fixed (201);
        - the node's own token: its registration, unchanged (200), which is how a restarted node
          that kept its credential rejoins with its id and shard;
        - the bootstrap secret, when configured: a new name with the asked role (201), never one
          that is registered, reserved by an enrollment, or revoked (409/403).
        """
        token = bearer_token(request)
        if settings.bootstrap_secret is not None and secret_matches(token, settings.bootstrap_secret):
            if body.name is None:
                raise HTTPException(422, "registering with the bootstrap secret needs a name")
            record, token = store.register(body.name, body.role or "client", cfg.data.n_clients)
            how = "the bootstrap secret"
        elif (known := store.authenticate(token)) is not None:
            if body.name not in (None, known.name) or body.role not in (None, known.role):
                raise HTTPException(403, f"this token belongs to {known.role} {known.name!r}; "
                                         "it re-registers only that node")
            record, how = known, "its own token"
            response.status_code = 200
        elif (redeemed := store.redeem(token, cfg.data.n_clients, name=body.name, role=body.role)) is not None:
            (record, token), how = redeemed, "an enrollment token"
        elif secret_matches(token, settings.admin_token):
            raise HTTPException(403, "the admin token does not register nodes; enroll one with POST /v1/clients")
        else:
            raise HTTPException(401, "invalid, used or expired credential", headers={"WWW-Authenticate": "Bearer"})
        if record.role == "client":
            store.touch(record.client_id)
        log.info("registered %s %s as %s (shard %s) with %s", record.role, record.name, record.client_id,
                 record.shard, how)
        return Registration(
            client_id=record.client_id, name=record.name, token=token, role=record.role, shard=record.shard,
            num_shards=cfg.data.n_clients, data=cfg.data.model_dump(mode="json"), seed=cfg.seeds[0],
        )

    # ----------------------------------------------------------------- client nodes

    @app.get("/v1/tasks", response_model=TaskResponse, tags=["clients"])
    def get_task(who: ClientRecord = Depends(client)) -> TaskResponse:
        """The calling node's work for the active round, or none (poll again after poll_after_s)."""
        task = engine.task_for(who.client_id)
        return TaskResponse(task=task, poll_after_s=POLL_BUSY_S if store.active_run_id() else POLL_IDLE_S)

    @app.get("/v1/public/{digest}", tags=["clients"])
    def get_public(digest: Digest, who: ClientRecord = Depends(client)) -> Response:
        """The public unlabeled set named by its digest (clients cache it by digest)."""
        parts = ("public", f"{digest}.json")
        if not artifacts.exists(parts):
            raise ApiError(404, f"no public set with digest {digest}")
        blob = artifacts.read(parts)
        count_down(who, len(blob))
        return Response(blob, media_type="application/json")

    @app.get("/v1/runs/{run_id}/rounds/{round_no}/global", tags=["clients"])
    def get_global(run_id: SafeId, round_no: Round, who: ClientRecord = Depends(client)) -> Response:
        """The FedAvg global adapter after round `round_no` (round 0: the common initial adapter)."""
        blob = engine.global_adapter(run_id, round_no)
        store.add_bytes(run_id, who.client_id, down=len(blob))
        return Response(blob, media_type=OCTET)

    @app.put("/v1/runs/{run_id}/rounds/{round_no}/adapter", response_model=UploadAccepted, tags=["clients"],
             openapi_extra=BINARY_BODY)
    async def put_adapter(
        run_id: SafeId, round_no: Round, request: Request,
        samples: Annotated[int, Query(ge=1, le=10**9, description="local training sessions (FedAvg weight)")],
        who: ClientRecord = Depends(client),
    ) -> dict[str, Any]:
        """Upload this node's LoRA adapter (safetensors) for a FedAvg round; repeats replace it."""
        blob = await read_body(request, settings.max_upload_bytes, settings.body_timeout_s)
        await run_in_threadpool(count_up, run_id, who, len(blob))
        return await run_in_threadpool(engine.accept_adapter, run_id, round_no, who.client_id, blob, samples)

    @app.put("/v1/runs/{run_id}/rounds/{round_no}/scores", response_model=UploadAccepted, tags=["clients"],
             openapi_extra=BINARY_BODY)
    async def put_scores(
        run_id: SafeId, round_no: Round, request: Request, who: ClientRecord = Depends(client)
    ) -> dict[str, Any]:
        """Upload this node's accuracy payload on the public set; repeats replace it."""
        blob = await read_body(request, settings.max_upload_bytes, settings.body_timeout_s)
        await run_in_threadpool(count_up, run_id, who, len(blob))
        return await run_in_threadpool(engine.accept_scores, run_id, round_no, who.client_id, blob)

    # ----------------------------------------------------------------- students

    # first: GET /v1/students/current must not be taken for a version by /v1/students/{version}
    app.include_router(students_router(lifecycle, scheduler, r, admin, principal))

    @app.get("/v1/students/latest", response_model=StudentInfo, tags=["students"])
    def latest_student(_: ClientRecord = Depends(principal)) -> StudentInfo:
        info = store.latest_student()
        if info is None:
            raise ApiError(404, "no student has been published yet")
        return StudentInfo.model_validate(info)

    @app.get("/v1/students/{version}", tags=["students"])
    def get_student(version: SafeId, who: ClientRecord = Depends(principal)) -> Response:
        info = store.student(version)
        if info is None:
            raise ApiError(404, f"unknown student version {version!r}")
        blob = artifacts.read(("students", f"{version}.bin"))
        if who.role == "client":
            store.add_bytes(info["run_id"], who.client_id, down=len(blob))
        return Response(blob, media_type=OCTET)

    # ----------------------------------------------------------------- student job

    @app.get("/v1/runs/{run_id}/student-inputs", response_model=StudentInputs, tags=["student job"])
    def student_inputs(run_id: SafeId, request: Request) -> StudentInputs:
        """Config, public set and accepted accuracy payloads of a run (per-run job token)."""
        return engine.student_inputs(run_id, bearer_token(request))

    @app.put("/v1/runs/{run_id}/student", response_model=StudentInfo, tags=["student job"],
             openapi_extra=BINARY_BODY)
    async def put_student(run_id: SafeId, request: Request) -> StudentInfo:
        """Publish the run's student artifact (idempotent: a retried job gets the same answer).

        The query (`normal`, `anomalous`, `digest`: a ``PseudoLabelSummary``) names the
        pseudo-labels it learned from; it is validated after the job token, like the body.
        """
        token = bearer_token(request)
        await run_in_threadpool(engine.check_job_token, run_id, token)  # 401 before a byte of the body is read
        blob = await read_body(request, settings.max_upload_bytes, settings.body_timeout_s)
        query = dict(request.query_params)
        return await run_in_threadpool(engine.publish_student, run_id, token, blob, query)

    return app


def _run_view(store: Store, run: RunRecord, ttl_s: float) -> RunView:
    traffic = store.bytes(run.run_id)
    alive = store.alive(ttl_s)
    uploaded_rounds: dict[str, list[int]] = {}
    for round_no in range(1, run.round + 1):
        for client_id in store.uploads(run.run_id, round_no):
            uploaded_rounds.setdefault(client_id, []).append(round_no)
    clients: dict[str, ClientView] = {}
    for record in store.clients("client"):
        seen = record.client_id in traffic or record.client_id in uploaded_rounds
        if not seen and record.client_id not in store.expected(run.run_id, run.round):
            continue
        t = traffic.get(record.client_id, {"up": 0, "down": 0})
        clients[record.client_id] = ClientView(
            name=record.name, shard=record.shard, uploaded_rounds=uploaded_rounds.get(record.client_id, []),
            bytes_up=t["up"], bytes_down=t["down"], alive=record.client_id in alive,
        )
    return RunView(
        run_id=run.run_id, mode=run.mode, status=run.status, reason=run.reason, round=run.round,
        round_kind=run.round_kind() if run.round else None, fedavg_rounds=run.fedavg_rounds,
        min_clients=run.min_clients, round_deadline_s=run.round_deadline_s,
        expected=sorted(store.expected(run.run_id, run.round)) if run.round else [],
        uploaded=sorted(store.uploads(run.run_id, run.round)) if run.round else [],
        clients=clients, bytes_up=sum(t["up"] for t in traffic.values()),
        bytes_down=sum(t["down"] for t in traffic.values()), student_version=run.student_version,
        pseudo_labels=run.pseudo_labels, outliers=run.outliers,
        public_digest=run.public_digest, public_count=run.public_count,
        history=[h.model_dump() for h in run.history], config=run.config,
        created_at=run.created_at, updated_at=run.updated_at, round_started_at=run.round_started_at,
    )
