"""A *source*: how one system's log lines are read, masked and grouped into sessions.

A source is a small YAML or JSON document (or a built-in preset, see
:mod:`feddale.ingest.presets`)::

    name: myapp
    format: "<Date> <Time> <Level> [<Thread>] <Component>: <Content>"
    masks: ["req-[0-9a-f-]+"]          # optional, masked before the general rules
    key: "order=(\\d+)"                # lines whose Content names the same order form a session
    # or: window: {by: Thread, seconds: 60}
    timestamp: {fields: [Date, Time], format: "%Y-%m-%d %H:%M:%S,%f"}
    idle_seconds: 3600                 # a session closes after an hour without a line
    label_field: Label                 # optional, evaluation only
    normal_label: "-"

``preset: NAME`` in a document starts from that preset and overrides what the document sets.
Everything is checked when the source is built, so a bad regex or a format without
``<Content>`` is one clear error before any line is read.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from feddale.ingest.formats import LineFormat, compile_format

_NAME = r"^[a-z0-9][a-z0-9_.\-]{0,63}$"
_LEAP_YEAR = 2000  # for formats without a year: 29 February parses


class Window(BaseModel):
    """Consecutive fixed-length time windows, one series per value of a header field."""

    model_config = ConfigDict(extra="forbid")

    by: str | None = Field(None, description="header field whose values get their own windows; none: one series")
    seconds: float = Field(..., gt=0, description="window length")


class Timestamp(BaseModel):
    """Where a line's time is: header fields joined by a space, read with a strptime format
    (``epoch`` for seconds since 1970). Formats without a year get a leap year, so times order
    and subtract correctly within one year of logs."""

    model_config = ConfigDict(extra="forbid")

    fields: list[str] = Field(..., min_length=1)
    format: str = Field(..., min_length=1)

    def parse(self, values: dict[str, str]) -> float | None:
        """Seconds since the epoch (UTC), or None when the fields do not hold a time."""
        text = " ".join(values.get(name, "") for name in self.fields).strip()
        try:
            if self.format == "epoch":
                return float(text)
            if "%Y" in self.format or "%y" in self.format:
                moment = datetime.strptime(text, self.format)
            else:
                moment = datetime.strptime(f"{_LEAP_YEAR} {text}", f"%Y {self.format}")
        except ValueError:
            return None
        return moment.replace(tzinfo=timezone.utc).timestamp()


class Source(BaseModel):
    """One system's logs: line format, extra masks, sessionization, optional labels."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("custom", pattern=_NAME, description="names the template state folder")
    format: str = Field(..., description="Loghub <Field> notation; must contain <Content>")
    masks: list[str] = Field(default_factory=list, description="extra regexes masked as <*>")
    key: str | None = Field(None, description="regex on Content; one session per matched value")
    window: Window | None = None
    timestamp: Timestamp | None = None
    idle_seconds: float | None = Field(None, gt=0)
    label_field: str | None = None
    normal_label: str | None = None

    _format: LineFormat = PrivateAttr()
    _masks: tuple[re.Pattern[str], ...] = PrivateAttr()
    _key: re.Pattern[str] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _compile(self) -> Source:
        self._format = compile_format(self.format)
        self._masks = tuple(_regex(pattern, "mask") for pattern in self.masks)
        if self.key is not None:
            self._key = _regex(self.key, "key")
            if self._key.groups > 1:
                raise ValueError(f"key regex {self.key!r} has {self._key.groups} groups; use at most one")
        if self.key is not None and self.window is not None:
            raise ValueError("a source groups lines by key or by window, not both")
        fields = set(self._format.fields)
        named = {"window.by": self.window.by if self.window else None, "label_field": self.label_field}
        named |= {f"timestamp field {f}": f for f in (self.timestamp.fields if self.timestamp else ())}
        for what, name in named.items():
            if name is not None and name not in fields:
                raise ValueError(f"{what} {name!r} is not a field of the format {self.format!r}")
        if (self.window is not None or self.idle_seconds is not None) and self.timestamp is None:
            raise ValueError("window and idle_seconds need a timestamp: {fields: [...], format: ...}")
        if (self.label_field is None) != (self.normal_label is None):
            raise ValueError("label_field and normal_label go together")
        return self

    @property
    def line_format(self) -> LineFormat:
        """The compiled ``format``."""
        return self._format

    @property
    def mask_patterns(self) -> tuple[re.Pattern[str], ...]:
        """The compiled ``masks``."""
        return self._masks

    @property
    def key_pattern(self) -> re.Pattern[str] | None:
        """The compiled ``key``, or None for window sessions."""
        return self._key


def _regex(pattern: str, what: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} regex {pattern!r} is invalid: {error}") from None
    if compiled.match(""):
        raise ValueError(f"{what} regex {pattern!r} matches the empty string")
    return compiled


def build_source(document: dict[str, Any], where: str = "source") -> Source:
    """A Source from a parsed document; ``preset: NAME`` starts from a built-in preset."""
    from feddale.ingest.presets import preset_document

    if not isinstance(document, dict):
        raise ValueError(f"{where}: expected a mapping of source settings, got {type(document).__name__}")
    merged = dict(document)
    base = merged.pop("preset", None)
    if base is not None:
        merged = {**preset_document(str(base)), **merged}
    try:
        return Source(**merged)
    except ValidationError as error:
        problems = "; ".join(
            ": ".join(filter(None, (".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))))
            for e in error.errors()
        )
        raise ValueError(f"{where}: {problems}") from None


def load_source(path: str | Path) -> Source:
    """Read a source document (YAML or JSON, by content; JSON is YAML)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"source file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
        document = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{file}: not a YAML/JSON source document ({str(error).splitlines()[0]})") from None
    return build_source(document, str(file))


def source_from_format(text: str, name: str = "custom") -> Source:
    """A source for logs the presets do not know: only the line format (no sessions by key)."""
    return build_source({"name": name, "format": text}, "--format")
