"""Metrics (prometheus_client), ops routes (/healthz, /readyz, /metrics), request metrics and ids, 422s, logging."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send


log = logging.getLogger(__name__)

# prometheus_client adds a `<name>_created` timestamp series to every counter and histogram;
# no FedDALE dashboard or alert reads them, and they double the exposition.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One service's Prometheus series, in a registry of its own (``prometheus_client``).

    Series are created on first use with the label names of that use, so a service states a
    metric where it counts it; ``describe`` gives help text and, for histograms, buckets fitted
    to what is measured (a latency and a batch size need different ones).
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.registry = CollectorRegistry()
        self._described: dict[str, tuple[str, Sequence[float] | None]] = {}
        self._series: dict[str, Any] = {}
        self._lock = threading.Lock()

    def describe(self, name: str, help_text: str, buckets: Sequence[float] | None = None) -> None:
        self._described[name] = (help_text, buckets)

    def _series_for(self, kind: type, name: str, labels: dict[str, str]) -> Any:
        with self._lock:
            metric = self._series.get(name)
            if metric is None:
                help_text, buckets = self._described.get(name, (name.replace("_", " "), None))
                extra = {"buckets": buckets or LATENCY_BUCKETS} if kind is Histogram else {}
                metric = kind(name, help_text, labelnames=sorted(labels), namespace=self.namespace,
                              registry=self.registry, **extra)
                self._series[name] = metric
        return metric.labels(**{k: str(v) for k, v in labels.items()}) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._series_for(Counter, name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._series_for(Gauge, name, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._series_for(Histogram, name, labels).observe(value)

    def gauge_fn(self, name: str, fn: Callable[[], float]) -> None:
        """A gauge computed at scrape time (queue depth, clients registered...); NaN when ``fn`` fails."""

        def probe() -> float:
            try:
                return float(fn())
            except Exception:  # a scrape must not fail because one probe did
                log.debug("gauge %s failed", name, exc_info=True)
                return math.nan

        self._series_for(Gauge, name, {}).set_function(probe)

    def info_fn(self, name: str, help_text: str, fn: Callable[[], dict[str, str] | None]) -> None:
        """A gauge of 1 whose labels are read at scrape time, e.g. ``model_info{version="..."}``.

        Which student a process serves changes under it; reading it at scrape time means the
        old version's series disappears instead of lingering at 0. No series while ``fn``
        returns None (nothing served yet) or fails.
        """
        self.registry.register(_LabelsGauge(f"{self.namespace}_{name}", help_text, fn))

    def value(self, name: str, **labels: str) -> float:
        sample = self.registry.get_sample_value(f"{self.namespace}_{name}", {k: str(v) for k, v in labels.items()})
        return sample or 0.0

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _LabelsGauge(Collector):
    def __init__(self, name: str, help_text: str, fn: Callable[[], dict[str, str] | None]) -> None:
        self.name, self.help_text, self.fn = name, help_text, fn

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.help_text)]  # registering must not call fn (Redis, a model)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            labels = self.fn() or {}
        except Exception:  # a scrape must not fail because one probe did
            log.debug("gauge %s failed", self.name, exc_info=True)
            labels = {}
        family = GaugeMetricFamily(self.name, self.help_text, labels=sorted(labels))
        if labels:
            family.add_metric([str(labels[k]) for k in sorted(labels)], 1.0)
        yield family


MAX_ECHOED_INPUT = 256


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each failing field, like FastAPI's own handler, but always renderable.

    FastAPI echoes each offending input back; Python's JSON parser accepts NaN and Infinity,
    which strict JSON cannot encode, so its handler turned ``{"k": Infinity}`` into a 500. Here
    non-finite numbers are echoed as strings and large inputs (a 16 MiB detect body) are not
    echoed at all.
    """
    detail = []
    for error in jsonable_encoder(exc.errors()):
        error = _finite(error)
        if "input" in error and len(json.dumps(error["input"])) > MAX_ECHOED_INPUT:
            error["input"] = "(not echoed: too large)"
        detail.append(error)
    return JSONResponse({"detail": detail}, status_code=422)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class RequestMetrics:
    """ASGI middleware counting requests by method, route template and status, with latency.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one re-wraps ``receive`` in a
    task group, which turns a timed-out body read into a fake client disconnect.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router fills it in
            self.metrics.inc("http_requests_total", method=scope["method"], route=path, status=str(status))
            self.metrics.observe("http_request_seconds", time.perf_counter() - start, route=path)


REQUEST_ID: ContextVar[str | None] = ContextVar("feddale_request_id", default=None)
_REQUEST_ID_HEADER = b"x-request-id"
_GOOD_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestIds:
    """ASGI middleware: every request gets an id, in the ``X-Request-ID`` response header and in
    every log line written while it is served.

    The caller's ``X-Request-ID`` is kept when it is a plain token of at most 128 characters (a
    proxy's or an operator's id then finds the coordinator's lines); otherwise a fresh one is
    made, so a header cannot inject text into the logs. The id lives in a context variable,
    which FastAPI carries into the thread a sync endpoint runs in.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(_REQUEST_ID_HEADER, b"").decode("latin-1")
        request_id = given if _GOOD_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != _REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (_REQUEST_ID_HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def add_ops_routes(app: FastAPI, metrics: Metrics, readiness: Callable[[], dict[str, bool]]) -> None:
    """/healthz (process alive), /readyz (dependencies reachable) and /metrics, plus request metrics,
    request ids (:class:`RequestIds`) and a 422 handler that can render any input (see :func:`validation_error`).

    ``readiness`` returns named checks; the service is ready when all are true. It runs in a
    thread because the checks do blocking I/O (Redis ping, HTTP to the coordinator).
    """
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    metrics.describe("http_requests_total", "HTTP requests by route and status")
    metrics.describe("http_request_seconds", "HTTP request latency by route")

    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestIds)  # outermost: the id is set before anything else logs

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Readiness: every dependency this service needs answers (503 otherwise)."""
        checks = readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)


LogFormat = Literal["text", "json"]


class _WithRequestId(logging.Filter):
    """Puts the id of the request being served (or None) on every record, for both formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def setup_logging(service: str, level: str = "INFO", fmt: LogFormat = "text") -> None:
    """One log format for every service (the launcher writes them all into one folder).

    ``json`` (FEDDALE_LOG_FORMAT=json) writes one JSON object per line for log collectors:
    ``time``, ``level``, ``service``, ``logger``, ``message``, ``request_id`` (null outside a
    request) and, for errors, ``exc_info``; formatted by python-json-logger.
    """
    handler = logging.StreamHandler()
    handler.addFilter(_WithRequestId())
    if fmt == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service}, timestamp="time",  # ISO 8601, UTC
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's copy of the message with ANSI colours
        ))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if logging.getLogger().level > logging.DEBUG:
        # httpx logs every request at INFO: a client node polling for tasks twice a second
        # would bury its own training and scoring lines.
        logging.getLogger("httpx").setLevel(logging.WARNING)
