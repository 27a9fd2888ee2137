"""The one definition of the ShiQ residuals and losses (spec §2–3).

Every trainer of this library — the tabular toys and the transformer trainer — calls these functions.
They are pure functions of per-token statistics, so the `(B, T, V)` logits are touched once, by
:func:`token_stats` (or by the memory-efficient ``shiq_llm.core.stats``), and never here.

Notation used for tensor shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary.

At a response position ``t`` (state ``s_t``, action ``a_t``) a residual needs four numbers::

    ℓ_t    = policy.logit_taken   ℓ(s_t, a_t)           vℓ_t   = policy.logsumexp   ln Σ_a exp ℓ(s_t, a)
    ℓref_t = ref.logit_taken      ℓ_ref(s_t, a_t)       vref_t = ref.logsumexp      ln Σ_a exp ℓ_ref(s_t, a)

    ρ_t = (ℓ_t − vℓ_t) − (ℓref_t − vref_t)               per-token log-ratio ln π/π_ref
    disc_t(x) = Σ_{k ≥ t} γ^(k−t) x_k                     discounted sum to the end of the episode

Masks. ``mask[b, t]`` is True on the positions that are actions (response tokens written by the agent).
The equations run over the masked-in positions *in order, as if the masked-out ones were absent*: the
"next" state of a position is the next masked-in one, and after the last masked-in position every value is 0
(terminal state). So right padding and holes (environment tokens inside a dialogue) both work, and every
residual is exactly 0 where ``mask`` is False. Values at masked-out positions are never read (they may be
NaN). Implementation: the masked-in positions of each row are gathered to the left ("compacted"), the
equations run on contiguous right-padded rows, and the result is scattered back.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from shiq_toy.checks import check_beta, check_gamma

__all__ = [
    "TokenStats",
    "token_stats",
    "log_ratio",
    "discounted_reverse_cumsum",
    "logit_q_soft_value",
    "shiq",
    "shiq_init",
    "shiq_ms",
    "shiq_tk",
    "shifted_q",
    "logit_q",
    "RESIDUALS",
    "LOSSES",
    "NEEDS_SOFT_VALUE",
    "reduce_loss",
]


class TokenStats(NamedTuple):
    """Per-token statistics of one model on a batch of sequences.

    logit_taken: (B, T) ℓ(s_t, a_t), the logit of the token actually taken at position t.
    logsumexp:   (B, T) vℓ(s_t) = ln Σ_a exp ℓ(s_t, a), over the whole vocabulary.
    """

    logit_taken: torch.Tensor
    logsumexp: torch.Tensor


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: bf16/fp16 statistics are upcast before any sum over a sequence."""
    return torch.promote_types(dtype, torch.float32)


def token_stats(logits: torch.Tensor, tokens: torch.Tensor) -> TokenStats:
    """Statistics of full logits: ``logits[b, t]`` are the logits of the state of ``tokens[b, t]``.

    logits: (B, T, V) float; tokens: (B, T) int64 in ``[0, V)``. Returns (B, T) tensors in float32 at
    least (float64 stays float64). This is the naive path: it reads all ``B·T·V`` logits.
    For a causal language model shift first (the logits emitted at ``p − 1`` describe token ``p``);
    ``shiq_llm.core.stats.response_token_stats`` does that without materialising the logits.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens must have shape (B, T) = {tuple(logits.shape[:2])} matching logits, got {tuple(tokens.shape)}"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    vocab = logits.shape[-1]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"tokens must lie in [0, V) = [0, {vocab}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    logits = logits.to(_work_dtype(logits.dtype))
    logit_taken = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return TokenStats(logit_taken=logit_taken, logsumexp=torch.logsumexp(logits, dim=-1))


def log_ratio(policy: TokenStats, ref: TokenStats) -> torch.Tensor:
    """ρ_t = ln π(a_t|s_t) − ln π_ref(a_t|s_t) = (ℓ_t − vℓ_t) − (ℓref_t − vref_t); (B, T) -> (B, T)."""
    return (policy.logit_taken - policy.logsumexp) - (ref.logit_taken - ref.logsumexp)


def logit_q_soft_value(logits: torch.Tensor, ref_logits: torch.Tensor, *, beta: float) -> torch.Tensor:
    """The extra statistic of ``logit_q``: β ln Σ_a π_ref(a|s_t) exp(ℓ(s_t, a)/β).

    logits, ref_logits: (B, T, V), aligned like :func:`token_stats`. Returns (B, T).
    """
    check_beta(beta)
    if logits.shape != ref_logits.shape or logits.dim() != 3:
        raise ValueError(
            f"logits and ref_logits must both have shape (B, T, V), got {tuple(logits.shape)} and {tuple(ref_logits.shape)}"
        )
    dtype = _work_dtype(logits.dtype)
    log_ref = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    return beta * torch.logsumexp(logits.to(dtype) / beta + log_ref, dim=-1)


def discounted_reverse_cumsum(x: torch.Tensor, *, gamma: float, chunk: int = 256) -> torch.Tensor:
    """disc_t(x) = Σ_{k ≥ t} γ^(k−t) x_k along the last dimension; (..., T) -> (..., T).

    γ = 1 is a flipped cumulative sum. γ < 1 multiplies blocks of ``chunk`` positions by the triangular
    matrix W[t, k] = γ^(k−t) (k ≥ t) and carries the block's first value backwards, so no power of γ
    larger than 1 is ever formed (no overflow however long the sequence).
    """
    if gamma == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    length = x.shape[-1]
    size = max(1, min(chunk, length))
    steps = torch.arange(size, device=x.device, dtype=torch.float64)
    exponent = steps[None, :] - steps[:, None]  # (C, C): k − t
    weights = torch.where(exponent >= 0, gamma ** exponent.clamp(min=0), torch.zeros((), dtype=torch.float64))
    weights = weights.to(x.dtype)
    blocks = []
    carry = None  # disc at the first position after the current block, shape (...)
    for start in reversed(range(0, length, size)):
        block = x[..., start : start + size]
        width = block.shape[-1]
        local = block @ weights[:width, :width].T  # (..., c): Σ_k W[t, k] x_k
        if carry is not None:
            decay = (gamma ** (width - steps[:width])).to(x.dtype)  # γ^(c − t) ≤ 1
            local = local + carry.unsqueeze(-1) * decay
        carry = local[..., 0]
        blocks.append(local)
    return torch.cat(blocks[::-1], dim=-1)


# --------------------------------------------------------------------------------------------------
# Validation and compaction (shared by every residual)
# --------------------------------------------------------------------------------------------------


def _first_bad(x: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    bad = (~torch.isfinite(x)) & mask
    row, pos = bad.nonzero()[0].tolist()
    return row, pos


def _check_rows_not_empty(mask: torch.Tensor) -> None:
    """ValueError naming the rows of ``mask`` (B, T) that have no masked-in (response) position."""
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequence(s) {empty[:10]} have no masked-in (response) token; drop them or fix the mask")


def _validate(fields: dict[str, torch.Tensor], mask: torch.Tensor, beta: float, gamma: float) -> None:
    check_beta(beta)
    check_gamma(gamma)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        dtype = mask.dtype if isinstance(mask, torch.Tensor) else None
        raise ValueError(f"mask must be a bool tensor of shape (B, T), got {shape} {dtype}")
    for name, x in fields.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != mask.device:
            raise ValueError(f"{name} is on {x.device} but mask is on {mask.device}")
    # one host synchronisation for all the value checks; the failing one is located only when there is one
    ok = torch.stack([mask.any(dim=1).all()] + [(torch.isfinite(x) | ~mask).all() for x in fields.values()]).tolist()
    if all(ok):
        return
    _check_rows_not_empty(mask)
    for (name, x), finite in zip(fields.items(), ok[1:]):
        if not finite:
            row, pos = _first_bad(x, mask)
            raise ValueError(f"{name} is not finite at masked-in position (row {row}, t {pos}): {x[row, pos].item()}")


class _Compact(NamedTuple):
    order: torch.Tensor  # (B, T) int64: original position of each compacted slot
    valid: torch.Tensor  # (B, T) bool: slot < number of masked-in positions of the row


def _compaction(mask: torch.Tensor) -> _Compact:
    """Move each row's masked-in positions to the left, keeping their order."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    slots = torch.arange(mask.shape[1], device=mask.device)
    return _Compact(order=order, valid=slots[None, :] < mask.sum(dim=1, keepdim=True))


def _gather(x: torch.Tensor, compact: _Compact, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) original layout -> (B, T) compacted layout, exactly 0 after the last masked-in slot."""
    return torch.where(compact.valid, x.to(dtype).gather(1, compact.order), torch.zeros((), dtype=dtype, device=x.device))


def _scatter(y: torch.Tensor, compact: _Compact) -> torch.Tensor:
    """(B, T) compacted layout -> (B, T) original layout, exactly 0 at masked-out positions."""
    return torch.where(compact.valid, y, 0.0).gather(1, torch.argsort(compact.order, dim=1))


def _next(x: torch.Tensor) -> torch.Tensor:
    """x_next[t] = x[t + 1] on a compacted row, and exactly 0 after the last slot (terminal value)."""
    return torch.nn.functional.pad(x[:, 1:], (0, 1))


class _Terms(NamedTuple):
    """Compacted float tensors of one batch, (B, T) each, 0 after each row's last masked-in slot."""

    logit: torch.Tensor  # ℓ_t
    lse: torch.Tensor  # vℓ_t
    ref_logit: torch.Tensor  # ℓref_t
    ref_lse: torch.Tensor  # vref_t
    reward: torch.Tensor  # r_t
    compact: _Compact


def _terms(policy: TokenStats, ref: TokenStats, rewards: torch.Tensor, mask: torch.Tensor, beta, gamma, **extra) -> _Terms:
    fields = {
        "policy.logit_taken": policy.logit_taken,
        "policy.logsumexp": policy.logsumexp,
        "ref.logit_taken": ref.logit_taken,
        "ref.logsumexp": ref.logsumexp,
        "rewards": rewards,
        **extra,
    }
    _validate(fields, mask, beta, gamma)
    dtype = _work_dtype(policy.logit_taken.dtype)
    compact = _compaction(mask)
    return _Terms(
        *(_gather(x, compact, dtype) for x in (policy.logit_taken, policy.logsumexp, ref.logit_taken, ref.logsumexp, rewards)),
        compact=compact,
    )


def _shaped_return(t: _Terms, beta: float, gamma: float) -> torch.Tensor:
    """disc_t(β ρ − r) on compacted rows: the multi-step part shared by shiq, shiq_init and shiq_tk."""
    rho = (t.logit - t.lse) - (t.ref_logit - t.ref_lse)
    return discounted_reverse_cumsum(beta * rho - t.reward, gamma=gamma)


def _shiq_residual(t: _Terms, beta: float, gamma: float) -> torch.Tensor:
    """β (vℓ_t − vref_t) + β disc_t(ρ) − disc_t(r) on compacted rows (shiq, and shiq_tk's first slot)."""
    return beta * (t.lse - t.ref_lse) + _shaped_return(t, beta, gamma)


# --------------------------------------------------------------------------------------------------
# The residuals (spec §3). Signature: (policy, ref, rewards, mask, *, beta, gamma=1.0) -> (B, T)
# --------------------------------------------------------------------------------------------------


def shiq(policy: TokenStats, ref: TokenStats, rewards: torch.Tensor, mask: torch.Tensor, *, beta: float, gamma: float = 1.0) -> torch.Tensor:
    """ShiQ: shaped, multi-step, token-wise residual (spec §3, the method).

    residual_t = β (vℓ_t − vref_t) + β disc_t(ρ) − disc_t(r)

    policy, ref: TokenStats of (B, T); rewards: (B, T); mask: (B, T) bool. Returns (B, T), 0 where masked out.
    Fixed point: ℓ* = ℓ_ref + q*/β (softmax(ℓ*) = π*); 0 with zero gradient at ℓ = ℓ_ref when r ≡ 0.
    """
    t = _terms(policy, ref, rewards, mask, beta, gamma)
    return _scatter(_shiq_residual(t, beta, gamma), t.compact)


def shiq_init(policy: TokenStats, ref: TokenStats, rewards: torch.Tensor, mask: torch.Tensor, *, beta: float, gamma: float = 1.0) -> torch.Tensor:
    """ShiQ without reward shaping (multi-step only): residual_t = β vℓ_t + β disc_t(ρ) − disc_t(r).

    Shapes as :func:`shiq`. Fixed point ℓ = ln π_ref + q*/β; not 0 at ℓ = ℓ_ref (it is ≈ β vref there).
    """
    t = _terms(policy, ref, rewards, mask, beta, gamma)
    residual = beta * t.lse + _shaped_return(t, beta, gamma)
    return _scatter(residual, t.compact)


def shiq_ms(policy: TokenStats, ref: TokenStats, rewards: torch.Tensor, mask: torch.Tensor, *, beta: float, gamma: float = 1.0) -> torch.Tensor:
    """ShiQ without the multi-step part (shaped, one step):

    residual_t = β (ℓ_t − ℓref_t) − r_t − γ β (vℓ_{t+1} − vref_{t+1}),   v_{T+1} = 0.

    Shapes as :func:`shiq`. Fixed point ℓ* = ℓ_ref + q*/β.
    """
    t = _terms(policy, ref, rewards, mask, beta, gamma)
    residual = beta * (t.logit - t.ref_logit) - t.reward - gamma * beta * (_next(t.lse) - _next(t.ref_lse))
    return _scatter(residual, t.compact)


def shiq_tk(policy: TokenStats, ref: TokenStats, rewards: torch.Tensor, mask: torch.Tensor, *, beta: float, gamma: float = 1.0) -> torch.Tensor:
    """ShiQ's equation at the first response state only (sequence level):

    residual_1 = β (vℓ_1 − vref_1) + β disc_1(ρ) − disc_1(r) at the first masked-in position, 0 elsewhere.

    Shapes as :func:`shiq`. At t = 1 it is the DRO residual β ln π(y|x)/π_ref(y|x) + V(x) − R(x, y).
    """
    t = _terms(policy, ref, rewards, mask, beta, gamma)
    residual = _shiq_residual(t, beta, gamma)
    first = torch.zeros_like(t.compact.valid)
    first[:, 0] = True
    return _scatter(torch.where(first, residual, 0.0), t.compact)


def shifted_q(policy: TokenStats, ref: TokenStats, rewards: torch.Tensor, mask: torch.Tensor, *, beta: float, gamma: float = 1.0) -> torch.Tensor:
    """Shifted Q (one step, no shaping): residual_t = β (ℓ_t − ℓref_t + vref_t) − r_t − γ β vℓ_{t+1}.

    Shapes as :func:`shiq`. Fixed point ℓ = ln π_ref + q*/β, so softmax(ℓ) = π* (sampling needs no π_ref).
    """
    t = _terms(policy, ref, rewards, mask, beta, gamma)
    residual = beta * (t.logit - t.ref_logit + t.ref_lse) - t.reward - gamma * beta * _next(t.lse)
    return _scatter(residual, t.compact)


def logit_q(
    policy: TokenStats,
    ref: TokenStats,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    gamma: float = 1.0,
    soft_value: torch.Tensor,
) -> torch.Tensor:
    """Naive soft Q-learning on the logits (the "obvious" baseline; spec §3):

    residual_t = ℓ_t − r_t − γ w_{t+1},   w_t = β ln Σ_a π_ref(a|s_t) exp(ℓ(s_t, a)/β)  (``soft_value``).

    soft_value: (B, T) from :func:`logit_q_soft_value`; other shapes as :func:`shiq`. ``ref`` is only
    validated (π_ref enters through ``soft_value``). Fixed point ℓ = q*, so softmax(ℓ) is not π*.
    """
    t = _terms(policy, ref, rewards, mask, beta, gamma, soft_value=soft_value)
    value = _gather(soft_value, t.compact, t.logit.dtype)
    residual = t.logit - t.reward - gamma * _next(value)
    return _scatter(residual, t.compact)


ResidualFn = Callable[..., torch.Tensor]

RESIDUALS: dict[str, ResidualFn] = {
    "shiq": shiq,
    "shiq_init": shiq_init,
    "shiq_ms": shiq_ms,
    "shiq_tk": shiq_tk,
    "shifted_q": shifted_q,
    "logit_q": logit_q,
}

#: Residuals that need the extra ``soft_value`` keyword (see :func:`logit_q_soft_value`).
NEEDS_SOFT_VALUE = frozenset({"logit_q"})


def _squared_loss(residual_fn: ResidualFn) -> ResidualFn:
    def loss(policy, ref, rewards, mask, *, beta, gamma=1.0, **extra):
        return residual_fn(policy, ref, rewards, mask, beta=beta, gamma=gamma, **extra).square().sum(dim=-1)

    loss.__name__ = f"{residual_fn.__name__}_loss"
    loss.__qualname__ = loss.__name__
    loss.__doc__ = (
        f"Per-sequence loss L_b = Σ_t mask_t · {residual_fn.__name__}_t²; same arguments as "
        f"``{residual_fn.__name__}``, returns (B,). Unreduced over the batch: see :func:`reduce_loss`."
    )
    return loss


LOSSES: dict[str, ResidualFn] = {name: _squared_loss(fn) for name, fn in RESIDUALS.items()}


def reduce_loss(per_sequence: torch.Tensor, mask: torch.Tensor, *, average: str = "sequence") -> torch.Tensor:
    """Batch reduction of a (B,) per-sequence loss: ``"sequence"`` (default) averages over the B sequences,
    ``"token"`` divides the sum by the number of masked-in tokens of the batch. Returns a scalar.

    mask: (B, T). A row with no masked-in token is a ValueError naming it, as in the residuals (it would
    count as a sequence of loss 0, or shrink the token divisor).
    """
    if per_sequence.dim() != 1 or mask.dim() != 2 or per_sequence.shape[0] != mask.shape[0]:
        raise ValueError(f"per_sequence must have shape (B,) and mask (B, T), got {tuple(per_sequence.shape)} and "
                         f"{tuple(mask.shape)}")
    _check_rows_not_empty(mask)
    if average == "sequence":
        return per_sequence.mean()
    if average == "token":
        return per_sequence.sum() / mask.sum()
    raise ValueError(f"average must be 'sequence' or 'token', got {average!r}")
