"""Validation helpers shared by every config: each error names the field and the value."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from codex_jax.errors import ConfigError


def is_int(x: object) -> bool:
    """An int (numpy ints too) that is not a bool: True as a size is always a mistake."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(obj: Any, name: str, *, minimum: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"{type(obj).__name__}.{name} must be an integer >= {minimum}, got {value!r}"
        )


def check_float(
    obj: Any, name: str, *, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    value = getattr(obj, name)
    bad = not is_number(value) or not math.isfinite(value)
    if not bad:
        bad = value <= low if low_open else value < low
        bad = bad or value > high
    if bad:
        bound = f"> {low}" if low_open else f">= {low}"
        if high != math.inf:
            bound += f" and <= {high}"
        raise ConfigError(f"{type(obj).__name__}.{name} must be a finite number {bound}, got {value!r}")


def check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {choices}, got {value!r}")


def check_bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{type(obj).__name__}.{name} must be true or false, got {value!r}")



def sha256_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


