"""TLS by configuration: a coordinator and a detector started as real processes with
FEDDALE_TLS_CERT/FEDDALE_TLS_KEY serve HTTPS only, with a self-signed certificate made here by
openssl. A detector given the certificate as FEDDALE_TLS_CA registers with the coordinator
over TLS; one without it refuses the unverifiable certificate and never registers."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from service_helpers import ADMIN, BOOTSTRAP, fast_config

from feddale.service.auth import auth_headers
from feddale.service.http import poll_until
from feddale.ops.launcher import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FEDDALE_")}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env={**base, **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def status(url: str, path: str, verify: object, headers: dict[str, str] | None = None) -> int:
    try:
        return httpx.get(f"{url}{path}", verify=verify, headers=headers, timeout=5).status_code
    except httpx.HTTPError:
        return -1


@pytest.fixture(scope="module")
def tls_services(tmp_path_factory: pytest.TempPathFactory, redis_server: str, cert: tuple[Path, Path]) -> Iterator[dict]:
    redis.Redis.from_url(redis_server).flushall()
    work = tmp_path_factory.mktemp("tls-services")
    cert_file, key_file = (str(p) for p in cert)
    c_port, d_port, u_port = free_port(), free_port(), free_port()
    coordinator_url = f"https://127.0.0.1:{c_port}"
    common = {"FEDDALE_BOOTSTRAP_SECRET": BOOTSTRAP, "FEDDALE_HOST": "127.0.0.1", "FEDDALE_COORDINATOR_URL": coordinator_url,
              "FEDDALE_STUDENT_POLL_S": "1", "PYTHONUNBUFFERED": "1"}
    coordinator = start("feddale_coordinator", {
        **common, "FEDDALE_REDIS_URL": redis_server, "FEDDALE_ADMIN_TOKEN": ADMIN, "FEDDALE_PORT": str(c_port),
        "FEDDALE_ARTIFACT_DIR": str(work / "artifacts"), "FEDDALE_CONFIG": str(fast_config(work)),
        "FEDDALE_TLS_CERT": cert_file, "FEDDALE_TLS_KEY": key_file,
    }, work / "coordinator.log")
    services = {"coordinator": coordinator_url, "detector": f"https://127.0.0.1:{d_port}",
                "untrusted": f"http://127.0.0.1:{u_port}", "cert": ssl.create_default_context(cafile=cert_file),
                "key": key_file, "work": work}
    detectors: list[subprocess.Popen[bytes]] = []
    try:
        assert poll_until(lambda: status(coordinator_url, "/healthz", cert_file) == 200, 120, 0.2), \
            f"the coordinator did not come up over HTTPS; see {work}"
        detectors.append(start("feddale_detector", {
            **common, "FEDDALE_PORT": str(d_port), "FEDDALE_NODE_NAME": "det-trusting", "FEDDALE_TLS_CA": cert_file,
            "FEDDALE_TLS_CERT": cert_file, "FEDDALE_TLS_KEY": key_file,
        }, work / "detector.log"))
        detectors.append(start("feddale_detector", {  # plain HTTP itself, no CA for the coordinator's certificate
            **common, "FEDDALE_PORT": str(u_port), "FEDDALE_NODE_NAME": "det-untrusting",
        }, work / "detector-untrusting.log"))
        assert poll_until(lambda: status(services["detector"], "/healthz", cert_file) == 200, 120, 0.2), \
            f"the detector did not come up over HTTPS; see {work}"
        assert poll_until(lambda: status(services["untrusted"], "/healthz", True) == 200, 120, 0.2)
        yield services
    finally:
        stop(*detectors, coordinator)


def test_services_speak_https_only_with_the_configured_certificate(tls_services: dict) -> None:
    for name in ("coordinator", "detector"):
        url = tls_services[name]
        assert status(url, "/healthz", tls_services["cert"]) == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz", timeout=5)  # system trust store: the self-signed cert is refused
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url.replace('https://', 'http://')}/healthz", timeout=5)  # no plain HTTP on that port


def test_a_detector_with_the_ca_registers_over_tls_and_one_without_cannot(tls_services: dict) -> None:
    cert = tls_services["cert"]
    assert poll_until(lambda: status(tls_services["detector"], "/healthz", cert) == 200, 60), \
        "the trusting detector cannot reach the coordinator over TLS"

    def detectors() -> set[str]:
        clients = httpx.get(f"{tls_services['coordinator']}/v1/clients", headers=auth_headers(ADMIN), verify=cert,
                            timeout=10).json()
        return {c["name"] for c in clients if c["role"] == "detector"}

    assert poll_until(lambda: "det-trusting" in detectors(), 60)
    untrusted = httpx.get(f"{tls_services['untrusted']}/readyz", timeout=10)
    assert untrusted.status_code == 503 and untrusted.json()["checks"] == {"student": False}
    assert "det-untrusting" not in detectors()
    log = tls_services["work"] / "detector-untrusting.log"
    assert poll_until(lambda: "CERTIFICATE_VERIFY_FAILED" in log.read_text(), 60), "it does not say why"


def test_a_certificate_without_its_key_is_a_startup_error(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    env = {"FEDDALE_BOOTSTRAP_SECRET": BOOTSTRAP, "FEDDALE_PORT": str(free_port()), "FEDDALE_TLS_CERT": str(cert[0]),
           "FEDDALE_COORDINATOR_URL": "http://127.0.0.1:9"}
    process = start("feddale_detector", env, tmp_path / "detector.log")
    assert process.wait(120) != 0
    assert "FEDDALE_TLS_CERT and FEDDALE_TLS_KEY must be set together" in (tmp_path / "detector.log").read_text()
