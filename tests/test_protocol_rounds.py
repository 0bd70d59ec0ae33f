"""The round functions both transports drive, on tiny models: client rounds, FedAvg closes, distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddale.data.deployment import federation_split, public_digest
from feddale.method import adapters
from feddale.method.config import load_config
from feddale.method.detector import Detector
from feddale.method.payload import PayloadError
from feddale.method.threshold import decision_threshold
from feddale.protocol import rounds
from feddale.protocol.messages import PublicRef, Task


CFG = load_config("tiny", {
    "data.n_clients": 2, "data.public": [6, 6], "data.test": [10, 10], "data.validation": [5, 5],
    "data.source": "synthetic:200,60",
    "teacher.steps": 2, "teacher.batch_size": 2, "teacher.micro_batch": 2, "teacher.max_len": 64,
    "score.kind": "mean", "score.micro_batch": 16, "student.steps": 2, "k_normal": 3, "k_anomalous": 3,
    "fedavg_rounds": 2,
})


@pytest.fixture(scope="module")
def split():
    return federation_split(CFG.data, CFG.seeds[0])


@pytest.fixture(scope="module")
def teacher():
    return rounds.load_teacher(CFG)


def task(round_no: int, kind: str, split=None) -> Task:
    public = None
    if split is not None:
        public = PublicRef(digest=public_digest(split.public), count=len(split.public), path="in-process")
    return Task(run_id="run-test", round=round_no, kind=kind, config=CFG.model_dump(mode="json"),
                global_adapter=None, public=public, deadline_at=0.0)


def state_of(blob: bytes) -> dict[str, torch.Tensor]:
    return adapters.adapter_from_bytes(blob)[0]


def test_local_seeds_differ_by_run_round_and_shard() -> None:
    seeds = {rounds.local_seed(run, r, shard) for run in (0, 1) for r in (1, 2, 3) for shard in range(10)}
    assert len(seeds) == 2 * 3 * 10


def test_two_fedavg_rounds_then_distillation(split, teacher) -> None:
    """Round 2 starts from round 1's average, and the second average differs from the first."""
    global_adapter = None
    averages = []
    for round_no in (1, 2):
        uploads = []
        for shard, sessions in enumerate(split.clients):
            teacher.reset()
            up = rounds.client_round(task(round_no, "fedavg"), teacher, sessions, shard=shard, client_id=f"c{shard}",
                                     global_adapter=global_adapter)
            assert up.adapter is not None and up.scores == {} and up.samples == len(sessions)
            uploads.append((up.adapter, up.samples))
        closed = rounds.close_round("fedavg", round_no, uploads)
        assert isinstance(closed, rounds.NextRound) and closed.round == round_no + 1
        global_adapter = closed.global_adapter
        averages.append(state_of(global_adapter))
    key = sorted(averages[0])[0]
    assert not torch.equal(averages[0][key], averages[1][key])

    payloads = {}
    for shard, sessions in enumerate(split.clients):
        teacher.reset()
        up = rounds.client_round(task(3, "distill", split), teacher, sessions, shard=shard, client_id=f"c{shard}",
                                 global_adapter=global_adapter, public=split.public)
        assert up.adapter is None and set(up.scores) == {CFG.score.top_k}
        payloads[f"c{shard}"] = up.scores[CFG.score.top_k]
    assert isinstance(rounds.close_round("distill", 3), rounds.StudentJob)
    matrix = rounds.score_matrix(payloads, digest=public_digest(split.public), run_id="run-test", round_no=3,
                                 count=len(split.public))
    assert matrix.shape == (2, len(split.public)) and np.all((matrix >= 0) & (matrix <= 1))
    distilled = rounds.distil(CFG, [s.text for s in split.public], matrix)
    summary = distilled.summary
    assert (summary.normal, summary.anomalous) == (len(distilled.selection.normal_idx),
                                                   len(distilled.selection.anomalous_idx))
    assert summary.digest == rounds.selection_digest(distilled.selection)
    assert distilled.artifact.version
    assert distilled.artifact.threshold == 0.5 and distilled.artifact.meta.stats["threshold"] == {"rule": "fixed"}


def test_the_otsu_threshold_comes_from_the_students_public_scores_alone(split) -> None:
    public_texts = [s.text for s in split.public]
    matrix = np.random.default_rng(0).random((2, len(public_texts)))
    fixed = rounds.distil(CFG, public_texts, matrix)
    otsu_cfg = CFG.model_copy(update={"student": CFG.student.model_copy(update={"threshold": "otsu"})})
    distilled = rounds.distil(otsu_cfg, public_texts, matrix)
    probs = rounds.public_probabilities(Detector(distilled.artifact), public_texts)
    assert distilled.artifact.threshold == decision_threshold(probs, "otsu")
    evidence = distilled.artifact.meta.stats["threshold"]
    assert evidence["rule"] == "otsu" and evidence["public_sessions"] == len(public_texts)
    assert evidence["public_flagged_share"] == pytest.approx(float((probs >= distilled.artifact.threshold).mean()), abs=1e-6)
    # Same weights as the fixed-rule student, another decision: the version says so.
    assert distilled.artifact.weights == fixed.artifact.weights
    assert distilled.artifact.version != fixed.artifact.version


def test_fedavg_weights_by_bounded_samples(teacher) -> None:
    teacher.reset()
    start = adapters.adapter_state(teacher.model)
    shifted = {k: v + 1.0 for k, v in start.items()}
    meta = {"base": "tiny:llama"}
    blob_a, blob_b = adapters.adapter_to_bytes(start, meta), adapters.adapter_to_bytes(shifted, meta)
    averaged = state_of(rounds.aggregate_adapters([(blob_a, 1), (blob_b, 3)]))
    key = sorted(start)[0]
    # Declared counts weigh in up to the median count (2 here): 1 and 3 count as 1 and 2.
    expected = (state_of(blob_a)[key] + 2 * state_of(blob_b)[key]) / 3
    assert torch.allclose(averaged[key], expected, atol=1e-3)


def test_an_adapter_that_does_not_fit_the_first_names_itself(teacher) -> None:
    state = adapters.adapter_state(teacher.model)
    key = sorted(state)[0]
    smaller = {k: (v[:1] if k == key else v) for k, v in state.items()}
    good, bad = adapters.adapter_to_bytes(state, {}), adapters.adapter_to_bytes(smaller, {})
    with pytest.raises(adapters.AdapterError, match=key.split(".lora_")[0]):
        rounds.aggregate_adapters([(good, 1), (bad, 1)])


def test_a_public_set_that_does_not_match_the_task_is_refused(split, teacher) -> None:
    with pytest.raises(ValueError, match="does not match digest"):
        rounds.client_round(task(1, "distill", split), teacher, split.clients[0], shard=0, client_id="c0",
                            public=split.public[1:])


def test_score_matrix_rechecks_every_payload(split, teacher) -> None:
    teacher.reset()
    up = rounds.client_round(task(1, "distill", split), teacher, split.clients[0], shard=0, client_id="c0",
                             public=split.public)
    blob = up.scores[CFG.score.top_k]
    digest = public_digest(split.public)
    with pytest.raises(PayloadError):
        rounds.score_matrix({"c0": blob}, digest=digest, run_id="another-run", round_no=1, count=len(split.public))
    with pytest.raises(ValueError, match="no accuracy payloads"):
        rounds.score_matrix({}, digest=digest, run_id="run-test", round_no=1, count=len(split.public))


def test_a_client_declaring_a_billion_samples_with_a_boosted_adapter_does_not_dominate(teacher) -> None:
    """1 of 5 clients hostile: capped weight and clipped norm keep the average near the honest one."""
    state = adapters.adapter_state(teacher.model)
    rng = torch.Generator().manual_seed(0)
    honest = [{k: v + 0.01 * torch.randn(v.shape, generator=rng) for k, v in state.items()} for _ in range(4)]
    hostile = {k: v + 5.0 for k, v in state.items()}
    uploads = [(adapters.adapter_to_bytes(s, {}), 1000) for s in honest]
    uploads.append((adapters.adapter_to_bytes(hostile, {}), 10**9))
    averaged = state_of(rounds.aggregate_adapters(uploads))
    honest_mean = {k: torch.stack([h[k] for h in honest]).mean(0) for k in state}

    def distance(a, b) -> float:
        return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in state)))

    assert distance(averaged, honest_mean) < 0.5 * distance(hostile, honest_mean) / 5
