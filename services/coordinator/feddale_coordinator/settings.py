"""Coordinator settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

from pathlib import Path

from feddale.service.settings import DEFAULT_REDIS_URL, Secret, ServiceSettings


class Settings(ServiceSettings):
    port: int = 8000
    redis_url: str = DEFAULT_REDIS_URL
    admin_token: Secret
    bootstrap_secret: Secret
    artifact_dir: Path = Path("./artifacts")
    config: str = "tiny"
    data: str | None = None
    max_upload_bytes: int = 64 * 1024 * 1024
    client_ttl_s: float = 60.0
    tick_s: float = 0.5
    body_timeout_s: float = 30.0
