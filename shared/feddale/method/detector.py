"""Serving the student: raw log sessions in, P(anomalous) out.

A detector sees raw production lines, so it masks them itself with the same
:func:`feddale.method.preprocess.mask` the clients used (masking is idempotent: already masked input
is unchanged). Sessions longer than the student's ``max_len`` are cut into overlapping windows
and scored as the max P(anomalous) over their windows: an error event late in a long session
still raises the alarm. HDFS traffic is highly repetitive, so identical masked texts in one call
are scored once and results are kept in an LRU cache keyed by the masked session text.

The model runs on ONNX Runtime (:mod:`feddale.method.onnx_runtime`, fp32 or int8) when the
artifact carries an ONNX bundle, else on PyTorch (:mod:`feddale.method.torch_runtime`, imported
only then). This module imports neither torch nor transformers.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from feddale.method.artifact import StudentArtifact
from feddale.method.onnx_runtime import PRECISIONS, Precision
from feddale.method.preprocess import join_messages, mask, window

Runtime = Literal["auto", "onnx", "torch"]
RUNTIMES: tuple[Runtime, ...] = ("auto", "onnx", "torch")
# Padded tokens per forward pass when not given. ONNX Runtime keeps its activation arena at the
# high-water mark, so its batches are capped at 1,024 tokens (4 windows of 256): on the MiniLM
# student with 32-session requests that measured a 217 MB peak for int8 and 275 MB for fp32,
# against 287 / 345 MB at 2,048 tokens, at the same rate. Torch keeps its window count only,
# as it always had.
DEFAULT_BATCH_TOKENS = {"onnx": 1024, "torch": None}


class Backend(Protocol):
    """What the detector needs from a runtime: tokenize, wrap a window, score padded windows."""

    name: str
    content_len: int

    @property
    def device(self) -> str: ...

    def ids(self, texts: Sequence[str]) -> list[list[int]]: ...

    def wrap(self, content: Sequence[int]) -> list[int]: ...

    def probs(self, batch: Sequence[Sequence[int]]) -> np.ndarray: ...


def load_backend(artifact: StudentArtifact, runtime: Runtime = "auto", precision: Precision = "fp32",
                 device: str | None = None, cache_dir: Path | None = None) -> Backend:
    """``auto``: ONNX Runtime when the artifact has a bundle, else torch (int8 needs ONNX).

    ``cache_dir`` keeps the prepared ONNX model files (see :func:`feddale.method.onnx_runtime.prepared_model_file`).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if runtime == "onnx" or (runtime == "auto" and artifact.onnx is not None):
        from feddale.method.onnx_runtime import OnnxBackend

        return OnnxBackend(artifact, precision, cache_dir)
    if precision != "fp32":
        raise ValueError(f"precision {precision!r} needs the onnx runtime; torch serves fp32 only")
    from feddale.method.torch_runtime import TorchBackend

    return TorchBackend(artifact, device=device)


def plan_batches(lengths: Sequence[int], max_windows: int, max_tokens: int) -> list[list[int]]:
    """Group window indices into batches of similar length.

    Windows are sorted by length, so each batch pads to its own longest window rather than to
    the longest of the call, and a batch closes when it holds ``max_windows`` windows or
    when one more would pad past ``max_tokens`` tokens (a long window gets fewer neighbours,
    which bounds activation memory). Every index appears exactly once.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if current and (len(current) >= max_windows or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Detector:
    """Scores sessions with one student artifact; the model is built once per detector.

    ``threshold`` is a probability; by default the artifact's own, chosen without labels when
    the student was trained (:mod:`feddale.method.threshold`; 0.5 for artifacts without one). ``batch_size`` caps how many windows go through the model at once and
    ``max_batch_tokens`` how many (padded) tokens (default :data:`DEFAULT_BATCH_TOKENS`):
    together they bound activation memory. On torch, 8 windows kept a 32-session request at
    591 MB resident against 691 MB with 32 (MiniLM student, 2 CPU cores). ``overlap`` is the number of tokens consecutive windows
    share (default a quarter of a window). Cache counters: every session requested is either a
    ``hit`` (served without running the model, including repeats inside one call) or a ``miss``.
    """

    def __init__(
        self,
        artifact: StudentArtifact,
        *,
        threshold: float | None = None,
        batch_size: int = 8,
        max_batch_tokens: int | None = None,
        cache_size: int = 10_000,
        overlap: int | None = None,
        runtime: Runtime = "auto",
        precision: Precision = "fp32",
        device: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        threshold = artifact.threshold if threshold is None else threshold
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.artifact = artifact
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.backend = load_backend(artifact, runtime, precision, device, cache_dir)
        default_tokens = DEFAULT_BATCH_TOKENS.get(self.backend.name)
        self.max_batch_tokens = max_batch_tokens or default_tokens or sys.maxsize
        content_len = self.backend.content_len
        self.overlap = content_len // 4 if overlap is None else overlap
        if not 0 <= self.overlap < content_len:
            raise ValueError(f"overlap must be in [0, {content_len}), got {self.overlap}")
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def runtime(self) -> str:
        """``onnx-fp32``, ``onnx-int8`` or ``torch``: which model answers."""
        return f"onnx-{self.backend.precision}" if self.backend.name == "onnx" else self.backend.name

    @property
    def device(self) -> str:
        return self.backend.device

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self.hits = self.misses = 0

    def predict_proba(self, sessions: Sequence[Sequence[str]]) -> np.ndarray:
        """P(anomalous) for each session (a sequence of raw or masked log lines), shape (n,)."""
        texts = [self._session_text(i, s) for i, s in enumerate(_check_sessions(sessions))]
        result = np.empty(len(texts), dtype=np.float64)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                if text in self._cache:
                    self._cache.move_to_end(text)
                    result[i] = self._cache[text]
                    self.hits += 1
                elif text in todo:
                    todo[text].append(i)
                    self.hits += 1
                else:
                    todo[text] = [i]
                    self.misses += 1
        if todo:
            computed = self._score(list(todo))
            with self._lock:
                for (text, positions), p in zip(todo.items(), computed):
                    result[positions] = p
                    if self.cache_size:
                        self._cache[text] = float(p)
                        self._cache.move_to_end(text)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return result

    def predict(self, sessions: Sequence[Sequence[str]]) -> list[tuple[bool, float]]:
        """(is_anomalous, P(anomalous)) per session, using ``threshold``."""
        return [(bool(p >= self.threshold), float(p)) for p in self.predict_proba(sessions)]

    @staticmethod
    def _session_text(i: int, session: Sequence[str]) -> str:
        if not session:
            raise ValueError(f"session {i} has no log lines")
        for line in session:
            if not isinstance(line, str):
                raise ValueError(f"session {i}: every log line must be a string, got {type(line).__name__}")
        return join_messages(mask(line) for line in session)

    def _score(self, texts: list[str]) -> np.ndarray:
        """Max P(anomalous) over each (distinct) text's windows, windows batched by length."""
        owners: list[int] = []
        windows: list[list[int]] = []
        for t, ids in enumerate(self.backend.ids(texts)):
            for piece in window(ids, self.backend.content_len, self.overlap) or [[]]:
                owners.append(t)
                windows.append(self.backend.wrap(piece))
        best = np.zeros(len(texts), dtype=np.float64)
        for batch in plan_batches([len(w) for w in windows], self.batch_size, self.max_batch_tokens):
            probs = self.backend.probs([windows[i] for i in batch])
            for i, p in zip(batch, probs):
                best[owners[i]] = max(best[owners[i]], float(p))
        return best


def _check_sessions(sessions: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    if isinstance(sessions, str):
        raise ValueError("sessions must be a sequence of sessions (each a sequence of log lines), not a string")
    sessions = list(sessions)
    for i, session in enumerate(sessions):
        if isinstance(session, str):
            raise ValueError(f"session {i} is a string; pass each session as a sequence of log lines")
    return sessions
