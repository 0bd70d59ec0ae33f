"""The student job: coordinator inputs in, a published student out, all over HTTP.

The worker shares no filesystem with the coordinator: it downloads the run's config, public
set and accuracy payloads, re-checks every payload against the public set it received,
aggregates, selects the pseudo-labels, trains the student and uploads it. Any failure raises,
so RQ retries the job; publishing is idempotent on the coordinator, so a retry after a
successful upload publishes nothing twice. A coordinator that is away for a while (restarting,
or waiting for Redis) is waited out here, with backoff, rather than spending RQ's retries.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import httpx

from feddale.data.deployment import public_digest
from feddale.data.types import Session
from feddale.method.config import RunConfig
from feddale.protocol.messages import StudentInfo, StudentInputs
from feddale.protocol.rounds import distil, score_matrix
from feddale.service.auth import auth_headers
from feddale.service.http import Backoff, check, http_client, with_retries
from feddale.service.settings import load_settings

from feddale_student_trainer.settings import Settings

log = logging.getLogger(__name__)

HTTP_ATTEMPTS = 8  # with backoff from 1 s up to 15 s: about a minute of coordinator downtime


def train_student_job(
    run_id: str,
    job_token: str,
    coordinator_url: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """Train and publish the student of ``run_id`` with :func:`feddale.protocol.rounds.distil`."""
    settings = load_settings(Settings)
    kwargs: dict[str, Any] = {"transport": transport} if transport is not None else {}
    headers = auth_headers(job_token)
    with http_client(coordinator_url or settings.coordinator_url, timeout=600.0, ca=settings.tls_ca, **kwargs) as http:
        inputs = StudentInputs.model_validate(with_retries(
            lambda: check(http.get(f"/v1/runs/{run_id}/student-inputs", headers=headers)).json(),
            attempts=HTTP_ATTEMPTS, backoff=Backoff(1.0, 15.0), what=f"student inputs of {run_id}",
        ))
        cfg = RunConfig.model_validate(inputs.config)
        public = [Session(id=s.id, messages=tuple(s.messages)) for s in inputs.public.sessions]
        digest = public_digest(public)
        if digest != inputs.public.digest or len(public) != inputs.public_count:
            raise ValueError(f"run {run_id}: the public set received does not match its digest")
        matrix = score_matrix(
            {client: base64.b64decode(blob) for client, blob in inputs.payloads.items()},
            digest=digest, run_id=run_id, round_no=inputs.round, count=len(public),
        )
        distilled = distil(cfg, [s.text for s in public], matrix)
        log.info("run %s: %d clients, %d pseudo-labelled rows", run_id, matrix.shape[0],
                 len(distilled.selection.texts))
        blob = distilled.artifact.to_bytes()
        published = StudentInfo.model_validate(with_retries(
            lambda: check(http.put(
                f"/v1/runs/{run_id}/student", content=blob,
                params=distilled.summary.model_dump(),
                headers={**headers, "Content-Type": "application/octet-stream"},
            )).json(),
            attempts=HTTP_ATTEMPTS, backoff=Backoff(1.0, 15.0), what=f"publishing the student of {run_id}",
        ))
    log.info("run %s: student %s published", run_id, published.version)
    return {"version": published.version, "clients": int(matrix.shape[0]), "rows": len(distilled.selection.texts)}
