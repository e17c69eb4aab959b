"""Config validation that names the field and the fix: every error reads "field: problem; fix".

Torch-free and dependency-free: model, run and sweep configs all check their input here, before Ray starts.
"""
from __future__ import annotations

import math
from typing import Any, NoReturn


def fail(field: str, problem: str, fix: str) -> NoReturn:
    raise ValueError(f"{field}: {problem}; {fix}")


def number(field: str, value: Any, *, positive: bool = True, allow_zero: bool = False, parse: bool = False) -> float:
    """A finite real number (not a bool), > 0 (>= 0 with allow_zero) unless positive=False.

    parse: accept a numeric string as the number it is meant to be (YAML 1.1 reads `1e15` as a string); only
    where values come from YAML, so a config built in code never keeps a string in a number's place.
    """
    if parse and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            fail(field, f"must be a number, got {value!r}", "write e.g. 1.0e15")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(field, f"must be a finite number, got {value!r}", "write e.g. 1.0e15")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        fail(field, f"must be {bound}, got {value!r}", f"set it to a number {bound}")
    return float(value)


def integer(field: str, value: Any, minimum: int = 1) -> int:
    """An int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(field, f"must be an integer >= {minimum}, got {value!r}", f"set it to an integer >= {minimum}")
    return value
