"""gymnasium wrappers of the bandit and the token tree: API conformance and agreement with the tables."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from shiq_toy.envs import BanditEnv, TokenTreeEnv
from shiq_toy.mdp import Bandit, all_sequences, prefix_index, random_bandit, random_tree
from shiq_toy.solvers import solve_tree


def _tree(reward="dense"):
    return random_tree(3, 3, generator=torch.Generator().manual_seed(0), reward=reward)


def _bandit(noise_std=0.5):
    return random_bandit(3, generator=torch.Generator().manual_seed(0), noise_std=noise_std)


@pytest.mark.parametrize("make", [lambda: TokenTreeEnv(_tree()), lambda: BanditEnv(_bandit())])
def test_check_env_passes_without_warnings(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any complaint of the checker fails the test
        check_env(make(), skip_render_check=True)


def test_registered_ids_make_the_same_envs():
    tree_env = gym.make("shiq_toy.envs:shiq_toy/TokenTree-v0", tree=_tree())  # "module:" imports the registering module
    bandit_env = gym.make("shiq_toy/Bandit-v0", bandit=_bandit())
    assert isinstance(tree_env.unwrapped, TokenTreeEnv) and isinstance(bandit_env.unwrapped, BanditEnv)
    obs, _ = tree_env.reset(seed=0)
    assert obs == {"depth": 0, "node": 0}


def test_tree_episodes_follow_the_tables():
    """Every sequence, stepped through the env: observed node = prefix_index, reward = r(s_t, a_t),
    terminated exactly after the H-th token."""
    tree = _tree()
    env = TokenTreeEnv(tree)
    tokens = all_sequences(3, 3)
    nodes = prefix_index(tokens, 3)
    for row, node_row in zip(tokens.tolist(), nodes.tolist()):
        obs, _ = env.reset()
        for t, (a, n) in enumerate(zip(row, node_row)):
            assert (int(obs["depth"]), int(obs["node"])) == (t, n)
            obs, reward, terminated, truncated, _ = env.step(a)
            assert reward == float(tree.rewards[t][n, a])
            assert terminated == (t == 2) and not truncated
        assert int(obs["node"]) == n * 3 + row[-1]  # the leaf index of the sequence
        with pytest.raises(RuntimeError, match="call reset"):
            env.step(0)


def test_trajectories_sampled_from_pi_star_have_return_v_star():
    """γ = 1: r_t − β ln π*(a_t|s_t)/π_ref(a_t|s_t) = v*(s_t) − v*(s_{t+1}) at every step, so on every
    sampled trajectory Σ_t (r_t − β ρ*_t) telescopes to v*(root) exactly (no sampling error)."""
    tree, beta = _tree("terminal"), 0.7
    sol = solve_tree(tree, beta=beta)
    env = TokenTreeEnv(tree)
    generator = torch.Generator().manual_seed(1)
    for episode in range(20):
        obs, _ = env.reset(seed=episode)
        total, terminated = 0.0, False
        while not terminated:
            h, n = int(obs["depth"]), int(obs["node"])
            a = int(torch.multinomial(sol.policy[h][n], 1, generator=generator))
            log_ratio = float(torch.log(sol.policy[h][n, a]) - torch.log_softmax(tree.ref_logits[h][n], -1)[a])
            obs, reward, terminated, _, _ = env.step(a)
            total += reward - beta * log_ratio
        assert math.isclose(total, float(sol.v[0][0]), rel_tol=1e-10, abs_tol=1e-10)


def test_bandit_episode_and_seeded_noise():
    bandit = _bandit(noise_std=0.5)
    env = BanditEnv(bandit)
    obs, info = env.reset(seed=3)
    assert obs == 0 and info == {}
    obs, reward, terminated, truncated, info = env.step(1)
    assert terminated and not truncated and info["mean_reward"] == float(bandit.rewards[1])
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(1)

    def draw(seed, n=2000):
        env.reset(seed=seed)
        out = []
        for _ in range(n):
            out.append(env.step(2)[1])
            env.reset()
        return torch.tensor(out, dtype=torch.float64)

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first, again) and not torch.equal(first, other)  # the noise follows reset(seed=...)
    noise = first - bandit.rewards[2]
    # 2,000 draws of N(0, 0.25): the mean has std 0.5/√2000 ≈ 0.011, so 0.06 is a > 5σ bound
    assert abs(float(noise.mean())) < 0.06 and abs(float(noise.std()) - 0.5) < 0.06


def test_noiseless_bandit_returns_the_mean_reward():
    bandit = Bandit(ref_logits=torch.zeros(2), rewards=torch.tensor([0.25, -1.5]))
    env = BanditEnv(bandit)
    env.reset(seed=0)
    assert env.step(1)[1] == -1.5


def test_envs_reject_bad_input():
    with pytest.raises(ValueError, match="TokenTree"):
        TokenTreeEnv(_bandit())
    with pytest.raises(ValueError, match="Bandit"):
        BanditEnv(_tree())
    env = TokenTreeEnv(_tree())
    env.reset(seed=0)
    with pytest.raises(ValueError, match="token in"):
        env.step(3)
    bandit_env = BanditEnv(_bandit())
    bandit_env.reset(seed=0)
    with pytest.raises(ValueError, match="arm in"):
        bandit_env.step(-1)
