"""Deliberately wrong ShiQ residuals: one bug each, for the self-test of ``shiq-toy verify`` (tests/test_oracle.py).

Each is the ShiQ residual of spec §3, written row by row over the masked-in positions,

    residual_t = β (vℓ_t − vref_t) + β disc_t(ρ) − disc_t(r),     disc_t(x) = Σ_{k≥t} γ^(k−t) x_k,

with exactly one mistake; ``correct`` has none (the control). ``CAUGHT_BY`` names the property of
``shiq_toy.testing.oracle`` each one is written to break. Never imported by the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiq_toy.losses import discounted_reverse_cumsum


def _shiq_rows(policy, ref, rewards, mask, *, beta, gamma, bug=None):
    """(B, T) ShiQ residual with ``bug`` (None for the correct one), one row at a time."""
    rows = []
    for b in range(mask.shape[0]):
        keep = torch.ones_like(mask[b]) if bug == "missing_mask" else mask[b]  # the actions of this row
        logit, lse, ref_logit, ref_lse, reward = (x[b][keep] for x in (*policy, *ref, rewards))
        rho = (logit - lse) - (ref_logit - ref_lse)
        sign = 1.0 if bug == "flipped_sign" else -1.0
        shaped_return = discounted_reverse_cumsum(beta * rho + sign * reward, gamma=1.0 if bug == "dropped_gamma" else gamma)
        if bug == "stop_gradient":
            shaped_return = shaped_return.detach()
        shaping = beta * (lse - ref_lse)
        if bug == "shaping_at_next_state":
            shaping = F.pad(shaping[1:], (0, 1))  # β(vℓ − vref) of s_(t+1) instead of s_t
        if bug == "missing_shaping":
            shaping = beta * lse  # vref dropped: β vℓ_t
        row = torch.zeros(mask.shape[1], dtype=torch.float64).index_put((keep.nonzero().flatten(),), shaping + shaped_return)
        rows.append(torch.where(mask[b], row, 0.0))
    return torch.stack(rows)


def correct(policy, ref, rewards, mask, *, beta, gamma=1.0):
    """The ShiQ residual without a bug: passes every property."""
    return _shiq_rows(policy, ref, rewards, mask, beta=beta, gamma=gamma)


def flipped_sign(policy, ref, rewards, mask, *, beta, gamma=1.0):
    """+ disc_t(r) instead of − disc_t(r): a sign."""
    return _shiq_rows(policy, ref, rewards, mask, beta=beta, gamma=gamma, bug="flipped_sign")


def shaping_at_next_state(policy, ref, rewards, mask, *, beta, gamma=1.0):
    """The shaping term β(vℓ − vref) taken at s_(t+1) instead of s_t."""
    return _shiq_rows(policy, ref, rewards, mask, beta=beta, gamma=gamma, bug="shaping_at_next_state")


def missing_shaping(policy, ref, rewards, mask, *, beta, gamma=1.0):
    """The reference's log-sum-exp dropped from the shaping: β vℓ_t instead of β(vℓ_t − vref_t)."""
    return _shiq_rows(policy, ref, rewards, mask, beta=beta, gamma=gamma, bug="missing_shaping")


def dropped_gamma(policy, ref, rewards, mask, *, beta, gamma=1.0):
    """γ dropped from the discounted sums (γ = 1 whatever the argument)."""
    return _shiq_rows(policy, ref, rewards, mask, beta=beta, gamma=gamma, bug="dropped_gamma")


def missing_mask(policy, ref, rewards, mask, *, beta, gamma=1.0):
    """The sums run over every position (environment tokens and padding too); only the output is masked."""
    return _shiq_rows(policy, ref, rewards, mask, beta=beta, gamma=gamma, bug="missing_mask")


def stop_gradient(policy, ref, rewards, mask, *, beta, gamma=1.0):
    """The multi-step part detached: right values, wrong gradient (a target-network-style stop-gradient)."""
    return _shiq_rows(policy, ref, rewards, mask, beta=beta, gamma=gamma, bug="stop_gradient")


#: wrong implementation -> the property it is written to break
CAUGHT_BY = {
    "flipped_sign": "reference",
    "shaping_at_next_state": "fixed_point",
    "missing_shaping": "initialisation",
    "dropped_gamma": "telescoping",
    "missing_mask": "mask",
    "stop_gradient": "gradient",
}
