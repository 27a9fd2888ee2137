"""Models of a whole ``(C, S, A)`` table of outputs, and the full-batch trainer on episodes of a finite MDP.

:class:`StateTable` holds one free output per (state, action) (tabular); :class:`StateMLP` computes the outputs
of every state from state features with a one-hidden-layer network (function approximation). Both stack C
independent copies (seeds) as a leading dimension and start at a given table (``ℓ_ref`` for the ShiQ family,
0 for soft Q-values). :func:`train_episodes` minimises :func:`shiq_toy.episodes.episode_loss` on a fixed set
of episodes, full batch, with Adam; the sum over copies keeps each copy's own gradient (as in
:mod:`shiq_toy.train`).

Notation used for tensor shapes: ``C`` copies, ``S`` states, ``A`` actions, ``D`` features, ``U`` hidden units.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from shiq_toy.checks import check_number
from shiq_toy.episodes import EPISODE_METHODS, Episodes, episode_loss, policy_logits
from shiq_toy.train import History

__all__ = ["StateTable", "StateMLP", "train_episodes"]


class StateTable(nn.Module):
    """A free table of outputs, ``init`` (C, S, A) copied into one float64 parameter; ``forward() -> (C, S, A)``."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(init, torch.Tensor) or init.dim() != 3:
            raise ValueError(f"init must be a (C, S, A) tensor, got {tuple(getattr(init, 'shape', ()))}")
        self.table = nn.Parameter(init.detach().to(torch.float64).clone())

    def forward(self) -> torch.Tensor:
        return self.table


class StateMLP(nn.Module):
    """C independent networks ``out(s) = offset(s) + W2ᵀ tanh(W1ᵀ x(s) + b1) + b2`` over all states at once.

    features: (S, D) state features x(s) (e.g. coordinates), or None for one-hot states (then ``W1ᵀ x(s)``
    is the row ``W1[s]``, an embedding, without the (S, S) product); offset: (S, A) the output at
    initialisation (``W2 = b2 = 0``); W1 ~ N(0, 1/E‖x‖²) so that pre-activations have unit scale, b1 = 0.
    ``forward() -> (C, S, A)`` float64.
    """

    def __init__(self, features: torch.Tensor | None, offset: torch.Tensor, *, copies: int, hidden: int = 64, generator: torch.Generator) -> None:
        super().__init__()
        if offset.dim() != 2 or (features is not None and (features.dim() != 2 or features.shape[0] != offset.shape[0])):
            raise ValueError(f"features (S, D) and offset (S, A) must share S, got {tuple(getattr(features, 'shape', ()))} and {tuple(offset.shape)}")
        for name, value in (("copies", copies), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        states, actions = offset.shape
        if features is None:
            dim, scale = states, 1.0
        else:
            features = features.to(torch.float64)
            dim, scale = features.shape[1], 1.0 / math.sqrt(float(features.square().sum(-1).mean()))
        self.features = features
        self.register_buffer("offset", offset.to(torch.float64))
        self.w1 = nn.Parameter(scale * torch.randn(copies, dim, hidden, generator=generator, dtype=torch.float64))
        self.b1 = nn.Parameter(torch.zeros(copies, 1, hidden, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.zeros(copies, hidden, actions, dtype=torch.float64))
        self.b2 = nn.Parameter(torch.zeros(copies, 1, actions, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        inputs = self.w1 if self.features is None else torch.einsum("sd,cdu->csu", self.features, self.w1)  # (C, S, U)
        hidden = torch.tanh(inputs + self.b1)
        return self.offset + hidden @ self.w2 + self.b2  # (C, S, A)


def train_episodes(
    model: nn.Module,
    ref_logits: torch.Tensor,
    method: str,
    episodes: Episodes,
    *,
    beta: float,
    gamma: float,
    steps: int,
    lr: float = 0.05,
    target_every: int = 25,
    cosine: bool = False,
    evaluate: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    eval_every: int = 50,
) -> History:
    """Train ``model`` (in place; ``model() -> (C, S, A)``) for ``steps`` full-batch Adam updates of
    :func:`~shiq_toy.episodes.episode_loss` on ``episodes`` ((C, N, T) fields).

    ``soft_q`` regresses onto a target table ū = a detached copy of the model's output, refreshed every
    ``target_every`` updates. ``evaluate`` is called with the policy's logits (C, S, A) (detached; see
    :func:`~shiq_toy.episodes.policy_logits`) before training, every ``eval_every`` steps and after the
    last one, and returns named (C,) metrics; the metric ``loss`` (the training loss of the model at that
    point, against the current target for ``soft_q``) is added to them. Returns a
    :class:`shiq_toy.train.History` ((K, C) metrics).
    """
    if method not in EPISODE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {EPISODE_METHODS}")
    for name, value in (("steps", steps), ("target_every", target_every), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'steps' else 1}, got {value!r}")
    check_number("lr", lr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)) if cosine else None
    history, losses = History(), []
    target = model().detach() if method == "soft_q" else None

    def record(step: int) -> None:
        if evaluate is None:
            return
        history.steps.append(step)
        with torch.no_grad():
            output = model().detach()  # a table model returns its parameter itself
            metrics = {**evaluate(policy_logits(method, output, ref_logits)),
                       "loss": episode_loss(method, output, ref_logits, episodes, beta=beta, gamma=gamma, target=target)}
        for name, value in metrics.items():
            history.metrics.setdefault(name, []).append(torch.as_tensor(value, dtype=torch.float64))

    record(0)
    for step in range(1, steps + 1):
        loss = episode_loss(method, model(), ref_logits, episodes, beta=beta, gamma=gamma, target=target)  # (C,)
        opt.zero_grad()
        loss.sum().backward()  # copies are independent: Σ_c keeps each copy's own gradient
        opt.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.detach())
        if target is not None and step % target_every == 0:
            target = model().detach()
        if step % eval_every == 0 or step == steps:
            record(step)
    history.metrics = {name: torch.stack(values) for name, values in history.metrics.items()}
    history.loss = torch.stack(losses) if losses else torch.zeros(0)
    return history
