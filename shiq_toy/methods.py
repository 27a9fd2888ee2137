"""Every training method defined once, as data: which loss, and what a batch must hold for it.

A method is one row of :data:`METHODS`. Both trainers — the tabular one (:mod:`shiq_toy.train`) and the LLM
one (``shiq_llm.train.trainer.ShiQTrainer``) — look the row up and call :func:`per_item_loss`; neither tests a
method's name. Adding a method (say IPO, below) is one loss function and one row.

What a row says:

- ``consumes``: ``"tokens"`` — per-token residual losses on single sequences, ``loss(policy, ref, rewards,
  mask, *, beta, gamma) -> (B,)`` (:data:`shiq_toy.losses.LOSSES`); ``"sequences"`` — a sequence-level loss
  on single sequences, ``loss(Δ, R, value, *, beta, value_coef) -> (B,)``; ``"pairs"`` — a sequence-level
  loss on two responses of one prompt, ``loss(Δ_a, Δ_b, R_a, R_b, *, beta) -> (P,)``.
- ``pairing`` (pair methods only): ``"preference"`` — ``a`` is the response with the higher reward, ties
  are dropped (:func:`shiq_toy.baselines.make_preference_pairs`); ``"any"`` — any two responses of the same
  prompt, in either order (:func:`shiq_toy.baselines.make_pairs`); the loss must then be symmetric.
- ``needs_value``: the loss reads a learned value ``V_φ(x)`` of each sequence's prompt (DRO).
- ``needs_soft_value``: the loss needs the soft value of the logits over the whole vocabulary
  (``logit_q``; the chunked LLM statistics do not provide it, so the LLM trainer refuses it).
- ``residual`` (token methods): the (B, T) residual whose square, summed over t, is the loss
  (:data:`shiq_toy.losses.RESIDUALS`); :func:`loss_and_diagnostics` returns it, so a trainer can log
  ``|residual|`` without computing it twice.
- ``abs_residual`` (sequence and pair methods whose loss is the square of one residual ``e``): ``|e|`` from the
  per-item loss.

Sequence-level methods read ``Δ(y) = Σ_t ρ_t`` (:func:`shiq_toy.baselines.sequence_log_ratio`) and the sequence
reward ``R = Σ_t r_t``; they are undiscounted and need ``gamma = 1``.

Notation used for tensor shapes: ``B`` sequences, ``T`` positions, ``P`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from shiq_toy import baselines
from shiq_toy.checks import check_beta
from shiq_toy.losses import LOSSES, NEEDS_SOFT_VALUE, RESIDUALS, TokenStats

__all__ = ["Method", "METHODS", "get_method", "per_item_loss", "loss_and_diagnostics", "ipo_loss", "dpo_pair_loss",
           "copg_pair_loss"]


@dataclass(frozen=True)
class Method:
    """One training method: its loss and what a batch must hold for it (module docstring)."""

    name: str
    consumes: Literal["tokens", "sequences", "pairs"]
    loss: Callable[..., torch.Tensor]
    pairing: Literal["preference", "any"] | None = None
    needs_value: bool = False
    needs_soft_value: bool = False
    description: str = ""
    #: |e| from the per-item loss of a sequence/pair method that is a square of one residual e (None otherwise).
    abs_residual: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: Token methods: the (B, T) residual, ``loss = Σ_t residual_t²`` (same arguments as ``loss``); None otherwise.
    residual: Callable[..., torch.Tensor] | None = None

    @property
    def sequence_level(self) -> bool:
        """True for losses on Δ(y) and R(x, y) (undiscounted, gamma must be 1)."""
        return self.consumes != "tokens"


def dpo_pair_loss(log_ratio_a, log_ratio_b, reward_a, reward_b, *, beta: float) -> torch.Tensor:
    """DPO on a preference pair (``a`` preferred; the rewards only chose the order): −ln σ(β(Δ_a − Δ_b)). (P,)."""
    return baselines.dpo_loss(log_ratio_a, log_ratio_b, beta=beta)


def copg_pair_loss(log_ratio_a, log_ratio_b, reward_a, reward_b, *, beta: float) -> torch.Tensor:
    """CoPG on any two responses of one prompt: ½(R_a − R_b − β(Δ_a − Δ_b))². (P,)."""
    return baselines.copg_loss(log_ratio_a, log_ratio_b, reward_a, reward_b, beta=beta)


def ipo_loss(log_ratio_a, log_ratio_b, reward_a, reward_b, *, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2024) on a preference pair (``a`` preferred): (Δ_a − Δ_b − 1/(2β))². (P,).

    As TRL's ``loss_type="ipo"`` (with β as IPO's τ): the log-ratio margin is regressed onto 1/(2β)
    whatever the size of the reward gap. Its minimiser on a single pair has Δ_a − Δ_b = 1/(2β).
    """
    check_beta(beta)
    baselines.dpo_loss(log_ratio_a, log_ratio_b, beta=beta)  # the same argument checks
    return (log_ratio_a - log_ratio_b - 1.0 / (2.0 * beta)).square()


def _abs_of_square(loss: torch.Tensor) -> torch.Tensor:
    return loss.clamp(min=0).sqrt()  # loss = e²


def _abs_of_half_square(loss: torch.Tensor) -> torch.Tensor:
    return (2.0 * loss).clamp(min=0).sqrt()  # loss = ½ e²


_TOKEN_DESCRIPTIONS = {
    "shiq": "ShiQ: shaped multi-step residual (the paper's loss)",
    "shiq_init": "ShiQ without the reward shaping (ablation ShiQ/init)",
    "shiq_ms": "ShiQ with a one-step residual (ablation ShiQ/ms)",
    "shiq_tk": "ShiQ on the first state only (ablation ShiQ/tk)",
    "shifted_q": "one-step residual without shaping (shifted Q-learning)",
    "logit_q": "naive soft Q-learning on the logits (needs the soft value)",
}

#: The methods, by name. Token rows come from :data:`shiq_toy.losses.LOSSES`.
METHODS: dict[str, Method] = {
    **{
        name: Method(name, "tokens", loss, needs_soft_value=name in NEEDS_SOFT_VALUE, description=_TOKEN_DESCRIPTIONS[name],
                     residual=RESIDUALS[name])
        for name, loss in LOSSES.items()
    },
    "dpo": Method("dpo", "pairs", dpo_pair_loss, pairing="preference", description="DPO on preference pairs"),
    "ipo": Method("ipo", "pairs", ipo_loss, pairing="preference", description="IPO on preference pairs",
                  abs_residual=_abs_of_square),
    "copg": Method("copg", "pairs", copg_pair_loss, pairing="any", description="CoPG on two responses of a prompt",
                   abs_residual=_abs_of_half_square),
    "dro": Method("dro", "sequences", baselines.dro_loss, needs_value=True,
                  description="DRO-V with a value head, split gradients", abs_residual=_abs_of_half_square),
}


def get_method(name: str) -> Method:
    """The row of ``name``; ValueError listing the known methods otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(METHODS)}") from None


def per_item_loss(
    method: str | Method,
    policy: TokenStats,
    ref: TokenStats,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    gamma: float = 1.0,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    value: torch.Tensor | None = None,
    soft_value: torch.Tensor | None = None,
    value_coef: float = 1.0,
) -> torch.Tensor:
    """The unreduced loss of a batch under ``method``: (B,) per sequence, or (P,) per pair.

    policy, ref: TokenStats of (B, T); rewards (B, T) per-token rewards; mask (B, T) bool. Token methods:
    ``L_b = Σ_t residual_t²``. ``pairs``: ``(idx_a, idx_b)`` (P,) index tensors into the B sequences, built
    with the row's ``pairing``. ``value``: (B,) ``V_φ(x)`` for methods with ``needs_value``. ``soft_value``:
    (B, T) for ``needs_soft_value``. ValueError when something the row needs is missing, or ``gamma != 1``
    for a sequence-level method. The loss alone of :func:`loss_and_diagnostics`.
    """
    return loss_and_diagnostics(method, policy, ref, rewards, mask, beta=beta, gamma=gamma, pairs=pairs, value=value,
                                soft_value=soft_value, value_coef=value_coef)[0]


def loss_and_diagnostics(
    method: str | Method,
    policy: TokenStats,
    ref: TokenStats,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    gamma: float = 1.0,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    value: torch.Tensor | None = None,
    soft_value: torch.Tensor | None = None,
    value_coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(per_item, diagnostics)``: :func:`per_item_loss` (same arguments) and what the loss computed on the way.

    diagnostics: token methods: ``residual`` (B, T), the row's ``residual`` (``per_item = Σ_t residual_t²``,
    0 where masked out); sequence methods: ``delta`` (B,) = Δ(y) and ``value`` (B,) when given; pair methods:
    ``delta`` (B,) and ``dpo_margin`` (P,) = β(Δ_a − Δ_b). Diagnostics are detached from the graph except
    ``residual`` (the loss is its square).
    """
    row = method if isinstance(method, Method) else get_method(method)
    if row.consumes == "tokens":
        extra = {}
        if row.needs_soft_value:
            if soft_value is None:
                raise ValueError(f"method {row.name!r} needs soft_value, the (B, T) soft value of the logits")
            extra["soft_value"] = soft_value
        residual = row.residual(policy, ref, rewards, mask, beta=beta, gamma=gamma, **extra)  # (B, T)
        return residual.square().sum(dim=-1), {"residual": residual}  # (B,): the row's loss, Σ_t residual_t²
    if gamma != 1.0:
        raise ValueError(f"method {row.name!r} is sequence-level (undiscounted): gamma must be 1, got {gamma}")
    delta = baselines.sequence_log_ratio(policy, ref, mask)  # (B,) Δ(y)
    returns = torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype)).sum(dim=-1)  # (B,) R(x, y)
    if row.consumes == "sequences":
        if row.needs_value and value is None:
            raise ValueError(f"method {row.name!r} needs value, the (B,) value V_φ(x) of each sequence's prompt")
        diagnostics = {"delta": delta.detach()} | ({"value": value.detach()} if value is not None else {})
        return row.loss(delta, returns, value, beta=beta, value_coef=value_coef), diagnostics  # (B,)
    if pairs is None:
        raise ValueError(f"method {row.name!r} trains on pairs: give pairs=(idx_a, idx_b)")
    idx_a, idx_b = pairs
    per_item = row.loss(delta[idx_a], delta[idx_b], returns[idx_a], returns[idx_b], beta=beta)  # (P,)
    margin = beta * (delta[idx_a] - delta[idx_b]).detach()  # (P,)
    return per_item, {"delta": delta.detach(), "dpo_margin": margin}
