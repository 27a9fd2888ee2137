"""The baselines of spec §4 — DPO, CoPG and DRO-V — on the same per-token statistics as ShiQ.

Every loss here is a pure function of sequence log-ratios ``Δ(y) = Σ_t mask_t ρ_t`` (:func:`sequence_log_ratio`,
built from :class:`shiq_toy.losses.TokenStats` like the ShiQ residuals) and sequence rewards ``R``. They are
unreduced: one number per pair (DPO, CoPG) or per sequence (DRO); the caller averages.

Pairs are index tensors into a batch of sequences: :func:`make_preference_pairs` (DPO: higher reward wins,
ties dropped) and :func:`make_pairs` (CoPG: any two responses of the same prompt).

Notation used for tensor shapes: ``B`` sequences, ``T`` positions, ``P`` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiq_toy.checks import check_beta, check_number
from shiq_toy.losses import TokenStats, log_ratio

__all__ = [
    "sequence_log_ratio",
    "dpo_loss",
    "copg_loss",
    "dro_loss",
    "make_preference_pairs",
    "make_pairs",
    "PAIR_MODES",
]

#: How :func:`make_pairs` / :func:`make_preference_pairs` pair the responses of one prompt.
PAIR_MODES = ("disjoint", "all")


def _check_same_1d(**tensors: torch.Tensor) -> None:
    """All arguments are finite floating (P,) tensors of the same length."""
    shape = None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise ValueError(f"{name} must have shape (P,), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if shape is None:
            shape, first = x.shape, name
        elif x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {first} has shape {tuple(shape)}")
    finite = torch.stack([torch.isfinite(x).all() for x in tensors.values()]).tolist()  # one host synchronisation
    for (name, x), ok in zip(tensors.items(), finite):
        if not ok:
            raise ValueError(f"{name} is not finite at index {int((~torch.isfinite(x)).nonzero()[0])}")


def sequence_log_ratio(policy: TokenStats, ref: TokenStats, mask: torch.Tensor) -> torch.Tensor:
    """Δ(y) = Σ_t mask_t ρ_t = ln π(y|x) − ln π_ref(y|x) (spec §4).

    policy, ref: TokenStats of (B, T); mask: (B, T) bool, True on response tokens. Returns (B,).
    Masked-out positions are never read (they may hold NaN), as in :mod:`shiq_toy.losses`.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor of shape (B, T), got {getattr(mask, 'shape', type(mask).__name__)}")
    for name, x in zip(("policy.logit_taken", "policy.logsumexp", "ref.logit_taken", "ref.logsumexp"), (*policy, *ref)):
        if x.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
    rho = log_ratio(policy, ref)  # (B, T)
    return torch.where(mask, rho, torch.zeros((), dtype=rho.dtype)).sum(dim=-1)  # (B,)


def dpo_loss(log_ratio_chosen: torch.Tensor, log_ratio_rejected: torch.Tensor, *, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023):  L = −ln σ(β (Δ(y_w) − Δ(y_l))).

    log_ratio_chosen, log_ratio_rejected: (P,) sequence log-ratios Δ of the preferred and the rejected
    response of each pair. Returns (P,). Computed as ``-logsigmoid`` (no overflow for large margins).
    """
    check_beta(beta)
    _check_same_1d(log_ratio_chosen=log_ratio_chosen, log_ratio_rejected=log_ratio_rejected)
    return -F.logsigmoid(beta * (log_ratio_chosen - log_ratio_rejected))


def copg_loss(
    log_ratio_a: torch.Tensor,
    log_ratio_b: torch.Tensor,
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """CoPG (Flet-Berliac et al. 2024) as a squared loss on two responses y, y' of the same prompt:

    L = ½ (R(y) − R(y') − β (Δ(y) − Δ(y')))²

    Its gradient is CoPG's contrastive policy gradient; no preference is needed (IPO is the case of a
    constant reward gap). All arguments (P,); returns (P,). Symmetric in the two responses.
    """
    check_beta(beta)
    _check_same_1d(log_ratio_a=log_ratio_a, log_ratio_b=log_ratio_b, reward_a=reward_a, reward_b=reward_b)
    return 0.5 * (reward_a - reward_b - beta * (log_ratio_a - log_ratio_b)).square()


def dro_loss(
    log_ratio: torch.Tensor,
    reward: torch.Tensor,
    value: torch.Tensor,
    *,
    beta: float,
    value_coef: float = 1.0,
) -> torch.Tensor:
    """DRO-V (Richemond et al. 2024) on single (x, y, R) with a separate value V_φ(x):

    forward value   L = ½ (R − V(x) − β Δ(y))²
    policy gradient from  ½ (R − sg(V) − β Δ)²        (sg = stop-gradient)
    value gradient  from  value_coef · ½ (R − V − sg(β Δ))²

    log_ratio (B,) Δ(y); reward (B,) R(x, y); value (B,) V_φ(x) of each sequence's prompt. Returns (B,).
    This is the split-gradient ("practical") version. Because both halves share the one residual
    e = R − V − βΔ, their gradients are −β e ∇Δ and −value_coef · e ∇V: with the default value_coef = 1
    the sum is exactly the gradient of the joint loss ½ e² (whether or not policy and value share
    parameters); value_coef ≠ 1 re-weights the value's update only. Fixed point: V(x) + β Δ(y) = E[R|x, y],
    i.e. π ∝ π_ref exp(R/β) on the responses the data covers, and V(x) = v*(x).
    """
    check_beta(beta)
    check_number("value_coef", value_coef)
    _check_same_1d(log_ratio=log_ratio, reward=reward, value=value)
    policy_part = 0.5 * (reward - value.detach() - beta * log_ratio).square()
    value_part = 0.5 * (reward.detach() - value - (beta * log_ratio).detach()).square()  # reward counted once
    # forward = policy_part = ½ e²; backward = policy gradient + value_coef × value gradient
    return policy_part + value_coef * (value_part - value_part.detach())


# --------------------------------------------------------------------------------------------------
# Pairing responses of the same prompt
# --------------------------------------------------------------------------------------------------


def _check_prompt_ids(prompt_ids: torch.Tensor) -> None:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 1 or prompt_ids.is_floating_point() or prompt_ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids must be an integer tensor of shape (N,), got {getattr(prompt_ids, 'dtype', type(prompt_ids).__name__)} {tuple(getattr(prompt_ids, 'shape', ()))}")


def make_pairs(prompt_ids: torch.Tensor, *, mode: str = "disjoint") -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of two different responses of the same prompt (CoPG needs no preference).

    prompt_ids: (N,) integer prompt of each response. Returns ``(idx_a, idx_b)``, two (P,) int64 index
    tensors with ``idx_a < idx_b`` and ``prompt_ids[idx_a] == prompt_ids[idx_b]``, sorted by ``idx_a``.
    ``mode="disjoint"``: the responses of each prompt, in order of appearance, are paired 1st with 2nd,
    3rd with 4th, … (each response used at most once; an odd one out is left unpaired).
    ``mode="all"``: every unordered pair of responses of each prompt (N_x (N_x − 1) / 2 per prompt).
    Raises ValueError when no prompt has two responses.
    """
    _check_prompt_ids(prompt_ids)
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {PAIR_MODES}, got {mode!r}")
    ids = prompt_ids.long()
    if mode == "disjoint":
        order = torch.argsort(ids, stable=True)  # responses grouped by prompt, in order of appearance
        sorted_ids = ids[order]
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
        group_start = torch.cummax(torch.where(starts, torch.arange(len(ids)), 0), dim=0).values
        rank = torch.arange(len(ids)) - group_start  # rank of each response within its prompt
        partner = (torch.arange(len(ids)) + 1).clamp(max=len(ids) - 1)  # next response in sorted order
        first = (rank % 2 == 0) & (sorted_ids[partner] == sorted_ids) & (partner > torch.arange(len(ids)))
        idx_a, idx_b = order[first], order[partner[first]]
    else:
        same = ids[:, None] == ids[None, :]  # (N, N): memory O(N²)
        idx_a, idx_b = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    if idx_a.numel() == 0:
        raise ValueError("no pair can be formed: no prompt has two responses")
    idx_a, idx_b = torch.minimum(idx_a, idx_b), torch.maximum(idx_a, idx_b)
    keep = torch.argsort(idx_a * len(ids) + idx_b)
    return idx_a[keep], idx_b[keep]


def make_preference_pairs(
    prompt_ids: torch.Tensor, rewards: torch.Tensor, *, mode: str = "disjoint", allow_empty: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference pairs for DPO from reward-labelled responses (spec §4).

    prompt_ids: (N,) integer prompt of each response; rewards: (N,) its sequence reward R. Responses are
    paired within a prompt as in :func:`make_pairs` (``mode``), the higher reward is the winner, and ties
    are dropped. Returns ``(idx_w, idx_l)``, (P,) int64 indices of the preferred and the rejected response.
    Raises ValueError when no pair with different rewards exists, unless ``allow_empty`` (then (0,) tensors:
    an online batch may legitimately hold no preference).
    """
    _check_prompt_ids(prompt_ids)
    if not isinstance(rewards, torch.Tensor) or rewards.shape != prompt_ids.shape or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor of shape {tuple(prompt_ids.shape)} like prompt_ids, got {getattr(rewards, 'dtype', None)} {tuple(getattr(rewards, 'shape', ()))}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards is not finite at index {int((~torch.isfinite(rewards)).nonzero()[0])}")
    try:
        idx_a, idx_b = make_pairs(prompt_ids, mode=mode)
    except ValueError as error:
        if allow_empty:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        raise ValueError(f"no preference pair can be formed: {error}") from None
    gap = rewards[idx_a] - rewards[idx_b]
    keep = gap != 0
    if not bool(keep.any()) and not allow_empty:
        raise ValueError(f"no preference pair can be formed: all {len(gap)} pairs of responses to the same prompt have equal rewards")
    a_wins = gap[keep] > 0
    idx_a, idx_b = idx_a[keep], idx_b[keep]
    return torch.where(a_wins, idx_a, idx_b), torch.where(a_wins, idx_b, idx_a)
