"""``shiq-toy``: the toy experiments and the exact solver from the command line.

    shiq-toy bandit --out figures/        # three-armed bandit regret figure (seconds on a CPU)
    shiq-toy tree --out figures/          # token-tree ablation of the ShiQ variants
    shiq-toy gym --out figures/           # Q1: offline ShiQ on deterministic gymnasium MDPs (--quick: < 3 min)
    shiq-toy online --out figures/        # Q2: offline data mixed with fresh samples of the current policy
    shiq-toy misspecified --out figures/  # Q3: over-optimisation of a flawed (proxy) reward
    shiq-toy solve-tree --vocab-size 2 --horizon 3 --beta 0.5   # print the exact solution of a random tree
    shiq-toy verify my_module:my_shiq --as shiq                 # check your own loss against the spec

Every option of every command is listed, with its default, by ``shiq-toy COMMAND --help``. Each command is a
dataclass of options parsed by :mod:`shiq_toy.options` (the dialect ``shiq-llm`` shares): ``--config FILE.yaml``,
both spellings of every option, ``--quick`` under explicit options, paths checked before any work.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from shiq_toy.experiments import num_threads
from shiq_toy.options import Command, load_callable, option, run_cli

__all__ = ["SolveTreeArgs", "VerifyArgs", "commands", "main"]


@dataclass
class SolveTreeArgs:
    """Options of ``shiq-toy solve-tree``."""

    vocab_size: int = option(2, "V, tokens per node")
    horizon: int = option(3, "H, tokens per sequence")
    beta: float = option(1.0, "KL regularisation β")
    gamma: float = option(1.0, "discount γ in (0, 1]")
    reward: str = option("terminal", "reward on the last token only, or on every token", choices=("terminal", "dense"))
    ref_scale: float = option(1.0, "reference logits ~ ref_scale · N(0, 1)")
    reward_scale: float = option(1.0, "rewards ~ reward_scale · N(0, 1)")
    seed: int = option(0, "seed of the random tree")
    max_rows: int = option(40, "print at most this many states, level by level")


@dataclass
class VerifyArgs:
    """Options of ``shiq-toy verify`` (``target`` may be given first, without ``--target``)."""

    target: str = option(help="the function to check: an importable module (the current directory is on the path) "
                         "or a path/to/file.py, a colon, and the function's name", metavar="MODULE:FUNCTION")
    variant: str = option(help="which loss it claims to be (shiq_toy.testing.properties.VARIANTS)", aliases=("as",))
    numpy: bool = option(False, "the function takes NumPy arrays (shiq_toy.testing.adapters.from_numpy); gradient "
                         "checks are skipped")
    examples: int = option(40, "hypothesis examples per property (the gradient check uses at most 10)")
    seed: int = option(0, "hypothesis seed")
    shrink: bool = option(True, "shrink a failing example to the smallest (--no-shrink: report the first found, faster)")
    rtol: float | None = option(None, "relative tolerance (default: 1e-8 for float64 output, 1e-4 for float32)")
    atol: float | None = option(None, "absolute tolerance (default: as --rtol)")
    properties: str = option("", "comma-separated subset of the properties (shiq_toy.testing.properties.PROPERTIES; "
                             "empty: all)")


_VERIFY_DESCRIPTION = """Run the property battery of shiq_toy.testing.oracle on FUNCTION and print property → pass / FAIL / n/a,
with the smallest counterexample hypothesis finds for each failure. Exit status 0 only when every property passes.

Signatures (like shiq_toy.losses.RESIDUALS and shiq_toy.baselines):
  shiq, shiq_init, shiq_ms, shiq_tk, shifted_q, logit_q:
      fn(policy: TokenStats, ref: TokenStats, rewards (B, T), mask (B, T) bool, *, beta, gamma)
      -> (B, T) per-token residuals (0 where masked out) or (B,) per-sequence losses Σ_t residual²
      (logit_q also gets soft_value=(B, T)); TokenStats = (logit_taken, logsumexp), each (B, T)
  dpo:  fn(log_ratio_chosen (P,), log_ratio_rejected (P,), *, beta) -> (P,)
  copg: fn(log_ratio_a, log_ratio_b, reward_a, reward_b, *, beta) -> (P,)
  dro:  fn(log_ratio (B,), reward (B,), value (B,), *, beta) -> (B,)
With --numpy the function receives NumPy arrays (TokenStats of arrays) instead of torch tensors."""


def _check_verify(args: VerifyArgs) -> None:
    from shiq_toy.testing.properties import PROPERTIES

    unknown = [p.strip() for p in args.properties.split(",") if p.strip() and p.strip() not in PROPERTIES]
    if unknown:
        raise ValueError(f"option --properties: unknown property {unknown[0]!r}; one of {', '.join(PROPERTIES)}")
    if args.examples < 1:
        raise ValueError(f"option --examples must be >= 1, got {args.examples}")
    load_callable(args.target, what="target")


def _verify(ns: VerifyArgs) -> int:
    from shiq_toy.testing.adapters import from_numpy
    from shiq_toy.testing.properties import PROPERTIES

    try:
        from shiq_toy.testing.oracle import verify
    except ModuleNotFoundError as error:
        if error.name != "hypothesis":
            raise
        raise ValueError('verify needs hypothesis: pip install "shiq[testing]"') from None

    fn = load_callable(ns.target, what="target")
    if ns.numpy:
        fn = from_numpy(fn)
    properties = tuple(p.strip() for p in ns.properties.split(",") if p.strip())
    with num_threads(1):
        report = verify(fn, ns.variant, max_examples=ns.examples, seed=ns.seed, rtol=ns.rtol, atol=ns.atol,
                        properties=properties or PROPERTIES, shrink=ns.shrink, target=ns.target)
    print(report.table())
    return 0 if report.ok else 1


def _check_solve_tree(ns: SolveTreeArgs) -> None:
    if ns.vocab_size < 1 or ns.horizon < 1 or ns.max_rows < 0:
        raise ValueError("--vocab-size and --horizon must be >= 1 and --max-rows >= 0")


def _solve_tree_run(ns: SolveTreeArgs) -> None:
    from shiq_toy.mdp import all_sequences, random_tree
    from shiq_toy.solvers import solve_tree

    tree = random_tree(
        ns.vocab_size, ns.horizon, generator=torch.Generator().manual_seed(ns.seed), reward=ns.reward,
        ref_scale=ns.ref_scale, reward_scale=ns.reward_scale,
    )
    solution = solve_tree(tree, beta=ns.beta, gamma=ns.gamma)
    vocab = ns.vocab_size
    print(f"random tree: V={vocab}, H={ns.horizon}, {ns.reward} reward, β={ns.beta}, γ={ns.gamma}, seed {ns.seed}: {tree.num_states} states")
    print(f"v*(root) = {solution.v[0][0].item():.6f}")
    if ns.reward == "terminal" and ns.gamma == 1.0:  # closed form: v*(root) = β ln E_{y ~ π_ref}[exp(R(y)/β)]
        ref_policy = [torch.softmax(x, -1) for x in tree.ref_logits]
        from shiq_toy.data import path_probability

        paths = all_sequences(vocab, ns.horizon)
        returns = tree.rewards[-1].flatten()  # leaf order = path order
        check = ns.beta * torch.logsumexp(path_probability(ref_policy, paths).log() + returns / ns.beta, 0)
        print(f"check: β ln E_π_ref[exp(R/β)] = {check.item():.6f} (enumeration of {len(paths)} paths)")
    width = max(8, 7 * vocab)
    print(f"{'depth':>5}  {'prefix':<{2 * ns.horizon + 2}} {'v*(s)':>10}  {'π*(·|s)':<{width}} {'q*(s,·)':<{width}}")
    rows = 0
    for h in range(ns.horizon):
        for s in range(vocab**h):
            if rows == ns.max_rows:
                print(f"… ({tree.num_states - rows} more states; raise --max-rows)")
                return
            prefix = "".join(str((s // vocab ** (h - 1 - i)) % vocab) for i in range(h)) or "∅"
            policy = " ".join(f"{p:.3f}" for p in solution.policy[h][s].tolist())
            q = " ".join(f"{x:+.3f}" for x in solution.q[h][s].tolist())
            print(f"{h:>5}  {prefix:<{2 * ns.horizon + 2}} {solution.v[h][s].item():>10.4f}  {policy:<{width}} {q:<{width}}")
            rows += 1


def _solve_tree(ns: SolveTreeArgs) -> int:
    with num_threads(1):
        _solve_tree_run(ns)
    return 0


def _report(name: str, out: Path, summary: dict) -> None:
    """The files an experiment wrote (``NAME.csv``, ``NAME.png``, ``NAME_summary.json``) and its run time."""
    print(f"wrote {out / (name + '.csv')}, {out / (name + '.png')}, {out / (name + '_summary.json')} in {summary['seconds']:.1f} s")


def _bandit(args) -> int:
    from shiq_toy.experiments import bandit

    summary = bandit.main(args)
    out = args.out
    print(f"wrote {out / 'bandit_regret.png'}, {out / 'bandit_regret.csv'}, {out / 'bandit_summary.json'} in {summary['seconds']:.1f} s")
    print(f"regret of π_ref: {summary['reference_regret']:.4g}")
    for name, final in summary["final_regret"].items():
        print(f"  {name:<20} final regret {final['mean']:.3e}  ({final['mean'] / summary['reference_regret']:.2%} of π_ref's)")
    return 0


def _tree(args) -> int:
    from shiq_toy.experiments import tree

    summary = tree.main(args)
    out = args.out
    print(f"wrote {out / 'tree_ablation.png'}, {out / 'tree_ablation.csv'}, {out / 'tree_summary.json'} in {summary['seconds']:.1f} s")
    for name, result in summary["methods"].items():
        print(f"  {name:<10} KL {result['initial_kl']:.3e} -> {result['final_kl']:.3e}   initial loss {result['initial_loss']:.3g}")
    return 0


def _gym(args) -> int:
    from shiq_toy.experiments import gym

    summary = gym.main(args)
    _report("gym", args.out, summary)
    for key, ratio in summary["final_regret_ratio"].items():
        print(f"  {key:<45} regret / regret of π_ref {ratio:.3f}")
    return 0


def _online(args) -> int:
    from shiq_toy.experiments import online

    summary = online.main(args)
    _report("online", args.out, summary)
    print(f"π* mass on the offline paths: {summary['offline_coverage_of_pi_star']:.3f}")
    for key, result in summary["settings"].items():
        print(f"  {key:<20} regret {result['initial_regret']:.3g} -> {result['final_regret']:.3g} with {result['reward_queries']} reward queries")
    return 0


def _misspecified(args) -> int:
    from shiq_toy.experiments import misspecified

    summary = misspecified.main(args)
    _report("misspecified", args.out, summary)
    for key, result in summary["runs"].items():
        print(f"  {key:<28} KL {result['final_kl']:.3f}  true reward {result['final_true_reward']:.3f} (peak {result['peak_true_reward']:.3f} at KL {result['kl_at_peak']:.3f})")
    return 0


@functools.cache
def commands() -> dict[str, Command]:
    """Every ``shiq-toy`` command, by name."""
    from shiq_toy.experiments import bandit, gym, misspecified, online, tree
    from shiq_toy.testing.properties import VARIANTS
    from shiq_toy.train import OPTIMIZERS

    online_methods = online.ONLINE_METHODS
    return {
        "bandit": Command("bandit", (bandit.BanditArgs,), _bandit, help="three-armed bandit regret figure (offline and online)",
                          description=bandit.__doc__, check=bandit.check_args,
                          choices={"methods": bandit.METHODS, "settings": bandit.SETTINGS, "pair_mode": ("disjoint", "all")}),
        "tree": Command("tree", (tree.TreeArgs,), _tree, help="token-tree ablation of the ShiQ variants", description=tree.__doc__,
                        check=tree.check_args, choices={"methods": tuple(tree.LOSSES), "optimizer": tuple(OPTIMIZERS)}),
        "gym": Command("gym", (gym.GymArgs,), _gym, help="Q1: offline ShiQ on deterministic gymnasium MDPs", description=gym.__doc__,
                       quick=gym.QUICK, check=gym.check_args,
                       choices={"envs": tuple(gym.ENV_SPECS), "behaviours": gym.BEHAVIOURS, "methods": gym.EPISODE_METHODS,
                                "approximations": gym.APPROXIMATIONS}),
        "online": Command("online", (online.OnlineArgs,), _online, help="Q2: offline data mixed with fresh on-policy samples",
                          description=online.__doc__, quick=online.QUICK, check=online.check_args,
                          choices={"data": tuple(online.DATA), "methods": online_methods}),
        "misspecified": Command("misspecified", (misspecified.MisspecifiedArgs,), _misspecified,
                                help="Q3: over-optimisation of a flawed reward", description=misspecified.__doc__,
                                quick=misspecified.QUICK, check=misspecified.check_args,
                                choices={"methods": misspecified.METHODS}),
        "solve-tree": Command("solve-tree", (SolveTreeArgs,), _solve_tree, check=_check_solve_tree,
                              help="print the exact soft-optimal solution of a small random tree",
                              description="Backward induction on a random token tree: v*, π* and q* of every state (spec §1)."),
        "verify": Command("verify", (VerifyArgs,), _verify, help="check your own residual or loss against the spec (shiq_toy.testing)",
                          description=_VERIFY_DESCRIPTION, check=_check_verify, positional="target",
                          choices={"variant": VARIANTS}),
    }


def main(argv: list[str] | None = None) -> int:
    """Run ``shiq-toy``; returns the exit code (0 success, 1 a property of ``verify`` failed, 2 bad arguments or input)."""
    return run_cli("shiq-toy", commands(), argv, description="ShiQ toy experiments and the exact solver (shiq_toy).",
                   runtime_status=2, error_prefix=lambda name: f"shiq-toy {name}")


if __name__ == "__main__":
    sys.exit(main())
