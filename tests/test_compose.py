"""Static checks of docker-compose.yml: Compose-spec schema plus what the code needs from it.

Docker cannot run in the test suite, so these read the file: it must be valid Compose (the
specification's JSON schema, vendored in tests/data/compose-spec.json from the docker-compose
1.29.2 wheel, the version that runs it in scripts/compose-e2e.sh), and it must give each
service what the code reads (deploy_facts), scale the client nodes, and keep secrets out.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy_facts import ROOT, SERVICE_NAMES, all_env_names, service_facts, url_host, url_port

PROFILES = ROOT / "shared" / "feddale" / "profiles"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"
ENV_EXAMPLE = ROOT / ".env.example"
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def _load() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load()


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} with ``env`` (defaults otherwise)."""
    env = env or {}

    def sub(match: re.Match[str]) -> str:
        name, op, rest = match.groups()
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {rest}")
        return rest or ""

    return INTERPOLATION.sub(sub, value)


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def dockerfile_env(name: str) -> dict[str, str]:
    """ENV of a service image's final stage (the values a container starts with)."""
    text = (ROOT / "services" / name / "Dockerfile").read_text().replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return env


def feddale_services(compose: dict) -> dict[str, dict]:
    return {name: compose["services"][name] for name in SERVICE_NAMES}


# --------------------------------------------------------------------------- schema


def _schema_errors(doc: dict) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text())
    return [e.message for e in jsonschema.Draft201909Validator(schema).iter_errors(doc)]


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    assert _schema_errors(compose) == []


def test_schema_check_rejects_a_broken_file(compose: dict) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["client-node"]["replicas_typo"] = 10
    broken["services"]["redis"]["healthcheck"]["retries"] = "many"
    assert len(_schema_errors(broken)) == 2


# --------------------------------------------------------------------------- build and images


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_build_context_and_dockerfile_exist(compose: dict, name: str) -> None:
    build = compose["services"][name]["build"]
    context = ROOT / build["context"]
    assert context.is_dir()
    assert (context / build["dockerfile"]).is_file()
    assert build["dockerfile"] == f"services/{name}/Dockerfile"
    assert interpolate(compose["services"][name]["image"]) == f"feddale/{name}:latest"


# --------------------------------------------------------------------------- scaling


def test_client_node_is_scalable(compose: dict) -> None:
    node = compose["services"]["client-node"]
    assert "container_name" not in node
    assert "ports" not in node, "a fixed host port would stop `--scale client-node=10`"
    assert "hostname" not in node, "replicas register under their own container hostname"
    assert "FEDDALE_NODE_NAME" not in service_env(node)


def test_detector_publishes_no_fixed_host_port_by_default(compose: dict) -> None:
    (port,) = compose["services"]["detector"]["ports"]
    assert interpolate(str(port)) == "8001", "container port only: each replica gets a free host port"
    assert "container_name" not in compose["services"]["detector"]


def test_coordinator_admin_port_is_loopback_only_by_default(compose: dict) -> None:
    (port,) = compose["services"]["coordinator"]["ports"]
    host_ip, host_port, container_port = interpolate(str(port)).split(":")
    assert host_ip == "127.0.0.1" and int(container_port) == service_facts("coordinator").port


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_every_variable_the_code_needs_is_set_or_defaulted(compose: dict, name: str) -> None:
    facts = service_facts(name)
    env = {**dockerfile_env(name), **service_env(compose["services"][name])}
    for read in facts.env.values():
        if read.required:
            assert read.name in env, f"{name} exits without {read.name}"
        elif read.default and "127.0.0.1" in read.default:
            assert read.name in env, f"{name}: the code's default {read.default!r} is wrong in a container"
    assert env["FEDDALE_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_no_unknown_feddale_variables(compose: dict, name: str) -> None:
    known = all_env_names()
    for var in service_env(compose["services"][name]):
        if var.startswith("FEDDALE_"):
            assert var in known, f"{name} sets {var}, which no code reads (typo?)"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_ports_agree_with_the_code(compose: dict, name: str) -> None:
    facts = service_facts(name)
    env = service_env(compose["services"][name])
    assert int(env["FEDDALE_PORT"]) == facts.port
    assert int(dockerfile_env(name)["FEDDALE_PORT"]) == facts.port


def test_service_urls_name_compose_services_and_their_ports(compose: dict) -> None:
    for name, service in feddale_services(compose).items():
        env = service_env(service)
        if "FEDDALE_COORDINATOR_URL" in service_facts(name).env:
            url = env["FEDDALE_COORDINATOR_URL"]
            assert url_host(url) == "coordinator" and url_port(url) == service_facts("coordinator").port
        if "FEDDALE_REDIS_URL" in service_facts(name).env:
            url = interpolate(env["FEDDALE_REDIS_URL"], {"FEDDALE_REDIS_PASSWORD": "pw"})
            assert url_host(url) == "redis" and url_port(url) == 6379
            assert url_host(url) in compose["services"]


def test_run_profile_exists(compose: dict) -> None:
    profile = interpolate(service_env(compose["services"]["coordinator"])["FEDDALE_CONFIG"])
    assert (PROFILES / f"{profile}.yaml").is_file(), f"profile {profile} is missing"


def test_secrets_come_from_the_env_file_only(compose: dict) -> None:
    secrets = ("FEDDALE_ADMIN_TOKEN", "FEDDALE_BOOTSTRAP_SECRET")
    for name, service in compose["services"].items():
        env = service_env(service)
        for secret in secrets:
            if secret in env:
                assert re.fullmatch(rf"\$\{{{secret}:\?[^}}]+\}}", env[secret]), f"{name}: {secret} hard-coded"
    assert "FEDDALE_ADMIN_TOKEN" not in service_env(compose["services"]["client-node"])
    assert "FEDDALE_ADMIN_TOKEN" not in service_env(compose["services"]["detector"])
    with pytest.raises(KeyError, match="FEDDALE_ADMIN_TOKEN"):
        interpolate(service_env(compose["services"]["coordinator"])["FEDDALE_ADMIN_TOKEN"])


def test_env_example_documents_every_knob_and_holds_no_secret() -> None:
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    used = {match[0] for match in INTERPOLATION.findall(COMPOSE_FILE.read_text())}
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    assert example["FEDDALE_ADMIN_TOKEN"] == "" and example["FEDDALE_BOOTSTRAP_SECRET"] == ""


# --------------------------------------------------------------------------- health and order


def test_healthchecks_hit_endpoints_the_code_serves(compose: dict) -> None:
    for name, service in feddale_services(compose).items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/feddale/healthcheck.py"]
        assert test[3] in service_facts(name).routes, f"{name} serves no {test[3]}"
    assert compose["services"]["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_depends_on_waits_for_healthy_services(compose: dict) -> None:
    for name, service in compose["services"].items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
            assert cond["condition"] == "service_healthy"
            assert "healthcheck" in compose["services"][dep]
            assert "profiles" not in compose["services"][dep], f"{name} would need an opt-in profile"
    assert set(compose["services"]["coordinator"]["depends_on"]) == {"redis"}
    assert "coordinator" in compose["services"]["client-node"]["depends_on"]


def test_redis_persists_to_a_volume(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1]
    assert any(v.split(":")[1] == data_dir and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])


def test_redis_needs_a_password_only_the_coordinator_and_the_trainer_hold(compose: dict) -> None:
    secret = {"FEDDALE_REDIS_PASSWORD": "pw"}
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert interpolate(command[command.index("--requirepass") + 1], secret) == "pw"
    assert interpolate(service_env(redis)["REDISCLI_AUTH"], secret) == "pw"  # the healthcheck's redis-cli
    with pytest.raises(KeyError):  # compose refuses to start without it
        interpolate(command[command.index("--requirepass") + 1], {})
    for name, service in feddale_services(compose).items():
        url = service_env(service).get("FEDDALE_REDIS_URL")
        if name in ("coordinator", "student-trainer"):
            assert url is not None and interpolate(url, secret) == "redis://:pw@redis:6379/0"
        else:
            assert url is None and "REDIS_PASSWORD" not in json.dumps(service), f"{name} must not hold it"


def test_coordinator_artifacts_on_a_named_volume(compose: dict) -> None:
    coordinator = compose["services"]["coordinator"]
    artifact_dir = service_env(coordinator)["FEDDALE_ARTIFACT_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in coordinator["volumes"]}
    assert mounts[artifact_dir] in compose["volumes"]


def test_named_volumes_are_declared(compose: dict) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"


# --------------------------------------------------------------------------- data and GPU


def test_data_prep_fills_the_volume_the_services_read(compose: dict) -> None:
    prep = compose["services"]["data-prep"]
    assert prep["profiles"] == ["data"] and prep["restart"] == "no"
    dest = prep["command"][prep["command"].index("--dest") + 1]
    mount = next(v for v in prep["volumes"] if dest.startswith(v.split(":")[1]))
    for name in ("coordinator", "client-node"):
        service = compose["services"][name]
        assert service_env(service)["FEDDALE_DATA_DIR"] == dest
        assert f"{mount.split(':')[0]}:{mount.split(':')[1]}:ro" in service["volumes"]


def test_gpu_profile_reserves_an_nvidia_gpu_for_teachers(compose: dict) -> None:
    gpu = compose["services"]["client-node-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["FEDDALE_EXTRAS"] == "cuda"
    assert "cu" in interpolate(gpu["build"]["args"]["TORCH_INDEX_URL"]).rsplit("/", 1)[1]
    assert gpu["build"]["dockerfile"] == compose["services"]["client-node"]["build"]["dockerfile"]
    assert "container_name" not in gpu and "ports" not in gpu
    cpu_env = service_env(compose["services"]["client-node"])
    assert {k: v for k, v in cpu_env.items() if k.startswith("FEDDALE_")}.items() <= service_env(gpu).items()


def test_every_variable_set_for_a_container_is_documented(compose: dict) -> None:
    docs = (ROOT / "docs" / "services.md").read_text() + (ROOT / "docs" / "deploy.md").read_text()
    for name in SERVICE_NAMES:
        names = set(service_env(compose["services"][name])) | set(dockerfile_env(name))
        for var in sorted(v for v in names if v.startswith("FEDDALE_")):
            assert f"`{var}" in docs, f"{var} ({name}) is in neither docs/services.md nor docs/deploy.md"
