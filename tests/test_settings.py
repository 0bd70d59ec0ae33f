"""Service settings: pydantic-settings classes, one FEDDALE_ prefix, clear start-up errors, docs in step."""

from __future__ import annotations

import re

import pytest
from deploy_facts import ROOT, SERVICE_NAMES, all_env_names, service_facts

from feddale.service.settings import load_settings

from feddale_coordinator.settings import Settings as CoordinatorSettings
from feddale_detector.settings import Settings as DetectorSettings


def documented_variables() -> set[str]:
    """The FEDDALE_* names in the environment table of docs/services.md."""
    text = (ROOT / "docs" / "services.md").read_text()
    table = text[text.index("## Environment variables"):]
    table = table[: table.index("\n## ", 1)]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `FEDDALE_")]
    return {name for row in rows for name in re.findall(r"`(FEDDALE_[A-Z0-9_]+)`", row)}


def test_the_docs_table_lists_exactly_the_variables_the_code_reads() -> None:
    documented = documented_variables()
    read = all_env_names()
    per_service = set().union(*(service_facts(name).env for name in SERVICE_NAMES))
    assert per_service <= documented, f"read but not documented: {sorted(per_service - documented)}"
    assert documented <= read, f"documented but read nowhere: {sorted(documented - read)}"


def test_missing_and_malformed_variables_stop_start_up_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FEDDALE_ADMIN_TOKEN", "FEDDALE_BOOTSTRAP_SECRET", "FEDDALE_TICK_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", "")  # empty counts as unset (compose leaves `X=`)
    with pytest.raises(SystemExit) as missing:
        load_settings(CoordinatorSettings)
    message = str(missing.value)
    # the bootstrap secret is optional: without it only enrolled nodes join
    assert "\n" not in message and "FEDDALE_ADMIN_TOKEN" in message and "FEDDALE_BOOTSTRAP_SECRET" not in message

    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", "a" * 32)
    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", "b" * 32)
    monkeypatch.setenv("FEDDALE_TICK_S", "soon")
    with pytest.raises(SystemExit, match="FEDDALE_TICK_S"):
        load_settings(CoordinatorSettings)
    monkeypatch.setenv("FEDDALE_TICK_S", "0.25")
    settings = load_settings(CoordinatorSettings)
    assert settings.tick_s == 0.25 and settings.port == 8000 and settings.admin_token == "a" * 32


def test_tls_needs_certificate_and_key_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", "b" * 32)
    monkeypatch.setenv("FEDDALE_TLS_CERT", "/etc/cert.pem")
    monkeypatch.delenv("FEDDALE_TLS_KEY", raising=False)
    with pytest.raises(SystemExit, match="FEDDALE_TLS_CERT and FEDDALE_TLS_KEY must be set together"):
        load_settings(DetectorSettings)


def test_an_unknown_detector_runtime_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", "b" * 32)
    monkeypatch.setenv("FEDDALE_DETECTOR_RUNTIME", "tensorrt")
    with pytest.raises(SystemExit, match="FEDDALE_DETECTOR_RUNTIME"):
        load_settings(DetectorSettings)
    monkeypatch.setenv("FEDDALE_DETECTOR_RUNTIME", "onnx")
    monkeypatch.setenv("FEDDALE_PORT", "9001")
    settings = load_settings(DetectorSettings)
    assert settings.detector_runtime == "onnx" and settings.name.endswith("-9001")


@pytest.mark.parametrize("value, why", [
    ("REPLACE-WITH-ADMIN-TOKEN", "is a template placeholder"),
    ("change-me-please-0123456789", "is a template placeholder"),
    ("short", "is shorter than 16"),
])
def test_placeholder_or_short_secrets_are_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, value: str, why: str
) -> None:
    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", "b" * 32)
    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", value)
    with pytest.raises(SystemExit, match=f"FEDDALE_ADMIN_TOKEN: {why}"):
        load_settings(CoordinatorSettings)
    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", "a" * 32)
    monkeypatch.setenv("FEDDALE_BOOTSTRAP_SECRET", value)
    with pytest.raises(SystemExit, match=f"FEDDALE_BOOTSTRAP_SECRET: {why}"):
        load_settings(DetectorSettings)
