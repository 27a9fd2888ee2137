"""The token-tree ablation on a reduced budget: initial losses in closed form, and the ordering it shows."""

from __future__ import annotations

import math

import pytest
import torch

from shiq_toy.experiments.tree import TreeArgs, _steps_to, run
from shiq_toy.mdp import all_sequences, random_tree
from shiq_toy.metrics import expected_kl
from shiq_toy.solvers import solve_tree


def _node(prefix, vocab):
    node = 0
    for a in prefix:
        node = node * vocab + a
    return node


def test_initial_kl_and_losses_in_closed_form():
    """At ℓ = ℓ_ref (ρ ≡ 0, vℓ = vref) with a terminal return R(y), γ = 1, each sequence's Σ_t residual² is
    shiq: Σ_t (−R)² = H R²;  shiq_ms: only the last token, R²;  shiq_tk: the first token, R²;
    shiq_init: Σ_t (β vref(s_t) − R)²;  shifted_q: Σ_t (β vref(s_t) − r_t − β vref(s_{t+1}))², vref(s_H) = 0.
    The data weights are the π_ref path probabilities; the loss is their weighted sum (loops below)."""
    args = TreeArgs(trees=2, steps=1, eval_every=1, vocab_size=2, horizon=3)
    results = run(args)
    for c in range(args.trees):
        tree = random_tree(2, 3, generator=torch.Generator().manual_seed(args.seed + c), reward="terminal")
        ref_policy = [torch.softmax(x, -1) for x in tree.ref_logits]
        vref = [torch.logsumexp(x, -1) for x in tree.ref_logits]
        expected = dict.fromkeys(("shiq", "shiq_ms", "shiq_tk", "shiq_init", "shifted_q"), 0.0)
        for path in all_sequences(2, 3).tolist():
            nodes = [_node(path[:t], 2) for t in range(3)]
            weight = math.prod(ref_policy[t][nodes[t], path[t]].item() for t in range(3))
            ret = tree.rewards[2][nodes[2], path[2]].item()
            v = [args.beta * vref[t][nodes[t]].item() for t in range(3)] + [0.0]
            rewards = [0.0, 0.0, ret]
            expected["shiq"] += weight * 3 * ret**2
            expected["shiq_ms"] += weight * ret**2
            expected["shiq_tk"] += weight * ret**2
            expected["shiq_init"] += weight * sum((v[t] - ret) ** 2 for t in range(3))
            expected["shifted_q"] += weight * sum((v[t] - rewards[t] - v[t + 1]) ** 2 for t in range(3))
        for method, value in expected.items():
            assert math.isclose(results["loss"][method][0, c].item(), value, rel_tol=1e-10), method
        target = solve_tree(tree, beta=args.beta).logits
        initial_kl = expected_kl(tree.ref_logits, target, under="target").item()
        for method in expected:
            assert math.isclose(results["kl"][method][0, c].item(), initial_kl, rel_tol=1e-12)


def test_multi_step_residuals_converge_faster():
    """The default set-up (6 trees, full-batch gradient descent) for 400 steps: the one-step residuals
    (shiq_ms, shifted_q) need at least H/2 = 2 times more steps than the multi-step ones (shiq, shiq_init) to
    bring the mean KL under π*'s states to 10% of its initial value (the docstring's "≈ H times"; never
    within the budget counts as more); shiq_tk, which enforces only the first state's equation, ends in
    between. Every method improves on π_ref."""
    args = TreeArgs(steps=400, eval_every=10)
    results = run(args)
    assert results["steps"] == list(range(0, 401, 10))
    mean_kl = {m: kl.mean(1).numpy() for m, kl in results["kl"].items()}
    to_10 = {m: _steps_to(results["steps"], curve, 0.1) or math.inf for m, curve in mean_kl.items()}
    for fast in ("shiq", "shiq_init"):
        assert to_10[fast] < math.inf
        for slow in ("shiq_ms", "shifted_q"):
            assert to_10[slow] >= 2 * to_10[fast], (fast, slow, to_10)
    final = {m: curve[-1] for m, curve in mean_kl.items()}
    assert max(final["shiq"], final["shiq_init"]) < final["shiq_tk"] < min(final["shiq_ms"], final["shifted_q"])
    assert all(value < mean_kl["shiq"][0] for value in final.values())
    assert all(bool(torch.isfinite(loss).all()) for loss in results["loss"].values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        run(TreeArgs(methods=("dpo",)))
    with pytest.raises(ValueError, match="reward_noise needs sampled data"):
        run(TreeArgs(reward_noise=0.1))
    with pytest.raises(ValueError, match="horizon"):
        run(TreeArgs(horizon=0))
