"""The operator CLI (`feddale runs|clients ...`) against real service processes on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from service_helpers import fast_config

from feddale.ops.launcher import LocalFederation

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    work = tmp_path_factory.mktemp("operate")
    with LocalFederation(2, config=str(fast_config(work)), log_dir=work,
                         extra_env={"FEDDALE_TICK_S": "0.2", "FEDDALE_STUDENT_POLL_S": "1"}) as federation:
        yield federation


def test_start_wait_list_show_and_clients(cli) -> None:
    code, out, _ = cli("clients", "list")
    assert code == 0 and out.count("client ") == 2 and "detector" in out
    # the client nodes have polled for tasks by now; every line says when its node was last seen
    assert out.count("last seen ") + out.count("never seen") == 3 and out.count("last seen ") >= 2, out

    code, out, err = cli("runs", "start", "--mode", "one_shot", "--min-clients", "2", "--wait")
    assert code == 0, err
    run_id = out.splitlines()[0]
    assert "published student " in out

    code, out, _ = cli("runs", "list")
    assert code == 0 and run_id in out and "published" in out
    code, out, _ = cli("runs", "show", run_id)
    view = json.loads(out)
    assert code == 0 and view["status"] == "published" and view["pseudo_labels"]["normal"] > 0
    assert "config" not in view


def test_cancel_mid_round_leaves_a_consistent_state(cli, fed: LocalFederation) -> None:
    # min_clients above the federation's size: the round cannot close on its own
    code, out, err = cli("runs", "start", "--mode", "few_shot", "--rounds", "1", "--min-clients", "3",
                         "--set", "round_deadline_s=600")
    assert code == 0, err
    run_id = out.strip()
    code, out, _ = cli("runs", "cancel", run_id)
    assert code == 0 and out.strip() == f"run {run_id} cancelled"

    code, out, _ = cli("runs", "wait", run_id)
    assert code == 1 and "cancelled by the operator" in out
    code, _, err = cli("runs", "cancel", run_id)
    assert code == 2 and "already ended" in err and "\n" not in err.strip()

    # nothing is left active: the next run starts and publishes
    code, out, err = cli("runs", "start", "--min-clients", "2", "--wait")
    assert code == 0, err


def test_errors_are_one_line(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli("runs", "start", "--set", "filter=mode")
    assert code == 2 and "filter" in err and err.count("\n") == 1
    code, _, err = cli("runs", "show", "run-does-not-exist")
    assert code == 2 and "404" in err
    monkeypatch.setenv("FEDDALE_ADMIN_TOKEN", "wrong-token-for-this-test")
    code, _, err = cli("runs", "list")
    assert code == 2 and "401" in err and "Traceback" not in err
