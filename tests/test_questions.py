"""The three "beyond the paper" experiments (``shiq-toy gym``, ``online``, ``misspecified``) on tiny budgets:
their pieces against independent references (loops, enumeration of paths, the exact solvers) and the files
their commands write."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from shiq_toy.cli import main as cli
from shiq_toy.data import path_probability, sample_dataset, stack_datasets
from shiq_toy.episodes import sample_episodes
from shiq_toy.experiments import gym, misspecified, online
from shiq_toy.mdp import all_sequences, gridworld, random_tree
from shiq_toy.metrics import mdp_occupancy
from shiq_toy.solvers import soft_value_iteration, solve_tree
from tests import ref_solvers as ref


def _rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


# --------------------------------------------------------------------------------------------------
# Q1: gym
# --------------------------------------------------------------------------------------------------


def test_behaviour_policies():
    q = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 0.5]], dtype=torch.float64)
    greedy = gym.behaviour_policy("eps_greedy", q, epsilon=0.3)
    torch.testing.assert_close(greedy, torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]], dtype=torch.float64))
    poor = gym.behaviour_policy("poor", q, epsilon=0.3)
    torch.testing.assert_close(poor, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(gym.behaviour_policy("uniform", q, epsilon=0.3), torch.full((2, 3), 1 / 3, dtype=torch.float64))


def test_coverage_is_the_occupancy_share_of_the_pairs_in_the_data():
    mdp = gridworld(4, generator=torch.Generator().manual_seed(0), step_reward=-0.1)
    q, _, _ = soft_value_iteration(mdp, beta=0.2, gamma=0.9)
    occupancy = mdp_occupancy(mdp, mdp.ref_logits + q / 0.2, gamma=0.9)
    ep = sample_episodes(mdp, torch.softmax(mdp.ref_logits, -1), 4, max_steps=6, generators=[torch.Generator().manual_seed(s) for s in range(2)])
    got = gym.coverage_share(occupancy, ep)
    for c in range(2):
        pairs = {(int(s), int(a)) for s, a, m in zip(ep.states[c].flatten(), ep.actions[c].flatten(), ep.mask[c].flatten()) if m}
        share = sum(float(occupancy[s, a]) for s, a in pairs) / float(occupancy.sum())
        assert math.isclose(float(got[c]), share, rel_tol=1e-12)


def test_identified_policy_is_pi_star_exactly_where_every_action_was_tried():
    mdp = gridworld(4, generator=torch.Generator().manual_seed(0), step_reward=-0.1)
    star = torch.randn(mdp.num_states, mdp.num_actions, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ep = sample_episodes(mdp, torch.softmax(mdp.ref_logits, -1), 6, max_steps=10, generators=[torch.Generator().manual_seed(s) for s in range(2)])
    got = gym.identified_logits(mdp, star, ep)
    for c in range(2):
        tried = {}
        for s, a, m in zip(ep.states[c].flatten().tolist(), ep.actions[c].flatten().tolist(), ep.mask[c].flatten().tolist()):
            if m:
                tried.setdefault(s, set()).add(a)
        for s in range(mdp.num_states):
            expected = star[s] if len(tried.get(s, ())) == mdp.num_actions else mdp.ref_logits[s]
            torch.testing.assert_close(got[c, s], expected)


def test_gym_command(tmp_path, capsys):
    out = tmp_path / "gym"
    code = cli(["gym", "--out", str(out), "--envs", "gridworld", "--grid-size", "5", "--behaviours", "uniform", "eps_greedy",
                "--episodes", "3", "6", "--methods", "shiq", "soft_q", "--steps", "2", "--eval-every", "1", "--seeds", "2", "--max-steps", "8"])
    assert code == 0
    header, rows = _rows(out / "gym.csv")
    assert header == ["env", "approx", "behaviour", "episodes", "method", "seed", "step", "regret", "regret_ratio", "coverage", "behaviour_ratio", "identified_ratio", "loss"]
    assert len(rows) == 2 * 2 * 2 * 2 * 2 * 3  # behaviours × sizes × models × methods × seeds × evaluations (0, 1, 2)
    for r in rows:
        assert 0.0 <= float(r["coverage"]) <= 1.0 and float(r["regret"]) >= -1e-12
        if r["step"] == "0":  # every model starts at π_ref
            assert math.isclose(float(r["regret_ratio"]), 1.0, rel_tol=1e-9)
        if r["behaviour"] == "uniform":  # the uniform behaviour is π_ref
            assert math.isclose(float(r["behaviour_ratio"]), 1.0, rel_tol=1e-9)
        assert float(r["identified_ratio"]) >= -1e-12  # a regret
    summary = json.loads((out / "gym_summary.json").read_text())
    assert summary["betas"] == {"gridworld": gym.ENV_SPECS["gridworld"][0]} and len(summary["final_regret_ratio"]) == 16
    assert (out / "gym.png").stat().st_size > 10_000
    assert "regret / regret of π_ref" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Q2: online
# --------------------------------------------------------------------------------------------------


def test_behaviour_avoids_the_good_paths_and_its_coverage_is_pi_star_mass():
    args = online.OnlineArgs(trees=2, vocab_size=2, horizon=3, num_offline=5, beta=0.5)
    trees, solutions, offline, coverage = online._setup(args)
    paths = all_sequences(2, 3)
    for c, (tree, sol) in enumerate(zip(trees, solutions)):
        flat = online.behaviour_levels(tree, sol.q, beta=0.5, tilt=0.0)
        for level, ref_level in zip(flat, tree.ref_logits):
            torch.testing.assert_close(level, torch.softmax(ref_level, -1))
        tilted = online.behaviour_levels(tree, sol.q, beta=0.5, tilt=1.0)
        star = path_probability(sol.policy, paths)
        # the tilted behaviour gives π*'s best path less probability than π_ref does
        best = int(star.argmax())
        assert float(path_probability(tilted, paths)[best]) < float(path_probability(flat, paths)[best])
        seen = {tuple(row) for row in offline.tokens[c].tolist()}
        mass = sum(float(star[i]) for i, row in enumerate(paths.tolist()) if tuple(row) in seen)
        assert math.isclose(coverage[c], mass, rel_tol=1e-12)


@pytest.mark.parametrize("data", ["offline", "mix50", "mix100", "on_policy"])
def test_mixed_sampler_batches_and_reward_queries(data):
    trees = [random_tree(2, 3, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    offline = stack_datasets([sample_dataset(t, 10, generator=torch.Generator().manual_seed(s)) for s, t in enumerate(trees)])
    sampler = online.MixedSampler(trees, offline, online_share=online.DATA[data], batch_size=8, online_per_step=4, seed=0)
    tables = [torch.stack([t.ref_logits[h] for t in trees]) for h in range(3)]
    for step in range(1, 4):
        batch = sampler(tables)
        assert batch.tokens.shape == (2, 8, 3) and torch.allclose(batch.weights.sum(-1), torch.ones(2, dtype=torch.float64))
        expected_queries = {"offline": 10, "mix50": 10 + 4 * step, "mix100": 10 + 4 * step, "on_policy": 8 * step}[data]
        assert sampler.queries == expected_queries
    for c, tree in enumerate(trees):
        rows = {tuple(r) for r in offline.tokens[c].tolist()}
        from_offline = sum(tuple(r) in rows for r in batch.tokens[c].tolist())
        if data == "offline":
            assert from_offline == 8
        # rewards of every path in the batch are the tree's (no noise)
        leaf = batch.tokens[c] @ torch.tensor([4, 2, 1])
        torch.testing.assert_close(batch.rewards[c, :, -1], tree.rewards[-1].flatten()[leaf])
    if data == "mix50":
        assert sampler.buffer.tokens.shape == (2, 12, 3)  # 4 fresh paths per step, 3 steps


def test_online_command_and_the_regret_identity(tmp_path):
    """Regret = β·KL(π ‖ π*) over whole paths (γ = 1, spec §1) in every row; at step 0 both are π_ref's,
    checked against the enumeration of paths."""
    out = tmp_path / "online"
    code = cli(["online", "--out", str(out), "--trees", "2", "--vocab-size", "2", "--horizon", "3", "--steps", "6", "--eval-every", "3",
                "--num-offline", "12", "--batch-size", "8", "--online-per-step", "4", "--beta", "0.5"])
    assert code == 0
    header, rows = _rows(out / "online.csv")
    assert header == ["method", "data", "tree", "step", "queries", "kl", "regret"]
    assert {r["data"] for r in rows} == set(online.DATA) and len(rows) == 5 * 2 * 3
    for r in rows:
        assert math.isclose(float(r["regret"]), 0.5 * float(r["kl"]), rel_tol=1e-9, abs_tol=1e-12)
    for tree_seed in (0, 1):
        tree = random_tree(2, 3, generator=torch.Generator().manual_seed(tree_seed), reward="terminal")
        kl = ref.sequence_kl_by_enumeration(tree, tree.ref_logits, solve_tree(tree, beta=0.5).logits)
        for r in rows:
            if r["step"] == "0" and int(r["tree"]) == tree_seed:
                assert math.isclose(float(r["kl"]), kl, rel_tol=1e-9)
    queries = {(r["data"], r["step"]): int(r["queries"]) for r in rows}
    assert queries["offline", "6"] == 12 and queries["mix10", "6"] == 12 + 6 * 4 and queries["on_policy", "6"] == 6 * 8
    assert json.loads((out / "online_summary.json").read_text())["settings"]["shiq/offline"]["reward_queries"] == 12
    assert (out / "online.png").stat().st_size > 10_000


# --------------------------------------------------------------------------------------------------
# Q3: misspecified
# --------------------------------------------------------------------------------------------------


def test_proxy_rewards():
    tree = random_tree(3, 3, generator=torch.Generator().manual_seed(0), reward="terminal")
    true = tree.rewards[-1].flatten()
    same = misspecified.proxy_tree(tree, "none", generator=torch.Generator())
    torch.testing.assert_close(same.rewards[-1], tree.rewards[-1])
    hack = misspecified.proxy_tree(tree, "hack", generator=torch.Generator().manual_seed(1), hack_paths=4, hack_bias=2.5)
    changed = (hack.rewards[-1].flatten() - true).nonzero().flatten()
    assert len(changed) == 4 and torch.allclose(hack.rewards[-1].flatten()[changed] - true[changed], torch.full((4,), 2.5, dtype=torch.float64))
    assert bool((true[changed] <= true.median()).all())  # all in the truly worse half
    noisy = misspecified.proxy_tree(tree, "noise2", generator=torch.Generator().manual_seed(1))
    expected = 2.0 * torch.randn(tree.rewards[-1].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(noisy.rewards[-1] - tree.rewards[-1], expected)
    for h in range(2):  # only the terminal level changes
        torch.testing.assert_close(noisy.rewards[h], tree.rewards[h])
    with pytest.raises(ValueError, match="unknown error"):
        misspecified.proxy_tree(tree, "typo", generator=torch.Generator())


def test_expected_reward_against_enumeration():
    tree = random_tree(2, 3, generator=torch.Generator().manual_seed(2), reward="dense")
    logits = [torch.randn(x.shape, generator=torch.Generator().manual_seed(h), dtype=torch.float64) for h, x in enumerate(tree.ref_logits)]
    total = 0.0
    for tokens, nodes in ref.paths(2, 3):
        prob = math.prod(float(torch.softmax(logits[t][n], -1)[a]) for t, (a, n) in enumerate(zip(tokens, nodes)))
        total += prob * ref.sequence_return(tree, tokens, nodes, gamma=1.0)
    assert math.isclose(float(misspecified.expected_reward(logits, tree.rewards)), total, rel_tol=1e-12)


def test_methods_reach_the_proxy_optimum_and_dpo_keeps_moving():
    """On every path weighted by π_ref, shiq, copg and dro share the fixed point π ∝ π_ref exp(r̃/β): after
    training their KL to π_ref and true reward match the proxy optimum's (from solve_tree on the proxy tree).
    DPO on noise-free preferences has no finite optimum: its KL ends above that point."""
    args = misspecified.MisspecifiedArgs(vocab_size=2, horizon=2, trees=1, betas=(1.0,), noise_scales=(1.0,), hack_paths=0,
                                         methods=("shiq", "copg", "dro", "dpo"), steps=120, lr=0.3, eval_every=120)
    output = misspecified.run(args)
    names, true_trees, proxies, _ = misspecified._setup(args)
    assert names == ["none", "noise1"]
    for e, proxy in enumerate(proxies):
        best = solve_tree(proxy, beta=1.0).logits
        kl_best = ref.sequence_kl_by_enumeration(proxy, best, proxy.ref_logits)
        reward_best = float(misspecified.expected_reward(best, true_trees[e].rewards))
        for method in ("shiq", "copg", "dro"):
            curve = output["curves"][1.0, method]
            assert math.isclose(float(curve["kl_ref"][-1, e]), kl_best, rel_tol=5e-3), (method, e)
            assert math.isclose(float(curve["true_reward"][-1, e]), reward_best, rel_tol=5e-3, abs_tol=1e-4), (method, e)
        assert float(output["curves"][1.0, "dpo"]["kl_ref"][-1, e]) > 1.5 * kl_best


def test_misspecified_command(tmp_path, capsys):
    out = tmp_path / "mis"
    code = cli(["misspecified", "--out", str(out), "--trees", "2", "--vocab-size", "2", "--horizon", "2", "--steps", "4", "--eval-every", "2",
                "--betas", "0.5", "2", "--noise-scales", "1", "--hack-paths", "1", "--methods", "shiq", "dpo"])
    assert code == 0
    header, rows = _rows(out / "misspecified.csv")
    assert header == ["method", "error", "beta", "tree", "step", "kl_ref", "true_reward", "proxy_reward", "true_regret"]
    assert len(rows) == 2 * 2 * 3 * 2 * 3  # methods × betas × errors × trees × evaluations
    assert {r["error"] for r in rows} == {"none", "noise1", "hack"}
    for r in rows:
        if r["step"] == "0":
            assert float(r["kl_ref"]) == 0.0
        if r["error"] == "none":
            assert float(r["true_reward"]) == float(r["proxy_reward"])
    summary = json.loads((out / "misspecified_summary.json").read_text())
    assert set(summary["runs"]) == {f"{e}/beta={b}/{m}" for e in ("none", "noise1", "hack") for b in ("0.5", "2") for m in ("shiq", "dpo")}
    assert (out / "misspecified.png").stat().st_size > 10_000
    assert "true reward" in capsys.readouterr().out


def test_bad_arguments(capsys):
    assert cli(["gym", "--episodes", "0"]) == 2
    assert "episodes must be positive" in capsys.readouterr().err
    assert cli(["online", "--tilt", "-1"]) == 2
    assert "tilt must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ShiQ-family"):
        online.run(online.OnlineArgs(methods=("logit_q",)))
    assert cli(["misspecified", "--hack-paths", "100"]) == 2
    assert "hack_paths" in capsys.readouterr().err
    assert cli(["gym", "--envs", "atari"]) == 2
    assert "--envs" in capsys.readouterr().err
