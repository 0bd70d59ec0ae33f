"""The RQ worker process, with a small HTTP side door for /healthz, /readyz and /metrics.

RQ's work loop must own the main thread (it handles SIGTERM for warm shutdown and forks a
work-horse per job, so a job's model memory is returned when it ends); the ops endpoints run
in a uvicorn thread beside it on FEDDALE_PORT (default 8003).

RQ forks each work-horse into its own process group, so killing the worker would leave the
horse running on as an orphan, holding the ops port and training a second copy of the student
beside the retry; here a horse dies with its worker and closes the inherited listening socket.

No RQ scheduler runs: retries are immediate, so none is needed. A worker killed mid-job is
noticed through its heartbeat: it renews the job's entry every FEDDALE_JOB_HEARTBEAT_S
seconds, and an entry not renewed for three of those is abandoned, which the coordinator
turns into an RQ retry (a restarted or second worker picks it up).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

import redis
import rq
import uvicorn
from fastapi import FastAPI
from rq.job import Job
from rq.serializers import JSONSerializer

from feddale.service.observability import Metrics, add_ops_routes, setup_logging
from feddale.service.queue import student_queue
from feddale.service.settings import load_settings

from feddale_student_trainer.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_MISSES = 3


class StudentWorker(rq.Worker):
    """RQ's forking worker with a job heartbeat TTL of a few heartbeats instead of RQ's fixed
    interval + 60 s, so an abandoned student job is retried within seconds of the crash."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return max(2, HEARTBEAT_MISSES * int(self.job_monitoring_interval))


PR_SET_PDEATHSIG = 1


def horse_dies_with_worker(server: uvicorn.Server, worker_pid: int) -> None:
    """Run in every forked work-horse: SIGKILL it when the worker dies, and drop the ops listener.

    The listening socket is closed so that only the worker holds the ops port (a restarted
    worker can bind it even while a horse still runs). The parent-death signal is Linux-only;
    elsewhere a horse outlives a killed worker, which costs CPU but publishes nothing twice.
    """
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            try:
                os.close(sock.fileno())
            except OSError:
                pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            return
        if os.getppid() != worker_pid:  # the worker died before prctl took effect
            os._exit(1)


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
    settings = load_settings(Settings)
    setup_logging("student-trainer", settings.log_level, settings.log_format)
    r = redis.Redis.from_url(settings.redis_url)
    queue = student_queue(r)
    heartbeat_s = max(1, settings.job_heartbeat_s)
    server = uvicorn.Server(uvicorn.Config(
        ops_app(r, queue), host=settings.host, port=settings.port, log_level="warning", access_log=False,
        log_config=None,  # through setup_logging's handler, like everything else (text or JSON)
    ))
    threading.Thread(target=server.run, name="ops-http", daemon=True).start()
    worker_pid = os.getpid()
    os.register_at_fork(after_in_child=lambda: horse_dies_with_worker(server, worker_pid))
    try:
        while True:
            worker = None
            try:
                worker = StudentWorker([queue], connection=r, serializer=JSONSerializer,
                                       job_monitoring_interval=heartbeat_s)
                worker.work()
            except redis.ConnectionError as exc:  # Redis away: wait for it instead of dying
                log.warning("Redis unavailable (%s); retrying in 2 s", exc)
            if worker is not None and stop_requested(worker):
                return  # warm shutdown (SIGTERM/SIGINT)
            # RQ's loop also *returns* when Redis vanishes between two jobs ("unhandled exception,
            # quitting"); a worker that quits on a Redis blip would leave every later run waiting.
            log.warning("the RQ work loop ended without a stop request; starting it again in 2 s")
            time.sleep(2.0)
    finally:
        server.should_exit = True


def stop_requested(worker: rq.Worker) -> bool:
    """Whether RQ's loop ended because of SIGTERM/SIGINT (RQ stamps the time of the request)."""
    return getattr(worker, "_shutdown_requested_date", None) is not None
