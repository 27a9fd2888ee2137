"""Exact solvers against independent references: per-node recursion, path enumeration, linear solves."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shiq_toy.mdp import (
    Bandit,
    FiniteMDP,
    TokenTree,
    all_sequences,
    finite_mdp_from_gym,
    finite_mdp_from_tree,
    gather_levels,
    prefix_index,
    random_tree,
)
from shiq_toy.solvers import soft_value_iteration, solve_bandit, solve_tree
from shiq_toy.testing.strategies import bandits, trees
from shiq_toy.testing.strategies import betas as beta_values
from shiq_toy.testing.strategies import gammas as gamma_values

from . import ref_solvers as ref

# float64 round-off on sums of at most V**H = 81 terms of size O(10) is ~1e-13; 1e-10 leaves room.
TOL = dict(rtol=1e-10, atol=1e-10)

betas = beta_values(0.1, 5.0)
gammas = gamma_values(0.3)

# --------------------------------------------------------------------------------------------------
# Tree structure helpers
# --------------------------------------------------------------------------------------------------


@given(vocab=st.integers(1, 4), horizon=st.integers(1, 4))
def test_all_sequences_and_prefix_index_match_enumeration(vocab, horizon):
    tokens = all_sequences(vocab, horizon)
    expected = ref.paths(vocab, horizon)  # itertools.product order = base-V digits, most significant first
    assert tokens.tolist() == [list(t) for t, _ in expected]
    assert prefix_index(tokens, vocab).tolist() == [n for _, n in expected]


def test_gather_levels_reads_the_row_of_each_state():
    tree = random_tree(3, 3, generator=torch.Generator().manual_seed(0))
    tokens = all_sequences(3, 3)
    rows = gather_levels(tree.ref_logits, tokens)  # (27, 3, 3)
    for b, (_, nodes) in enumerate(ref.paths(3, 3)):
        for t, n in enumerate(nodes):
            assert torch.equal(rows[b, t], tree.ref_logits[t][n])


def test_tree_properties():
    tree = random_tree(3, 4, generator=torch.Generator().manual_seed(1), reward="terminal")
    assert (tree.vocab_size, tree.horizon, tree.num_states) == (3, 4, 1 + 3 + 9 + 27)
    assert all(float(r.abs().sum()) == 0.0 for r in tree.rewards[:-1])  # terminal reward: last level only
    assert all(x.dtype == torch.float64 for x in tree.ref_logits + tree.rewards)


# --------------------------------------------------------------------------------------------------
# solve_tree
# --------------------------------------------------------------------------------------------------


@given(tree=trees(), beta=betas, gamma=gammas)
def test_solve_tree_matches_per_node_recursion(tree, beta, gamma):
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    q, v, policy, logits = ref.solve_tree_per_node(tree, beta=beta, gamma=gamma)
    for h in range(tree.horizon):
        torch.testing.assert_close(sol.q[h], q[h], **TOL)
        torch.testing.assert_close(sol.v[h], v[h], **TOL)
        torch.testing.assert_close(sol.policy[h], policy[h], **TOL)
        torch.testing.assert_close(sol.logits[h], logits[h], **TOL)
        torch.testing.assert_close(torch.softmax(sol.logits[h], -1), sol.policy[h], **TOL)  # softmax(ℓ*) = π*


@given(tree=trees(), beta=betas)
def test_root_value_is_log_partition_of_sequence_reward(tree, beta):
    """γ = 1: v*(root) = β ln E_{y~π_ref}[exp(R(y)/β)] with R(y) = Σ_t r_t (terminal or dense)."""
    sol = solve_tree(tree, beta=beta, gamma=1.0)
    assert math.isclose(float(sol.v[0][0]), ref.root_value_by_enumeration(tree, beta=beta), rel_tol=1e-10, abs_tol=1e-10)


@given(tree=trees(), beta=betas, gamma=gammas)
def test_objective_of_optimal_policy_is_root_value(tree, beta, gamma):
    """J(π*) = v*(root): the regularised return of π*, summed over all paths, equals the solver's value."""
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    value = ref.objective_by_enumeration(tree, sol.logits, beta=beta, gamma=gamma)
    assert math.isclose(value, float(sol.v[0][0]), rel_tol=1e-10, abs_tol=1e-10)


@given(tree=trees(), beta=betas, gamma=gammas, seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 3.0))
def test_optimal_policy_beats_its_perturbations(tree, beta, gamma, seed, scale):
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    generator = torch.Generator().manual_seed(seed)
    perturbed = [x + scale * torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in sol.logits]
    best = ref.objective_by_enumeration(tree, sol.logits, beta=beta, gamma=gamma)
    other = ref.objective_by_enumeration(tree, perturbed, beta=beta, gamma=gamma)
    assert other <= best + 1e-10


@given(tree=trees(), beta=betas, seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 3.0))
def test_sequence_regret_identity(tree, beta, seed, scale):
    """γ = 1, per prompt: J(π*) − J(π) = β KL(π(y) ‖ π*(y)) over whole sequences (spec §1)."""
    sol = solve_tree(tree, beta=beta, gamma=1.0)
    generator = torch.Generator().manual_seed(seed)
    logits = [x + scale * torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in sol.logits]
    regret = ref.objective_by_enumeration(tree, sol.logits, beta=beta, gamma=1.0) - ref.objective_by_enumeration(
        tree, logits, beta=beta, gamma=1.0
    )
    kl = ref.sequence_kl_by_enumeration(tree, logits, sol.logits)
    assert math.isclose(regret, beta * kl, rel_tol=1e-8, abs_tol=1e-10)


def test_zero_reward_solution_is_the_reference():
    """r ≡ 0: q* = 0, v* = 0, ℓ* = ℓ_ref (spec §3, fact 3)."""
    tree = random_tree(3, 3, generator=torch.Generator().manual_seed(2))
    tree = TokenTree(ref_logits=tree.ref_logits, rewards=[torch.zeros_like(r) for r in tree.rewards])
    sol = solve_tree(tree, beta=0.7, gamma=0.9)
    for h in range(3):
        torch.testing.assert_close(sol.logits[h], tree.ref_logits[h], rtol=0, atol=1e-14)
        torch.testing.assert_close(sol.v[h], torch.zeros_like(sol.v[h]), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# solve_bandit
# --------------------------------------------------------------------------------------------------


@given(bandit=bandits(), beta=betas)
def test_bandit_closed_form_equals_one_level_tree(bandit, beta):
    sol = solve_bandit(bandit.ref_logits, bandit.rewards, beta=beta)
    tree = TokenTree(ref_logits=[bandit.ref_logits[None]], rewards=[bandit.rewards[None]])
    tree_sol = solve_tree(tree, beta=beta)
    torch.testing.assert_close(sol.q, tree_sol.q[0][0], **TOL)
    torch.testing.assert_close(sol.v, tree_sol.v[0][0], **TOL)
    torch.testing.assert_close(sol.policy, tree_sol.policy[0][0], **TOL)
    torch.testing.assert_close(sol.logits, tree_sol.logits[0][0], **TOL)
    # closed form written out with numpy: v = β ln Σ π_ref exp(r/β), π* ∝ π_ref exp(r/β)
    ref_p = np.exp(bandit.ref_logits.numpy()) / np.exp(bandit.ref_logits.numpy()).sum()
    weights = ref_p * np.exp(bandit.rewards.numpy() / beta)
    assert math.isclose(float(sol.v), beta * math.log(weights.sum()), rel_tol=1e-10, abs_tol=1e-10)
    np.testing.assert_allclose(sol.policy.numpy(), weights / weights.sum(), rtol=1e-10, atol=1e-12)


@given(bandit=bandits(min_arms=2), beta=betas, seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 3.0))
def test_bandit_regret_identity(bandit, beta, seed, scale):
    """J(π*) − J(π) = β KL(π ‖ π*), J(π) = Σ_a π(a) r(a) − β KL(π ‖ π_ref)."""
    generator = torch.Generator().manual_seed(seed)
    num_arms = bandit.num_arms
    sol = solve_bandit(bandit.ref_logits, bandit.rewards, beta=beta)
    log_ref = torch.log_softmax(bandit.ref_logits, -1)

    def objective(log_pi):
        return float((log_pi.exp() * (bandit.rewards - beta * (log_pi - log_ref))).sum())

    log_pi = torch.log_softmax(sol.logits + scale * torch.randn(num_arms, generator=generator, dtype=torch.float64), -1)
    log_star = torch.log_softmax(sol.logits, -1)
    kl = float((log_pi.exp() * (log_pi - log_star)).sum())
    assert math.isclose(objective(log_star), float(sol.v), rel_tol=1e-10, abs_tol=1e-10)  # J(π*) = v*
    assert math.isclose(objective(log_star) - objective(log_pi), beta * kl, rel_tol=1e-8, abs_tol=1e-10)


def test_bandit_sample_rewards_mean_and_noise():
    bandit = Bandit(ref_logits=torch.zeros(3, dtype=torch.float64), rewards=torch.tensor([0.0, 1.0, 2.0]), noise_std=0.5)
    arms = torch.tensor([0, 1, 2]).repeat(20_000)
    sample = bandit.sample_rewards(arms, generator=torch.Generator().manual_seed(0))
    noise = sample - bandit.rewards[arms]
    # 60,000 N(0, 0.25) draws: the mean has std 0.5/√60000 ≈ 0.002, so |mean| < 0.01 is a 5σ bound
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 0.5) < 0.01
    noiseless = Bandit(ref_logits=bandit.ref_logits, rewards=bandit.rewards)
    assert torch.equal(noiseless.sample_rewards(arms, generator=None), bandit.rewards[arms])


# --------------------------------------------------------------------------------------------------
# Soft value iteration
# --------------------------------------------------------------------------------------------------


def _gym_mdp(name: str) -> FiniteMDP:
    env = gym.make("FrozenLake-v1", is_slippery=False) if name == "frozenlake" else gym.make("CliffWalking-v1")
    return finite_mdp_from_gym(env)


@pytest.mark.parametrize("name", ["frozenlake", "cliffwalking"])
@pytest.mark.parametrize("beta,gamma", [(0.05, 0.9), (1.0, 0.95)])
def test_soft_value_iteration_satisfies_bellman_and_policy_evaluation(name, beta, gamma):
    mdp = _gym_mdp(name)
    q, v, policy = soft_value_iteration(mdp, beta=beta, gamma=gamma)
    live = ~mdp.terminal
    # Bellman equations of spec §1 on live states
    q_expected = mdp.rewards + gamma * v[mdp.next_state]
    log_ref = torch.log_softmax(mdp.ref_logits, -1)
    v_expected = beta * torch.logsumexp(log_ref + q / beta, -1)
    torch.testing.assert_close(q[live], q_expected[live], rtol=0, atol=1e-9)
    torch.testing.assert_close(v[live], v_expected[live], rtol=0, atol=1e-9)
    torch.testing.assert_close(policy.sum(-1), torch.ones(mdp.num_states, dtype=torch.float64), rtol=0, atol=1e-12)
    # independent: the regularised value of π*, by a linear solve, is v*; perturbed policies do worse everywhere
    np.testing.assert_allclose(ref.policy_evaluation_linear(mdp, policy, beta=beta, gamma=gamma), v.numpy(), atol=1e-8)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        other = torch.softmax(policy.log() + torch.randn(policy.shape, generator=generator, dtype=torch.float64), -1)
        assert (ref.policy_evaluation_linear(mdp, other, beta=beta, gamma=gamma) <= v.numpy() + 1e-8).all()


@pytest.mark.parametrize("name,start,steps,reward", [("frozenlake", 0, 6, "goal"), ("cliffwalking", 36, 13, "step")])
def test_soft_value_is_sandwiched_by_the_shortest_path(name, start, steps, reward):
    """Small β: v*(start) ≤ J_hard (KL ≥ 0) and v*(start) ≥ J of the deterministic shortest path, which
    pays β ln A per step against a uniform π_ref. FrozenLake: reward 1 on the 6th step, J_hard = γ^5;
    CliffWalking: −1 per step for 13 steps, J_hard = −Σ_{k<13} γ^k."""
    beta, gamma = 0.01, 0.9
    mdp = _gym_mdp(name)
    _, v, _ = soft_value_iteration(mdp, beta=beta, gamma=gamma)
    discounts = [gamma**k for k in range(steps)]
    hard = discounts[-1] if reward == "goal" else -sum(discounts)
    deterministic = hard - beta * math.log(mdp.num_actions) * sum(discounts)
    assert deterministic - 1e-9 <= float(v[start]) <= hard + 1e-9


@given(tree=trees(max_paths=27), beta=betas, gamma=gamma_values(0.3, 0.95))
def test_soft_value_iteration_on_a_tree_equals_backward_induction(tree, beta, gamma):
    mdp = finite_mdp_from_tree(tree)
    q, v, policy = soft_value_iteration(mdp, beta=beta, gamma=gamma)
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    torch.testing.assert_close(v[:-1], torch.cat(sol.v), rtol=0, atol=1e-9)
    torch.testing.assert_close(q[:-1], torch.cat(sol.q), rtol=0, atol=1e-9)
    torch.testing.assert_close(policy[:-1], torch.cat(sol.policy), rtol=0, atol=1e-9)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_soft_value_iteration_tol_bounds_the_distance_to_the_fixed_point(beta):
    """tol is a bound on ‖v − v*‖∞, not on the last change: at γ = 0.99 stopping at ‖Δv‖∞ ≤ tol leaves
    FrozenLake ≈ 0.02–0.03 away from v* for tol = 1e-2; the contraction bound ‖Δv‖∞ ≤ tol (1 − γ)/γ does not."""
    mdp, gamma, tol = _gym_mdp("frozenlake"), 0.99, 1e-2
    _, v_star, _ = soft_value_iteration(mdp, beta=beta, gamma=gamma, tol=1e-12)
    _, v, _ = soft_value_iteration(mdp, beta=beta, gamma=gamma, tol=tol)
    assert float((v - v_star).abs().max()) <= tol


def test_soft_value_iteration_reports_non_convergence():
    with pytest.raises(RuntimeError, match="did not reach"):
        soft_value_iteration(_gym_mdp("cliffwalking"), beta=0.1, gamma=0.99, max_iter=3)


def test_frozenlake_terminal_states():
    mdp = _gym_mdp("frozenlake")
    assert mdp.terminal.nonzero().flatten().tolist() == [5, 7, 11, 12, 15]  # holes and the goal of the 4x4 map
    assert float(mdp.rewards.max()) == 1.0


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _levels(vocab, horizon):
    return [torch.zeros(vocab**h, vocab, dtype=torch.float64) for h in range(horizon)]


@pytest.mark.parametrize(
    "ref_logits,rewards,match",
    [
        (_levels(2, 3), _levels(2, 2), "3 levels but rewards has 2"),
        ([], [], "at least one level"),
        (
            _levels(2, 2) + [torch.zeros(3, 2, dtype=torch.float64)],
            _levels(2, 3),
            r"ref_logits\[2\] \(depth 2\) has shape \(3, 2\), expected \(4, 2\)",
        ),
        (_levels(2, 3), _levels(2, 2) + [torch.zeros(4, 3, dtype=torch.float64)], r"rewards\[2\] \(depth 2\) has shape"),
        (_levels(2, 2), [torch.zeros(1, 2), torch.zeros(2, 2, dtype=torch.int64)], r"rewards\[1\].*floating"),
        (_levels(2, 2), [torch.zeros(1, 2), torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])], r"rewards\[1\].*non-finite"),
        ([torch.zeros(2, 2)], [torch.zeros(2, 2)], r"ref_logits\[0\] must have shape \(1, V\)"),
    ],
)
def test_token_tree_rejects_bad_levels(ref_logits, rewards, match):
    with pytest.raises(ValueError, match=match):
        TokenTree(ref_logits=ref_logits, rewards=rewards)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_solvers_reject_bad_beta(beta):
    tree = random_tree(2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="beta"):
        solve_tree(tree, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        solve_bandit(torch.zeros(3), torch.zeros(3), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        soft_value_iteration(finite_mdp_from_tree(tree), beta=beta, gamma=0.9)


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, float("nan")])
def test_solvers_reject_bad_gamma(gamma):
    tree = random_tree(2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="gamma"):
        solve_tree(tree, beta=1.0, gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        soft_value_iteration(finite_mdp_from_tree(tree), beta=1.0, gamma=gamma)


def test_soft_value_iteration_needs_gamma_below_one():
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\)"):
        soft_value_iteration(_gym_mdp("frozenlake"), beta=1.0, gamma=1.0)


def test_stochastic_gym_table_is_rejected():
    with pytest.raises(ValueError, match=r"stochastic transition table: P\[0\]\[0\] has 3 outcome"):
        finite_mdp_from_gym(gym.make("FrozenLake-v1", is_slippery=True))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="rewards has shape"):
        Bandit(ref_logits=torch.zeros(3), rewards=torch.zeros(2))
    with pytest.raises(ValueError, match="noise_std"):
        Bandit(ref_logits=torch.zeros(3), rewards=torch.zeros(3), noise_std=-1.0)
    with pytest.raises(ValueError, match="arms must lie"):
        Bandit(ref_logits=torch.zeros(3), rewards=torch.zeros(3)).sample_rewards(torch.tensor([3]), generator=None)
    with pytest.raises(ValueError, match="rewards must have the shape"):
        solve_bandit(torch.zeros(3), torch.zeros(2), beta=1.0)
    with pytest.raises(ValueError, match="tokens must lie"):
        prefix_index(torch.tensor([[0, 2]]), 2)
    with pytest.raises(ValueError, match="next_state must lie"):
        FiniteMDP(
            next_state=torch.tensor([[1]]), rewards=torch.zeros(1, 1), terminal=torch.tensor([False]), ref_logits=torch.zeros(1, 1)
        )
    with pytest.raises(ValueError, match="reward must be"):
        random_tree(2, 2, generator=torch.Generator(), reward="sparse")
