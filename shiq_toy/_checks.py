"""Argument checks shared by the solvers, the losses and the baselines (one message for one mistake)."""

from __future__ import annotations

import math


def check_beta(beta: float) -> None:
    """β must be a finite real number > 0 (the KL coefficient)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_gamma(gamma: float, *, allow_one: bool = True) -> None:
    """γ must lie in (0, 1] — or in (0, 1) where an infinite horizon needs a contraction."""
    upper_ok = isinstance(gamma, (int, float)) and (gamma <= 1.0 if allow_one else gamma < 1.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 < gamma and upper_ok):
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"gamma must lie in {interval}, got {gamma!r}")
