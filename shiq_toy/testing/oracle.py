"""The oracle: check a user's residual or loss against the spec, property by property, with hypothesis.

    report = verify(my_shiq, "shiq")          # Report: one PropertyResult per property
    print(report.table())                     # property → pass / FAIL / n/a, then each counterexample
    check(my_shiq, "shiq")                    # the same, raising OracleFailure (an AssertionError) on a failure

The function under test has the signature of its variant:

* ShiQ-style variants (``shiq``, ``shiq_init``, ``shiq_ms``, ``shiq_tk``, ``shifted_q``, ``logit_q``), like
  ``shiq_toy.losses.RESIDUALS``: ``fn(policy: TokenStats, ref: TokenStats, rewards (B, T), mask (B, T) bool,
  *, beta, gamma) -> (B, T)`` per-token residuals (0 where masked out) or ``(B,)`` per-sequence losses
  ``Σ_t residual_t²`` (``logit_q`` also gets ``soft_value=`` (B, T)).
* Baselines, like ``shiq_toy.baselines``: ``dpo(log_ratio_chosen (P,), log_ratio_rejected (P,), *, beta)``,
  ``copg(log_ratio_a, log_ratio_b, reward_a, reward_b, *, beta)``, ``dro(log_ratio (B,), reward (B,),
  value (B,), *, beta)``, each returning one loss per pair or sequence.

The properties (spec §3–4), each run on ``max_examples`` hypothesis examples; a failure is shrunk to the smallest
counterexample hypothesis finds and reported with its inputs, the expected and the actual numbers:

* ``reference``: equals the slow float64 reference (:mod:`shiq_toy.testing.reference`) on random inputs.
* ``fixed_point``: at the exact solution of random token trees (``shiq_toy.solvers.solve_tree``) the residual is
  0 on every sequence (fact 2); the baselines take their value there (DPO: −ln σ(R_w − R_l); CoPG, DRO: 0).
* ``initialisation``: 0 with zero gradient at ℓ = ℓ_ref, r ≡ 0 (fact 3; shiq, shiq_ms, shiq_tk only).
* ``telescoping``: multi-step against one-step (fact 1): shiq_t − γ shiq_{t+1} = shiq_ms_t, shiq_init ↔
  shifted_q, shiq_tk = disc_1(shiq_ms); a one-step variant's discounted sum is the multi-step reference.
* ``mask``: what the mask excludes changes nothing: garbage at masked-out positions, and holes compared with
  the same sequence without them; residuals are 0 where masked out.
* ``gradient``: ``torch.autograd.gradcheck`` against finite differences (catches a stray stop-gradient).

Notation used for tensor shapes: ``B`` sequences, ``T`` positions, ``P`` pairs.
"""


from typing import Callable

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.reporting import with_reporter

from shiq_toy.losses import NEEDS_SOFT_VALUE, logit_q_soft_value, token_stats
from shiq_toy.testing.baseline_checks import baseline_properties
from shiq_toy.testing.failures import OracleFailure, PropertyResult, Report, call_under_test
from shiq_toy.testing.properties import BASELINE_CHECKS, BASELINES, CHECKS, PROPERTIES, VARIANTS
from shiq_toy.testing.token_checks import TokenTarget, token_properties

__all__ = ["PROPERTIES", "VARIANTS", "OracleFailure", "PropertyResult", "Report", "verify", "check"]


def _probe_kind(fn: Callable, variant: str) -> str:
    """Call ``fn`` once on a small fixed batch: "residual" for (B, T) output, "loss" for (B,)."""
    gen = torch.Generator().manual_seed(0)
    logits, ref_logits = (torch.randn(2, 3, 3, dtype=torch.float64, generator=gen) for _ in range(2))
    tokens = torch.randint(0, 3, (2, 3), generator=gen)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    rewards = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    extra = {"soft_value": logit_q_soft_value(logits, ref_logits, beta=0.5)} if variant in NEEDS_SOFT_VALUE else {}
    inputs = "  the fixed batch of shiq_toy.testing.oracle._probe_kind (B = 2, T = 3)"
    out = call_under_test("probe", fn, (token_stats(logits, tokens), token_stats(ref_logits, tokens), rewards, mask), dict(beta=0.5, gamma=0.9, **extra), inputs)
    if tuple(out.shape) == (2, 3):
        return "residual"
    if tuple(out.shape) == (2,):
        return "loss"
    raise OracleFailure(f"the function returned shape {tuple(out.shape)} for B = 2 sequences of T = 3 positions: expected (B, T) residuals or (B,) per-sequence losses")


def _run_property(check_fn: Callable, strategies: dict, max_examples: int, seed_value: int, shrink: bool) -> str:
    """Run one property under hypothesis; '' when it holds, else the message of the smallest counterexample."""
    hypothesis_settings = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    runner = hypothesis_settings(hypothesis_seed(seed_value)(given(**strategies)(check_fn)))
    try:
        with with_reporter(lambda message: None):
            runner()
    except OracleFailure as failure:
        return str(failure)
    return ""


def verify(
    fn: Callable,
    variant: str,
    *,
    max_examples: int = 40,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    properties: tuple[str, ...] = PROPERTIES,
    shrink: bool = True,
    target: str | None = None,
) -> Report:
    """Run the battery of properties on ``fn`` as ``variant`` (see the module docstring); returns a Report.

    rtol, atol: tolerances of every comparison (default: from the output's dtype, 1e-8 for float64, 1e-4 for
    float32). A function wrapped by :func:`shiq_toy.testing.adapters.from_numpy` skips the gradient checks.
    shrink=False reports the first failing example instead of the smallest (faster on a slow function).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    unknown = sorted(set(properties) - set(PROPERTIES))
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {', '.join(PROPERTIES)}")
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    autograd = not getattr(fn, "no_autograd", False)
    name = target or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    if variant in BASELINES:
        kind = "one loss per pair (P,)" if variant != "dro" else "one loss per sequence (B,)"
        props = baseline_properties(fn, variant, rtol, atol, autograd)
    else:
        try:
            kind = _probe_kind(fn, variant)
        except OracleFailure as failure:
            results = [PropertyResult(p, "FAIL", CHECKS[p], str(failure)) for p in PROPERTIES if p in properties]
            return Report(name, variant, "output not understood", max_examples, results, shrink)
        props = token_properties(TokenTarget(fn, variant, kind, rtol, atol, autograd))
        kind = "per-token residuals (B, T)" if kind == "residual" else "per-sequence losses (B,)"
    results = []
    for prop in PROPERTIES:
        if prop not in properties:
            continue
        spec = props[prop]
        if isinstance(spec, str):
            results.append(PropertyResult(prop, "n/a", spec))
            continue
        strategies, check_fn = spec
        examples = min(max_examples, 10) if prop == "gradient" else max_examples  # gradcheck costs 2·B·T calls
        message = _run_property(check_fn, strategies, examples, seed, shrink)
        detail = (BASELINE_CHECKS if variant in BASELINES else CHECKS)[prop]
        results.append(PropertyResult(prop, "FAIL" if message else "pass", detail, message))
    return Report(name, variant, kind, max_examples, results, shrink)


def check(fn: Callable, variant: str, **kwargs) -> Report:
    """:func:`verify`, raising :class:`OracleFailure` (an AssertionError) with the table when a property fails."""
    report = verify(fn, variant, **kwargs)
    if not report.ok:
        raise OracleFailure(report.table())
    return report
