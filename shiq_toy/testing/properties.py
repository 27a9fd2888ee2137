"""The properties of the oracle and the variants it knows: one table, no hypothesis needed to read it.

A variant is a name of ``shiq_toy.losses.RESIDUALS`` (per-token statistics in) or a baseline of
``shiq_toy.baselines`` (sequence log-ratios in); each row below says which property claims apply to it.
"""

from __future__ import annotations

from shiq_toy.losses import RESIDUALS

__all__ = ["PROPERTIES", "BASELINES", "VARIANTS", "ZERO_AT_INIT", "TELESCOPES", "CHECKS", "BASELINE_CHECKS"]

PROPERTIES = ("reference", "fixed_point", "initialisation", "telescoping", "mask", "gradient")
BASELINES = ("dpo", "copg", "dro")
VARIANTS = tuple(RESIDUALS) + BASELINES
#: Variants that are 0 with zero gradient at ℓ = ℓ_ref, r ≡ 0 (spec §3 fact 3).
ZERO_AT_INIT = ("shiq", "shiq_ms", "shiq_tk")
#: Telescoping partner of each variant: ("difference", one-step) for a multi-step residual, ("sum", multi-step)
#: for a one-step one, ("first", one-step) for shiq_tk (its one equation is the discounted sum of shiq_ms).
TELESCOPES = {
    "shiq": ("difference", "shiq_ms"),
    "shiq_init": ("difference", "shifted_q"),
    "shiq_ms": ("sum", "shiq"),
    "shifted_q": ("sum", "shiq_init"),
    "shiq_tk": ("first", "shiq_ms"),
}
CHECKS = {
    "reference": "equals the slow float64 reference on random batches (holes, padding, β, γ)",
    "fixed_point": "at the exact solution of random token trees (solve_tree), on every sequence",
    "initialisation": "0 with zero gradient at ℓ = ℓ_ref, r ≡ 0",
    "telescoping": "multi-step against one-step (spec §3 fact 1)",
    "mask": "garbage at masked-out positions and holes change nothing",
    "gradient": "torch.autograd.gradcheck against finite differences",
}
#: What each property checks on a baseline (sequence-level inputs).
BASELINE_CHECKS = {
    **CHECKS,
    "reference": "equals the slow float64 reference on random log-ratios, rewards, values and β",
    "fixed_point": "at the exact solution of random token trees (γ = 1): DPO = −ln σ(R_w − R_l), CoPG = DRO = 0",
}
