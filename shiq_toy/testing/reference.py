"""The independent slow references: spec §3–4 written with Python loops and floats, in float64.

This is what :mod:`shiq_toy.testing` checks an implementation against, and what the library's own tests
check ``shiq_toy.losses`` and ``shiq_toy.baselines`` against. It is written from the spec, not from the fast
code: no compaction, no cumsum, no vectorisation. Each sequence is reduced to its list of masked-in positions;
"next" is the next element of that list; values after the last are 0. The fast code never imports it.

Residuals take TokenStats of (B, T) tensors like :data:`shiq_toy.losses.RESIDUALS`; the baselines take plain
Python lists (or tensors converted with ``tolist()``).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "residual_reference",
    "soft_value_reference",
    "next_on_mask",
    "discounted_sum_on_mask",
    "sequence_log_ratio_ref",
    "dpo_loss_ref",
    "copg_loss_ref",
    "dro_loss_ref",
    "dro_grads_ref",
    "pairs_ref",
    "preference_pairs_ref",
]


def _rows(policy, ref, rewards, mask):
    """Yield (b, positions, l, vl, lr, vr, r) with Python floats at the masked-in positions of row b."""
    for b in range(mask.shape[0]):
        positions = [t for t in range(mask.shape[1]) if bool(mask[b, t])]
        pick = lambda x: [float(x[b, t]) for t in positions]  # noqa: E731
        yield b, positions, pick(policy[0]), pick(policy[1]), pick(ref[0]), pick(ref[1]), pick(rewards)


def _disc(x, j, gamma):
    """Σ_{k=j}^{n-1} γ^(k−j) x_k."""
    return sum(gamma ** (k - j) * x[k] for k in range(j, len(x)))


def residual_reference(name, policy, ref, rewards, mask, *, beta, gamma=1.0, soft_value=None):
    """(B, T) float64 residual ``name`` computed by loops; 0 at masked-out positions."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b, positions, l, vl, lr, vr, r in _rows(policy, ref, rewards, mask):
        n = len(positions)
        rho = [(l[k] - vl[k]) - (lr[k] - vr[k]) for k in range(n)]
        after = lambda x, j: x[j + 1] if j + 1 < n else 0.0  # noqa: E731  value at the next state
        w = [float(soft_value[b, t]) for t in positions] if soft_value is not None else None
        for j, t in enumerate(positions):
            if name == "shiq":
                value = beta * (vl[j] - vr[j]) + beta * _disc(rho, j, gamma) - _disc(r, j, gamma)
            elif name == "shiq_init":
                value = beta * vl[j] + beta * _disc(rho, j, gamma) - _disc(r, j, gamma)
            elif name == "shiq_ms":
                value = beta * (l[j] - lr[j]) - r[j] - gamma * beta * (after(vl, j) - after(vr, j))
            elif name == "shiq_tk":
                value = beta * (vl[0] - vr[0]) + beta * _disc(rho, 0, gamma) - _disc(r, 0, gamma) if j == 0 else 0.0
            elif name == "shifted_q":
                value = beta * (l[j] - lr[j] + vr[j]) - r[j] - gamma * beta * after(vl, j)
            elif name == "logit_q":
                value = l[j] - r[j] - gamma * after(w, j)
            else:
                raise KeyError(name)
            out[b, t] = value
    return out


def soft_value_reference(logits, ref_logits, *, beta):
    """β ln Σ_a π_ref(a|s) exp(ℓ(s,a)/β) per (b, t), by explicit sums (no logsumexp helper)."""
    batch, length, vocab = logits.shape
    out = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            z_ref = sum(math.exp(float(ref_logits[b, t, a])) for a in range(vocab))
            total = sum(math.exp(float(ref_logits[b, t, a])) / z_ref * math.exp(float(logits[b, t, a]) / beta) for a in range(vocab))
            out[b, t] = beta * math.log(total)
    return out

def next_on_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x at the next masked-in position of each row, 0 after the last and at masked-out positions; (B, T)."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for row in range(mask.shape[0]):
        positions = [t for t in range(mask.shape[1]) if bool(mask[row, t])]
        for j, t in enumerate(positions[:-1]):
            out[row, t] = float(x[row, positions[j + 1]])
    return out


def discounted_sum_on_mask(x: torch.Tensor, mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """disc_t(x) = Σ_{k ≥ t} γ^(k−t) x_k over the masked-in positions of each row; 0 where masked out; (B, T)."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for row in range(mask.shape[0]):
        positions = [t for t in range(mask.shape[1]) if bool(mask[row, t])]
        values = [float(x[row, t]) for t in positions]
        for j, t in enumerate(positions):
            out[row, t] = _disc(values, j, gamma)
    return out


# --------------------------------------------------------------------------------------------------
# Baselines (spec §4), on plain Python lists
# --------------------------------------------------------------------------------------------------


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
