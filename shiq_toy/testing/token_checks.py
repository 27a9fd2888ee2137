"""The oracle's properties for ShiQ-style variants: per-token statistics in, (B, T) residuals or (B,) losses out.

Each property is a pair (hypothesis strategies, check) or the reason it does not apply to the variant; a check
raises :class:`shiq_toy.testing.failures.OracleFailure` with the counterexample. See :mod:`shiq_toy.testing.oracle`.

Notation used for tensor shapes: ``B`` sequences, ``T`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import strategies as st

from shiq_toy.losses import NEEDS_SOFT_VALUE, TokenStats, logit_q_soft_value
from shiq_toy.testing import reference as ref_impl
from shiq_toy.testing.exact import fixed_point_logits, tree_batch
from shiq_toy.testing.failures import (
    OracleFailure,
    call_under_test,
    compare,
    default_tolerance,
    format_inputs,
    gradcheck_property,
)
from shiq_toy.testing.properties import TELESCOPES, ZERO_AT_INIT
from shiq_toy.testing.strategies import Batch, batches, betas, finite_floats, gammas, trees

__all__ = ["TokenTarget", "token_properties"]


@dataclass
class TokenTarget:
    """The function under test as a ShiQ-style ``variant``: ``run`` calls it and checks its output's shape,
    ``describe`` formats its inputs for a failure message."""

    fn: Callable
    name: str  # variant
    kind: str  # "residual" or "loss"
    rtol: float | None
    atol: float | None
    autograd: bool

    def run(self, prop, policy, ref, rewards, mask, beta, gamma, soft_value=None):
        extra = {"soft_value": soft_value} if self.name in NEEDS_SOFT_VALUE else {}
        inputs = self.describe(policy, ref, rewards, mask, beta, gamma, soft_value)
        out = call_under_test(prop, self.fn, (policy, ref, rewards, mask), dict(beta=beta, gamma=gamma, **extra), inputs)
        want = mask.shape if self.kind == "residual" else mask.shape[:1]
        if tuple(out.shape) != tuple(want):
            raise OracleFailure(f"property '{prop}' broke: the output has shape {tuple(out.shape)}, expected {tuple(want)} ({self.kind})\ninputs:\n{inputs}")
        return out, inputs

    def describe(self, policy, ref, rewards, mask, beta, gamma, soft_value=None) -> str:
        named = dict(beta=beta, gamma=gamma, mask=mask.int(), **{"policy.logit_taken": policy.logit_taken, "policy.logsumexp": policy.logsumexp,
                     "ref.logit_taken": ref.logit_taken, "ref.logsumexp": ref.logsumexp, "rewards": rewards})
        if soft_value is not None and self.name in NEEDS_SOFT_VALUE:
            named["soft_value"] = soft_value
        return format_inputs(**named)

    def expected(self, residual: torch.Tensor) -> torch.Tensor:
        return residual if self.kind == "residual" else residual.square().sum(-1)

    def tol(self, out) -> tuple[float, float]:
        return default_tolerance(out, self.rtol, self.atol)

    def zero_tol(self, out) -> tuple[float, float]:
        """Tolerance of a value that must be 0: atol for a residual, 100 atol² for a sum of squared residuals."""
        atol = self.tol(out)[1]
        return 0.0, (atol if self.kind == "residual" else 100 * atol * atol)


def _reference_residual(name, policy, ref, rewards, mask, beta, gamma, soft_value):
    return ref_impl.residual_reference(name, policy, ref, rewards, mask, beta=beta, gamma=gamma, soft_value=soft_value)


def token_properties(t: TokenTarget) -> dict[str, tuple[dict, Callable] | str]:
    """Each property: (hypothesis strategies, check) or the reason it does not apply."""

    def reference(b: Batch, gamma: float):
        policy, ref, soft = b.policy, b.ref, b.soft_value
        out, inputs = t.run("reference", policy, ref, b.rewards, b.mask, b.beta, gamma, soft)
        expected = t.expected(_reference_residual(t.name, policy, ref, b.rewards, b.mask, b.beta, gamma, soft))
        compare("reference", f"{t.kind} differs from the reference {t.name} (shiq_toy.testing.reference)", out, expected, t.tol(out), inputs)

    def fixed_point(tree, beta: float, gamma: float):
        batch = tree_batch(tree, fixed_point_logits(tree, t.name, beta=beta, gamma=gamma))
        soft = logit_q_soft_value(batch.logits, batch.ref_logits, beta=beta)
        out, inputs = t.run("fixed_point", batch.policy, batch.ref, batch.rewards, batch.mask, beta, gamma, soft)
        head = f"  tree: V={tree.vocab_size}, H={tree.horizon}, one row per sequence (rows = every path, tokens in order)\n"
        compare("fixed_point", f"{t.kind} is not 0 at the exact solution {_FIXED[t.name]} of the tree, on every sequence",
                 out, torch.zeros_like(out), t.zero_tol(out), head + inputs)

    def initialisation(b: Batch, gamma: float):
        policy = TokenStats(*(x.detach().clone().requires_grad_(True) for x in b.ref))
        zero = torch.zeros_like(b.rewards)
        out, inputs = t.run("initialisation", policy, b.ref, zero, b.mask, b.beta, gamma)
        compare("initialisation", f"{t.kind} is not 0 at ℓ = ℓ_ref with r ≡ 0", out.detach(), torch.zeros_like(out.detach()), t.zero_tol(out), inputs)
        if t.autograd and out.requires_grad:
            loss = out.square().sum() if t.kind == "residual" else out.sum()
            grads = torch.autograd.grad(loss, list(policy), allow_unused=True)
            grad = torch.stack([g if g is not None else torch.zeros_like(b.rewards) for g in grads])
            compare("initialisation", "the loss's gradient with respect to (policy.logit_taken, policy.logsumexp) is not 0 at ℓ = ℓ_ref, r ≡ 0",
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
        compare("telescoping", what, torch.where(b.mask, got, 0.0), want, t.tol(out), inputs)

    def mask(b: Batch, gamma: float, data):
        policy, ref, soft = b.policy, b.ref, b.soft_value
        out, inputs = t.run("mask", policy, ref, b.rewards, b.mask, b.beta, gamma, soft)
        if t.kind == "residual":
            compare("mask", "the residual is not 0 at masked-out positions", torch.where(b.mask, 0.0, out), torch.zeros_like(out), t.tol(out), inputs)
        noise = data.draw(st.lists(finite_floats(50.0), min_size=6, max_size=6), label="garbage at masked-out positions")
        fields = [*policy, *ref, b.rewards, soft]
        dirty = [torch.where(b.mask, x, noise[i]) for i, x in enumerate(fields)]
        got, dirty_inputs = t.run("mask", TokenStats(*dirty[:2]), TokenStats(*dirty[2:4]), dirty[4], b.mask, b.beta, gamma, dirty[5])
        keep = b.mask if t.kind == "residual" else torch.ones(b.mask.shape[:1], dtype=torch.bool)
        compare("mask", "changing the values at masked-out positions changed the output", torch.where(keep, got, 0.0), torch.where(keep, out, 0.0), t.tol(out), dirty_inputs)
        # holes: each row's masked-in positions moved to the left (order kept), right-padded with garbage
        width = int(b.mask.sum(1).max())
        order = torch.argsort((~b.mask).int(), dim=1, stable=True)[:, :width]
        dense_mask = torch.arange(width)[None, :] < b.mask.sum(1, keepdim=True)
        dense = [torch.where(dense_mask, x.gather(1, order), noise[i]) for i, x in enumerate(fields)]
        got, dense_inputs = t.run("mask", TokenStats(*dense[:2]), TokenStats(*dense[2:4]), dense[4], dense_mask, b.beta, gamma, dense[5])
        if t.kind == "residual":
            got, out = torch.where(dense_mask, got, 0.0), torch.where(dense_mask, out.gather(1, order), 0.0)
        compare("mask", "the output with holes differs from the same sequences without them (masked-in positions moved left)",
                 got, out, t.tol(out), inputs + "\n  the same sequences without the holes:\n" + dense_inputs)

    def gradient(b: Batch, gamma: float):
        policy, ref, soft = b.policy, b.ref, b.soft_value
        needs_soft = t.name in NEEDS_SOFT_VALUE
        leaves = [x.detach().clone().requires_grad_(True) for x in ((*policy, soft) if needs_soft else policy)]
        inputs = t.describe(policy, ref, b.rewards, b.mask, b.beta, gamma, soft)

        def fn(logit_taken, logsumexp, soft_value=None):
            return t.run("gradient", TokenStats(logit_taken, logsumexp), ref, b.rewards, b.mask, b.beta, gamma, soft_value)[0]

        gradcheck_property(fn, leaves, inputs)

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
