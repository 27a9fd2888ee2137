"""The oracle's properties for the baselines (DPO, CoPG, DRO): sequence log-ratios, rewards and values in, one
loss per pair or sequence out. See :mod:`shiq_toy.testing.oracle`.

Notation used for tensor shapes: ``B`` sequences, ``P`` pairs.
"""

from __future__ import annotations

from typing import Callable

import torch
from hypothesis import strategies as st

from shiq_toy.solvers import solve_tree
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
from shiq_toy.testing.strategies import betas, float_arrays, trees

__all__ = ["baseline_properties"]


@st.composite
def _baseline_cases(draw, variant: str, max_size: int = 8):
    size = draw(st.integers(1, max_size))
    count = {"dpo": 2, "copg": 4, "dro": 3}[variant]
    return [draw(float_arrays((size,), 10.0)) for _ in range(count)], draw(betas())


_ARGS = {"dpo": ("log_ratio_chosen", "log_ratio_rejected"), "copg": ("log_ratio_a", "log_ratio_b", "reward_a", "reward_b"), "dro": ("log_ratio", "reward", "value")}
_DIFFERENTIABLE = {"dpo": (0, 1), "copg": (0, 1), "dro": (0, 2)}


def _baseline_reference(variant: str, args, beta) -> torch.Tensor:
    lists = [x.tolist() for x in args]
    fn = {"dpo": ref_impl.dpo_loss_ref, "copg": ref_impl.copg_loss_ref, "dro": ref_impl.dro_loss_ref}[variant]
    return torch.tensor(fn(*lists, beta), dtype=torch.float64)


def baseline_properties(fn: Callable, variant: str, rtol, atol, autograd: bool) -> dict[str, tuple[dict, Callable] | str]:
    def run(prop, args, beta):
        inputs = format_inputs(beta=beta, **dict(zip(_ARGS[variant], args)))
        out = call_under_test(prop, fn, args, dict(beta=beta), inputs)
        if tuple(out.shape) != tuple(args[0].shape):
            raise OracleFailure(f"property '{prop}' broke: the output has shape {tuple(out.shape)}, expected {tuple(args[0].shape)}\ninputs:\n{inputs}")
        return out, inputs

    def reference(case):
        args, beta = case
        out, inputs = run("reference", args, beta)
        compare("reference", f"the loss differs from the reference {variant} (shiq_toy.testing.reference)", out, _baseline_reference(variant, args, beta), default_tolerance(out, rtol, atol), inputs)

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
        compare("fixed_point", what, out, expected, default_tolerance(out, rtol, atol), f"  tree: V={tree.vocab_size}, H={tree.horizon}\n" + inputs)

    def gradient(case):
        args, beta = case
        leaves = [x.clone().requires_grad_(i in _DIFFERENTIABLE[variant]) for i, x in enumerate(args)]
        inputs = format_inputs(beta=beta, **dict(zip(_ARGS[variant], args)))

        def call(*xs):
            full = list(leaves)
            for i, x in zip(_DIFFERENTIABLE[variant], xs):
                full[i] = x
            return run("gradient", full, beta)[0]

        gradcheck_property(call, [leaves[i] for i in _DIFFERENTIABLE[variant]], inputs)

    na = "a sequence-level loss"
    return {
        "reference": (dict(case=_baseline_cases(variant)), reference),
        "fixed_point": (dict(tree=trees(), beta=betas(0.1, 5.0)), fixed_point),
        "initialisation": f"{na} makes no zero-at-initialisation claim",
        "telescoping": f"{na} has no per-token residual",
        "mask": f"{na}: the mask acts in shiq_toy.baselines.sequence_log_ratio",
        "gradient": (dict(case=_baseline_cases(variant, max_size=3)), gradient) if autograd else "the function has no autograd (a NumPy / JAX function)",
    }

