"""Tables and figures of the LLM experiments, from a sweep's long rows (``shiq_llm.experiments.sweep.curve_rows``).

Every number is a mean over seeds with the half-width of its 95 % Student-t interval
(:func:`shiq_toy.experiments.mean_ci`); :func:`summarise` computes them per group (method, β, step, …),
:func:`plot_tradeoff` draws a measured value against KL(π‖π_ref) per method across β, :func:`plot_steps` a value
against training steps with its interval as a band, and :func:`markdown_table` / :func:`fmt_ci` write the tables
the README quotes.

**One meaning of "±".** Everywhere in the tables, ``a ± h`` is the mean over seeds and ``h`` the half-width of its
95 % Student-t interval over those seeds (:data:`PM_MEANING`, written in every caption); a reference evaluated once
is the one exception, and its caption says which interval it carries (over samples).

**Comparisons** (:func:`compare`, :func:`verdicts`): runs of two methods that share seed and data are compared
with a paired t-test on the seed-matched differences (:func:`paired_test`), others with Welch's test
(:func:`welch_test`); the p-values of all comparisons of one table are adjusted together with Holm's step-down
correction (:func:`holm`). A difference is a finding only when its Holm-adjusted p-value is below 0.05; "no
difference" is written only when a two one-sided tests equivalence test (:func:`tost`, TOST) with a stated margin
rejects a difference as large as the margin (Holm-adjusted too); anything else is "inconclusive" — a
non-significant difference is never read as equality.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from shiq_toy.experiments import difference_ci, mean_ci

__all__ = ["PM_MEANING", "holm", "paired_test", "welch_test", "tost", "verdicts", "comparison_table", "reference_cell", "steps_to_threshold",
           "summarise", "final_rows", "compare", "fmt_ci", "markdown_table", "method_colors", "plot_tradeoff",
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


#: What "±" means in every table of the LLM experiments (each caption states it).
PM_MEANING = "± is the half-width of the 95 % Student-t interval of the mean over seeds"

ALPHA = 0.05  #: the family-wise error rate of every table (Holm)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: with the m finite p-values sorted increasingly,
    ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``. Rejecting where ``p̃ < α`` controls the family-wise error
    rate at α (Holm 1979). NaN p-values stay NaN and do not count in m."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if _number(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_test(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict:
    """Paired t-test of ``a − b`` on matched pairs (the same seed and data): ``{diff, ci, p, df, paired: True}``
    with ``diff`` the mean of the differences, ``ci`` the half-width of its Student-t interval at ``level`` and
    ``p`` the two-sided p-value (``scipy.stats.ttest_rel``). Needs ≥ 2 pairs. When every difference is the same
    (e.g. two methods that cannot differ on this data) the interval is that point (``ci`` 0) and ``p`` is 1 for a
    difference of 0, else 0 — the limits of the test as the spread goes to 0."""
    from scipy.stats import t

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        raise ValueError(f"paired_test needs at least 2 pairs, got {d.size}")
    sd = d.std(ddof=1)
    if sd == 0:
        return {"diff": float(d.mean()), "ci": 0.0, "p": float(d.mean() == 0), "df": d.size - 1, "paired": True}
    se = sd / math.sqrt(d.size)
    stat = d.mean() / se
    return {"diff": float(d.mean()), "ci": float(t.ppf((1 + level) / 2, d.size - 1) * se),
            "p": float(2 * t.sf(abs(stat), d.size - 1)), "df": d.size - 1, "paired": True}


def welch_test(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict:
    """Welch's unequal-variance t-test of ``mean(a) − mean(b)``: ``{diff, ci, p, df, paired: False}``, the interval
    of :func:`shiq_toy.experiments.difference_ci` and the two-sided p-value (``scipy.stats.ttest_ind(…,
    equal_var=False)``)."""
    from scipy.stats import t

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff, ci = difference_ci(x, y, level=level)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    if va + vb == 0:
        return {"diff": diff, "ci": math.nan, "p": float(diff == 0), "df": math.nan, "paired": False}
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    return {"diff": diff, "ci": ci, "p": float(2 * t.sf(abs(diff) / math.sqrt(va + vb), df)), "df": float(df),
            "paired": False}


def tost(diff: float, se: float, df: float, margin: float) -> float:
    """p-value of the two one-sided t-tests (TOST) of equivalence within ``±margin``: ``H0: |δ| ≥ margin`` against
    ``H1: |δ| < margin``, for an estimate ``diff`` with standard error ``se`` and ``df`` degrees of freedom:
    ``max(P(T ≥ (diff + margin)/se), P(T ≤ (diff − margin)/se))``, T Student with ``df``. Equivalence is shown
    at level α when it is below α (the 1 − 2α interval lies inside ``±margin``). With ``se`` = 0 (every paired
    difference the same) the limit: 0 when ``|diff| < margin``, else 1. NaN without a margin or a finite ``se``."""
    from scipy.stats import t

    if not (_number(margin) and margin > 0 and _number(se) and se >= 0 and _number(df)):
        return math.nan
    if se == 0:
        return float(abs(diff) >= margin)
    return float(max(t.sf((diff + margin) / se, df), t.cdf((diff - margin) / se, df)))


def compare(rows: Sequence[dict], key: str, a: str, b: str, *, by: Sequence[str] = ("beta",), paired: bool = True,
            margin: float | None = None) -> list[dict]:
    """``a − b`` of ``key`` over seeds, per group of ``by`` where both methods have ≥ 2 runs: ``{by…, a, b, key,
    diff, ci, p, paired, tost_p, margin}``. With ``paired`` and the same seeds in both groups (runs that share seed
    and data) the paired t-test on the seed-matched differences (:func:`paired_test`), else Welch's
    (:func:`welch_test`); ``ci`` is the 95 % half-width. ``tost_p``: the equivalence p-value within ``±margin``
    (:func:`tost`; NaN without a margin). The p-values are raw: :func:`verdicts` adjusts a table's together."""
    out = []
    for group in dict.fromkeys(tuple(r.get(k) for k in by) for r in rows):
        def values(method):
            return {r["seed"]: r[key] for r in rows if r["method"] == method and tuple(r.get(k) for k in by) == group
                    and _number(r.get(key))}

        va, vb = values(a), values(b)
        if len(va) < 2 or len(vb) < 2:
            continue
        if paired and set(va) == set(vb):
            seeds = sorted(va)
            test = paired_test([va[s] for s in seeds], [vb[s] for s in seeds])
        else:
            test = welch_test(list(va.values()), list(vb.values()))
        se = test["ci"] / _t_quantile(test["df"]) if _number(test["ci"]) else math.nan
        out.append({**dict(zip(by, group)), "a": a, "b": b, "key": key, **test, "n": min(len(va), len(vb)),
                    "margin": margin if margin is not None else math.nan,
                    "tost_p": tost(test["diff"], se, test["df"], margin) if margin is not None else math.nan})
    return out


def _t_quantile(df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df)) if _number(df) and df > 0 else math.nan


def verdicts(comparisons: list[dict], *, alpha: float = ALPHA) -> list[dict]:
    """Adjust the p-values of one table's comparisons together (:func:`holm`, separately for the difference tests
    and the equivalence tests) and give each a verdict: ``"a > b"`` / ``"a < b"`` when the Holm-adjusted
    difference p-value is below ``alpha``; ``"equivalent (±margin)"`` when the Holm-adjusted TOST p-value is;
    otherwise ``"inconclusive"``. Returns new dicts with ``p_holm``, ``tost_p_holm``, ``verdict``."""
    p_holm = holm([c["p"] for c in comparisons])
    tost_holm = holm([c.get("tost_p", math.nan) for c in comparisons])
    out = []
    for c, p, q in zip(comparisons, p_holm, tost_holm):
        if _number(p) and p < alpha:
            verdict = f"{c['a']} {'>' if c['diff'] > 0 else '<'} {c['b']}"
        elif _number(q) and q < alpha:
            verdict = f"equivalent (±{c['margin']:g})"
        else:
            verdict = "inconclusive"
        out.append({**c, "p_holm": p, "tost_p_holm": q, "verdict": verdict})
    return out


def comparison_table(comparisons: list[dict], by: Sequence[str], *, digits: int = 2, caption: str | None = None) -> str:
    """The markdown table of :func:`verdicts` rows: the ``by`` columns, the difference, its value, ``diff ± 95 %``,
    the test, raw and Holm-adjusted p-values, the equivalence margin and TOST p (Holm) and the verdict; with a
    caption line saying how it was computed (``caption`` replaces the t-test one; a comparison's ``test`` key, when
    present, its test column)."""
    body = []
    for c in comparisons:
        margin = f"±{c['margin']:g}" if _number(c.get("margin")) else "–"
        ci = f"{c['ci']:.{digits}f}" if _number(c["ci"]) else "nan"
        body.append([*(f"{c[k]:.3g}" if isinstance(c[k], float) else c[k] for k in by), f"{c['a']} − {c['b']}", c["key"],
                     f"{c['diff']:+.{digits}f} ± {ci}", c.get("test") or f"{'paired t' if c['paired'] else 'Welch'} (n={c['n']})",
                     _p(c["p"]), _p(c["p_holm"]), margin, _p(c.get("tost_p_holm", math.nan)), c["verdict"]])
    caption = caption or (f"{len(comparisons)} comparisons, one family: difference ± 95 % t-interval half-width (paired t on the "
               "seed-matched differences where both methods ran the same seeds on the same data, Welch otherwise); "
               f"p-values two-sided, Holm-adjusted over the {len(comparisons)} comparisons; a direction is claimed when "
               f"p(Holm) < {ALPHA}, equivalence when the TOST p(Holm) < {ALPHA} within the stated margin, "
               "otherwise inconclusive.")
    return caption + "\n\n" + markdown_table([*by, "difference", "value", "diff ± 95 %", "test", "p", "p (Holm)",
                                               "equivalence margin", "TOST p (Holm)", "verdict"], body)


def _p(p: float) -> str:
    if not _number(p):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def reference_cell(reference: dict, key: str, sem_key: str, digits: int = 2) -> str:
    """A reference evaluated once: ``"mean ± 1.96·sem"`` (the 95 % normal interval over its samples, ``sem_key``
    its standard error), or the mean alone without one. The caption must say that this ± is over samples."""
    mean, sem = reference[key], reference.get(sem_key)
    return f"{mean:.{digits}f} ± {1.96 * sem:.{digits}f}" if _number(sem) else f"{mean:.{digits}f}"


def steps_to_threshold(rows: Iterable[dict], *, by: Sequence[str], fraction: float = 0.8,
                       key: str = "mean_reward") -> list[dict]:
    """The training budget at which each run first reaches a fixed fraction of the best improvement: per group of
    ``by`` (e.g. task, β), ``threshold = ref + fraction · (best − ref)`` with ``ref`` the value at step 0 (the
    reference) and ``best`` the largest final mean over seeds of any method in the group; per (group, method, seed)
    the first evaluated step whose ``key`` is ≥ the threshold, or None when the run never reaches it (censored at
    its last step). Rows ``{by…, method, seed, threshold, step, last_step}``; needs curves evaluated during training
    (``eval_every``), and is only as fine as their evaluation interval."""
    rows = [r for r in rows if _number(r.get(key))]
    curves: dict[tuple, dict[int, float]] = {}
    for r in rows:
        curves.setdefault((*(r.get(k) for k in by), r["method"], r["seed"]), {})[r["step"]] = r[key]
    out = []
    for group in dict.fromkeys(k[:len(by)] for k in curves):
        members = {k: v for k, v in curves.items() if k[:len(by)] == group}
        finals: dict[str, list[float]] = {}
        for k, curve in members.items():
            finals.setdefault(k[len(by)], []).append(curve[max(curve)])
        best = max(float(np.mean(v)) for v in finals.values())
        ref = next(curve[0] for curve in members.values() if 0 in curve)
        threshold = ref + fraction * (best - ref)
        for k, curve in members.items():
            reached = [s for s in sorted(curve) if s > 0 and curve[s] >= threshold]
            out.append({**dict(zip(by, group)), "method": k[len(by)], "seed": k[len(by) + 1], "threshold": threshold,
                        "step": reached[0] if reached else None, "last_step": max(curve)})
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
