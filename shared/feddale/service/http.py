"""Calling other services: backoff, retries on retryable answers, TLS trust, the coordinator session."""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from feddale.service.auth import auth_headers

log = logging.getLogger(__name__)

T = TypeVar("T")


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


def tls_verify(ca: str | None) -> ssl.SSLContext | bool:
    """What httpx verifies server certificates with: a context trusting ``ca`` (FEDDALE_TLS_CA), else the defaults.

    A context rather than the CA's path: httpx deprecated ``verify=<path>``.
    """
    return ssl.create_default_context(cafile=ca) if ca else True


def http_client(base_url: str, timeout: float = 60.0, *, ca: str | None = None, **kwargs: Any) -> httpx.Client:
    """An httpx client for service-to-service calls, trusting ``ca`` when given."""
    return httpx.Client(base_url=base_url, timeout=timeout, verify=tls_verify(ca), **kwargs)


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
        ca: str | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"transport": transport} if transport is not None else {}
        self.http = http_client(base_url, timeout=timeout, ca=ca, **kwargs)
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
