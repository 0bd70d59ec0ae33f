"""One raw line to header fields and a masked message, with every failure named and counted.

A line that cannot be used is never dropped silently: it is reported with a reason, and the
caller counts it (``ParseCounts``) and says so at the end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from feddale.ingest.formats import CONTENT
from feddale.ingest.masking import Masker
from feddale.ingest.reader import RawLine
from feddale.ingest.sources import Source

# Why a line was not parsed; the keys of the counts.
BLANK = "blank"
BINARY = "binary"
TOO_LONG = "too_long"
NO_MATCH = "no_match"
_CONTROL = frozenset(chr(c) for c in range(32) if chr(c) not in "\t")


@dataclass(frozen=True)
class ParsedLine:
    """A line's fields and masked Content, or the reason it has none."""

    raw: RawLine
    fields: dict[str, str] | None
    masked: str | None
    problem: str | None  # one of BLANK, BINARY, TOO_LONG, NO_MATCH

    @property
    def content(self) -> str:
        """The unmasked message (empty for a line that was not parsed)."""
        return self.fields[CONTENT] if self.fields else ""


class LineParser:
    """Splits lines by a source's format and masks their Content; counts what it could not."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._masker = Masker(source.mask_patterns)
        self.counts: Counter[str] = Counter()

    @property
    def lines(self) -> int:
        """Lines seen so far, parsed or not."""
        return self.counts["lines"]

    @property
    def unparsed(self) -> int:
        """Lines that could not be used, for any reason."""
        return self.lines - self.counts["parsed"]

    def parse(self, raw: RawLine) -> ParsedLine:
        """Split and mask one line, or say why it cannot be used; counts either way."""
        self.counts["lines"] += 1
        problem = _problem(raw.text)
        fields = None
        if problem is None:
            fields = self.source.line_format.split(raw.text)  # type: ignore[arg-type]
            if fields is None:
                problem = NO_MATCH
        if problem is not None:
            self.counts[problem] += 1
            return ParsedLine(raw, None, None, problem)
        self.counts["parsed"] += 1
        assert fields is not None
        return ParsedLine(raw, fields, self._masker(fields[CONTENT]), None)

    def summary(self) -> str:
        """One line for the operator: how many lines, how many unparsed and why."""
        reasons = ", ".join(
            f"{self.counts[r]} {r.replace('_', ' ')}"
            for r in (NO_MATCH, TOO_LONG, BINARY, BLANK) if self.counts[r]
        )
        text = f"{self.lines} lines, {self.counts['parsed']} parsed"
        return text + (f", {self.unparsed} not parsed ({reasons})" if self.unparsed else "")


def _problem(text: str | None) -> str | None:
    if text is None:
        return TOO_LONG
    if not text.strip():
        return BLANK
    if "\x00" in text or sum(ch in _CONTROL for ch in text[:256]) > 8:
        return BINARY
    return None
