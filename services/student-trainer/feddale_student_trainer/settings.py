"""Student-trainer settings, read from the environment (documented in docs/services.md)."""

from __future__ import annotations

from pathlib import Path

from feddale.service.settings import DEFAULT_COORDINATOR_URL, DEFAULT_REDIS_URL, ServiceSettings


class Settings(ServiceSettings):
    port: int = 8003  # the worker's ops endpoints (/healthz, /readyz, /metrics)
    redis_url: str = DEFAULT_REDIS_URL
    coordinator_url: str = DEFAULT_COORDINATOR_URL  # where jobs read their inputs and publish
    job_heartbeat_s: int = 10
    state_dir: Path | None = None  # trained students kept until published (default: the model cache)
