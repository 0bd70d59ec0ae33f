"""The simulator and the deployed services run the same rounds: same seed and data, same outcome.

One tiny few-shot federation (2 clients, 1 FedAvg round, then distillation) runs twice: in
process through ``feddale.harness.simulate.run_federation`` and through real service processes
(Redis, coordinator, student-trainer, detector, 2 client nodes) over HTTP and RQ. Both must pick
the identical pseudo-labels (same selection digest) and train the identical student (same
content digest, which is over the weights). Every process runs torch on one thread so that float
sums happen in the same order; with that, CPU training is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from service_helpers import fast_config, run_to_end

from feddale.harness.simulate import run_federation
from feddale.method.config import load_config
from feddale.ops.launcher import LocalFederation

pytestmark = pytest.mark.e2e

CLIENTS = 2
FEDAVG_ROUNDS = 1


def test_simulate_and_services_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = fast_config(tmp_path, **{"data.n_clients": CLIENTS})
    # A deployment splits its data once, with the profile's seed; a run's seed must match it here.
    seed = load_config(str(config)).seeds[0]

    with LocalFederation(
        CLIENTS, config=str(config), log_dir=tmp_path / "services",
        extra_env={"FEDDALE_TICK_S": "0.2", "OMP_NUM_THREADS": "1"},
    ) as fed:
        view = run_to_end(fed, {"mode": "few_shot", "fedavg_rounds": FEDAVG_ROUNDS, "seed": seed}, timeout=300)
    assert view["status"] == "published", view.get("reason")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(str(config), {"fedavg_rounds": FEDAVG_ROUNDS})
        row = run_federation(cfg, seed, tmp_path / "simulated", [FEDAVG_ROUNDS], progress=False)[0]
    finally:
        torch.set_num_threads(threads)

    simulated = row["pseudo_labels"]
    deployed = view["pseudo_labels"]
    assert (deployed["normal"], deployed["anomalous"]) == (simulated["selected_normal"], simulated["selected_anomalous"])
    assert deployed["digest"] == simulated["selection_digest"], json.dumps([deployed, simulated])
    assert view["student_version"] == row["student_version"]
