"""Declared hyper-parameter spaces → Ray Tune domains.

Scorers (``scorer_space``) and losses (``loss_space``) declare their spaces next to their code (OpenOOD style) as
``{param: {"type": "loguniform"|"uniform"|"choice"|"randint", ...}}``; that is what Tune searches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

#: The declared-space types understood by :func:`tune_space` (the scorer/loss registries' format).
SPACE_TYPES = ("loguniform", "uniform", "choice", "randint")


def tune_space(declared: Mapping[str, Mapping[str, Any]], only: Iterable[str] | None = None) -> dict[str, Any]:
    """Ray Tune domains for a declared space ``{param: {"type": …, …}}``; ``only`` keeps a subset of params.

    ``loguniform``/``uniform`` need ``low < high`` (``low > 0`` for log); ``choice`` needs a non-empty ``values``;
    ``randint`` samples ``[low, high)``. Anything else raises ``ValueError`` naming the parameter.
    """
    from ray import tune

    keep = None if only is None else set(only)
    if keep is not None and keep - set(declared):
        raise ValueError(f"parameters {sorted(keep - set(declared))} are not in the declared space {sorted(declared)}")
    out: dict[str, Any] = {}
    for name, spec in declared.items():
        if keep is not None and name not in keep:
            continue
        kind = spec.get("type")
        if kind in ("loguniform", "uniform", "randint"):
            low, high = spec.get("low"), spec.get("high")
            if low is None or high is None or not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(f"space of {name!r}: {kind} needs low < high (low > 0 for log), got {dict(spec)}")
            domain = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind]
            out[name] = domain(low, high)
        elif kind == "choice":
            values = list(spec.get("values") or [])
            if not values:
                raise ValueError(f"space of {name!r}: choice needs a non-empty 'values', got {dict(spec)}")
            out[name] = tune.choice(values)
        else:
            raise ValueError(f"space of {name!r}: type must be one of {SPACE_TYPES}, got {kind!r}")
    return out


def in_space(value: Any, spec: Mapping[str, Any]) -> bool:
    """Whether ``value`` lies in one declared-space entry (used to validate fixed points such as the T grid)."""
    if spec["type"] == "choice":
        return value in spec["values"]
    return spec["low"] <= value <= spec["high"]


def at_bound(value: float, spec: Mapping[str, Any], rel: float = 0.05) -> str:
    """``"lower"`` / ``"upper"`` when ``value`` sits within ``rel`` (log-relative for loguniform) of a bound of a
    continuous space, else ``""``: a best value there means the range was too small."""
    if spec["type"] not in ("loguniform", "uniform"):
        return ""
    low, high = spec["low"], spec["high"]
    if spec["type"] == "loguniform":
        value, low, high = math.log(value), math.log(low), math.log(high)
    width = rel * (high - low)
    return "lower" if value <= low + width else "upper" if value >= high - width else ""
