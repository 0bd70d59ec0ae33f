"""The student: a small LoRA sequence classifier distilled from the teachers' pseudo-labels.

The server never sees a private log or a ground-truth label. It only has the public set and
the sessions the teachers agreed were most normal (label 0) or most anomalous (label 1); the
student learns to separate those two groups and is then what the detectors serve.

Long sessions: training uses each text's head window (the first ``max_len`` tokens, specials
included) because pseudo-labels describe the whole session and the head is where HDFS
sessions differ first; the detector scores every window and takes the max P(anomalous), so a
late error event is not cut off (see :mod:`feddale.method.detector`).

The artifact (:mod:`feddale.method.artifact`, torch-free) is the LoRA matrices plus the
classifier head (fp16 safetensors), a JSON description and the ONNX bundle that
:func:`train_student` exports last (:mod:`feddale.method.onnx_export`), so the student-trainer
publishes what the torch-free detector serves without any change of its own.
"""

from __future__ import annotations

import math
import numbers
import time
from datetime import datetime, timezone
from typing import Sequence

import torch
from tqdm.auto import tqdm

from feddale.method import adapters, models
from feddale.method.artifact import (  # re-exported: the artifact's historical home
    FORMAT,
    HEAD_PREFIX,
    LABEL_MAP,
    LORA_PREFIX,
    META_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    ArtifactMeta,
    StudentArtifact,
    StudentError,
    content_digest,
    seal,
)
from feddale.method.config import SampleBy, StudentConfig
from feddale.method.preprocess import View, as_view

__all__ = [
    "FORMAT", "LABEL_MAP", "META_FILE", "ONNX_FILE", "WEIGHTS_FILE", "ArtifactMeta", "StudentArtifact",
    "StudentConfig", "StudentError", "TextEncoder", "build_model", "content_digest", "sampling_probabilities",
    "train_student",
]


# --------------------------------------------------------------------------- tokenization


class TextEncoder:
    """Turns session texts into token ids for one tokenizer and ``max_len``.

    Special tokens are found by probing the tokenizer once (transformers 5 fast tokenizers
    expose no "wrap these ids" call), so a window of plain ids becomes a proper model input
    exactly like a normally tokenized text would.
    """

    def __init__(self, tokenizer, max_len: int, view: View = "full") -> None:
        probe = "log"
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        wrapped = tokenizer(probe, add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(wrapped) - len(plain) + 1) if wrapped[i : i + len(plain)] == plain), None)
        if not plain or at is None:
            raise StudentError("cannot locate special tokens of this tokenizer")
        self.prefix, self.suffix = wrapped[:at], wrapped[at + len(plain) :]
        self.content_len = max_len - len(self.prefix) - len(self.suffix)
        if self.content_len < 4:
            raise StudentError(f"max_len {max_len} leaves no room for text after special tokens")
        self.tokenizer = tokenizer
        self.view = view

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(as_view(text, self.view), add_special_tokens=False, verbose=False)["input_ids"]

    def wrap(self, content: Sequence[int]) -> list[int]:
        return [*self.prefix, *content, *self.suffix]

    def head(self, text: str) -> tuple[list[int], bool]:
        """Model input for the first window of ``text`` and whether anything was cut off."""
        ids = self.ids(text)
        return self.wrap(ids[: self.content_len]), len(ids) > self.content_len

    def pad(self, batch: Sequence[Sequence[int]], device: torch.device) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.pad({"input_ids": [list(b) for b in batch]}, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _torch_tensors(artifact: StudentArtifact) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA state in :mod:`feddale.method.adapters` naming, head state) as fp32 tensors."""
    lora, head = artifact.numpy_tensors()
    return {k: torch.from_numpy(v) for k, v in lora.items()}, {k: torch.from_numpy(v) for k, v in head.items()}


# --------------------------------------------------------------------------- model <-> weights


def _head_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """Parameters of the trainable classifier-head copies peft keeps for ``modules_to_save``."""
    from peft.utils import ModulesToSaveWrapper

    adapter = peft_model.active_adapter
    return {
        f"{name}.{pname}": p
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper)
        for pname, p in module.modules_to_save[adapter].named_parameters()
    }


def _load_head_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    params = _head_parameters(peft_model)
    if set(params) != set(state):
        raise StudentError(f"student head tensors {sorted(state)} do not fit the model's head {sorted(params)}")
    with torch.no_grad():
        for key, p in params.items():
            if tuple(state[key].shape) != tuple(p.shape):
                raise StudentError(f"head tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[key].to(p.device, p.dtype))


def _weights_bytes(peft_model) -> bytes:
    from safetensors.torch import save

    tensors = {LORA_PREFIX + k: v for k, v in adapters.adapter_state(peft_model).items()}
    tensors.update({HEAD_PREFIX + k: p.detach().cpu() for k, p in _head_parameters(peft_model).items()})
    wire = {k: v.to(torch.float16).contiguous() for k, v in tensors.items()}
    if not all(bool(torch.isfinite(t).all()) for t in wire.values()):
        raise StudentError("student weights are not finite in fp16; training diverged (lower lr)")
    return save(wire)


def build_model(artifact: StudentArtifact, device: str | None = None):
    """Rebuild the student (base + LoRA + head) in eval mode; returns (model, tokenizer)."""
    lora_cfg = artifact.meta.lora
    model, tokenizer = models.load_classifier(artifact.meta.base, num_labels=len(artifact.meta.labels), device=device)
    peft_model = models.add_lora(
        model,
        rank=int(lora_cfg["rank"]),
        alpha=int(lora_cfg["alpha"]),
        dropout=float(lora_cfg["dropout"]),
        task="classifier",
    )
    rebuilt = models.lora_meta(peft_model)
    if rebuilt != lora_cfg:
        raise StudentError(f"this feddale builds LoRA {rebuilt} for {artifact.meta.base}, artifact has {lora_cfg}")
    lora, head = _torch_tensors(artifact)
    adapters.load_adapter_state(peft_model, lora)
    _load_head_state(peft_model, head)
    peft_model.eval()
    return peft_model, tokenizer


# --------------------------------------------------------------------------- training


def _check_inputs(
    texts: Sequence[str], labels: Sequence[int], weights: Sequence[int] | None
) -> tuple[list[str], list[int], list[int]]:
    texts, labels = list(texts), list(labels)
    if not texts:
        raise StudentError("no training texts")
    if len(labels) != len(texts):
        raise StudentError(f"got {len(texts)} texts but {len(labels)} labels")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise StudentError(f"text {i} must be a non-empty string")
    for i, label in enumerate(labels):
        if isinstance(label, bool) or label not in (0, 1):
            raise StudentError(f"label {i} must be 0 (pseudo-normal) or 1 (pseudo-anomalous), got {label!r}")
    if len(set(labels)) < 2:
        raise StudentError(f"both classes are required to train the student; all labels are {labels[0]}")
    weights = [1] * len(texts) if weights is None else list(weights)
    if len(weights) != len(texts):
        raise StudentError(f"got {len(texts)} texts but {len(weights)} weights")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w <= 0:
            raise StudentError(f"weight {i} must be a positive integer count, got {w!r}")
    return texts, [int(x) for x in labels], [int(w) for w in weights]


def sampling_probabilities(
    labels: Sequence[int], weights: Sequence[int], balance: bool, by: SampleBy = "sessions"
) -> torch.Tensor:
    """Per-row sampling probability: proportional to weight, each class half the mass if balanced.

    Weights are counts (a distinct text standing for many sessions), so sampling by weight
    (``by="sessions"``) trains on the public set's real distribution without duplicating rows;
    ``by="texts"`` ignores the counts, so a normal text seen once is drawn as often as one seen a
    hundred times: a student then learns the rarer normal sessions it would otherwise flag.
    Balancing stops the larger pseudo-class from dominating when the two sides differ in size.
    """
    w = torch.tensor(weights, dtype=torch.float64) if by == "sessions" else torch.ones(len(weights), dtype=torch.float64)
    y = torch.tensor(labels)
    if not balance:
        return w / w.sum()
    p = torch.zeros_like(w)
    for cls in (0, 1):
        mask = y == cls
        p[mask] = 0.5 * w[mask] / w[mask].sum()
    return p


def train_student(
    texts: Sequence[str],
    labels: Sequence[int],
    cfg: StudentConfig,
    weights: Sequence[int] | None = None,
    progress: bool = True,
) -> StudentArtifact:
    """Fine-tune a LoRA sequence classifier on pseudo-labels and package it as an artifact.

    Each optimizer step draws ``batch_size`` rows with :func:`sampling_probabilities`
    (with replacement), accumulates gradients over ``micro_batch`` chunks and takes one AdamW
    step. Seeded end to end: same inputs and config give the same artifact version.
    """
    texts, labels, weights = _check_inputs(texts, labels, weights)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, tokenizer = models.load_classifier(cfg.base, num_labels=2, seed=cfg.seed)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and cfg.max_len > positions:
            raise StudentError(f"max_len {cfg.max_len} exceeds the {positions} positions of {cfg.base}")
        peft_model = models.add_lora(model, rank=cfg.rank, task="classifier", seed=cfg.seed)
        device = next(peft_model.parameters()).device
        encoder = TextEncoder(tokenizer, cfg.max_len, cfg.view)
        encoded = [encoder.head(t) for t in texts]
        inputs = [ids for ids, _ in encoded]
        target = torch.tensor(labels)
        probs = sampling_probabilities(labels, weights, cfg.balance, cfg.sample_by)
        generator = torch.Generator().manual_seed(cfg.seed)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
        losses: list[float] = []
        peft_model.train()
        bar = tqdm(range(cfg.steps), desc="student", disable=not progress, leave=False)
        for _ in bar:
            batch = torch.multinomial(probs, cfg.batch_size, replacement=True, generator=generator).tolist()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for start in range(0, len(batch), cfg.micro_batch):
                rows = batch[start : start + cfg.micro_batch]
                with models.autocast(device, cfg.autocast):
                    logits = peft_model(**encoder.pad([inputs[i] for i in rows], device)).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), target[rows].to(device))
                (loss * len(rows) / len(batch)).backward()
                step_loss += loss.item() * len(rows) / len(batch)
            if not math.isfinite(step_loss):
                raise StudentError(f"student loss became {step_loss} at step {len(losses)}; lower lr")
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        peft_model.eval()

    tail = losses[-min(10, len(losses)) :]
    stats = {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "balance": cfg.balance,
        "autocast": cfg.autocast,
        "rows": len(texts),
        "rows_per_class": {name: labels.count(int(k)) for k, name in LABEL_MAP.items()},
        "weight_per_class": {
            name: sum(w for w, y in zip(weights, labels) if y == int(k)) for k, name in LABEL_MAP.items()
        },
        "truncated_rows": sum(cut for _, cut in encoded),
        "loss_first": losses[0],
        "loss_last10": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - started, 3),
    }
    weights_blob = _weights_bytes(peft_model)
    lora_cfg = models.lora_meta(peft_model)
    spec = {
        "format": FORMAT,
        "base": lora_cfg["base"],
        "max_len": cfg.max_len,
        "view": cfg.view,
        "labels": dict(LABEL_MAP),
        "lora": lora_cfg,
    }
    artifact = seal(spec, weights_blob, None, datetime.now(timezone.utc).isoformat(timespec="seconds"), stats)
    if not cfg.onnx:
        return artifact
    from feddale.method.onnx_export import with_onnx

    return with_onnx(artifact)
