"""Slow float64 references of the residuals, written straight from spec §3 with Python loops.

Independent of ``shiq_toy.losses``: no compaction, no cumsum, no vectorisation. Each sequence is reduced to
its list of masked-in positions; "next" is the next element of that list; values after the last are 0.
Never imported by the library.
"""

from __future__ import annotations

import math

import torch


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
