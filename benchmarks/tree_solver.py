"""Benchmark of ``shiq_toy.solvers.solve_tree`` (level-vectorised backward induction).

(a) speed-up over per-node Python solvers on a V=8, H=6 tree (37,449 states), measured in this process;
(b) time per state of ``solve_tree`` on random trees of 10^3 to 10^7 states (V=10, H=4..8).

    python -m benchmarks.tree_solver                 # from the repository root; one torch thread, ~1 minute
    python -m benchmarks.tree_solver --threads 2 --max-horizon 7   # (or python benchmarks/tree_solver.py once installed)
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from shiq_toy.mdp import TokenTree, random_tree
from shiq_toy.solvers import solve_tree


def per_node_python(ref_levels, reward_levels, *, beta: float, gamma: float):
    """Baseline 1: backward induction one node at a time, on Python floats (``math``), levels as nested lists."""
    horizon, vocab = len(ref_levels), len(ref_levels[0][0])
    q, v, policy, logits = [None] * horizon, [None] * horizon, [None] * horizon, [None] * horizon
    for h in reversed(range(horizon)):
        q[h], v[h], policy[h], logits[h] = [], [], [], []
        for n in range(vocab**h):
            ref_row, r_row = ref_levels[h][n], reward_levels[h][n]
            q_row = [r_row[a] + (gamma * v[h + 1][n * vocab + a] if h + 1 < horizon else 0.0) for a in range(vocab)]
            l_row = [ref_row[a] + q_row[a] / beta for a in range(vocab)]
            top_l, top_ref = max(l_row), max(ref_row)
            lse = top_l + math.log(sum(math.exp(x - top_l) for x in l_row))
            lse_ref = top_ref + math.log(sum(math.exp(x - top_ref) for x in ref_row))
            q[h].append(q_row)
            v[h].append(beta * (lse - lse_ref))
            policy[h].append([math.exp(x - lse) for x in l_row])
            logits[h].append(l_row)
    return q, v, policy, logits


def per_node_torch(tree: TokenTree, *, beta: float, gamma: float):
    """Baseline 2: the same loop over nodes, with torch ops on each node's (V,) row."""
    horizon, vocab = tree.horizon, tree.vocab_size
    v = [torch.zeros(vocab**h, dtype=torch.float64) for h in range(horizon)]
    q = [torch.zeros(vocab**h, vocab, dtype=torch.float64) for h in range(horizon)]
    policy = [torch.zeros_like(x) for x in q]
    logits = [torch.zeros_like(x) for x in q]
    for h in reversed(range(horizon)):
        for n in range(vocab**h):
            q_row = tree.rewards[h][n]
            if h + 1 < horizon:
                q_row = q_row + gamma * v[h + 1][n * vocab : (n + 1) * vocab]
            l_row = tree.ref_logits[h][n] + q_row / beta
            lse = torch.logsumexp(l_row, 0)
            q[h][n], logits[h][n], policy[h][n] = q_row, l_row, torch.exp(l_row - lse)
            v[h][n] = beta * (lse - torch.logsumexp(tree.ref_logits[h][n], 0))
    return q, v, policy, logits


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def speedup(beta: float, gamma: float) -> None:
    tree = random_tree(8, 6, generator=torch.Generator().manual_seed(0), reward="dense")
    ref_levels, reward_levels = [x.tolist() for x in tree.ref_logits], [x.tolist() for x in tree.rewards]
    t_fast = best_time(lambda: solve_tree(tree, beta=beta, gamma=gamma), repeats=20)
    t_python = best_time(lambda: per_node_python(ref_levels, reward_levels, beta=beta, gamma=gamma), repeats=2)
    t_torch = best_time(lambda: per_node_torch(tree, beta=beta, gamma=gamma), repeats=1)
    fast = solve_tree(tree, beta=beta, gamma=gamma)
    slow = per_node_python(ref_levels, reward_levels, beta=beta, gamma=gamma)
    err = max(float((fast.v[h] - torch.tensor(slow[1][h], dtype=torch.float64)).abs().max()) for h in range(tree.horizon))
    print(f"(a) V=8, H=6 tree, {tree.num_states:,} states, dense rewards, beta={beta}, gamma={gamma}")
    print(f"    solve_tree (vectorised by level)     {t_fast * 1e3:10.2f} ms")
    print(f"    per-node loop, Python floats         {t_python * 1e3:10.2f} ms   speed-up x{t_python / t_fast:,.0f}")
    print(f"    per-node loop, torch ops per node    {t_torch * 1e3:10.2f} ms   speed-up x{t_torch / t_fast:,.0f}")
    print(f"    max |v_fast - v_per_node| = {err:.1e}")


def scaling(vocab: int, horizons: range, beta: float, gamma: float) -> None:
    print(f"\n(b) solve_tree on random V={vocab} trees (terminal reward), best of repeats")
    print(f"    {'H':>2} {'states':>12} {'(s, a) pairs':>14} {'time (s)':>10} {'ns / state':>11}")
    for horizon in horizons:
        tree = random_tree(vocab, horizon, generator=torch.Generator().manual_seed(horizon))
        repeats = 20 if tree.num_states < 10**5 else 3 if tree.num_states < 10**7 else 2
        seconds = best_time(lambda: solve_tree(tree, beta=beta, gamma=gamma), repeats=repeats)
        pairs = tree.num_states * vocab
        print(f"    {horizon:>2} {tree.num_states:>12,} {pairs:>14,} {seconds:>10.4f} {seconds / tree.num_states * 1e9:>11.1f}")
        del tree
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(f"    peak resident memory of this process: {peak_gib:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--vocab", type=int, default=10, help="V of the scaling trees (default 10)")
    parser.add_argument("--min-horizon", type=int, default=3, help="smallest H of the scaling trees (default 3)")
    parser.add_argument("--max-horizon", type=int, default=8, help="largest H (default 8: 1.1e7 states with V=10)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--gamma", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64")
    speedup(args.beta, args.gamma)
    scaling(args.vocab, range(args.min_horizon, args.max_horizon + 1), args.beta, args.gamma)


if __name__ == "__main__":
    main()
