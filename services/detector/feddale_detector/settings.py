"""Detector settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

import socket

from pydantic import PositiveFloat, PositiveInt, field_validator

from feddale.ingest.catalog import check_sources_file
from feddale.method.detector import Runtime
from feddale.method.onnx_runtime import Precision
from feddale.service.intake import IntakeOptions
from feddale.service.serving import ServingOptions
from feddale.service.settings import NodeSettings


class Settings(NodeSettings):
    port: int = 8001
    batch_sessions: int = 64  # most sessions one micro-batch scores together
    batch_wait_ms: float = 5.0  # how long a micro-batch waits for more requests
    queue_requests: int = 256  # requests waiting to be scored; beyond that /v1/detect answers 429
    detector_runtime: Runtime = "auto"  # a typo fails at start-up, not on the first student
    detector_precision: Precision = "fp32"
    sources: str | None = None  # a sources file: sources for raw lines besides the presets (docs/ingest.md)
    alert_webhook: str | None = None  # anomalous streamed sessions are POSTed here as Alertmanager alerts
    max_open_sessions: PositiveInt = 10_000  # streamed sessions open at once; beyond, the oldest close early
    session_idle_s: PositiveFloat = 30.0  # a streamed session closes after this long without a line
    session_max_lines: PositiveInt = 256  # ... or when it has this many lines

    _sources_readable = field_validator("sources")(check_sources_file)

    @property
    def name(self) -> str:
        return self.node_name or f"detector-{socket.gethostname()}-{self.port}"

    def serving(self) -> ServingOptions:
        """Prepared ONNX models are cached next to the downloaded students (by digest)."""
        cache = self.state_dir / "onnx" if self.state_dir else None
        return ServingOptions(runtime=self.detector_runtime, precision=self.detector_precision, cache_dir=cache)

    def intake(self) -> IntakeOptions:
        """How streamed raw lines become sessions and where anomalies go."""
        return IntakeOptions(idle_s=self.session_idle_s, max_session_lines=self.session_max_lines,
                             max_open_sessions=self.max_open_sessions, alert_webhook=self.alert_webhook)
