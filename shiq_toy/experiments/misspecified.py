"""Q3 — what happens when the reward is flawed? Over-optimisation of a proxy reward, exactly on token trees.

Random token trees (V tokens, depth H, a terminal true reward ``r(y) ~ N(0, 1)``). Every method is trained
on a *proxy* reward ``r̃(y) = r(y) + e(y)`` and judged on the true one. The errors (the ``error`` column):

- ``none``: ``e = 0`` (the true reward; the control);
- ``noiseσ`` for each σ of ``noise_scales``: ``e(y) = σ·ε(y)``, ``ε(y) ~ N(0, 1)`` drawn once per path — the
  fixed error of a learned reward model, not noise that averages out over queries;
- ``hack``: ``e(y) = hack_bias`` on ``hack_paths`` paths drawn among the truly worse half, 0 elsewhere — a
  systematic, exploitable bias (a "reward hack").

Data: every path once, weighted by its π_ref probability, labelled with the proxy (the infinite-data limit
of sampling from π_ref; DPO/CoPG pair every two paths, weighted by the product of their weights). Methods:
``shiq``, ``shiq_ms`` (one step: does the multi-step residual matter?), ``dpo``, ``copg``, ``dro``, each for
each β of ``betas``, tabular logits from ℓ_ref, ``steps`` Adam updates. Tracked exactly along training:
``kl_ref`` = KL(π ‖ π_ref) over whole paths, the true and the proxy expected rewards E_π[r], E_π[r̃], and
the true regularised regret J_β(π*) − J_β(π) (π* the true reward's solution at the same β).

What the set-up predicts: shiq, shiq_ms, copg and dro share the fixed point π ∝ π_ref exp(r̃/β) on this
data, so their end points agree and only their paths differ; DPO's Bradley–Terry fit of noise-free
preferences has no finite optimum (each margin grows like ln t), so its KL keeps growing.

Writes, in ``args.out``:
- ``misspecified.csv``: long format, columns ``method,error,beta,tree,step,kl_ref,true_reward,proxy_reward,
  true_regret``, one row per tree and evaluation;
- ``misspecified.png``: over-optimisation curves, one panel per error — true reward against KL(π ‖ π_ref)
  for the exact optima over a grid of β (the true reward's π*, and the proxy optimum π_ref·exp(r̃/β)) and
  for each method at the end of training for each β; below, true reward against steps at the smallest β;
- ``misspecified_summary.json``: per (error, β, method) the final KL, true reward and regret, the peak true
  reward along training, the KL and step where it peaks and the drop after it; runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shiq_toy.checks import check_at_least_one, check_subset
from shiq_toy.data import exhaustive_dataset, stack_datasets
from shiq_toy.experiments import num_threads, write_csv, write_summary
from shiq_toy.mdp import TokenTree, random_tree
from shiq_toy.methods import METHODS as METHOD_TABLE
from shiq_toy.metrics import expected, expected_kl, regret, state_distribution
from shiq_toy.options import apply_preset, option
from shiq_toy.solvers import solve_tree
from shiq_toy.tabular import TabularLogits, stack_levels
from shiq_toy.train import METHODS as ALL
from shiq_toy.train import train

__all__ = ["MisspecifiedArgs", "METHODS", "errors", "proxy_tree", "expected_reward", "optimum_curves", "by_error", "summarise", "run", "main"]

METHODS = ("shiq", "shiq_ms", "dpo", "copg", "dro")
CSV_HEADER = ["method", "error", "beta", "tree", "step", "kl_ref", "true_reward", "proxy_reward", "true_regret"]
#: The budget of ``--quick`` (the fields it overrides).
QUICK = {"trees": 2, "steps": 200, "noise_scales": (1.0,), "betas": (0.1, 1.0)}


@dataclass
class MisspecifiedArgs:
    """Arguments of the flawed-reward experiment (``shiq-toy misspecified``)."""

    out: Path = option(Path("figures"), 'directory for misspecified.csv, misspecified.png and '
                       'misspecified_summary.json', aliases=("output_dir",), path="out_dir")
    vocab_size: int = option(3, 'V, tokens per node')
    horizon: int = option(4, 'H, tokens per path (the reward sits on the last one)')
    betas: tuple[float, ...] = option((0.1, 0.3, 1.0), 'KL regularisations β')
    noise_scales: tuple[float, ...] = option((0.5, 1.0, 2.0), 'σ of the fixed per-path proxy errors σ·ε(y)')
    hack_paths: int = option(3, 'paths that the hack overpays (drawn among the truly worse half)')
    hack_bias: float = option(3.0, 'what the hack adds to their reward')
    methods: tuple[str, ...] = option(METHODS, 'methods to train: ShiQ-family losses and the baselines dpo, copg, '
                                      'dro')
    steps: int = option(600, 'Adam updates (full batch)')
    lr: float = option(0.1, 'Adam learning rate', aliases=("learning_rate",))
    eval_every: int = option(10, 'updates between two exact evaluations')
    trees: int = option(6, 'random trees (seeds seed, seed+1, …); trees × errors are trained together as stacked '
                        'copies')
    seed: int = option(0, 'first seed')
    quick: bool = option(False, 'a small budget (QUICK): sets trees, steps, noise_scales and betas, except those given '
                         'explicitly')
    threads: int = option(1, 'torch intra-op threads (1 is fastest for these tiny tensors)')


def check_args(args: MisspecifiedArgs) -> None:
    check_at_least_one(args, ("vocab_size", "horizon", "steps", "eval_every", "trees", "threads"))
    if not args.betas or any(b <= 0 for b in args.betas):
        raise ValueError(f"betas must be positive, got {args.betas}")
    if any(s <= 0 for s in args.noise_scales):
        raise ValueError(f"noise_scales must be positive, got {args.noise_scales}")
    paths = args.vocab_size**args.horizon
    if not 0 <= args.hack_paths <= paths // 2:
        raise ValueError(f"hack_paths must lie in [0, {paths // 2}] (half of the {paths} paths), got {args.hack_paths}")
    check_subset("methods", args.methods, (m for m in ALL if not METHOD_TABLE[m].needs_soft_value))


def errors(args: MisspecifiedArgs) -> list[str]:
    """The names of the proxy errors: none, noiseσ for each σ, hack (when ``hack_paths`` > 0)."""
    return ["none", *(f"noise{s:g}" for s in args.noise_scales), *(["hack"] if args.hack_paths else [])]


def proxy_tree(tree: TokenTree, error: str, *, generator: torch.Generator, hack_paths: int = 3, hack_bias: float = 3.0) -> TokenTree:
    """The tree with the proxy terminal reward r̃ = r + e (see the module docstring for ``error``)."""
    true = tree.rewards[-1]  # (V**(H-1), V): the reward of each path, in leaf order
    if error == "none":
        bias = torch.zeros_like(true)
    elif error.startswith("noise"):
        bias = float(error[len("noise"):]) * torch.randn(true.shape, generator=generator, dtype=torch.float64)
    elif error == "hack":
        flat = true.flatten()
        worse = flat.argsort()[: flat.numel() // 2]  # the truly worse half
        chosen = worse[torch.randperm(len(worse), generator=generator)[:hack_paths]]
        bias = torch.zeros_like(flat)
        bias[chosen] = hack_bias
        bias = bias.view(true.shape)
    else:
        raise ValueError(f"unknown error {error!r}: none, noiseσ or hack")
    return TokenTree(ref_logits=list(tree.ref_logits), rewards=[*tree.rewards[:-1], true + bias])


def expected_reward(tables: list[torch.Tensor], rewards: list[torch.Tensor]) -> torch.Tensor:
    """E_π[Σ_t r_t] of π = softmax(tables) (..., V**h, V) per depth, exactly: Σ_h Σ_s d_π(s) Σ_a π(a|s) r(s, a). (...)."""
    policy = [torch.softmax(x, dim=-1) for x in tables]
    return expected([(p * r).sum(-1) for p, r in zip(policy, rewards)], state_distribution(policy))


def _setup(args: MisspecifiedArgs):
    """Copies = trees × errors (tree-major): true trees, proxy trees, the proxy-labelled data (C, N, H)."""
    names = errors(args)
    true_trees, proxies = [], []
    for t in range(args.trees):
        tree = random_tree(args.vocab_size, args.horizon, generator=torch.Generator().manual_seed(args.seed + t), reward="terminal")
        for e, name in enumerate(names):
            generator = torch.Generator().manual_seed(10_000 * (args.seed + t) + e)
            true_trees.append(tree)
            proxies.append(proxy_tree(tree, name, generator=generator, hack_paths=args.hack_paths, hack_bias=args.hack_bias))
    data = stack_datasets([exhaustive_dataset(p, policy=[torch.softmax(x, -1) for x in p.ref_logits]) for p in proxies])
    return names, true_trees, proxies, data


def run(args: MisspecifiedArgs) -> dict:
    """Train every (β, method); returns, per (β, method), the steps and the (K, C) curves, with C = trees × errors."""
    check_args(args)
    names, true_trees, proxies, data = _setup(args)
    ref_levels = stack_levels([t.ref_logits for t in true_trees])
    true_rewards = stack_levels([t.rewards for t in true_trees])
    proxy_rewards = stack_levels([p.rewards for p in proxies])
    ref = TabularLogits(ref_levels).requires_grad_(False)
    curves = {}
    for beta in args.betas:
        true_target = stack_levels([solve_tree(t, beta=beta).logits for t in true_trees])

        def evaluate(tables: list[torch.Tensor], beta=beta, true_target=true_target) -> dict[str, torch.Tensor]:
            return {
                "kl_ref": expected_kl(tables, ref_levels, under="policy"),
                "true_reward": expected_reward(tables, true_rewards),
                "proxy_reward": expected_reward(tables, proxy_rewards),
                "true_regret": regret(tables, true_target, ref_levels, true_rewards, beta=beta),
            }

        for method in args.methods:
            model = TabularLogits(ref_levels)
            history = train(model, ref, method, beta=beta, steps=args.steps, data=data, lr=args.lr, evaluate=evaluate, eval_every=args.eval_every, pair_mode="all")
            curves[beta, method] = {"steps": history.steps, **history.metrics}  # (K, C) each
    return {"errors": names, "curves": curves, "optima": optimum_curves(true_trees, proxies, ref_levels, true_rewards)}


#: The β grid of the exact optimum curves (log-spaced).
BETA_GRID = tuple(float(x) for x in np.geomspace(0.02, 20.0, 25))


def optimum_curves(true_trees, proxies, ref_levels, true_rewards) -> dict[str, dict[str, torch.Tensor]]:
    """KL(π ‖ π_ref) and true reward of the exact optima over :data:`BETA_GRID`: ``true`` π* of the true
    reward (the best true reward at each KL), ``proxy`` π ∝ π_ref exp(r̃/β) (what a perfect optimiser of the
    proxy reaches). Each (len(BETA_GRID), C)."""
    out = {}
    for name, trees in (("true", true_trees), ("proxy", proxies)):
        kl, reward = [], []
        for beta in BETA_GRID:
            tables = stack_levels([solve_tree(t, beta=beta).logits for t in trees])
            kl.append(expected_kl(tables, ref_levels, under="policy"))
            reward.append(expected_reward(tables, true_rewards))
        out[name] = {"kl_ref": torch.stack(kl), "true_reward": torch.stack(reward)}
    return out


def by_error(values: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(..., C) with C = trees × errors (tree-major) -> (..., errors, trees)."""
    return values.unflatten(-1, (-1, len(names))).transpose(-1, -2)


def summarise(output: dict, args: MisspecifiedArgs) -> dict:
    """Per error, β, method: final KL, true reward, regret; the peak of the mean true reward along training,
    its KL and step, and the drop from the peak to the end (> 0: over-optimisation)."""
    names = output["errors"]
    summary = {}
    for (beta, method), curve in output["curves"].items():
        for e, name in enumerate(names):
            true = by_error(curve["true_reward"], names)[:, e].mean(-1)  # (K,) mean over trees
            kl = by_error(curve["kl_ref"], names)[:, e].mean(-1)
            regret_ = by_error(curve["true_regret"], names)[:, e].mean(-1)
            peak = int(true.argmax())
            summary[f"{name}/beta={beta:g}/{method}"] = {
                "final_kl": float(kl[-1]),
                "final_true_reward": float(true[-1]),
                "final_true_regret": float(regret_[-1]),
                "peak_true_reward": float(true[peak]),
                "kl_at_peak": float(kl[peak]),
                "step_at_peak": int(curve["steps"][peak]),
                "drop_after_peak": float(true[peak] - true[-1]),
            }
    return summary


def plot(output: dict, args: MisspecifiedArgs, path: Path) -> None:
    """Top row, one panel per error: true reward against KL(π ‖ π_ref) — the exact optimum curves over β
    (true reward's π*, solid; proxy optimum π_ref·exp(r̃/β), dashed), each method's end points across β
    (markers joined by a line) and its training paths (faint). Bottom row: true reward against training
    steps at the smallest β. Means over trees."""
    from matplotlib.figure import Figure

    names = output["errors"]
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    markers = dict(zip(sorted(args.betas), "o^sDvP*"))
    fig = Figure(figsize=(3.4 * len(names), 6.6), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    smallest = min(args.betas)
    for e, name in enumerate(names):
        top, bottom = axes[0, e], axes[1, e]
        for key, style in (("true", "-"), ("proxy", "--")):
            curve = output["optima"][key]
            kl = by_error(curve["kl_ref"], names)[:, e].mean(-1).numpy()
            reward = by_error(curve["true_reward"], names)[:, e].mean(-1).numpy()
            top.plot(kl, reward, style, color="k", lw=1.1, label="π* of the true reward (over β)" if key == "true" else "proxy optimum π_ref·exp(r̃/β) (over β)")
        for method in args.methods:
            ends = []
            for beta in sorted(args.betas):
                curve = output["curves"][beta, method]
                kl = by_error(curve["kl_ref"], names)[:, e].mean(-1).numpy()
                true = by_error(curve["true_reward"], names)[:, e].mean(-1).numpy()
                top.plot(kl[1:], true[1:], color=colors[method], lw=0.7, alpha=0.35)  # from step 1: KL = 0 at ℓ_ref
                top.plot(kl[-1], true[-1], markers[beta], color=colors[method], ms=5)
                ends.append((kl[-1], true[-1]))
                if beta == smallest:
                    bottom.plot(curve["steps"], true, color=colors[method], lw=1.5, label=method)
            top.plot(*zip(*ends), color=colors[method], lw=1.3, label=method)
        top.set(xscale="log", title=f"proxy error: {name}", xlabel="KL(π ‖ π_ref)")
        bottom.set(title=f"{name}: training at β = {smallest:g}", xlabel="Adam step")
        for ax in (top, bottom):
            ax.title.set_fontsize(9)
            ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel("true reward E_π[r]")
    axes[1, 0].set_ylabel("true reward E_π[r]")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [axes[0, 0].plot([], [], markers[b], color="0.3", ls="")[0] for b in sorted(args.betas)]
    labels += [f"end of training, β = {b:g}" for b in sorted(args.betas)]
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(
        f"over-optimising a proxy reward r̃ = r + e: V = {args.vocab_size}, H = {args.horizon}, {args.trees} trees, every path weighted by π_ref, "
        f"{args.steps} Adam steps (lr {args.lr:g}); means over trees",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)


def main(args: MisspecifiedArgs) -> dict:
    """Run the experiment, write misspecified.csv, .png and misspecified_summary.json; returns the summary."""
    if args.quick:  # the preset changes the fields still at their defaults (the command line applies it itself)
        args = apply_preset(args, QUICK)
    args.out.mkdir(parents=True, exist_ok=True)  # before the work: an unusable OUT fails at once
    start = time.perf_counter()
    with num_threads(args.threads):
        output = run(args)
        names = output["errors"]
        rows = []
        for (beta, method), curve in output["curves"].items():
            tables = {k: by_error(curve[k], names) for k in ("kl_ref", "true_reward", "proxy_reward", "true_regret")}  # (K, errors, trees)
            for k, step in enumerate(curve["steps"]):
                for e, name in enumerate(names):
                    rows += [
                        (method, name, beta, args.seed + t, step, *(float(tables[key][k, e, t]) for key in ("kl_ref", "true_reward", "proxy_reward", "true_regret")))
                        for t in range(args.trees)
                    ]
        write_csv(args.out / "misspecified.csv", CSV_HEADER, rows)
        plot(output, args, args.out / "misspecified.png")
    summary = {"errors": output["errors"], "runs": summarise(output, args), "seconds": time.perf_counter() - start}
    return write_summary(args.out / "misspecified_summary.json", args, summary)
