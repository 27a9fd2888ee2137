"""Spec §3 facts as properties on whole token trees: every root-to-leaf sequence, tabular logits.

A tabular "model" is a list over depth of (V**h, V) logit tables; on the (V**H, H) batch of all sequences
its per-token statistics are those of the rows at each position's state (``gather_levels``).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from shiq_toy.losses import LOSSES, RESIDUALS, token_stats
from shiq_toy.mdp import TokenTree, all_sequences, gather_levels, prefix_index, random_tree
from shiq_toy.solvers import solve_tree
from shiq_toy.testing.exact import fixed_point_logits, residuals_on_all_sequences
from shiq_toy.testing.strategies import betas as beta_values
from shiq_toy.testing.strategies import gammas as gamma_values
from shiq_toy.testing.strategies import tree_logits, trees

betas = beta_values(0.1, 5.0)
gammas = gamma_values(0.3)
# float64: residuals are sums of at most H = 4 terms of size O(|q*|/β · β) ≤ O(100); round-off ≪ 1e-9.
ZERO = dict(rtol=0.0, atol=1e-9)


def _next(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(x[:, 1:], (0, 1))  # x_{t+1}, 0 after the last token


# --------------------------------------------------------------------------------------------------
# Fact 2: every residual vanishes at its exact solution, on every sequence (on- or off-policy)
# --------------------------------------------------------------------------------------------------


@given(tree=trees(), beta=betas, gamma=gammas)
def test_every_residual_vanishes_at_its_fixed_point(tree, beta, gamma):
    """Each row is one sequence, and each is 0 on its own: so the residuals vanish under any data distribution,
    on-policy or off-policy, with no importance weights."""
    for name in RESIDUALS:
        logits = fixed_point_logits(tree, name, beta=beta, gamma=gamma)
        residual = residuals_on_all_sequences(tree, logits, name, beta=beta, gamma=gamma)
        torch.testing.assert_close(residual, torch.zeros_like(residual), **ZERO, msg=lambda m: f"{name}: {m}")


@given(tree=trees(), beta=betas, gamma=gammas)
def test_fixed_points_sample_pi_star_except_logit_q(tree, beta, gamma):
    """softmax(ℓ*) = softmax(ln π_ref + q*/β) = π*; softmax(q*) is not π* (logit_q needs π_ref and β)."""
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    for name in ("shiq", "shiq_init"):
        for h, logits in enumerate(fixed_point_logits(tree, name, beta=beta, gamma=gamma)):
            torch.testing.assert_close(torch.softmax(logits, -1), sol.policy[h], rtol=1e-10, atol=1e-12)


def test_logit_q_fixed_point_does_not_sample_pi_star():
    generator = torch.Generator().manual_seed(0)
    tree = random_tree(3, 2, generator=generator, reward="dense")
    sol = solve_tree(tree, beta=0.5)
    gap = (torch.softmax(sol.q[0], -1) - sol.policy[0]).abs().max()
    assert gap > 1e-2  # a random π_ref and β = 0.5 ≠ 1 move the policy well away from softmax(q*)


def test_fixed_points_cover_every_registered_residual():
    """Every registered residual has a fixed point in the table above; on a one-state tree with ℓ_ref = 0 and
    r = 1 (so q* = 1): ℓ* = 0 + 1/β = 1, ln π_ref + q*/β = ln ½ + 1, and q* = 1."""
    tree = TokenTree(ref_logits=[torch.zeros(1, 2)], rewards=[torch.ones(1, 2)])
    expected = {"shiq": 1.0, "shiq_ms": 1.0, "shiq_tk": 1.0, "shiq_init": 1.0 - math.log(2), "shifted_q": 1.0 - math.log(2), "logit_q": 1.0}
    assert set(RESIDUALS) == set(expected)
    for name in RESIDUALS:
        (level,) = fixed_point_logits(tree, name, beta=1.0, gamma=1.0)  # raises for a residual missing from the table
        torch.testing.assert_close(level, torch.full((1, 2), expected[name], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Fact 4: zero shiq residual on all sequences ⇔ ℓ = ℓ* exactly
# --------------------------------------------------------------------------------------------------


def logits_from_shiq_residual(tree: TokenTree, residual: torch.Tensor, *, beta: float, gamma: float) -> list[torch.Tensor]:
    """Rebuild the logits from the shiq residual on all sequences, so the residual determines ℓ (injective).

    Telescoping gives m_t = shiq_t − γ shiq_{t+1} = β(ℓ − ℓ_ref)(s_t, a_t) − r_t − γβ(vℓ − vref)(s_{t+1}).
    Every (s, a) lies on some sequence, so backward induction from the leaves (value 0 after the last
    token) solves for ℓ(s, a) = ℓ_ref(s, a) + (m + r + γβ(vℓ − vref)(s·a))/β, level by level.
    """
    vocab, horizon = tree.vocab_size, tree.horizon
    tokens = all_sequences(vocab, horizon)
    nodes = prefix_index(tokens, vocab)
    m = residual - gamma * _next(residual)  # (B, H)
    logits: list[torch.Tensor] = [None] * horizon
    shaped_next = None  # (vℓ − vref) of the level below, (V**(h+1),)
    for h in reversed(range(horizon)):
        table = torch.full((vocab**h, vocab), float("nan"), dtype=torch.float64)
        table[nodes[:, h], tokens[:, h]] = m[:, h]
        assert not table.isnan().any()  # every (s, a) of the level was reached
        target = table + tree.rewards[h]
        if shaped_next is not None:
            target = target + gamma * beta * shaped_next.view(vocab**h, vocab)
        logits[h] = tree.ref_logits[h] + target / beta
        shaped_next = torch.logsumexp(logits[h], -1) - torch.logsumexp(tree.ref_logits[h], -1)
    return logits


@given(tree=trees(), beta=betas, gamma=gammas, data=st.data())
def test_shiq_residual_determines_the_logits(tree, beta, gamma, data):
    """Logits near ℓ* and far from it are rebuilt from their shiq residual."""
    logits = data.draw(tree_logits(tree, beta=beta, gamma=gamma))
    residual = residuals_on_all_sequences(tree, logits, "shiq", beta=beta, gamma=gamma)
    rebuilt = logits_from_shiq_residual(tree, residual, beta=beta, gamma=gamma)
    for h in range(tree.horizon):
        torch.testing.assert_close(rebuilt[h], logits[h], rtol=1e-9, atol=1e-9)


@given(tree=trees(), beta=betas, gamma=gammas)
def test_zero_shiq_residual_rebuilds_exactly_l_star(tree, beta, gamma):
    """⇒: the only logits with zero shiq residual everywhere are rebuilt from zeros, and they are ℓ*."""
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    zeros = torch.zeros(tree.vocab_size**tree.horizon, tree.horizon, dtype=torch.float64)
    rebuilt = logits_from_shiq_residual(tree, zeros, beta=beta, gamma=gamma)
    for h in range(tree.horizon):
        torch.testing.assert_close(rebuilt[h], sol.logits[h], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.softmax(rebuilt[h], -1), sol.policy[h], rtol=1e-10, atol=1e-12)


@given(tree=trees(), beta=betas, gamma=gammas, seed=st.integers(0, 2**31 - 1))
def test_per_state_shift_is_seen_by_shiq_but_not_by_the_policy(tree, beta, gamma, seed):
    """ℓ = ℓ* + c(s): same policy π*, but shiq_t = β c(s_t) exactly (ρ is shift-invariant, vℓ moves by c).
    shiq_tk only sees the root: it stays 0 when c(root) = 0, so it fixes the policy, not the logits."""
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    generator = torch.Generator().manual_seed(seed)
    shifts = [torch.randn(x.shape[0], generator=generator, dtype=torch.float64) for x in sol.logits]
    shifts[0] = torch.zeros(1, dtype=torch.float64)
    shifted = [x + c[:, None] for x, c in zip(sol.logits, shifts)]
    tokens = all_sequences(tree.vocab_size, tree.horizon)
    expected = beta * gather_levels(shifts, tokens, vocab_size=tree.vocab_size)  # (B, H): β c(s_t)
    shiq = residuals_on_all_sequences(tree, shifted, "shiq", beta=beta, gamma=gamma)
    torch.testing.assert_close(shiq, expected, rtol=1e-9, atol=1e-9)
    tk = residuals_on_all_sequences(tree, shifted, "shiq_tk", beta=beta, gamma=gamma)
    torch.testing.assert_close(tk, torch.zeros_like(tk), **ZERO)
    for h in range(tree.horizon):
        torch.testing.assert_close(torch.softmax(shifted[h], -1), sol.policy[h], rtol=1e-10, atol=1e-12)


@given(tree=trees(), beta=betas, gamma=gammas)
def test_shiq_and_shiq_init_pin_different_shifts_of_the_same_policy(tree, beta, gamma):
    """shiq's fixed point ℓ* and shiq_init's ln π_ref + q*/β = ℓ* − vref(s) give the same π*, yet each residual
    is non-zero at the other's: shiq_t = −β vref(s_t) at ln π_ref + q*/β, and shiq_init_t = β vref(s_t) at ℓ*."""
    vref = [torch.logsumexp(x, -1) for x in tree.ref_logits]  # (V**h,)
    tokens = all_sequences(tree.vocab_size, tree.horizon)
    beta_vref = beta * gather_levels(vref, tokens, vocab_size=tree.vocab_size)  # (B, H)
    init_point = fixed_point_logits(tree, "shiq_init", beta=beta, gamma=gamma)  # ln π_ref + q*/β
    l_star = fixed_point_logits(tree, "shiq", beta=beta, gamma=gamma)  # ℓ_ref + q*/β
    at_init_point = residuals_on_all_sequences(tree, init_point, "shiq", beta=beta, gamma=gamma)
    at_l_star = residuals_on_all_sequences(tree, l_star, "shiq_init", beta=beta, gamma=gamma)
    torch.testing.assert_close(at_init_point, -beta_vref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(at_l_star, beta_vref, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Fact 1 (telescoping) and fact 3 (initialisation) on trees
# --------------------------------------------------------------------------------------------------


@given(tree=trees(), beta=betas, gamma=gammas, data=st.data())
def test_telescoping_on_random_logits(tree, beta, gamma, data):
    """shiq_t − γ shiq_{t+1} = shiq_ms_t and shiq_init_t − γ shiq_init_{t+1} = shifted_q_t (0 after the end),
    on logits near the exact solution and far from it."""
    logits = data.draw(tree_logits(tree, beta=beta, gamma=gamma))
    names = ("shiq", "shiq_ms", "shiq_init", "shifted_q")
    res = {name: residuals_on_all_sequences(tree, logits, name, beta=beta, gamma=gamma) for name in names}
    torch.testing.assert_close(res["shiq"] - gamma * _next(res["shiq"]), res["shiq_ms"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res["shiq_init"] - gamma * _next(res["shiq_init"]), res["shifted_q"], rtol=1e-9, atol=1e-9)


@given(tree=trees(), beta=betas, gamma=gammas)
def test_initialisation_at_reference_with_zero_reward(tree, beta, gamma):
    """ℓ = ℓ_ref, r ≡ 0: solve_tree gives ℓ* = ℓ_ref; shiq and shiq_ms are 0 with zero gradient;
    shiq_init_t = β vref(s_t) and shifted_q_t = β (vref(s_t) − γ vref(s_{t+1}))."""
    tree = TokenTree(ref_logits=tree.ref_logits, rewards=[torch.zeros_like(r) for r in tree.rewards])
    logits = [x.clone().requires_grad_(True) for x in tree.ref_logits]
    for name in ("shiq", "shiq_ms"):
        residual = residuals_on_all_sequences(tree, logits, name, beta=beta, gamma=gamma)
        torch.testing.assert_close(residual.detach(), torch.zeros_like(residual), **ZERO)
        grads = torch.autograd.grad(residual.square().sum(), logits)
        assert all(float(g.abs().max()) <= 1e-12 for g in grads)
    tokens = all_sequences(tree.vocab_size, tree.horizon)
    vref = [torch.logsumexp(x, -1) for x in tree.ref_logits]  # (V**h,)
    beta_vref = beta * gather_levels(vref, tokens, vocab_size=tree.vocab_size)  # (B, H)
    init = residuals_on_all_sequences(tree, tree.ref_logits, "shiq_init", beta=beta, gamma=gamma)
    shifted = residuals_on_all_sequences(tree, tree.ref_logits, "shifted_q", beta=beta, gamma=gamma)
    torch.testing.assert_close(init, beta_vref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(shifted, beta_vref - gamma * _next(beta_vref), rtol=1e-10, atol=1e-10)
    sol = solve_tree(tree, beta=beta, gamma=gamma)
    for h in range(tree.horizon):
        torch.testing.assert_close(sol.logits[h], tree.ref_logits[h], rtol=0, atol=1e-12)


def test_losses_registry_matches_residuals_on_a_tree():
    """LOSSES[name] is Σ_t residual² per sequence: at ℓ* it is 0 for shiq, and > 0 at ℓ_ref on a rewarded tree."""
    tree = random_tree(2, 3, generator=torch.Generator().manual_seed(3), reward="terminal")
    tokens = all_sequences(2, 3)
    ref_stats = token_stats(gather_levels(tree.ref_logits, tokens), tokens)
    rewards = gather_levels(tree.rewards, tokens).gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    sol = solve_tree(tree, beta=0.5)
    at_star = LOSSES["shiq"](token_stats(gather_levels(sol.logits, tokens), tokens), ref_stats, rewards, mask, beta=0.5)
    at_ref = LOSSES["shiq"](ref_stats, ref_stats, rewards, mask, beta=0.5)
    assert float(at_star.abs().max()) <= 1e-18  # squares of residuals ≤ 1e-9
    # at ℓ = ℓ_ref with γ = 1 every residual equals −R(y) (β terms vanish), so the loss is 3 R(y)² per sequence
    torch.testing.assert_close(at_ref, 3 * rewards[:, -1] ** 2, rtol=1e-12, atol=1e-12)
