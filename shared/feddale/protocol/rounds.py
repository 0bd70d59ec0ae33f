"""One federated round as plain functions: what a client does, how a round closes, the distillation.

Both transports drive exactly these functions. The simulator calls them in one process; in a
deployment the client node calls :func:`client_round` for each task it polls, the coordinator
calls :func:`close_round` when every expected upload is in, and the student-trainer calls
:func:`score_matrix` and :func:`distil` on what the coordinator collected. Nothing here knows
about HTTP, Redis or files, so a recipe change cannot drift between the two.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from feddale.data.deployment import public_digest
from feddale.data.types import Session
from feddale.method import adapters, federation, models, payload, teacher
from feddale.method.config import RunConfig, ThresholdRule
from feddale.method.detector import Detector
from feddale.method.preprocess import SEPARATOR
from feddale.method.threshold import decision_threshold
from feddale.method.student import StudentArtifact, train_student
from feddale.protocol.messages import PseudoLabelSummary, ScoreHistogram, Task

Upload = Literal["adapter", "scores"]


def local_seed(run_seed: int, round_no: int, shard: int) -> int:
    """The seed of one client's local training in one round (distinct per run, round and shard)."""
    return run_seed * 10_000 + round_no * 100 + shard


# --------------------------------------------------------------------------- client side


@dataclass
class Teacher:
    """A client's teacher: the base LM with a LoRA adapter, and the seeded adapter it started from.

    Every client of a run loads its teacher with the run's seed, so all start from the same
    adapter without downloading it; ``reset`` returns to that start (the simulator lets clients
    take turns on one loaded model this way).
    """

    model: Any
    tokenizer: Any
    initial: dict[str, Any]

    def reset(self) -> None:
        adapters.load_adapter_state(self.model, self.initial)


def load_teacher(cfg: RunConfig) -> Teacher:
    """The run's teacher at its seeded start (base model quantized as the config says)."""
    seed = cfg.seeds[0]
    base, tokenizer = models.load_causal_lm(cfg.teacher_model, cfg.quantization, seed=seed)
    model = models.add_lora(base, rank=cfg.teacher_lora_rank, task="causal", seed=seed)
    initial = {k: v.detach().clone() for k, v in adapters.adapter_state(model).items()}
    return Teacher(model=model, tokenizer=tokenizer, initial=initial)


@dataclass(frozen=True)
class ClientUpload:
    """What one client produced in one round: its adapter and/or its accuracy payloads (by top-k)."""

    round: int
    samples: int
    adapter: bytes | None
    scores: dict[int, bytes]
    train_stats: dict[str, Any]


def client_round(
    task: Task,
    model: Teacher,
    sessions: Sequence[Session],
    *,
    shard: int,
    client_id: str,
    global_adapter: bytes | None = None,
    public: Sequence[Session] | None = None,
    send: Sequence[Upload] | None = None,
    top_ks: Sequence[int] | None = None,
    progress: bool = False,
) -> ClientUpload:
    """Train the teacher locally for one round, then build what the task asks to upload.

    ``global_adapter`` is the previous round's FedAvg result (none in a run's first round: the
    teacher is at its seeded start). ``send`` defaults to what the task's kind asks for: the
    adapter in a FedAvg round, the accuracy payload on ``public`` in the distillation round. The
    progressive benchmark asks for both at once, and for payloads at several ``top_ks``
    (default: the config's one); each payload is encoded exactly as the wire carries it.
    """
    cfg = RunConfig.model_validate(task.config)
    if global_adapter is not None:
        state, _ = adapters.adapter_from_bytes(global_adapter, adapters.adapter_shapes(model.model))
        adapters.load_adapter_state(model.model, state)
    local = cfg.teacher.model_copy(update={"seed": local_seed(cfg.seeds[0], task.round, shard)})
    stats = teacher.train_teacher(model.model, model.tokenizer, [s.text for s in sessions], local, progress=progress)
    wanted = set(send or (("adapter",) if task.kind == "fedavg" else ("scores",)))
    blob = None
    if "adapter" in wanted:
        blob = adapters.adapter_to_bytes(adapters.adapter_state(model.model), models.lora_meta(model.model))
    scores: dict[int, bytes] = {}
    if "scores" in wanted:
        if public is None or task.public is None:
            raise ValueError(f"round {task.round} asks for scores but no public set was given")
        scores = score_public(model, public, task, client_id, top_ks or [cfg.score.top_k], progress=progress)
    return ClientUpload(round=task.round, samples=len(sessions), adapter=blob, scores=scores, train_stats=stats)


def score_public(
    model: Teacher,
    public: Sequence[Session],
    task: Task,
    client_id: str,
    top_ks: Sequence[int],
    progress: bool = False,
) -> dict[int, bytes]:
    """The accuracy payload of the public set per top-k, after checking it is the set the task names."""
    assert task.public is not None
    if public_digest(public) != task.public.digest or len(public) != task.public.count:
        raise ValueError(f"the public set does not match digest {task.public.digest} / count {task.public.count}")
    cfg = RunConfig.model_validate(task.config)
    texts = [s.text for s in public]
    ks = sorted(set(top_ks))
    if len(ks) == 1:
        raw = {ks[0]: teacher.score_texts(model.model, model.tokenizer, texts, cfg.score.model_copy(
            update={"top_k": ks[0]}), progress=progress)}
    else:
        raw = teacher.score_by_top_k(model.model, model.tokenizer, texts, cfg.score, ks, progress=progress)
    header = payload.PayloadHeader(
        version=payload.VERSION, public_digest=task.public.digest, run_id=task.run_id, round=task.round,
        client_id=client_id, count=len(texts),
    )
    return {k: payload.encode_scores(scores, header) for k, scores in raw.items()}


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class NextRound:
    """A FedAvg round closed: the next round starts from ``global_adapter``."""

    round: int
    global_adapter: bytes


@dataclass(frozen=True)
class StudentJob:
    """The distillation round closed: the student is trained on the payloads of ``round``."""

    round: int


def aggregate_adapters(uploads: Sequence[tuple[bytes, int]], max_bytes: int | None = None) -> bytes:
    """FedAvg over uploaded adapters (blob, samples); the first fixes the keys, shapes and LoRA meta.

    Every blob is parsed and checked (finite floats, same keys and shapes as the first) before
    any averaging, so one bad upload names itself instead of poisoning the global adapter. Then
    no client can dominate: declared sample counts are capped (``federation.bounded_weights``)
    and boosted adapters are scaled down to the clients' typical norm
    (``federation.clip_to_median_norm``).
    """
    if not uploads:
        raise federation.FederationError("no adapter uploads to average")
    first, meta = adapters.adapter_from_bytes(uploads[0][0], max_bytes=max_bytes)
    expected = {k: tuple(v.shape) for k, v in first.items()}
    states = [first] + [adapters.adapter_from_bytes(blob, expected, max_bytes=max_bytes)[0] for blob, _ in uploads[1:]]
    weights = federation.bounded_weights([samples for _, samples in uploads])
    return adapters.adapter_to_bytes(federation.fedavg(federation.clip_to_median_norm(states), weights), meta)


def close_round(
    kind: Literal["fedavg", "distill"], round_no: int, adapter_uploads: Sequence[tuple[bytes, int]] = ()
) -> NextRound | StudentJob:
    """What follows a round: FedAvg rounds average the adapters, the distillation round trains a student."""
    if kind == "fedavg":
        return NextRound(round=round_no + 1, global_adapter=aggregate_adapters(adapter_uploads))
    return StudentJob(round=round_no)


def score_matrix(
    payloads: Mapping[str, bytes], *, digest: str, run_id: str, round_no: int, count: int
) -> np.ndarray:
    """Decode and re-check every client's payload; one row per client, in client-id order."""
    if not payloads:
        raise ValueError(f"run {run_id}: no accuracy payloads to learn from")
    return np.stack([
        payload.decode_scores(payloads[client], public_digest=digest, run_id=run_id, round=round_no, count=count)[1]
        for client in sorted(payloads)
    ])


def flag_outliers(matrix: np.ndarray, client_ids: Sequence[str]) -> list[str]:
    """The clients (of ``score_matrix``'s rows, in ``client_ids`` order) whose payloads disagree with the rest."""
    return [client_ids[i] for i in federation.outlier_clients(matrix)]


@dataclass(frozen=True)
class Distilled:
    """The student of a run and the pseudo-labels it learned from."""

    aggregated: np.ndarray
    selection: federation.Selection
    artifact: StudentArtifact
    summary: PseudoLabelSummary = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary", PseudoLabelSummary(
            normal=len(self.selection.normal_idx), anomalous=len(self.selection.anomalous_idx),
            digest=selection_digest(self.selection),
        ))


def score_histogram(distilled: Distilled, bins: int = 20) -> ScoreHistogram:
    """The aggregated public-set scores in ``bins`` bins, with where the pseudo-labels were cut.

    Published with the student so an operator sees the federation's agreement (a clear gap
    between the two cut-offs) without any label. The bins span the scores' own range rather
    than [0, 1]: weak teachers (few steps, tiny models) score everything close together, and
    that spread is exactly what the operator needs to see.
    """
    aggregated = np.asarray(distilled.aggregated, dtype=np.float64)
    per_client = aggregated.ndim == 2  # filter=none: each client cut its own scores
    scores = aggregated.mean(axis=0) if per_client else aggregated
    low, high = float(scores.min()), float(scores.max())
    if high - low < 1e-9:  # every session scored alike (an untrained teacher): one bar, centred
        low, high = low - 0.05, high + 0.05
    counts, edges = np.histogram(scores, bins=bins, range=(low, high))
    normal, anomalous = distilled.selection.normal_idx, distilled.selection.anomalous_idx
    return ScoreHistogram(
        edges=[float(e) for e in edges], counts=[int(c) for c in counts],
        normal_cutoff=None if per_client or not normal else float(scores[list(normal)].min()),
        anomalous_cutoff=None if per_client or not anomalous else float(scores[list(anomalous)].max()),
    )


def selection_digest(selection: federation.Selection) -> str:
    """sha256 over the selected public indices and training rows: equal digests, equal pseudo-labels."""
    body = json.dumps([selection.normal_idx, selection.anomalous_idx, selection.texts, selection.labels,
                       selection.weights])
    return hashlib.sha256(body.encode()).hexdigest()


def select(
    cfg: RunConfig, public_texts: Sequence[str], matrix: np.ndarray, *, filter: str | None = None,
    k_normal: int | None = None, k_anomalous: int | None = None,
) -> tuple[np.ndarray, federation.Selection]:
    """Aggregate the clients' scores and pick the pseudo-labels (config values unless overridden)."""
    aggregated = federation.aggregate_scores(matrix, filter or cfg.filter)  # type: ignore[arg-type]
    selection = federation.select_pseudo_labels(
        aggregated, list(public_texts), k_normal or cfg.k_normal, k_anomalous or cfg.k_anomalous, cfg.selection
    )
    return aggregated, selection


def distil(
    cfg: RunConfig, public_texts: Sequence[str], matrix: np.ndarray, *, filter: str | None = None,
    k_normal: int | None = None, k_anomalous: int | None = None, progress: bool = False,
) -> Distilled:
    """The server side of the distillation round: aggregate, select pseudo-labels, train the student."""
    aggregated, selection = select(cfg, public_texts, matrix, filter=filter, k_normal=k_normal,
                                   k_anomalous=k_anomalous)
    artifact = train_student(
        selection.texts, selection.labels, cfg.student.model_copy(update={"seed": cfg.seeds[0]}),
        weights=selection.weights, progress=progress,
    )
    return Distilled(aggregated=aggregated, selection=selection,
                     artifact=with_decision_threshold(artifact, public_texts, cfg.student.threshold))


def with_decision_threshold(artifact: StudentArtifact, public_texts: Sequence[str], rule: ThresholdRule) -> StudentArtifact:
    """The student with the threshold its detectors apply, from its own scores on the unlabeled public set.

    The ``fixed`` rule needs no scores (0.5); the others score every distinct public text once.
    """
    probs = None if rule == "fixed" else public_probabilities(Detector(artifact), public_texts)
    cut = decision_threshold(probs if probs is not None else np.empty(0), rule)
    evidence: dict[str, Any] = {"rule": rule}
    if probs is not None:
        evidence |= {"public_sessions": len(public_texts), "public_flagged_share": round(float((probs >= cut).mean()), 6)}
    return artifact.with_threshold(cut, evidence)


def public_probabilities(detector: Detector, public_texts: Sequence[str]) -> np.ndarray:
    """P(anomalous) of each public text, as ``detector`` computes it (its threshold plays no part).

    A public text is already masked and joined: split back into its messages, the detector's
    masking leaves each unchanged and its join gives the same text (masking the joined text as
    one line would not: ``<*> ;-; <*>`` collapses).
    """
    return detector.predict_proba([text.split(SEPARATOR) for text in public_texts])
