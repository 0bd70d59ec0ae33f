"""Running a service's app under uvicorn on FEDDALE_HOST:FEDDALE_PORT, with TLS when configured."""

from __future__ import annotations

from fastapi import FastAPI

from feddale.service.limits import RequestDeadline
from feddale.service.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run ``app`` under uvicorn on the settings' host and port, with TLS when cert and key are set.

    Every request has a total deadline (``request_timeout_s``) and at most ``max_connections``
    are served at once; uvicorn answers 503 beyond that instead of queueing without bound.
    """
    import uvicorn

    uvicorn.run(
        RequestDeadline(app, settings.request_timeout_s),
        host=settings.host,
        port=settings.port,
        limit_concurrency=settings.max_connections,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's own lines go through setup_logging's handler: one format (text or JSON)
        access_log=False,
    )
