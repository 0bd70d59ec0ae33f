"""Everything that crosses the wire between FedDALE processes, as pydantic models.

Senders build these models and receivers validate what arrives with ``Model.model_validate``,
so a field renamed on one side fails loudly on the other instead of as a ``KeyError`` deep in a
service; a 422 from the coordinator names the offending field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from feddale.method.config import RunConfig

SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class RunRequest(BaseModel):
    """Start a run. Unset fields come from the coordinator's configured profile.

    ``teacher``/``score``/``student`` are partial overrides of those config sections, e.g.
    ``{"teacher": {"steps": 20}}``; ``k`` sets both ``k_normal`` and ``k_anomalous``.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["one_shot", "few_shot"]
    fedavg_rounds: int | None = Field(None, ge=1, le=50, description="few_shot only; default 3")
    min_clients: int = Field(1, ge=1, le=10_000)
    round_deadline_s: float = Field(3600.0, gt=0, le=7 * 24 * 3600)
    filter: Literal["mean", "max", "none", "rank_mean", "median", "trimmed_mean"] | None = None
    selection: Literal["plain", "distinct"] | None = None
    k: int | None = Field(None, ge=1)
    k_normal: int | None = Field(None, ge=1)
    k_anomalous: int | None = Field(None, ge=1)
    teacher_model: str | None = Field(None, min_length=1, max_length=512)
    student_model: str | None = Field(None, min_length=1, max_length=512)
    quantization: Literal["auto", "none", "4bit"] | None = None
    teacher_lora_rank: int | None = Field(None, ge=1, le=256)
    teacher: dict[str, Any] | None = None
    score: dict[str, Any] | None = None
    student: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _mode_and_rounds(self) -> RunRequest:
        if self.mode == "one_shot" and self.fedavg_rounds is not None:
            raise ValueError("fedavg_rounds is only valid with mode 'few_shot'")
        if self.k is not None and (self.k_normal is not None or self.k_anomalous is not None):
            raise ValueError("give either k or k_normal/k_anomalous, not both")
        return self

    def overrides(self) -> dict[str, Any]:
        """The RunConfig fields this request changes (nested sections merged, not replaced)."""
        out: dict[str, Any] = {"fedavg_rounds": (self.fedavg_rounds or 3) if self.mode == "few_shot" else 0}
        for name in ("filter", "selection", "k_normal", "k_anomalous", "teacher_model", "quantization",
                     "teacher_lora_rank"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.k is not None:
            out["k_normal"] = out["k_anomalous"] = self.k
        if self.seed is not None:
            out["seeds"] = [self.seed]
        for section in ("teacher", "score", "student"):
            if getattr(self, section):
                out[section] = dict(getattr(self, section))
        if self.student_model is not None:
            out.setdefault("student", {})["base"] = self.student_model
        return out


def merge_config(base: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply request overrides to the profile; validation errors keep their field paths."""
    raw = base.model_dump(mode="json")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return RunConfig.model_validate(raw)


class PseudoLabelSummary(BaseModel):
    """Which public sessions the student learned from (the digest pins the exact selection).

    ``agreement`` is how far the teachers agree on these pseudo-labels
    (:func:`feddale.method.federation.pseudo_label_agreement`, no labels involved): the number
    automatic promotion compares (docs/operations.md). None for students of older trainers.
    """

    normal: int = Field(ge=0)
    anomalous: int = Field(ge=0)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    agreement: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("agreement", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # a query string carries None as an empty value


class RunCreated(BaseModel):
    run_id: str
    status: str


class ClientView(BaseModel):
    name: str
    shard: int | None
    uploaded_rounds: list[int]
    bytes_up: int
    bytes_down: int
    alive: bool


class RunView(BaseModel):
    run_id: str
    mode: str
    status: str
    reason: str | None
    round: int
    round_kind: str | None
    fedavg_rounds: int
    min_clients: int
    round_deadline_s: float
    expected: list[str]
    uploaded: list[str]
    clients: dict[str, ClientView]
    bytes_up: int
    bytes_down: int
    student_version: str | None
    pseudo_labels: PseudoLabelSummary | None
    outliers: list[str]
    public_digest: str
    public_count: int
    history: list[dict[str, Any]]
    config: dict[str, Any]
    created_at: float
    updated_at: float
    round_started_at: float | None = None  # with round_deadline_s: when the current round closes at the latest


CLIENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$"
Role = Literal["client", "detector"]


class RegisterRequest(BaseModel):
    """``POST /v1/clients/register``: what a node asks for; its bearer credential decides what it gets.

    With the bootstrap secret, ``name`` is required and ``role`` defaults to ``client``. With an
    enrollment token or the node's own token, the coordinator already knows both: they may be
    left out, and a value that differs is refused, so a caller can never choose its own role.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=128, pattern=CLIENT_NAME)
    role: Role | None = None


class Registration(BaseModel):
    client_id: str
    name: str
    token: str
    role: Role
    shard: int | None
    num_shards: int
    data: dict[str, Any]
    seed: int


class EnrollRequest(BaseModel):
    """``POST /v1/clients`` (admin): reserve ``name`` for one node with a fixed role."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=CLIENT_NAME)
    role: Role = "client"
    ttl_s: float | None = Field(None, gt=0, le=30 * 24 * 3600, description="default FEDDALE_ENROLLMENT_TTL_S")


class Enrollment(BaseModel):
    """A one-time enrollment token: shown once, stored only as its hash, void after use or expiry."""

    name: str
    role: Role
    token: str
    expires_at: float


class Revocation(BaseModel):
    """``DELETE /v1/clients/{name}``: what was revoked (a registered node, a pending enrollment, or both)."""

    name: str
    client_id: str | None
    role: Role
    enrollment_pending: bool


class PublicRef(BaseModel):
    """Names the public set of a distillation round; clients fetch ``path`` and check the digest."""

    digest: str
    count: int
    path: str


class SessionBody(BaseModel):
    """One unlabeled session on the wire (public set): masked messages in order."""

    id: str
    messages: list[str]


class PublicSetBody(BaseModel):
    """The public unlabeled set as served by the coordinator (``GET /v1/public/{digest}``)."""

    digest: str
    sessions: list[SessionBody]


class Task(BaseModel):
    """One client's work for one round: train locally, then upload an adapter or accuracy payload."""

    run_id: str
    round: int
    kind: Literal["fedavg", "distill"]
    config: dict[str, Any]
    global_adapter: str | None
    public: PublicRef | None
    deadline_at: float


class TaskResponse(BaseModel):
    task: Task | None
    poll_after_s: float


class UploadAccepted(BaseModel):
    run_id: str
    round: int
    client_id: str
    bytes: int
    sha256: str
    replaced: bool


class StudentInputs(BaseModel):
    """What the student job downloads: the run's config, public set and accepted payloads (base64)."""

    run_id: str
    round: int
    config: dict[str, Any]
    public: PublicSetBody
    public_count: int
    payloads: dict[str, str]


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of a resolved run config as canonical JSON: equal digests, equal configs."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Provenance(BaseModel):
    """Where a student came from: which run, config, data and code made it.

    Recorded by the coordinator when the student is published; ``commit`` and
    ``trainer_version`` are what the student-trainer reports about itself (``commit`` is None
    where it runs outside a git checkout, as in the images).
    """

    run_id: str
    config_digest: str = Field(description="sha256 of the run's resolved config (canonical JSON)")
    public_digest: str = Field(description="the public unlabeled set it was distilled on")
    payload_digests: dict[str, str] = Field(description="client id -> sha256 of the accuracy payload it learned from")
    selection_digest: str = Field(description="the exact pseudo-labels (PseudoLabelSummary.digest)")
    commit: str | None = Field(None, pattern=r"^[0-9a-f]{7,64}$")
    trainer_version: str | None = Field(None, max_length=64)


class PromotionDecision(BaseModel):
    """Whether a newly published student was promoted automatically, and on which numbers."""

    version: str
    at: float
    promoted: bool
    reason: str
    agreement: float | None = Field(description="the new student's pseudo-label agreement")
    current_version: str | None = Field(description="the student promoted when it was published")
    current_agreement: float | None
    margin: float = Field(description="FEDDALE_PROMOTION_MARGIN when it was decided")


class PromotionEvent(BaseModel):
    """One change of the promoted student (newest last in ``StudentsView.history``)."""

    version: str
    previous: str | None
    action: Literal["auto", "promote", "pin", "unpin", "rollback"]
    at: float


class StudentEntry(BaseModel):
    """A published student as the operator sees it: its info, whether detectors serve it, its decision."""

    info: StudentInfo
    promoted: bool
    decision: PromotionDecision | None = None


class StudentsView(BaseModel):
    """``GET /v1/students``: every published student (newest first) and the promotion state."""

    current: str | None = Field(description="the promoted version: what detectors and client nodes serve")
    pinned: bool = Field(description="automatic promotion is off until unpinned")
    margin: float
    students: list[StudentEntry]
    history: list[PromotionEvent]


class ScheduleEvent(BaseModel):
    """What the run schedule did when a run was due."""

    at: float
    outcome: Literal["started", "skipped"]
    run_id: str | None = None
    reason: str


class ScheduleView(BaseModel):
    """``GET /v1/schedule``: FEDDALE_SCHEDULE and what it did last (newest last)."""

    interval_s: float | None
    next_at: float | None
    recent: list[ScheduleEvent]


class ScoreHistogram(BaseModel):
    """The aggregated public-set scores a student's pseudo-labels were cut from (no labels involved).

    ``counts[i]`` public sessions scored in ``[edges[i], edges[i+1])`` (the last bin closed).
    Sessions scored at or above ``normal_cutoff`` became pseudo-normal, at or below
    ``anomalous_cutoff`` pseudo-anomalous; a cut-off is None when that side is empty or, with
    ``filter=none``, when each client cut its own scores (the histogram is then of their mean).
    Operators read the gap between the cut-offs as how clearly the federation agreed.
    """

    model_config = ConfigDict(extra="forbid")

    edges: list[float] = Field(min_length=2, max_length=101)
    counts: list[int] = Field(min_length=1, max_length=100)
    normal_cutoff: float | None = None
    anomalous_cutoff: float | None = None

    @model_validator(mode="after")
    def _bins(self) -> ScoreHistogram:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError("a histogram needs one edge more than it has counts")
        if any(c < 0 for c in self.counts) or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("counts must be non-negative and edges increasing")
        return self


class StudentInfo(BaseModel):
    """A published student, as listed by the coordinator and pulled by detectors and clients."""

    version: str
    run_id: str
    base_model: str
    published_at: float
    bytes: int
    sha256: str
    path: str
    pseudo_labels: PseudoLabelSummary | None = None
    provenance: Provenance | None = None
    score_histogram: ScoreHistogram | None = None
    # The decision threshold its detectors apply, read from the artifact (chosen without labels).
    threshold: float | None = None


class DetectorStats(BaseModel):
    """A detector's counters since it started, sent with each heartbeat.

    Cumulative, like Prometheus counters, so a lost beat loses no requests: the coordinator
    keeps a short series of them and the dashboard plots rates from consecutive samples.
    """

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(ge=0)  # answered /v1/detect and /v1/detect/lines requests
    sessions: int = Field(ge=0)  # sessions scored
    anomalies: int = Field(ge=0)  # sessions flagged anomalous
    latency_s_sum: float = Field(ge=0, allow_inf_nan=False)  # summed latency of those requests
    started_at: float


class Heartbeat(BaseModel):
    """What a client node or detector tells the coordinator every few seconds, busy or not."""

    model_config = ConfigDict(extra="forbid")

    state: str = Field(max_length=256)  # e.g. "idle", "training (distill round 1 of run-...)"
    software: str = Field(max_length=64)  # the node's feddale version
    model_version: str | None = Field(None, max_length=64)  # the student it serves
    sessions: int | None = Field(None, ge=0)  # client nodes: private sessions it trains on
    detector: DetectorStats | None = None


class HeartbeatAck(BaseModel):
    """The coordinator's answer: beat again within ``interval_s`` (a fraction of its liveness TTL)."""

    interval_s: float
    ttl_s: float
