"""What the code says a deployment must provide, read from the source for the deployment tests.

docker-compose.yml, k8s/ and the Dockerfiles are checked against these facts: the ports the
services listen on by default, the FEDDALE_* variables they read (and which have no default),
and the HTTP routes they serve. The facts come from the services' source through `ast`, never
by importing it (no torch, no web stack, fast), so renaming a variable or changing a default
port in the code fails these tests instead of a pod in production.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
SERVICE_NAMES = ("coordinator", "client-node", "student-trainer", "detector")
CORE = ROOT / "shared" / "feddale"

_ENV_READERS = {"getenv"}


@dataclass(frozen=True)
class EnvRead:
    name: str
    required: bool          # no default: the process exits without it
    default: str | None     # the literal default, when the code gives one


@dataclass(frozen=True)
class ServiceFacts:
    name: str                       # services/<name>, compose service, k8s workload
    package: str                    # started as `python -m <package>`
    port: int                       # FEDDALE_PORT default in the code
    env: dict[str, EnvRead]         # FEDDALE_* read by this process (its package + the core)
    routes: frozenset[str]          # GET paths its app serves


def _python_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


@cache
def _module_constants() -> dict[str, str]:
    """Module-level string constants of the core and all services (e.g. DEFAULT_REDIS_URL)."""
    constants: dict[str, str] = {}
    for path in _python_files(CORE, ROOT / "services"):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        constants[target.id] = node.value.value
    return constants


def _literal(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and node.value is not None:
        return str(node.value)
    if isinstance(node, ast.Name):
        return _module_constants().get(node.id)
    return None


def _is_os_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def env_reads(paths: list[Path]) -> dict[str, EnvRead]:
    """Every FEDDALE_* variable read directly in ``paths``: os.getenv / os.environ.get / os.environ[...].

    Services read theirs through pydantic-settings classes (:func:`settings_fields`); the core
    library reads a few (cache, config and data folders) directly.
    """
    reads: dict[str, EnvRead] = {}

    def add(name: str | None, required: bool, default: str | None) -> None:
        if name and name.startswith("FEDDALE_"):
            seen = reads.get(name)
            reads[name] = EnvRead(name, required or bool(seen and seen.required),
                                  default if default is not None else (seen.default if seen else None))

    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                fname = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                is_environ_get = fname == "get" and _is_os_environ(getattr(func, "value", None))
                if fname in _ENV_READERS or is_environ_get:
                    default = _literal(node.args[1]) if len(node.args) > 1 else None
                    add(_literal(node.args[0]), False, default)
            elif isinstance(node, ast.Subscript) and _is_os_environ(node.value) and isinstance(node.ctx, ast.Load):
                add(_literal(node.slice), True, None)
    return reads


def _settings_classes() -> dict[str, ast.ClassDef]:
    """Every class in the core and the services, by name (settings classes among them)."""
    return {
        node.name: node
        for path in _python_files(CORE, ROOT / "services")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef)
    }


def settings_fields(package_dir: Path) -> dict[str, EnvRead]:
    """FEDDALE_* variables of the package's pydantic-settings ``Settings`` class, with inherited fields.

    A field ``x`` is read from ``FEDDALE_X``; it is required when it has no default.
    """
    classes = _settings_classes()
    own = [node for path in _python_files(package_dir) for node in ast.parse(path.read_text()).body
           if isinstance(node, ast.ClassDef) and node.name == "Settings"]
    if len(own) != 1:
        raise ValueError(f"{package_dir}: expected one Settings class, found {len(own)}")
    fields: dict[str, EnvRead] = {}

    def collect(node: ast.ClassDef) -> None:
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                collect(classes[base.id])
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                name = "FEDDALE_" + item.target.id.upper()
                fields[name] = EnvRead(name, item.value is None, _literal(item.value))

    collect(own[0])
    return fields


def _default_port(package_dir: Path) -> int:
    """The port a service listens on without FEDDALE_PORT: its Settings' ``port`` default."""
    port = settings_fields(package_dir)["FEDDALE_PORT"].default
    if port is None:
        raise ValueError(f"{package_dir}: Settings.port has no literal default")
    return int(port)


def _get_routes(paths: list[Path]) -> set[str]:
    """Paths of `@app.get("/...")` handlers in ``paths``."""
    routes = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for deco in node.decorator_list:
                    if (isinstance(deco, ast.Call) and getattr(deco.func, "attr", None) == "get"
                            and deco.args and isinstance(deco.args[0], ast.Constant)):
                        routes.add(deco.args[0].value)
    return routes


def _calls(paths: list[Path], name: str) -> bool:
    return any(
        isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name
        for path in paths for node in ast.walk(ast.parse(path.read_text()))
    )


@cache
def service_facts(name: str) -> ServiceFacts:
    if name not in SERVICE_NAMES:
        raise ValueError(f"unknown service {name!r}; expected one of {SERVICE_NAMES}")
    package = "feddale_" + name.replace("-", "_")
    package_dir = ROOT / "services" / name / package
    own = _python_files(package_dir)
    routes = _get_routes(own)
    if _calls(own, "add_ops_routes"):
        routes |= _get_routes([CORE / "service" / "observability.py"])
    if _calls(own, "add_detect_routes"):
        routes |= _get_routes([CORE / "service" / "serving.py"])
    return ServiceFacts(
        name=name,
        package=package,
        port=_default_port(package_dir),
        env={**env_reads(own + _python_files(CORE)), **settings_fields(package_dir)},
        routes=frozenset(routes),
    )


def all_env_names() -> set[str]:
    """Every FEDDALE_* variable read anywhere in the core or the services."""
    names = set(env_reads(_python_files(CORE, ROOT / "services")))
    for name in SERVICE_NAMES:
        names |= set(service_facts(name).env)
    return names


def url_port(url: str) -> int:
    parts = urlsplit(url)
    if parts.port is None:
        raise ValueError(f"{url!r} names no port")
    return parts.port


def url_host(url: str) -> str:
    host = urlsplit(url).hostname
    if not host:
        raise ValueError(f"{url!r} names no host")
    return host
