"""The three-armed bandit regret figure (spec §5).

One state, three arms with noisy rewards, a reference policy that prefers the worst arm. Tabular logits start
at the reference logits and are trained with each method, offline (a fixed dataset sampled from π_ref) and
online (fresh samples from the current policy at every step). The metric is the regularised regret
``J(π*) − J(π_t) = β KL(π_t ‖ π*)`` (spec §1), exact, at every step; seeds run as stacked copies.

Writes, in ``args.out``:
- ``bandit_regret.csv``: columns ``setting,method,step,regret``, regret = mean over seeds;
- ``bandit_regret.png``: top, regret against steps (log scale; mean and 10–90% band over seeds) for each
  setting; bottom, the cumulative regret Σ_{s≤t} regret(π_s);
- ``bandit_summary.json``: the set-up, π*, the reference policy's regret, the Bradley–Terry optimum of
  the offline DPO pairs, final regrets per method (mean, 10% and 90% quantiles) and the runtime.

What to expect: shiq, shifted_q (and shiq_init, which equals shifted_q on one state) reach the floor set by
the data — the empirical optimum π ∝ π_ref exp(r̄/β) — far below 1% of π_ref's regret; copg and dro too;
logit_q converges to softmax(r̄), which ignores π_ref and β; DPO converges to the Bradley–Terry optimum of
its preference pairs (noisy rewards make the preference probabilities Φ(Δr/(σ√2)), not σ(Δr/β)), not π*.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from shiq_toy.baselines import make_preference_pairs
from shiq_toy.checks import check_at_least_one, check_subset
from shiq_toy.data import Dataset, on_policy_sampler, sample_dataset, stack_datasets
from shiq_toy.experiments import BAND_MEANING, num_threads, plot_band, write_csv, write_summary
from shiq_toy.mdp import Bandit
from shiq_toy.metrics import expected_kl
from shiq_toy.options import option
from shiq_toy.solvers import solve_bandit
from shiq_toy.tabular import TabularLogits
from shiq_toy.train import METHODS, train

__all__ = ["BanditArgs", "make_bandit", "bradley_terry_rewards", "run", "main", "SETTINGS"]

SETTINGS = ("offline", "online")
CSV_HEADER = ["setting", "method", "step", "regret"]


@dataclass
class BanditArgs:
    """Arguments of the bandit regret experiment (``shiq-toy bandit``)."""

    out: Path = option(Path("figures"), 'directory for bandit_regret.png, bandit_regret.csv and bandit_summary.json', aliases=("output_dir",), path="out_dir")
    rewards: tuple[float, ...] = option((1.0, 0.6, 0.0), 'mean reward r(a) of each arm')
    ref_probs: tuple[float, ...] = option((0.15, 0.25, 0.6), 'reference policy π_ref(a); it prefers the worst arm')
    ref_offset: float = option(3.0, 'constant added to ln π_ref to make the reference logits ℓ_ref '
                               '(softmax-invariant, like the unnormalised logits of a language model). shiq does not '
                               'see it; shifted_q and shiq_init must remove it: with Adam (each logit moves about lr '
                               "per step) they travel |r(a)/β − offset| instead of shiq's r(a)/β, so with 3.0 they "
                               'start faster, with −3.0 slower')
    beta: float = option(0.2, 'KL regularisation β')
    noise_std: float = option(0.5, 'standard deviation of the Gaussian noise on each observed reward')
    num_samples: int = option(1000, 'offline: size of the dataset sampled from π_ref (one dataset per seed)')
    batch_size: int = option(64, 'online: fresh samples from the current policy at each step')
    steps: int = option(200, 'training steps (full-batch offline, one fresh batch online)')
    seeds: int = option(10, 'independent runs (seeds seed, seed+1, …), trained together as stacked copies')
    seed: int = option(0, 'first seed')
    lr: float = option(0.1, 'Adam learning rate', aliases=("learning_rate",))
    methods: tuple[str, ...] = option(("shiq", "shiq_init", "shifted_q", "logit_q", "dpo", "copg", "dro"), 'methods '
                                      'to train: ShiQ-family losses and the baselines dpo, copg, dro')
    settings: tuple[str, ...] = option(SETTINGS, 'offline (data from π_ref) and/or online (fresh data from the '
                                       'current policy)')
    pair_mode: str = option("disjoint", 'how dpo/copg pair the responses: disjoint (1st with 2nd, 3rd with 4th, …) '
                            'or all')
    threads: int = option(1, 'torch intra-op threads (1 is fastest for these tiny tensors)')


def check_args(args: BanditArgs) -> None:
    arms = len(args.rewards)
    if arms < 2 or len(args.ref_probs) != arms:
        raise ValueError(f"rewards and ref_probs must give the same number (>= 2) of arms, got {len(args.rewards)} and {len(args.ref_probs)}")
    if any(p <= 0 for p in args.ref_probs) or not math.isclose(sum(args.ref_probs), 1.0, abs_tol=1e-9):
        raise ValueError(f"ref_probs must be positive and sum to 1, got {args.ref_probs}")
    check_at_least_one(args, ("num_samples", "batch_size", "steps", "seeds", "threads"))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    check_subset("settings", args.settings, SETTINGS)


def make_bandit(args: BanditArgs) -> Bandit:
    """The bandit of the arguments: ℓ_ref = ln π_ref + ref_offset, mean rewards r, noise σ."""
    ref_logits = torch.tensor(args.ref_probs, dtype=torch.float64).log() + args.ref_offset
    return Bandit(ref_logits=ref_logits, rewards=torch.tensor(args.rewards, dtype=torch.float64), noise_std=args.noise_std)


def bradley_terry_rewards(winners: torch.Tensor, losers: torch.Tensor, num_arms: int) -> torch.Tensor:
    """Maximum-likelihood Bradley–Terry rewards of observed preferences ``winners[i] ≻ losers[i]`` (arms):

    z = argmax Σ_i ln σ(z(w_i) − z(l_i)),  z(0) = 0 (z is defined up to a constant). (P,) arms -> (K,).
    DPO's minimiser on the same pairs is β(Δ(a) − Δ(b)) = z(a) − z(b), i.e. π ∝ π_ref exp(z/β).
    Solved with scipy's BFGS on the convex negative log-likelihood.
    """
    w, l = winners.numpy(), losers.numpy()

    def loss_and_grad(free: np.ndarray) -> tuple[float, np.ndarray]:
        z = np.concatenate([[0.0], free])
        margin = z[w] - z[l]
        weight = 1.0 / (1.0 + np.exp(margin))  # σ(−margin) = −d/dmargin ln σ(margin)
        grad = np.zeros(num_arms)
        np.add.at(grad, w, -weight)
        np.add.at(grad, l, weight)
        return float(np.logaddexp(0.0, -margin).sum()), grad[1:]

    result = minimize(loss_and_grad, np.zeros(num_arms - 1), jac=True, method="BFGS", options={"gtol": 1e-10})
    return torch.from_numpy(np.concatenate([[0.0], result.x]))


def _offline_data(bandit: Bandit, args: BanditArgs) -> Dataset:
    seeds = range(args.seed, args.seed + args.seeds)
    return stack_datasets([sample_dataset(bandit, args.num_samples, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _bt_regret(bandit: Bandit, data: Dataset, star_logits: torch.Tensor, args: BanditArgs) -> torch.Tensor:
    """Regret of DPO's offline limit (the Bradley–Terry optimum of each seed's pairs): (seeds,)."""
    out = []
    for c in range(data.tokens.shape[0]):
        w, l = make_preference_pairs(data.prompt_ids[c], data.rewards[c, :, 0], mode=args.pair_mode)
        z = bradley_terry_rewards(data.tokens[c, w, 0], data.tokens[c, l, 0], len(args.rewards))
        out.append(_regret_of(bandit.ref_logits + z / args.beta, star_logits, args.beta))
    return torch.stack(out)


def _empirical_regret(bandit: Bandit, data: Dataset, star_logits: torch.Tensor, args: BanditArgs) -> torch.Tensor:
    """Regret of the best policy the offline data can identify, π ∝ π_ref exp(r̄/β) with r̄(a) each seed's
    mean observed reward of arm a (the limit of shiq, shifted_q, copg with all pairs, dro): (seeds,)."""
    arms, observed = data.tokens[..., 0], data.rewards[..., 0]  # (seeds, N)
    onehot = torch.nn.functional.one_hot(arms, len(args.rewards)).double()  # (seeds, N, K)
    means = (onehot * observed[..., None]).sum(1) / onehot.sum(1)  # (seeds, K)
    return _regret_of(bandit.ref_logits + means / args.beta, star_logits, args.beta)


def _regret_of(logits: torch.Tensor, star_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """β KL(π ‖ π*) = J(π*) − J(π) of π = softmax(logits) (spec §1; the identity is tested against policy
    evaluation in tests/test_tabular.py): logits (..., K), star_logits (K,) -> (...)."""
    return beta * expected_kl([logits.unsqueeze(-2)], [star_logits[None]], under="policy")  # one state: (..., 1, K)


def run(args: BanditArgs) -> dict:
    """Train every (setting, method); returns {"steps": [...], "regret": {(setting, method): (K, seeds)}, ...}."""
    check_args(args)
    bandit = make_bandit(args)
    star = solve_bandit(bandit.ref_logits, bandit.rewards, beta=args.beta)
    ref = TabularLogits.from_bandit(bandit).requires_grad_(False)
    evaluate = lambda tables: {"regret": _regret_of(tables[0][..., 0, :], star.logits, args.beta)}  # noqa: E731  tables [(C, 1, K)]
    data = _offline_data(bandit, args)
    results, steps = {}, None
    for setting in args.settings:
        for method in args.methods:
            model = TabularLogits.from_bandit(bandit, copies=args.seeds)
            if setting == "offline":
                source = {"data": data}
            else:
                generators = [torch.Generator().manual_seed(s) for s in range(args.seed, args.seed + args.seeds)]
                source = {"sampler": on_policy_sampler(bandit, args.batch_size, generators=generators)}
            history = train(
                model, ref, method, beta=args.beta, steps=args.steps, lr=args.lr, evaluate=evaluate, eval_every=1,
                pair_mode=args.pair_mode, **source,
            )
            results[setting, method] = history.metrics["regret"]  # (steps + 1, seeds)
            steps = history.steps
    reference_regret = _regret_of(bandit.ref_logits, star.logits, args.beta)
    bt = _bt_regret(bandit, data, star.logits, args) if "dpo" in args.methods and "offline" in args.settings else None
    return {
        "steps": steps,
        "regret": results,
        "reference_regret": float(reference_regret),
        "star": star,
        "bt_regret": bt,
        "empirical_regret": _empirical_regret(bandit, data, star.logits, args) if "offline" in args.settings else None,
    }


def plot(results: dict, args: BanditArgs, path: Path) -> None:
    """Regret (top) and cumulative regret (bottom), one column per setting; mean and 10–90% band over seeds."""
    from matplotlib.figure import Figure

    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    settings = [s for s in SETTINGS if s in args.settings]
    fig = Figure(figsize=(5.2 * len(settings), 7.6), layout="constrained")
    axes = fig.subplots(2, len(settings), squeeze=False, sharex=True)
    steps = np.asarray(results["steps"])
    floor = 1e-12  # the log scale cannot show an exact 0
    for col, setting in enumerate(settings):
        top, bottom = axes[0, col], axes[1, col]
        for method in args.methods:
            per_seed = results["regret"][setting, method].numpy()  # (K, seeds)
            cumulative = np.cumsum(per_seed, axis=0)  # Σ_{s<=t} regret(π_s), one evaluation per step
            label = "shiq_init (= shifted_q on one state)" if method == "shiq_init" else method
            for ax, values in ((top, np.clip(per_seed, floor, None)), (bottom, cumulative)):
                plot_band(ax, steps, values, color=colors[method], label=label)
        top.axhline(results["reference_regret"], color="0.4", ls="--", lw=1, label="π_ref")
        if setting == "offline" and results["bt_regret"] is not None:
            top.axhline(float(results["bt_regret"].mean()), color=colors["dpo"], ls=":", lw=1.4, label="DPO's Bradley–Terry optimum")
        if setting == "offline" and results["empirical_regret"] is not None:
            top.axhline(float(results["empirical_regret"].mean()), color="k", ls=":", lw=1.2, label="best the data allows: π_ref·exp(r̄/β)")
        top.set(yscale="log", title=f"{setting}: regret β KL(π_t ‖ π*)", ylabel="regularised regret = β·KL (KL in nats)")
        bottom.set(title=f"{setting}: cumulative regret", xlabel="training step", ylabel="Σ_{s≤t} regret(π_s)")
        for ax in (top, bottom):
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(
        f"three-armed bandit: r = {list(args.rewards)}, π_ref = {list(args.ref_probs)}, β = {args.beta}, noise σ = {args.noise_std}, "
        f"{args.seeds} seeds\n" + BAND_MEANING.format(n=args.seeds, what="seeds"),
        fontsize=10,
    )
    fig.savefig(path, dpi=120)


def main(args: BanditArgs) -> dict:
    """Run the experiment, write the CSV, the figure and the summary into ``args.out``; returns the summary."""
    start = time.perf_counter()
    with num_threads(args.threads):
        results = run(args)
        args.out.mkdir(parents=True, exist_ok=True)
        rows = [
            (setting, method, step, float(value))
            for (setting, method), table in results["regret"].items()
            for step, value in zip(results["steps"], table.mean(1).tolist())
        ]
        write_csv(args.out / "bandit_regret.csv", CSV_HEADER, rows)
        plot(results, args, args.out / "bandit_regret.png")
    final = {
        f"{setting}/{method}": {
            "mean": float(table[-1].mean()),
            "q10": float(table[-1].quantile(0.1)),
            "q90": float(table[-1].quantile(0.9)),
        }
        for (setting, method), table in results["regret"].items()
    }
    summary = {
        "pi_star": results["star"].policy.tolist(),
        "reference_regret": results["reference_regret"],
        "dpo_bradley_terry_regret": None if results["bt_regret"] is None else float(results["bt_regret"].mean()),
        "empirical_optimum_regret": None if results["empirical_regret"] is None else float(results["empirical_regret"].mean()),
        "final_regret": final,
        "seconds": time.perf_counter() - start,
    }
    return write_summary(args.out / "bandit_summary.json", args, summary)
