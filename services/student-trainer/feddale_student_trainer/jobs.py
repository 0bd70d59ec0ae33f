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
import shutil
from importlib.metadata import version
from typing import Any

import httpx

from feddale.data.deployment import public_digest
from feddale.data.types import Session
from feddale.method.config import RunConfig
from feddale.files import atomic_write
from feddale.harness.provenance import git_commit
from feddale.method.federation import pseudo_label_agreement
from feddale.method.models import cache_dir
from feddale.protocol.messages import PseudoLabelSummary, ScoreHistogram, StudentInfo, StudentInputs
from feddale.protocol.rounds import distil, score_histogram, score_matrix
from feddale.service.auth import auth_headers
from feddale.service.http import Backoff, check, http_client, with_retries
from feddale.service.settings import load_settings

from feddale_student_trainer.settings import Settings

log = logging.getLogger(__name__)

HTTP_ATTEMPTS = 8  # with backoff from 1 s up to 15 s: about a minute of coordinator downtime
STUDENT_FILE, LABELS_FILE, HISTOGRAM_FILE = "student.bin", "pseudo-labels.json", "score-histogram.json"


def train_student_job(
    run_id: str,
    job_token: str,
    coordinator_url: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """Train and publish the student of ``run_id`` with :func:`feddale.protocol.rounds.distil`.

    The trained student is kept on disk until it is published: when the coordinator stays away
    longer than the publishing retries and RQ runs the job again, the retry publishes that
    student instead of training another one.
    """
    settings = load_settings(Settings)
    kept = (settings.state_dir or cache_dir() / "student-jobs") / run_id
    kwargs: dict[str, Any] = {"transport": transport} if transport is not None else {}
    headers = auth_headers(job_token)
    with http_client(coordinator_url or settings.coordinator_url, timeout=600.0, ca=settings.tls_ca, **kwargs) as http:
        if (kept / STUDENT_FILE).is_file() and (kept / LABELS_FILE).is_file():
            blob = (kept / STUDENT_FILE).read_bytes()
            summary = PseudoLabelSummary.model_validate_json((kept / LABELS_FILE).read_bytes())
            histogram = (ScoreHistogram.model_validate_json((kept / HISTOGRAM_FILE).read_bytes())
                         if (kept / HISTOGRAM_FILE).is_file() else None)
            log.info("run %s: publishing the student trained by an earlier attempt", run_id)
        else:
            blob, summary, histogram = _train(http, headers, run_id)
            atomic_write(kept / HISTOGRAM_FILE, histogram.model_dump_json())
            atomic_write(kept / LABELS_FILE, summary.model_dump_json())
            atomic_write(kept / STUDENT_FILE, blob)
        # The histogram rides in the query next to the pseudo-label summary (about 500 bytes of JSON):
        # the body is the artifact itself.
        params = {**_publish_query(summary), **({"histogram": histogram.model_dump_json()} if histogram else {})}
        published = StudentInfo.model_validate(with_retries(
            lambda: check(http.put(
                f"/v1/runs/{run_id}/student", content=blob, params=params,
                headers={**headers, "Content-Type": "application/octet-stream"},
            )).json(),
            attempts=HTTP_ATTEMPTS, backoff=Backoff(1.0, 15.0), what=f"publishing the student of {run_id}",
        ))
    shutil.rmtree(kept, ignore_errors=True)
    log.info("run %s: student %s published", run_id, published.version)
    return {"version": published.version, "normal": summary.normal, "anomalous": summary.anomalous}


def _publish_query(summary: PseudoLabelSummary) -> dict[str, str | int | float]:
    """The publish request's query: the pseudo-labels and what this trainer is, for the student's provenance."""
    query: dict[str, str | int | float] = summary.model_dump(exclude_none=True)
    commit = git_commit()
    if commit:
        query["commit"] = commit
    query["trainer_version"] = version("feddale")
    return query


def _train(
    http: httpx.Client, headers: dict[str, str], run_id: str
) -> tuple[bytes, PseudoLabelSummary, ScoreHistogram]:
    """Download the run's inputs, re-check them, distil; the student's bytes, its pseudo-labels and score histogram."""
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
    log.info("run %s: %d clients, %d pseudo-labelled rows", run_id, matrix.shape[0], len(distilled.selection.texts))
    # What automatic promotion compares: how far the teachers agree on these pseudo-labels.
    summary = distilled.summary.model_copy(update={"agreement": pseudo_label_agreement(matrix, distilled.selection)})
    return distilled.artifact.to_bytes(), summary, score_histogram(distilled)
