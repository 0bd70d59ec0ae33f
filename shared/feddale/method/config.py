"""Run configuration: one pydantic model shared by the simulator, the services and the benchmarks.

Reading a config imports no torch: every section (teacher, scoring, student, data) is declared here
and the modules that train or score import their section from this one.

Profiles ship as YAML files inside the package (`feddale/profiles/`: `tiny`, `cpu`, `bench`, `paper`); a profile
name or a file path both resolve through `load_config`, so every entry point speaks the same language.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from feddale.method.preprocess import View

ThresholdRule = Literal["fixed", "otsu"]

PROFILES = ("tiny", "cpu", "bench", "paper")

# The paper's plain recipe, applied on top of any profile so the two can be compared on the same
# budget: mean top-k accuracy over the whole session, no end-of-session marker, and the plain
# k lowest / k highest sessions as pseudo-labels, the teacher reading sessions as they are.
RECIPES: dict[str, dict[str, Any]] = {
    "feddale": {},
    "paper": {
        "teacher.end_marker": False,
        "teacher.view": "full",
        "score.end_marker": False,
        "score.view": "full",
        "score.kind": "mean",
        "selection": "plain",
        "filter": "mean",
    },
}


# bf16 autocast on CPU and CUDA where supported ("auto"), always, or never (fp32).
Autocast = Literal["auto", "bf16", "off"]
SampleBy = Literal["sessions", "texts"]


class TeacherTrainConfig(BaseModel):
    """Local teacher training; defaults follow the paper (cosine LR 1e-3 -> 1e-5, batch 16)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    micro_batch: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_min: float = Field(1e-5, ge=0)
    max_len: int = Field(256, ge=2)
    seed: int = 0
    dedup: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    autocast: Autocast = "auto"
    end_marker: bool = True
    view: View = "full"

    @model_validator(mode="after")
    def _lr_order(self) -> TeacherTrainConfig:
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        return self


class ScoreConfig(BaseModel):
    """How sessions are scored; see the module docstring and docs/models.md."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(3, ge=1)
    kind: Literal["mean", "worst_message", "mean_worst", "surprise"] = "mean"
    max_len: int = Field(1024, ge=2)
    overlap: int = Field(128, ge=0)
    micro_batch: int = Field(4, ge=1)
    autocast: Autocast = "auto"
    end_marker: bool = True
    view: View = "full"

    @model_validator(mode="after")
    def _overlap_fits(self) -> ScoreConfig:
        if self.overlap >= self.max_len:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than max_len ({self.max_len})")
        return self


class StudentConfig(BaseModel):
    """How the student is trained; the defaults are the paper's recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = "builtin:minilm-l6"
    rank: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    micro_batch: int = Field(16, ge=1)
    steps: int = Field(100, ge=1)
    max_len: int = Field(512, ge=8)
    view: View = "compact"
    seed: int = Field(0, ge=0)
    balance: bool = True
    # What one training draw stands for: a public *session* (a distinct text drawn as often as it
    # occurs, the paper's) or a distinct *text* (each equally often, so the rarer normal texts are
    # learnt too). docs/quality.md §13: it mended one seed and collapsed another; no profile uses it.
    sample_by: SampleBy = "sessions"
    autocast: Autocast = "auto"
    # Export the ONNX bundle the torch-free detector serves (needs the `onnx` extra); off only for
    # harness runs that never serve the student and would pay the export's seconds per student.
    onnx: bool = True
    # How the decision threshold shipped in the artifact is chosen from the student's scores on
    # the unlabeled public set (feddale.method.threshold; the rule was picked on validation).
    threshold: ThresholdRule = "fixed"

    @model_validator(mode="after")
    def _micro_fits(self) -> StudentConfig:
        if self.micro_batch > self.batch_size:
            raise ValueError(f"micro_batch ({self.micro_batch}) must not exceed batch_size ({self.batch_size})")
        return self


class DataConfig(BaseModel):
    """Where sessions come from and how the harness splits them (disjoint by session)."""

    model_config = ConfigDict(extra="forbid")

    source: str = "auto"
    n_clients: int = Field(4, ge=1)
    public: tuple[int, int] = (1000, 1000)
    test: tuple[int, int] = (1000, 1000)
    validation: tuple[int, int] = (500, 500)
    natural: tuple[int, int] = (0, 0)  # (normal, anomalous) of the natural-rate test set; none by default
    client_anomaly_rate: float = Field(0.03, ge=0.0, lt=1.0)
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0.0)
    max_client_sessions: int | None = Field(None, ge=1)


class BenchConfig(BaseModel):
    """What `feddale bench` runs for a profile; its command-line flags override these.

    Why in the profile: a benchmark's size is part of what it measures (the `bench` profile is
    sized so the whole suite fits an hour on 2 CPU cores), and results record their config.
    """

    model_config = ConfigDict(extra="forbid")

    rounds: list[int] = Field(default_factory=lambda: [0, 3, 5])
    ablation_rounds: list[int] = Field(default_factory=lambda: [0, 3])  # filter and k
    # None: a quarter, half, once and twice the profile's k_normal (the paper's 50..400 around 200).
    ks: list[int] | None = None
    top_ks: list[int] = Field(default_factory=lambda: [1, 3, 5])
    top_k_rounds: list[int] = Field(default_factory=lambda: [0])
    cost_sessions: int = Field(500, ge=1)
    cost_teacher_sessions: int = Field(50, ge=1)
    cost_repeats: int = Field(3, ge=1)

    def ablation_ks(self, k_normal: int) -> list[int]:
        if self.ks is not None:
            return list(self.ks)
        return sorted({max(1, round(k_normal * f)) for f in (0.25, 0.5, 1.0, 2.0)})


class RunConfig(BaseModel):
    """Everything one federation run needs; defaults are the paper's recipe."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    recipe: Literal["feddale", "paper"] = "feddale"
    teacher_model: str = "builtin:smollm2-135m"
    quantization: Literal["auto", "none", "4bit"] = "auto"
    teacher_lora_rank: int = Field(8, ge=1)
    teacher: TeacherTrainConfig = TeacherTrainConfig()
    score: ScoreConfig = ScoreConfig()
    fedavg_rounds: int = Field(0, ge=0, le=50)
    filter: Literal["mean", "max", "none", "rank_mean", "median", "trimmed_mean"] = "mean"
    selection: Literal["plain", "distinct"] = "plain"
    k_normal: int = Field(200, ge=1)
    k_anomalous: int = Field(200, ge=1)
    student: StudentConfig = StudentConfig()
    data: DataConfig = DataConfig()
    baseline: bool = True
    baseline_max_test: int | None = Field(None, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0])
    bench: BenchConfig = BenchConfig()


def profiles_dir() -> Path:
    """Where profiles live: ``$FEDDALE_CONFIG_DIR`` when set, else the package's own ``profiles/``.

    The profiles ship as package data, so ``--config cpu`` works from any installed copy, in or
    outside a checkout, and in the images without a copied folder.
    """
    configured = os.environ.get("FEDDALE_CONFIG_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1] / "profiles"


def load_config(
    name_or_path: str, overrides: dict[str, Any] | None = None, recipe: str = "feddale"
) -> RunConfig:
    """Load a profile (`tiny`, `cpu`, `bench`, `paper`) or a YAML/JSON file, then a recipe, then dotted overrides."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    path = Path(name_or_path)
    if name_or_path in PROFILES:
        path = profiles_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"config {name_or_path!r} is neither a profile ({', '.join(PROFILES)}) nor an existing file"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    for dotted, value in {**RECIPES[recipe], **(overrides or {})}.items():
        _set_dotted(raw, dotted, value)
    raw["recipe"] = recipe
    return RunConfig.model_validate(raw)


def parse_override(text: str) -> tuple[str, Any]:
    """`teacher.steps=20` -> ("teacher.steps", 20); values are parsed as YAML scalars/lists.

    Only ``true``/``false`` become booleans: YAML 1.1 also reads ``off``, ``on``, ``yes`` and ``no``
    so, which would turn ``teacher.autocast=off`` (a valid choice) into a type error.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like section.field=value")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        parsed = value.strip()
    return key.strip(), parsed


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value
