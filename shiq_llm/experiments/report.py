"""Tables and figures of the LLM experiments, from a sweep's long rows (``shiq_llm.experiments.sweep.curve_rows``).

Every number is a mean over seeds with the half-width of its 95 % Student-t interval
(:func:`shiq_toy.experiments.mean_ci`); :func:`summarise` computes them per group (method, β, step, …),
:func:`plot_tradeoff` draws a measured value against KL(π‖π_ref) per method across β, :func:`plot_steps` a value
against training steps with its interval as a band, and :func:`markdown_table` / :func:`fmt_ci` write the tables
the README quotes. A difference is called significant only when the Welch interval of the difference excludes 0
(:func:`compare`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from shiq_toy.experiments import difference_ci, mean_ci

__all__ = ["summarise", "final_rows", "compare", "fmt_ci", "markdown_table", "method_colors", "plot_tradeoff",
           "plot_steps"]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise(rows: Iterable[dict], by: Sequence[str], keys: Sequence[str]) -> list[dict]:
    """One row per group of ``by`` (in order of first appearance): the group's keys, then for each of ``keys``
    the mean over the group's rows (the seeds), ``<key>_ci`` (95 % half-width, NaN for one value) and ``<key>_n``.
    A key missing or not finite in a row is left out of that key's mean; a key with no value is absent."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in by), []).append(row)
    out = []
    for group, members in groups.items():
        summary = dict(zip(by, group))
        for key in keys:
            values = [m[key] for m in members if _number(m.get(key))]
            if values:
                summary[key], summary[f"{key}_ci"] = mean_ci(values)
                summary[f"{key}_n"] = len(values)
        out.append(summary)
    return out


def final_rows(rows: Iterable[dict]) -> list[dict]:
    """The last evaluated step of each cell (``task``, ``method``, ``beta``, ``seed``) of long rows: the final
    model's evaluation (rows with ``mean_reward``), merged with the cell's first logged ``loss`` as
    ``initial_loss``."""
    cells: dict[tuple, dict] = {}
    for row in rows:
        key = (row.get("task"), row["method"], row["beta"], row["seed"])
        cell = cells.setdefault(key, {})
        if _number(row.get("loss")) and "initial_loss" not in cell:
            cell["initial_loss"] = row["loss"]
        if _number(row.get("mean_reward")) and row["step"] >= cell.get("step", -1):
            cell.update({k: v for k, v in row.items() if k not in ("loss",)})
    return [c for c in cells.values() if "mean_reward" in c]


def compare(rows: Sequence[dict], key: str, a: str, b: str, *, by: Sequence[str] = ("beta",)) -> list[dict]:
    """``a − b`` of ``key`` over seeds, per group of ``by`` where both methods have ≥ 2 runs: ``{by…, diff, ci,
    significant}`` with Welch's 95 % interval (:func:`shiq_toy.experiments.difference_ci`)."""
    out = []
    for group in dict.fromkeys(tuple(r.get(k) for k in by) for r in rows):
        def values(method):
            return [r[key] for r in rows if r["method"] == method and tuple(r.get(k) for k in by) == group
                    and _number(r.get(key))]

        va, vb = values(a), values(b)
        if len(va) >= 2 and len(vb) >= 2:
            diff, ci = difference_ci(va, vb)
            out.append({**dict(zip(by, group)), "a": a, "b": b, "key": key, "diff": diff, "ci": ci,
                        "significant": bool(abs(diff) > ci) if math.isfinite(ci) else diff != 0})
    return out


def fmt_ci(row: dict, key: str, digits: int = 2) -> str:
    """``"mean ± ci"`` of a :func:`summarise` row (``"mean"`` alone without an interval, ``"–"`` if absent)."""
    if key not in row:
        return "–"
    mean, ci = row[key], row.get(f"{key}_ci", math.nan)
    return f"{mean:.{digits}f} ± {ci:.{digits}f}" if math.isfinite(ci) else f"{mean:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """A fixed colour per method (matplotlib's cycle, in order)."""
    return {m: f"C{i}" for i, m in enumerate(dict.fromkeys(methods))}


def plot_tradeoff(ax, summary: Sequence[dict], *, x: str, y: str, colors: dict[str, str], reference: dict | None = None,
                  label_beta: bool = True, symlog: bool = True, nonnegative: bool = True) -> None:
    """``y`` against ``x`` per method through its β values (mean over seeds, 95 % intervals as error bars, each point
    labelled with its β) from :func:`summarise` rows grouped by (method, beta); ``reference`` (a row with ``x`` and
    ``y``) as a black star and a dashed line; ``symlog``: the x axis linear below 0.1, logarithmic above;
    ``nonnegative``: the intervals drawn are cut at 0 (KL and rewards are never negative; the tables keep the
    symmetric t-intervals)."""
    for method, color in colors.items():
        line = sorted((r for r in summary if r["method"] == method and y in r and x in r), key=lambda r: -r["beta"])
        if not line:
            continue
        xs, ys = [r[x] for r in line], [r[y] for r in line]
        xerr = [_finite(r.get(f"{x}_ci")) for r in line]
        yerr = [_finite(r.get(f"{y}_ci")) for r in line]
        if nonnegative:  # [max(0, mean − h), mean + h]: the quantities plotted are never negative
            xerr = [[min(h, v) for h, v in zip(xerr, xs)], xerr]
            yerr = [[min(h, v) for h, v in zip(yerr, ys)], yerr]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, color=color, capsize=2, lw=1.2, label=method)
        if label_beta:
            for r in line:
                ax.annotate(f"{r['beta']:g}", (r[x], r[y]), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=color)
    if reference is not None and x in reference and y in reference:
        ax.plot([reference[x]], [reference[y]], marker="*", ms=11, color="black", ls="none", label="reference", zorder=3,
                clip_on=False)
        ax.axhline(reference[y], color="grey", ls="--", lw=0.8)
    if symlog:
        ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)  # linear near the reference's 0, logarithmic beyond
        ax.set_xlim(left=-0.05)  # KL ≥ 0: the lower end of a wide interval is cut
    ax.grid(alpha=0.3)


def plot_steps(ax, summary: Sequence[dict], key: str, *, colors: dict[str, str], beta: float, log: bool = False,
               nonnegative: bool = True) -> None:
    """``key`` against the training step per method at ``beta``: the mean over seeds and its 95 % interval as a
    band, from :func:`summarise` rows grouped by (method, beta, step). ``log``: a log y axis, cut a third below the
    smallest mean (the lower end of a wide interval is then off the axis); ``nonnegative``: the band is cut at 0."""
    means: list[float] = []
    for method, color in colors.items():
        points = sorted((r for r in summary if r["method"] == method and r["beta"] == beta and key in r),
                        key=lambda r: r["step"])
        if not points:
            continue
        steps = [r["step"] for r in points]
        mean = [r[key] for r in points]
        half = [_finite(r.get(f"{key}_ci")) for r in points]
        ax.plot(steps, mean, color=color, lw=1.4, marker="o" if len(points) < 12 else None, ms=3, label=method)
        low = [m - h for m, h in zip(mean, half)]
        if nonnegative:
            low = [max(v, 0.0) for v in low]
        if log:  # an interval reaching 0 runs off the bottom of the log axis
            low = [max(v, 1e-3 * m) for v, m in zip(low, mean)]
        ax.fill_between(steps, low, [m + h for m, h in zip(mean, half)], color=color, alpha=0.15, lw=0)
        means += mean
    if log and means:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(m for m in means if m > 0) / 3)
    ax.grid(alpha=0.3)


def _finite(value) -> float:
    return value if _number(value) else 0.0
