"""Log data: session types, importers, the synthetic generator and federation splits."""

from feddale.data.sources import default_source, load_dataset
from feddale.data.splits import make_split, shard
from feddale.data.types import (
    Dataset,
    FederationSplit,
    LabeledSession,
    Session,
    texts_digest,
)

__all__ = [
    "Dataset",
    "FederationSplit",
    "LabeledSession",
    "Session",
    "default_source",
    "load_dataset",
    "make_split",
    "shard",
    "texts_digest",
]
