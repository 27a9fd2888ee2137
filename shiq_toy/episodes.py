"""Episodes of a finite MDP as sequences for the ShiQ losses: sampling, per-step statistics, bootstrapping.

A language model's sequence is an episode whose states are prefixes and whose actions are tokens; here the
states are the states of a :class:`~shiq_toy.mdp.FiniteMDP` and the actions its actions. A "model" is an
``(S, A)`` table of outputs (a logits table, or the output of a network at every state), and the per-step
statistics ``TokenStats(logit_taken, logsumexp)`` are read from it along each episode, so the one loss
definition of :mod:`shiq_toy.losses` (through :func:`shiq_toy.train.method_loss`) runs unchanged with
``γ < 1``.

Truncation. An episode cut after ``max_steps`` steps has not ended: its value after the last step is the
value of ``s_T`` (the state reached), not 0. :func:`bootstrap_rewards` folds ``γ V(s_T)`` into the reward of
the last step, with ``V`` the value the model itself implies (:func:`implied_value`; spec §3 fact 6), so the
residuals' "terminal value 0" convention stays exact and the gradient flows through ``V`` as through every
other term. An episode that entered a terminal state gets nothing added.

Methods (:data:`EPISODE_METHODS`): the ShiQ-family residuals ``shiq``, ``shiq_ms``, ``shiq_init``,
``shifted_q``, on the logits ``ℓ`` (policy ``softmax(ℓ)``), and the classical baseline ``soft_q``: soft
Q-learning with a target table — the one-step regression ``q(s_t, a_t) ≈ r_t + γ β ln Σ_a π_ref(a|s_{t+1})
exp(q̄(s_{t+1}, a)/β)`` onto a frozen copy ``q̄`` that is refreshed periodically, acting with
``π = softmax(ℓ_ref + q/β)``. It is the ``logit_q`` residual of :mod:`shiq_toy.losses` with the soft value
read from the target (no gradient); it is not a ShiQ variant. Its model outputs ``u = q/β`` (logit units),
so that every method's policy logits are the output plus a constant table and an optimiser step moves
them by the same amount whatever β (with raw q-values Adam's steps of size lr would move the logits by
lr/β).

Notation used for tensor shapes: ``C`` copies (independent runs), ``N`` episodes, ``T`` steps, ``S`` states,
``A`` actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from shiq_toy.checks import check_beta, check_gamma
from shiq_toy.data import Dataset
from shiq_toy.losses import TokenStats, logit_q_soft_value
from shiq_toy.mdp import FiniteMDP
from shiq_toy.train import method_loss

__all__ = [
    "Episodes",
    "EPISODE_METHODS",
    "SHAPED",
    "sample_episodes",
    "table_stats",
    "implied_value",
    "bootstrap_rewards",
    "policy_logits",
    "episode_loss",
]

#: Methods :func:`episode_loss` trains: ShiQ-family residuals on logits, and classical soft Q-learning.
EPISODE_METHODS = ("shiq", "shiq_ms", "shiq_init", "shifted_q", "soft_q")
#: Residuals whose fixed point is ℓ* = ℓ_ref + q*/β (implied value β(vℓ − vref)); the others (shiq_init,
#: shifted_q) reach ℓ = ln π_ref + q*/β (implied value β vℓ).
SHAPED = frozenset({"shiq", "shiq_ms"})


class Episodes(NamedTuple):
    """Episodes of a finite MDP; leading dimensions ``(...)`` = () for one run, (C,) for C stacked runs.

    states:     (..., N, T) int64  s_t (0 after the episode's last step)
    actions:    (..., N, T) int64  a_t (0 after the last step)
    rewards:    (..., N, T) float64 r(s_t, a_t) (0 after the last step)
    mask:       (..., N, T) bool   step t was taken (a prefix of each row; every row has >= 1 step)
    last_state: (..., N) int64     the state reached after the last step
    ended:      (..., N) bool      that state is terminal (else the episode was truncated)
    weights:    (..., N) float64   weight of each episode in a loss average, summing to 1
    """

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    last_state: torch.Tensor
    ended: torch.Tensor
    weights: torch.Tensor


def _check_policy(mdp: FiniteMDP, policy: torch.Tensor, copies: int) -> torch.Tensor:
    """Validated probabilities, (S, A) or (C, S, A) -> (C, S, A) float64."""
    shapes = [(mdp.num_states, mdp.num_actions), (copies, mdp.num_states, mdp.num_actions)]
    if not isinstance(policy, torch.Tensor) or tuple(policy.shape) not in shapes or not policy.is_floating_point():
        raise ValueError(f"policy must be a float tensor of shape {shapes[0]} or {shapes[1]}, got {tuple(getattr(policy, 'shape', ()))}")
    policy = policy.expand(shapes[1])
    policy = policy.to(torch.float64)
    if bool((policy < 0).any()) or not torch.allclose(policy.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-9):
        raise ValueError("policy must hold probabilities: non-negative rows summing to 1")
    return policy


def _pick(cdf_rows: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-cdf draw: rows (..., K) of a cdf normalised to end at 1, uniforms (...) -> (...) in [0, K)."""
    cdf = cdf_rows / cdf_rows[..., -1:]
    return (uniforms[..., None] >= cdf).sum(-1).clamp(max=cdf_rows.shape[-1] - 1)


def sample_episodes(
    mdp: FiniteMDP,
    policy: torch.Tensor,
    num: int,
    *,
    max_steps: int,
    generators: torch.Generator | Sequence[torch.Generator],
) -> Episodes:
    """``num`` episodes of a behaviour ``policy`` from ``s_0 ~ mdp.initial``, each cut after ``max_steps`` steps.

    policy: (S, A) probabilities, or (C, S, A) with a list of C generators (copy c is drawn with
    ``generators[c]`` alone, so a stacked run sees the episodes of C separate runs). Draws, per
    copy: uniforms (num, 1 + max_steps), the first column for s_0, the others for the actions. The step
    dimension T is trimmed to the longest episode. Returns :class:`Episodes` of (num, T) or (C, num, T).
    """
    if mdp.initial is None:
        raise ValueError("mdp has no initial state distribution (FiniteMDP.initial is None)")
    for name, value in (("num", num), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    single = isinstance(generators, torch.Generator)
    gens = [generators] if single else list(generators)
    policy = _check_policy(mdp, policy, len(gens))  # (C, S, A)
    copies = len(gens)
    uniforms = torch.stack([torch.rand(num, 1 + max_steps, generator=g, dtype=torch.float64) for g in gens])  # (C, N, 1 + T)
    cdf = policy.cumsum(-1)  # (C, S, A)
    state = _pick(mdp.initial.cumsum(-1).expand(copies, num, -1), uniforms[..., 0])  # (C, N)
    copy = torch.arange(copies)[:, None]
    alive = torch.ones(copies, num, dtype=torch.bool)
    states, actions, mask = [], [], []
    for t in range(max_steps):  # a loop over steps, vectorised over episodes and copies
        action = _pick(cdf[copy, state], uniforms[..., 1 + t])  # (C, N)
        states.append(torch.where(alive, state, 0))
        actions.append(torch.where(alive, action, 0))
        mask.append(alive.clone())
        state = torch.where(alive, mdp.next_state[state, action], state)
        alive = alive & ~mdp.terminal[state]
        if not bool(alive.any()):
            break
    states, actions, mask = torch.stack(states, -1), torch.stack(actions, -1), torch.stack(mask, -1)  # (C, N, T)
    rewards = torch.where(mask, mdp.rewards[states, actions], 0.0)
    episodes = Episodes(
        states=states, actions=actions, rewards=rewards, mask=mask, last_state=state, ended=mdp.terminal[state],
        weights=torch.full((copies, num), 1.0 / num, dtype=torch.float64),
    )
    return Episodes(*(x[0] for x in episodes)) if single else episodes


def table_stats(table: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> TokenStats:
    """Per-step statistics of a model whose outputs at every state are ``table``:
    ``logit_taken = table[s_t, a_t]``, ``logsumexp = ln Σ_a exp table[s_t, a]``.

    table: (C, S, A) or (S, A) (shared by every copy); states, actions: (C, N, T) -> TokenStats of (C, N, T).
    The log-sum-exp is computed once per state and gathered.
    """
    copies = states.shape[0]
    table = table.expand(copies, *table.shape[-2:])  # (C, S, A)
    num_actions = table.shape[-1]
    flat = (states * num_actions + actions).flatten(1)  # (C, N·T)
    taken = table.flatten(1).gather(1, flat).view(states.shape)
    lse = torch.logsumexp(table, dim=-1).gather(1, states.flatten(1)).view(states.shape)
    return TokenStats(logit_taken=taken, logsumexp=lse)


def implied_value(logits: torch.Tensor, ref_logits: torch.Tensor, *, beta: float, shaped: bool = True) -> torch.Tensor:
    """The state value a logits table implies: β(vℓ(s) − vref(s)) for the shaped residuals (ShiQ's fixed point
    ℓ* = ℓ_ref + q*/β gives v*), β vℓ(s) for the unshaped ones. logits (..., S, A), ref_logits (S, A) -> (..., S)."""
    check_beta(beta)
    value = beta * torch.logsumexp(logits, dim=-1)
    return value - beta * torch.logsumexp(ref_logits, dim=-1) if shaped else value


def bootstrap_rewards(episodes: Episodes, values: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Rewards with ``γ V(s_T)`` added to the last step of each truncated episode (0 after an ended one).

    episodes: (C, N, T) fields; values: (C, S) (or (S,)) the value V at every state. Returns (C, N, T).
    Then ``disc_t(r)`` of the residuals equals Σ_{k=t}^{T−1} γ^(k−t) r_k + γ^(T−t) V(s_T).
    """
    check_gamma(gamma)
    copies = episodes.states.shape[0]
    values = values.expand(copies, values.shape[-1])
    after = values.gather(1, episodes.last_state) * (~episodes.ended)  # (C, N)
    last = episodes.mask.sum(-1, keepdim=True) - 1  # (C, N, 1): index of the last step (mask is a prefix)
    extra = torch.zeros_like(episodes.rewards).scatter(-1, last, (gamma * after)[..., None])
    return episodes.rewards + extra


def policy_logits(method: str, output: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """The logits of the policy a method's model acts with: the output itself (ShiQ family), or
    ``ℓ_ref + u`` for ``soft_q`` whose output is u = q/β (π ∝ π_ref exp(q/β)). output (..., S, A), ref_logits (S, A)."""
    if method not in EPISODE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {EPISODE_METHODS}")
    return ref_logits + output if method == "soft_q" else output


def episode_loss(
    method: str,
    output: torch.Tensor,
    ref_logits: torch.Tensor,
    episodes: Episodes,
    *,
    beta: float,
    gamma: float,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of each copy on its episodes: Σ_n w_n Σ_t residual_t² with truncated episodes bootstrapped. (C,).

    output: (C, S, A) the model at every state — logits ℓ for the ShiQ family, u = q/β for ``soft_q``;
    ref_logits: (S, A); episodes: (C, N, T) fields; target: (C, S, A) ū = q̄/β, the frozen target table
    (``soft_q`` only). The ShiQ-family loss is :func:`shiq_toy.train.method_loss` on the per-step statistics,
    with the rewards of :func:`bootstrap_rewards` (the value of ``s_T`` from :func:`implied_value` of ``output``).
    ``soft_q`` is ``method_loss("logit_q", …)`` on q = βu with the soft value
    w̄(s) = β ln Σ_a π_ref(a|s) exp(q̄(s, a)/β) of the target at every next state and after truncation.
    """
    if method not in EPISODE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {EPISODE_METHODS}")
    if output.dim() != 3 or output.shape[0] != episodes.states.shape[0]:
        raise ValueError(f"output must be a (C, S, A) table with C = {episodes.states.shape[0]} copies, got {tuple(output.shape)}")
    if (method == "soft_q") != (target is not None):
        raise ValueError("soft_q needs target (the frozen (C, S, A) table q̄); the ShiQ family takes none")
    if method == "soft_q":
        output = beta * output  # q = βu
    ref = table_stats(ref_logits, episodes.states, episodes.actions)
    stats = table_stats(output, episodes.states, episodes.actions)
    if method == "soft_q":
        with torch.no_grad():
            soft = logit_q_soft_value(beta * target, ref_logits.expand_as(target), beta=beta)  # (C, S)
        rewards = bootstrap_rewards(episodes, soft, gamma=gamma)
        extra = {"soft_value": soft.gather(1, episodes.states.flatten(1)).view(episodes.states.shape)}
        residual_name = "logit_q"
    else:
        values = implied_value(output, ref_logits, beta=beta, shaped=method in SHAPED)  # (C, S), with gradient
        rewards = bootstrap_rewards(episodes, values, gamma=gamma)
        extra, residual_name = {}, method
    batch = Dataset(
        tokens=episodes.actions, rewards=rewards, mask=episodes.mask,
        prompt_ids=torch.zeros_like(episodes.last_state), weights=episodes.weights,
    )
    return method_loss(residual_name, stats, ref, batch, beta=beta, gamma=gamma, **extra)
