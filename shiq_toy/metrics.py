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

Notation used for tensor shapes: ``V`` vocabulary, ``H`` depth, ``(...)`` leading batch dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "state_distribution",
    "kl_per_state",
    "expected",
    "expected_kl",
    "policy_values",
    "regret",
    "implicit_value_error",
    "exact_metrics",
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
