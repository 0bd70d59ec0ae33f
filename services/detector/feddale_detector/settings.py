"""Detector settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from feddale.service.http_common import DEFAULT_COORDINATOR_URL, env, env_float, env_int, require_env


@dataclass(frozen=True)
class Settings:
    coordinator_url: str
    bootstrap_secret: str
    name: str
    state_dir: Path | None
    student_poll_s: float
    max_batch: int
    max_wait_ms: float

    @classmethod
    def from_env(cls) -> Settings:
        state = env("FEDDALE_STATE_DIR")
        default_name = f"detector-{socket.gethostname()}-{env_int('FEDDALE_PORT', 8001)}"
        return cls(
            coordinator_url=env("FEDDALE_COORDINATOR_URL", DEFAULT_COORDINATOR_URL) or DEFAULT_COORDINATOR_URL,
            bootstrap_secret=require_env("FEDDALE_BOOTSTRAP_SECRET"),
            name=env("FEDDALE_NODE_NAME", default_name) or default_name,
            state_dir=Path(state) if state else None,
            student_poll_s=env_float("FEDDALE_STUDENT_POLL_S", 5.0),
            max_batch=env_int("FEDDALE_BATCH_SESSIONS", 64),
            max_wait_ms=env_float("FEDDALE_BATCH_WAIT_MS", 5.0),
        )
