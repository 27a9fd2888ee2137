"""Q2 — do fresh online samples make ShiQ more robust? Offline data that miss the good paths, mixed with
samples of the current policy.

Random token trees (V tokens, depth H, a terminal reward ``r ~ N(0, 1)``). The offline dataset holds
``num_offline`` paths of a behaviour policy that covers the good paths poorly: at every state
``μ(a|s) ∝ π_ref(a|s) exp(−tilt · q*(s, a)/β)``, the exact soft-optimal Q-values turned against themselves
(``tilt = 0`` is π_ref). ShiQ's tabular logits start at ℓ_ref and take ``steps`` Adam updates on batches of
``batch_size`` paths drawn in one of these ways (the ``data`` column):

- ``offline``: from the offline data only (with replacement);
- ``mix10``, ``mix50``, ``mix100``: ``online_per_step`` fresh paths of the current policy are added to a
  replay buffer at every step, and 10%, 50% or 100% of each batch is drawn from that buffer (uniformly over
  all the paths it has received), the rest from the offline data;
- ``on_policy``: the whole batch is fresh paths of the current policy, used once (no offline data, no replay).

A reward query is one labelled path: the offline data cost ``num_offline`` queries up front (not for
``on_policy``), each fresh path one more. Metrics, exact on the whole tree: ``kl`` = KL(π ‖ π*) between the
sequence distributions (:func:`shiq_toy.metrics.expected_kl` under π) and the regularised ``regret``
J(π*) − J(π) (:func:`shiq_toy.metrics.regret`; = β·kl with γ = 1, spec §1).

Writes, in ``args.out``:
- ``online.csv``: long format, columns ``method,data,tree,step,queries,kl,regret``, one row per tree and
  evaluation;
- ``online.png``: regret against steps (left) and against reward queries (right), mean and 10–90% band
  over trees;
- ``online_summary.json``: the set-up, π*'s mass on the offline paths, final and best regrets, runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shiq_toy.checks import check_at_least_one, check_subset
from shiq_toy.data import Dataset, on_policy_sampler, path_probability, sample_dataset, stack_datasets
from shiq_toy.experiments import BAND_MEANING, num_threads, plot_band, write_csv, write_summary
from shiq_toy.losses import LOSSES
from shiq_toy.mdp import TokenTree, all_sequences, random_tree
from shiq_toy.methods import METHODS as METHOD_TABLE
from shiq_toy.metrics import expected_kl, regret
from shiq_toy.options import apply_preset, option
from shiq_toy.solvers import solve_tree
from shiq_toy.tabular import TabularLogits, stack_levels
from shiq_toy.train import train

__all__ = ["OnlineArgs", "DATA", "ONLINE_METHODS", "behaviour_levels", "MixedSampler", "run", "main"]

#: The ways of drawing a batch, and the share of it that comes from the online replay buffer.
DATA = {"offline": 0.0, "mix10": 0.1, "mix50": 0.5, "mix100": 1.0, "on_policy": None}
CSV_HEADER = ["method", "data", "tree", "step", "queries", "kl", "regret"]
#: The budget of ``--quick`` (the fields it overrides).
QUICK = {"trees": 3, "steps": 250, "eval_every": 25}


#: The token losses this experiment trains: those that need no soft value over the vocabulary (a table's logits
#: are trained directly here, as an LLM's would be).
ONLINE_METHODS = tuple(m for m in LOSSES if not METHOD_TABLE[m].needs_soft_value)


@dataclass
class OnlineArgs:
    """Arguments of the online-mixing experiment (``shiq-toy online``)."""

    out: Path = option(Path("figures"), 'directory for online.csv, online.png and online_summary.json', aliases=("output_dir",), path="out_dir")
    vocab_size: int = option(3, 'V, tokens per node')
    horizon: int = option(5, 'H, tokens per path (the reward sits on the last one)')
    beta: float = option(0.3, 'KL regularisation β')
    tilt: float = option(1.0, 'behaviour μ ∝ π_ref exp(−tilt · q*/β) at every state: 0 = π_ref, larger = fewer good '
                         'paths')
    num_offline: int = option(200, 'paths in the offline dataset (reward queries paid up front)')
    batch_size: int = option(32, 'paths per training batch')
    online_per_step: int = option(8, 'fresh paths of the current policy added to the replay buffer at every step '
                                  '(mix settings)')
    data: tuple[str, ...] = option(tuple(DATA), 'how batches are drawn: offline, mix10, mix50, mix100, on_policy')
    methods: tuple[str, ...] = option(("shiq",), 'losses to train (ShiQ-family, any of shiq_toy.losses.LOSSES except '
                                      'logit_q)')
    steps: int = option(600, 'Adam updates')
    lr: float = option(0.05, 'Adam learning rate', aliases=("learning_rate",))
    eval_every: int = option(10, 'updates between two exact evaluations')
    trees: int = option(8, 'random trees (seeds seed, seed+1, …), trained together as stacked copies')
    seed: int = option(0, 'first seed')
    quick: bool = option(False, 'a small budget (QUICK): sets trees, steps and eval_every, except those given explicitly')
    threads: int = option(1, 'torch intra-op threads (1 is fastest for these tiny tensors)')


def check_args(args: OnlineArgs) -> None:
    check_at_least_one(args, ("vocab_size", "horizon", "num_offline", "batch_size", "online_per_step", "steps", "eval_every", "trees", "threads"))
    check_subset("data", args.data, DATA)
    bad = [m for m in args.methods if m not in ONLINE_METHODS]
    if bad or not args.methods:
        raise ValueError(f"methods must be ShiQ-family losses of {ONLINE_METHODS}, got {args.methods}")
    if args.tilt < 0:
        raise ValueError(f"tilt must be >= 0, got {args.tilt}")


def behaviour_levels(tree: TokenTree, q_star: list[torch.Tensor], *, beta: float, tilt: float) -> list[torch.Tensor]:
    """μ(a|s) ∝ π_ref(a|s) exp(−tilt · q*(s, a)/β) at every state: per-depth (V**h, V) probabilities."""
    return [torch.softmax(ref - tilt * q / beta, dim=-1) for ref, q in zip(tree.ref_logits, q_star)]


class MixedSampler:
    """Batches of ``batch_size`` paths per tree: a share ``online_share`` from a replay buffer of fresh paths of
    the current policy (``online_per_step`` added per call), the rest from the offline data; or, with
    ``online_share=None``, ``batch_size`` fresh paths used once. Callable as ``train``'s ``sampler``:
    current tables (C, V**h, V) per depth -> a :class:`Dataset` of (C, batch_size, H).

    ``queries`` counts the labelled paths of one tree so far (the offline ones included when they are used).
    """

    def __init__(self, trees: list[TokenTree], offline: Dataset, *, online_share: float | None, batch_size: int, online_per_step: int, seed: int) -> None:
        self.offline, self.share, self.batch_size = offline, online_share, batch_size
        fresh = batch_size if online_share is None else (online_per_step if online_share > 0 else 0)
        self.samplers = [
            on_policy_sampler(tree, fresh, generators=torch.Generator().manual_seed(seed + 7919 * c)) for c, tree in enumerate(trees)
        ] if fresh else []
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: Dataset | None = None
        self.queries = 0 if online_share is None else offline.tokens.shape[1]

    def _fresh(self, tables: list[torch.Tensor]) -> Dataset:
        """One fresh batch per tree from its own policy: (C, fresh, H) fields."""
        batches = [sample([x[c] for x in tables]) for c, sample in enumerate(self.samplers)]
        self.queries += batches[0].tokens.shape[0]  # per tree: every tree gets the same number
        return stack_datasets(batches)

    def _draw(self, data: Dataset, num: int) -> Dataset:
        """``num`` paths per tree drawn uniformly with replacement from (C, N, H) data."""
        copies, size = data.tokens.shape[:2]
        index = torch.randint(size, (copies, num), generator=self.generator)
        take = lambda x: x.gather(1, index.view(copies, num, *([1] * (x.dim() - 2))).expand(copies, num, *x.shape[2:]))  # noqa: E731
        return Dataset(*(take(x) for x in data[:-1]), weights=torch.full((copies, num), 1.0 / num, dtype=torch.float64))

    def __call__(self, tables: list[torch.Tensor]) -> Dataset:
        if self.share is None:
            fresh = self._fresh(tables)
            return fresh._replace(weights=torch.full_like(fresh.weights, 1.0 / self.batch_size))
        parts = []
        num_online = round(self.share * self.batch_size)
        if self.samplers:
            fresh = self._fresh(tables)
            self.buffer = fresh if self.buffer is None else Dataset(*(torch.cat(pair, dim=1) for pair in zip(self.buffer, fresh)))
        if num_online:
            parts.append(self._draw(self.buffer, num_online))
        if self.batch_size - num_online:
            parts.append(self._draw(self.offline, self.batch_size - num_online))
        batch = Dataset(*(torch.cat(fields, dim=1) for fields in zip(*parts)))
        return batch._replace(weights=torch.full_like(batch.weights, 1.0 / self.batch_size))


def _setup(args: OnlineArgs):
    """Trees, their solutions, the offline datasets (C, N, H) and π*'s mass on the offline paths (C,)."""
    seeds = range(args.seed, args.seed + args.trees)
    trees = [random_tree(args.vocab_size, args.horizon, generator=torch.Generator().manual_seed(s), reward="terminal") for s in seeds]
    solutions = [solve_tree(t, beta=args.beta) for t in trees]
    datasets, coverage = [], []
    paths = all_sequences(args.vocab_size, args.horizon)
    for s, tree, sol in zip(seeds, trees, solutions):
        behaviour = behaviour_levels(tree, sol.q, beta=args.beta, tilt=args.tilt)
        data = sample_dataset(tree, args.num_offline, generator=torch.Generator().manual_seed(10_000 + s), policy=behaviour)
        datasets.append(data)
        leaf = data.tokens @ (args.vocab_size ** torch.arange(args.horizon - 1, -1, -1))  # path index (N,)
        seen = torch.zeros(len(paths), dtype=torch.bool)
        seen[leaf] = True
        coverage.append(float(path_probability(sol.policy, paths)[seen].sum()))
    return trees, solutions, stack_datasets(datasets), coverage


def run(args: OnlineArgs) -> dict:
    """Train every (method, data) setting on the same trees; returns steps (K,) and, per setting, queries (K,)
    and kl, regret (K, trees), plus the offline coverage."""
    check_args(args)
    trees, solutions, offline, coverage = _setup(args)
    ref_levels = stack_levels([t.ref_logits for t in trees])
    rewards = stack_levels([t.rewards for t in trees])
    target = stack_levels([s.logits for s in solutions])
    ref = TabularLogits(ref_levels).requires_grad_(False)
    results = {}
    for method in args.methods:
        for data in args.data:
            sampler = MixedSampler(trees, offline, online_share=DATA[data], batch_size=args.batch_size, online_per_step=args.online_per_step, seed=args.seed)
            queries: list[int] = []

            def evaluate(tables: list[torch.Tensor], sampler=sampler, queries=queries) -> dict[str, torch.Tensor]:
                queries.append(sampler.queries)
                return {
                    "kl": expected_kl(tables, target, under="policy"),
                    "regret": regret(tables, target, ref_levels, rewards, beta=args.beta),
                }

            model = TabularLogits(ref_levels)
            history = train(model, ref, method, beta=args.beta, steps=args.steps, sampler=sampler, lr=args.lr, evaluate=evaluate, eval_every=args.eval_every)
            # queries[k]: labelled paths used by the first steps[k] updates (evaluate runs after each update)
            results[method, data] = {"queries": queries, "kl": history.metrics["kl"], "regret": history.metrics["regret"], "steps": history.steps}
    return {"results": results, "coverage": coverage}


def plot(output: dict, args: OnlineArgs, path: Path) -> None:
    """Regret against steps (left) and reward queries (right), mean and 10–90% band over trees."""
    from matplotlib.figure import Figure

    colors = {d: f"C{i}" for i, d in enumerate(DATA)}
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    for (method, data), result in output["results"].items():
        values = np.clip(result["regret"].numpy(), 1e-12, None)  # (K, trees)
        label = data if len(args.methods) == 1 else f"{method}, {data}"
        style = "-" if method == args.methods[0] else "--"
        plot_band(left, np.asarray(result["steps"]), values, color=colors[data], label=label)
        right.plot(np.maximum(result["queries"], 1), values.mean(1), style, color=colors[data], label=label, lw=1.6,
                   marker="o" if data == "offline" else None, ms=4, markevery=[-1])  # offline: every step at the same count
    left.set(yscale="log", xlabel="training step", ylabel="regret J(π*) − J(π) = β KL(π ‖ π*) (KL in nats)", title="against updates")
    right.set(xscale="log", xlabel="reward queries (labelled paths, offline ones included)", title="against reward queries")
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(
        f"offline data from μ ∝ π_ref·exp(−{args.tilt}·q*/β) ({args.num_offline} paths, π* mass on them {np.mean(output['coverage']):.2f}) mixed with fresh "
        f"samples: V = {args.vocab_size}, H = {args.horizon}, β = {args.beta}, {args.trees} trees, batch {args.batch_size}\n"
        f"left: {BAND_MEANING.format(n=args.trees, what='random trees')}; right: the mean only",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)


def main(args: OnlineArgs) -> dict:
    """Run the experiment, write online.csv, online.png and online_summary.json; returns the summary."""
    if args.quick:  # the preset changes the fields still at their defaults (the command line applies it itself)
        args = apply_preset(args, QUICK)
    args.out.mkdir(parents=True, exist_ok=True)  # before the work: an unusable OUT fails at once
    start = time.perf_counter()
    with num_threads(args.threads):
        output = run(args)
        rows = [
            (method, data, args.seed + c, step, queries, float(kl[c]), float(reg[c]))
            for (method, data), result in output["results"].items()
            for step, queries, kl, reg in zip(result["steps"], result["queries"], result["kl"], result["regret"])
            for c in range(args.trees)
        ]
        write_csv(args.out / "online.csv", CSV_HEADER, rows)
        plot(output, args, args.out / "online.png")
    summary = {
        "offline_coverage_of_pi_star": float(np.mean(output["coverage"])),
        "settings": {
            f"{method}/{data}": {
                "final_regret": float(result["regret"][-1].mean()),
                "initial_regret": float(result["regret"][0].mean()),
                "final_kl": float(result["kl"][-1].mean()),
                "reward_queries": int(result["queries"][-1]),
            }
            for (method, data), result in output["results"].items()
        },
        "seconds": time.perf_counter() - start,
    }
    return write_summary(args.out / "online_summary.json", args, summary)
