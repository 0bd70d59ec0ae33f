"""Detector settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

import socket

from feddale.method.detector import Runtime
from feddale.method.onnx_runtime import Precision
from feddale.service.serving import ServingOptions
from feddale.service.settings import NodeSettings


class Settings(NodeSettings):
    port: int = 8001
    batch_sessions: int = 64  # most sessions one micro-batch scores together
    batch_wait_ms: float = 5.0  # how long a micro-batch waits for more requests
    detector_runtime: Runtime = "auto"  # a typo fails at start-up, not on the first student
    detector_precision: Precision = "fp32"

    @property
    def name(self) -> str:
        return self.node_name or f"detector-{socket.gethostname()}-{self.port}"

    def serving(self) -> ServingOptions:
        """Prepared ONNX models are cached next to the downloaded students (by digest)."""
        cache = self.state_dir / "onnx" if self.state_dir else None
        return ServingOptions(runtime=self.detector_runtime, precision=self.detector_precision, cache_dir=cache)
