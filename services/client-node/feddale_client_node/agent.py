"""The client node's work loop: register, load private sessions, poll, train, upload.

Private logs stay here. What leaves the node is, per round, either a LoRA adapter (FedAvg
rounds) or one byte per public session (the distillation round), plus its registration and
polling; the public set and students only come in. Every call to the coordinator goes through
:class:`~feddale.service.http.CoordinatorSession`, which waits out an absent coordinator with
backoff, so the node survives coordinator restarts without losing its place: uploads are
idempotent, and a round the node already uploaded to is never offered again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from feddale.data.sources import load_dataset
from feddale.data.types import Session
from feddale.method.config import DataConfig, RunConfig
from feddale.protocol.messages import PublicRef, PublicSetBody, Registration, Task, TaskResponse
from feddale.data.deployment import federation_split, public_digest
from feddale.protocol.rounds import Teacher, client_round, load_teacher
from feddale.files import atomic_write
from feddale.ingest.node import RawLogs
from feddale.service.http import Backoff, CoordinatorSession
from feddale.service.observability import Metrics
from feddale.service.serving import LoadedModel

log = logging.getLogger(__name__)

FLAGGED_IDS_SHOWN = 100


class ClientAgent:
    def __init__(
        self,
        session: CoordinatorSession,
        *,
        data: str | None = None,
        log_dir: str | None = None,
        state_dir: Path | None = None,
        metrics: Metrics | None = None,
        sources: str | None = None,
        sources_poll_s: float = 10.0,
    ) -> None:
        self.session, self.data, self.log_dir, self.state_dir = session, data, log_dir, state_dir
        # FEDDALE_SOURCES: raw log files this node follows into its own sessions (docs/ingest.md)
        self.raw = RawLogs.from_file(sources, state_dir) if sources else None
        self.sources_poll_s = sources_poll_s
        self._sessions_run: str | None = None  # the run the current sessions were taken for
        self.metrics = metrics or Metrics("feddale_client_node")
        self.sessions: tuple[Session, ...] = ()
        self.status: dict[str, Any] = {"state": "starting"}
        self.report: dict[str, Any] | None = None
        self._teacher: tuple[str, Teacher] | None = None  # (run_id, its teacher)

    # ----------------------------------------------------------------- setup

    def start(self) -> None:
        """Register and load this node's private sessions (its shard, or its own logs)."""
        registration = Registration.model_validate(self.session.register())
        self.sessions = self._private_sessions(registration)
        self.status = {"state": "idle", "client_id": registration.client_id, "shard": registration.shard,
                       "sessions": len(self.sessions)}
        if self.raw is not None:
            self.status["raw_logs"] = self.raw.summary()
        log.info("client %s ready with %d private sessions", registration.client_id, len(self.sessions))

    def _private_sessions(self, registration: Registration) -> tuple[Session, ...]:
        if self.raw is not None:
            self.raw.poll()
            sessions = self.raw.sessions()
            if not sessions:
                log.warning("the followed raw logs hold no sessions yet; each run trains on what they hold then")
            return sessions
        if self.log_dir:
            sessions = load_dataset(self.log_dir).sessions  # any labels in the files are ignored
            if not sessions:
                raise ValueError(f"FEDDALE_LOG_DIR {self.log_dir!r} holds no sessions")
            return sessions
        if registration.shard is None:
            raise ValueError("the coordinator assigned no shard and FEDDALE_LOG_DIR is not set")
        data = DataConfig.model_validate(registration.data)
        split = federation_split(data, registration.seed, self.data)
        return split.clients[registration.shard]

    # ----------------------------------------------------------------- loop

    def run(self, stop: threading.Event) -> None:
        """Poll for tasks until ``stop``; errors back off and never end the loop."""
        backoff = Backoff(base=1.0, cap=30.0)
        if self.raw is not None:
            threading.Thread(target=self.raw.run, args=(stop, self.sources_poll_s), name="raw-logs", daemon=True).start()
        while not stop.is_set():
            try:
                answer = TaskResponse.model_validate(self.session.request("GET", "/v1/tasks").json())
                if answer.task is not None:
                    self.do_task(answer.task)
                backoff.reset()
                wait = answer.poll_after_s
            except httpx.HTTPStatusError as exc:
                wait = backoff.next_delay()
                log.warning("coordinator refused a request (%s); retrying in %.1f s", exc, wait)
            except Exception:
                wait = backoff.next_delay()
                log.exception("task failed; retrying in %.1f s", wait)
                self.status = {**self.status, "state": "error"}
            stop.wait(wait)

    def do_task(self, task: Task) -> None:
        """One round of :func:`feddale.protocol.rounds.client_round`, then its upload."""
        cfg = RunConfig.model_validate(task.config)
        if self.raw is not None and task.run_id != self._sessions_run:  # each run: what the node holds now
            self.sessions, self._sessions_run = self.raw.sessions(), task.run_id
            self.status = {**self.status, "sessions": len(self.sessions), "raw_logs": self.raw.summary()}
        self.status = {**self.status, "state": f"training ({task.kind} round {task.round} of {task.run_id})"}
        model = self._teacher_for(task.run_id, cfg)
        global_adapter = self.session.request("GET", task.global_adapter).content if task.global_adapter else None
        public = self._public_set(task.public) if task.public is not None else None
        log.info("round %d of %s (%s): training the teacher on %d private sessions, %d steps%s",
                 task.round, task.run_id, task.kind, len(self.sessions), cfg.teacher.steps,
                 f", then scoring {len(public)} public sessions" if public else "")
        started = time.monotonic()
        upload = client_round(
            task, model, self.sessions, shard=self.status.get("shard") or 0,
            client_id=self.session.registration["client_id"],  # type: ignore[index]
            global_adapter=global_adapter, public=public,
        )
        stats = upload.train_stats
        log.info("round done in %.0f s (loss %.3f -> %.3f)", time.monotonic() - started,
                 stats.get("loss_first", float("nan")), stats.get("loss_last", float("nan")))
        self.metrics.inc("teacher_rounds_total", kind=task.kind)
        base = f"/v1/runs/{task.run_id}/rounds/{task.round}"
        if upload.adapter is not None:
            body, path, params = upload.adapter, f"{base}/adapter", {"samples": upload.samples}
        else:
            body, path, params = upload.scores[cfg.score.top_k], f"{base}/scores", {}
            self._teacher = None  # the run is over for this node: free the teacher's memory
        self._upload(path, body, params)
        self.metrics.inc("bytes_uploaded_total", len(body), kind=task.kind)
        self.status = {**self.status, "state": "idle", "last_upload": {
            "run_id": task.run_id, "round": task.round, "kind": task.kind, "bytes": len(body),
            "train_loss_last": stats.get("loss_last"), "at": time.time(),
        }}

    def _upload(self, path: str, body: bytes, params: dict[str, Any]) -> None:
        try:
            self.session.request("PUT", path, content=body, params=params,
                                 headers={"Content-Type": "application/octet-stream"})
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 409:  # the round closed without us (deadline): move on
                log.warning("upload to %s refused: %s", path, exc.response.text)
                return
            raise

    def _teacher_for(self, run_id: str, cfg: RunConfig) -> Teacher:
        """The run's teacher, loaded once per run at the run's seeded start."""
        if self._teacher is None or self._teacher[0] != run_id:
            self._teacher = None
            self._teacher = (run_id, load_teacher(cfg))
        return self._teacher[1]

    def _public_set(self, ref: PublicRef) -> tuple[Session, ...]:
        """The public set named by ``ref.digest``: from the local cache, else downloaded and verified."""
        cached = self.state_dir / f"public-{ref.digest}.json" if self.state_dir else None
        if cached is not None and cached.is_file():
            raw = cached.read_bytes()
        else:
            raw = self.session.request("GET", ref.path).content
        body = PublicSetBody.model_validate_json(raw)
        sessions = tuple(Session(id=s.id, messages=tuple(s.messages)) for s in body.sessions)
        if public_digest(sessions) != ref.digest or len(sessions) != ref.count:
            if cached is not None:
                cached.unlink(missing_ok=True)
            raise ValueError(f"public set does not match digest {ref.digest} / count {ref.count}")
        if cached is not None and not cached.is_file():
            atomic_write(cached, raw)
        return sessions

    # ----------------------------------------------------------------- local detection

    def detect_own_logs(self, model: LoadedModel) -> None:
        """Score this node's own sessions with a newly published student (kept as a local report)."""
        if not self.sessions:
            return
        probs = model.detector.predict_proba([s.messages for s in self.sessions])
        flagged = [s.id for s, p in zip(self.sessions, probs) if p >= model.detector.threshold]
        self.report = {
            "model_version": model.version, "sessions": len(self.sessions), "flagged": len(flagged),
            "flagged_ids": flagged[:FLAGGED_IDS_SHOWN], "at": time.time(),
        }
        self.metrics.set("own_sessions_flagged", len(flagged))
        log.info("student %s flags %d of %d own sessions", model.version, len(flagged), len(self.sessions))
