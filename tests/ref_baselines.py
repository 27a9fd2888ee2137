"""Slow float64 references for shiq_toy.baselines, written from spec §4 with Python loops and ``math``.

Never imported by the library. Inputs are plain Python lists (or tensors converted with ``tolist()``).
"""

from __future__ import annotations

import math


def sequence_log_ratio_ref(logit, lse, ref_logit, ref_lse, mask) -> list[float]:
    """Δ(y) = Σ_t mask_t [(ℓ_t − vℓ_t) − (ℓref_t − vref_t)], one Python loop per sequence."""
    out = []
    for b in range(len(mask)):
        total = 0.0
        for t in range(len(mask[b])):
            if mask[b][t]:
                total += (logit[b][t] - lse[b][t]) - (ref_logit[b][t] - ref_lse[b][t])
        out.append(total)
    return out


def dpo_loss_ref(delta_w, delta_l, beta) -> list[float]:
    """−ln σ(z) = ln(1 + e^(−z)) with z = β(Δw − Δl), written in the overflow-safe two-branch form."""
    out = []
    for w, l in zip(delta_w, delta_l):
        z = beta * (w - l)
        out.append(math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z)))
    return out


def copg_loss_ref(delta_a, delta_b, reward_a, reward_b, beta) -> list[float]:
    """½ (R(y) − R(y') − β (Δ(y) − Δ(y')))²."""
    return [0.5 * (ra - rb - beta * (da - db)) ** 2 for da, db, ra, rb in zip(delta_a, delta_b, reward_a, reward_b)]


def dro_loss_ref(delta, reward, value, beta) -> list[float]:
    """½ (R − V(x) − β Δ(y))²."""
    return [0.5 * (r - v - beta * d) ** 2 for d, r, v in zip(delta, reward, value)]


def dro_grads_ref(delta, reward, value, beta, value_coef) -> tuple[list[float], list[float]]:
    """Hand derivatives of the split DRO losses, e = R − V − βΔ: ∂/∂Δ = −β e, ∂/∂V = −value_coef · e."""
    errors = [r - v - beta * d for d, r, v in zip(delta, reward, value)]
    return [-beta * e for e in errors], [-value_coef * e for e in errors]


def pairs_ref(prompt_ids, mode) -> list[tuple[int, int]]:
    """Pairs of responses of the same prompt by loops: 'all' every i < j; 'disjoint' consecutive ones."""
    if mode == "all":
        return [(i, j) for i in range(len(prompt_ids)) for j in range(i + 1, len(prompt_ids)) if prompt_ids[i] == prompt_ids[j]]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(p, []).append(i)
    pairs = []
    for members in groups.values():
        for k in range(0, len(members) - 1, 2):
            pairs.append((members[k], members[k + 1]))
    return sorted(pairs)


def preference_pairs_ref(prompt_ids, rewards, mode) -> list[tuple[int, int]]:
    """(winner, loser) for every pair of :func:`pairs_ref` with different rewards."""
    out = []
    for i, j in pairs_ref(prompt_ids, mode):
        if rewards[i] > rewards[j]:
            out.append((i, j))
        elif rewards[j] > rewards[i]:
            out.append((j, i))
    return out
