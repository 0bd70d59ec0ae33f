"""Static checks of k8s/: Kubernetes schemas offline plus what the services need from the cluster.

No cluster runs here, so every manifest is validated against the bundled Kubernetes OpenAPI
schemas of `kubernetes-validate` (strict: unknown fields fail) for the oldest and newest
Kubernetes versions we target, and the objects are checked against each other and against
the code (deploy_facts): selectors, Service ports, probe paths, env keys, network fences.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_facts import ROOT, SERVICE_NAMES, all_env_names, service_facts, url_host, url_port

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (in locks/dev.txt) is not installed"
)

K8S = ROOT / "k8s"
GPU_OVERLAY = K8S / "overlays" / "gpu"
KUBE_VERSIONS = ("1.28.0", "1.37.0")
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
NAMESPACE = "feddale"


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


SECRET_TEMPLATE = K8S / "templates" / "secret.yaml"


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    """What `kubectl apply -f k8s/` applies, plus the Secret the operator creates (from its template)."""
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in _load(path)] + _load(SECRET_TEMPLATE)
    assert docs, "k8s/ holds no manifests"
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def container_env(workload: dict[str, Any], configmap: dict[str, Any]) -> dict[str, Any]:
    """Env as the container sees it: ConfigMap via envFrom, then explicit env entries."""
    c = container(workload)
    env: dict[str, Any] = {}
    for source in c.get("envFrom", []):
        assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
        env.update(configmap["data"])
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def strategic_merge(base: Any, patch: Any) -> Any:
    """The part of kubectl's strategic merge the GPU overlay uses: maps merge, named lists by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        merged = {x["name"]: x for x in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged.get(item["name"], {}), item)
        return list(merged.values())
    return patch


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schema(manifests: list[dict[str, Any]], version: str) -> None:
    for doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_check_rejects_a_broken_manifest(manifests: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(find(manifests, "Deployment", "coordinator"))
    container(broken)["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


def test_everything_lives_in_the_feddale_namespace(manifests: list[dict[str, Any]]) -> None:
    find(manifests, "Namespace", NAMESPACE)
    for doc in manifests:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


def test_namespace_is_applied_first() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert _load(files[0])[0]["kind"] == "Namespace", "`kubectl apply -f k8s/` goes in file-name order"


def test_kustomization_lists_exactly_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "Kustomization").read_text())
    assert kustomization["resources"] == sorted(p.name for p in K8S.glob("*.yaml"))
    assert {i["name"] for i in kustomization["images"]} == {f"feddale/{n}" for n in SERVICE_NAMES}


# --------------------------------------------------------------------------- the required objects


def test_the_issue_s_objects_exist(manifests: list[dict[str, Any]]) -> None:
    find(manifests, "ConfigMap", "feddale-config")
    find(manifests, "Secret", "feddale-secrets")
    redis = find(manifests, "StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"]
    find(manifests, "Deployment", "coordinator")
    find(manifests, "Service", "coordinator")
    find(manifests, "PersistentVolumeClaim", "coordinator-artifacts")
    find(manifests, "Deployment", "student-trainer")
    find(manifests, "Deployment", "detector")
    find(manifests, "Service", "detector")
    hpa = find(manifests, "HorizontalPodAutoscaler", "detector")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "detector"}
    nodes = find(manifests, "StatefulSet", "client-node")
    assert nodes["spec"]["replicas"] == 10
    governing = find(manifests, "Service", nodes["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


def test_secret_is_a_template_without_real_values(manifests: list[dict[str, Any]]) -> None:
    secret = find(manifests, "Secret", "feddale-secrets")
    assert set(secret["stringData"]) == {"FEDDALE_ADMIN_TOKEN", "FEDDALE_BOOTSTRAP_SECRET", "REDIS_PASSWORD"}
    assert all(v.startswith("REPLACE-WITH-") for v in secret["stringData"].values())
    assert len(set(secret["stringData"].values())) == 3, "distinct placeholders, so sed can fill each"
    assert secret["metadata"]["labels"]["feddale.io/secret-template"] == "true"
    others = [d for d in manifests if d is not secret]
    assert not any("feddale.io/secret-template" in d["metadata"].get("labels", {}) for d in others)


def test_applying_the_folder_never_overwrites_a_real_secret() -> None:
    """`kubectl apply -f k8s/` (not recursive) and `-k k8s/` must not carry the placeholder Secret."""
    applied = [doc for path in sorted(K8S.glob("*.yaml")) for doc in _load(path)]
    assert not [d for d in applied if d["kind"] == "Secret"]
    kustomization = yaml.safe_load((K8S / "Kustomization").read_text())
    assert not any("secret" in resource for resource in kustomization["resources"])


def test_coordinator_artifacts_on_its_claim(manifests: list[dict[str, Any]]) -> None:
    coordinator = find(manifests, "Deployment", "coordinator")
    configmap = find(manifests, "ConfigMap", "feddale-config")
    artifact_dir = container_env(coordinator, configmap)["FEDDALE_ARTIFACT_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in container(coordinator)["volumeMounts"]}
    volumes = {v["name"]: v for v in coordinator["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[artifact_dir]]["persistentVolumeClaim"]["claimName"]
    find(manifests, "PersistentVolumeClaim", claim)
    assert coordinator["spec"]["strategy"]["type"] == "Recreate"


# --------------------------------------------------------------------------- wiring


def test_selectors_match_pod_labels(manifests: list[dict[str, Any]]) -> None:
    for w in workloads(manifests):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]


def _pods_for(manifests: list[dict[str, Any]], selector: dict[str, str]) -> list[dict[str, Any]]:
    return [w for w in workloads(manifests) if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]


def test_services_select_a_workload_and_target_its_ports(manifests: list[dict[str, Any]]) -> None:
    for service in (d for d in manifests if d["kind"] == "Service"):
        (workload,) = _pods_for(manifests, service["spec"]["selector"])
        ports = container(workload)["ports"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            match = [p for p in ports if target in (p.get("name"), p["containerPort"])]
            assert match, f"Service {service['metadata']['name']} targets {target}, not a container port"
            assert match[0]["containerPort"] == port["port"], "Service and container ports differ"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_container_ports_and_probes_agree_with_the_code(manifests: list[dict[str, Any]], name: str) -> None:
    facts = service_facts(name)
    workload = next(w for w in workloads(manifests) if w["metadata"]["name"] == name)
    c = container(workload)
    assert c["image"] == f"feddale/{name}:latest"
    (port,) = c["ports"]
    assert port["containerPort"] == facts.port
    env = container_env(workload, find(manifests, "ConfigMap", "feddale-config"))
    assert int(env["FEDDALE_PORT"]) == facts.port
    assert env["FEDDALE_HOST"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in facts.routes, f"{name} serves no {get['path']}"
        assert get["port"] in (port["name"], port["containerPort"])


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_env_gives_the_code_what_it_needs(manifests: list[dict[str, Any]], name: str) -> None:
    facts = service_facts(name)
    workload = next(w for w in workloads(manifests) if w["metadata"]["name"] == name)
    env = container_env(workload, find(manifests, "ConfigMap", "feddale-config"))
    for read in facts.env.values():
        if read.required:
            assert read.name in env, f"{name} exits without {read.name}"
        elif read.default and "127.0.0.1" in read.default:
            assert read.name in env, f"{name}: the code's default {read.default!r} is wrong in a pod"
    known = all_env_names()
    assert {k for k in env if k.startswith("FEDDALE_")} <= known, "a FEDDALE_ name no code reads"


def test_env_references_resolve(manifests: list[dict[str, Any]]) -> None:
    secret = find(manifests, "Secret", "feddale-secrets")
    for w in workloads(manifests):
        for item in container(w).get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    for name in ("client-node", "detector", "student-trainer"):
        env = container(find(manifests, "Deployment" if name != "client-node" else "StatefulSet", name))["env"]
        assert "FEDDALE_ADMIN_TOKEN" not in {e["name"] for e in env}, f"{name} must not hold the admin token"


def test_internal_urls_name_services(manifests: list[dict[str, Any]]) -> None:
    data = find(manifests, "ConfigMap", "feddale-config")["data"]
    coordinator = find(manifests, "Service", url_host(data["FEDDALE_COORDINATOR_URL"]))
    assert coordinator["spec"]["ports"][0]["port"] == url_port(data["FEDDALE_COORDINATOR_URL"])
    assert (ROOT / "shared" / "feddale" / "profiles" / f"{data['FEDDALE_CONFIG']}.yaml").is_file()
    assert "FEDDALE_REDIS_URL" not in data, "the Redis URL carries its password: only the pods that need it"


def test_redis_needs_a_password_only_the_coordinator_and_the_trainer_hold(manifests: list[dict[str, Any]]) -> None:
    redis_set = find(manifests, "StatefulSet", "redis")
    args = container(redis_set)["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    redis_env = {e["name"]: e for e in container(redis_set)["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    assert redis_env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"  # the probes
    service = find(manifests, "Service", "redis")
    for w in workloads(manifests):
        if w["metadata"]["name"] == "redis":
            continue
        env = [e["name"] for e in container(w).get("env", [])]
        if w["metadata"]["name"] in ("coordinator", "student-trainer"):
            assert env.index("REDIS_PASSWORD") < env.index("FEDDALE_REDIS_URL"), "defined before it is expanded"
            url = next(e["value"] for e in container(w)["env"] if e["name"] == "FEDDALE_REDIS_URL")
            assert url == f"redis://:$(REDIS_PASSWORD)@redis:{service['spec']['ports'][0]['port']}/0"
        else:
            assert "REDIS_PASSWORD" not in env and "FEDDALE_REDIS_URL" not in env, w["metadata"]["name"]


def test_volume_mounts_have_volumes(manifests: list[dict[str, Any]]) -> None:
    for w in workloads(manifests):
        spec = w["spec"]
        names = {v["name"] for v in spec["template"]["spec"].get("volumes", [])}
        names |= {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for mount in container(w).get("volumeMounts", []):
            assert mount["name"] in names, f"{w['metadata']['name']} mounts unknown volume {mount['name']}"


# --------------------------------------------------------------------------- hardening


def test_every_container_is_non_root_read_only_and_bounded(manifests: list[dict[str, Any]]) -> None:
    for w in workloads(manifests):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        c = container(w)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{w['metadata']['name']} {bound}"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if w["metadata"]["name"] in SERVICE_NAMES:
            assert {"/tmp", "/var/cache/feddale"} <= mounts, "writable dirs on a read-only root"


def test_feddale_pods_run_as_the_image_user(manifests: list[dict[str, Any]]) -> None:
    for name in SERVICE_NAMES:
        w = next(w for w in workloads(manifests) if w["metadata"]["name"] == name)
        dockerfile = (ROOT / "services" / name / "Dockerfile").read_text()
        assert f"USER {w['spec']['template']['spec']['securityContext']['runAsUser']}:" in dockerfile


# --------------------------------------------------------------------------- network policy


def _policies(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in manifests if d["kind"] == "NetworkPolicy"]


def test_network_policies_select_existing_pods(manifests: list[dict[str, Any]]) -> None:
    for policy in _policies(manifests):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert _pods_for(manifests, selector), f"{policy['metadata']['name']} selects no pods"
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert _pods_for(manifests, peer["podSelector"]["matchLabels"])


def test_ingress_is_denied_by_default_and_only_the_detector_is_open(manifests: list[dict[str, Any]]) -> None:
    policies = _policies(manifests)
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies)
    open_to_all = [p for p in policies for rule in p["spec"].get("ingress", []) if "from" not in rule]
    assert [p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in open_to_all] == ["detector"]
    assert open_to_all[0]["spec"]["ingress"][0]["ports"][0]["port"] == service_facts("detector").port


def test_client_nodes_reach_only_the_coordinator(manifests: list[dict[str, Any]]) -> None:
    (egress,) = [p for p in _policies(manifests)
                 if "Egress" in p["spec"]["policyTypes"]
                 and p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "client-node"}]
    destinations = []
    for rule in egress["spec"]["egress"]:
        for peer in rule["to"]:
            name = peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
            ports = {p["port"] for p in rule["ports"]}
            destinations.append((name, ports))
    assert ("coordinator", {service_facts("coordinator").port}) in destinations
    assert all(name == "coordinator" or ports == {53} for name, ports in destinations), destinations


# --------------------------------------------------------------------------- GPU overlay


def test_gpu_overlay_patches_the_client_nodes_onto_gpus(manifests: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((GPU_OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../.."]
    assert (GPU_OVERLAY / kustomization["resources"][0] / "Kustomization").is_file()
    (patch_ref,) = kustomization["patches"]
    target = patch_ref["target"]
    base = find(manifests, target["kind"], target["name"])
    patch = _load(GPU_OVERLAY / patch_ref["path"])[0]
    assert (patch["kind"], patch["metadata"]["name"]) == (target["kind"], target["name"])
    patched = strategic_merge(base, patch)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)
    c = container(patched)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"] == container(base)["readinessProbe"], "the patch must keep the probes"
    assert kustomization["images"] == [{"name": "feddale/client-node", "newTag": "latest-cuda"}]
