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

GENERAL_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (_NAMED_DATE, WILDCARD),
    (_HOST, WILDCARD),
    (_QUANTITY, WILDCARD),
    (_QUERY_PATH, "/" + WILDCARD),
)


class Masker:
    """Masks one message: the source's own patterns, the general rules, then ``mask``.

    Deterministic and history-free, so the text a model sees for a line never depends on what
    came before it (unlike a template, which generalises as lines arrive).
    """

    def __init__(self, extra: Sequence[re.Pattern[str]] = ()) -> None:
        self._rules = tuple((pattern, WILDCARD) for pattern in extra) + GENERAL_RULES

    def __call__(self, message: str) -> str:
        text = message
        for pattern, replacement in self._rules:
            text = pattern.sub(replacement, text)
        return mask(text)
