"""deploy/monitoring and k8s/monitoring: every metric they read is one the services export.

An alert on a metric nobody exports never fires, silently; so each `feddale_*` name in the
alert rules and the Grafana dashboard is checked against the names the code registers, read
from the source through `ast` (each service's own `metrics.<kind>("name", ...)` calls and those
of the shared modules it uses, under its `Metrics("namespace")`). Recording rules (`feddale:...`)
must be defined in the rule file. The k8s objects are checked against the Services they scrape.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_facts import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
K8S_MONITORING = ROOT / "k8s" / "monitoring"
SHARED_SERVICE = ROOT / "shared" / "feddale" / "service"
SERVICES = {"coordinator": "feddale_coordinator", "detector": "feddale_detector",
            "client-node": "feddale_client_node", "student-trainer": "feddale_student_trainer"}
RECORDERS = {"inc", "set", "observe", "gauge_fn", "info_fn", "describe"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC = re.compile(r"\bfeddale_[a-z0-9_]+\b")
RECORDED = re.compile(r"\bfeddale:[a-z0-9_:]+\b")


def _names_in(path: Path) -> set[str]:
    """Metric names given as the first argument of ``<something metrics>.inc|set|observe|...("name")``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RECORDERS
                and "metrics" in ast.unparse(node.func.value).lower() and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def _namespace(package: Path) -> str:
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Metrics":
                return node.args[0].value  # type: ignore[attr-defined]
    raise AssertionError(f"{package}: no Metrics(namespace)")


@cache
def exported() -> frozenset[str]:
    """Every ``<namespace>_<name>`` the services can export (histograms with their suffixes)."""
    out: set[str] = set()
    for service, package_name in SERVICES.items():
        package = ROOT / "services" / service / package_name
        source = "\n".join(p.read_text() for p in package.rglob("*.py"))
        used = {m.stem for m in SHARED_SERVICE.glob("*.py") if f"feddale.service.{m.stem} import" in source}
        used |= {"observability"}  # add_ops_routes: request metrics in every service
        names = set().union(*(_names_in(p) for p in package.rglob("*.py")),
                            *(_names_in(SHARED_SERVICE / f"{m}.py") for m in used))
        prefix = _namespace(package)
        for name in names:
            out.add(f"{prefix}_{name}")
            out.update(f"{prefix}_{name}{suffix}" for suffix in HISTOGRAM_SUFFIXES)
    return frozenset(out)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def test_the_code_scan_finds_the_metrics_it_should() -> None:
    """Guards the scanner itself: names registered in different ways are all found."""
    for name in ("feddale_coordinator_runs_finished_total", "feddale_coordinator_clients_alive",
                 "feddale_coordinator_student_promoted_info", "feddale_detector_model_loaded",
                 "feddale_detector_model_info", "feddale_detector_verdicts_total",
                 "feddale_detector_http_request_seconds_bucket", "feddale_client_node_model_info"):
        assert name in exported(), name
    assert "feddale_coordinator_verdicts_total" not in exported()  # the coordinator serves no /v1/detect


def test_every_alert_rule_reads_exported_metrics() -> None:
    rules = _rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert {"FeddaleClientMissing", "FeddaleRunFailed", "FeddaleDetectorWithoutStudent",
            "FeddaleAnomalyRateJump"} <= alerts
    for rule in rules:
        unknown = set(METRIC.findall(rule["expr"])) - exported()
        assert not unknown, f"{rule.get('alert') or rule.get('record')} reads metrics nobody exports: {unknown}"
        assert set(RECORDED.findall(rule["expr"])) - {rule.get("record")} <= recorded
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]


def test_every_dashboard_panel_reads_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    assert dashboard["uid"] == "feddale" and dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert METRIC.search(expr) or RECORDED.search(expr), f"{panel['title']}: no FedDALE metric"
            assert not set(METRIC.findall(expr)) - exported(), f"{panel['title']}: {expr}"
            assert set(RECORDED.findall(expr)) <= recorded, f"{panel['title']}: {expr}"
            assert target["datasource"]["uid"] == "${datasource}"


def _k8s(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_prometheus_rule_is_the_rule_file() -> None:
    (rule,) = _k8s(K8S_MONITORING / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["namespace"] == "feddale"
    assert rule["spec"]["groups"] == yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]


def test_the_service_monitor_scrapes_every_service_on_its_metrics_port() -> None:
    (monitor,) = _k8s(K8S_MONITORING / "servicemonitor.yaml")
    services = [d for p in sorted((ROOT / "k8s").glob("*.yaml")) for d in _k8s(p) if d["kind"] == "Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    scraped = {s["metadata"]["name"] for s in services
               if selector.items() <= s["metadata"].get("labels", {}).items()
               and endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]}}
    assert {"coordinator", "detector", "client-node"} <= scraped
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["feddale"]
    kustomization = yaml.safe_load((K8S_MONITORING / "Kustomization").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_MONITORING.glob("*.yaml"))


def test_the_metrics_network_policy_matches_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    (policy,) = _k8s(K8S_MONITORING / "networkpolicy.yaml")
    kubernetes_validate.validate(policy, "1.37.0", strict=True)
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}]
