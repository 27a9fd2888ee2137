"""A table of logits with the same ``(B, T) -> (B, T, V)`` contract as a language model.

``TabularLogits`` stores one free logit per (state, action) of a :class:`~shiq_toy.mdp.TokenTree`: one float64
parameter tensor per depth, ``(V**h, V)``. Its forward maps tokens to the logits of the state of each token,
so the statistics of the ShiQ losses are ``losses.token_stats(model(tokens), tokens)`` exactly as for a
transformer (whose logits are shifted by one position first). A bandit is the tree with ``H = 1``.

Independent runs ("copies", e.g. seeds) can be stacked as a leading dimension ``C`` of every table: a model
with ``copies=C`` maps ``(C, B, T)`` tokens to ``(C, B, T, V)`` logits, copy ``c`` reading only its own table.

Notation used for tensor shapes: ``C`` copies, ``B`` sequences, ``T`` positions (T <= H), ``V`` vocabulary,
``H`` tree depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shiq_toy.losses import TokenStats
from shiq_toy.mdp import Bandit, TokenTree, prefix_index

__all__ = ["TabularLogits", "stack_levels"]


def stack_levels(per_copy: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Stack C lists of per-depth tables ``(V**h, V)`` (or ``(V**h,)``) into one list of ``(C, V**h, V)``."""
    if len(per_copy) == 0:
        raise ValueError("stack_levels needs at least one copy")
    depths = {len(levels) for levels in per_copy}
    if len(depths) != 1:
        raise ValueError(f"every copy must have the same number of levels, got {sorted(depths)}")
    return [torch.stack([levels[h] for levels in per_copy]) for h in range(depths.pop())]


class TabularLogits(nn.Module):
    """Logits ``ℓ(s, a)`` stored in a table, one ``nn.Parameter`` per depth (float64).

    tables: list over depth ``h = 0..H-1`` of the initial logits, each ``(V**h, V)`` — or ``(C, V**h, V)``
    for ``C`` stacked copies. ``copies=C`` replicates 2-D tables C times. The tables are copied (the
    arguments are never modified). See :meth:`from_tree` / :meth:`from_bandit` to start at ``ℓ_ref``.
    """

    def __init__(self, tables: Sequence[torch.Tensor], *, copies: int | None = None) -> None:
        super().__init__()
        if isinstance(tables, torch.Tensor) or len(tables) == 0:
            raise ValueError("tables must be a non-empty list of tensors, one per depth")
        first = tables[0]
        if not isinstance(first, torch.Tensor) or first.dim() not in (2, 3):
            raise ValueError(f"tables[0] must have shape (1, V) or (C, 1, V), got {getattr(first, 'shape', type(first).__name__)}")
        stacked = first.dim() == 3
        if stacked and copies is not None and copies != first.shape[0]:
            raise ValueError(f"copies={copies} but the tables already stack {first.shape[0]} copies")
        if copies is not None and (isinstance(copies, bool) or not isinstance(copies, int) or copies < 1):
            raise ValueError(f"copies must be a positive int or None, got {copies!r}")
        vocab = first.shape[-1]
        lead = (first.shape[0],) if stacked else ()
        levels = []
        for h, table in enumerate(tables):
            expected = (*lead, vocab**h, vocab)
            if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
                raise ValueError(f"tables[{h}] (depth {h}) must have shape {expected}, got {tuple(getattr(table, 'shape', ()))}")
            if not table.is_floating_point() or not bool(torch.isfinite(table).all()):
                raise ValueError(f"tables[{h}] (depth {h}) must hold finite floating-point logits")
            table = table.detach().to(torch.float64)
            if copies is not None and not stacked:
                table = table.expand(copies, *table.shape)
            levels.append(nn.Parameter(table.clone()))
        self.levels = nn.ParameterList(levels)
        self.copies: int | None = first.shape[0] if stacked else copies
        self.vocab_size: int = vocab
        self.horizon: int = len(levels)

    @classmethod
    def from_tree(cls, tree: TokenTree, *, copies: int | None = None) -> "TabularLogits":
        """A table initialised at the reference logits of ``tree`` (ℓ = ℓ_ref)."""
        return cls(tree.ref_logits, copies=copies)

    @classmethod
    def from_bandit(cls, bandit: Bandit, *, copies: int | None = None) -> "TabularLogits":
        """The bandit as a one-level tree: a single ``(1, K)`` table initialised at ``ℓ_ref``."""
        return cls([bandit.ref_logits[None]], copies=copies)

    def _nodes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validated node index of the state of each token: (B, T) or (C, B, T) -> same shape."""
        lead = 0 if self.copies is None else 1
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 + lead:
            want = "(B, T)" if self.copies is None else f"(C, B, T) with C = {self.copies}"
            raise ValueError(f"tokens must have shape {want}, got {tuple(getattr(tokens, 'shape', ()))}")
        if lead and tokens.shape[0] != self.copies:
            raise ValueError(f"tokens stack {tokens.shape[0]} copies but the model has {self.copies}")
        length = tokens.shape[-1]
        if length > self.horizon:
            raise ValueError(f"sequences have {length} tokens but the tree has depth H = {self.horizon}")
        return prefix_index(tokens.reshape(-1, length), self.vocab_size).view(tokens.shape)  # (..., B, T)

    def _rows(self, table: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
        """table[(copy,) *index]: the leading copy index is added when the model stacks copies."""
        if self.copies is None:
            return table[index]
        return table[(torch.arange(self.copies).view(-1, *([1] * (index[0].dim() - 1))), *index)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the state of each token: ``out[..., b, t, :] = ℓ(s(tokens[..., b, :t]), ·)``.

        tokens: (B, T) int64, or (C, B, T) when the model stacks C copies; T <= H.
        Returns (B, T, V), or (C, B, T, V), float64.
        """
        nodes = self._nodes(tokens)
        columns = [self._rows(self.levels[t], nodes[..., t]) for t in range(tokens.shape[-1])]  # each (..., B, V)
        return torch.stack(columns, dim=-2)  # (..., B, T, V)

    def token_stats(self, tokens: torch.Tensor) -> TokenStats:
        """``losses.token_stats(self(tokens), tokens)`` without the (..., B, T, V) logits.

        The log-sum-exp is computed once per state of the table and gathered, so the cost is
        O(states · V + B · T) instead of O(B · T · V). tokens as :meth:`forward`; returns (..., B, T) fields.
        """
        nodes = self._nodes(tokens)
        taken, lse = [], []
        for t in range(tokens.shape[-1]):
            taken.append(self._rows(self.levels[t], nodes[..., t], tokens[..., t]))  # (..., B)
            lse.append(self._rows(torch.logsumexp(self.levels[t], dim=-1), nodes[..., t]))  # (..., B)
        return TokenStats(logit_taken=torch.stack(taken, dim=-1), logsumexp=torch.stack(lse, dim=-1))

    def gather_states(self, values: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Per-state values at the state of each token: values[h] (V**h,) — or (C, V**h) with copies —
        and tokens (..., B, T) as :meth:`forward` -> (..., B, T), ``out[..., b, t] = values[t][s_t]``."""
        nodes = self._nodes(tokens)
        return torch.stack([self._rows(values[t], nodes[..., t]) for t in range(tokens.shape[-1])], dim=-1)

    def tables(self) -> list[torch.Tensor]:
        """The full table, detached: list over depth of ``(V**h, V)`` (or ``(C, V**h, V)``) float64."""
        return [level.detach().clone() for level in self.levels]
