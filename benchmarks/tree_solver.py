"""Benchmark of ``shiq_toy.solvers.solve_tree`` (level-vectorised backward induction), one process.

(a) speed-up over two per-node solvers (Python floats; torch ops per node) on a V=8, H=6 tree (37,449 states);
(b) time per state of ``solve_tree`` on random V=10 trees, H=3..8: 111 to 1.1e7 (non-terminal) states.

    python -m benchmarks.tree_solver                 # from the repository root; one torch thread, ~1 minute, 4.7 GiB
    python -m benchmarks.tree_solver --threads 2 --max-horizon 7   # (python benchmarks/tree_solver.py once installed)

At 10^7 states the output tables are 0.9 GiB each and first-touch page faults ("sys" time) are a large part
of the cost; PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for big CPU tensors) cuts them.
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


def best_time(fn, repeats: int) -> tuple[float, float]:
    """Smallest (wall, process CPU) seconds of ``repeats`` calls; CPU time is immune to other processes."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far; system time is mostly page faults of fresh memory."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def speedup(beta: float, gamma: float) -> None:
    tree = random_tree(8, 6, generator=torch.Generator().manual_seed(0), reward="dense")
    ref_levels, reward_levels = [x.tolist() for x in tree.ref_logits], [x.tolist() for x in tree.rewards]
    timings = {
        "solve_tree (vectorised by level)": best_time(lambda: solve_tree(tree, beta=beta, gamma=gamma), repeats=20),
        "per-node loop, Python floats": best_time(
            lambda: per_node_python(ref_levels, reward_levels, beta=beta, gamma=gamma), repeats=2
        ),
        "per-node loop, torch ops per node": best_time(lambda: per_node_torch(tree, beta=beta, gamma=gamma), repeats=1),
    }
    fast = solve_tree(tree, beta=beta, gamma=gamma)
    slow = per_node_python(ref_levels, reward_levels, beta=beta, gamma=gamma)
    err = max(float((fast.v[h] - torch.tensor(slow[1][h], dtype=torch.float64)).abs().max()) for h in range(tree.horizon))
    print(f"(a) V=8, H=6 tree, {tree.num_states:,} states, dense rewards, beta={beta}, gamma={gamma}")
    print(f"    {'method':<36} {'wall ms':>9} {'cpu ms':>9}   speed-up of solve_tree (wall, cpu)")
    wall_fast, cpu_fast = timings["solve_tree (vectorised by level)"]
    for name, (wall, cpu) in timings.items():
        ratio = "" if wall == wall_fast else f"   x{wall / wall_fast:,.0f}, x{cpu / cpu_fast:,.0f}"
        print(f"    {name:<36} {wall * 1e3:>9.2f} {cpu * 1e3:>9.2f}{ratio}")
    print(f"    max |v_fast - v_per_node| = {err:.1e}")


def scaling(vocab: int, horizons: range, beta: float, gamma: float) -> None:
    print(f"\n(b) solve_tree on random V={vocab} trees (terminal reward); wall time is the best of the repeats,")
    print("    user/sys are CPU seconds per call (sys: page faults on the freshly allocated output tables);")
    print("    cpu ns/state = (user + sys) / states does not depend on other processes sharing the cores")
    print(f"    {'H':>2} {'states':>12} {'(s, a) pairs':>14} {'wall (s)':>9} {'ns/state':>9} {'cpu ns/state':>13} {'user s':>7} {'sys s':>7}")
    for horizon in horizons:
        tree = random_tree(vocab, horizon, generator=torch.Generator().manual_seed(horizon))
        repeats = 20 if tree.num_states < 10**5 else 3 if tree.num_states < 10**7 else 2
        user, system = cpu_seconds()
        seconds, _ = best_time(lambda tree=tree: solve_tree(tree, beta=beta, gamma=gamma), repeats=repeats)
        user, system = [(after - before) / repeats for after, before in zip(cpu_seconds(), (user, system))]
        states, pairs = tree.num_states, tree.num_states * vocab
        print(
            f"    {horizon:>2} {states:>12,} {pairs:>14,} {seconds:>9.4f} {seconds / states * 1e9:>9.1f}"
            f" {(user + system) / states * 1e9:>13.1f} {user:>7.3f} {system:>7.3f}"
        )
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
