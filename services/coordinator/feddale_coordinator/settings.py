"""Coordinator settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from feddale.service.settings import DEFAULT_REDIS_URL, env, env_float, env_int, require_env


@dataclass(frozen=True)
class Settings:
    redis_url: str
    admin_token: str
    bootstrap_secret: str
    artifact_dir: Path
    config: str
    data: str | None
    max_upload_bytes: int
    client_ttl_s: float
    tick_s: float
    body_timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            redis_url=env("FEDDALE_REDIS_URL", DEFAULT_REDIS_URL) or DEFAULT_REDIS_URL,
            admin_token=require_env("FEDDALE_ADMIN_TOKEN"),
            bootstrap_secret=require_env("FEDDALE_BOOTSTRAP_SECRET"),
            artifact_dir=Path(env("FEDDALE_ARTIFACT_DIR", "./artifacts") or "./artifacts"),
            config=env("FEDDALE_CONFIG", "tiny") or "tiny",
            data=env("FEDDALE_DATA"),
            max_upload_bytes=env_int("FEDDALE_MAX_UPLOAD_BYTES", 64 * 1024 * 1024),
            client_ttl_s=env_float("FEDDALE_CLIENT_TTL_S", 60.0),
            tick_s=env_float("FEDDALE_TICK_S", 0.5),
            body_timeout_s=env_float("FEDDALE_BODY_TIMEOUT_S", 30.0),
        )
