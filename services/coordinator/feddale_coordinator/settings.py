"""Coordinator settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from feddale.service.settings import DEFAULT_REDIS_URL, Secret, ServiceSettings

from feddale_coordinator.intervals import Interval


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
    max_upload_bytes: int = 64 * 1024 * 1024
    client_ttl_s: float = 60.0
    tick_s: float = 0.5
    schedule: Interval | None = None  # start the default run every interval (24h, 30m, 90s); unset: only on request
    promotion_margin: float = Field(0.02, ge=0.0, le=1.0)  # a new student is served unless its agreement is lower by more
    body_timeout_s: float = 30.0
