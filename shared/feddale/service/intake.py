"""Raw log lines into a detector: ``POST /v1/detect/lines``, the OTLP logs receiver, anomalies.

Two ways in, one grouping (the sources of :mod:`feddale.ingest`):

* ``POST /v1/detect/lines`` takes one batch of raw lines of one source, groups them into
  sessions as ``feddale logs sessions`` would and answers with a verdict per session;
* ``POST /v1/logs`` is an OpenTelemetry logs receiver (OTLP/HTTP, protobuf or JSON, gzip or
  not), so a Collector or Fluent Bit streams into a detector unchanged. Lines join open
  sessions per source (:class:`~feddale.ingest.stream.OpenSessions`); a background thread
  closes idle ones, scores what closed with the current student, and reports anomalous
  sessions to ``GET /v1/anomalies``, to the counter ``intake_sessions_total{source,verdict}``
  and, when configured, to an Alertmanager-compatible webhook.

Bad input is a 4xx with a reason, never a 500: unknown sources, over-long lines, bodies that
are not OTLP. Memory is bounded by the open-session limits and the anomaly ring. Nothing here
imports torch: the detector image serves students with ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from feddale.ingest.catalog import load_sources
from feddale.ingest.otlp import (
    SOURCE_ATTRIBUTE, BodyTooLarge, ExportLogsResponse, OtlpError, PartialSuccess, Record, gunzip,
    records_from_json, records_from_protobuf, response_protobuf,
)
from feddale.ingest.parsing import LineParser
from feddale.ingest.presets import PRESETS, preset
from feddale.ingest.reader import MAX_LINE_BYTES, RawLine
from feddale.ingest.sessions import SessionBuilder
from feddale.ingest.sources import Source
from feddale.ingest.stream import ClosedSession, OpenSessions
from feddale.service.limits import BodyLimit, read_body
from feddale.service.observability import Metrics
from feddale.service.serving import LoadedModel, ModelSlot, NoModel, count_verdicts

log = logging.getLogger(__name__)

MAX_LINES = 10_000  # lines in one /v1/detect/lines request
MAX_LINE_CHARS = MAX_LINE_BYTES  # one line (64 KiB): above real log lines, far below a 10 MB one
MAX_BODY_BYTES = 16 * 1024 * 1024
ALERT_NAME = "FeddaleAnomalousSession"


# ----------------------------------------------------------------- wire models


class DetectLinesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: StrictStr = Field(min_length=1, max_length=64, description="a preset name or a source of FEDDALE_SOURCES")
    lines: list[StrictStr] = Field(min_length=1, max_length=MAX_LINES, description="raw log lines, in log order")

    @field_validator("lines")
    @classmethod
    def _line_size(cls, lines: list[str]) -> list[str]:
        for i, line in enumerate(lines):
            if len(line) > MAX_LINE_CHARS:
                raise ValueError(f"line {i} is longer than {MAX_LINE_CHARS} characters")
        return lines


class LinesResult(BaseModel):
    id: str = Field(description="the session key (HDFS: the block id) or window id")
    anomaly: bool
    score: float = Field(description="probability that the session is anomalous")
    lines: int


class DetectLinesResponse(BaseModel):
    model_version: str
    results: list[LinesResult]
    unparsed: int = Field(description="lines in no session: not in the source's format, no key or no time")


class Anomaly(BaseModel):
    source: str
    id: str
    score: float
    lines: int
    reason: str = Field(description="why the session closed: idle, max_lines, evicted or flushed")
    model_version: str
    opened_at: float
    closed_at: float


class AnomaliesResponse(BaseModel):
    anomalies: list[Anomaly]
    now: float = Field(description="pass as ?since= next time to get only what is new")


class Alert(BaseModel):
    """One alert as Alertmanager's ``POST /api/v2/alerts`` takes it."""

    labels: dict[str, str]
    annotations: dict[str, str]
    startsAt: str


# ----------------------------------------------------------------- the intake


@dataclass(frozen=True)
class IntakeOptions:
    """How streamed sessions close and what is kept: the detector's FEDDALE_* settings."""

    idle_s: float = 30.0
    max_session_lines: int = 256
    max_open_sessions: int = 10_000
    max_anomalies: int = 1000
    alert_webhook: str | None = None
    tick_s: float = 1.0


class UnknownSource(KeyError):
    pass


class Intake:
    """Parsers per source, the open sessions, scoring of closed ones, the anomaly ring, alerts."""

    def __init__(self, slot: ModelSlot, metrics: Metrics, sources: dict[str, Source],
                 options: IntakeOptions | None = None, clock: Callable[[], float] = time.monotonic,
                 http: httpx.Client | None = None) -> None:
        self.slot, self.metrics, self.sources = slot, metrics, sources
        self.options = options or IntakeOptions()
        self.open = OpenSessions(idle_s=self.options.idle_s, max_lines=self.options.max_session_lines,
                                 max_open=self.options.max_open_sessions, clock=clock)
        self.anomalies: deque[Anomaly] = deque(maxlen=self.options.max_anomalies)
        self._parsers: dict[str, LineParser] = {}
        self._closed: list[ClosedSession] = []
        self._lock = threading.Lock()  # the open sessions, parsers and closed list
        self._score_lock = threading.Lock()  # one scorer at a time: results stay in order
        self._http = http
        metrics.describe("intake_sessions_total", "streamed sessions scored, by source and verdict")
        metrics.describe("intake_lines_total", "streamed lines by source and outcome (parsed, unparsed)")
        metrics.describe("intake_evicted_total", "open sessions closed early to stay within the memory bounds")
        metrics.describe("alert_webhook_failures_total", "alert webhook calls that failed")
        metrics.gauge_fn("intake_open_sessions", lambda: float(len(self.open)))

    def source(self, name: str) -> Source:
        found = self.sources.get(name.lower())
        if found is None:
            raise UnknownSource(name)
        return found

    def known(self) -> str:
        return ", ".join(sorted(self.sources))

    # ----------------------------------------------------------------- one batch

    def group(self, source: Source, lines: Sequence[str]) -> tuple[list[tuple[str, tuple[str, ...]]], int]:
        """Sessions (id, masked messages) of one batch of lines, and the lines in no session."""
        parser, builder = LineParser(source), SessionBuilder(source)
        for number, text in enumerate(lines, start=1):
            builder.add(parser.parse(RawLine("request", number, text)))
        sessions = [(s.id, s.messages) for s in builder.dataset().sessions]
        return sessions, len(lines) - builder.counts["grouped"]

    # ----------------------------------------------------------------- the stream

    def ingest(self, records: list[tuple[Source, str]]) -> int:
        """Streamed lines of known sources into open sessions; returns the lines that did not parse."""
        unparsed = 0
        with self._lock:
            for source, text in records:
                parser = self._parsers.get(source.name)
                if parser is None:
                    parser = self._parsers[source.name] = LineParser(source)
                line = parser.parse(RawLine("otlp", parser.lines + 1, text))
                outcome = "unparsed" if line.masked is None else "parsed"
                unparsed += line.masked is None
                self.metrics.inc("intake_lines_total", source=source.name, outcome=outcome)
                self._closed.extend(self._counted(self.open.add(source, line)))
        return unparsed

    def _counted(self, closed: list[ClosedSession]) -> list[ClosedSession]:
        for session in closed:
            if session.reason == "evicted":
                self.metrics.inc("intake_evicted_total", source=session.source)
        return closed

    def tick(self) -> int:
        """Close idle sessions and score everything closed; returns the sessions scored."""
        with self._lock:
            closed, self._closed = self._closed + self.open.expire(), []
        return self._score(closed)

    def flush(self) -> int:
        """Close and score every open session now."""
        with self._lock:
            closed, self._closed = self._closed + self.open.flush(), []
        return self._score(closed)

    def _score(self, closed: list[ClosedSession]) -> int:
        if not closed:
            return 0
        model: LoadedModel | None = self.slot.current
        if model is None:  # nothing to score with yet: counted, not held without bound
            for session in closed:
                self.metrics.inc("intake_sessions_total", source=session.source, verdict="unscored")
            log.warning("%d streamed sessions closed before any student was published", len(closed))
            return 0
        with self._score_lock:
            probs = model.detector.predict_proba([s.messages for s in closed])
            found = []
            for session, p in zip(closed, probs):
                anomalous = bool(p >= model.detector.threshold)
                self.metrics.inc("intake_sessions_total", source=session.source,
                                 verdict="anomaly" if anomalous else "normal")
                count_verdicts(self.metrics, session.source, [anomalous])
                if anomalous:
                    found.append(Anomaly(source=session.source, id=session.id, score=float(p),
                                         lines=len(session.messages), reason=session.reason,
                                         model_version=model.version, opened_at=session.opened_at,
                                         closed_at=session.closed_at))
            self.anomalies.extend(found)
        if found and self.options.alert_webhook:
            self._alert(found)
        return len(closed)

    def _alert(self, found: list[Anomaly]) -> None:
        """POST the anomalies to the webhook; a failure is logged and counted, never raised."""
        alerts = [Alert(
            labels={"alertname": ALERT_NAME, "source": a.source, "session": a.id, "severity": "warning"},
            annotations={"summary": f"anomalous {a.source} session {a.id} ({a.lines} lines, score {a.score:.3f})",
                         "score": f"{a.score:.4f}", "model_version": a.model_version},
            startsAt=datetime.fromtimestamp(a.closed_at, tz=timezone.utc).isoformat().replace("+00:00", "Z"),
        ).model_dump() for a in found]
        try:
            http = self._http or httpx.Client(timeout=5.0)
            try:
                http.post(self.options.alert_webhook, json=alerts).raise_for_status()  # type: ignore[arg-type]
            finally:
                if self._http is None:
                    http.close()
            self.metrics.inc("alerts_sent_total", len(alerts))
        except Exception as error:  # noqa: BLE001 - an alert receiver's trouble never stops detection
            self.metrics.inc("alert_webhook_failures_total")
            log.warning("alert webhook %s failed: %s", self.options.alert_webhook, error)

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop``; a failing tick is logged and the next one tries again."""
        while not stop.wait(self.options.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("scoring streamed sessions failed")

    def recent(self, since: float) -> list[Anomaly]:
        return [a for a in list(self.anomalies) if a.closed_at > since]


def known_sources(sources_file: str | Path | None = None) -> dict[str, Source]:
    """Every preset, and the sources of a sources file (which win over a preset of their name)."""
    known = {name: preset(name) for name in PRESETS}
    if sources_file:
        known.update({entry.source.name: entry.source for entry in load_sources(sources_file)})
    return known


# ----------------------------------------------------------------- routes


def _allow_bodies(app: FastAPI, rules: list[tuple[str, str, int]]) -> None:
    """Raise the body limit for these routes in the app's :class:`BodyLimit` (installed by the
    detect routes with a small default for every other route), or install one."""
    for middleware in app.user_middleware:
        if middleware.cls is BodyLimit:
            middleware.kwargs["rules"] = [*rules, *middleware.kwargs.get("rules", ())]
            return
    app.add_middleware(BodyLimit, rules=rules)


def _source_of(record: Record, default: str | None) -> str | None:
    return record.attributes.get(SOURCE_ATTRIBUTE) or default


def add_intake_routes(app: FastAPI, slot: ModelSlot, metrics: Metrics, sources: dict[str, Source],
                      options: IntakeOptions | None = None, stop: threading.Event | None = None,
                      score: Callable[[list[list[str]]], Any] | None = None) -> Intake:
    """``POST /v1/detect/lines``, ``POST /v1/logs``, ``GET /v1/anomalies`` on ``app``.

    ``sources``: by lowercase name (presets and the detector's sources file). ``score`` scores
    sessions for ``/v1/detect/lines`` and returns ``(model, probabilities)``, e.g. the detector's
    ``MicroBatcher.detect``; without it the current student scores in a worker thread. With
    ``stop``, a thread closes idle streamed sessions and scores them every ``tick_s`` until
    ``stop`` is set.
    """
    intake = Intake(slot, metrics, sources, options)
    _allow_bodies(app, [("POST", "/v1/detect/lines", MAX_BODY_BYTES), ("POST", "/v1/logs", MAX_BODY_BYTES)])
    if stop is not None:
        threading.Thread(target=intake.run, args=(stop,), name="intake", daemon=True).start()

    def known(name: str) -> Source:
        try:
            return intake.source(name)
        except UnknownSource:
            raise HTTPException(422, f"unknown source {name!r}; known: {intake.known()}") from None

    async def scored(sessions: list[list[str]]) -> tuple[Any, Any]:
        if score is not None:
            return await score(sessions)
        model = slot.current
        if model is None:
            raise _no_model()
        return model, await asyncio.to_thread(model.detector.predict_proba, sessions)

    @app.post("/v1/detect/lines", response_model=DetectLinesResponse, tags=["detect"])
    async def detect_lines(body: DetectLinesRequest) -> DetectLinesResponse:
        """Group raw lines of one source into sessions and score each with the current student."""
        source = known(body.source)
        if slot.current is None:
            raise _no_model()
        sessions, unparsed = await asyncio.to_thread(intake.group, source, body.lines)
        if not sessions:
            return DetectLinesResponse(model_version=slot.current.version, results=[], unparsed=unparsed)
        try:
            model, probs = await scored([list(messages) for _, messages in sessions])
        except NoModel:
            raise _no_model() from None
        metrics.inc("sessions_scored_total", len(sessions))
        count_verdicts(metrics, source.name, (bool(p >= model.detector.threshold) for p in probs))
        return DetectLinesResponse(model_version=model.version, unparsed=unparsed, results=[
            LinesResult(id=sid, anomaly=bool(p >= model.detector.threshold), score=float(p), lines=len(messages))
            for (sid, messages), p in zip(sessions, probs)
        ])

    @app.post("/v1/logs", tags=["otlp"], responses={200: {"content": {
        "application/json": {}, "application/x-protobuf": {}}}})
    async def otlp_logs(request: Request, source: str | None = Query(None, max_length=64)) -> Response:
        """OTLP/HTTP logs export (protobuf or JSON, optionally gzip). Each record's body is a raw
        line; its source is the ``feddale.source`` attribute (record, then resource), else ``?source=``."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/x-protobuf", "application/json"):
            raise HTTPException(415, "send OTLP/HTTP as application/x-protobuf or application/json")
        body = await read_body(request, MAX_BODY_BYTES)
        try:
            if request.headers.get("content-encoding", "").lower() == "gzip":
                body = gunzip(body, MAX_BODY_BYTES)
            records = (records_from_protobuf if kind == "application/x-protobuf" else records_from_json)(body)
        except BodyTooLarge as error:
            raise HTTPException(413, str(error)) from None
        except OtlpError as error:
            raise HTTPException(400, str(error)) from None
        if not records:
            raise HTTPException(400, "the export holds no log records")
        taken, rejected, reasons = [], 0, set()
        for record in records:
            name = _source_of(record, source)
            if record.line is not None and len(record.line) > MAX_LINE_CHARS:
                raise HTTPException(400, f"a log record body is longer than {MAX_LINE_CHARS} characters")
            if record.line is None:
                rejected += 1
                reasons.add("a record body that is not a string")
            elif name is None or name.lower() not in intake.sources:
                rejected += 1
                reasons.add(f"no known source (attribute {SOURCE_ATTRIBUTE} or ?source=; known: {intake.known()})"
                            if name is None else f"unknown source {name!r}")
            else:
                taken.append((intake.sources[name.lower()], record.line))
        if not taken:
            raise HTTPException(400, "no record could be taken: " + "; ".join(sorted(reasons)))
        unparsed = await asyncio.to_thread(intake.ingest, taken)
        if unparsed:
            reasons.add(f"{unparsed} lines not in their source's format")
        message = "; ".join(sorted(reasons))
        if kind == "application/x-protobuf":
            return Response(response_protobuf(rejected + unparsed, message), media_type="application/x-protobuf")
        partial = PartialSuccess(rejectedLogRecords=rejected + unparsed, errorMessage=message)
        answer = ExportLogsResponse(partialSuccess=partial if rejected + unparsed else None)
        return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")

    @app.get("/v1/anomalies", response_model=AnomaliesResponse, tags=["detect"])
    def anomalies(since: float = Query(0.0, ge=0.0, description="seconds since the epoch")) -> AnomaliesResponse:
        """Recent anomalous streamed sessions (closed after ``since``), oldest first; bounded."""
        return AnomaliesResponse(anomalies=intake.recent(since), now=time.time())

    return intake


def _no_model() -> HTTPException:
    return HTTPException(503, "no student has been published yet", headers={"Retry-After": "5"})
