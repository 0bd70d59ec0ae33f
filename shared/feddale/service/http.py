"""Calling other services: backoff, retries on retryable answers, TLS trust, the coordinator session."""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from feddale.files import atomic_write
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


class RegistrationRefused(httpx.HTTPStatusError):
    """The coordinator will not register this node (name taken, revoked, no credential it accepts).

    Retrying soon cannot help: an operator has to act (enroll the node, give it its stored
    credential back). An HTTPStatusError, so every loop that calls the coordinator already
    treats it as a refusal: one line in the log, never a traceback, and no retry storm.
    """


class CoordinatorSession:
    """An authenticated, retrying connection from a node (client or detector) to the coordinator.

    Registers on first use and again whenever the coordinator stops recognising the token (a
    revoked node, a wiped registry); waits out a coordinator that is away with jittered
    exponential backoff. The credential the coordinator issues is kept in ``credential_file``
    (when given): it is the only proof a restarted node has that a name is its own, since the
    coordinator never gives a taken name to a second caller. ``transport`` lets tests record or
    reroute traffic.
    """

    def __init__(
        self,
        base_url: str,
        bootstrap_secret: str | None,
        name: str,
        role: str,
        *,
        enrollment_token: str | None = None,
        credential_file: Path | None = None,
        transport: httpx.BaseTransport | None = None,
        stop: threading.Event | None = None,
        timeout: float = 120.0,
        ca: str | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"transport": transport} if transport is not None else {}
        self.http = http_client(base_url, timeout=timeout, ca=ca, **kwargs)
        self.bootstrap_secret, self.name, self.role = bootstrap_secret, name, role
        self.enrollment_token, self.credential_file = enrollment_token, credential_file
        self.stop = stop or threading.Event()
        self.registration: dict[str, Any] | None = None
        self._stored = self._read_credential()
        self._lock = threading.Lock()

    def _read_credential(self) -> dict[str, Any] | None:
        if self.credential_file is None or not self.credential_file.is_file():
            return None
        try:
            stored = json.loads(self.credential_file.read_text())
            return stored if isinstance(stored, dict) and isinstance(stored.get("token"), str) else None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable credential file %s: %s", self.credential_file, exc)
            return None

    def _credentials(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(what, secret, request body) to try in order: the node's own token, its enrollment token, the bootstrap secret."""
        own = self.registration or self._stored
        tries = []
        if own is not None:
            tries.append(("its own token", own["token"], {"role": self.role}))
        if self.enrollment_token:
            tries.append(("its enrollment token", self.enrollment_token, {"role": self.role}))
        if self.bootstrap_secret:
            tries.append(("the bootstrap secret", self.bootstrap_secret, {"name": self.name, "role": self.role}))
        return tries

    def register(self) -> dict[str, Any]:
        """Join the coordinator with the best credential this node holds, and keep the one it is given.

        A credential the coordinator does not know (401: revoked, used, expired, a wiped registry)
        is dropped and the next one tried; a refusal (403, 409, 422), or no credential left,
        raises :class:`RegistrationRefused`. Transport errors and 5xx are retried as usual.
        """
        with self._lock:
            response: httpx.Response | None = None
            for what, secret, body in self._credentials():
                def attempt(secret: str = secret, body: dict[str, Any] = body) -> httpx.Response:
                    response = self.http.post("/v1/clients/register", json=body, headers=auth_headers(secret))
                    if response.status_code >= 500 or response.status_code in (408, 429):
                        raise RetryableStatus(response)
                    return response

                response = with_retries(attempt, stop=self.stop, what="registration")
                if response.status_code == 401:
                    log.warning("the coordinator no longer accepts %s", what)
                    self._forget(what)
                    continue
                if response.status_code >= 400:
                    raise RegistrationRefused(f"the coordinator refused to register {self.role} {self.name!r} "
                                              f"with {what}: {response.status_code} {_detail(response)}",
                                              request=response.request, response=response)
                self.registration = response.json()
                self.name = self.registration.get("name", self.name)
                self.enrollment_token = None  # spent, or never needed again: the node has its own token now
                self._keep(self.registration)
                log.info("registered with the coordinator as %s (%s) with %s", self.name,
                         self.registration["client_id"], what)
                return self.registration
            self.registration = None
            if response is None:  # nothing to present at all (the settings refuse to start that way)
                request = self.http.build_request("POST", "/v1/clients/register")
                response = httpx.Response(401, request=request)
            raise RegistrationRefused(f"{self.role} {self.name!r} holds no credential the coordinator accepts; "
                                      "enroll it (`feddale clients enroll`) and set FEDDALE_ENROLLMENT_TOKEN",
                                      request=response.request, response=response)

    def _forget(self, what: str) -> None:
        if what == "its own token":
            self.registration = self._stored = None
            if self.credential_file is not None:
                self.credential_file.unlink(missing_ok=True)
        elif what == "its enrollment token":
            self.enrollment_token = None

    def _keep(self, registration: dict[str, Any]) -> None:
        """Write the credential to ``credential_file`` (owner-only: mkstemp's 0600, then an atomic rename)."""
        if self.credential_file is not None and registration != self._stored:
            atomic_write(self.credential_file, json.dumps(registration))
            self._stored = registration

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


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except (ValueError, AttributeError):
        return response.reason_phrase


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Call ``predicate`` until it is true or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
