"""Loghub's ``<Field>`` line formats, compiled to regular expressions.

A format such as ``<Date> <Time> <Pid> <Level> <Component>: <Content>`` names the header fields of
a line and where the message (``Content``) starts. It is the notation of Loghub and of the log
parsing benchmarks, so the formats published for the Loghub systems work unchanged. Between the
fields the text is a regular-expression fragment (Loghub's own formats escape brackets, ``\\[``,
and use optional groups, ``(\\[<PID>\\])?``); a run of spaces matches any run of whitespace, since
logs pad columns with spaces or tabs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTENT = "Content"
MAX_FIELD = 256  # characters in one header field that is not followed by whitespace
_FIELD = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")
_SPACES = re.compile(r" +")
_NEXT_IS_FIELD = re.compile(r" +<[A-Za-z_]")


class FormatError(ValueError):
    """A line format that cannot be used: no ``<Content>``, a repeated field, a bad regex."""


@dataclass(frozen=True)
class LineFormat:
    """A compiled line format: ``split(line)`` gives the header fields and the content."""

    text: str
    fields: tuple[str, ...]
    pattern: re.Pattern[str]

    def split(self, line: str) -> dict[str, str] | None:
        """The line's fields (``Content`` included), or None when the line does not match.

        Fields of an optional group that did not take part come back as empty strings, so every
        record of one source has the same keys.
        """
        found = self.pattern.match(line.rstrip())
        if found is None:
            return None
        return {name: value or "" for name, value in found.groupdict().items()}


def _field_pattern(name: str, rest: str) -> str:
    """The capture for one field, given the format text after it.

    Bounded on purpose: a format is matched against whatever a file holds, including a line of
    a megabyte, and nested lazy ``.*?`` groups backtrack without end on such a line. A header
    field followed by whitespace and the next field takes one run of non-space characters
    (possessive, so it never backtracks); any other header field (``<Program> - ``, ``\\[<Pid>\\]``)
    lazily at most ``MAX_FIELD`` characters, spaces included; the Content the rest.
    """
    if name == CONTENT:
        return f"(?P<{name}>.*)"
    if _NEXT_IS_FIELD.match(rest):
        return f"(?P<{name}>\\S++)"
    return f"(?P<{name}>.{{0,{MAX_FIELD}}}?)"


def compile_format(text: str) -> LineFormat:
    """Compile a ``<Field>`` format; raise FormatError with the reason when it cannot be used.

    The whole line must match (anchored at both ends; trailing whitespace is ignored, as Loghub
    lines often carry a trailing space). How each field matches: :func:`_field_pattern`.
    """
    if not text.strip():
        raise FormatError("the line format is empty")
    fields = _FIELD.findall(text)
    if CONTENT not in fields:
        raise FormatError(f"line format {text!r} has no <{CONTENT}> field (the message)")
    duplicates = sorted({name for name in fields if fields.count(name) > 1})
    if duplicates:
        raise FormatError(f"line format {text!r} names {duplicates} more than once")
    pieces: list[str] = []
    position = 0
    for found in _FIELD.finditer(text):
        pieces.append(_SPACES.sub(r"\\s+", text[position : found.start()]))
        pieces.append(_field_pattern(found.group(1), text[found.end() :]))
        position = found.end()
    pieces.append(_SPACES.sub(r"\\s+", text[position:]))
    source = "^" + "".join(pieces) + "$"
    try:
        pattern = re.compile(source, re.DOTALL)
    except re.error as error:
        raise FormatError(f"line format {text!r} is not a valid pattern: {error}") from None
    lost = [name for name in fields if name not in pattern.groupindex]
    if lost:
        # "[<Thread>]" compiles as a character class and swallows the field: the text between
        # fields is a regex, as in Loghub's formats, so literal brackets are written "\\[".
        raise FormatError(
            f"line format {text!r}: field(s) {lost} end up inside a regex construct; "
            "escape literal brackets and parentheses (\\[<Pid>\\])"
        )
    return LineFormat(text, tuple(fields), pattern)
