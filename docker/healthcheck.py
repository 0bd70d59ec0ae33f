"""Container health check for FedDALE images (HEALTHCHECK, compose healthcheck, k8s exec probes).

Why a script instead of curl: the slim images carry no curl, and the check must follow the
service's own settings (FEDDALE_PORT, TLS on or off) rather than a port baked into the image.

  healthcheck.py [PATH]   GET PATH (default /healthz) on this container's FEDDALE_PORT

Exit status 0 means healthy; anything else is printed to stderr and exits 1.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def check_http(path: str, timeout: float = 4.0) -> None:
    """The service answers 2xx on ``path`` at 127.0.0.1:FEDDALE_PORT (https when TLS is on)."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    port = int(_env("FEDDALE_PORT", "8000"))  # every HTTP image sets its own FEDDALE_PORT
    context = None
    scheme = "http"
    if os.environ.get("FEDDALE_TLS_CERT", "").strip():
        # The certificate names the service, not 127.0.0.1; this only asks "is my own process up".
        scheme = "https"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    url = f"{scheme}://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{url} answered {response.status}")


def main(argv: list[str]) -> int:
    try:
        if len(argv) > 1:
            raise ValueError("usage: healthcheck.py [PATH]")
        check_http(argv[0] if argv else "/healthz")
    except (OSError, RuntimeError, ValueError, urllib.error.URLError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a health check reports, it never crashes with a traceback
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
