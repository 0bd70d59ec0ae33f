"""Schema-driven fuzzing (schemathesis) of the coordinator's and the detector's public HTTP APIs.

Both apps serve their real OpenAPI document from a real uvicorn server on loopback, so every
generated request crosses real sockets. Every operation is fuzzed twice, with data that fits
its schema (reaching the handlers) and data that deliberately does not (wrong types, missing
fields, odd strings, out-of-range numbers). The checks: no 5xx, and an answer within the HTTP
timeout (a hang fails the test). Requests carry the token that endpoint's role needs, so the
fuzzing reaches past authentication into validation and the handlers.

The operations are driven with plain hypothesis ``@given`` over schemathesis' strategies:
schemathesis' own pytest plugin does not run under pytest 9.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from service_helpers import (
    detector_app_with_tiny_student, ADMIN, BOOTSTRAP, coordinator_settings, serve_in_thread,
)

from feddale.service.auth import auth_headers

EXAMPLES = 20  # per operation and mode
TIMEOUT_S = 30.0


def fuzz(url: str, headers_for) -> dict[str, int]:
    """Fuzz every operation of the API at ``url``; returns requests sent per "METHOD path mode".

    An operation without parameters or body has no invalid form (hypothesis finds the negative
    strategy unsatisfiable); it is fuzzed with valid requests only.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{operation.method.upper()} {operation.path} {mode.value}"

            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                headers = headers_for(operation.path, operation.method.upper())
                case.call_and_validate(base_url=url, headers=headers, checks=[not_a_server_error], timeout=TIMEOUT_S)
                sent[key] = sent.get(key, 0) + 1

            try:
                check()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise
    return sent


# --------------------------------------------------------------------------- coordinator


@pytest.fixture(scope="module")
def coordinator_api(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[dict]:
    from feddale_coordinator.app import create_app

    redis.Redis.from_url(redis_server).flushall()
    tmp = tmp_path_factory.mktemp("fuzz-coordinator")
    app = create_app(coordinator_settings(Path(tmp), redis_server, tick_s=0.2, body_timeout_s=5.0))
    with serve_in_thread(app) as url:
        client = httpx.post(f"{url}/v1/clients/register", json={"name": "fuzz-node"}, headers=auth_headers(BOOTSTRAP))
        assert client.status_code == 201
        yield {"url": url, "client": client.json()["token"]}


def token_for(path: str, method: str, tokens: dict) -> str:
    """The principal each coordinator endpoint is meant for (so fuzzing gets past auth)."""
    if path == "/v1/clients/register":
        return BOOTSTRAP
    if path in ("/v1/runs", "/v1/clients", "/v1/clients/{name}") or (path == "/v1/runs/{run_id}" and method == "GET"):
        return ADMIN
    return tokens["client"]


def test_coordinator_api_never_fails_with_5xx_or_hangs(coordinator_api: dict) -> None:
    sent = fuzz(coordinator_api["url"], lambda path, method: auth_headers(token_for(path, method, coordinator_api)))
    for operation in ("POST /v1/runs", "POST /v1/clients/register", "PUT /v1/runs/{run_id}/rounds/{round_no}/scores",
                      "PUT /v1/runs/{run_id}/rounds/{round_no}/adapter", "PUT /v1/runs/{run_id}/student",
                      "GET /v1/runs/{run_id}/rounds/{round_no}/global", "GET /v1/students/{version}",
                      "GET /v1/public/{digest}", "POST /v1/clients", "DELETE /v1/clients/{name}"):
        assert sent.get(f"{operation} positive", 0) > 0 and sent.get(f"{operation} negative", 0) > 0, operation


# --------------------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def detector_url() -> Iterator[str]:
    """The real detector app serving a tiny student; its coordinator is stubbed."""
    app = detector_app_with_tiny_student()
    with serve_in_thread(app) as url:
        yield url


def test_detector_api_never_fails_with_5xx_or_hangs(detector_url: str) -> None:
    sent = fuzz(detector_url, lambda path, method: {})
    assert sent.get("POST /v1/detect positive", 0) > 0 and sent.get("POST /v1/detect negative", 0) > 0
    assert sent.get("GET /v1/model positive", 0) > 0
