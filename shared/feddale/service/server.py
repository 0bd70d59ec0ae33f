"""Running a service's app under uvicorn on FEDDALE_HOST:FEDDALE_PORT, with TLS when configured."""

from __future__ import annotations

from fastapi import FastAPI

from feddale.service.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run ``app`` under uvicorn on the settings' host and port, with TLS when cert and key are set."""
    import uvicorn

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
