"""Running a service's app under uvicorn on FEDDALE_HOST:FEDDALE_PORT, with TLS when configured."""

from __future__ import annotations

from fastapi import FastAPI

from feddale.service.settings import env, env_int


def serve(app: FastAPI, default_port: int) -> None:
    """Run ``app`` under uvicorn on FEDDALE_HOST:FEDDALE_PORT, with TLS when cert and key are set."""
    import uvicorn

    cert, key = env("FEDDALE_TLS_CERT"), env("FEDDALE_TLS_KEY")
    if bool(cert) != bool(key):
        raise SystemExit("FEDDALE_TLS_CERT and FEDDALE_TLS_KEY must be set together")
    uvicorn.run(
        app,
        host=env("FEDDALE_HOST", "127.0.0.1") or "127.0.0.1",
        port=env_int("FEDDALE_PORT", default_port),
        ssl_certfile=cert,
        ssl_keyfile=key,
        log_level=(env("FEDDALE_LOG_LEVEL", "info") or "info").lower(),
        access_log=False,
    )
