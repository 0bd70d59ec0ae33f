"""The data the whole system passes around, and where labels are allowed to live.

A :class:`Session` has no label field on purpose: client shards and the public set are built
from plain sessions, so no code path that trains or selects can read a label by accident. Labels
exist only in :class:`Dataset` (to build splits), :class:`LabeledSession` and the harness-only
fields of :class:`FederationSplit`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from feddale.method.preprocess import join_messages

LABELS = (0, 1)  # 0 normal, 1 anomalous


@dataclass(frozen=True)
class Session:
    """One grouped log session (an HDFS block): masked messages in order of appearance."""

    id: str
    messages: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"session id must be a non-empty string, got {self.id!r}")
        messages = tuple(self.messages)
        if not all(isinstance(m, str) for m in messages):
            raise ValueError(f"session {self.id}: every message must be a string")
        object.__setattr__(self, "messages", messages)

    @property
    def text(self) -> str:
        """The messages joined with the separator: what the language models read."""
        return join_messages(self.messages)


def _check_label(label: object, where: str) -> None:
    if isinstance(label, bool) or label not in LABELS:
        raise ValueError(f"{where}: label must be 0 (normal) or 1 (anomalous), got {label!r}")


@dataclass(frozen=True)
class LabeledSession:
    """A session with its ground truth; only the evaluation harness holds these."""

    session: Session
    label: int

    def __post_init__(self) -> None:
        _check_label(self.label, f"session {self.session.id}")


@dataclass(frozen=True)
class Dataset:
    """A named collection of sessions; ``labels`` is None when unknown (a user's own logs)."""

    name: str
    sessions: tuple[Session, ...]
    labels: tuple[int, ...] | None

    def __post_init__(self) -> None:
        sessions = tuple(self.sessions)
        object.__setattr__(self, "sessions", sessions)
        if self.labels is None:
            return
        labels = tuple(self.labels)
        if len(labels) != len(sessions):
            raise ValueError(
                f"dataset {self.name!r}: {len(labels)} labels for {len(sessions)} sessions"
            )
        for session, label in zip(sessions, labels):
            _check_label(label, f"dataset {self.name!r}, session {session.id}")
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.sessions)


@dataclass(frozen=True)
class FederationSplit:
    """Everything one federated experiment needs, disjoint by session id.

    ``clients`` and ``public`` are unlabeled by type. ``public_labels`` (purity reporting only),
    ``validation`` and ``test`` are for the evaluation harness and never leave it.
    """

    clients: tuple[tuple[Session, ...], ...]
    public: tuple[Session, ...]
    public_labels: tuple[int, ...]
    validation: tuple[LabeledSession, ...]
    test: tuple[LabeledSession, ...]
    # The test as users meet it: the natural anomaly rate (HDFS 2.9%), drawn after the others.
    natural: tuple[LabeledSession, ...] = ()

    def __post_init__(self) -> None:
        if len(self.public_labels) != len(self.public):
            raise ValueError(
                f"{len(self.public_labels)} public labels for {len(self.public)} public sessions"
            )
        if any(not shard for shard in self.clients):
            raise ValueError("every client shard must hold at least one session")


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 (hex) of an ordered list of texts, identifying e.g. one public set.

    Each text is length-prefixed, so ["ab", "c"] and ["a", "bc"] differ; the count is hashed
    first, so the empty list has its own digest too.
    """
    digest = hashlib.sha256(struct.pack(">Q", len(texts)))
    for text in texts:
        data = text.encode("utf-8")
        digest.update(struct.pack(">Q", len(data)))
        digest.update(data)
    return digest.hexdigest()
