"""The RQ worker process, with a small HTTP side door for /healthz, /readyz and /metrics.

RQ's work loop must own the main thread (it handles SIGTERM for warm shutdown and forks a
work-horse per job, so a job's model memory is returned when it ends); the ops endpoints run
in a uvicorn thread beside it on FEDDALE_PORT (default 8003).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
import rq
import uvicorn
from fastapi import FastAPI

from feddale.http_common import (
    DEFAULT_REDIS_URL, STUDENT_QUEUE, Metrics, add_ops_routes, env, env_int, setup_logging,
)

log = logging.getLogger(__name__)


def ops_app(r: redis.Redis, queue: rq.Queue) -> FastAPI:
    app = FastAPI(title="FedDALE student-trainer", version="0.1.0",
                  description="Operational endpoints of the student-training RQ worker.")
    metrics = Metrics("feddale_student_trainer")

    def ping() -> bool:
        try:
            return bool(r.ping())
        except redis.RedisError:
            return False

    def finished() -> float:
        return float(queue.finished_job_registry.count)

    def failed() -> float:
        return float(queue.failed_job_registry.count)

    add_ops_routes(app, metrics, lambda: {"redis": ping()})
    metrics.gauge_fn("queue_depth", lambda: float(len(queue)))
    metrics.gauge_fn("jobs_finished", finished)
    metrics.gauge_fn("jobs_failed", failed)
    return app


def main() -> None:
    setup_logging("student-trainer")
    r = redis.Redis.from_url(env("FEDDALE_REDIS_URL", DEFAULT_REDIS_URL) or DEFAULT_REDIS_URL)
    queue = rq.Queue(STUDENT_QUEUE, connection=r)
    server = uvicorn.Server(uvicorn.Config(
        ops_app(r, queue), host=env("FEDDALE_HOST", "127.0.0.1") or "127.0.0.1",
        port=env_int("FEDDALE_PORT", 8003), log_level="warning", access_log=False,
    ))
    threading.Thread(target=server.run, name="ops-http", daemon=True).start()
    try:
        while True:
            try:
                rq.Worker([queue], connection=r).work(with_scheduler=True)
                return  # warm shutdown (SIGTERM/SIGINT)
            except redis.ConnectionError as exc:  # Redis away: wait for it instead of dying
                log.warning("Redis unavailable (%s); retrying in 2 s", exc)
                time.sleep(2.0)
    finally:
        server.should_exit = True
