"""Tabular ShiQ: the logits table, the datasets, the exact metrics and the trainer.

References: loops over tree paths written here from the definitions (spec §1), the exact solver
(shiq_toy.solvers) and closed forms. Fixed points are derived in each test's docstring.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shiq_toy.data import (
    as_tree,
    exhaustive_dataset,
    on_policy_sampler,
    path_probability,
    sample_dataset,
    stack_datasets,
)
from shiq_toy.losses import token_stats
from shiq_toy.mdp import Bandit, TokenTree, all_sequences, random_tree
from shiq_toy.metrics import (
    exact_metrics,
    expected_kl,
    implicit_value_error,
    kl_per_state,
    policy_values,
    regret,
    state_distribution,
)
from shiq_toy.solvers import solve_bandit, solve_tree
from shiq_toy.tabular import TabularLogits, stack_levels
from shiq_toy.train import METHODS, History, train


def _tree(seed: int, vocab: int = 2, horizon: int = 3, reward: str = "terminal") -> TokenTree:
    return random_tree(vocab, horizon, generator=torch.Generator().manual_seed(seed), reward=reward)


def _node(prefix, vocab: int) -> int:
    node = 0
    for a in prefix:
        node = node * vocab + a
    return node


def _frozen(tree_or_tables) -> TabularLogits:
    ref = TabularLogits.from_tree(tree_or_tables) if isinstance(tree_or_tables, TokenTree) else TabularLogits(tree_or_tables)
    return ref.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# TabularLogits
# --------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 1000), vocab=st.integers(2, 4), horizon=st.integers(1, 4), batch=st.integers(1, 4), data=st.data())
def test_forward_matches_loop(seed, vocab, horizon, batch, data):
    length = data.draw(st.integers(1, horizon))
    g = torch.Generator().manual_seed(seed)
    tables = [torch.randn(vocab**h, vocab, generator=g, dtype=torch.float64) for h in range(horizon)]
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    out = TabularLogits(tables)(tokens)
    assert out.shape == (batch, length, vocab) and out.dtype == torch.float64
    for b in range(batch):
        for t in range(length):
            assert torch.equal(out[b, t], tables[t][_node(tokens[b, :t].tolist(), vocab)])
    stats = token_stats(out, tokens)  # the language-model contract
    for b in range(batch):
        for t in range(length):
            row = tables[t][_node(tokens[b, :t].tolist(), vocab)]
            assert stats.logit_taken[b, t] == row[tokens[b, t]]
            assert math.isclose(stats.logsumexp[b, t].item(), math.log(sum(math.exp(x) for x in row.tolist())), rel_tol=1e-12)


def test_copies_read_their_own_table():
    trees = [_tree(s) for s in range(3)]
    stacked = TabularLogits(stack_levels([t.ref_logits for t in trees]))
    assert stacked.copies == 3
    tokens = torch.randint(0, 2, (3, 5, 3), generator=torch.Generator().manual_seed(0))
    out = stacked(tokens)
    assert out.shape == (3, 5, 3, 2)
    for c, tree in enumerate(trees):
        assert torch.equal(out[c], TabularLogits.from_tree(tree)(tokens[c]))
    replicated = TabularLogits.from_tree(trees[0], copies=4)
    assert replicated.copies == 4 and all(torch.equal(x[2], y) for x, y in zip(replicated.tables(), trees[0].ref_logits))


def test_token_stats_without_full_logits_match_the_naive_path():
    """TabularLogits.token_stats = losses.token_stats(model(tokens), tokens), values and gradients, with
    and without copies; gather_states reads per-state values at each token's state."""
    tree = _tree(8, vocab=3, horizon=3)
    g = torch.Generator().manual_seed(1)
    for copies, shape in ((None, (6, 3)), (2, (2, 6, 2))):
        model = TabularLogits.from_tree(tree, copies=copies)
        with torch.no_grad():
            for level in model.levels:
                level.add_(torch.randn(level.shape, generator=g, dtype=torch.float64))
        tokens = torch.randint(0, 3, shape, generator=g)
        fast = model.token_stats(tokens)
        naive = token_stats(model(tokens).flatten(0, -3), tokens.flatten(0, -2))
        for x, y in zip(fast, naive):
            torch.testing.assert_close(x.reshape(y.shape), y, rtol=0, atol=1e-14)
        weights = torch.randn(fast.logit_taken.shape, generator=g, dtype=torch.float64)
        grad_fast = torch.autograd.grad(((fast.logit_taken + fast.logsumexp.square()) * weights).sum(), list(model.parameters()), materialize_grads=True)
        w = weights.reshape(naive.logit_taken.shape)
        grad_naive = torch.autograd.grad(((naive.logit_taken + naive.logsumexp.square()) * w).sum(), list(model.parameters()), materialize_grads=True)
        for x, y in zip(grad_fast, grad_naive):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        values = [torch.arange(3**h, dtype=torch.float64).expand(*([copies] if copies else []), 3**h) * 10 + h for h in range(3)]
        read = model.gather_states(values, tokens)
        for index in torch.cartesian_prod(*(torch.arange(n) for n in shape)).tolist():
            *lead, t = index
            prefix = tokens[tuple(lead)][:t].tolist()
            assert read[tuple(index)].item() == _node(prefix, 3) * 10 + t


def test_dataset_loss_matches_losses_on_full_logits():
    """The trainer's loss (tabular statistics, logit_q's soft value once per state) equals the LOSSES entry
    applied to full logits from the naive path, weighted by the dataset weights."""
    from shiq_toy.losses import LOSSES, logit_q_soft_value
    from shiq_toy.train import dataset_loss

    tree, beta, gamma = _tree(9, vocab=2, horizon=3, reward="dense"), 0.7, 0.9
    data = exhaustive_dataset(tree, policy=[torch.softmax(x, -1) for x in tree.ref_logits])
    model = TabularLogits([x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(h), dtype=torch.float64) for h, x in enumerate(tree.ref_logits)])
    ref = _frozen(tree)
    logits, ref_logits = model(data.tokens), ref(data.tokens)
    policy, ref_stats = token_stats(logits, data.tokens), token_stats(ref_logits, data.tokens)
    for method, loss_fn in LOSSES.items():
        extra = {"soft_value": logit_q_soft_value(logits, ref_logits, beta=beta)} if method == "logit_q" else {}
        expected = (data.weights * loss_fn(policy, ref_stats, data.rewards, data.mask, beta=beta, gamma=gamma, **extra)).sum()
        got = dataset_loss(model, ref, method, data, beta=beta, gamma=gamma)
        torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-14)


def test_tables_are_detached_copies_initialised_at_reference():
    tree = _tree(1)
    model = TabularLogits.from_tree(tree)
    tables = model.tables()
    assert all(torch.equal(x, y) for x, y in zip(tables, tree.ref_logits))
    tables[0].add_(1.0)
    tree.ref_logits[1].add_(1.0)  # neither the read-out nor the initial tables alias the parameters
    assert torch.equal(model.levels[0], model.tables()[0]) and not torch.equal(model.levels[0], tables[0])
    assert not torch.equal(model.levels[1], tree.ref_logits[1])
    bandit = Bandit(ref_logits=torch.tensor([0.0, 1.0, 2.0]), rewards=torch.zeros(3))
    assert torch.equal(TabularLogits.from_bandit(bandit)(torch.tensor([[2], [0]])), bandit.ref_logits.expand(2, 1, 3))


def test_tabular_bad_inputs():
    tree = _tree(0)
    model = TabularLogits.from_tree(tree)
    with pytest.raises(ValueError, match="tokens must have shape"):
        model(torch.zeros(2, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="depth H = 3"):
        model(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, V\)"):
        model(torch.full((1, 2), 2))
    with pytest.raises(ValueError, match=r"tables\[1\]"):
        TabularLogits([torch.zeros(1, 2), torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="finite"):
        TabularLogits([torch.tensor([[0.0, float("nan")]])])
    with pytest.raises(ValueError, match="copies"):
        TabularLogits(tree.ref_logits, copies=0)
    with pytest.raises(ValueError, match="stack 2 copies"):
        TabularLogits.from_tree(tree, copies=3)(torch.zeros(2, 1, 3, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def _path_prob_loop(policy, path, vocab):
    return math.prod(policy[t][_node(path[:t], vocab), path[t]].item() for t in range(len(path)))


def test_exhaustive_dataset_matches_enumeration():
    tree = _tree(2, vocab=3, horizon=3, reward="dense")
    ref_policy = [torch.softmax(x, -1) for x in tree.ref_logits]
    data = exhaustive_dataset(tree, policy=ref_policy)
    assert data.tokens.shape == (27, 3) and len({tuple(p) for p in data.tokens.tolist()}) == 27
    assert torch.equal(data.tokens, all_sequences(3, 3)) and bool(data.mask.all()) and not bool(data.prompt_ids.any())
    for path, rewards, weight in zip(data.tokens.tolist(), data.rewards, data.weights):
        assert rewards.tolist() == [tree.rewards[t][_node(path[:t], 3), path[t]].item() for t in range(3)]
        assert math.isclose(weight.item(), _path_prob_loop(ref_policy, path, 3), rel_tol=1e-12)
    assert math.isclose(data.weights.sum().item(), 1.0, rel_tol=1e-12)
    torch.testing.assert_close(exhaustive_dataset(tree).weights, torch.full((27,), 1 / 27, dtype=torch.float64))
    torch.testing.assert_close(path_probability(ref_policy, data.tokens), data.weights)


def test_sample_dataset_frequencies():
    """Empirical path frequencies f of N samples from π_ref: each within 5 binomial standard errors
    sqrt(p(1 − p)/N) of its exact probability p (a fixed seed, so the check is deterministic)."""
    tree, num = _tree(3), 40_000
    data = sample_dataset(tree, num, generator=torch.Generator().manual_seed(0))
    ref_policy = [torch.softmax(x, -1) for x in tree.ref_logits]
    counts = torch.bincount(data.tokens @ torch.tensor([4, 2, 1]), minlength=8).double()
    for leaf, path in enumerate(all_sequences(2, 3).tolist()):
        p = _path_prob_loop(ref_policy, path, 2)
        assert abs(counts[leaf].item() / num - p) <= 5 * math.sqrt(p * (1 - p) / num)
    # a deterministic behaviour policy always takes its argmax path
    greedy = [torch.nn.functional.one_hot(x.argmax(-1), 2).double() for x in tree.ref_logits]
    tokens = sample_dataset(tree, 10, generator=torch.Generator().manual_seed(1), policy=greedy).tokens
    best = [0]
    for t in range(3):
        best.append(int(tree.ref_logits[t][_node(best[1:], 2)].argmax()))
    assert tokens.tolist() == [best[1:]] * 10


def test_reward_noise():
    """Bandit rewards: per-arm sample mean within 5 σ/√n of r(a), std within 5% of σ (n ≈ 6,700 per
    arm: the std's standard error is σ/√(2n) ≈ 0.9% of σ). Tree noise sits on the last step only."""
    bandit = Bandit(ref_logits=torch.zeros(3), rewards=torch.tensor([1.0, 0.0, -2.0]), noise_std=0.5)
    data = sample_dataset(bandit, 20_000, generator=torch.Generator().manual_seed(0))
    assert data.tokens.shape == (20_000, 1)
    for arm in range(3):
        r = data.rewards[data.tokens[:, 0] == arm, 0]
        assert abs(r.mean().item() - bandit.rewards[arm].item()) <= 5 * 0.5 / math.sqrt(len(r))
        assert abs(r.std().item() - 0.5) <= 0.05 * 0.5
    tree = _tree(4, reward="dense")
    noisy = sample_dataset(tree, 5_000, generator=torch.Generator().manual_seed(0), reward_noise=0.3)
    clean = exhaustive_dataset(tree).rewards[noisy.tokens @ torch.tensor([4, 2, 1])]  # mean rewards of each path
    torch.testing.assert_close(noisy.rewards[:, :-1], clean[:, :-1], rtol=0, atol=0)
    assert abs((noisy.rewards[:, -1] - clean[:, -1]).std().item() - 0.3) <= 0.05 * 0.3


def test_data_bad_inputs():
    tree, g = _tree(0), torch.Generator().manual_seed(0)
    bandit = Bandit(ref_logits=torch.zeros(2), rewards=torch.zeros(2), noise_std=0.1)
    with pytest.raises(ValueError, match="num"):
        sample_dataset(tree, 0, generator=g)
    with pytest.raises(ValueError, match="noise_std"):
        sample_dataset(bandit, 3, generator=g, reward_noise=0.1)
    with pytest.raises(ValueError, match="reward_noise"):
        sample_dataset(tree, 3, generator=g, reward_noise=-1.0)
    with pytest.raises(ValueError, match="probabilities"):
        sample_dataset(tree, 3, generator=g, policy=[torch.full((2**h, 2), 0.7, dtype=torch.float64) for h in range(3)])
    with pytest.raises(ValueError, match="3 per-depth"):
        sample_dataset(tree, 3, generator=g, policy=[torch.full((1, 2), 0.5)])
    with pytest.raises(ValueError, match="same shape"):
        stack_datasets([sample_dataset(tree, 3, generator=g), sample_dataset(tree, 4, generator=g)])
    with pytest.raises(ValueError, match="Bandit or a TokenTree"):
        as_tree("tree")
    sampler = on_policy_sampler(tree, 4, generators=[g, g])
    with pytest.raises(ValueError, match="stacking 2 copies"):
        sampler(tree.ref_logits)


# --------------------------------------------------------------------------------------------------
# Exact metrics
# --------------------------------------------------------------------------------------------------


def _objective_by_enumeration(tree: TokenTree, logits, *, beta: float, gamma: float) -> float:
    """J(π) = Σ_y π(y) Σ_t γ^t [r(s_t, a_t) − β ln π(a_t|s_t)/π_ref(a_t|s_t)], a loop over every path."""
    vocab, total = tree.vocab_size, 0.0
    pol = [torch.softmax(x, -1) for x in logits]
    ref = [torch.softmax(x, -1) for x in tree.ref_logits]
    for path in all_sequences(vocab, tree.horizon).tolist():
        ret = 0.0
        for t, a in enumerate(path):
            s = _node(path[:t], vocab)
            ret += gamma**t * (tree.rewards[t][s, a].item() - beta * math.log(pol[t][s, a].item() / ref[t][s, a].item()))
        total += _path_prob_loop(pol, path, vocab) * ret
    return total


@given(seed=st.integers(0, 1000), vocab=st.integers(2, 3), horizon=st.integers(1, 3), beta=st.floats(0.1, 3.0), gamma=st.sampled_from([1.0, 0.9, 0.5]))
def test_policy_values_and_regret_by_enumeration(seed, vocab, horizon, beta, gamma):
    tree = _tree(seed, vocab, horizon, reward="dense")
    solution = solve_tree(tree, beta=beta, gamma=gamma)
    g = torch.Generator().manual_seed(seed + 1)
    logits = [x + torch.randn(x.shape, generator=g, dtype=torch.float64) for x in tree.ref_logits]
    value = policy_values(logits, tree.ref_logits, tree.rewards, beta=beta, gamma=gamma)[0][0]
    assert math.isclose(value.item(), _objective_by_enumeration(tree, logits, beta=beta, gamma=gamma), rel_tol=1e-10, abs_tol=1e-10)
    best = policy_values(solution.logits, tree.ref_logits, tree.rewards, beta=beta, gamma=gamma)[0][0]
    assert math.isclose(best.item(), solution.v[0][0].item(), rel_tol=1e-10, abs_tol=1e-10)  # J(π*) = v*(root)
    gap = regret(logits, solution.logits, tree.ref_logits, tree.rewards, beta=beta, gamma=gamma)
    assert gap.item() > 0 and abs(regret(solution.logits, solution.logits, tree.ref_logits, tree.rewards, beta=beta, gamma=gamma).item()) < 1e-12
    if gamma == 1.0:  # regularised regret identity: J(π*) − J(π) = β KL(π(y) ‖ π*(y))
        seq_kl = expected_kl(logits, solution.logits, under="policy")
        assert math.isclose(gap.item(), beta * seq_kl.item(), rel_tol=1e-9, abs_tol=1e-12)
        kl_paths = sum(
            _path_prob_loop([torch.softmax(x, -1) for x in logits], p, vocab)
            * math.log(_path_prob_loop([torch.softmax(x, -1) for x in logits], p, vocab) / _path_prob_loop(solution.policy, p, vocab))
            for p in all_sequences(vocab, horizon).tolist()
        )
        assert math.isclose(seq_kl.item(), kl_paths, rel_tol=1e-9, abs_tol=1e-12)


def test_expected_kl_under_target_and_value_error_by_loops():
    tree, beta = _tree(5, vocab=3, horizon=3), 0.7
    solution = solve_tree(tree, beta=beta)
    logits = [x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) for x in tree.ref_logits]
    dist = state_distribution(solution.policy)
    kl = kl_per_state(logits, solution.logits)
    expected_value, expected_kl_loop = 0.0, 0.0
    for h in range(3):
        for s in range(3**h):
            prefix = [(s // 3 ** (h - 1 - i)) % 3 for i in range(h)]
            reach = _path_prob_loop(solution.policy, prefix, 3) if h else 1.0
            assert math.isclose(dist[h][s].item(), reach, rel_tol=1e-12)
            p, q = torch.softmax(logits[h][s], -1).tolist(), solution.policy[h][s].tolist()
            kl_s = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            assert math.isclose(kl[h][s].item(), kl_s, rel_tol=1e-9, abs_tol=1e-14)
            expected_kl_loop += reach * kl_s
            implied = beta * (torch.logsumexp(logits[h][s], 0) - torch.logsumexp(tree.ref_logits[h][s], 0)).item()
            expected_value += reach * abs(implied - solution.v[h][s].item())
    metrics = exact_metrics(logits, solution.logits, tree.ref_logits, tree.rewards, beta=beta)
    assert math.isclose(metrics["kl_target"].item(), expected_kl_loop, rel_tol=1e-10)
    assert math.isclose(metrics["value_error"].item(), expected_value, rel_tol=1e-10)
    assert all(float(e.max()) < 1e-12 for e in implicit_value_error(solution.logits, solution.logits, beta=beta))


def test_bandit_regret_is_beta_kl():
    """One state: J(π*) − J(π) = β KL(π ‖ π*) (spec §1), with π* from the closed-form solver."""
    bandit = Bandit(ref_logits=torch.tensor([0.5, -1.0, 2.0]), rewards=torch.tensor([1.0, 0.2, -0.4]))
    beta = 0.3
    star = solve_bandit(bandit.ref_logits, bandit.rewards, beta=beta)
    logits = torch.tensor([[0.1, 0.2, 0.3], [3.0, -1.0, 0.0]], dtype=torch.float64)  # two policies, a leading dim
    tree = as_tree(bandit)
    gap = regret([logits[:, None]], [star.logits[None]], tree.ref_logits, tree.rewards, beta=beta)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(gap, beta * (p * (p.log() - star.policy.log())).sum(-1), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Trainer: fixed points
# --------------------------------------------------------------------------------------------------


def test_shiq_on_exhaustive_data_reaches_the_exact_solution():
    """The whole pipeline: every path once, tabular logits, Adam on the shiq loss → ℓ* = ℓ_ref + q*/β
    (spec §3 fact 4: the unique zero of the shiq residual on all sequences), not only π*."""
    tree, beta = _tree(6, vocab=3, horizon=3), 0.5
    solution = solve_tree(tree, beta=beta)
    model = TabularLogits.from_tree(tree)
    evaluate = lambda tables: exact_metrics(tables, solution.logits, tree.ref_logits, tree.rewards, beta=beta)  # noqa: E731
    history = train(model, _frozen(tree), "shiq", beta=beta, steps=700, data=exhaustive_dataset(tree), lr=0.05, evaluate=evaluate, eval_every=350)
    assert max((x - y).abs().max().item() for x, y in zip(model.tables(), solution.logits)) < 1e-6
    assert history.steps == [0, 350, 700] and history.metrics["regret"].shape == (3,) and history.loss.shape == (700,)
    assert history.metrics["kl_target"][0] > 0.1 and abs(history.metrics["regret"][-1]) < 1e-10


@pytest.mark.parametrize("method", ["shiq_ms", "shifted_q", "shiq_init", "logit_q"])
def test_variants_reach_their_fixed_points(method):
    """Spec §3 table: shiq_ms → ℓ*; shifted_q and shiq_init → ln π_ref + q*/β (a per-state shift of ℓ*);
    logit_q → q* (dense rewards, γ = 0.9, every path once)."""
    tree, beta, gamma = _tree(7, vocab=2, horizon=2, reward="dense"), 0.5, 0.9
    solution = solve_tree(tree, beta=beta, gamma=gamma)
    target = {
        "shiq_ms": solution.logits,
        "logit_q": solution.q,
    }.get(method, [torch.log_softmax(r, -1) + q / beta for r, q in zip(tree.ref_logits, solution.q)])
    model = TabularLogits.from_tree(tree)
    train(model, _frozen(tree), method, beta=beta, gamma=gamma, steps=800, data=exhaustive_dataset(tree), lr=0.05)
    assert max((x - y).abs().max().item() for x, y in zip(model.tables(), target)) < 1e-6


def _bandit_data(seed: int, rewards, probs, noise: float, num: int):
    bandit = Bandit(ref_logits=torch.tensor([0.3, -0.2, 0.5, 0.0]), rewards=torch.tensor(rewards), noise_std=noise)
    data = sample_dataset(bandit, num, generator=torch.Generator().manual_seed(seed), policy=torch.tensor(probs, dtype=torch.float64))
    arms = data.tokens[:, 0]
    means = torch.stack([data.rewards[arms == a, 0].mean() if bool((arms == a).any()) else torch.tensor(0.0, dtype=torch.float64) for a in range(4)])
    return bandit, data, means


def test_bandit_reduction_on_covered_arms():
    """Spec §3 fact 5: on one state shiq = β(ℓ(a) − ℓ_ref(a)) − r, so full-batch training drives ℓ(a) to
    ℓ_ref(a) + r̄(a)/β (r̄: the arm's mean observed reward) on every covered arm; an arm the behaviour
    policy never plays gets no gradient and keeps ℓ_ref."""
    beta = 0.25
    bandit, data, means = _bandit_data(0, [1.0, 0.5, -0.3, 2.0], [0.5, 0.3, 0.2, 0.0], 0.4, 200)
    model = TabularLogits.from_bandit(bandit)
    train(model, _frozen([bandit.ref_logits[None]]), "shiq", beta=beta, steps=600, data=data, lr=0.05)
    learned = model.tables()[0][0]
    torch.testing.assert_close(learned[:3], bandit.ref_logits[:3] + means[:3] / beta, rtol=0, atol=1e-6)
    assert learned[3] == bandit.ref_logits[3]


def test_baseline_fixed_points_on_a_bandit():
    """Offline, noisy rewards, all arms covered, r̄ the per-arm means, π̂* ∝ π_ref exp(r̄/β):
    - copg with all pairs: Σ_pairs ½(u_i − u_j)² with u_n = R_n − βΔ(arm_n) equals ½(N Σu² − (Σu)²) =
      ½N² · (empirical variance of u), minimal over the per-arm βΔ(a) iff βΔ(a) = r̄(a) + c: π → π̂*.
    - dro: V + βΔ(a) = r̄(a) is attainable with V = v̂* = β ln Σ π_ref exp(r̄/β): π → π̂*, V → v̂*.
    - dpo, two arms: only pairs of different arms have a gradient; with k wins of arm 0 among m such pairs
      the loss is −k ln σ(z) − (m − k) ln σ(−z), minimal at z = β(Δ0 − Δ1) = logit(k/m) (Bradley–Terry).
    """
    beta = 0.5
    bandit, data, means = _bandit_data(1, [1.0, 0.5, -0.3, 0.2], [0.25, 0.25, 0.25, 0.25], 0.5, 120)
    ref = _frozen([bandit.ref_logits[None]])
    target = solve_bandit(bandit.ref_logits, means, beta=beta)
    for method in ("copg", "dro"):
        model = TabularLogits.from_bandit(bandit)
        history = train(model, ref, method, beta=beta, steps=800, data=data, lr=0.05, pair_mode="all", evaluate=lambda t: {}, eval_every=800)
        torch.testing.assert_close(torch.softmax(model.tables()[0][0], -1), target.policy, rtol=0, atol=1e-6)
        assert history.steps == [0, 800]

    two = Bandit(ref_logits=torch.tensor([0.0, 1.0]), rewards=torch.tensor([0.3, 0.0]), noise_std=1.0)
    data = sample_dataset(two, 60, generator=torch.Generator().manual_seed(2))
    model = TabularLogits.from_bandit(two)
    train(model, _frozen([two.ref_logits[None]]), "dpo", beta=beta, steps=800, data=data, lr=0.05, pair_mode="all")
    arms, rewards = data.tokens[:, 0], data.rewards[:, 0]
    wins = sum(1 for i in range(60) for j in range(60) if arms[i] == 0 and arms[j] == 1 and rewards[i] > rewards[j])
    cross = int((arms == 0).sum()) * int((arms == 1).sum())
    delta = torch.log_softmax(model.tables()[0][0], -1) - torch.log_softmax(two.ref_logits, -1)
    assert 0 < wins < cross
    assert math.isclose(beta * (delta[0] - delta[1]).item(), math.log(wins / (cross - wins)), abs_tol=1e-6)


# --------------------------------------------------------------------------------------------------
# Trainer: vectorised copies, minibatches, online data, bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["shiq", "dro", "dpo", "logit_q"])
def test_vectorised_copies_equal_separate_runs(method):
    """C stacked copies (each with its own tree and data) = C separate runs: same tables, metrics, losses."""
    beta, copies = 0.5, 3
    trees = [_tree(10 + c) for c in range(copies)]
    datasets = [sample_dataset(t, 16, generator=torch.Generator().manual_seed(c), reward_noise=0.3) for c, t in enumerate(trees)]
    solutions = [solve_tree(t, beta=beta) for t in trees]
    ref_levels = stack_levels([t.ref_logits for t in trees])
    stacked_target, stacked_rewards = stack_levels([s.logits for s in solutions]), stack_levels([t.rewards for t in trees])
    model = TabularLogits(ref_levels)
    evaluate = lambda tables: exact_metrics(tables, stacked_target, ref_levels, stacked_rewards, beta=beta)  # noqa: E731
    together = train(model, _frozen(ref_levels), method, beta=beta, steps=40, data=stack_datasets(datasets), evaluate=evaluate, eval_every=20)
    for c, tree in enumerate(trees):
        alone = TabularLogits.from_tree(tree)
        evaluate_c = lambda tables: exact_metrics(tables, solutions[c].logits, tree.ref_logits, tree.rewards, beta=beta)  # noqa: E731
        history = train(alone, _frozen(tree), method, beta=beta, steps=40, data=datasets[c], evaluate=evaluate_c, eval_every=20)
        for x, y in zip(model.tables(), alone.tables()):
            torch.testing.assert_close(x[c], y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(together.loss[:, c], history.loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(together.metrics["regret"][:, c], history.metrics["regret"], rtol=1e-10, atol=1e-12)


def test_online_copies_equal_separate_runs():
    """Online: copy c samples with generator c only, so stacked and separate runs see the same data."""
    beta, copies = 0.5, 2
    tree = _tree(20)
    model = TabularLogits.from_tree(tree, copies=copies)
    sampler = on_policy_sampler(tree, 8, generators=[torch.Generator().manual_seed(c) for c in range(copies)], reward_noise=0.2)
    together = train(model, _frozen(tree), "copg", beta=beta, steps=25, sampler=sampler)
    for c in range(copies):
        alone = TabularLogits.from_tree(tree)
        history = train(alone, _frozen(tree), "copg", beta=beta, steps=25, sampler=on_policy_sampler(tree, 8, generators=torch.Generator().manual_seed(c), reward_noise=0.2))
        torch.testing.assert_close(together.loss[:, c], history.loss, rtol=1e-12, atol=1e-14)
        for x, y in zip(model.tables(), alone.tables()):
            torch.testing.assert_close(x[c], y, rtol=1e-12, atol=1e-12)


def test_minibatches_follow_the_weights():
    """Minibatches are drawn with the sequence weights: with all weight on one path, only the logits on
    that path move (the shiq residual of a sequence involves the states of its own path only)."""
    tree, beta = _tree(21), 0.5
    data = exhaustive_dataset(tree)
    weights = torch.zeros(8, dtype=torch.float64)
    weights[5] = 1.0  # path (1, 0, 1)
    data = data._replace(weights=weights)
    model = TabularLogits.from_tree(tree)
    train(model, _frozen(tree), "shiq", beta=beta, steps=30, data=data, batch_size=4, generator=torch.Generator().manual_seed(0))
    on_path = {0: [0], 1: [1], 2: [2]}  # states visited by path (1, 0, 1): root, node 1, node 1·2 + 0 = 2
    for h, table in enumerate(model.tables()):
        for s in range(2**h):
            moved = not torch.equal(table[s], tree.ref_logits[h][s])
            assert moved == (s in on_path[h]), (h, s)


def test_train_bad_inputs():
    tree = _tree(0)
    data, ref = exhaustive_dataset(tree), _frozen(tree)
    model = TabularLogits.from_tree(tree)
    assert set(METHODS) == {"shiq", "shiq_init", "shiq_ms", "shiq_tk", "shifted_q", "logit_q", "dpo", "ipo", "copg", "dro"}
    with pytest.raises(ValueError, match="unknown method"):
        train(model, ref, "ppo", beta=1.0, steps=1, data=data)
    with pytest.raises(ValueError, match="exactly one of data"):
        train(model, ref, "shiq", beta=1.0, steps=1)
    with pytest.raises(ValueError, match="lr"):
        train(model, ref, "shiq", beta=1.0, steps=1, data=data, lr=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        train(model, ref, "shiq", beta=1.0, steps=1, data=data, optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch_size"):
        train(model, ref, "shiq", beta=1.0, steps=1, sampler=lambda t: data, batch_size=2)
    with pytest.raises(ValueError, match="gamma must be 1"):
        train(model, ref, "copg", beta=1.0, gamma=0.9, steps=1, data=data)
    with pytest.raises(ValueError, match="beta"):
        train(model, ref, "shiq", beta=0.0, steps=1, data=data)
    with pytest.raises(ValueError, match="stacks 2 copies"):
        train(TabularLogits.from_tree(tree, copies=3), ref, "shiq", beta=1.0, steps=1, data=stack_datasets([data, data]))
    with pytest.raises(ValueError, match="equal rewards"):
        same = data._replace(rewards=torch.zeros_like(data.rewards))
        train(model, ref, "dpo", beta=1.0, steps=1, data=same)
    assert isinstance(train(model, ref, "shiq", beta=1.0, steps=0, data=data), History)
    from shiq_toy.train import dataset_loss

    with pytest.raises(ValueError, match="dro needs values"):
        dataset_loss(model, ref, "dro", data, beta=1.0)
