"""Hypothesis strategies for ShiQ-style losses: bandits, token trees, logits near and far from the exact
solution, batches of per-token statistics with right padding and holes, β and γ.

These are the strategies the project's own tests draw from; use them in yours::

    from hypothesis import given
    from shiq_toy.testing.strategies import batches, gammas

    @given(b=batches(), gamma=gammas())
    def test_my_residual(b, gamma):
        out = my_residual(b.policy, b.ref, b.rewards, b.mask, beta=b.beta, gamma=gamma)   # (B, T)
        ...

Every float is drawn by hypothesis (not from a seed) where it is cheap to, so a failing example shrinks to
small, readable numbers. Trees are drawn from a seed (``shiq_toy.mdp.random_tree``); their sizes shrink.

Notation used for tensor shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``K`` arms.
Needs the ``testing`` extra (``pip install "shiq[testing]"``: hypothesis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shiq_toy.losses import NEEDS_SOFT_VALUE, RESIDUALS, TokenStats, logit_q_soft_value, token_stats
from shiq_toy.mdp import Bandit, TokenTree, random_bandit, random_tree
from shiq_toy.solvers import solve_tree

__all__ = [
    "betas",
    "gammas",
    "finite_floats",
    "float_arrays",
    "masks",
    "Batch",
    "batch_from_arrays",
    "batches",
    "bandits",
    "trees",
    "tree_logits",
    "ResponseLayout",
    "response_layouts",
]


def betas(min_value: float = 0.05, max_value: float = 5.0) -> st.SearchStrategy[float]:
    """β > 0, the KL coefficient."""
    return st.floats(min_value, max_value)


def gammas(min_value: float = 0.3, max_value: float = 1.0, *, one: bool = True) -> st.SearchStrategy[float]:
    """γ ∈ [min_value, max_value] ⊂ (0, 1]; with ``one`` (default) and max_value = 1, γ = 1 exactly is drawn
    often (the LLM default)."""
    interval = st.floats(min_value, max_value)
    return st.one_of(st.just(1.0), interval) if one and max_value == 1.0 else interval


def finite_floats(bound: float) -> st.SearchStrategy[float]:
    """Floats in [−bound, bound], no NaN, no infinity, no subnormal (they shrink to 0 and small integers)."""
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def float_arrays(shape: tuple[int, ...], bound: float) -> st.SearchStrategy[torch.Tensor]:
    """float64 tensors of ``shape`` with entries from :func:`finite_floats` (``bound``)."""
    return hnp.arrays(np.float64, shape, elements=finite_floats(bound)).map(torch.from_numpy)


@st.composite
def masks(draw, max_batch: int = 3, max_length: int = 7, *, holes: bool = True, padding: bool = True) -> torch.Tensor:
    """(B, T) bool: True on the agent's tokens, at least one per row.

    holes: masked-out positions inside a row (environment tokens of a dialogue); padding: rows that end
    before T (right padding). With neither, every position is masked in.
    """
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_length))
    rows = []
    for _ in range(batch):
        if holes:
            row = draw(st.lists(st.booleans(), min_size=length, max_size=length))
            if not padding:  # holes only: the last position is an action
                row[-1] = True
            if not any(row):
                row[draw(st.integers(0, length - 1))] = True
        else:
            used = draw(st.integers(1, length)) if padding else length
            row = [t < used for t in range(length)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@dataclass
class Batch:
    """Float64 logits, tokens, rewards and a mask; the per-token statistics come from ``token_stats``.

    logits, ref_logits: (B, T, V); tokens: (B, T) int64; rewards: (B, T); mask: (B, T) bool; beta > 0.
    """

    logits: torch.Tensor
    ref_logits: torch.Tensor
    tokens: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    beta: float

    @property
    def policy(self) -> TokenStats:
        return token_stats(self.logits, self.tokens)

    @property
    def ref(self) -> TokenStats:
        return token_stats(self.ref_logits, self.tokens)

    @property
    def soft_value(self) -> torch.Tensor:
        """(B, T) β ln Σ_a π_ref(a|s_t) exp(ℓ(s_t, a)/β), the extra input of ``logit_q``."""
        return logit_q_soft_value(self.logits, self.ref_logits, beta=self.beta)

    def extra(self, name: str) -> dict[str, torch.Tensor]:
        """The extra keyword arguments residual ``name`` needs (``soft_value`` for ``logit_q``)."""
        return {"soft_value": self.soft_value} if name in NEEDS_SOFT_VALUE else {}

    def residual(self, name: str, gamma: float) -> torch.Tensor:
        """(B, T) residual ``name`` of ``shiq_toy.losses.RESIDUALS`` on this batch."""
        return RESIDUALS[name](self.policy, self.ref, self.rewards, self.mask, beta=self.beta, gamma=gamma, **self.extra(name))

    def __repr__(self) -> str:
        rows = "\n".join(f"    {''.join('x' if m else '.' for m in row)}" for row in self.mask.tolist())
        return f"Batch(B={self.mask.shape[0]}, T={self.mask.shape[1]}, V={self.logits.shape[-1]}, beta={self.beta!r}, mask (x = masked in):\n{rows})"


def batch_from_arrays(logits, ref_logits, tokens, rewards, mask, beta: float) -> Batch:
    """A :class:`Batch` from array-likes (float64 logits and rewards, int64 tokens, bool mask)."""
    as64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return Batch(as64(logits), as64(ref_logits), torch.as_tensor(tokens, dtype=torch.int64), as64(rewards), torch.as_tensor(mask, dtype=torch.bool), float(beta))


@st.composite
def batches(
    draw,
    max_batch: int = 3,
    max_length: int = 7,
    max_vocab: int = 5,
    *,
    holes: bool = True,
    padding: bool = True,
    reward: str = "token",
    logit_scale: float = 4.0,
    beta: st.SearchStrategy[float] | None = None,
) -> Batch:
    """A :class:`Batch` of random logits (|ℓ| ≤ logit_scale), rewards (|r| ≤ 2) and a mask from :func:`masks`.

    reward: "token" (a reward on every position) or "terminal" (only on each row's last masked-in token).
    """
    if reward not in ("token", "terminal"):
        raise ValueError(f"reward must be 'token' or 'terminal', got {reward!r}")
    mask = draw(masks(max_batch, max_length, holes=holes, padding=padding))
    batch, length = mask.shape
    vocab = draw(st.integers(2, max_vocab))
    logits = draw(float_arrays((batch, length, vocab), logit_scale))
    ref_logits = draw(float_arrays((batch, length, vocab), logit_scale))
    tokens = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=batch * length, max_size=batch * length))).reshape(batch, length)
    rewards = draw(float_arrays((batch, length), 2.0))
    if reward == "terminal":
        last = torch.arange(length)[None, :] == (mask * torch.arange(1, length + 1)).argmax(dim=1, keepdim=True)
        rewards = torch.where(last, rewards, 0.0)
    return Batch(logits, ref_logits, tokens, rewards, mask, draw(beta if beta is not None else betas()))


@st.composite
def bandits(draw, min_arms: int = 1, max_arms: int = 6, *, noise: bool = False) -> Bandit:
    """A random K-armed ``Bandit`` (``ℓ_ref``, ``r`` ~ N(0, 1) scaled), K ∈ [min_arms, max_arms]."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return random_bandit(
        draw(st.integers(min_arms, max_arms)),
        generator=generator,
        noise_std=draw(st.floats(0.0, 1.0)) if noise else 0.0,
        ref_scale=draw(st.floats(0.0, 2.0)),
        reward_scale=draw(st.floats(0.1, 2.0)),
    )


@st.composite
def trees(draw, max_paths: int = 81, *, reward: str | None = None) -> TokenTree:
    """A random ``TokenTree`` with V**H <= max_paths; reward "terminal" (a sequence-level reward on the last
    token), "dense" (a reward on every token) or None (either)."""
    vocab = draw(st.integers(1, 4))
    horizon = draw(st.integers(1, 4))
    while vocab**horizon > max_paths:
        horizon -= 1
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return random_tree(
        vocab,
        horizon,
        generator=generator,
        reward=reward if reward is not None else draw(st.sampled_from(["terminal", "dense"])),
        ref_scale=draw(st.floats(0.0, 2.0)),
        reward_scale=draw(st.floats(0.1, 2.0)),
    )


@st.composite
def tree_logits(draw, tree: TokenTree, *, beta: float, gamma: float = 1.0, near: bool | None = None) -> list[torch.Tensor]:
    """Tabular logits of ``tree`` (a list over depth of (V**h, V) tables): near the exact solution
    ``ℓ* = ℓ_ref + q*/β`` (ℓ* + noise of scale ≤ 0.1), or far from it (N(0, 4) logits); ``near=None`` draws either."""
    near = draw(st.booleans()) if near is None else near
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if not near:
        return [2.0 * torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in tree.ref_logits]
    scale = draw(st.floats(0.0, 0.1))
    star = solve_tree(tree, beta=beta, gamma=gamma).logits
    return [x + scale * torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in star]


@dataclass(frozen=True)
class ResponseLayout:
    """Where the real and the response tokens of a padded batch are (for a causal LM's statistics).

    Row i has ``lengths[i]`` real tokens, padded on ``side`` ("left" or "right"); ``responses[i]`` lists the
    response positions *within the real tokens* (never 0: the first token has no predicting logits); holes are
    allowed. ``seed`` is for the token ids.
    """

    side: str
    lengths: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]
    seed: int

    @property
    def num_response_tokens(self) -> int:
        return sum(map(len, self.responses))


@st.composite
def response_layouts(draw, max_rows: int = 3, min_length: int = 2, max_length: int = 10) -> ResponseLayout:
    """A :class:`ResponseLayout` with left or right padding, holes, and possibly rows without a response token."""
    side = draw(st.sampled_from(["left", "right"]))
    lengths = [draw(st.integers(min_length, max_length)) for _ in range(draw(st.integers(1, max_rows)))]
    responses = tuple(tuple(i for i in range(1, n) if draw(st.booleans())) for n in lengths)
    return ResponseLayout(side, tuple(lengths), responses, draw(st.integers(0, 2**16)))
