"""A student's provenance, assembled by the coordinator when the student is published.

The coordinator knows the run (its resolved config, the public set, which accuracy payloads the
distillation round closed with); the student job reports what it is (its commit and version)
in the publish query. Together they answer "which run, config, data and code made this student"
without any of the clients' private data: a client is represented by the digest of the one
payload it sent.
"""

from __future__ import annotations

from pydantic import ValidationError

from feddale.protocol.messages import PseudoLabelSummary, Provenance, config_digest

from feddale_coordinator.store import RunRecord, Store


def student_provenance(store: Store, run: RunRecord, labels: PseudoLabelSummary, query: dict[str, str]) -> Provenance:
    """The provenance of ``run``'s student; a malformed ``commit`` or ``trainer_version`` raises ValueError."""
    closed = next((h for h in reversed(run.history) if h.round == run.round), None)
    uploads = store.uploads(run.run_id, run.round)
    payloads = {client: info["sha256"] for client, info in sorted(uploads.items())
                if closed is None or client in closed.participants}
    try:
        return Provenance(
            run_id=run.run_id, config_digest=config_digest(run.config), public_digest=run.public_digest,
            payload_digests=payloads, selection_digest=labels.digest,
            commit=query.get("commit") or None, trainer_version=query.get("trainer_version") or None,
        )
    except ValidationError as exc:
        raise ValueError(f"the student job's commit or trainer_version is malformed: {exc}") from exc
