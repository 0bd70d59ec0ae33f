"""The operator's Python client for a coordinator: start, watch, list and cancel runs; list, enroll and revoke clients.

`feddale runs ...` and `feddale clients ...` are thin commands over this class, and tests drive
real processes through it. Every answer is validated into the protocol's models, and every
refusal becomes a :class:`ClientError` carrying the coordinator's own one-line reason.
"""

from __future__ import annotations

import os
import time
from urllib.parse import quote
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx

from feddale.protocol.messages import Enrollment, Revocation, Role, RunCreated, RunView, ScheduleView, StudentsView
from feddale.service.auth import auth_headers
from feddale.service.settings import DEFAULT_COORDINATOR_URL

FINAL = ("published", "failed", "cancelled")


class ClientError(ValueError):
    """A request the coordinator refused or could not answer (the message says why, in one line)."""


class Coordinator:
    """An admin session with one coordinator (``FEDDALE_URL`` and ``FEDDALE_ADMIN_TOKEN`` by default)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url or os.environ.get("FEDDALE_URL") or DEFAULT_COORDINATOR_URL
        token = token or os.environ.get("FEDDALE_ADMIN_TOKEN")
        if not token:
            raise ClientError("no admin token: set FEDDALE_ADMIN_TOKEN (feddale up prints it)")
        kwargs: dict[str, Any] = {"transport": transport} if transport is not None else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=auth_headers(token), **kwargs)

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the coordinator at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise ClientError(f"{method} {path}: {response.status_code} {_reason(response)}")
        return response.json()

    def start_run(self, **body: Any) -> RunCreated:
        """``POST /v1/runs`` with the given fields (``mode`` is required; see docs/services.md)."""
        return RunCreated.model_validate(self._call("POST", "/v1/runs", json=body))

    def run(self, run_id: str) -> RunView:
        return RunView.model_validate(self._call("GET", f"/v1/runs/{run_id}"))

    def runs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/runs"))

    def cancel(self, run_id: str) -> RunView:
        return RunView.model_validate(self._call("POST", f"/v1/runs/{run_id}/cancel"))

    def clients(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/clients"))

    def students(self) -> StudentsView:
        """Every published student with provenance and promotion decision, and which one is served."""
        return StudentsView.model_validate(self._call("GET", "/v1/students"))

    def promote(self, version: str) -> StudentsView:
        return StudentsView.model_validate(self._call("POST", f"/v1/students/{version}/promote"))

    def pin(self, version: str) -> StudentsView:
        return StudentsView.model_validate(self._call("POST", f"/v1/students/{version}/pin"))

    def unpin(self) -> StudentsView:
        return StudentsView.model_validate(self._call("POST", "/v1/students/unpin"))

    def rollback(self) -> StudentsView:
        return StudentsView.model_validate(self._call("POST", "/v1/students/rollback"))

    def schedule(self) -> ScheduleView:
        return ScheduleView.model_validate(self._call("GET", "/v1/schedule"))

    def enroll(self, name: str, role: Role = "client", ttl_s: float | None = None) -> Enrollment:
        """``POST /v1/clients``: a one-time enrollment token for ``name`` (409 when the name is taken)."""
        body: dict[str, Any] = {"name": name, "role": role}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return Enrollment.model_validate(self._call("POST", "/v1/clients", json=body))

    def revoke(self, name: str) -> Revocation:
        """``DELETE /v1/clients/{name}``: the node's token stops working at once; the name can be enrolled again."""
        return Revocation.model_validate(self._call("DELETE", f"/v1/clients/{quote(name, safe='')}"))

    def wait(self, run_id: str, on_change: Callable[[RunView], None] | None = None, poll_s: float = 1.0,
             timeout_s: float | None = None) -> RunView:
        """Poll the run until it is published, failed or cancelled; ``on_change`` sees every new state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last: tuple[Any, ...] | None = None
        while True:
            view = self.run(run_id)
            state = (view.status, view.round, tuple(view.uploaded))
            if state != last and on_change is not None:
                on_change(view)
            last = state
            if view.status in FINAL:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"run {run_id} still {view.status} after {timeout_s:g} s")
            time.sleep(poll_s)


def _reason(response: httpx.Response) -> str:
    """The coordinator's ``detail`` in one line (a 422 lists each field), else the status text."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.reason_phrase
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in detail)
    return str(detail or response.reason_phrase)
