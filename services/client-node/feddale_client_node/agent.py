"""The client node's work loop: register, load private sessions, poll, train, upload.

Private logs stay here. What leaves the node is, per round, either a LoRA adapter (FedAvg
rounds) or one byte per public session (the distillation round), plus its registration and
polling; the public set and students only come in. Every call to the coordinator goes through
:class:`~feddale.service.http_common.CoordinatorSession`, which waits out an absent coordinator with
backoff, so the node survives coordinator restarts without losing its place: uploads are
idempotent, and a round the node already uploaded to is never offered again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from feddale.method import adapters, models
from feddale.method.config import DataConfig, RunConfig
from feddale.data.sources import load_dataset
from feddale.data.types import Session
from feddale.data.deployment import federation_split, public_digest
from feddale.service.http_common import Backoff, CoordinatorSession, Metrics
from feddale.method.payload import VERSION as PAYLOAD_VERSION
from feddale.method.payload import PayloadHeader, encode_scores
from feddale.service.serving import LoadedModel
from feddale.method.teacher import score_texts, train_teacher

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
    ) -> None:
        self.session, self.data, self.log_dir, self.state_dir = session, data, log_dir, state_dir
        self.metrics = metrics or Metrics("feddale_client_node")
        self.sessions: tuple[Session, ...] = ()
        self.status: dict[str, Any] = {"state": "starting"}
        self.report: dict[str, Any] | None = None
        self._teacher: tuple[str, Any, Any] | None = None  # (run_id, peft model, tokenizer)

    # ----------------------------------------------------------------- setup

    def start(self) -> None:
        """Register and load this node's private sessions (its shard, or its own logs)."""
        registration = self.session.register()
        self.sessions = self._private_sessions(registration)
        self.status = {"state": "idle", "client_id": registration["client_id"], "shard": registration["shard"],
                       "sessions": len(self.sessions)}
        log.info("client %s ready with %d private sessions", registration["client_id"], len(self.sessions))

    def _private_sessions(self, registration: dict[str, Any]) -> tuple[Session, ...]:
        if self.log_dir:
            sessions = load_dataset(self.log_dir).sessions  # any labels in the files are ignored
            if not sessions:
                raise ValueError(f"FEDDALE_LOG_DIR {self.log_dir!r} holds no sessions")
            return sessions
        if registration["shard"] is None:
            raise ValueError("the coordinator assigned no shard and FEDDALE_LOG_DIR is not set")
        data = DataConfig.model_validate(registration["data"])
        split = federation_split(data, registration["seed"], self.data)
        return split.clients[registration["shard"]]

    # ----------------------------------------------------------------- loop

    def run(self, stop: threading.Event) -> None:
        """Poll for tasks until ``stop``; errors back off and never end the loop."""
        backoff = Backoff(base=1.0, cap=30.0)
        while not stop.is_set():
            try:
                answer = self.session.request("GET", "/v1/tasks").json()
                if answer["task"] is not None:
                    self.do_task(answer["task"])
                backoff.reset()
                wait = float(answer["poll_after_s"])
            except httpx.HTTPStatusError as exc:
                wait = backoff.next_delay()
                log.warning("coordinator refused a request (%s); retrying in %.1f s", exc, wait)
            except Exception:
                wait = backoff.next_delay()
                log.exception("task failed; retrying in %.1f s", wait)
                self.status = {**self.status, "state": "error"}
            stop.wait(wait)

    def do_task(self, task: dict[str, Any]) -> None:
        """Train locally for one round, then upload the adapter or the accuracy payload."""
        run_id, round_no, kind = task["run_id"], int(task["round"]), task["kind"]
        cfg = RunConfig.model_validate(task["config"])
        self.status = {**self.status, "state": f"training ({kind} round {round_no} of {run_id})"}
        model, tokenizer = self._teacher_for(run_id, cfg)
        if task["global_adapter"]:
            blob = self.session.request("GET", task["global_adapter"]).content
            state, _ = adapters.adapter_from_bytes(blob, adapters.adapter_shapes(model))
            adapters.load_adapter_state(model, state)
        seed = cfg.seeds[0]
        shard = self.status.get("shard") or 0
        local = cfg.teacher.model_copy(update={"seed": seed * 10_000 + round_no * 100 + shard})
        log.info("round %d of %s (%s): training the teacher on %d private sessions, %d steps",
                 round_no, run_id, kind, len(self.sessions), local.steps)
        started = time.monotonic()
        stats = train_teacher(model, tokenizer, [s.text for s in self.sessions], local, progress=False)
        log.info("trained in %.0f s (loss %.3f -> %.3f)", time.monotonic() - started,
                 stats.get("loss_first", float("nan")), stats.get("loss_last", float("nan")))
        self.metrics.inc("teacher_rounds_total", kind=kind)
        if kind == "fedavg":
            body = adapters.adapter_to_bytes(adapters.adapter_state(model), models.lora_meta(model))
            path = f"/v1/runs/{run_id}/rounds/{round_no}/adapter"
            params = {"samples": len(self.sessions)}
        else:
            public = self._public_set(task["public"])
            self.status = {**self.status, "state": f"scoring {len(public)} public sessions ({run_id})"}
            log.info("scoring %d public sessions", len(public))
            started = time.monotonic()
            scores = score_texts(model, tokenizer, [s.text for s in public], cfg.score, progress=False)
            log.info("scored in %.0f s", time.monotonic() - started)
            header = PayloadHeader(
                version=PAYLOAD_VERSION, public_digest=task["public"]["digest"], run_id=run_id, round=round_no,
                client_id=self.session.registration["client_id"],  # type: ignore[index]
                count=len(public),
            )
            body, path, params = encode_scores(scores, header), f"/v1/runs/{run_id}/rounds/{round_no}/scores", {}
            self._teacher = None  # the run is over for this node: free the teacher's memory
        self._upload(path, body, params)
        self.metrics.inc("bytes_uploaded_total", len(body), kind=kind)
        self.status = {**self.status, "state": "idle", "last_upload": {
            "run_id": run_id, "round": round_no, "kind": kind, "bytes": len(body),
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

    def _teacher_for(self, run_id: str, cfg: RunConfig) -> tuple[Any, Any]:
        """The run's teacher, loaded once per run; every run starts from the seeded base."""
        if self._teacher is None or self._teacher[0] != run_id:
            self._teacher = None
            base, tokenizer = models.load_causal_lm(cfg.teacher_model, cfg.quantization, seed=cfg.seeds[0])
            model = models.add_lora(base, rank=cfg.teacher_lora_rank, task="causal", seed=cfg.seeds[0])
            self._teacher = (run_id, model, tokenizer)
        return self._teacher[1], self._teacher[2]

    def _public_set(self, ref: dict[str, Any]) -> tuple[Session, ...]:
        """The public set named by ``ref['digest']``: from the local cache, else downloaded and verified."""
        digest = ref["digest"]
        cached = self.state_dir / f"public-{digest}.json" if self.state_dir else None
        if cached is not None and cached.is_file():
            raw = cached.read_bytes()
        else:
            raw = self.session.request("GET", ref["path"]).content
        sessions = tuple(Session(id=s["id"], messages=tuple(s["messages"])) for s in json.loads(raw)["sessions"])
        if public_digest(sessions) != digest or len(sessions) != ref["count"]:
            if cached is not None:
                cached.unlink(missing_ok=True)
            raise ValueError(f"public set does not match digest {digest} / count {ref['count']}")
        if cached is not None and not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.with_suffix(".part").write_bytes(raw)
            cached.with_suffix(".part").replace(cached)
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
