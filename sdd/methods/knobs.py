"""Settings of the inference-time methods: validated values and by-name overrides (one line per bad value).

SLD, SEGA (and any guidance method after them) take their preset values as frozen dataclasses and let a user
override any of them by name (``{"sld_guidance_scale": 500}``, diffusers' argument names); these helpers check a
value's kind and an override's name, and coerce ``10.0`` to ``10`` where a count is meant.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from sdd.errors import UserError


def need(ok: bool, what: str, message: str) -> None:
    if not ok:
        raise UserError(f"{what}: {message}")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def coerce(value: Any, like: Any) -> Any:
    """An override value in the type of the field it replaces; a whole float is accepted for an integer
    (YAML and JSON writers produce 10.0), anything else of the wrong kind is left for validation to name."""
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(like, int) and not isinstance(like, bool) and isinstance(value, float) and value.is_integer():
        return int(value)
    if like is None and isinstance(value, float) and value.is_integer():  # optional integers (cooldown)
        return int(value)
    return value


def checked_overrides(overrides: Optional[Mapping[str, Any]], allowed: Sequence[str], what: str) -> dict:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise UserError(f"{what}: unknown setting '{unknown[0]}', expected one of {list(allowed)}")
    return overrides
