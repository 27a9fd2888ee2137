"""Experiments of spec §5, one module each: a ``@dataclass`` of arguments (``shiq_toy.options.option`` fields, each
with its help) and ``main(args)``; ``shiq_toy.cli`` turns each dataclass into a command.

- :mod:`shiq_toy.experiments.bandit`: the three-armed bandit regret figure.
- :mod:`shiq_toy.experiments.tree`: the token-tree ablation of the ShiQ variants.

This module holds what they share: a context manager that pins torch to a number of threads, CSV writing, the
run summaries, confidence intervals and the mean-and-band curve of the figures.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = ["num_threads", "write_csv", "plot_band", "BAND_MEANING",
           "mean_ci", "difference_ci"]


def mean_ci(values: Iterable[float], *, level: float = 0.95) -> tuple[float, float]:
    """Mean of independent runs and the half-width of its Student-t confidence interval:

        mean ± t_{(1+level)/2, n−1} · s / √n,    s² = Σ (x − mean)² / (n − 1).

    ``(mean, nan)`` for a single value (no interval from one run); ValueError for none.
    """
    from scipy.stats import t

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if x.size < 2:
        return float(x[0]), float("nan")
    return float(x.mean()), float(t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))


def difference_ci(a: Iterable[float], b: Iterable[float], *, level: float = 0.95) -> tuple[float, float]:
    """``mean(a) − mean(b)`` of two groups of independent runs and the half-width of Welch's interval:

        d ± t_{(1+level)/2, ν} · √(s_a²/n_a + s_b²/n_b),   ν = (s_a²/n_a + s_b²/n_b)² / Σ_g (s_g²/n_g)² / (n_g − 1)

    (Welch–Satterthwaite degrees of freedom; d = mean(a) − mean(b)). The difference is significant at ``level`` when the interval
    excludes 0. Needs at least 2 runs per group; NaN half-width when both groups have zero spread.
    """
    from scipy.stats import t

    x, y = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if x.size < 2 or y.size < 2:
        raise ValueError(f"difference_ci needs at least 2 runs per group, got {x.size} and {y.size}")
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    if va + vb == 0:
        return float(x.mean() - y.mean()), float("nan")
    dof = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    return float(x.mean() - y.mean()), float(t.ppf((1 + level) / 2, dof) * np.sqrt(va + vb))


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` and restore the previous setting after.

    The toy tensors are tiny: one thread avoids the synchronisation cost of intra-op parallelism.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"threads must be an integer >= 1, got {count!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_csv(path: Path, header: list[str], rows: Iterable[Iterable]) -> None:
    """Write a CSV file with a header row; floats in ``repr`` precision."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_summary(path: Path, args, summary: dict) -> dict:
    """Write ``{"args": args (a dataclass; paths as strings), **summary}`` as indented JSON; returns it."""
    record = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(args).items()}, **summary}
    path.write_text(json.dumps(record, indent=2))
    return record


#: What :func:`plot_band`'s curves and bands are, for the figures' captions.
BAND_MEANING = "line: mean over {n} {what}; band: 10–90 % quantiles over the {what} (their spread, not a confidence interval)"


def plot_band(ax, steps: np.ndarray, values: np.ndarray, *, color: str, label: str) -> None:
    """One curve of the figures: the mean over runs and its 10–90% band — the 10 % and 90 % quantiles of the runs,
    their spread, not a confidence interval of the mean (:data:`BAND_MEANING`; the figure must say over what);
    steps (K,), values (K, runs)."""
    ax.plot(steps, values.mean(1), color=color, label=label, lw=1.6)
    ax.fill_between(steps, np.quantile(values, 0.1, axis=1), np.quantile(values, 0.9, axis=1), color=color, alpha=0.15, lw=0)
