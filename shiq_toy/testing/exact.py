"""Inputs at the exact solution of a token tree: every sequence as one batch, and each variant's fixed point.

A tabular "model" is a list over depth of (V**h, V) logit tables; on the (V**H, H) batch of all sequences
its per-token statistics are those of the rows at each position's state (``gather_levels``). At the logits
of :func:`fixed_point_logits` every residual of spec §3 is 0 on every sequence (fact 2).

Notation used for tensor shapes: ``B = V**H`` sequences, ``H`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from shiq_toy.losses import NEEDS_SOFT_VALUE, RESIDUALS, TokenStats, logit_q_soft_value, token_stats
from shiq_toy.mdp import TokenTree, all_sequences, gather_levels
from shiq_toy.solvers import solve_tree

__all__ = ["TreeBatch", "tree_batch", "residuals_on_all_sequences", "fixed_point_logits", "SHAPED", "UNSHAPED"]

#: Residuals whose fixed point is ℓ* = ℓ_ref + q*/β (reward shaping by the reference's log-sum-exp).
SHAPED = ("shiq", "shiq_ms", "shiq_tk")
#: Residuals whose fixed point is ln π_ref + q*/β (no shaping: a per-state shift of ℓ*).
UNSHAPED = ("shiq_init", "shifted_q")


class TreeBatch(NamedTuple):
    """Every sequence of a tree as one batch: the arguments of a residual, all positions masked in."""

    tokens: torch.Tensor  # (B, H) int64
    logits: torch.Tensor  # (B, H, V) the model's logits at each position's state
    ref_logits: torch.Tensor  # (B, H, V)
    policy: TokenStats  # (B, H)
    ref: TokenStats  # (B, H)
    rewards: torch.Tensor  # (B, H) r(s_t, a_t)
    mask: torch.Tensor  # (B, H) bool, all True


def tree_batch(tree: TokenTree, logits: list[torch.Tensor]) -> TreeBatch:
    """The batch of all V**H sequences of ``tree`` read by the tabular model ``logits`` (list of (V**h, V))."""
    tokens = all_sequences(tree.vocab_size, tree.horizon)  # (B, H)
    model_logits = gather_levels(logits, tokens)  # (B, H, V)
    ref_logits = gather_levels(tree.ref_logits, tokens)  # (B, H, V)
    rewards = gather_levels(tree.rewards, tokens).gather(-1, tokens[..., None]).squeeze(-1)  # (B, H)
    return TreeBatch(
        tokens=tokens,
        logits=model_logits,
        ref_logits=ref_logits,
        policy=token_stats(model_logits, tokens),
        ref=token_stats(ref_logits, tokens),
        rewards=rewards,
        mask=torch.ones(tokens.shape, dtype=torch.bool),
    )


def residuals_on_all_sequences(tree: TokenTree, logits: list[torch.Tensor], name: str, *, beta: float, gamma: float) -> torch.Tensor:
    """(V**H, H) residual ``name`` of ``shiq_toy.losses.RESIDUALS`` of a tabular model on every sequence."""
    batch = tree_batch(tree, logits)
    extra = {}
    if name in NEEDS_SOFT_VALUE:
        extra["soft_value"] = logit_q_soft_value(batch.logits, batch.ref_logits, beta=beta)
    return RESIDUALS[name](batch.policy, batch.ref, batch.rewards, batch.mask, beta=beta, gamma=gamma, **extra)


def fixed_point_logits(tree: TokenTree, name: str, *, beta: float, gamma: float) -> list[torch.Tensor]:
    """The logits at which residual ``name`` vanishes on every sequence (spec §3 table), from solve_tree's q*.

    ``shiq``, ``shiq_ms``, ``shiq_tk``: ℓ* = ℓ_ref + q*/β; ``shiq_init``, ``shifted_q``: ln π_ref + q*/β;
    ``logit_q``: q*. Raises ValueError for any other name.
    """
    q = solve_tree(tree, beta=beta, gamma=gamma).q
    if name in SHAPED:
        return [ref + qh / beta for ref, qh in zip(tree.ref_logits, q)]
    if name in UNSHAPED:
        return [torch.log_softmax(ref, -1) + qh / beta for ref, qh in zip(tree.ref_logits, q)]
    if name == "logit_q":
        return q
    raise ValueError(f"no fixed point is listed for residual {name!r}; known: {sorted(SHAPED + UNSHAPED + ('logit_q',))}")
