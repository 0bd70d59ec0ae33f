"""Service settings from the environment (pydantic-settings): one ``FEDDALE_`` prefix everywhere.

Each service declares its settings as a subclass of :class:`ServiceSettings`; a field ``x`` is
read from ``FEDDALE_X``. Empty values count as unset (compose files leave ``X=``), and a missing
or malformed variable stops the process at start-up with one line naming it
(:func:`load_settings`), never with a traceback halfway through a run. docs/services.md lists
every variable; tests/deploy_facts.py reads these classes to check the docs, compose and k8s.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_COORDINATOR_URL = "http://127.0.0.1:8000"

S = TypeVar("S", bound="ServiceSettings")

MIN_SECRET_CHARS = 16
# What the shipped templates put where a secret belongs (k8s/templates/secret.yaml, docs examples).
PLACEHOLDERS = ("replace-with", "change-me", "changeme", "example", "placeholder")


def check_secret(value: str) -> str:
    """A secret must not be a template placeholder and must be long enough not to be guessed.

    A service started with the k8s template's ``REPLACE-WITH-ADMIN-TOKEN`` would accept that
    published string as its admin token; refusing it at start-up is the only safe answer.
    """
    if any(marker in value.lower() for marker in PLACEHOLDERS):
        raise ValueError("is a template placeholder; generate one, e.g. `openssl rand -hex 32`")
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"is shorter than {MIN_SECRET_CHARS} characters; generate one, e.g. `openssl rand -hex 32`")
    return value


Secret = Annotated[str, AfterValidator(check_secret)]


class ServiceSettings(BaseSettings):
    """What every service reads: where it listens, how it logs, its TLS files."""

    model_config = SettingsConfigDict(env_prefix="FEDDALE_", env_ignore_empty=True, frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line, with request ids
    tls_cert: str | None = None  # serve HTTPS with this certificate (and tls_key)
    tls_key: str | None = None
    tls_ca: str | None = None  # trust this CA when calling other services
    request_timeout_s: float = Field(600.0, gt=0)  # every request ends within this (504 if unanswered)
    max_connections: int = Field(1000, ge=1)  # served at once; uvicorn answers 503 beyond

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("FEDDALE_TLS_CERT and FEDDALE_TLS_KEY must be set together")
        return self


class NodeSettings(ServiceSettings):
    """A process that registers with the coordinator and follows its students (client node, detector).

    It joins with the one-time enrollment token the admin issued for it, or with the fleet's
    bootstrap secret; either way the credential it receives is kept in ``state_dir``, which is how
    a restarted node proves it is itself (the coordinator never hands a taken name to anyone else).
    """

    coordinator_url: str = DEFAULT_COORDINATOR_URL
    bootstrap_secret: Secret | None = None
    enrollment_token: Secret | None = None  # from `feddale clients enroll NAME`; used once, then the credential is kept
    node_name: str | None = None  # default: host name and port (stable across restarts)
    state_dir: Path | None = None
    student_poll_s: float = 5.0

    @model_validator(mode="after")
    def _can_join(self) -> NodeSettings:
        stored = self.credential_file is not None and self.credential_file.is_file()
        if not (self.bootstrap_secret or self.enrollment_token or stored):
            raise ValueError("set FEDDALE_ENROLLMENT_TOKEN (from `feddale clients enroll`) or FEDDALE_BOOTSTRAP_SECRET")
        return self

    @property
    def name(self) -> str:
        return self.node_name or f"{socket.gethostname()}-{self.port}"

    @property
    def credential_file(self) -> Path | None:
        """Where the node keeps the credential the coordinator issued it (none without a state dir)."""
        return self.state_dir / "credential.json" if self.state_dir else None


def load_settings(cls: type[S]) -> S:
    """``cls`` read from the environment; a missing or malformed variable exits with one line naming it."""
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"])
            where = f"FEDDALE_{field.upper()}: " if field else ""
            problems.append(where + error["msg"].removeprefix("Value error, "))
        raise SystemExit(f"bad environment: {'; '.join(problems)} (see docs/services.md)") from None
