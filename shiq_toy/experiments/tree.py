"""The token-tree ablation of the ShiQ variants (spec §5), in exact form.

Random token trees (V tokens, depth H) with a sparse reward on the last token only; offline data from π_ref;
tabular logits initialised at ℓ_ref and trained full-batch with each variant of the loss (``shiq``,
``shiq_ms``, ``shiq_init``, ``shiq_tk``, ``shifted_q``). The metric is Σ_h E_{s ~ d_π*}[KL(π_t(·|s) ‖ π*(·|s))],
the KL to the exact solution summed over depths under π*'s state distribution, computed exactly
(:func:`shiq_toy.metrics.expected_kl`). Trees run as stacked copies.

The default data is the infinite-data limit of sampling from π_ref: every path once, weighted by its π_ref
probability (``--num-samples 0``); ``--num-samples N`` samples N paths per tree instead (the KL then stops
at the floor of what the sample identifies).

Writes, in ``args.out``:
- ``tree_ablation.csv``: columns ``method,step,kl,loss`` — after ``step`` updates, ``kl`` the metric above and
  ``loss`` the method's training loss on the whole dataset (weighted average over sequences of
  Σ_t residual²), both means over trees; step 0 is the initialisation ℓ = ℓ_ref;
- ``tree_ablation.png``: the two against steps, log scale, mean and 10–90% band over trees;
- ``tree_summary.json``: the set-up, the steps each method needs to bring the mean KL below 10% and 1% of
  its initial value (null: not within the budget), initial and final KLs, initial losses, runtime.

What it shows with the defaults (full-batch gradient descent, whose steps are proportional to the
residuals): the multi-step residuals (shiq, shiq_init) converge fastest; the one-step ones (shiq_ms,
shifted_q), which move a terminal reward back one level at a time, need several times (≈ H) more steps to
bring the KL to 10% of its initial value and end the default budget about an order of magnitude behind;
shiq_tk (the first state's equation only) lies in between. At ℓ = ℓ_ref the loss of a sequence with
return R is H·R² for shiq, R² for shiq_ms and shiq_tk, Σ_t (β vref(s_t) − R)² for shiq_init: shiq_init starts
with the largest loss although ℓ_ref is a sensible start. With Adam (``--optimizer adam --lr 0.05``) the
per-parameter normalisation hides most of the speed differences: a residual that has just become non-zero
gets a full-size step at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shiq_toy.checks import check_at_least_one
from shiq_toy.data import exhaustive_dataset, sample_dataset, stack_datasets
from shiq_toy.experiments import BAND_MEANING, num_threads, plot_band, write_csv, write_summary
from shiq_toy.losses import LOSSES
from shiq_toy.mdp import random_tree
from shiq_toy.metrics import expected_kl
from shiq_toy.options import option
from shiq_toy.solvers import solve_tree
from shiq_toy.tabular import TabularLogits, stack_levels
from shiq_toy.train import dataset_loss, train

__all__ = ["TreeArgs", "run", "main"]

CSV_HEADER = ["method", "step", "kl", "loss"]
VARIANTS = ("shiq", "shiq_ms", "shiq_init", "shiq_tk", "shifted_q")


@dataclass
class TreeArgs:
    """Arguments of the token-tree ablation (``shiq-toy tree``)."""

    out: Path = option(Path("figures"), 'directory for tree_ablation.png, tree_ablation.csv and tree_summary.json', aliases=("output_dir",), path="out_dir")
    vocab_size: int = option(3, 'V, tokens per node')
    horizon: int = option(4, 'H, tokens per sequence (the reward sits on the last one)')
    beta: float = option(0.5, 'KL regularisation β')
    ref_scale: float = option(1.0, 'reference logits ℓ_ref ~ ref_scale · N(0, 1)')
    reward_scale: float = option(1.0, 'terminal rewards ~ reward_scale · N(0, 1)')
    num_samples: int = option(0, 'paths sampled from π_ref per tree; 0 = every path once, weighted by its π_ref '
                              'probability')
    reward_noise: float = option(0.0, "standard deviation of Gaussian noise on each sampled sequence's reward (with "
                                 'num_samples > 0)')
    trees: int = option(6, 'random trees (seeds seed, seed+1, …), trained together as stacked copies')
    seed: int = option(0, 'first seed')
    steps: int = option(800, 'full-batch training steps')
    optimizer: str = option("sgd", 'sgd (full-batch gradient descent: a step is proportional to the residuals, so '
                            'propagation speed is visible) or adam (per-parameter normalised steps hide most of the '
                            'differences; use lr 0.05)')
    lr: float = option(1.5, 'learning rate', aliases=("learning_rate",))
    eval_every: int = option(10, 'steps between two exact evaluations')
    methods: tuple[str, ...] = option(VARIANTS, 'loss variants to train (any of shiq_toy.losses.LOSSES)')
    threads: int = option(1, 'torch intra-op threads (1 is fastest for these tiny tensors)')


def check_args(args: TreeArgs) -> None:
    check_at_least_one(args, ("vocab_size", "horizon", "trees", "steps", "eval_every", "threads"))
    if args.num_samples < 0 or args.reward_noise < 0:
        raise ValueError("num_samples and reward_noise must be >= 0")
    if args.reward_noise and not args.num_samples:
        raise ValueError("reward_noise needs sampled data (num_samples > 0)")
    unknown = [m for m in args.methods if m not in LOSSES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {tuple(LOSSES)}")


def run(args: TreeArgs) -> dict:
    """Train every method on the same trees and data; returns the evaluated steps (K,) and, per method,
    the KL and the full-data loss at those steps, (K, trees) each."""
    check_args(args)
    seeds = range(args.seed, args.seed + args.trees)
    trees = [
        random_tree(args.vocab_size, args.horizon, generator=torch.Generator().manual_seed(s), reward="terminal",
                    ref_scale=args.ref_scale, reward_scale=args.reward_scale)
        for s in seeds
    ]
    solutions = [solve_tree(t, beta=args.beta) for t in trees]
    if args.num_samples:
        data = stack_datasets([
            sample_dataset(t, args.num_samples, generator=torch.Generator().manual_seed(s), reward_noise=args.reward_noise)
            for s, t in zip(seeds, trees)
        ])
    else:
        data = stack_datasets([exhaustive_dataset(t, policy=[torch.softmax(x, -1) for x in t.ref_logits]) for t in trees])
    ref_levels = stack_levels([t.ref_logits for t in trees])  # (trees, V**h, V) per depth
    target = stack_levels([s.logits for s in solutions])
    ref = TabularLogits(ref_levels).requires_grad_(False)
    kl, loss, steps = {}, {}, None
    for method in args.methods:
        model = TabularLogits(ref_levels)

        def evaluate(tables: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            return {
                "kl": expected_kl(tables, target, under="target"),
                "loss": dataset_loss(model, ref, method, data, beta=args.beta),  # the model holds these tables
            }

        history = train(model, ref, method, beta=args.beta, steps=args.steps, data=data, optimizer=args.optimizer, lr=args.lr, evaluate=evaluate, eval_every=args.eval_every)
        kl[method], loss[method], steps = history.metrics["kl"], history.metrics["loss"], history.steps  # (K, trees)
    return {"steps": steps, "kl": kl, "loss": loss}


def _steps_to(steps: list[int], curve: np.ndarray, fraction: float) -> int | None:
    """First evaluated step where the curve is below ``fraction`` of its initial value (None: never)."""
    below = np.nonzero(curve <= fraction * curve[0])[0]
    return int(steps[below[0]]) if len(below) else None


def plot(results: dict, args: TreeArgs, path: Path) -> None:
    """KL under π*'s states (left) and training loss (right) against steps, mean and 10–90% band over trees."""
    from matplotlib.figure import Figure

    colors = {m: f"C{i}" for i, m in enumerate(LOSSES)}
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    steps = np.asarray(results["steps"])
    floor = 1e-16  # the log scale cannot show an exact 0
    for method in args.methods:
        for ax, values in ((left, results["kl"][method].numpy()), (right, results["loss"][method].numpy())):
            plot_band(ax, steps, np.clip(values, floor, None), color=colors[method], label=method)
    left.set(yscale="log", xlabel="training step", ylabel="Σ_h E_{s∼d_π*} KL(π_t(·|s) ‖ π*(·|s)) (nats)", title="distance to the exact solution")
    right.set(yscale="log", xlabel="training step", ylabel="loss: mean over sequences of Σ_t residual²", title="training loss (step 0: at ℓ = ℓ_ref)")
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=8)
    data = f"{args.num_samples} paths from π_ref" if args.num_samples else "every path, weighted by π_ref"
    fig.suptitle(
        f"token-tree ablation: V = {args.vocab_size}, H = {args.horizon}, terminal reward, β = {args.beta}, {data}, {args.trees} trees, {args.optimizer} lr {args.lr}\n"
        + BAND_MEANING.format(n=args.trees, what="random trees"),
        fontsize=10,
    )
    fig.savefig(path, dpi=120)


def main(args: TreeArgs) -> dict:
    """Run the ablation, write the CSV, the figure and the summary into ``args.out``; returns the summary."""
    start = time.perf_counter()
    with num_threads(args.threads):
        results = run(args)
        args.out.mkdir(parents=True, exist_ok=True)
        mean_kl = {method: results["kl"][method].mean(1) for method in args.methods}  # (steps,) over trees
        rows = []
        for method in args.methods:
            loss = results["loss"][method].mean(1)
            rows += [(method, step, float(k), float(l)) for step, k, l in zip(results["steps"], mean_kl[method], loss)]
        write_csv(args.out / "tree_ablation.csv", CSV_HEADER, rows)
        plot(results, args, args.out / "tree_ablation.png")
    summary = {
        "methods": {
            method: {
                "initial_kl": float(results["kl"][method][0].mean()),
                "final_kl": float(results["kl"][method][-1].mean()),
                "initial_loss": float(results["loss"][method][0].mean()),
                "steps_to_10%_of_initial_kl": _steps_to(results["steps"], mean_kl[method].numpy(), 1e-1),
                "steps_to_1%_of_initial_kl": _steps_to(results["steps"], mean_kl[method].numpy(), 1e-2),
            }
            for method in args.methods
        },
        "seconds": time.perf_counter() - start,
    }
    return write_summary(args.out / "tree_summary.json", args, summary)
