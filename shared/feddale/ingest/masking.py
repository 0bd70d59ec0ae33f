"""Masking any system's log messages: a source's own rules, then general ones, then the HDFS rules.

:func:`feddale.method.preprocess.mask` was written for HDFS and follows its templates exactly;
it is the last step here, so an HDFS line masks exactly as the ``hdfs-raw`` and ``hdfs-csv``
paths render it. Other systems write values that rule set leaves half-masked, which splits one
kind of event into many templates (the parsing benchmark, ``feddale logs bench-parse``, showed
each of these):

* timestamps written with day and month names (``Fri Jul  1 04:28:47 2005``): the HDFS rules
  take the digits and leave ``Fri Jul <*>``, a different text for every day;
* host names (``proxy.cse.cuhk.edu.hk:5070``, ``ns.example.com``): only their digits went;
* quantities with a unit (``(1.2 KB)``, ``<1 sec``, ``300ms``): ``<*>KB`` vs ``<*> KB``;
* paths with a query string (``/v2/x/servers?changes-since=...``): the path rule stops at ``?``.

A source may add its own regular expressions; they run first, so a value the general rules
would cut in pieces (a custom id with dashes and digits) goes whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from feddale.method.preprocess import WILDCARD, mask

_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*"
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*"
_NAMED_DATE = re.compile(
    rf"\b(?:{_DAY},? +)?{_MONTH} +\d{{1,2}}(?:,? +\d{{4}})? +\d{{1,2}}:\d{{2}}"
    rf"(?::\d{{2}}(?:[.,]\d+)?)?(?: +\d{{4}})?\b"
    rf"|\b{_DAY} +{_MONTH} +\d{{1,2}}\b"
)
# A dotted name ending in a top-level domain; not inside a path or a longer dotted name, so
# Java class names (org.apache.X) and file names stay.
_TLD = r"(?:com|net|org|edu|gov|mil|int|info|biz|io|arpa|local|lan|[a-z]{2})"
_HOST = re.compile(rf"(?<![\w.\-/])(?:[A-Za-z0-9\-_]+\.)+{_TLD}(?::\d+)?(?![\w\-])(?!\.\w)")
_QUANTITY = re.compile(
    r"(?:(?<=\s)|^|(?<=\())(?:[<>]=?\s?)?\d+(?:\.\d+)?\s?"
    r"(?:[KMGTP]i?B|[KMGT]b|ms|us|ns|sec|secs|min|mins)\b"
)
_QUERY_PATH = re.compile(r"(?<![^\s=(\"'\[])/[^\s\"'?]*\?[^\s\"']*")

_TLD_HINT = re.compile(rf"\.{_TLD}\b")  # a literal start: the regex engine scans for it fast
_MONTH_HINT = re.compile(r"Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec")
_UNIT_HINT = re.compile(r"\d\s?(?:[KMGTP]i?B|[KMGT]b|[mun]s|sec|min)")


def _general(text: str) -> str:
    """The general rules; each guarded by a cheap test, since most messages need none of them
    and a full regex pass per rule costs more than Drain itself."""
    if _MONTH_HINT.search(text):
        text = _NAMED_DATE.sub(WILDCARD, text)
    if _TLD_HINT.search(text):
        text = _HOST.sub(WILDCARD, text)
    if _UNIT_HINT.search(text):
        text = _QUANTITY.sub(WILDCARD, text)
    if "?" in text:
        text = _QUERY_PATH.sub("/" + WILDCARD, text)
    return text


class Masker:
    """Masks one message: the source's own patterns, the general rules, then ``mask``.

    Deterministic and history-free, so the text a model sees for a line never depends on what
    came before it (unlike a template, which generalises as lines arrive). Logs repeat
    themselves word for word (half the lines of the Loghub-2k samples repeat an earlier line's
    message), so results are remembered: up to ``memo_size`` messages, forgotten all at once
    when full (cheaper than an LRU's bookkeeping on every line).
    """

    def __init__(self, extra: Sequence[re.Pattern[str]] = (), memo_size: int = 8192) -> None:
        self._extra = tuple(extra)
        self._memo: dict[str, str] = {}
        self._memo_size = memo_size

    def __call__(self, message: str) -> str:
        found = self._memo.get(message)
        if found is not None:
            return found
        text = message
        for pattern in self._extra:
            text = pattern.sub(WILDCARD, text)
        text = mask(_general(text))
        if len(self._memo) >= self._memo_size:
            self._memo.clear()
        self._memo[message] = text
        return text
