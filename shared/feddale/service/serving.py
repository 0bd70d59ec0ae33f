"""The `/v1/detect` contract, served identically by the detector and by every client node.

Three pieces: request/response schemas (strict, so bad input is a 422 and never a 500), a
:class:`ModelSlot` that swaps students atomically (requests keep the model they started with
while a new one loads), and a :class:`MicroBatcher` that merges concurrent requests into one
forward pass. :class:`StudentFollower` keeps a slot on the coordinator's latest student.

Nothing here imports torch: a student with an ONNX bundle is served by ONNX Runtime
(:mod:`feddale.method.onnx_runtime`), so the detector image carries no torch at all.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from feddale.method.artifact import StudentArtifact
from feddale.method.detector import Detector, Runtime
from feddale.method.onnx_runtime import Precision
from feddale.service.http import CoordinatorSession
from feddale.files import atomic_write
from feddale.service.limits import limit_bodies
from feddale.service.observability import Metrics

log = logging.getLogger(__name__)

MAX_SESSIONS = 256
MAX_MESSAGES = 4096
MAX_MESSAGE_CHARS = 16_384
MAX_BODY_BYTES = 16 * 1024 * 1024


class DetectSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(min_length=1, max_length=256)
    messages: list[StrictStr] = Field(min_length=1, max_length=MAX_MESSAGES,
                                      description="raw or masked log lines, in order")

    @field_validator("messages")
    @classmethod
    def _message_size(cls, messages: list[str]) -> list[str]:
        for i, m in enumerate(messages):
            if len(m) > MAX_MESSAGE_CHARS:
                raise ValueError(f"message {i} is longer than {MAX_MESSAGE_CHARS} characters")
        return messages


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sessions: list[DetectSession] = Field(min_length=1, max_length=MAX_SESSIONS)


class DetectResult(BaseModel):
    id: str
    anomaly: bool
    score: float = Field(description="probability that the session is anomalous")


class DetectResponse(BaseModel):
    model_version: str
    results: list[DetectResult]


class ModelInfo(BaseModel):
    version: str
    base_model: str
    runtime: str = Field(description="what answers: onnx-fp32, onnx-int8 or torch")
    threshold: float = Field(description="P(anomalous) at or above which a session is flagged; the student's own, "
                                         "chosen without labels when it was trained")
    threshold_rule: str | None = Field(description="how the federation chose it (fixed, otsu); null for older students")
    published_at: float | None
    loaded_at: float


@dataclass(frozen=True)
class LoadedModel:
    version: str
    detector: Any
    info: ModelInfo


class ModelSlot:
    """The student currently serving. Swapping is one reference assignment: a batch that took
    the old model finishes on it, the next batch gets the new one."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, model: LoadedModel) -> None:
        with self._lock:
            self._current = model


@dataclass(frozen=True)
class ServingOptions:
    """How students are served: runtime (auto = ONNX when the artifact has a bundle), precision,
    where prepared ONNX models are cached (by artifact digest), and the window batch limits."""

    runtime: Runtime = "auto"
    precision: Precision = "fp32"
    cache_dir: Path | None = None
    batch_size: int = 8
    max_batch_tokens: int | None = None  # None: the runtime's default (feddale.method.detector)


def load_student(blob: bytes, published_at: float | None = None, options: ServingOptions | None = None) -> LoadedModel:
    """Verify a student artifact and build its detector (the slow part, done off the hot path)."""
    options = options or ServingOptions()
    artifact = StudentArtifact.from_bytes(blob)
    detector = Detector(artifact, runtime=options.runtime, precision=options.precision, cache_dir=options.cache_dir,
                        batch_size=options.batch_size, max_batch_tokens=options.max_batch_tokens)
    evidence = artifact.meta.stats.get("threshold")
    info = ModelInfo(version=artifact.version, base_model=artifact.meta.base, runtime=detector.runtime,
                     threshold=detector.threshold,
                     threshold_rule=evidence.get("rule") if isinstance(evidence, dict) else None,
                     published_at=published_at, loaded_at=time.time())
    return LoadedModel(version=artifact.version, detector=detector, info=info)


class NoModel(Exception):
    """No student has been published yet."""


class Overloaded(Exception):
    """The micro-batcher's queue is full: the caller should come back shortly (429)."""


@dataclass
class _Pending:
    sessions: list[list[str]]
    future: asyncio.Future[tuple[LoadedModel, np.ndarray]]


@dataclass
class MicroBatcher:
    """Merge requests that arrive within ``max_wait_s`` into one `predict_proba` call.

    A forward pass over 64 sessions costs far less than 64 passes over one, so under load the
    detector answers more sessions per second; alone, a request waits at most ``max_wait_s``.
    Each batch reads the slot once, so every session in it is scored by the same model version.
    """

    slot: ModelSlot
    max_batch: int = 64
    max_wait_s: float = 0.005
    max_queue: int = 256  # waiting requests; beyond that callers get Overloaded (429), not an ever-longer wait
    metrics: Metrics | None = None
    _queue: asyncio.Queue[_Pending] | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def detect(self, sessions: list[list[str]]) -> tuple[LoadedModel, np.ndarray]:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future[tuple[LoadedModel, np.ndarray]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(sessions, future))
        except asyncio.QueueFull:
            raise Overloaded() from None
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].sessions)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                size += len(item.sessions)
            await self._score(batch)

    async def _score(self, batch: list[_Pending]) -> None:
        model = self.slot.current
        if model is None:
            for item in batch:
                item.future.set_exception(NoModel())
            return
        flat = [s for item in batch for s in item.sessions]
        try:
            probs = np.asarray(await asyncio.to_thread(model.detector.predict_proba, flat), dtype=np.float64)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self.metrics is not None:
            self.metrics.observe("batch_sessions", float(len(flat)))
        start = 0
        for item in batch:
            n = len(item.sessions)
            if not item.future.done():
                item.future.set_result((model, probs[start : start + n]))
            start += n


def count_verdicts(metrics: Metrics, source: str, flags: Iterable[bool]) -> None:
    """``verdicts_total{source, verdict}``: sessions judged per log source, the anomaly rate's two terms.

    ``source`` is ``api`` for ``/v1/detect`` (its sessions name no source) and the source's name
    for raw lines (``/v1/detect/lines``, streamed sessions); deploy/monitoring's anomaly-rate
    alert and dashboard read it.
    """
    flags = list(flags)
    anomalies = sum(flags)
    if anomalies:
        metrics.inc("verdicts_total", anomalies, source=source, verdict="anomaly")
    if len(flags) > anomalies:
        metrics.inc("verdicts_total", len(flags) - anomalies, source=source, verdict="normal")


def add_detect_routes(app: FastAPI, slot: ModelSlot, batcher: MicroBatcher, metrics: Metrics) -> None:
    """POST /v1/detect and GET /v1/model on ``app``, and the served student as ``model_info{version}``."""
    metrics.describe("sessions_scored_total", "sessions scored by /v1/detect")
    metrics.describe("verdicts_total", "sessions judged, by log source (api: /v1/detect) and verdict (anomaly, normal)")
    metrics.info_fn("model_info", "the student this process serves (1; no series before the first)",
                    lambda: {"version": m.version, "runtime": m.info.runtime} if (m := slot.current) else None)
    metrics.describe("requests_shed_total", "detect requests answered 429 because the queue was full")
    metrics.describe("batch_sessions", "sessions per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    # Oversized detect bodies are refused before parsing, declared or chunked (the schema bounds
    # the rest); every other route of a serving app takes small bodies only.
    limit_bodies(app, [("POST", "/v1/detect", MAX_BODY_BYTES)])

    @app.post("/v1/detect", response_model=DetectResponse, tags=["detect"])
    async def detect(body: DetectRequest) -> DetectResponse:
        """Score sessions with the current student; raw lines are masked here before scoring."""
        try:
            model, probs = await batcher.detect([s.messages for s in body.sessions])
        except NoModel:
            raise HTTPException(503, "no student has been published yet", headers={"Retry-After": "5"}) from None
        except Overloaded:
            metrics.inc("requests_shed_total")
            raise HTTPException(429, "the detector is at capacity; retry shortly", headers={"Retry-After": "1"}) from None
        metrics.inc("sessions_scored_total", len(body.sessions))
        count_verdicts(metrics, "api", (bool(p >= model.detector.threshold) for p in probs))
        return DetectResponse(
            model_version=model.version,
            results=[
                DetectResult(id=s.id, anomaly=bool(p >= model.detector.threshold), score=float(p))
                for s, p in zip(body.sessions, probs)
            ],
        )

    @app.get("/v1/model", response_model=ModelInfo, tags=["detect"])
    def model_info() -> ModelInfo:
        """The student serving right now (503 before any student exists)."""
        current = slot.current
        if current is None:
            raise HTTPException(503, "no student has been published yet", headers={"Retry-After": "5"})
        return current.info


class StudentFollower:
    """Keeps a :class:`ModelSlot` on the student the coordinator says to serve (the promoted one).

    ``latest`` returns the coordinator's student info (or None before the first one) and
    ``download`` a version's bytes. Loading happens here, in the follower's thread; the slot
    only changes once the new detector is ready. With ``cache_dir`` downloaded artifacts (and
    their prepared ONNX models, unless ``options`` names another place) are kept by version, so
    a restarted node does not fetch or convert the same student twice.
    """

    def __init__(
        self,
        slot: ModelSlot,
        latest: Callable[[], dict[str, Any] | None],
        download: Callable[[str], bytes],
        cache_dir: Path | None = None,
        on_swap: Callable[[LoadedModel], None] | None = None,
        options: ServingOptions | None = None,
    ) -> None:
        self.slot, self.latest, self.download = slot, latest, download
        self.cache_dir, self.on_swap = cache_dir, on_swap
        options = options or ServingOptions()
        if options.cache_dir is None and cache_dir is not None:
            options = replace(options, cache_dir=cache_dir / "onnx")
        self.options = options

    def poll_once(self) -> bool:
        """Fetch and swap in the student to serve if it is not the one serving (newer or older); True when the slot changed."""
        info = self.latest()
        if info is None:
            return False
        current = self.slot.current
        if current is not None and current.version == info["version"]:
            return False
        try:
            model = load_student(self._blob(info["version"]), info.get("published_at"), self.options)
        except ValueError:
            if self.cache_dir is not None:  # a corrupt cached copy: drop it, download next poll
                (self.cache_dir / f"student-{info['version']}.bin").unlink(missing_ok=True)
            raise
        self.slot.swap(model)
        log.info("now serving student %s", model.version)
        if self.on_swap is not None:
            self.on_swap(model)
        return True

    def load_cached(self) -> bool:
        """Serve the newest student in ``cache_dir`` (before the coordinator answers, or without it).

        A detector restarted during a coordinator outage then serves at once what it served
        before; the next successful poll swaps in a newer student if there is one.
        """
        if self.cache_dir is None or self.slot.current is not None:
            return False
        for path in sorted(self.cache_dir.glob("student-*.bin"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                model = load_student(path.read_bytes(), None, self.options)
            except (OSError, ValueError) as exc:
                log.warning("cached student %s unusable: %s", path.name, exc)
                continue
            self.slot.swap(model)
            log.info("serving cached student %s until the coordinator answers", model.version)
            return True
        return False

    def _blob(self, version: str) -> bytes:
        cached = self.cache_dir / f"student-{version}.bin" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        blob = self.download(version)
        if cached is not None:
            atomic_write(cached, blob)
        return blob

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Poll until ``stop`` is set; errors are logged and retried at the next interval."""
        self.load_cached()
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:
                log.warning("student poll failed: %s", exc)
            stop.wait(interval_s)


def coordinator_follower(session: CoordinatorSession, slot: ModelSlot, **kwargs: Any) -> StudentFollower:
    """A follower of the coordinator's *promoted* student (``GET /v1/students/current``) through ``session``.

    Promoted, not latest published: an operator's promote, pin or rollback reaches every
    detector and client node at its next poll (FEDDALE_STUDENT_POLL_S).
    """

    def latest() -> dict[str, Any] | None:
        try:
            return session.request("GET", "/v1/students/current").json()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:  # nothing published yet
                return None
            raise

    def download(version: str) -> bytes:
        return session.request("GET", f"/v1/students/{version}").content

    return StudentFollower(slot, latest, download, **kwargs)
