"""Client-node settings, read once from the environment (documented in docs/services.md)."""

from __future__ import annotations

from pydantic import field_validator

from feddale.ingest.catalog import check_sources_file
from feddale.service.settings import NodeSettings


class Settings(NodeSettings):
    port: int = 8002
    data: str | None = None  # a data source spec; the node takes its shard of the split
    log_dir: str | None = None  # the node's own logs instead of a shard
    sources: str | None = None  # a sources file: raw log files the node follows (docs/ingest.md)
    sources_poll_s: float = 10.0  # how often the followed files are read

    _sources_readable = field_validator("sources")(check_sources_file)
