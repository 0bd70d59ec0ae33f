"""Turning raw log lines into the masked text the models see.

Clients mask their private logs before anything else happens: block ids, addresses, paths,
numbers and times are replaced by ``<*>``. That keeps private values out of every model and
payload, and it makes the text of one kind of event the same everywhere, which is what lets a
small language model learn what normal sessions look like. The output follows the style of the
Loghub HDFS templates (``Receiving block blk_<*> src: /<*> dest: /<*>``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Literal

WILDCARD = "<*>"
SEPARATOR = " ;-; "

# --- masking rules, applied in this order ---------------------------------------------------
# URLs go first: they contain hosts, ports and paths that later rules would only half-mask.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]*[^\s\"'<>.,;:)\]]")
# HDFS block ids keep their "blk_" prefix, as in the templates; repeated ids (one line about
# several blocks) collapse to one.
_BLOCK = re.compile(r"blk_-?\d+")
_BLOCK_RUN = re.compile(r"blk_<\*>(?:[\s,]+blk_<\*>)+")
# IPv6 candidates are validated with `ipaddress`, so clock times and C++-style `a::b` survive.
# A bare candidate must not touch a wildcard: "::<*>" left by an earlier pass stays as it is.
_IPV6 = re.compile(
    r"\[(?P<bracketed>[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)(?:%[\w.]+)?\](?::\d{1,5})?"
    r"|(?<![\w:.>])(?P<bare>[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)"
    r"(?:%[\w.]+)?(?![\w:<])"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?!\w|\.\d)")
_DATETIME = re.compile(
    r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"
    r"|\b\d{1,4}/\d{1,2}/\d{2,4}\b"
    r"|(?<![\w:])\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?![\w:])"
)
# Absolute paths only: a slash must follow whitespace or punctuation, so "I/O" and "a/b" stay.
# Trailing dots are part of the path, as in the templates ("part-00590. blk_..." -> "/<*> blk_").
_PATH = re.compile(r"(?<![^\s=(\[{'\"`,:;])/(?:<\*>|[\w.\-~%+@$#])+(?:/(?:<\*>|[\w.\-~%+@$#])*)*")
_HEX = re.compile(
    r"\b0[xX][0-9A-Fa-f]+\b"
    r"|\b[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\b"
    r"|\b(?=[0-9A-Fa-f]*\d)(?=[0-9A-Fa-f]*[A-Fa-f])[0-9A-Fa-f]{8,}\b"
)
# Every remaining digit run goes, also inside identifiers ("subdir19" -> "subdir<*>"): a digit
# left in the text is a value the model would try to memorise.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?")
# "<*> <*>", "<*>, <*>", "<*><*>" -> "<*>". A wildcard glued to a word ("blk_<*> <*>",
# "<*> <*>e") or ending a path ("/<*>:<*>") neither starts nor ends a run, so collapsing never
# joins text into a new path or token that a second pass would mask differently.
_WILDCARD_RUN = re.compile(r"(?<![\w/])<\*>(?:[\s,:;.\-/]*<\*>)+(?!\w)")


def _mask_ipv6(match: re.Match[str]) -> str:
    candidate = match.group("bracketed") or match.group("bare")
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return match.group(0)
    return WILDCARD


def mask(line: str) -> str:
    """Replace the variable parts of one log message by ``<*>``.

    Idempotent (masking masked text changes nothing), so it is safe to apply at every
    boundary. Whitespace runs become single spaces, as in the templates.
    """
    text = " ".join(line.split())
    text = _URL.sub(WILDCARD, text)
    text = _BLOCK.sub("blk_<*>", text)
    text = _IPV6.sub(_mask_ipv6, text)
    text = _IPV4.sub(WILDCARD, text)
    text = _DATETIME.sub(WILDCARD, text)
    text = _PATH.sub("/<*>", text)
    text = _HEX.sub(WILDCARD, text)
    text = _NUMBER.sub(WILDCARD, text)
    text = _BLOCK_RUN.sub("blk_<*>", text)
    return _WILDCARD_RUN.sub(WILDCARD, text)


# Loghub HDFS line: "081109 203615 148 INFO dfs.DataNode$PacketResponder: <content>".
_HDFS_HEADER = re.compile(r"^\d{6} \d{6} \d+ [A-Z]+ [\w.$]+: ?(?P<content>.*?)\s*$")


def strip_header(raw_line: str) -> str:
    """Return the content of a Loghub HDFS line: what follows the ``component:`` prefix.

    The templates describe only this part; date, time, thread id, level and component would be
    noise to the model. Raises ValueError for a line that is not in that format.
    """
    found = _HDFS_HEADER.match(raw_line)
    if found is None:
        raise ValueError(f"not a Loghub HDFS log line: {raw_line[:120]!r}")
    return found.group("content")


def join_messages(messages: Iterable[str]) -> str:
    """Join a session's messages into the one text the language models read."""
    return SEPARATOR.join(messages)


def window_spans(length: int, max_len: int, overlap: int = 0) -> list[tuple[int, int]]:
    """``[start, end)`` spans of the windows that :func:`window` cuts from ``length`` items.

    Window ``k`` starts at ``k * (max_len - overlap)``; windows stop as soon as one reaches the
    end, so the last may be shorter and none lies wholly inside the previous one's overlap.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    if not 0 <= overlap < max_len:
        raise ValueError(f"overlap must be in [0, max_len={max_len}), got {overlap}")
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    step = max_len - overlap
    spans: list[tuple[int, int]] = []
    for start in range(0, length, step):
        spans.append((start, min(start + max_len, length)))
        if start + max_len >= length:
            break
    return spans


def window(ids: Sequence[int], max_len: int, overlap: int = 0) -> list[list[int]]:
    """Split a token sequence into windows of at most ``max_len`` tokens, losing none.

    Long sessions exceed a model's context; cutting them would hide exactly the late events
    (deletes, errors) that make a session anomalous. Consecutive windows share ``overlap``
    tokens so the later one sees some context. Whoever scores the windows (the teacher module)
    combines their per-token results and counts each token once: a token inside an overlap is
    taken from the later window, which had more context before it. An empty sequence gives no
    windows.
    """
    return [list(ids[start:end]) for start, end in window_spans(len(ids), max_len, overlap)]


def compact_view(text: str) -> str:
    """A session as its distinct messages in order of first appearance, each with its count.

    Why: a masked HDFS session is hundreds of word pieces, mostly repeats of the same few
    messages, and a small encoder with a 256-512 token window sees only the head of it. What
    tells sessions apart is which messages occur (a rare error, a missing termination) and
    how often; this view keeps exactly that in a few dozen tokens. Counts above one are
    written as `[xN]` after the message.
    """
    counts: dict[str, int] = {}
    for message in text.split(SEPARATOR):
        counts[message] = counts.get(message, 0) + 1
    return SEPARATOR.join(m if n == 1 else f"{m} [x{n}]" for m, n in counts.items())


View = Literal["full", "compact"]


def as_view(text: str, view: View) -> str:
    """A session text as a model sees it: as is (``full``) or through ``compact_view``."""
    if view == "compact":
        return compact_view(text)
    if view == "full":
        return text
    raise ValueError(f"unknown view {view!r}; expected 'full' or 'compact'")
