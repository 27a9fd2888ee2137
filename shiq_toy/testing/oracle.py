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

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.reporting import with_reporter

from shiq_toy.losses import NEEDS_SOFT_VALUE, TokenStats, logit_q_soft_value, token_stats
from shiq_toy.solvers import solve_tree
from shiq_toy.testing import reference as ref_impl
from shiq_toy.testing.exact import fixed_point_logits, tree_batch
from shiq_toy.testing.properties import BASELINE_CHECKS, BASELINES, CHECKS, PROPERTIES, TELESCOPES, VARIANTS, ZERO_AT_INIT
from shiq_toy.testing.strategies import Batch, batches, betas, finite_floats, gammas, trees

__all__ = ["PROPERTIES", "VARIANTS", "OracleFailure", "PropertyResult", "Report", "verify", "check"]

class OracleFailure(AssertionError):
    """A property broke: the message names it and shows the counterexample, expected and actual numbers."""


@dataclass(frozen=True)
class PropertyResult:
    name: str
    status: str  # "pass", "FAIL" or "n/a"
    detail: str  # what was checked, or why it does not apply
    counterexample: str = ""


@dataclass
class Report:
    target: str
    variant: str
    output: str
    examples: int
    results: list[PropertyResult] = field(default_factory=list)
    shrunk: bool = True

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if r.status == "FAIL"]

    def table(self) -> str:
        """property → pass / FAIL / n/a, then the counterexample of each failure."""
        lines = [f"verify {self.target} as {self.variant}: {self.output}; {self.examples} hypothesis examples per property", ""]
        lines.append(f"{'property':<16}{'result':<8}checks")
        lines += [f"{r.name:<16}{r.status:<8}{r.detail}" for r in self.results]
        failed = self.failed
        lines += ["", f"{len(failed)} of {sum(r.status != 'n/a' for r in self.results)} properties failed" if failed else "all properties pass"]
        for r in self.results:
            if r.status == "FAIL":
                lines += ["", f"--- {r.name}: {'smallest counterexample found' if self.shrunk else 'first counterexample found'} ---", r.counterexample]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Formatting and comparison
# --------------------------------------------------------------------------------------------------


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fmt(x) -> str:
    text = np.array2string(_np(x), precision=6, suppress_small=True, max_line_width=110, threshold=120)
    return text.replace("\n", "\n" + " " * 22)


def _inputs(**named) -> str:
    return "\n".join(f"  {name:<20}{_fmt(value) if not isinstance(value, (int, float, str)) else value}" for name, value in named.items())


def _tolerance(out: torch.Tensor, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """float64 results: 1e-8; float32: 1e-4; lower precisions: 2e-2 (unless given)."""
    default = 1e-8 if out.dtype == torch.float64 else 1e-4 if out.dtype == torch.float32 else 2e-2
    return (default if rtol is None else rtol), (default if atol is None else atol)


def _compare(prop: str, what: str, actual, expected, tol: tuple[float, float], inputs: str) -> None:
    actual, expected = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    if actual.shape != expected.shape:
        raise OracleFailure(f"property '{prop}' broke: {what}: the output has shape {actual.shape}, expected {expected.shape}\ninputs:\n{inputs}")
    rtol, atol = tol
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    if bad.any():
        gap = np.where(bad, np.nan_to_num(np.abs(actual - expected), nan=np.inf), -1.0)
        where = np.unravel_index(int(np.argmax(gap)), gap.shape)
        label = "(sequence, position)" if gap.ndim == 2 else "index"
        raise OracleFailure(
            f"property '{prop}' broke: {what}\n"
            f"  at {label} {tuple(int(i) for i in where)}: expected {expected[where]:.10g}, got {actual[where]:.10g} "
            f"(tolerance {atol:g} + {rtol:g}·|expected|)\ninputs:\n{inputs}\n"
            f"  {'expected':<20}{_fmt(expected)}\n  {'actual':<20}{_fmt(actual)}"
        )


def _call(prop: str, fn: Callable, args, kwargs, inputs: str) -> torch.Tensor:
    """Call the function under test; an exception or a non-tensor result is a failure of ``prop``."""
    try:
        out = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any error of the function under test is a finding
        where = traceback.format_exception_only(type(error), error)[-1].strip()
        raise OracleFailure(f"property '{prop}' broke: the function raised {where}\ninputs:\n{inputs}") from error
    if not isinstance(out, torch.Tensor):
        try:
            out = torch.as_tensor(np.asarray(out))
        except Exception:  # noqa: BLE001
            raise OracleFailure(f"property '{prop}' broke: the function returned {type(out).__name__}, not an array\ninputs:\n{inputs}") from None
    return out


# --------------------------------------------------------------------------------------------------
# ShiQ-style variants: per-token statistics in, (B, T) residuals or (B,) losses out
# --------------------------------------------------------------------------------------------------


@dataclass
class _Token:
    fn: Callable
    name: str  # variant
    kind: str  # "residual" or "loss"
    rtol: float | None
    atol: float | None
    autograd: bool

    def run(self, prop, policy, ref, rewards, mask, beta, gamma, soft_value=None):
        extra = {"soft_value": soft_value} if self.name in NEEDS_SOFT_VALUE else {}
        inputs = self.describe(policy, ref, rewards, mask, beta, gamma, soft_value)
        out = _call(prop, self.fn, (policy, ref, rewards, mask), dict(beta=beta, gamma=gamma, **extra), inputs)
        want = mask.shape if self.kind == "residual" else mask.shape[:1]
        if tuple(out.shape) != tuple(want):
            raise OracleFailure(f"property '{prop}' broke: the output has shape {tuple(out.shape)}, expected {tuple(want)} ({self.kind})\ninputs:\n{inputs}")
        return out, inputs

    def describe(self, policy, ref, rewards, mask, beta, gamma, soft_value=None) -> str:
        named = dict(beta=beta, gamma=gamma, mask=mask.int(), **{"policy.logit_taken": policy.logit_taken, "policy.logsumexp": policy.logsumexp,
                     "ref.logit_taken": ref.logit_taken, "ref.logsumexp": ref.logsumexp, "rewards": rewards})
        if soft_value is not None and self.name in NEEDS_SOFT_VALUE:
            named["soft_value"] = soft_value
        return _inputs(**named)

    def expected(self, residual: torch.Tensor) -> torch.Tensor:
        return residual if self.kind == "residual" else residual.square().sum(-1)

    def tol(self, out) -> tuple[float, float]:
        return _tolerance(out, self.rtol, self.atol)

    def zero_tol(self, out) -> tuple[float, float]:
        """Tolerance of a value that must be 0: atol for a residual, 100 atol² for a sum of squared residuals."""
        atol = self.tol(out)[1]
        return 0.0, (atol if self.kind == "residual" else 100 * atol * atol)


def _reference_residual(name, policy, ref, rewards, mask, beta, gamma, soft_value):
    return ref_impl.residual_reference(name, policy, ref, rewards, mask, beta=beta, gamma=gamma, soft_value=soft_value)


def _token_properties(t: _Token) -> dict[str, tuple[dict, Callable] | str]:
    """Each property: (hypothesis strategies, check) or the reason it does not apply."""

    def reference(b: Batch, gamma: float):
        policy, ref, soft = b.policy, b.ref, b.soft_value
        out, inputs = t.run("reference", policy, ref, b.rewards, b.mask, b.beta, gamma, soft)
        expected = t.expected(_reference_residual(t.name, policy, ref, b.rewards, b.mask, b.beta, gamma, soft))
        _compare("reference", f"{t.kind} differs from the reference {t.name} (shiq_toy.testing.reference)", out, expected, t.tol(out), inputs)

    def fixed_point(tree, beta: float, gamma: float):
        batch = tree_batch(tree, fixed_point_logits(tree, t.name, beta=beta, gamma=gamma))
        soft = logit_q_soft_value(batch.logits, batch.ref_logits, beta=beta)
        out, inputs = t.run("fixed_point", batch.policy, batch.ref, batch.rewards, batch.mask, beta, gamma, soft)
        head = f"  tree: V={tree.vocab_size}, H={tree.horizon}, one row per sequence (rows = every path, tokens in order)\n"
        _compare("fixed_point", f"{t.kind} is not 0 at the exact solution {_FIXED[t.name]} of the tree, on every sequence",
                 out, torch.zeros_like(out), t.zero_tol(out), head + inputs)

    def initialisation(b: Batch, gamma: float):
        policy = TokenStats(*(x.detach().clone().requires_grad_(True) for x in b.ref))
        zero = torch.zeros_like(b.rewards)
        out, inputs = t.run("initialisation", policy, b.ref, zero, b.mask, b.beta, gamma)
        _compare("initialisation", f"{t.kind} is not 0 at ℓ = ℓ_ref with r ≡ 0", out.detach(), torch.zeros_like(out.detach()), t.zero_tol(out), inputs)
        if t.autograd and out.requires_grad:
            loss = out.square().sum() if t.kind == "residual" else out.sum()
            grads = torch.autograd.grad(loss, list(policy), allow_unused=True)
            grad = torch.stack([g if g is not None else torch.zeros_like(b.rewards) for g in grads])
            _compare("initialisation", "the loss's gradient with respect to (policy.logit_taken, policy.logsumexp) is not 0 at ℓ = ℓ_ref, r ≡ 0",
                     grad, torch.zeros_like(grad), (0.0, t.tol(out)[1]), inputs)

    def telescoping(b: Batch, gamma: float):
        how, partner = TELESCOPES[t.name]
        policy, ref = b.policy, b.ref
        out, inputs = t.run("telescoping", policy, ref, b.rewards, b.mask, b.beta, gamma)
        other = _reference_residual(partner, policy, ref, b.rewards, b.mask, b.beta, gamma, None)
        if how == "difference":
            got, want = out - gamma * ref_impl.next_on_mask(out, b.mask), torch.where(b.mask, other, 0.0)
            what = f"r_t − γ r_(t+1) (next masked-in position; 0 after the last) differs from the one-step reference {partner}"
        elif how == "sum":
            got, want = ref_impl.discounted_sum_on_mask(out, b.mask, gamma=gamma), other
            what = f"the discounted sum Σ_(k≥t) γ^(k−t) r_k differs from the multi-step reference {partner}"
        else:
            first = torch.arange(b.mask.shape[1])[None, :] == b.mask.int().argmax(dim=1, keepdim=True)
            got = torch.where(first, out, 0.0)
            want = torch.where(first, ref_impl.discounted_sum_on_mask(other, b.mask, gamma=gamma), 0.0)
            what = f"the residual at the first response position differs from Σ_k γ^k {partner}_k"
        _compare("telescoping", what, torch.where(b.mask, got, 0.0), want, t.tol(out), inputs)

    def mask(b: Batch, gamma: float, data):
        policy, ref, soft = b.policy, b.ref, b.soft_value
        out, inputs = t.run("mask", policy, ref, b.rewards, b.mask, b.beta, gamma, soft)
        if t.kind == "residual":
            _compare("mask", "the residual is not 0 at masked-out positions", torch.where(b.mask, 0.0, out), torch.zeros_like(out), t.tol(out), inputs)
        noise = data.draw(st.lists(finite_floats(50.0), min_size=6, max_size=6), label="garbage at masked-out positions")
        fields = [*policy, *ref, b.rewards, soft]
        dirty = [torch.where(b.mask, x, noise[i]) for i, x in enumerate(fields)]
        got, dirty_inputs = t.run("mask", TokenStats(*dirty[:2]), TokenStats(*dirty[2:4]), dirty[4], b.mask, b.beta, gamma, dirty[5])
        keep = b.mask if t.kind == "residual" else torch.ones(b.mask.shape[:1], dtype=torch.bool)
        _compare("mask", "changing the values at masked-out positions changed the output", torch.where(keep, got, 0.0), torch.where(keep, out, 0.0), t.tol(out), dirty_inputs)
        # holes: each row's masked-in positions moved to the left (order kept), right-padded with garbage
        width = int(b.mask.sum(1).max())
        order = torch.argsort((~b.mask).int(), dim=1, stable=True)[:, :width]
        dense_mask = torch.arange(width)[None, :] < b.mask.sum(1, keepdim=True)
        dense = [torch.where(dense_mask, x.gather(1, order), noise[i]) for i, x in enumerate(fields)]
        got, dense_inputs = t.run("mask", TokenStats(*dense[:2]), TokenStats(*dense[2:4]), dense[4], dense_mask, b.beta, gamma, dense[5])
        if t.kind == "residual":
            got, out = torch.where(dense_mask, got, 0.0), torch.where(dense_mask, out.gather(1, order), 0.0)
        _compare("mask", "the output with holes differs from the same sequences without them (masked-in positions moved left)",
                 got, out, t.tol(out), inputs + "\n  the same sequences without the holes:\n" + dense_inputs)

    def gradient(b: Batch, gamma: float):
        policy, ref, soft = b.policy, b.ref, b.soft_value
        needs_soft = t.name in NEEDS_SOFT_VALUE
        leaves = [x.detach().clone().requires_grad_(True) for x in ((*policy, soft) if needs_soft else policy)]
        inputs = t.describe(policy, ref, b.rewards, b.mask, b.beta, gamma, soft)

        def fn(logit_taken, logsumexp, soft_value=None):
            return t.run("gradient", TokenStats(logit_taken, logsumexp), ref, b.rewards, b.mask, b.beta, gamma, soft_value)[0]

        _gradcheck(fn, leaves, inputs)

    props: dict[str, tuple[dict, Callable] | str] = {
        "reference": (dict(b=batches(), gamma=gammas()), reference),
        "fixed_point": (dict(tree=trees(), beta=betas(0.1, 5.0), gamma=gammas()), fixed_point),
        "initialisation": (dict(b=batches(), gamma=gammas()), initialisation),
        "telescoping": (dict(b=batches(), gamma=gammas()), telescoping),
        "mask": (dict(b=batches(), gamma=gammas(), data=st.data()), mask),
        "gradient": (dict(b=batches(max_batch=2, max_length=4, max_vocab=3), gamma=gammas()), gradient),
    }
    if t.name not in ZERO_AT_INIT:
        props["initialisation"] = f"{t.name} makes no such claim (spec §3 fact 3: only shiq, shiq_ms, shiq_tk vanish there)"
    if t.name not in TELESCOPES:
        props["telescoping"] = f"{t.name} has no multi-step / one-step partner"
    elif t.kind == "loss":
        props["telescoping"] = "needs per-token residuals, the function returns per-sequence losses"
    if not t.autograd:
        props["gradient"] = "the function has no autograd (a NumPy / JAX function: check its gradient there)"
    return props


_FIXED = {name: "ℓ* = ℓ_ref + q*/β" for name in ("shiq", "shiq_ms", "shiq_tk")}
_FIXED.update({"shiq_init": "ln π_ref + q*/β", "shifted_q": "ln π_ref + q*/β", "logit_q": "ℓ = q*"})


def _gradcheck(fn, leaves, inputs: str) -> None:
    """torch.autograd.gradcheck of ``fn`` at ``leaves`` (looser steps and tolerances for a float32 output)."""
    try:
        probe = fn(*leaves)
        low = probe.dtype != torch.float64
        torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-3 if low else 1e-6, atol=1e-2 if low else 1e-5, rtol=1e-2 if low else 1e-3)
    except OracleFailure:
        raise
    except Exception as error:  # noqa: BLE001 - gradcheck's GradcheckError (or a RuntimeError of autograd)
        text = str(error).strip()
        if len(text) > 1500:
            text = text[:1500] + " …"
        raise OracleFailure(
            "property 'gradient' broke: autograd's gradient differs from finite differences "
            f"(a stop-gradient / detach, or a non-differentiable step)\n  gradcheck says: {text}\ninputs:\n{inputs}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Baselines: sequence log-ratios (and rewards, values) in, one loss per pair or sequence out
# --------------------------------------------------------------------------------------------------


def _vectors(n: int, bound: float):
    from hypothesis.extra import numpy as hnp

    return hnp.arrays(np.float64, (n,), elements=finite_floats(bound)).map(torch.from_numpy)


@st.composite
def _baseline_inputs(draw, variant: str, max_size: int = 8):
    size = draw(st.integers(1, max_size))
    count = {"dpo": 2, "copg": 4, "dro": 3}[variant]
    return [draw(_vectors(size, 10.0)) for _ in range(count)], draw(betas())


_ARGS = {"dpo": ("log_ratio_chosen", "log_ratio_rejected"), "copg": ("log_ratio_a", "log_ratio_b", "reward_a", "reward_b"), "dro": ("log_ratio", "reward", "value")}
_DIFFERENTIABLE = {"dpo": (0, 1), "copg": (0, 1), "dro": (0, 2)}


def _baseline_reference(variant: str, args, beta) -> torch.Tensor:
    lists = [x.tolist() for x in args]
    fn = {"dpo": ref_impl.dpo_loss_ref, "copg": ref_impl.copg_loss_ref, "dro": ref_impl.dro_loss_ref}[variant]
    return torch.tensor(fn(*lists, beta), dtype=torch.float64)


def _baseline_properties(fn: Callable, variant: str, rtol, atol, autograd: bool) -> dict[str, tuple[dict, Callable] | str]:
    def run(prop, args, beta):
        inputs = _inputs(beta=beta, **dict(zip(_ARGS[variant], args)))
        out = _call(prop, fn, args, dict(beta=beta), inputs)
        if tuple(out.shape) != tuple(args[0].shape):
            raise OracleFailure(f"property '{prop}' broke: the output has shape {tuple(out.shape)}, expected {tuple(args[0].shape)}\ninputs:\n{inputs}")
        return out, inputs

    def reference(case):
        args, beta = case
        out, inputs = run("reference", args, beta)
        _compare("reference", f"the loss differs from the reference {variant} (shiq_toy.testing.reference)", out, _baseline_reference(variant, args, beta), _tolerance(out, rtol, atol), inputs)

    def fixed_point(tree, beta: float):
        """γ = 1, sequence reward R(y) = Σ_t r_t: at π*, β Δ*(y) = R(y) − v*(root)."""
        batch = tree_batch(tree, fixed_point_logits(tree, "shiq", beta=beta, gamma=1.0))
        delta = (batch.policy.logit_taken - batch.policy.logsumexp - batch.ref.logit_taken + batch.ref.logsumexp).sum(-1)  # (B,)
        returns = batch.rewards.sum(-1)  # (B,)
        n = len(delta)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j] or [(0, 0)]
        a, b = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        if variant == "dpo":
            args, expected = [delta[a], delta[b]], torch.tensor(ref_impl.dpo_loss_ref(returns[a].tolist(), returns[b].tolist(), 1.0), dtype=torch.float64)
            what = "DPO at the exact solution π* differs from the Bradley–Terry loss −ln σ(R(y_w) − R(y_l))"
        elif variant == "copg":
            args, expected = [delta[a], delta[b], returns[a], returns[b]], torch.zeros(len(pairs), dtype=torch.float64)
            what = "CoPG is not 0 at the exact solution π* (β Δ(y) = R(y) − v*(root))"
        else:
            value = solve_tree(tree, beta=beta, gamma=1.0).v[0][0]
            args, expected = [delta, returns, value.expand(n).clone()], torch.zeros(n, dtype=torch.float64)
            what = "DRO is not 0 at the exact solution π* with V(x) = v*(root)"
        out, inputs = run("fixed_point", args, beta)
        _compare("fixed_point", what, out, expected, _tolerance(out, rtol, atol), f"  tree: V={tree.vocab_size}, H={tree.horizon}\n" + inputs)

    def gradient(case):
        args, beta = case
        leaves = [x.clone().requires_grad_(i in _DIFFERENTIABLE[variant]) for i, x in enumerate(args)]
        inputs = _inputs(beta=beta, **dict(zip(_ARGS[variant], args)))

        def call(*xs):
            full = list(leaves)
            for i, x in zip(_DIFFERENTIABLE[variant], xs):
                full[i] = x
            return run("gradient", full, beta)[0]

        _gradcheck(call, [leaves[i] for i in _DIFFERENTIABLE[variant]], inputs)

    na = "a sequence-level loss"
    return {
        "reference": (dict(case=_baseline_inputs(variant)), reference),
        "fixed_point": (dict(tree=trees(), beta=betas(0.1, 5.0)), fixed_point),
        "initialisation": f"{na} makes no zero-at-initialisation claim",
        "telescoping": f"{na} has no per-token residual",
        "mask": f"{na}: the mask acts in shiq_toy.baselines.sequence_log_ratio",
        "gradient": (dict(case=_baseline_inputs(variant, max_size=3)), gradient) if autograd else "the function has no autograd (a NumPy / JAX function)",
    }


# --------------------------------------------------------------------------------------------------
# Running the battery
# --------------------------------------------------------------------------------------------------


def _probe_kind(fn: Callable, variant: str) -> str:
    """Call ``fn`` once on a small fixed batch: "residual" for (B, T) output, "loss" for (B,)."""
    gen = torch.Generator().manual_seed(0)
    logits, ref_logits = (torch.randn(2, 3, 3, dtype=torch.float64, generator=gen) for _ in range(2))
    tokens = torch.randint(0, 3, (2, 3), generator=gen)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    rewards = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    extra = {"soft_value": logit_q_soft_value(logits, ref_logits, beta=0.5)} if variant in NEEDS_SOFT_VALUE else {}
    inputs = "  the fixed batch of shiq_toy.testing.oracle._probe_kind (B = 2, T = 3)"
    out = _call("probe", fn, (token_stats(logits, tokens), token_stats(ref_logits, tokens), rewards, mask), dict(beta=0.5, gamma=0.9, **extra), inputs)
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
        props = _baseline_properties(fn, variant, rtol, atol, autograd)
    else:
        try:
            kind = _probe_kind(fn, variant)
        except OracleFailure as failure:
            results = [PropertyResult(p, "FAIL", CHECKS[p], str(failure)) for p in PROPERTIES if p in properties]
            return Report(name, variant, "output not understood", max_examples, results, shrink)
        props = _token_properties(_Token(fn, variant, kind, rtol, atol, autograd))
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
