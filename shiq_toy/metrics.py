"""Exact evaluation of a tabular policy against the soft-optimal solution (spec §1).

Every function takes per-depth tables — lists over ``h = 0..H-1`` of ``(..., V**h, V)`` float64 tensors, the
leading ``(...)`` being shared batch dimensions (e.g. C stacked copies) — and computes by exact sums over
the tree, no sampling:

    π(·|s) = softmax(ℓ(s, ·));  d_π(s) = probability that π visits s  (d_π(root) = 1)
    KL_s   = KL(π(·|s) ‖ π*(·|s))
    V^π(s) = Σ_a π(a|s) [ r(s, a) − β ln(π(a|s)/π_ref(a|s)) + γ V^π(s·a) ],  V^π = 0 after depth H
    J(π)   = V^π(root);   regret = J(π*) − J(π) ≥ 0

For γ = 1 the regret equals β Σ_h E_{s ~ d_π}[KL_s] = β KL(π(y) ‖ π*(y)) over whole sequences (spec §1,
regularised regret identity); for a bandit it is β KL(π ‖ π*).

A :class:`~shiq_toy.mdp.FiniteMDP` (γ < 1, episodes of any length) is evaluated by linear solves instead
(:func:`mdp_policy_values`, :func:`mdp_occupancy`, :func:`mdp_regret`), with ``J(π) = Σ_s μ0(s) V^π(s)``.

Notation used for tensor shapes: ``V`` vocabulary, ``H`` depth, ``S`` states, ``A`` actions, ``(...)`` leading
batch dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shiq_toy.checks import check_beta, check_gamma
from shiq_toy.mdp import FiniteMDP

__all__ = [
    "state_distribution",
    "kl_per_state",
    "expected",
    "expected_kl",
    "policy_values",
    "regret",
    "implicit_value_error",
    "exact_metrics",
    "mdp_policy_values",
    "mdp_occupancy",
    "mdp_regret",
]

Levels = Sequence[torch.Tensor]


def _check_levels(**named: Levels) -> None:
    lengths = {name: len(levels) for name, levels in named.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all table lists must have the same number of levels H, got {lengths}")
    for name, levels in named.items():
        for h, x in enumerate(levels):
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] != x.shape[-1] ** h:
                raise ValueError(f"{name}[{h}] must have shape (..., V**{h}, V), got {tuple(getattr(x, 'shape', ()))}")


def state_distribution(policy: Levels) -> list[torch.Tensor]:
    """d_π over the states of each depth: policy[h] (..., V**h, V) probabilities -> list of (..., V**h).

    d_0 = 1 (root); d_{h+1}(n·V + a) = d_h(n) π(a|n).
    """
    _check_levels(policy=policy)
    dist = [torch.ones((*policy[0].shape[:-2], 1), dtype=policy[0].dtype)]
    for h in range(len(policy) - 1):
        dist.append((dist[h][..., :, None] * policy[h]).flatten(-2))  # (..., V**(h+1))
    return dist


def kl_per_state(logits: Levels, target_logits: Levels) -> list[torch.Tensor]:
    """KL(softmax(ℓ(s,·)) ‖ softmax(ℓ_target(s,·))) at every state: (..., V**h, V) tables -> (..., V**h)."""
    _check_levels(logits=logits, target_logits=target_logits)
    out = []
    for x, y in zip(logits, target_logits):
        log_p, log_q = torch.log_softmax(x, dim=-1), torch.log_softmax(y, dim=-1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return out


def expected(per_state: Levels, dist: Levels) -> torch.Tensor:
    """Σ_h Σ_s d_h(s) f_h(s): per-state values (..., V**h) summed over depths under a state distribution."""
    return sum((d * f).sum(-1) for d, f in zip(dist, per_state))


def expected_kl(logits: Levels, target_logits: Levels, *, under: str = "target") -> torch.Tensor:
    """Σ_h E_{s ~ d}[KL(π(·|s) ‖ π*(·|s))] with d the state distribution of π* (``under="target"``) or of π
    (``under="policy"``; this one is KL(π(y) ‖ π*(y)) over whole sequences). Returns (...)."""
    if under not in ("target", "policy"):
        raise ValueError(f"under must be 'target' or 'policy', got {under!r}")
    source = target_logits if under == "target" else logits
    dist = state_distribution([torch.softmax(x, dim=-1) for x in source])
    return expected(kl_per_state(logits, target_logits), dist)


def policy_values(logits: Levels, ref_logits: Levels, rewards: Levels, *, beta: float, gamma: float = 1.0) -> list[torch.Tensor]:
    """Regularised value V^π(s) of π = softmax(ℓ) at every state, by backward policy evaluation.

    logits, ref_logits, rewards: per-depth (..., V**h, V) (ref_logits/rewards may omit the leading dims).
    Returns a list over depth of (..., V**h); ``[0][..., 0]`` is J(π).
    """
    _check_levels(logits=logits, ref_logits=ref_logits, rewards=rewards)
    vocab = logits[0].shape[-1]
    values: list[torch.Tensor] = [None] * len(logits)  # type: ignore[list-item]
    after = None  # V^π at depth h + 1, (..., V**(h+1))
    for h in reversed(range(len(logits))):
        log_p = torch.log_softmax(logits[h], dim=-1)
        log_ref = torch.log_softmax(ref_logits[h], dim=-1)
        q = rewards[h] - beta * (log_p - log_ref)  # (..., V**h, V)
        if after is not None:
            q = q + gamma * after.unflatten(-1, (vocab**h, vocab))
        values[h] = (log_p.exp() * q).sum(-1)
        after = values[h]
    return values


def regret(logits: Levels, target_logits: Levels, ref_logits: Levels, rewards: Levels, *, beta: float, gamma: float = 1.0) -> torch.Tensor:
    """J(π*) − J(π), both by :func:`policy_values`; ``target_logits`` are ℓ* (softmax = π*). Returns (...)."""
    best = policy_values(target_logits, ref_logits, rewards, beta=beta, gamma=gamma)[0][..., 0]
    return best - policy_values(logits, ref_logits, rewards, beta=beta, gamma=gamma)[0][..., 0]


def implicit_value_error(logits: Levels, target_logits: Levels, *, beta: float) -> list[torch.Tensor]:
    """|β(vℓ(s) − vref(s)) − v*(s)| at every state: (..., V**h, V) tables -> (..., V**h) per depth.

    β(vℓ − vref) is the value a ShiQ model implies (spec §3, fact 6); since v*(s) = β(vℓ*(s) − vref(s)),
    the error is β |vℓ(s) − vℓ*(s)| and needs no reference. It is 0 at ℓ = ℓ*.
    """
    _check_levels(logits=logits, target_logits=target_logits)
    return [beta * (torch.logsumexp(x, -1) - torch.logsumexp(y, -1)).abs() for x, y in zip(logits, target_logits)]


def exact_metrics(
    logits: Levels, target_logits: Levels, ref_logits: Levels, rewards: Levels, *, beta: float, gamma: float = 1.0
) -> dict[str, torch.Tensor]:
    """The metrics the trainer records, each (...):

    regret       J(π*) − J(π)
    kl_target    Σ_h E_{s ~ d_π*}[KL(π ‖ π*)]      (the tree ablation's metric)
    kl_policy    Σ_h E_{s ~ d_π}[KL(π ‖ π*)]       (= regret/β when γ = 1)
    value_error  Σ_h E_{s ~ d_π*} |β(vℓ − vref) − v*|
    """
    kl = kl_per_state(logits, target_logits)  # what expected_kl computes, once for both distributions
    target_dist = state_distribution([torch.softmax(x, dim=-1) for x in target_logits])
    policy_dist = state_distribution([torch.softmax(x, dim=-1) for x in logits])
    return {
        "regret": regret(logits, target_logits, ref_logits, rewards, beta=beta, gamma=gamma),
        "kl_target": expected(kl, target_dist),
        "kl_policy": expected(kl, policy_dist),
        "value_error": expected(implicit_value_error(logits, target_logits, beta=beta), target_dist),
    }


# --------------------------------------------------------------------------------------------------
# Finite MDPs: exact policy evaluation by linear solves
# --------------------------------------------------------------------------------------------------


def _check_mdp_logits(mdp: FiniteMDP, logits: torch.Tensor) -> None:
    if not isinstance(mdp, FiniteMDP):
        raise ValueError(f"mdp must be a shiq_toy.mdp.FiniteMDP, got {type(mdp).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or tuple(logits.shape[-2:]) != tuple(mdp.next_state.shape):
        raise ValueError(f"logits must have shape (..., S, A) = (..., {mdp.num_states}, {mdp.num_actions}), got {tuple(getattr(logits, 'shape', ()))}")


def _transition(mdp: FiniteMDP, policy: torch.Tensor) -> torch.Tensor:
    """P_π[s, s'] = Σ_a π(a|s) [next(s, a) = s'] on live states, 0 in the rows of terminal states and the
    columns into them (their value is 0): (..., S, A) -> (..., S, S)."""
    num_states = mdp.num_states
    index = mdp.next_state.expand_as(policy)
    transition = torch.zeros((*policy.shape[:-1], num_states), dtype=policy.dtype).scatter_add_(-1, index, policy)
    live = (~mdp.terminal).to(policy.dtype)
    return transition * live[:, None] * live[None, :]


def mdp_policy_values(mdp: FiniteMDP, logits: torch.Tensor, *, beta: float, gamma: float) -> torch.Tensor:
    """Regularised value V^π of π = softmax(logits) at every state, by one linear solve:

        V^π(s) = Σ_a π(a|s) [ r(s, a) − β ln(π(a|s)/π_ref(a|s)) + γ V^π(s') ],  V^π = 0 at terminal states
        i.e. (I − γ P_π) V^π = r_π − β KL_π.

    logits: (..., S, A) -> (..., S). γ = 1 needs every policy to end its episodes (e.g. a tree as a
    FiniteMDP); otherwise the system is singular and torch raises.
    """
    _check_mdp_logits(mdp, logits)
    check_beta(beta)
    check_gamma(gamma)
    log_p = torch.log_softmax(logits.to(torch.float64), dim=-1)
    log_ref = torch.log_softmax(mdp.ref_logits, dim=-1)
    policy = log_p.exp()
    reward = (policy * (mdp.rewards - beta * (log_p - log_ref))).sum(-1) * (~mdp.terminal)  # (..., S)
    system = torch.eye(mdp.num_states, dtype=torch.float64) - gamma * _transition(mdp, policy)
    return torch.linalg.solve(system, reward)


def mdp_occupancy(mdp: FiniteMDP, logits: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Discounted state-action occupancy d(s, a) = Σ_t γ^t P_π(s_t = s, a_t = a) from s_0 ~ μ0 (``mdp.initial``),
    over live states (an episode ends on entering a terminal state): (..., S, A) -> (..., S, A).

    d_S = μ0 + γ P_πᵀ d_S solved for the state part, then d(s, a) = d_S(s) π(a|s). Σ_{s,a} d(s, a) is the
    expected discounted number of steps, and J(π) = Σ_{s,a} d(s, a) (r(s, a) − β ln π(a|s)/π_ref(a|s)).
    """
    _check_mdp_logits(mdp, logits)
    check_gamma(gamma)
    if mdp.initial is None:
        raise ValueError("mdp has no initial state distribution (FiniteMDP.initial is None)")
    policy = torch.softmax(logits.to(torch.float64), dim=-1)
    system = torch.eye(mdp.num_states, dtype=torch.float64) - gamma * _transition(mdp, policy)
    states = torch.linalg.solve(system.transpose(-1, -2), mdp.initial.expand(policy.shape[:-1]))  # (..., S)
    return states[..., None] * policy


def mdp_regret(mdp: FiniteMDP, logits: torch.Tensor, optimal_values: torch.Tensor, *, beta: float, gamma: float) -> torch.Tensor:
    """J(π*) − J(π) = Σ_s μ0(s) (v*(s) − V^π(s)) with ``optimal_values`` v* (S,) from
    :func:`shiq_toy.solvers.soft_value_iteration` and V^π from :func:`mdp_policy_values`. (..., S, A) -> (...)."""
    if mdp.initial is None:
        raise ValueError("mdp has no initial state distribution (FiniteMDP.initial is None)")
    if not isinstance(optimal_values, torch.Tensor) or tuple(optimal_values.shape) != (mdp.num_states,):
        raise ValueError(f"optimal_values must be v* of shape ({mdp.num_states},), got {tuple(getattr(optimal_values, 'shape', ()))}")
    values = mdp_policy_values(mdp, logits, beta=beta, gamma=gamma)
    return ((optimal_values - values) * mdp.initial).sum(-1)
