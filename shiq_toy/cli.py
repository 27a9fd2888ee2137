"""``shiq-toy``: the toy experiments and the exact solver from the command line.

    shiq-toy bandit --out figures/        # three-armed bandit regret figure (seconds on a CPU)
    shiq-toy tree --out figures/          # token-tree ablation of the ShiQ variants
    shiq-toy gym --out figures/           # Q1: offline ShiQ on deterministic gymnasium MDPs (--quick: < 3 min)
    shiq-toy online --out figures/        # Q2: offline data mixed with fresh samples of the current policy
    shiq-toy misspecified --out figures/  # Q3: over-optimisation of a flawed (proxy) reward
    shiq-toy solve-tree --vocab-size 2 --horizon 3 --beta 0.5   # print the exact solution of a random tree
    shiq-toy verify my_module:my_shiq --as shiq                 # check your own loss against the spec

Every option of every command is listed, with its default, by ``shiq-toy COMMAND --help``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from shiq_toy.experiments import args_from_namespace, num_threads

__all__ = ["build_parser", "main"]


def _add_solve_tree(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-size", type=int, default=2, help="V, tokens per node (default: 2)")
    parser.add_argument("--horizon", type=int, default=3, help="H, tokens per sequence (default: 3)")
    parser.add_argument("--beta", type=float, default=1.0, help="KL regularisation β (default: 1.0)")
    parser.add_argument("--gamma", type=float, default=1.0, help="discount γ in (0, 1] (default: 1.0)")
    parser.add_argument("--reward", choices=("terminal", "dense"), default="terminal", help="reward on the last token only, or on every token (default: terminal)")
    parser.add_argument("--ref-scale", type=float, default=1.0, help="reference logits ~ ref_scale · N(0, 1) (default: 1.0)")
    parser.add_argument("--reward-scale", type=float, default=1.0, help="rewards ~ reward_scale · N(0, 1) (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tree (default: 0)")
    parser.add_argument("--max-rows", type=int, default=40, help="print at most this many states, level by level (default: 40)")


def build_parser() -> argparse.ArgumentParser:
    """The ``shiq-toy`` parser with its subcommands."""
    from shiq_toy.experiments import bandit, gym, misspecified, online, tree

    parser = argparse.ArgumentParser(prog="shiq-toy", description="ShiQ toy experiments and the exact solver (shiq_toy).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter  # the experiment's docstring: set-up, outputs, expectations
    bandit.build_parser(
        commands.add_parser("bandit", help="three-armed bandit regret figure (offline and online)", description=bandit.__doc__, formatter_class=raw)
    )
    tree.build_parser(commands.add_parser("tree", help="token-tree ablation of the ShiQ variants", description=tree.__doc__, formatter_class=raw))
    gym.build_parser(commands.add_parser("gym", help="Q1: offline ShiQ on deterministic gymnasium MDPs", description=gym.__doc__, formatter_class=raw))
    online.build_parser(commands.add_parser("online", help="Q2: offline data mixed with fresh on-policy samples", description=online.__doc__, formatter_class=raw))
    misspecified.build_parser(
        commands.add_parser("misspecified", help="Q3: over-optimisation of a flawed reward", description=misspecified.__doc__, formatter_class=raw)
    )
    _add_solve_tree(
        commands.add_parser(
            "solve-tree",
            help="print the exact soft-optimal solution of a small random tree",
            description="Backward induction on a random token tree: v*, π* and q* of every state (spec §1).",
        )
    )
    verify_parser = commands.add_parser(
        "verify",
        help="check your own residual or loss against the spec (shiq_toy.testing)",
        description=_VERIFY_DESCRIPTION,
        formatter_class=raw,
    )
    _add_verify(verify_parser)
    return parser


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


def _add_verify(parser: argparse.ArgumentParser) -> None:
    from shiq_toy.testing.properties import PROPERTIES, VARIANTS

    parser.add_argument("target", metavar="MODULE:FUNCTION", help="the function to check: an importable module (the current directory is on the path) or a path/to/file.py, a colon, and the function's name")
    parser.add_argument("--as", dest="variant", required=True, choices=VARIANTS, metavar="VARIANT", help=f"which loss it claims to be: {', '.join(VARIANTS)}")
    parser.add_argument("--numpy", action="store_true", help="the function takes NumPy arrays (shiq_toy.testing.adapters.from_numpy); gradient checks are skipped")
    parser.add_argument("--examples", type=int, default=40, help="hypothesis examples per property (default: 40; the gradient check uses at most 10)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: 0)")
    parser.add_argument("--no-shrink", action="store_true", help="report the first failing example found instead of shrinking it to the smallest (faster)")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: 1e-8 for float64 output, 1e-4 for float32)")
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: as --rtol)")
    parser.add_argument("--properties", default=",".join(PROPERTIES), help=f"comma-separated subset of {','.join(PROPERTIES)} (default: all)")


def _load_target(target: str):
    """``module:function`` or ``path/to/file.py:function`` -> the callable."""
    import importlib
    import importlib.util
    import os
    from pathlib import Path

    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target {target!r} must be MODULE:FUNCTION (e.g. my_losses:shiq or path/to/file.py:shiq)")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like python -m: modules of the current directory are importable
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ValueError(f"cannot import module {module_name!r}: {error}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{target} is a {type(fn).__name__}, not a function")
    return fn


def _verify(ns: argparse.Namespace) -> int:
    from shiq_toy.testing.adapters import from_numpy

    try:
        from shiq_toy.testing.oracle import verify
    except ModuleNotFoundError as error:
        if error.name != "hypothesis":
            raise
        raise ValueError('verify needs hypothesis: pip install "shiq[testing]"') from None

    fn = _load_target(ns.target)
    if ns.numpy:
        fn = from_numpy(fn)
    properties = tuple(p.strip() for p in ns.properties.split(",") if p.strip())
    report = verify(fn, ns.variant, max_examples=ns.examples, seed=ns.seed, rtol=ns.rtol, atol=ns.atol, properties=properties, shrink=not ns.no_shrink, target=ns.target)
    print(report.table())
    return 0 if report.ok else 1


def _solve_tree(ns: argparse.Namespace) -> None:
    from shiq_toy.mdp import all_sequences, random_tree
    from shiq_toy.solvers import solve_tree

    if ns.vocab_size < 1 or ns.horizon < 1 or ns.max_rows < 0:
        raise ValueError("--vocab-size and --horizon must be >= 1 and --max-rows >= 0")
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


def _report(name: str, out, summary: dict) -> None:
    """The files an experiment wrote (``NAME.csv``, ``NAME.png``, ``NAME_summary.json``) and its run time."""
    print(f"wrote {out / (name + '.csv')}, {out / (name + '.png')}, {out / (name + '_summary.json')} in {summary['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Run ``shiq-toy``; returns the exit code (0 success, 1 a property of ``verify`` failed, 2 bad arguments or input)."""
    from shiq_toy.experiments import bandit, gym, misspecified, online, tree

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "bandit":
            summary = bandit.main(args_from_namespace(bandit.BanditArgs, ns))
            out = ns.out
            print(f"wrote {out / 'bandit_regret.png'}, {out / 'bandit_regret.csv'}, {out / 'bandit_summary.json'} in {summary['seconds']:.1f} s")
            print(f"regret of π_ref: {summary['reference_regret']:.4g}")
            for name, final in summary["final_regret"].items():
                print(f"  {name:<20} final regret {final['mean']:.3e}  ({final['mean'] / summary['reference_regret']:.2%} of π_ref's)")
        elif ns.command == "tree":
            summary = tree.main(args_from_namespace(tree.TreeArgs, ns))
            out = ns.out
            print(f"wrote {out / 'tree_ablation.png'}, {out / 'tree_ablation.csv'}, {out / 'tree_summary.json'} in {summary['seconds']:.1f} s")
            for name, result in summary["methods"].items():
                print(f"  {name:<10} KL {result['initial_kl']:.3e} -> {result['final_kl']:.3e}   initial loss {result['initial_loss']:.3g}")
        elif ns.command == "gym":
            summary = gym.main(args_from_namespace(gym.GymArgs, ns))
            _report("gym", ns.out, summary)
            for key, ratio in summary["final_regret_ratio"].items():
                print(f"  {key:<45} regret / regret of π_ref {ratio:.3f}")
        elif ns.command == "online":
            summary = online.main(args_from_namespace(online.OnlineArgs, ns))
            _report("online", ns.out, summary)
            print(f"π* mass on the offline paths: {summary['offline_coverage_of_pi_star']:.3f}")
            for key, result in summary["settings"].items():
                print(f"  {key:<20} regret {result['initial_regret']:.3g} -> {result['final_regret']:.3g} with {result['reward_queries']} reward queries")
        elif ns.command == "misspecified":
            summary = misspecified.main(args_from_namespace(misspecified.MisspecifiedArgs, ns))
            _report("misspecified", ns.out, summary)
            for key, result in summary["runs"].items():
                print(f"  {key:<28} KL {result['final_kl']:.3f}  true reward {result['final_true_reward']:.3f} (peak {result['peak_true_reward']:.3f} at KL {result['kl_at_peak']:.3f})")
        elif ns.command == "verify":
            with num_threads(1):
                return _verify(ns)
        else:
            with num_threads(1):
                _solve_tree(ns)
    except ValueError as error:
        print(f"shiq-toy {ns.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
