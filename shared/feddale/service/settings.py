"""Environment variables every service reads the same way, and the defaults they share."""

from __future__ import annotations

import os


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_COORDINATOR_URL = "http://127.0.0.1:8000"


def env(name: str, default: str | None = None) -> str | None:
    """One environment variable, with empty strings treated as unset (compose files leave `X=`)."""
    value = os.environ.get(name, "").strip()
    return value if value else default


def require_env(name: str) -> str:
    """An environment variable the service cannot run without; a clear error names it."""
    value = env(name)
    if value is None:
        raise SystemExit(f"{name} must be set (see docs/services.md)")
    return value


def env_int(name: str, default: int) -> int:
    raw = env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float) -> float:
    raw = env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from exc
