"""Durations as people write them (``90s``, ``30m``, ``1h30m``): light, so the command line
refuses a bad ``--time-budget`` without loading TensorFlow."""

from __future__ import annotations

import re

from cnnforge.core.errors import CnnforgeError

_UNITS = {"s": 1, "m": 60, "h": 3600}

# one term of a duration; matched at one position after another, so parsing is linear (a
# single pattern repeating this term backtracks exponentially on a long malformed text)
_TERM = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``30m``, ``1.5h``, ``1h30m``."""
    cleaned = text.strip().lower().replace(" ", "")
    terms, at = [], 0
    while at < len(cleaned) and (term := _TERM.match(cleaned, at)):
        terms.append(term.groups())
        at = term.end()
    if not terms or at < len(cleaned):
        raise CnnforgeError(f"time budget {text!r} is not a duration; write e.g. 30m, 1h, 90s")
    seconds = sum(float(number) * _UNITS[unit or "s"] for number, unit in terms)
    if seconds <= 0:
        raise CnnforgeError(f"time budget {text!r} must be more than zero")
    return seconds
