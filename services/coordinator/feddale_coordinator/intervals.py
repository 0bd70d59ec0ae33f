"""Intervals written the way operators write them: ``24h``, ``30m``, ``90s``, ``1h30m``.

Its own small module so the coordinator's settings can parse FEDDALE_SCHEDULE without importing
the run engine.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_interval(text: str | float | int) -> float:
    """Seconds in an interval written like ``24h``, ``30m``, ``90s``, ``1h30m``, ``2d`` (or plain seconds)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        spec = text.strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", spec):
            seconds = float(spec)
        elif spec and _PART.sub("", spec) == "":
            seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(spec))
        else:
            raise ValueError(f"{text!r} is not an interval; write e.g. 24h, 30m, 90s or 1h30m")
    if seconds <= 0:
        raise ValueError("the interval must be longer than 0 s")
    return seconds


Interval = Annotated[float, BeforeValidator(parse_interval)]
