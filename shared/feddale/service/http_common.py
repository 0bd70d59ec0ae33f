"""Plumbing every FedDALE service shares: tokens, metrics (prometheus_client), ops routes, retries, serving.

The services are thin HTTP/RQ edges around the core library; what they have in common (how a
token is hashed, how /metrics looks, how a caller backs off when the coordinator is away, how
uvicorn is started with optional TLS) lives here once so the four packages cannot drift apart.
Imports of the web stack are module-level: only the services (which depend on it) import this.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest,
)
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

T = TypeVar("T")

# Contracts between services that are not HTTP: the RQ queue and job the coordinator enqueues
# and the student-trainer executes (the coordinator never imports the trainer package).
STUDENT_QUEUE = "feddale-student"
STUDENT_JOB = "feddale_student_trainer.jobs.train_student_job"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_COORDINATOR_URL = "http://127.0.0.1:8000"


# --------------------------------------------------------------------------- environment


def env(name: str, default: str | None = None) -> str | None:
    """One environment variable, with empty strings treated as unset (compose files leave `X=`)."""
    value = os.environ.get(name, "").strip()
    return value if value else default


def require_env(name: str) -> str:
    """An environment variable the service cannot run without; a clear error names it."""
    value = env(name)
    if value is None:
        raise SystemExit(f"{name} must be set (see docs/services.md)")
    return value


def env_int(name: str, default: int) -> int:
    raw = env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float) -> float:
    raw = env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from exc


# --------------------------------------------------------------------------- tokens


def new_token(nbytes: int = 32) -> str:
    """A random URL-safe secret (256 bits by default)."""
    return secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    """sha256 of a token: what is stored at rest, so a Redis dump leaks no usable credential.

    Tokens are 256-bit random, so a fast unsalted hash is enough (no dictionary to attack).
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token against a stored hash."""
    return hmac.compare_digest(hash_token(token), stored_hash)


def secret_matches(presented: str, secret: str) -> bool:
    """Constant-time comparison of two plaintext secrets (admin token, bootstrap secret)."""
    return hmac.compare_digest(presented.encode("utf-8"), secret.encode("utf-8"))


def bearer_token(request: Request) -> str:
    """The bearer token of a request, or 401 when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- request bodies


async def read_body(request: Request, limit: int, idle_timeout_s: float | None = 30.0) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before holding it all.

    A declared Content-Length over the limit is refused without reading; a body that lies about
    its length (or is chunked) is cut off as soon as it crosses the limit. A sender that stops
    sending mid-body (a stalled link, a slowloris) gets 408 after ``idle_timeout_s`` without a
    byte, instead of holding a server task forever; one that hangs up gets 400. Either way
    nothing partial reaches the caller, so nothing partial can be stored.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPException(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
        except ValueError as exc:
            raise HTTPException(400, "Content-Length is not an integer") from exc
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPException(408, f"no body bytes for {idle_timeout_s:g} s; send the request again",
                                headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise HTTPException(400, "the client disconnected before the body was complete") from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise HTTPException(400, "request body is empty")
    return body


SMALL_BODY_BYTES = 64 * 1024


class BodyLimit:
    """ASGI middleware: a request-body size limit per endpoint, declared or streamed (413).

    FastAPI parses a JSON body before the endpoint (and its auth check) runs, so without this
    an unauthenticated caller could make any JSON endpoint buffer an arbitrarily large body.
    ``rules`` are (method, path regex, limit); the first match wins, else ``default``. A
    declared Content-Length over the limit is answered at once without reading; a chunked or
    lying body is cut off as soon as it crosses the limit.
    """

    def __init__(self, app: ASGIApp, rules: Sequence[tuple[str, str, int]] = (),
                 default: int = SMALL_BODY_BYTES) -> None:
        self.app = app
        self.rules = [(method.upper(), re.compile(pattern), limit) for method, pattern, limit in rules]
        self.default = default

    def limit_for(self, method: str, path: str) -> int:
        for rule_method, pattern, limit in self.rules:
            if rule_method == method.upper() and pattern.fullmatch(path):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _reply(send, 400, "Content-Length is not an integer")
                return
            if int(declared) > limit:
                await _reply(send, 413, f"body of {int(declared)} bytes exceeds the {limit}-byte limit "
                                        f"of {scope['method']} {scope['path']}")
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException reaches the app's exception handling as a 413 response.
                    raise HTTPException(413, f"body exceeds the {limit}-byte limit", headers={"Connection": "close"})
            return message

        await self.app(scope, limited, send)


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})


def limit_bodies(app: FastAPI, rules: Sequence[tuple[str, str, int]] = (), default: int = SMALL_BODY_BYTES) -> None:
    """Install :class:`BodyLimit` on ``app`` (before it starts)."""
    app.add_middleware(BodyLimit, rules=rules, default=default)


# --------------------------------------------------------------------------- metrics


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

    def value(self, name: str, **labels: str) -> float:
        sample = self.registry.get_sample_value(f"{self.namespace}_{name}", {k: str(v) for k, v in labels.items()})
        return sample or 0.0

    def render(self) -> str:
        return generate_latest(self.registry).decode()


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


def add_ops_routes(app: FastAPI, metrics: Metrics, readiness: Callable[[], dict[str, bool]]) -> None:
    """/healthz (process alive), /readyz (dependencies reachable) and /metrics, plus request metrics
    and a 422 handler that can render any input (see :func:`validation_error`).

    ``readiness`` returns named checks; the service is ready when all are true. It runs in a
    thread because the checks do blocking I/O (Redis ping, HTTP to the coordinator).
    """
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    metrics.describe("http_requests_total", "HTTP requests by route and status")
    metrics.describe("http_request_seconds", "HTTP request latency by route")

    app.add_middleware(RequestMetrics, metrics=metrics)

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


# --------------------------------------------------------------------------- retries


class Backoff:
    """Exponential backoff with full jitter, capped; ``reset`` after a success.

    Jitter keeps N client nodes that lost the coordinator at the same moment from coming back
    at the same moment too.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base}, cap={cap}")
        self.base, self.cap, self.attempt = base, cap, 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return self._rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class RetryableStatus(Exception):
    """A response worth retrying (5xx, 429, 408): the coordinator restarting, overloaded, or a
    request whose body stalled on the way (the server gave up waiting; sending again is safe
    because uploads are idempotent)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.request.method} {response.request.url.path} -> {response.status_code}")
        self.response = response


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, RetryableStatus))


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int | None = None,
    backoff: Backoff | None = None,
    stop: threading.Event | None = None,
    what: str = "request",
) -> T:
    """Call ``fn`` until it succeeds, retrying transport errors and retryable statuses.

    ``attempts=None`` retries forever (a client node waiting for its coordinator); ``stop``
    ends the wait early when the service shuts down. Other exceptions propagate at once.
    """
    backoff = backoff or Backoff()
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except Exception as exc:
            if not is_retryable(exc) or (attempts is not None and tries >= attempts):
                raise
            delay = backoff.next_delay()
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            if stop is not None:
                if stop.wait(delay):
                    raise
            else:
                time.sleep(delay)


def check(response: httpx.Response) -> httpx.Response:
    """Raise RetryableStatus for 5xx/429/408 and HTTPStatusError for other errors; pass 2xx."""
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise RetryableStatus(response)
    response.raise_for_status()
    return response


def tls_verify() -> ssl.SSLContext | bool:
    """What httpx verifies server certificates with: a context trusting FEDDALE_TLS_CA, else the defaults.

    A context rather than the CA's path: httpx deprecated ``verify=<path>``.
    """
    ca = env("FEDDALE_TLS_CA")
    return ssl.create_default_context(cafile=ca) if ca else True


def http_client(base_url: str, timeout: float = 60.0, **kwargs: Any) -> httpx.Client:
    """An httpx client for service-to-service calls (TLS trust from FEDDALE_TLS_CA)."""
    kwargs.setdefault("verify", tls_verify())
    return httpx.Client(base_url=base_url, timeout=timeout, **kwargs)


class CoordinatorSession:
    """An authenticated, retrying connection from a node (client or detector) to the coordinator.

    Registers with the bootstrap secret on first use and again whenever the coordinator stops
    recognising the token (a rotated token, a wiped registry); waits out a coordinator that is
    away with jittered exponential backoff. ``transport`` lets tests record or reroute traffic.
    """

    def __init__(
        self,
        base_url: str,
        bootstrap_secret: str,
        name: str,
        role: str,
        *,
        transport: httpx.BaseTransport | None = None,
        stop: threading.Event | None = None,
        timeout: float = 120.0,
    ) -> None:
        kwargs: dict[str, Any] = {"transport": transport} if transport is not None else {}
        self.http = http_client(base_url, timeout=timeout, **kwargs)
        self.bootstrap_secret, self.name, self.role = bootstrap_secret, name, role
        self.stop = stop or threading.Event()
        self.registration: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def register(self) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            response = self.http.post(
                "/v1/clients/register",
                json={"name": self.name, "role": self.role},
                headers=auth_headers(self.bootstrap_secret),
            )
            return check(response).json()

        with self._lock:
            self.registration = with_retries(attempt, stop=self.stop, what="registration")
            log.info("registered with the coordinator as %s", self.registration["client_id"])
            return self.registration

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One authenticated call, retried until it gets a non-retryable answer.

        2xx returns; 401 re-registers once and retries; other 4xx raise HTTPStatusError.
        """

        extra = kwargs.pop("headers", {})

        def attempt() -> httpx.Response:
            registration = self.registration or self.register()
            headers = {**extra, **auth_headers(registration["token"])}
            response = self.http.request(method, path, headers=headers, **kwargs)
            if response.status_code == 401:
                headers.update(auth_headers(self.register()["token"]))
                response = self.http.request(method, path, headers=headers, **kwargs)
            return check(response)

        return with_retries(attempt, stop=self.stop, what=f"{method} {path}")

    def close(self) -> None:
        self.http.close()


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Call ``predicate`` until it is true or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------- serving


def serve(app: FastAPI, default_port: int) -> None:
    """Run ``app`` under uvicorn on FEDDALE_HOST:FEDDALE_PORT, with TLS when cert and key are set."""
    import uvicorn

    cert, key = env("FEDDALE_TLS_CERT"), env("FEDDALE_TLS_KEY")
    if bool(cert) != bool(key):
        raise SystemExit("FEDDALE_TLS_CERT and FEDDALE_TLS_KEY must be set together")
    uvicorn.run(
        app,
        host=env("FEDDALE_HOST", "127.0.0.1") or "127.0.0.1",
        port=env_int("FEDDALE_PORT", default_port),
        ssl_certfile=cert,
        ssl_keyfile=key,
        log_level=(env("FEDDALE_LOG_LEVEL", "info") or "info").lower(),
        access_log=False,
    )


def setup_logging(service: str) -> None:
    """One log format for every service (the launcher writes them all into one folder)."""
    logging.basicConfig(
        level=(env("FEDDALE_LOG_LEVEL", "INFO") or "INFO").upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    if logging.getLogger().level > logging.DEBUG:
        # httpx logs every request at INFO: a client node polling for tasks twice a second
        # would bury its own training and scoring lines.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def chunked(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
