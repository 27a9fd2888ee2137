"""Q1 — does ShiQ work beyond language models? Offline ShiQ on deterministic gymnasium environments.

Four deterministic MDPs with discounting γ < 1 and a uniform reference policy: FrozenLake 8×8 without
slipping, CliffWalking, Taxi (gymnasium's transition tables) and a random 12×12 maze with walls and traps
(:func:`shiq_toy.mdp.gridworld`). Each has its own β (:data:`ENV_SPECS`), chosen so that the soft-optimal
logits q*/β stay within a few tens. The exact solution is soft value iteration.

Offline data: episodes of a behaviour policy from the environment's start distribution, cut after
``max_steps`` steps (a truncated episode is bootstrapped with the model's own implied value of the state it
reached, :mod:`shiq_toy.episodes`). Behaviours of decreasing quality and coverage: ``eps_greedy`` (the
greedy action of π* with probability 1 − ε, else uniform), ``uniform`` (= π_ref), ``poor`` (ε-greedy around
the *worst* action, argmin q*). Data sizes: ``episodes`` per dataset.

Methods, each trained full batch with Adam from π_ref for ``steps`` updates: ``shiq`` (the multi-step
residual along each episode), ``shiq_ms`` (its one-step ablation) and ``soft_q``, classical soft Q-learning
with a target table refreshed every ``target_every`` updates (a baseline, not a ShiQ variant). Models:
``table`` (one free output per state and action) and ``mlp`` (one hidden tanh layer over one-hot states,
function approximation). Metric: the regularised regret J(π*) − J(π) from the start distribution, exact by
linear-solve policy evaluation (:func:`shiq_toy.metrics.mdp_regret`), reported as a fraction of π_ref's.

Writes, in ``args.out``:
- ``gym.csv``: long format, one row per (env, approx, behaviour, episodes, method, seed, step): ``regret``,
  ``regret_ratio`` (regret / π_ref's regret), ``coverage`` (share of π*'s discounted state-action occupancy
  on pairs the data contain), ``behaviour_ratio`` (the behaviour policy's own regret ratio) and
  ``identified_ratio`` (the regret ratio of π* at the states where the data try every action and π_ref
  elsewhere: what the data identify without generalisation, :func:`identified_logits`) and ``loss`` (the
  training loss at that step; for the ShiQ family its minimum on the data is 0, reached at ℓ*);
- ``gym.png``: final regret ratio against the number of episodes, one panel per (env, behaviour);
- ``gym_summary.json``: the set-up, the β of each env, final mean regret ratios and coverages, runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from shiq_toy.checks import check_at_least_one, check_subset
from shiq_toy.episode_train import StateMLP, StateTable, train_episodes
from shiq_toy.episodes import EPISODE_METHODS, sample_episodes
from shiq_toy.experiments import num_threads, write_csv, write_summary
from shiq_toy.mdp import FiniteMDP, finite_mdp_from_gym, gridworld
from shiq_toy.metrics import mdp_occupancy, mdp_regret
from shiq_toy.options import apply_preset, option
from shiq_toy.solvers import soft_value_iteration

__all__ = ["GymArgs", "ENV_SPECS", "BEHAVIOURS", "APPROXIMATIONS", "make_env", "behaviour_policy", "coverage_share", "identified_logits", "run", "main"]

#: name -> (β, description). γ is shared (``GymArgs.gamma``).
ENV_SPECS = {
    "frozenlake": (0.05, "FrozenLake-v1 8x8, is_slippery=False: reward 1 at the goal, holes end the episode"),
    "cliffwalking": (5.0, "CliffWalking-v1: -1 per step, -100 and back to the start on the cliff"),
    "taxi": (1.0, "Taxi-v4 (Taxi-v3's table): -1 per step, +20 on delivery, -10 on a wrong pick-up/drop-off"),
    "gridworld": (0.05, "random maze (shiq_toy.mdp.gridworld, seed 0): +1 at the goal, -1 in a trap"),
}
BEHAVIOURS = ("eps_greedy", "uniform", "poor")
APPROXIMATIONS = ("table", "mlp")


class Row(NamedTuple):
    """One line of gym.csv (the CSV header is the field names)."""

    env: str
    approx: str
    behaviour: str
    episodes: int
    method: str
    seed: int
    step: int
    regret: float
    regret_ratio: float
    coverage: float
    behaviour_ratio: float
    identified_ratio: float
    loss: float


CSV_HEADER = list(Row._fields)
#: The budget of ``--quick`` (the fields it overrides).
QUICK = {"envs": ("frozenlake", "gridworld"), "episodes": (10, 100), "seeds": 2, "steps": 150, "eval_every": 50, "grid_size": 8}


@dataclass
class GymArgs:
    """Arguments of the gymnasium experiment (``shiq-toy gym``)."""

    out: Path = option(Path("figures"), 'directory for gym.csv, gym.png and gym_summary.json', aliases=("output_dir",), path="out_dir")
    envs: tuple[str, ...] = option(tuple(ENV_SPECS), 'environments (β of each: ENV_SPECS)')
    behaviours: tuple[str, ...] = option(BEHAVIOURS, 'behaviour policies of the offline data: eps_greedy (around '
                                         "π*'s greedy action), uniform (= π_ref), poor (ε-greedy around the worst "
                                         'action)')
    episodes: tuple[int, ...] = option((10, 30, 100), 'dataset sizes, in episodes')
    methods: tuple[str, ...] = option(("shiq", "shiq_ms", "soft_q"), 'methods: ShiQ-family residuals (shiq, shiq_ms, '
                                      'shiq_init, shifted_q) and the classical baseline soft_q')
    approximations: tuple[str, ...] = option(APPROXIMATIONS, 'models: table (tabular) and/or mlp (one hidden layer '
                                             'over one-hot states)')
    epsilon: float = option(0.2, 'ε of the eps_greedy and poor behaviours')
    gamma: float = option(0.95, 'discount γ < 1')
    max_steps: int = option(50, 'episodes are cut after this many steps (and bootstrapped)')
    steps: int = option(400, 'full-batch Adam updates per run')
    lr: float = option(0.3, 'Adam learning rate of the tables', aliases=("learning_rate",))
    mlp_lr: float = option(0.01, 'Adam learning rate of the MLPs')
    hidden: int = option(64, 'hidden units of the MLP')
    target_every: int = option(25, 'soft_q: updates between two refreshes of the target table')
    eval_every: int = option(100, 'updates between two exact evaluations')
    grid_size: int = option(12, 'side of the generated maze')
    seeds: int = option(3, 'independent datasets and initialisations (seeds seed, seed+1, …), trained together as '
                        'stacked copies')
    seed: int = option(0, 'first seed')
    quick: bool = option(False, 'a small budget (QUICK): sets envs, episodes, seeds, steps, eval_every and grid_size, except '
                         'those given explicitly')
    threads: int = option(1, 'torch intra-op threads (1 is fastest for these small tensors)')


def check_args(args: GymArgs) -> None:
    for name, allowed in (("envs", ENV_SPECS), ("behaviours", BEHAVIOURS), ("methods", EPISODE_METHODS), ("approximations", APPROXIMATIONS)):
        check_subset(name, getattr(args, name), allowed)
    check_at_least_one(args, ("max_steps", "steps", "hidden", "target_every", "eval_every", "seeds", "threads", "grid_size"))
    if any(n < 1 for n in args.episodes) or not args.episodes:
        raise ValueError(f"episodes must be positive, got {args.episodes}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {args.epsilon}")
    if not 0.0 < args.gamma < 1.0:
        raise ValueError(f"gamma must lie in (0, 1), got {args.gamma}")


def make_env(name: str, *, grid_size: int = 12) -> FiniteMDP:
    """The finite MDP of an :data:`ENV_SPECS` name (uniform reference)."""
    import gymnasium

    if name == "frozenlake":
        return finite_mdp_from_gym(gymnasium.make("FrozenLake-v1", is_slippery=False, map_name="8x8"))
    if name == "cliffwalking":
        return finite_mdp_from_gym(gymnasium.make("CliffWalking-v1"))
    if name == "taxi":
        return finite_mdp_from_gym(gymnasium.make("Taxi-v4"))
    if name == "gridworld":
        return gridworld(grid_size, generator=torch.Generator().manual_seed(0))
    raise ValueError(f"unknown env {name!r}; choose one of {tuple(ENV_SPECS)}")


def behaviour_policy(name: str, q_star: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """(S, A) probabilities: ``eps_greedy`` (1 − ε) onehot(argmax q*) + ε uniform; ``uniform``; ``poor``
    (1 − ε) onehot(argmin q*) + ε uniform."""
    uniform = torch.full_like(q_star, 1.0 / q_star.shape[-1])
    if name == "uniform":
        return uniform
    if name not in ("eps_greedy", "poor"):
        raise ValueError(f"unknown behaviour {name!r}; choose one of {BEHAVIOURS}")
    pick = q_star.argmax(-1) if name == "eps_greedy" else q_star.argmin(-1)
    return (1.0 - epsilon) * torch.nn.functional.one_hot(pick, q_star.shape[-1]).to(q_star.dtype) + epsilon * uniform


def coverage_share(occupancy: torch.Tensor, episodes) -> torch.Tensor:
    """Share of the occupancy d* (S, A) on the (s, a) pairs of each copy's episodes: (C,)."""
    copies, num_actions = episodes.states.shape[0], occupancy.shape[-1]
    seen = torch.zeros(copies, occupancy.numel(), dtype=torch.bool)
    seen.scatter_(1, (episodes.states * num_actions + episodes.actions).flatten(1), episodes.mask.flatten(1))
    return (seen * occupancy.flatten()).sum(-1) / occupancy.sum()


def identified_logits(mdp: FiniteMDP, star_logits: torch.Tensor, episodes) -> torch.Tensor:
    """The policy the data identify without generalisation: π* (``star_logits``) at the states where the data
    try every action, π_ref elsewhere. (C, S, A). A soft-optimal policy needs the value of every action (a
    state where only the greedy action was taken does not show that the others are worse), so a tabular method
    cannot be expected to beat this on offline data; its regret ratio is the ``identified_ratio`` column."""
    copies, num_actions = episodes.states.shape[0], mdp.num_actions
    seen = torch.zeros(copies, mdp.num_states * num_actions, dtype=torch.bool)
    seen.scatter_(1, (episodes.states * num_actions + episodes.actions).flatten(1), episodes.mask.flatten(1))
    every = seen.view(copies, mdp.num_states, num_actions).all(-1)  # (C, S)
    return torch.where(every[..., None], star_logits, mdp.ref_logits)


def _model(approx: str, method: str, mdp: FiniteMDP, args: GymArgs, seed: int):
    """A model at π_ref: ℓ = ℓ_ref (ShiQ family) or u = 0 (soft_q), C = seeds copies."""
    init = torch.zeros_like(mdp.ref_logits) if method == "soft_q" else mdp.ref_logits
    if approx == "table":
        return StateTable(init.expand(args.seeds, -1, -1)), args.lr
    mlp = StateMLP(None, init, copies=args.seeds, hidden=args.hidden, generator=torch.Generator().manual_seed(seed))
    return mlp, args.mlp_lr


def run(args: GymArgs) -> list[Row]:
    """Every (env, behaviour, episodes, approx, method) run; returns the CSV rows."""
    check_args(args)
    rows = []
    seeds = list(range(args.seed, args.seed + args.seeds))
    for env_name in args.envs:
        mdp, beta = make_env(env_name, grid_size=args.grid_size), ENV_SPECS[env_name][0]
        q_star, v_star, _ = soft_value_iteration(mdp, beta=beta, gamma=args.gamma)
        occupancy = mdp_occupancy(mdp, mdp.ref_logits + q_star / beta, gamma=args.gamma)
        ref_regret = float(mdp_regret(mdp, mdp.ref_logits, v_star, beta=beta, gamma=args.gamma))

        def evaluate(logits: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"regret": mdp_regret(mdp, logits, v_star, beta=beta, gamma=args.gamma)}

        for behaviour in args.behaviours:
            policy = behaviour_policy(behaviour, q_star, epsilon=args.epsilon)
            behaviour_ratio = float(mdp_regret(mdp, policy.clamp(min=1e-300).log(), v_star, beta=beta, gamma=args.gamma)) / ref_regret
            for num in args.episodes:
                generators = [torch.Generator().manual_seed(1000 * s + num) for s in seeds]
                episodes = sample_episodes(mdp, policy, num, max_steps=args.max_steps, generators=generators)
                coverage = coverage_share(occupancy, episodes)
                identified = evaluate(identified_logits(mdp, mdp.ref_logits + q_star / beta, episodes))["regret"] / ref_regret  # (C,)
                for approx in args.approximations:
                    for method in args.methods:
                        model, lr = _model(approx, method, mdp, args, seed=args.seed)
                        history = train_episodes(
                            model, mdp.ref_logits, method, episodes, beta=beta, gamma=args.gamma, steps=args.steps, lr=lr,
                            target_every=args.target_every, evaluate=evaluate, eval_every=args.eval_every,
                        )
                        for step, regret, loss in zip(history.steps, history.metrics["regret"], history.metrics["loss"]):
                            rows += [
                                Row(env_name, approx, behaviour, num, method, s, step, float(regret[c]), float(regret[c]) / ref_regret,
                                    float(coverage[c]), behaviour_ratio, float(identified[c]), float(loss[c]))
                                for c, s in enumerate(seeds)
                            ]
    return rows


def _final(rows: list[Row]) -> dict[tuple, np.ndarray]:
    """(env, approx, behaviour, episodes, method) -> regret ratios of the seeds at the last evaluated step."""
    last_step: dict[tuple, int] = {}
    for row in rows:
        last_step[row[:5]] = max(last_step.get(row[:5], -1), row.step)
    final: dict[tuple, list[float]] = {}
    for row in rows:
        if row.step == last_step[row[:5]]:
            final.setdefault(row[:5], []).append(row.regret_ratio)
    return {key: np.array(values) for key, values in final.items()}


def plot(rows: list[Row], args: GymArgs, path: Path) -> None:
    """Rows = envs. Columns: one per behaviour, final regret ratio against episodes (colour = method, line
    style = model; the behaviour policy's own ratio dotted); last column, regret ratio against training
    steps on the largest dataset of the first behaviour."""
    from matplotlib.figure import Figure

    final = _final(rows)
    behaviour_ratio = {(r.env, r.behaviour): r.behaviour_ratio for r in rows}
    colors = {m: f"C{i}" for i, m in enumerate(EPISODE_METHODS)}
    styles = {"table": "-", "mlp": "--"}
    columns = len(args.behaviours) + 1
    fig = Figure(figsize=(3.7 * columns, 2.8 * len(args.envs) + 0.7), layout="constrained")
    axes = fig.subplots(len(args.envs), columns, squeeze=False)
    sizes = np.array(sorted(args.episodes))
    largest, first = int(sizes[-1]), args.behaviours[0]
    for i, env_name in enumerate(args.envs):
        for j, behaviour in enumerate(args.behaviours):
            ax = axes[i, j]
            for approx in args.approximations:
                for method in args.methods:
                    values = np.stack([final[env_name, approx, behaviour, n, method] for n in sizes])  # (sizes, seeds)
                    ax.plot(sizes, values.mean(1), styles[approx], color=colors[method], marker="o", ms=3, label=f"{method} ({approx})")
                    ax.fill_between(sizes, values.min(1), values.max(1), color=colors[method], alpha=0.08, lw=0)
            identified = np.array([np.mean(values) for values in (
                [r.identified_ratio for r in rows if (r.env, r.behaviour, r.episodes, r.step) == (env_name, behaviour, n, 0)
                 and (r.approx, r.method) == (args.approximations[0], args.methods[0])] for n in sizes)])
            ax.plot(sizes, identified, color="k", ls="-.", lw=1.0, label="π* where the data try every action, π_ref elsewhere")
            ax.axhline(behaviour_ratio[env_name, behaviour], color="0.4", ls=":", lw=1.2, label="behaviour policy")
            ax.axhline(1.0, color="0.7", lw=0.8)
            ax.set(xscale="log", yscale="log", title=f"{env_name} (β = {ENV_SPECS[env_name][0]:g}), {behaviour} data")
            ax.set_xlabel("episodes in the dataset" if i == len(args.envs) - 1 else "")
        ax = axes[i, -1]
        for approx in args.approximations:
            for method in args.methods:
                curve: dict[int, list[float]] = {}
                for r in rows:
                    if (r.env, r.approx, r.behaviour, r.episodes, r.method) == (env_name, approx, first, largest, method):
                        curve.setdefault(r.step, []).append(r.regret_ratio)
                steps = sorted(curve)
                ax.plot(steps, [np.mean(curve[k]) for k in steps], styles[approx], color=colors[method])
        ax.axhline(1.0, color="0.7", lw=0.8)
        ax.set(yscale="log", title=f"training: {largest} {first} episodes")
        ax.set_xlabel("Adam step" if i == len(args.envs) - 1 else "")
        axes[i, 0].set_ylabel("regret / regret of π_ref")
        for ax in axes[i]:
            ax.title.set_fontsize(9)
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(
        f"offline ShiQ on deterministic gymnasium MDPs, γ = {args.gamma}: exact regret after {args.steps} full-batch Adam steps "
        f"(mean, min–max over {args.seeds} seeds)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)


def main(args: GymArgs) -> dict:
    """Run the experiment, write gym.csv, gym.png and gym_summary.json into ``args.out``; returns the summary."""
    if args.quick:  # the preset changes the fields still at their defaults (the command line applies it itself)
        args = apply_preset(args, QUICK)
    args.out.mkdir(parents=True, exist_ok=True)  # before the work: an unusable OUT fails at once
    start = time.perf_counter()
    with num_threads(args.threads):
        rows = run(args)
        write_csv(args.out / "gym.csv", CSV_HEADER, rows)
        plot(rows, args, args.out / "gym.png")
    final = _final(rows)
    coverage: dict[tuple, list[float]] = {}
    identified: dict[tuple, list[float]] = {}
    for r in rows:  # one value per dataset (seed): the rows of the first method and model at step 0
        if r.method == args.methods[0] and r.approx == args.approximations[0] and r.step == 0:
            coverage.setdefault((r.env, r.behaviour, r.episodes), []).append(r.coverage)
            identified.setdefault((r.env, r.behaviour, r.episodes), []).append(r.identified_ratio)
    loss_ratio: dict[tuple, list[float]] = {}
    first_loss = {(r[:6]): r.loss for r in rows if r.step == 0}
    last_step = max(r.step for r in rows)
    for r in rows:
        if r.step == last_step and first_loss[r[:6]] > 0:
            loss_ratio.setdefault(r[:5], []).append(r.loss / first_loss[r[:6]])
    summary = {
        "betas": {name: ENV_SPECS[name][0] for name in args.envs},
        "final_loss_over_initial_loss": {"/".join(map(str, key)): float(np.mean(values)) for key, values in loss_ratio.items()},
        "final_regret_ratio": {"/".join(map(str, key)): float(values.mean()) for key, values in final.items()},
        "coverage": {"/".join(map(str, key)): float(np.mean(values)) for key, values in coverage.items()},
        "identified_regret_ratio": {"/".join(map(str, key)): float(np.mean(values)) for key, values in identified.items()},
        "seconds": time.perf_counter() - start,
    }
    return write_summary(args.out / "gym_summary.json", args, summary)
