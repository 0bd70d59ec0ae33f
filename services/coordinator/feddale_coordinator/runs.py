"""Run lifecycle: rounds open and close, FedAvg, the student job, publishing.

One run is active at a time. Its state moves forward only in :meth:`RunEngine.tick` (called
every FEDDALE_TICK_S by the app, under the run's Redis lock) and when the student is
published, so a coordinator restarted at any moment re-reads Redis and continues. Statuses:

    fedavg (rounds 1..R: clients upload LoRA adapters, the coordinator averages them)
    -> distill (round R+1: clients upload accuracy payloads on the public set)
    -> student_training (the RQ job filters pseudo-labels and trains the student)
    -> published | failed (with a reason)

Every client starts a run from the same seeded adapter (``feddale.protocol.rounds.load_teacher``),
so the coordinator never loads a language model: a few-shot run's adapter keys and shapes come
from the teacher's config (``models.lora_shapes``), derived once per teacher when the run is created.

A round closes when every expected client (alive when it opened, or that asked for its task
since) has uploaded and at least ``min_clients`` did; after ``round_deadline_s`` it closes with
whoever uploaded if that is at least ``min_clients``, and the run fails otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import rq
from pydantic import ValidationError
from rq.exceptions import NoSuchJobError
from rq.job import JobStatus
from rq.registry import StartedJobRegistry

from feddale.data.deployment import public_digest
from feddale.data.types import Session
from feddale.method import adapters, models
from feddale.method.adapters import AdapterError
from feddale.method.config import RunConfig
from feddale.method.federation import FederationError
from feddale.method.payload import PayloadError, decode_scores
from feddale.method.student import StudentArtifact
from feddale.protocol.messages import (
    PseudoLabelSummary, PublicRef, PublicSetBody, RunRequest, ScoreHistogram, SessionBody, StudentInfo,
    StudentInputs, Task,
    merge_config,
)
from feddale.protocol.rounds import NextRound, close_round, flag_outliers, score_matrix
from feddale.service.auth import hash_token, new_token, token_matches
from feddale.service.observability import Metrics
from feddale.service.queue import STUDENT_JOB, fetch_job

from feddale_coordinator.artifacts import ArtifactStore
from feddale_coordinator.provenance import student_provenance
from feddale_coordinator.store import FINAL, RoundSummary, RunRecord, Store

log = logging.getLogger(__name__)

JOB_TIMEOUT_S = 6 * 3600
JOB_RETRIES = 2


class ApiError(Exception):
    """An error the app turns into an HTTP status with a message that says what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class PublicSet:
    """The coordinator's public unlabeled sessions, as served to clients (JSON) and by digest."""

    sessions: tuple[Session, ...]
    digest: str
    blob: bytes

    @classmethod
    def build(cls, sessions: tuple[Session, ...]) -> PublicSet:
        if not sessions:
            raise ValueError("the public set is empty; check FEDDALE_DATA and data.public in the config")
        digest = public_digest(sessions)
        body = PublicSetBody(digest=digest, sessions=[SessionBody(id=s.id, messages=list(s.messages)) for s in sessions])
        return cls(sessions=sessions, digest=digest, blob=body.model_dump_json().encode())


class RunEngine:
    def __init__(
        self,
        store: Store,
        artifacts: ArtifactStore,
        base_config: RunConfig,
        public: PublicSet,
        queue: rq.Queue,
        metrics: Metrics,
        client_ttl_s: float,
        max_upload_bytes: int,
        on_publish: Callable[[StudentInfo], object] | None = None,
    ) -> None:
        self.store, self.artifacts, self.base_config = store, artifacts, base_config
        self.public, self.queue, self.metrics = public, queue, metrics
        self.client_ttl_s, self.max_upload_bytes = client_ttl_s, max_upload_bytes
        self.on_publish = on_publish  # the promotion decision (feddale_coordinator.students), under the run lock
        self._shapes: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}

    # ----------------------------------------------------------------- creating runs

    def create(self, request: RunRequest) -> RunRecord:
        """Validate the request against the profile and make it the active run (409 if busy)."""
        cfg = merge_config(self.base_config, request.overrides())  # ValidationError -> 422
        shapes = self._adapter_shapes(cfg) if cfg.fedavg_rounds else None
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        if not self.store.claim_active(run_id):
            raise ApiError(409, f"run {self.store.active_run_id()} is still active; wait until it ends")
        now = time.time()
        run = RunRecord(
            run_id=run_id, mode=request.mode, status="fedavg" if cfg.fedavg_rounds else "distill",
            fedavg_rounds=cfg.fedavg_rounds,
            min_clients=request.min_clients, round_deadline_s=request.round_deadline_s,
            config=cfg.model_dump(mode="json"), created_at=now, updated_at=now,
            public_digest=self.public.digest, public_count=len(self.public.sessions),
            adapter_shapes={k: list(v) for k, v in shapes.items()} if shapes else None,
        )
        self._open_round(run, 1)
        self.metrics.inc("runs_created_total", mode=request.mode)
        log.info("run %s created (%s, %d FedAvg rounds)", run_id, request.mode, run.fedavg_rounds)
        return run

    def _adapter_shapes(self, cfg: RunConfig) -> dict[str, tuple[int, ...]]:
        """The teacher's LoRA keys and shapes (from its config, cached per teacher and rank); 422 if unknown."""
        key = (cfg.teacher_model, cfg.teacher_lora_rank)
        if key not in self._shapes:
            try:
                self._shapes[key] = models.lora_shapes(cfg.teacher_model, cfg.teacher_lora_rank)
            except Exception as exc:  # an unknown model ref or architecture: the run cannot start
                raise ApiError(422, f"teacher {cfg.teacher_model!r} cannot be used: {exc}") from exc
        return self._shapes[key]

    # ----------------------------------------------------------------- the state machine

    def tick(self) -> None:
        """Move the active run forward by whatever has happened since the last tick."""
        run_id = self.store.active_run_id()
        if run_id is None:
            return
        with self.store.run_lock(run_id):
            run = self.store.run(run_id)
            if run is None or run.status in FINAL:
                self.store.release_active(run_id)
                return
            if run.status in ("fedavg", "distill"):
                self._maybe_close(run)
            elif run.status == "student_training":
                self._check_job(run)

    def _open_round(self, run: RunRecord, round_no: int) -> None:
        run.round, run.status, run.round_started_at = round_no, run.round_kind(round_no), time.time()
        self.store.expect(run.run_id, round_no, self.store.alive(self.client_ttl_s) & self._client_ids())
        self.store.save_run(run)
        log.info("run %s: round %d (%s) open", run.run_id, round_no, run.status)

    def _client_ids(self) -> set[str]:
        return {c.client_id for c in self.store.clients("client")}

    def _maybe_close(self, run: RunRecord) -> None:
        uploads = self.store.uploads(run.run_id, run.round)
        expected = self.store.expected(run.run_id, run.round)
        enough = len(uploads) >= run.min_clients
        if enough and expected <= set(uploads):
            self._close(run, uploads, "all")
        elif time.time() >= (run.round_started_at or run.created_at) + run.round_deadline_s:
            if enough:
                self._close(run, uploads, "deadline")
            else:
                self._fail(
                    run,
                    f"round {run.round}: only {len(uploads)} client(s) uploaded before the "
                    f"{run.round_deadline_s:g} s deadline, fewer than min_clients={run.min_clients}",
                )

    def _close(self, run: RunRecord, uploads: dict[str, dict[str, Any]], closed_by: Literal["all", "deadline"]) -> None:
        """Close the round with every upload that can still be read; an unreadable one drops its client."""
        kind = run.round_kind()
        blobs, dropped = self._read_uploads(run, uploads)
        if len(blobs) < run.min_clients:
            self._fail(run, f"round {run.round}: only {len(blobs)} readable upload(s) (unreadable: "
                            f"{', '.join(dropped) or 'none'}), fewer than min_clients={run.min_clients}")
            return
        try:
            closed = close_round(kind, run.round, [
                (blobs[c], int(uploads[c].get("samples", 1))) for c in sorted(blobs)
            ] if kind == "fedavg" else ())
            if isinstance(closed, NextRound):
                self.artifacts.write(("runs", run.run_id, f"round-{run.round}", "global.safetensors"),
                                     closed.global_adapter)
        except (AdapterError, FederationError, OSError) as exc:
            self._fail(run, f"round {run.round}: FedAvg failed: {exc}")
            return
        if not isinstance(closed, NextRound):
            run.outliers = self._outliers(run, blobs)
        run.history.append(RoundSummary(
            round=run.round, kind=kind, participants=sorted(blobs), dropped=dropped, closed_by=closed_by,
            closed_at=time.time(),
        ))
        self.metrics.inc("rounds_closed_total", kind=kind, closed_by=closed_by)
        log.info("run %s: round %d closed (%s) with %d client(s)", run.run_id, run.round, closed_by, len(blobs))
        if isinstance(closed, NextRound):
            self._open_round(run, closed.round)
        else:
            run.status = "student_training"
            self._enqueue_student(run)

    def _read_uploads(self, run: RunRecord, uploads: dict[str, dict[str, Any]]) -> tuple[dict[str, bytes], list[str]]:
        """The stored bytes of each upload, and the clients whose file is gone or unreadable."""
        blobs, dropped = {}, []
        for client_id in sorted(uploads):
            try:
                blobs[client_id] = self.artifacts.read(tuple(uploads[client_id]["path"]))
            except (OSError, ValueError) as exc:
                log.warning("run %s round %d: the upload of %s cannot be read (%s); dropping it",
                            run.run_id, run.round, client_id, exc)
                dropped.append(client_id)
        return blobs, dropped

    def _outliers(self, run: RunRecord, payloads: dict[str, bytes]) -> list[str]:
        """Clients whose accuracy payloads disagree with everyone else's (shown in the run status)."""
        try:
            matrix = score_matrix(payloads, digest=run.public_digest, run_id=run.run_id, round_no=run.round,
                                  count=run.public_count)
        except (PayloadError, ValueError) as exc:  # the student job re-checks and reports
            log.warning("run %s: payloads not compared for outliers: %s", run.run_id, exc)
            return []
        flagged = flag_outliers(matrix, sorted(payloads))
        if flagged:
            log.warning("run %s: payloads of %s disagree with the other clients", run.run_id, ", ".join(flagged))
        return flagged

    def _enqueue_student(self, run: RunRecord) -> None:
        """Hand the distillation inputs to the student-trainer via RQ (a fresh job token each time).

        The run is saved before enqueueing: a crash in between leaves a run whose job does not
        exist, which the next tick re-enqueues, so a job is never lost and never doubled.
        Retries are immediate (no interval): a delayed retry needs RQ's scheduler, whose lock a
        killed worker keeps for minutes; the job itself waits out a coordinator that is away.
        The description is set because RQ logs it, and the default one would print the token.
        """
        token = new_token()
        run.job_id, run.job_token_hash = f"student-{run.run_id}", hash_token(token)
        # Valid for this run only, and only as long as the job and its retries may run.
        run.job_token_expires_at = time.time() + (JOB_RETRIES + 1) * JOB_TIMEOUT_S
        self.store.save_run(run)
        self.queue.enqueue(
            STUDENT_JOB,
            kwargs={"run_id": run.run_id, "job_token": token},
            job_id=run.job_id,
            description=f"train and publish the student of {run.run_id}",
            retry=rq.Retry(max=JOB_RETRIES),
            job_timeout=JOB_TIMEOUT_S,
            result_ttl=7 * 24 * 3600,
            failure_ttl=7 * 24 * 3600,
        )
        log.info("run %s: student job %s enqueued", run.run_id, run.job_id)

    def _check_job(self, run: RunRecord) -> None:
        try:
            job = fetch_job(run.job_id or "", connection=self.queue.connection)
        except NoSuchJobError:
            log.warning("run %s: student job missing; enqueueing it again", run.run_id)
            self._enqueue_student(run)
            return
        status = job.get_status()
        if status == JobStatus.STARTED:
            # A worker killed mid-job (SIGKILL, OOM, node loss) stops heartbeating; RQ's cleanup
            # of the started registry then retries the job (or fails it when no retry is left).
            # RQ itself only runs that cleanup every few minutes; the run waits on it, so do it here.
            StartedJobRegistry(queue=self.queue).cleanup()
            status = job.get_status()
        if status == JobStatus.FAILED:
            result = job.latest_result()
            detail = (result.exc_string or "").strip().splitlines()[-1:] if result else []
            self._fail(run, f"student training failed after retries: {detail[0] if detail else 'unknown error'}")
        elif status in (JobStatus.STOPPED, JobStatus.CANCELED):
            self._fail(run, f"student job was {status.value}")
        elif status == JobStatus.FINISHED:
            self._fail(run, "student job finished without publishing a student")

    def _fail(self, run: RunRecord, reason: str) -> None:
        run.status, run.reason = "failed", reason
        self.store.save_run(run)
        self.store.release_active(run.run_id)
        self.metrics.inc("runs_finished_total", status="failed")
        log.warning("run %s failed: %s", run.run_id, reason)

    def cancel(self, run_id: str) -> RunRecord:
        """End a run now, cleanly: no task or upload is taken from here on and its student job is cancelled.

        Under the run's lock, so no round closes and no student is published halfway through; a
        student job already training finds the run cancelled when it tries to publish (409).
        """
        with self.store.run_lock(run_id):
            run = self.store.run(run_id)
            if run is None:
                raise ApiError(404, f"unknown run {run_id!r}")
            if run.status in FINAL:
                raise ApiError(409, f"run {run_id} has already ended ({run.status})")
            if run.job_id:
                try:
                    fetch_job(run.job_id, self.queue.connection).cancel()
                except NoSuchJobError:
                    pass
            run.status, run.reason = "cancelled", "cancelled by the operator"
            self.store.save_run(run)
            self.store.release_active(run_id)
        self.metrics.inc("runs_finished_total", status="cancelled")
        log.info("run %s cancelled", run_id)
        return run

    # ----------------------------------------------------------------- client side

    def drop_client(self, client_id: str) -> None:
        """Take a revoked client out of the active run's open round (under the run lock, so a
        round closing at this moment sees it either wholly in or wholly out)."""
        run_id = self.store.active_run_id()
        if run_id is None:
            return
        with self.store.run_lock(run_id):
            run = self.store.run(run_id)
            if run is not None and run.status in ("fedavg", "distill"):
                self.store.leave_round(run_id, run.round, client_id)
                log.info("run %s: revoked client %s left round %d", run_id, client_id, run.round)

    def task_for(self, client_id: str) -> Task | None:
        """The work this client still owes the active run's open round, if any."""
        run_id = self.store.active_run_id()
        run = self.store.run(run_id) if run_id else None
        if run is None or run.status not in ("fedavg", "distill"):
            return None
        if client_id in self.store.uploads(run.run_id, run.round):
            return None
        self.store.expect(run.run_id, run.round, [client_id])  # a late joiner is waited for too
        global_adapter = None
        if run.round > 1:  # round 1 starts from the run's seeded adapter, which every client has
            global_adapter = f"/v1/runs/{run.run_id}/rounds/{run.round - 1}/global"
        public = None
        if run.round_kind() == "distill":
            public = PublicRef(digest=run.public_digest, count=run.public_count, path=f"/v1/public/{run.public_digest}")
        return Task(
            run_id=run.run_id, round=run.round, kind=run.round_kind(), config=run.config,
            global_adapter=global_adapter, public=public,
            deadline_at=(run.round_started_at or run.created_at) + run.round_deadline_s,
        )

    def _open_run(self, run_id: str, round_no: int, kind: str) -> RunRecord:
        run = self.store.run(run_id)
        if run is None:
            raise ApiError(404, f"unknown run {run_id!r}")
        if run.status != kind or run.round != round_no:
            raise ApiError(
                409, f"run {run_id} is not collecting {kind} uploads for round {round_no} "
                f"(status {run.status}, round {run.round})",
            )
        return run

    def accept_adapter(self, run_id: str, round_no: int, client_id: str, blob: bytes, samples: int) -> dict[str, Any]:
        """Validate and store one client's LoRA adapter for a FedAvg round (last upload wins)."""
        run = self._open_run(run_id, round_no, "fedavg")
        expected = {k: tuple(v) for k, v in (run.adapter_shapes or {}).items()}
        try:
            adapters.adapter_from_bytes(blob, expected, max_bytes=self.max_upload_bytes)
        except AdapterError as exc:
            self.metrics.inc("uploads_rejected_total", kind="adapter")
            raise ApiError(422, f"adapter rejected: {exc}") from exc
        return self._commit(run, client_id, blob, "adapters", "safetensors", {"samples": samples})

    def accept_scores(self, run_id: str, round_no: int, client_id: str, blob: bytes) -> dict[str, Any]:
        """Validate and store one client's accuracy payload for the distillation round."""
        run = self._open_run(run_id, round_no, "distill")
        try:
            header, _ = decode_scores(
                blob, public_digest=run.public_digest, run_id=run_id, round=round_no,
                count=run.public_count, max_bytes=self.max_upload_bytes,
            )
        except PayloadError as exc:
            self.metrics.inc("uploads_rejected_total", kind="scores")
            raise ApiError(422, f"accuracy payload rejected: {exc}") from exc
        if header.client_id != client_id:
            self.metrics.inc("uploads_rejected_total", kind="scores")
            raise ApiError(403, f"payload is signed for client {header.client_id!r}, not for you ({client_id!r})")
        return self._commit(run, client_id, blob, "scores", "bin", {})

    def _commit(
        self, run: RunRecord, client_id: str, blob: bytes, folder: str, ext: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the upload under a content-addressed name, then record it if the round is still open."""
        sha = hashlib.sha256(blob).hexdigest()
        parts = ("runs", run.run_id, f"round-{run.round}", folder, f"{client_id}-{sha[:16]}.{ext}")
        try:
            self.artifacts.write(parts, blob)
        except OSError as exc:  # a full or failing disk: nothing recorded, the client retries the upload
            log.error("run %s: storing the upload of %s failed: %s", run.run_id, client_id, exc)
            raise ApiError(503, f"the coordinator could not store the upload ({exc.strerror or exc}); retry") from exc
        with self.store.run_lock(run.run_id):
            current = self.store.run(run.run_id)
            if current is None or current.status != run.status or current.round != run.round:
                raise ApiError(409, f"round {run.round} of run {run.run_id} closed while the upload arrived")
            replaced = client_id in self.store.uploads(run.run_id, run.round)
            info = {"path": list(parts), "sha256": sha, "bytes": len(blob), "at": time.time(), **extra}
            self.store.put_upload(run.run_id, run.round, client_id, info)
        self.metrics.inc("uploads_accepted_total", kind=folder)
        return {"run_id": run.run_id, "round": run.round, "client_id": client_id, "bytes": len(blob),
                "sha256": sha, "replaced": replaced}

    def global_adapter(self, run_id: str, round_no: int) -> bytes:
        parts = ("runs", run_id, f"round-{round_no}", "global.safetensors")
        try:
            if self.artifacts.exists(parts):
                return self.artifacts.read(parts)
        except ValueError:
            pass
        raise ApiError(404, f"no global adapter for run {run_id!r} round {round_no}")

    # ----------------------------------------------------------------- student-trainer side

    def check_job_token(self, run_id: str, token: str) -> None:
        """401 unless ``token`` is the live job token of ``run_id`` (checked before any body is read)."""
        self._job_run(run_id, token)

    def _job_run(self, run_id: str, token: str) -> RunRecord:
        run = self.store.run(run_id)
        if run is None or not run.job_token_hash or not token_matches(token, run.job_token_hash):
            raise ApiError(401, "invalid job token for this run")
        if run.job_token_expires_at is not None and time.time() > run.job_token_expires_at:
            raise ApiError(401, "the job token of this run has expired")
        return run

    def student_inputs(self, run_id: str, token: str) -> StudentInputs:
        """Everything the student job needs: config, the public set and every accepted payload."""
        run = self._job_run(run_id, token)
        if run.status != "student_training":
            raise ApiError(409, f"run {run_id} is {run.status}, not waiting for a student")
        # The participants the round closed with: an upload unreadable at close was dropped then.
        closed = next((h for h in reversed(run.history) if h.round == run.round), None)
        uploads = self.store.uploads(run.run_id, run.round)
        if closed is not None:
            uploads = {c: u for c, u in uploads.items() if c in closed.participants}
        blobs, _ = self._read_uploads(run, uploads)
        payloads = {c: base64.b64encode(blob).decode() for c, blob in blobs.items()}
        return StudentInputs(
            run_id=run.run_id, round=run.round, config=run.config,
            public=PublicSetBody.model_validate_json(self.artifacts.read(("public", f"{run.public_digest}.json"))),
            public_count=run.public_count, payloads=payloads,
        )

    def publish_student(
        self, run_id: str, token: str, blob: bytes, query: dict[str, str]
    ) -> StudentInfo:
        """Store and publish the run's student; a retried job's second upload is a no-op."""
        run = self._job_run(run_id, token)
        with self.store.run_lock(run_id):
            run = self.store.run(run_id) or run
            if run.status == "published" and run.student_version:
                return StudentInfo.model_validate(self.store.student(run.student_version))
            if run.status != "student_training":
                raise ApiError(409, f"run {run_id} is {run.status}, not waiting for a student")
            try:
                artifact = StudentArtifact.from_bytes(blob)
            except ValueError as exc:
                raise ApiError(422, f"student artifact rejected: {exc}") from exc
            try:
                pseudo_labels = PseudoLabelSummary.model_validate(query)
            except ValidationError as exc:
                raise ApiError(422, f"the query must name the pseudo-labels (normal, anomalous, digest): {exc}") from exc
            try:  # optional: a student job of an older version sends none
                histogram = ScoreHistogram.model_validate_json(query["histogram"]) if "histogram" in query else None
            except ValidationError as exc:
                raise ApiError(422, f"the score histogram in the query is invalid: {exc}") from exc
            version = artifact.version
            parts = ("students", f"{version}.bin")
            sha = self.artifacts.write(parts, blob)
            info = StudentInfo(
                version=version, run_id=run_id, base_model=artifact.meta.base, published_at=time.time(),
                bytes=len(blob), sha256=sha, path=f"/v1/students/{version}", pseudo_labels=pseudo_labels,
                score_histogram=histogram, threshold=artifact.threshold,
            )
            try:
                info = info.model_copy(update={"provenance": student_provenance(self.store, run, pseudo_labels, query)})
            except ValueError as exc:
                raise ApiError(422, str(exc)) from exc
            self.store.publish_student(info.model_dump())
            if self.on_publish is not None:
                self.on_publish(info)
            run.status, run.student_version, run.pseudo_labels = "published", version, pseudo_labels
            self.store.save_run(run)
            self.store.release_active(run_id)
        self.metrics.inc("runs_finished_total", status="published")
        log.info("run %s: student %s published", run_id, version)
        return info
