"""Argument checks shared by the public API: each raises an error that names the argument."""
from __future__ import annotations

import math


def check_int(name: str, value, minimum: int = 0) -> int:
    """`value` as an int >= `minimum` (bools are not ints here), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_number(name: str, value, *, positive: bool = False, optional: bool = False) -> float | None:
    """`value` as a finite float (> 0 with `positive`, >= 0 otherwise; None allowed with `optional`),
    else ValueError naming `name`."""
    if value is None and optional:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        kind = "a positive finite number" if positive else "a finite non-negative number"
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{kind}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
