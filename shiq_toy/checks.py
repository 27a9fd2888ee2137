"""Argument checks shared by the solvers, the losses and the baselines (one message for one mistake)."""

from __future__ import annotations

import math


def check_number(name: str, value: float, *, allow_zero: bool = False) -> None:
    """``value`` must be a finite real number > 0 (or >= 0 with ``allow_zero``); bools are refused."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


def check_beta(beta: float) -> None:
    """β must be a finite real number > 0 (the KL coefficient)."""
    check_number("beta", beta)


def check_gamma(gamma: float, *, allow_one: bool = True) -> None:
    """γ must lie in (0, 1] — or in (0, 1) where an infinite horizon needs a contraction."""
    upper_ok = isinstance(gamma, (int, float)) and (gamma <= 1.0 if allow_one else gamma < 1.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 < gamma and upper_ok):
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"gamma must lie in {interval}, got {gamma!r}")


def check_at_least_one(args: object, names: tuple[str, ...] | list[str]) -> None:
    """Every integer option ``names`` of ``args`` (an experiment's arguments) must be >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")


def check_subset(name: str, values, allowed) -> None:
    """``values`` (an option's list) must be a non-empty subset of ``allowed``."""
    allowed = tuple(allowed)
    if not values or any(value not in allowed for value in values):
        raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {values}")
