"""Exact soft-optimal solutions of the regularised MDPs of :mod:`shiq_toy.mdp` (spec §1).

For ``β > 0`` and ``γ ∈ (0, 1]`` the solution of ``max_π E_π[Σ_t γ^t (r_t − β KL(π(·|s_t) ‖ π_ref(·|s_t)))]`` is

    q*(s, a) = r(s, a) + γ v*(s')                                  (v* = 0 at a terminal state)
    v*(s)    = β ln Σ_a π_ref(a|s) exp(q*(s, a)/β)  = β (vℓ*(s) − vref(s))
    π*(a|s)  = π_ref(a|s) exp((q*(s, a) − v*(s))/β) = softmax(ℓ*(s, ·))(a)
    ℓ*(s, a) = ℓ_ref(s, a) + q*(s, a)/β                           (ShiQ's fixed point)

where ``vℓ*(s) = ln Σ_a exp ℓ*(s, a)`` and ``vref(s) = ln Σ_a exp ℓ_ref(s, a)``. Shapes: ``K`` arms, ``V``
tokens, ``H`` depth, ``S`` states, ``A`` actions. Everything runs in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from shiq_toy.checks import check_beta, check_gamma
from shiq_toy.mdp import FiniteMDP, TokenTree

__all__ = ["Solution", "BanditSolution", "solve_bandit", "solve_tree", "soft_value_iteration"]


class Solution(NamedTuple):
    """Soft-optimal solution of a :class:`TokenTree`; lists over depth ``h = 0..H-1``.

    q:      (V**h, V) q*(s, a) = r(s, a) + γ v*(child)
    v:      (V**h,)   v*(s) = β ln Σ_a π_ref(a|s) exp(q*(s, a)/β)
    policy: (V**h, V) π*(a|s) = π_ref(a|s) exp((q* − v*)/β)
    logits: (V**h, V) ℓ* = ℓ_ref + q*/β, with softmax(ℓ*) = π*
    """

    q: list[torch.Tensor]
    v: list[torch.Tensor]
    policy: list[torch.Tensor]
    logits: list[torch.Tensor]


class BanditSolution(NamedTuple):
    """Soft-optimal solution of a bandit: q (K,) = r, v (0-dim), policy (K,), logits (K,) = ℓ_ref + r/β."""

    q: torch.Tensor
    v: torch.Tensor
    policy: torch.Tensor
    logits: torch.Tensor


def _exp_shifted(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out ← exp(x − m) with m = max_a x (N, 1); returns (m, Σ_a out) so that logsumexp_a x = m + ln Σ_a out."""
    top = x.amax(dim=-1, keepdim=True)  # (N, 1)
    torch.sub(x, top, out=out).exp_()
    return top, out.sum(dim=-1, keepdim=True)


def _soft_step(ref_logits: torch.Tensor, q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One soft Bellman backup on rows of states: (N, A) ``ℓ_ref``, (N, A) ``q*`` -> (v* (N,), π* (N, A), ℓ* (N, A)).

    ℓ* = ℓ_ref + q*/β;  v* = β (logsumexp ℓ* − logsumexp ℓ_ref);  π* = exp(ℓ* − logsumexp ℓ*).
    Memory: the two outputs are the only (N, A) allocations (the policy buffer doubles as scratch), which
    matters on trees of 10^7 states where every fresh allocation costs page faults.
    """
    logits = torch.add(ref_logits, q, alpha=1.0 / beta)  # (N, A)
    policy = torch.empty_like(logits)
    ref_top, ref_total = _exp_shifted(ref_logits, out=policy)
    top, total = _exp_shifted(logits, out=policy)  # policy = exp(ℓ* − max ℓ*)
    v = beta * ((top - ref_top) + (total / ref_total).log()).squeeze(-1)  # (N,)
    return v, policy.div_(total), logits


def solve_bandit(ref_logits: torch.Tensor, rewards: torch.Tensor, *, beta: float) -> BanditSolution:
    """Closed form of the one-state problem: ``π*(a) ∝ π_ref(a) exp(r(a)/β)``.

    ref_logits, rewards: (K,). Returns q = r (K,), v = β ln Σ_a π_ref(a) exp(r(a)/β) (0-dim),
    policy π* (K,), logits ℓ* = ℓ_ref + r/β (K,).
    """
    check_beta(beta)
    if not isinstance(ref_logits, torch.Tensor) or ref_logits.dim() != 1 or ref_logits.numel() < 1:
        raise ValueError(f"ref_logits must be a (K,) tensor, got {ref_logits!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.shape != ref_logits.shape:
        raise ValueError(f"rewards must have the shape of ref_logits {tuple(ref_logits.shape)}, got {rewards!r}")
    ref_logits, rewards = ref_logits.to(torch.float64), rewards.to(torch.float64)
    v, policy, logits = _soft_step(ref_logits[None], rewards[None], beta)
    return BanditSolution(q=rewards.clone(), v=v[0], policy=policy[0], logits=logits[0])


def solve_tree(tree: TokenTree, *, beta: float, gamma: float = 1.0) -> Solution:
    """Backward induction over the levels of a :class:`TokenTree`, vectorised by level.

    From the leaves (v* = 0 after the last token) to the root: q*_h = r_h + γ v*_{h+1}.view(V**h, V),
    then the soft backup of :func:`_soft_step` on all ``V**h`` states at once. Cost and memory are linear
    in the number of states; the Python loop runs over the H levels only.
    """
    if not isinstance(tree, TokenTree):
        raise ValueError(f"tree must be a shiq_toy.mdp.TokenTree, got {type(tree).__name__}")
    check_beta(beta)
    check_gamma(gamma)
    vocab, horizon = tree.vocab_size, tree.horizon
    q, v, policy, logits = [None] * horizon, [None] * horizon, [None] * horizon, [None] * horizon
    for h in reversed(range(horizon)):
        if h == horizon - 1:
            q[h] = tree.rewards[h].clone()
        else:
            q[h] = torch.add(tree.rewards[h], v[h + 1].view(vocab**h, vocab), alpha=gamma)  # (V**h, V)
        v[h], policy[h], logits[h] = _soft_step(tree.ref_logits[h], q[h], beta)
    return Solution(q=q, v=v, policy=policy, logits=logits)


def soft_value_iteration(
    mdp: FiniteMDP, *, beta: float, gamma: float, tol: float = 1e-10, max_iter: int = 100_000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft value iteration on a :class:`FiniteMDP` with ``γ < 1``: v ← β ln Σ_a π_ref(a|s) exp((r + γ v(s'))/β).

    The backup is a γ-contraction in the sup norm; it stops once ‖v_{k+1} − v_k‖∞ ≤ tol (1 − γ)/γ, which
    guarantees ‖v − v*‖∞ ≤ tol. Returns q* (S, A), v* (S,), π* (S, A); terminal states get v* = 0,
    q* = 0 and π* = π_ref. Raises RuntimeError if ``max_iter`` sweeps do not reach ``tol``.
    """
    if not isinstance(mdp, FiniteMDP):
        raise ValueError(f"mdp must be a shiq_toy.mdp.FiniteMDP, got {type(mdp).__name__}")
    check_beta(beta)
    check_gamma(gamma, allow_one=False)
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    live = ~mdp.terminal  # (S,)
    threshold = tol * (1.0 - gamma) / gamma
    v = torch.zeros(mdp.num_states, dtype=torch.float64)
    for _ in range(max_iter):
        q = mdp.rewards + gamma * v[mdp.next_state]  # (S, A)
        v_new, _, _ = _soft_step(mdp.ref_logits, q, beta)
        v_new = torch.where(live, v_new, 0.0)
        change = float((v_new - v).abs().max())
        v = v_new
        if change <= threshold:
            break
    else:
        raise RuntimeError(f"soft value iteration did not reach tol={tol} in {max_iter} sweeps (last change {change:.3e})")
    q = torch.where(live[:, None], mdp.rewards + gamma * v[mdp.next_state], 0.0)
    _, policy, _ = _soft_step(mdp.ref_logits, q, beta)
    return q, v, policy
