"""The student on PyTorch: the reference the ONNX runtime is checked against, and the fallback for
artifacts that carry no ONNX bundle. Imports torch and transformers, so the detector service
never loads this module unless asked to."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from feddale.method.artifact import StudentArtifact
from feddale.method.student import TextEncoder, build_model


class TorchBackend:
    """Rebuilt peft model (base + LoRA + head, unmerged) and its transformers tokenizer."""

    name = "torch"

    def __init__(self, artifact: StudentArtifact, device: str | None = None) -> None:
        self.model, tokenizer = build_model(artifact, device=device)
        self._device = next(self.model.parameters()).device
        self.encoder = TextEncoder(tokenizer, artifact.meta.max_len, artifact.meta.view)
        self.content_len = self.encoder.content_len

    @property
    def device(self) -> str:
        return str(self._device)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encoder.ids(t) for t in texts]

    def wrap(self, content: Sequence[int]) -> list[int]:
        return self.encoder.wrap(content)

    @torch.inference_mode()
    def probs(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        logits = self.model(**self.encoder.pad(batch, self._device)).logits
        return torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy().astype(np.float64)
