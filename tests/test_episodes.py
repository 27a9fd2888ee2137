"""Episodes of finite MDPs: exact policy evaluation (linear solves) against loops and Monte Carlo, the
bootstrapped episode residuals against a loop written from the definition, and training against soft
value iteration."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from shiq_toy.episode_train import StateMLP, StateTable, train_episodes
from shiq_toy.episodes import EPISODE_METHODS, episode_loss, policy_logits, sample_episodes
from shiq_toy.mdp import (
    GRID_ACTIONS,
    finite_mdp_from_gym,
    finite_mdp_from_tree,
    gridworld,
    random_tree,
    reachable_states,
)
from shiq_toy.metrics import mdp_occupancy, mdp_policy_values, mdp_regret, regret
from shiq_toy.solvers import soft_value_iteration, solve_tree
from tests import ref_solvers as ref


def _gym(name: str):
    if name == "frozenlake8x8":
        return finite_mdp_from_gym(gym.make("FrozenLake-v1", is_slippery=False, map_name="8x8"))
    if name == "taxi":
        return finite_mdp_from_gym(gym.make("Taxi-v4"))
    return finite_mdp_from_gym(gym.make("CliffWalking-v1"))


def _random_logits(shape, seed: int, scale: float = 1.5) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# MDPs: Taxi, the gridworld generator, reachability
# --------------------------------------------------------------------------------------------------


def test_taxi_table_initial_distribution_and_terminal_states():
    mdp = _gym("taxi")
    assert (mdp.num_states, mdp.num_actions) == (500, 6)
    assert int((mdp.initial > 0).sum()) == 300 and math.isclose(float(mdp.initial.sum()), 1.0)
    assert int(mdp.terminal.sum()) == 4  # passenger delivered at one of the 4 stands
    assert sorted(mdp.rewards.unique().tolist()) == [-10.0, -1.0, 20.0]
    # every transition into a terminal state from a reachable live state is a successful drop-off (+20)
    live = reachable_states(mdp) & ~mdp.terminal
    into = mdp.terminal[mdp.next_state] & live[:, None]
    assert bool((mdp.rewards[into] == 20.0).all()) and int(into.sum()) > 0


def test_frozenlake_and_cliffwalking_start_states():
    assert _gym("frozenlake8x8").initial.nonzero().flatten().tolist() == [0]
    cliff = _gym("cliffwalking")
    assert cliff.initial.nonzero().flatten().tolist() == [36]
    assert int(reachable_states(cliff).sum()) == 48 - 10  # the cliff cells send the agent back to the start


def test_gridworld_layout():
    size = 7
    mdp = gridworld(size, generator=torch.Generator().manual_seed(3), wall_fraction=0.2, trap_fraction=0.1, step_reward=-0.01)
    again = gridworld(size, generator=torch.Generator().manual_seed(3), wall_fraction=0.2, trap_fraction=0.1, step_reward=-0.01)
    assert torch.equal(mdp.next_state, again.next_state) and torch.equal(mdp.rewards, again.rewards)
    goal = size * size - 1
    assert mdp.initial[0] == 1.0 and bool(mdp.terminal[goal]) and bool(reachable_states(mdp)[goal])
    walls = [s for s in range(size * size) if not mdp.terminal[s] and (mdp.next_state[s] == s).all() and s != 0]
    assert walls, "seed 3 draws some walls"
    for s in range(size * size):  # each move by hand
        if mdp.terminal[s] or s in walls:
            continue
        row, col = divmod(s, size)
        for a, (dr, dc) in enumerate(GRID_ACTIONS):
            r2, c2 = row + dr, col + dc
            target = r2 * size + c2 if 0 <= r2 < size and 0 <= c2 < size else s
            expected = s if target in walls else target
            assert int(mdp.next_state[s, a]) == expected
            reward = 1.0 if expected == goal else (-1.0 if mdp.terminal[expected] else -0.01)
            assert float(mdp.rewards[s, a]) == reward
    with pytest.raises(ValueError, match="no maze with a reachable goal"):
        gridworld(4, generator=torch.Generator().manual_seed(0), wall_fraction=0.95, max_tries=3)
    with pytest.raises(ValueError, match="size must be"):
        gridworld(1, generator=torch.Generator())


# --------------------------------------------------------------------------------------------------
# Exact evaluation of a policy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["frozenlake8x8", "taxi"])
def test_policy_values_match_the_loop_linear_solve_and_soft_value_iteration(name):
    mdp = _gym(name)
    beta, gamma = 0.5, 0.9
    logits = _random_logits((2, mdp.num_states, mdp.num_actions), seed=1)
    values = mdp_policy_values(mdp, logits, beta=beta, gamma=gamma)  # (2, S)
    for c in range(2):
        expected = ref.policy_evaluation_linear(mdp, torch.softmax(logits[c], -1), beta=beta, gamma=gamma)
        np.testing.assert_allclose(values[c].numpy(), expected, atol=1e-9)
    q, v, _ = soft_value_iteration(mdp, beta=beta, gamma=gamma)
    star = mdp.ref_logits + q / beta
    torch.testing.assert_close(mdp_policy_values(mdp, star, beta=beta, gamma=gamma), v, rtol=0, atol=1e-8)
    assert abs(float(mdp_regret(mdp, star, v, beta=beta, gamma=gamma))) < 1e-8
    assert bool((mdp_regret(mdp, logits, v, beta=beta, gamma=gamma) > 0).all())


def test_regret_on_a_tree_equals_the_tree_regret():
    tree = random_tree(3, 3, generator=torch.Generator().manual_seed(4), reward="dense")
    beta, gamma = 0.7, 0.9
    levels = [_random_logits(x.shape, seed=h) for h, x in enumerate(tree.ref_logits)]
    mdp = finite_mdp_from_tree(tree)
    zeros = torch.zeros(1, 3, dtype=torch.float64)
    v_star = torch.cat([*solve_tree(tree, beta=beta, gamma=gamma).v, torch.zeros(1, dtype=torch.float64)])
    expected = regret(levels, solve_tree(tree, beta=beta, gamma=gamma).logits, tree.ref_logits, tree.rewards, beta=beta, gamma=gamma)
    got = mdp_regret(mdp, torch.cat([*levels, zeros]), v_star, beta=beta, gamma=gamma)
    assert math.isclose(float(got), float(expected), rel_tol=1e-10)
    # γ = 1 is allowed on an acyclic MDP
    at_one = mdp_regret(mdp, torch.cat([*levels, zeros]), torch.cat([*solve_tree(tree, beta=beta).v, torch.zeros(1, dtype=torch.float64)]), beta=beta, gamma=1.0)
    assert math.isclose(float(at_one), float(regret(levels, solve_tree(tree, beta=beta).logits, tree.ref_logits, tree.rewards, beta=beta)), rel_tol=1e-10)


def test_values_and_occupancy_against_monte_carlo():
    """J(π) = Σ_s μ0(s) V^π(s) against the mean discounted regularised return of sampled episodes, and the
    occupancy d(s, a) against discounted visit counts (within 5 standard errors; γ^T ≈ 1e-9 at T = 200)."""
    mdp = gridworld(5, generator=torch.Generator().manual_seed(0), step_reward=-0.05)
    beta, gamma = 0.3, 0.9
    logits = _random_logits((mdp.num_states, mdp.num_actions), seed=2, scale=1.0)
    log_p, log_ref = torch.log_softmax(logits, -1), torch.log_softmax(mdp.ref_logits, -1)
    kl = (log_p.exp() * (log_p - log_ref)).sum(-1)  # (S,)
    episodes = sample_episodes(mdp, log_p.exp(), 4000, max_steps=200, generators=torch.Generator().manual_seed(1))
    discount = gamma ** torch.arange(episodes.states.shape[-1], dtype=torch.float64)
    returns = (torch.where(episodes.mask, episodes.rewards - beta * kl[episodes.states], 0.0) * discount).sum(-1)  # (N,)
    exact = float((mdp_policy_values(mdp, logits, beta=beta, gamma=gamma) * mdp.initial).sum())
    assert abs(float(returns.mean()) - exact) < 5 * float(returns.std()) / math.sqrt(len(returns))
    occupancy = mdp_occupancy(mdp, logits, gamma=gamma)  # (S, A)
    index = episodes.states * mdp.num_actions + episodes.actions  # (N, T)
    counts = torch.zeros(len(returns), mdp.num_states * mdp.num_actions, dtype=torch.float64)  # per episode
    counts.scatter_add_(1, index, torch.where(episodes.mask, discount, 0.0))
    error = (counts.mean(0) - occupancy.flatten()).abs()
    assert bool((error <= 5 * counts.std(0) / math.sqrt(len(returns)) + 1e-12).all())
    assert float(occupancy.sum()) > 1.0  # several discounted steps per episode
    # the occupancy identity J(π) = Σ d(s, a) (r − β ln π/π_ref)
    assert math.isclose(float((occupancy * (mdp.rewards - beta * (log_p - log_ref))).sum()), exact, rel_tol=1e-9)


# --------------------------------------------------------------------------------------------------
# Sampling episodes
# --------------------------------------------------------------------------------------------------


def test_sampled_episodes_follow_the_mdp_and_stacked_copies_equal_separate_runs():
    mdp = _gym("frozenlake8x8")
    policy = torch.softmax(_random_logits((2, mdp.num_states, mdp.num_actions), seed=5), -1)
    stacked = sample_episodes(mdp, policy, 30, max_steps=12, generators=[torch.Generator().manual_seed(s) for s in (7, 8)])
    for c, seed in enumerate((7, 8)):
        alone = sample_episodes(mdp, policy[c], 30, max_steps=12, generators=torch.Generator().manual_seed(seed))
        steps = alone.states.shape[-1]
        for got, want in zip(stacked, alone):
            torch.testing.assert_close(got[c][..., :steps] if got.dim() == 3 else got[c], want)
    ep = sample_episodes(mdp, policy[0], 200, max_steps=12, generators=torch.Generator().manual_seed(0))
    lengths = ep.mask.sum(-1)
    assert bool((ep.mask == (torch.arange(ep.mask.shape[1]) < lengths[:, None])).all())  # a prefix of every row
    assert bool((ep.states[:, 0] == 0).all()) and int(lengths.max()) == ep.mask.shape[1] <= 12
    for n in range(200):
        s = 0
        for t in range(int(lengths[n])):
            assert int(ep.states[n, t]) == s and not bool(mdp.terminal[s])
            a = int(ep.actions[n, t])
            assert float(ep.rewards[n, t]) == float(mdp.rewards[s, a])
            s = int(mdp.next_state[s, a])
        assert int(ep.last_state[n]) == s and bool(ep.ended[n]) == bool(mdp.terminal[s])
        assert bool(ep.ended[n]) or int(lengths[n]) == 12
    assert bool(ep.ended.any()) and bool((~ep.ended).any())


# --------------------------------------------------------------------------------------------------
# The episode losses
# --------------------------------------------------------------------------------------------------


def _loop_loss(method, output, ref_logits, ep, *, beta, gamma, target=None) -> float:
    """Σ_n w_n Σ_t residual_t² from the definitions, one Python float at a time. For a truncated episode
    the value after its last step is V(s_T): β(vℓ − vref) (shiq, shiq_ms), the target's soft value
    β ln Σ_a π_ref exp(ū) (soft_q, on q = βu)."""
    lse = lambda row: float(torch.logsumexp(row, 0))  # noqa: E731
    total = 0.0
    for n in range(ep.states.shape[0]):
        length = int(ep.mask[n].sum())
        s, a, r = ep.states[n].tolist(), ep.actions[n].tolist(), ep.rewards[n].tolist()
        s_end = int(ep.last_state[n])

        def value(state):  # value at a state after step t (0 at a terminal one)
            if method == "soft_q":
                return beta * lse(torch.log_softmax(ref_logits[state], 0) + target[state])
            return beta * (lse(output[state]) - lse(ref_logits[state]))

        after = 0.0 if bool(ep.ended[n]) else value(s_end)
        residuals = []
        for t in range(length):
            if method == "shiq":
                tail = sum(gamma ** (k - t) * (beta * (float(output[s[k], a[k]]) - lse(output[s[k]]) - float(ref_logits[s[k], a[k]]) + lse(ref_logits[s[k]])) - r[k]) for k in range(t, length))
                residuals.append(beta * (lse(output[s[t]]) - lse(ref_logits[s[t]])) + tail - gamma ** (length - t) * after)
            else:
                nxt = value(s[t + 1]) if t + 1 < length else after
                if method == "shiq_ms":
                    residuals.append(beta * (float(output[s[t], a[t]]) - float(ref_logits[s[t], a[t]])) - r[t] - gamma * nxt)
                else:  # soft_q: q(s, a) − r − γ w̄(s'), q = βu
                    residuals.append(beta * float(output[s[t], a[t]]) - r[t] - gamma * nxt)
        total += float(ep.weights[n]) * sum(x * x for x in residuals)
    return total


@pytest.mark.parametrize("method", ["shiq", "shiq_ms", "soft_q"])
def test_episode_loss_matches_the_loop_reference_with_truncation(method):
    mdp = gridworld(5, generator=torch.Generator().manual_seed(5), step_reward=-0.1, trap_fraction=0.15)
    beta, gamma = 0.4, 0.85
    ep = sample_episodes(mdp, torch.softmax(mdp.ref_logits, -1), 12, max_steps=9, generators=[torch.Generator().manual_seed(2)])
    assert bool(ep.ended.any()) and bool((~ep.ended).any())  # both kinds of episode end
    output = _random_logits((1, mdp.num_states, mdp.num_actions), seed=3)
    target = _random_logits((1, mdp.num_states, mdp.num_actions), seed=4) if method == "soft_q" else None
    got = episode_loss(method, output, mdp.ref_logits, ep, beta=beta, gamma=gamma, target=target)
    flat = lambda x: x[0]  # noqa: E731
    ep1 = type(ep)(*map(flat, ep))
    want = _loop_loss(method, output[0], mdp.ref_logits, ep1, beta=beta, gamma=gamma, target=None if target is None else target[0])
    assert math.isclose(float(got[0]), want, rel_tol=1e-10)


@pytest.mark.parametrize("name", ["cliffwalking", "taxi"])
def test_every_episode_residual_is_zero_at_the_exact_solution(name):
    """Off-policy validity on episodes: at ℓ* = ℓ_ref + q*/β (shaped), ln π_ref + q*/β (unshaped) and
    u = q*/β (soft_q, target = the same table) the loss is 0 on episodes of any policy, ended or truncated."""
    mdp = _gym(name)
    beta, gamma = 1.0, 0.9
    q, _, _ = soft_value_iteration(mdp, beta=beta, gamma=gamma, tol=1e-12)
    behaviour = torch.softmax(_random_logits((mdp.num_states, mdp.num_actions), seed=0), -1)
    ep = sample_episodes(mdp, behaviour, 20, max_steps=15, generators=[torch.Generator().manual_seed(0)])
    log_ref = torch.log_softmax(mdp.ref_logits, -1)
    outputs = {"shiq": mdp.ref_logits + q / beta, "shiq_ms": mdp.ref_logits + q / beta, "shiq_init": log_ref + q / beta,
               "shifted_q": log_ref + q / beta, "soft_q": q / beta}
    for method in EPISODE_METHODS:
        table = outputs[method][None]
        loss = episode_loss(method, table, mdp.ref_logits, ep, beta=beta, gamma=gamma, target=table if method == "soft_q" else None)
        assert float(loss) < 1e-16, method
        torch.testing.assert_close(torch.softmax(policy_logits(method, table, mdp.ref_logits), -1)[0], torch.softmax(mdp.ref_logits + q / beta, -1))
    # and the ShiQ loss is 0 with zero gradient at ℓ = ℓ_ref when r ≡ 0 (spec fact 3), truncation included
    zero = type(mdp)(next_state=mdp.next_state, rewards=torch.zeros_like(mdp.rewards), terminal=mdp.terminal, ref_logits=mdp.ref_logits, initial=mdp.initial)
    table = mdp.ref_logits[None].clone().requires_grad_(True)
    loss = episode_loss("shiq", table, zero.ref_logits, ep._replace(rewards=torch.zeros_like(ep.rewards)), beta=beta, gamma=gamma)
    loss.sum().backward()
    assert float(loss.detach()) == 0.0 and float(table.grad.abs().max()) == 0.0


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["shiq", "soft_q"])
def test_tabular_training_on_covering_data_reaches_the_soft_optimum(method):
    """Uniform behaviour on a 4×4 maze covers every reachable (s, a): the learned policy's regret falls below
    2% of π_ref's (the data pin the solution down)."""
    mdp = gridworld(4, generator=torch.Generator().manual_seed(0), trap_fraction=0.1, step_reward=-0.05)
    beta, gamma = 0.2, 0.9
    _, v, _ = soft_value_iteration(mdp, beta=beta, gamma=gamma)
    ep = sample_episodes(mdp, torch.softmax(mdp.ref_logits, -1), 60, max_steps=20, generators=[torch.Generator().manual_seed(s) for s in range(2)])
    init = mdp.ref_logits if method == "shiq" else torch.zeros_like(mdp.ref_logits)
    model = StateTable(init.expand(2, -1, -1))
    ref_regret = float(mdp_regret(mdp, mdp.ref_logits, v, beta=beta, gamma=gamma))
    evaluate = lambda logits: {"regret": mdp_regret(mdp, logits, v, beta=beta, gamma=gamma)}  # noqa: E731
    history = train_episodes(model, mdp.ref_logits, method, ep, beta=beta, gamma=gamma, steps=150, lr=0.2, target_every=10, evaluate=evaluate, eval_every=50)
    assert history.steps == [0, 50, 100, 150] and history.metrics["regret"].shape == (4, 2) == history.metrics["loss"].shape
    assert bool((history.metrics["loss"][-1] < 0.05 * history.metrics["loss"][0]).all())  # the recorded training loss falls
    torch.testing.assert_close(history.metrics["regret"][0], torch.full((2,), ref_regret, dtype=torch.float64))
    assert float(history.metrics["regret"][-1].max()) < 0.02 * ref_regret


def test_mlp_starts_at_its_offset_and_trains():
    mdp = gridworld(4, generator=torch.Generator().manual_seed(0), step_reward=-0.1)
    model = StateMLP(None, mdp.ref_logits, copies=3, hidden=8, generator=torch.Generator().manual_seed(0))
    assert model().shape == (3, mdp.num_states, mdp.num_actions)
    torch.testing.assert_close(model(), mdp.ref_logits.expand(3, -1, -1))
    ep = sample_episodes(mdp, torch.softmax(mdp.ref_logits, -1), 10, max_steps=10, generators=[torch.Generator().manual_seed(s) for s in range(3)])
    history = train_episodes(model, mdp.ref_logits, "shiq", ep, beta=0.2, gamma=0.9, steps=20, lr=0.01)
    assert history.loss.shape == (20, 3) and bool((history.loss[-1] < history.loss[0]).all())


def test_bad_inputs():
    mdp = gridworld(4, generator=torch.Generator().manual_seed(0))
    ep = sample_episodes(mdp, torch.softmax(mdp.ref_logits, -1), 3, max_steps=4, generators=[torch.Generator()])
    table = mdp.ref_logits[None]
    with pytest.raises(ValueError, match="unknown method"):
        episode_loss("dpo", table, mdp.ref_logits, ep, beta=1.0, gamma=0.9)
    with pytest.raises(ValueError, match="soft_q needs target"):
        episode_loss("soft_q", table, mdp.ref_logits, ep, beta=1.0, gamma=0.9)
    with pytest.raises(ValueError, match="policy must hold probabilities"):
        sample_episodes(mdp, torch.ones(mdp.num_states, mdp.num_actions), 3, max_steps=4, generators=torch.Generator())
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        sample_episodes(mdp, torch.softmax(mdp.ref_logits, -1), 3, max_steps=0, generators=torch.Generator())
    with pytest.raises(ValueError, match="initial puts mass on terminal"):
        type(mdp)(next_state=mdp.next_state, rewards=mdp.rewards, terminal=mdp.terminal, ref_logits=mdp.ref_logits,
                  initial=torch.nn.functional.one_hot(torch.tensor(mdp.num_states - 1), mdp.num_states).double())
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., S, A\)"):
        mdp_policy_values(mdp, torch.zeros(3, 3), beta=1.0, gamma=0.9)
    no_start = type(mdp)(next_state=mdp.next_state, rewards=mdp.rewards, terminal=mdp.terminal, ref_logits=mdp.ref_logits)
    with pytest.raises(ValueError, match="no initial state distribution"):
        mdp_occupancy(no_start, mdp.ref_logits, gamma=0.9)
