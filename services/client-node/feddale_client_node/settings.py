"""Client-node settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from feddale.service.settings import DEFAULT_COORDINATOR_URL, env, env_float, env_int, require_env


@dataclass(frozen=True)
class Settings:
    coordinator_url: str
    bootstrap_secret: str
    name: str
    data: str | None
    log_dir: str | None
    state_dir: Path | None
    student_poll_s: float

    @classmethod
    def from_env(cls) -> Settings:
        state = env("FEDDALE_STATE_DIR")
        # Default name: host + port, stable across restarts and distinct for nodes sharing a host;
        # `--scale` replicas differ by container hostname.
        default_name = f"{socket.gethostname()}-{env_int('FEDDALE_PORT', 8002)}"
        return cls(
            coordinator_url=env("FEDDALE_COORDINATOR_URL", DEFAULT_COORDINATOR_URL) or DEFAULT_COORDINATOR_URL,
            bootstrap_secret=require_env("FEDDALE_BOOTSTRAP_SECRET"),
            name=env("FEDDALE_NODE_NAME", default_name) or default_name,
            data=env("FEDDALE_DATA"),
            log_dir=env("FEDDALE_LOG_DIR"),
            state_dir=Path(state) if state else None,
            student_poll_s=env_float("FEDDALE_STUDENT_POLL_S", 5.0),
        )
