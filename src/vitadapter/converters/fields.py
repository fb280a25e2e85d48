"""Numbers read from foreign configs, refused by field name when they are not numbers.

A config from a file can hold a string, a list or ``None`` where a size belongs; ``int()`` and
``float()`` would fail with a message that names no field (or turn ``"16"`` and ``True`` into numbers),
``bool("false")`` is true.
"""
from __future__ import annotations

import math
from typing import Any, Optional


def as_int(value: Any, field: str, low: Optional[int] = None) -> int:
    """``value`` as a config integer (an ``int`` or an integral float; not a bool or a string), at
    least ``low`` when given."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{field} must be at least {low}, got {value}")
    return value


def as_float(value: Any, field: str) -> float:
    """``value`` as a finite config number (an ``int`` or a ``float``; not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def as_bool(value: Any, field: str) -> bool:
    """``value`` as a config flag: ``True`` or ``False`` only."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {value!r}")
    return value
