"""Tuned baselines at matched KL: ShiQ against DPO, CoPG, DRO and IPO on the embedded counting task
(``shiq_llm.tasks.synthetic``), each method's learning rate chosen on a validation split, the reward compared at common
KL budgets on each method's β frontier.

``shiq-llm experiment compare --out DIR [--quick]``. The task's reference and offline rows are built once in
``DIR/data`` (or reused with ``--data``). Its held-out prompts (never in the training rows) are split in two
(:func:`split_prompts`, alternately): a **validation** split and a **test** split, checked disjoint from each other
and, by the sweep, from the training rows. Then:

1. *Selection* (``DIR/selection``, one sweep): every method × β × learning rate of ``learning_rates``, seed
   ``seed``, evaluated on the validation prompts only. For each (method, β) the learning rate with the largest
   validation objective ``J = reward − β · KL`` (the KL-regularised objective every method targets, spec §1) is
   selected (:func:`select_learning_rates`; it reads validation rows only).
2. *Test* (``DIR/test``, one sweep per β): the selected configuration of each (method, β) trained with ``seeds``
   seeds and evaluated on the test prompts; the reference is evaluated there with the same sampling seeds.
3. *Frontier* (:func:`frontier_rows`): per method, the test (KL, reward) means over seeds of its β values, sorted
   by KL and joined by straight lines, give its frontier; its reward is read at common KL budgets (inside every
   method's KL range unless given), with 95 % percentile bootstrap intervals over seeds (seeds resampled
   with replacement, the same draw for every method and β: the runs of one seed share data and evaluation seed).
   ShiQ's difference from each method at each budget is tested on each seed's own frontier (paired t-test over
   seeds, TOST equivalence within ``±margin``), Holm-adjusted over the table (``shiq_llm.experiments.report``).

Writes, in ``args.out``: ``compare.csv`` (long: ``method, beta, learning_rate, seed, step, split, mean_reward,
kl, selected, objective, …``, one row per run and evaluation: ``split`` is ``validation`` or ``test``, ``selected``
true for the configuration chosen on validation; the reference as ``method = reference``), ``frontier.csv``
(``method, kl_budget, reward, reward_lo, reward_hi, n_boot``), ``compare.png`` and ``compare_table.md``, and
``compare_summary.json`` (the arguments, the choices, the run times).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from shiq_toy.checks import check_at_least_one
from shiq_toy.options import option

__all__ = ["CompareArgs", "METHODS", "QUICK", "check_args", "split_prompts", "select_learning_rates", "interpolate_frontier",
           "kl_budgets", "frontier_rows", "seed_frontier_rows", "budget_comparisons", "collect", "FIRST", "tables_of", "plot",
           "write_frontier", "main"]

METHODS = ("shiq", "dpo", "copg", "dro", "ipo")


@dataclass
class CompareArgs:
    """Arguments of the matched-KL comparison (``shiq-llm experiment compare``); the defaults are the docs' run."""

    out: Path = option(Path("results/compare"), "directory for compare.csv, frontier.csv, compare.png, compare_table.md, data/, selection/, test/", aliases=("output_dir",), path="out_dir")
    methods: tuple[str, ...] = option(METHODS, "methods (any shiq-llm train --loss_type)")
    betas: tuple[float, ...] = option((0.03, 0.1, 0.3, 1.0), "KL regularisation β of every method (the points of each method's frontier)")
    learning_rates: tuple[float, ...] = option((3e-5, 1e-4, 3e-4, 1e-3, 3e-3), "AdamW learning rates of the grid each (method, β) selects from on the validation split")
    seeds: int = option(5, "test seeds of each selected configuration: seed, seed+1, …")
    seed: int = option(0, "first seed; also the seed of the selection runs, of the reference and its data")
    steps: int = option(100, "optimizer steps per run")
    batch_size: int = option(32, "sequences per step (pair methods: batch_size // 2 pairs)")
    eval_samples: int = option(16, "completions sampled per validation or test prompt at each evaluation")
    max_new_tokens: int = option(12, "generation budget")
    ref_steps: int = option(600, "supervised steps of the reference")
    completions_per_prompt: int = option(16, "completions sampled from the reference per training prompt")
    data: str = option("", "an existing shiq-llm make-data directory to use instead of building OUT/data", aliases=("dataset_name",), path="in_dir")
    budgets: int = option(4, "number of common KL budgets, evenly spaced inside the KL range every method's frontier covers")
    margin: float = option(0.02, "equivalence margin of the reward (fraction of correct words) at a KL budget")
    bootstrap: int = option(2000, "bootstrap resamples of the seeds for the frontier's intervals")
    threads: int = option(1, "torch CPU threads (1 is fastest for the tiny model)")
    progress: bool = option(True, "show a progress bar over the sweeps' cells")
    tables_from: str = option("", "an existing compare.csv: re-derive the figure, frontier.csv and the table from it into OUT, without training")


#: ``--quick``: every method, 2 β, 2 learning rates, 2 seeds, 8 short steps on a smaller data set: a check that the
#: whole protocol runs, in about 3 minutes of one CPU core; far too little training to rank the methods.
QUICK = CompareArgs(betas=(0.1, 1.0), learning_rates=(1e-3, 3e-3), seeds=2, steps=8, batch_size=8, eval_samples=2,
                    ref_steps=200, completions_per_prompt=2, bootstrap=200)


def split_prompts(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """The held-out prompts split in two, alternately (even positions: validation, odd: test), so that both
    splits cover every family and range of numbers; ValueError with fewer than 2 prompts."""
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 held-out prompts to split into validation and test, got {len(prompts)}")
    return list(prompts[0::2]), list(prompts[1::2])


def variant_name(method: str, lr: float) -> str:
    """The sweep name of a method at a learning rate: ``<method>_lr<lr>``."""
    return f"{method}_lr{lr:g}"


def select_learning_rates(rows: Sequence[dict]) -> dict[tuple[str, float], float]:
    """The learning rate of each (method, β) with the largest mean ``objective`` over the final evaluations of
    ``rows`` — which must all be of the ``validation`` split (ValueError otherwise: selection never sees the test
    split). Ties go to the smaller learning rate."""
    bad = {r.get("split") for r in rows} - {"validation"}
    if bad:
        raise ValueError(f"learning rates are selected on validation rows only, got split(s) {sorted(map(str, bad))}")
    groups: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        if r["method"] != "reference" and _number(r.get("objective")):
            groups.setdefault((r["method"], float(r["beta"])), {}).setdefault(float(r["learning_rate"]), []).append(
                r["objective"])
    return {key: max(sorted(by_lr), key=lambda lr: float(np.mean(by_lr[lr]))) for key, by_lr in groups.items()}


def interpolate_frontier(kls: Sequence[float], rewards: Sequence[float], budget: float) -> float:
    """The reward of a frontier at KL ``budget``: the points (KL, reward), sorted by KL, joined by straight lines;
    NaN outside ``[min KL, max KL]`` (no extrapolation)."""
    order = np.argsort(kls)
    x, y = np.asarray(kls, dtype=float)[order], np.asarray(rewards, dtype=float)[order]
    if x.size == 0 or not x[0] <= budget <= x[-1]:
        return math.nan
    return float(np.interp(budget, x, y))


def kl_budgets(means: dict[str, list[tuple[float, float]]], count: int, *, anchor: str = "shiq") -> list[float]:
    """``count`` KL budgets evenly spaced (at the centres of ``count`` equal cells) in the range every method's
    frontier covers, ``[max_m min KL_m, min_m max KL_m]``; when those ranges do not overlap, in the range of
    ``anchor``'s frontier (the methods that do not reach a budget then have no reward there); an empty list when
    that is a single point too. ``means``: method -> [(KL, reward) per β]."""
    low = max(min(k for k, _ in points) for points in means.values())
    high = min(max(k for k, _ in points) for points in means.values())
    if not high > low and anchor in means:
        low, high = min(k for k, _ in means[anchor]), max(k for k, _ in means[anchor])
    if not high > low:
        return []
    return [float(low + (high - low) * (i + 0.5) / count) for i in range(count)]


def _cells(rows: Sequence[dict]) -> dict[tuple[str, float], dict[int, tuple[float, float]]]:
    """(method, β) -> seed -> (KL, reward) of the final test evaluations."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] != "reference" and r.get("split") == "test" and _number(r.get("mean_reward")):
            cells.setdefault((r["method"], float(r["beta"])), {})[int(r["seed"])] = (r["kl"], r["mean_reward"])
    return cells


def _frontier_means(cells, seeds) -> dict[str, list[tuple[float, float]]]:
    means: dict[str, list] = {}
    for (method, _), by_seed in cells.items():
        pts = [by_seed[s] for s in seeds if s in by_seed]
        if pts:
            means.setdefault(method, []).append((float(np.mean([p[0] for p in pts])), float(np.mean([p[1] for p in pts]))))
    return means


def _bootstrap(rows: Sequence[dict], budgets: Sequence[float], n_boot: int, seed: int):
    """Point values and bootstrap draws of each method's frontier reward at each budget: ``(methods, point
    [m, b], draws [n_boot, m, b])``; a draw resamples the seed set with replacement, the same for every cell."""
    cells = _cells(rows)
    seeds = sorted({s for by_seed in cells.values() for s in by_seed})
    means = _frontier_means(cells, seeds)
    methods = list(means)

    def values(seed_draw):
        m = _frontier_means(cells, seed_draw)
        return np.array([[interpolate_frontier([k for k, _ in m[me]], [r for _, r in m[me]], b) for b in budgets]
                         for me in methods])

    point = values(seeds)
    rng = np.random.default_rng(seed)
    draws = np.stack([values(list(rng.choice(seeds, size=len(seeds), replace=True))) for _ in range(n_boot)]) \
        if n_boot else np.empty((0, len(methods), len(budgets)))
    return methods, point, draws


def frontier_rows(rows: Sequence[dict], budgets: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> list[dict]:
    """Each method's reward at each KL budget on its test frontier (:func:`interpolate_frontier` on the means over
    seeds), with the ``level`` percentile bootstrap interval over seeds (draws where the resampled frontier does not
    reach the budget are left out; ``n_boot`` is the number kept): rows ``{method, kl_budget, reward, reward_lo,
    reward_hi, n_boot}``."""
    methods, point, draws = _bootstrap(rows, budgets, n_boot, seed)
    out = []
    for i, method in enumerate(methods):
        for j, budget in enumerate(budgets):
            kept = draws[:, i, j][np.isfinite(draws[:, i, j])]
            lo, hi = (np.quantile(kept, [(1 - level) / 2, (1 + level) / 2]) if kept.size else (math.nan, math.nan))
            out.append({"method": method, "kl_budget": budget, "reward": float(point[i, j]), "reward_lo": float(lo),
                        "reward_hi": float(hi), "n_boot": int(kept.size)})
    return out


def seed_frontier_rows(rows: Sequence[dict], budgets: Sequence[float]) -> list[dict]:
    """Each seed's own frontier (its (KL, reward) per β of a method) read at each budget: rows ``{method,
    kl_budget, seed, reward}``, left out where that seed's frontier does not reach the budget."""
    out = []
    for method in dict.fromkeys(m for m, _ in _cells(rows)):
        by_seed: dict[int, list] = {}
        for (m, _), cell in _cells(rows).items():
            if m == method:
                for s, point in cell.items():
                    by_seed.setdefault(s, []).append(point)
        for s, points in sorted(by_seed.items()):
            for budget in budgets:
                value = interpolate_frontier([k for k, _ in points], [r for _, r in points], budget)
                if _number(value):
                    out.append({"method": method, "kl_budget": budget, "seed": s, "reward": value})
    return out


def budget_comparisons(rows: Sequence[dict], budgets: Sequence[float], *, reference_method: str = "shiq",
                       margin: float) -> list[dict]:
    """``shiq − other`` of the reward at each KL budget: a paired t-test over the seeds whose frontiers both reach
    the budget (:func:`seed_frontier_rows`; the runs of one seed share data and evaluation seed), with its TOST
    equivalence p-value within ``±margin`` (``shiq_llm.experiments.report.compare``); for ``report.verdicts``."""
    from shiq_llm.experiments.report import compare

    per_seed = seed_frontier_rows(rows, budgets)
    out = []
    for other in dict.fromkeys(r["method"] for r in per_seed):
        if other != reference_method:
            for budget in budgets:
                pairs = [r for r in per_seed if r["kl_budget"] == budget]
                seeds = ({r["seed"] for r in pairs if r["method"] == reference_method}
                         & {r["seed"] for r in pairs if r["method"] == other})
                out += compare([r for r in pairs if r["seed"] in seeds], "reward", reference_method, other,
                               by=("kl_budget",), margin=margin)
    return sorted(out, key=lambda c: (c["kl_budget"], c["b"]))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_args(args: CompareArgs) -> None:
    from shiq_llm.train.config import LLM_METHODS

    if not args.methods or not set(args.methods) <= set(LLM_METHODS):
        raise ValueError(f"methods must be a non-empty subset of {list(LLM_METHODS)}, got {list(args.methods)}")
    for name in ("betas", "learning_rates"):
        values = getattr(args, name)
        if not values or not all(v > 0 and math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be finite numbers > 0, got {list(values)}")
    check_at_least_one(args, ("seeds", "steps", "batch_size", "eval_samples", "max_new_tokens", "ref_steps",
                              "completions_per_prompt", "budgets", "threads"))
    if args.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (pair methods train on batch_size // 2 pairs), got {args.batch_size}")
    if args.seeds < 2:
        raise ValueError(f"seeds must be >= 2 (intervals over seeds), got {args.seeds}")
    if args.bootstrap < 0 or not args.margin > 0:
        raise ValueError(f"bootstrap must be >= 0 and margin > 0, got {args.bootstrap} and {args.margin}")


def _long_rows(results: Sequence[dict], split: str, chosen: dict, lr_of: dict) -> list[dict]:
    rows = []
    for r in results:
        if r["algo"] == "reference":
            continue
        method, beta, lr = r["algo"], float(r["beta"]), lr_of[r["method"]]
        rows.append({"method": method, "beta": beta, "learning_rate": lr, "seed": r["seed"], "step": r["steps"],
                     "split": split, "mean_reward": r["mean_reward"], "kl": r["kl"],
                     "selected": chosen.get((method, beta)) == lr, "objective": r["mean_reward"] - beta * r["kl"],
                     "reward_sem": r.get("reward_sem"), "kl_sem": r.get("kl_sem"), "kl_mc": r.get("kl_mc"),
                     "mean_length": r.get("mean_length"), "train_seconds": r.get("train_seconds"),
                     "eval_seconds": r.get("eval_seconds")})
    return rows


def _reference_rows(data: Path, prompts: list[str], split: str, seeds: Sequence[int], args: CompareArgs) -> list[dict]:
    """The reference evaluated on ``prompts`` with each sampling seed of the runs (1000 + seed, as the sweep's)."""
    import torch

    from shiq_llm.core.models import load_causal_lm, load_tokenizer
    from shiq_llm.generation.evaluate import evaluate_policy
    from shiq_llm.generation.rewards import load_reward

    tokenizer = load_tokenizer(str(data / "reference"))
    ref = load_causal_lm(str(data / "reference"), device="cpu", dtype=torch.float32)
    reward = load_reward("synthetic")
    rows = []
    for s in seeds:
        result = evaluate_policy(ref, ref, tokenizer, prompts, reward_fn=reward, num_samples=args.eval_samples,
                                 max_new_tokens=args.max_new_tokens, seed=1000 + args.seed + s)
        rows.append({"method": "reference", "beta": math.nan, "learning_rate": math.nan, "seed": s, "step": 0,
                     "split": split, "mean_reward": result["mean_reward"], "kl": 0.0, "selected": True,
                     "objective": result["mean_reward"], "reward_sem": result["reward_sem"]})
    return rows


def collect(args: CompareArgs, out: Path):
    """Selection on the validation split, then the test runs of the chosen configurations (module docstring)."""
    from shiq_llm.data.prompts import check_held_out
    from shiq_llm.experiments.demo import prepare_single_turn_data
    from shiq_llm.experiments.driver import Collected
    from shiq_llm.experiments.multiturn import train_options
    from shiq_llm.experiments.sweep import SweepConfig, SweepError, run_sweep
    from shiq_llm.storage.jsonl import write_jsonl

    seconds: dict[str, float] = {}
    data = prepare_single_turn_data(out / "data", args.data, ref_steps=args.ref_steps,
                                    completions_per_prompt=args.completions_per_prompt,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress)
    held_out = [json.loads(line)["prompt"] for line in (data / "eval_prompts.jsonl").read_text().splitlines()
                if line.strip()]
    validation, test = split_prompts(held_out)
    check_held_out(test, validation, where="test", advice="the validation and test splits must be disjoint")
    write_jsonl(({"prompt": p} for p in validation), out / "validation_prompts.jsonl")
    write_jsonl(({"prompt": p} for p in test), out / "test_prompts.jsonl")

    def config(name: str, prompts: str, variants: dict, betas, seeds) -> SweepConfig:
        return SweepConfig(
            out=str(out / name), model=str(data / "reference"), train_data=str(data / "train.jsonl"), algos=[],
            variants=variants, betas=list(betas), seeds=list(seeds), eval_prompts=str(out / prompts),
            reward="synthetic",
            train=train_options(lr=args.learning_rates[0], steps=args.steps, batch_size=args.batch_size,
                                log_every=max(1, args.steps // 10)),
            evaluation={"num_samples": args.eval_samples, "max_new_tokens": args.max_new_tokens,
                        "seed": 1000 + args.seed})

    failures = []

    def sweep(cfg: SweepConfig) -> list[dict]:
        try:
            return run_sweep(cfg, progress=args.progress, log=lambda _: None)
        except SweepError as error:  # the finished cells are still reported; the failure is raised at the end
            failures.append(error)
            return error.results

    lr_of = {variant_name(m, lr): lr for m in args.methods for lr in args.learning_rates}
    tick = time.perf_counter()
    grid = {variant_name(m, lr): {"algo": m, "train": {"learning_rate": lr}}
            for m in args.methods for lr in args.learning_rates}
    selection = sweep(config("selection", "validation_prompts.jsonl", grid, args.betas, [args.seed]))
    validation_rows = _long_rows(selection, "validation", {}, lr_of)
    chosen = select_learning_rates(validation_rows)  # validation rows only: it refuses any other split
    for r in validation_rows:
        r["selected"] = chosen.get((r["method"], r["beta"])) == r["learning_rate"]
    seconds["selection"] = time.perf_counter() - tick
    tick = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    test_rows = []
    for beta in args.betas:
        picked = {variant_name(m, lr): {"algo": m, "train": {"learning_rate": lr}}
                  for (m, b), lr in chosen.items() if b == beta}
        if picked:
            test_rows += _long_rows(sweep(config("test", "test_prompts.jsonl", picked, [beta], seeds)), "test",
                                    chosen, lr_of)
    seconds["test"] = time.perf_counter() - tick
    reference_rows = (_reference_rows(data, validation, "validation", [args.seed], args)
                      + _reference_rows(data, test, "test", seeds, args))
    rows = reference_rows + validation_rows + test_rows
    extra = {"chosen": [{"method": m, "beta": b, "learning_rate": lr} for (m, b), lr in chosen.items()],
             "cell_seconds": sum((r.get("train_seconds") or 0) + (r.get("eval_seconds") or 0) for r in rows)}
    return Collected(rows, {}, seconds, extra, failures[0] if failures else None)


#: The leading columns of compare.csv (pinned).
FIRST = ("method", "beta", "learning_rate", "seed", "step", "split", "mean_reward", "kl", "selected")


def main(args: CompareArgs) -> dict:
    """Run the comparison (module docstring) with the experiments' driver (``shiq_llm.experiments.driver``);
    returns the summary also written to ``compare_summary.json``."""
    from shiq_llm.experiments.driver import Experiment, run

    return run(Experiment("compare", FIRST, check_args, collect, tables_of, plot, write_frontier), args)


def write_frontier(tables: dict, out: Path) -> None:
    """``OUT/frontier.csv`` from the tables' frontier rows."""
    from shiq_llm.experiments.driver import write_rows

    write_rows(tables["frontier"], out / "frontier.csv",
               first=("method", "kl_budget", "reward", "reward_lo", "reward_hi", "n_boot"))


def tables_of(rows: Sequence[dict], references: dict, args: CompareArgs) -> dict:
    """The selection, the test results per (method, β), the frontier at the KL budgets and ShiQ's differences there
    (Holm-adjusted), as data and markdown."""
    from shiq_llm.experiments.report import PM_MEANING, comparison_table, fmt_ci, markdown_table, summarise, verdicts

    validation = [r for r in rows if r.get("split") == "validation" and r["method"] != "reference"]
    test = [r for r in rows if r.get("split") == "test"]
    order = {m: i for i, m in enumerate(args.methods)}
    sel_body = []
    for (method, beta) in sorted({(r["method"], r["beta"]) for r in validation}, key=lambda k: (order.get(k[0], 99), k[1])):
        cells = sorted((r for r in validation if r["method"] == method and r["beta"] == beta),
                       key=lambda r: r["learning_rate"])
        sel_body.append([method, f"{beta:g}", *(f"{'**' if r['selected'] else ''}{r['objective']:.3f} "
                                               f"({r['mean_reward']:.3f}, {r['kl']:.2f}){'**' if r['selected'] else ''}"
                                               for r in cells)])
    lrs = sorted({r["learning_rate"] for r in validation})
    summary = summarise(test, ("method", "beta"), ["mean_reward", "kl"])
    summary.sort(key=lambda r: (-1 if r["method"] == "reference" else order.get(r["method"], 99),
                                r["beta"] if _number(r["beta"]) else 0))
    test_body = [[r["method"], "–" if not _number(r["beta"]) else f"{r['beta']:g}",
                  "–" if r["method"] == "reference" else f"{_lr_of(test, r):g}", fmt_ci(r, "mean_reward", 3),
                  fmt_ci(r, "kl", 3), r.get("mean_reward_n", 0)] for r in summary]
    cells = _cells(test)
    seeds = sorted({s for c in cells.values() for s in c})
    means = _frontier_means(cells, seeds)
    budgets = kl_budgets(means, args.budgets) if means else []
    frontier = frontier_rows(test, budgets, n_boot=args.bootstrap, seed=args.seed) if budgets else []
    comparisons = verdicts(budget_comparisons(test, budgets, margin=args.margin)) if budgets else []
    fr_body = [[f"{b:.3f}", *(next((f"{f['reward']:.3f} [{f['reward_lo']:.3f}, {f['reward_hi']:.3f}]"
                                    for f in frontier if f["method"] == m and f["kl_budget"] == b
                                    and _number(f["reward"])), "– (outside its frontier)")
                              for m in means)] for b in budgets]
    markdown = (
        f"Matched-KL comparison on the counting task: {args.steps} steps, batch {args.batch_size}; learning rate "
        f"chosen per (method, β) from {[float(f'{lr:g}') for lr in lrs] or list(args.learning_rates)} on the validation split (seed "
        f"{args.seed}, criterion J = reward − β·KL); the chosen configuration trained with {len(seeds)} seeds and "
        f"evaluated on the test split ({args.eval_samples} samples per prompt). KL = exact KL(π‖π_ref) per "
        "completion, in nats.\n\n"
        "Selection (validation, one seed): J (reward, KL) per learning rate; the chosen one in bold.\n\n"
        + markdown_table(["method", "β", *(f"lr {lr:g}" for lr in lrs)], sel_body)
        + f"\n\nTest split: mean over seeds; {PM_MEANING} (the reference: over its evaluation sampling seeds).\n\n"
        + markdown_table(["method", "β", "learning rate", "reward", "KL (nats)", "seeds"], test_body))
    if budgets:
        markdown += ("\n\nReward at common KL budgets, read on each method's test frontier (its β points sorted by "
                     "KL, joined by straight lines); [lo, hi] = 95 % percentile bootstrap interval over seeds "
                     f"({args.bootstrap} resamples of the seed set, the same draw for every method).\n\n"
                     + markdown_table(["KL budget (nats)", *means], fr_body))
        if comparisons:
            markdown += ("\n\nShiQ's differences at the budgets, on each seed's own frontier (the seeds whose "
                         "frontiers of both methods reach the budget), equivalence margin "
                         f"±{args.margin:g} reward. " + comparison_table(comparisons, ["kl_budget"], digits=3))
    else:
        markdown += "\n\nNo KL budget: the frontiers are single points."
    return {"frontier": frontier, "comparisons": comparisons, "budgets": budgets, "markdown": markdown}


def _lr_of(rows, summary_row) -> float:
    return next(r["learning_rate"] for r in rows if r["method"] == summary_row["method"]
                and r["beta"] == summary_row["beta"])


def plot(rows: Sequence[dict], references: dict, args: CompareArgs, path: Path, *,
         frontier: Sequence[dict] | None = None) -> None:
    """Test reward against KL per method through its β values (mean over seeds, 95 % t-intervals over seeds as
    bars), each method's frontier reward at the common KL budgets (95 % bootstrap intervals) and the budgets as
    dotted lines; KL in nats on a log axis."""
    from matplotlib.figure import Figure

    from shiq_llm.experiments.report import method_colors, summarise

    test = [r for r in rows if r.get("split") == "test"]
    if frontier is None:
        frontier = tables_of(rows, references, args)["frontier"]
    summary = summarise([r for r in test if r["method"] != "reference"], ("method", "beta"), ["mean_reward", "kl"])
    colors = method_colors(args.methods)
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    for method, color in colors.items():
        line = sorted((r for r in summary if r["method"] == method), key=lambda r: r["kl"])
        if not line:
            continue
        ax.errorbar([r["kl"] for r in line], [r["mean_reward"] for r in line],
                    xerr=[_finite(r.get("kl_ci")) for r in line], yerr=[_finite(r.get("mean_reward_ci")) for r in line],
                    marker="o", ms=4, color=color, capsize=2, lw=1.2, label=f"{method} (β points)")
        for r in line:
            ax.annotate(f"{r['beta']:g}", (r["kl"], r["mean_reward"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=6, color=color)
        pts = [f for f in frontier if f["method"] == method and _number(f["reward"])]
        if pts:
            ax.errorbar([f["kl_budget"] for f in pts], [f["reward"] for f in pts],
                        yerr=[[f["reward"] - f["reward_lo"] for f in pts], [f["reward_hi"] - f["reward"] for f in pts]],
                        marker="D", ms=5, mfc="white", color=color, ls="none", capsize=3, lw=1.6)
    for budget in dict.fromkeys(f["kl_budget"] for f in frontier):
        ax.axvline(budget, color="grey", ls=":", lw=0.9)
    ref = [r["mean_reward"] for r in test if r["method"] == "reference"]
    if ref:
        ax.axhline(float(np.mean(ref)), color="black", ls="--", lw=0.8, label="reference (KL = 0)")
    if any(r["kl"] > 0 for r in summary):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))  # 0.01, 0.03, 0.1, 0.3, 1, …
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.plot([], [], marker="D", mfc="white", color="grey", ls="none",
            label="frontier at a KL budget (dotted), 95 % bootstrap CI")
    ax.set(xlabel="KL(π‖π_ref) per completion (nats, log scale)", ylabel="test reward (fraction of correct words)",
           title=f"Reward vs KL on the test split: mean over {args.seeds} seeds, bars = 95 % t-interval over seeds;\n"
                 f"learning rate tuned per (method, β) on validation; numbers are β")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=120)


def _finite(value) -> float:
    return value if _number(value) else 0.0
