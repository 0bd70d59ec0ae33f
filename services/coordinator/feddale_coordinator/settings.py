"""Coordinator settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from feddale.ingest.batch import expand_paths, named_source
from feddale.service.settings import DEFAULT_REDIS_URL, Secret, ServiceSettings

from feddale_coordinator.intervals import Interval


def _checked_by(check: Callable[[str], object]) -> Callable[[str | None], str | None]:
    """A settings validator: ``check`` a set value; what it raises becomes the one start-up line."""

    def validate(value: str | None) -> str | None:
        if value is not None:
            try:
                check(value)
            except (OSError, ValueError) as error:
                raise ValueError(str(error)) from None
        return value

    return validate


class Settings(ServiceSettings):
    port: int = 8000
    redis_url: str = DEFAULT_REDIS_URL
    admin_token: Secret
    # Unset: only nodes the admin enrolled can join (POST /v1/clients); set: its holders may also
    # register new names (never a taken one), the zero-config path of `feddale up`, compose and k8s.
    bootstrap_secret: Secret | None = None
    enrollment_ttl_s: float = Field(24 * 3600.0, gt=0)  # an unused enrollment token dies after this
    artifact_dir: Path = Path("./artifacts")
    config: str = "tiny"
    data: str | None = None
    # The public set as raw logs instead of FEDDALE_DATA's split (docs/ingest.md): comma-separated
    # paths or globs, and the source that reads them (a preset name or a source document file).
    public_logs: str | None = None
    public_source: str | None = None
    max_upload_bytes: int = 64 * 1024 * 1024
    client_ttl_s: float = 60.0
    tick_s: float = 0.5
    schedule: Interval | None = None  # start the default run every interval (24h, 30m, 90s); unset: only on request
    promotion_margin: float = Field(0.02, ge=0.0, le=1.0)  # a new student is served unless its agreement is lower by more
    body_timeout_s: float = 30.0

    # Every glob must match a file and the source must read now, so a typo stops start-up with one line.
    _public_logs_exist = field_validator("public_logs")(_checked_by(expand_paths))
    _public_source_reads = field_validator("public_source")(_checked_by(named_source))

    @model_validator(mode="after")
    def _public_pair(self) -> Settings:
        if bool(self.public_logs) != bool(self.public_source):
            raise ValueError("FEDDALE_PUBLIC_LOGS and FEDDALE_PUBLIC_SOURCE must be set together")
        return self
