"""Offline datasets of the toy problems: sequences sampled from a behaviour policy, or every path once.

A :class:`Dataset` holds, for ``N`` sequences of a tree of depth ``H`` (a bandit is the tree with ``H = 1``):
``tokens (N, H)``, ``rewards (N, H)`` (the reward observed at each step), ``mask (N, H)`` (all True: every
token of a tree path is an action), ``prompt_ids (N,)`` (all 0: one root) and ``weights (N,)`` (sum 1: the
weight of each sequence in a loss average). Datasets of independent runs stack into ``(C, N, H)``
(:func:`stack_datasets`). Randomness comes only from the ``generator`` argument.

Notation used for tensor shapes: ``C`` copies, ``N`` sequences, ``H`` depth, ``V`` vocabulary, ``K`` arms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from shiq_toy.checks import check_number
from shiq_toy.mdp import Bandit, TokenTree, all_sequences, prefix_index

__all__ = [
    "Dataset",
    "as_tree",
    "path_probability",
    "sample_dataset",
    "exhaustive_dataset",
    "stack_datasets",
    "on_policy_sampler",
]


class Dataset(NamedTuple):
    """Reward-labelled sequences; leading dimensions ``(...)`` = () for one run, (C,) for C stacked runs.

    tokens: (..., N, H) int64; rewards: (..., N, H) float64 reward of each step; mask: (..., N, H) bool;
    prompt_ids: (..., N) int64; weights: (..., N) float64, summing to 1 over N.
    """

    tokens: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    prompt_ids: torch.Tensor
    weights: torch.Tensor


def as_tree(env: Bandit | TokenTree) -> TokenTree:
    """A bandit as the one-level tree ``ref_logits=[ℓ_ref (1, K)]``, ``rewards=[r (1, K)]``; a tree as is."""
    if isinstance(env, TokenTree):
        return env
    if isinstance(env, Bandit):
        return TokenTree(ref_logits=[env.ref_logits[None]], rewards=[env.rewards[None]])
    raise ValueError(f"env must be a Bandit or a TokenTree, got {type(env).__name__}")


def _policy_levels(env: Bandit | TokenTree, tree: TokenTree, policy) -> list[torch.Tensor]:
    """Validated per-depth probability tables (V**h, V); default π_ref = softmax(ℓ_ref)."""
    if policy is None:
        return [torch.softmax(x, dim=-1) for x in tree.ref_logits]
    if isinstance(env, Bandit) and isinstance(policy, torch.Tensor):
        policy = [policy.reshape(1, -1)]  # a bandit policy may be given as (K,)
    if isinstance(policy, torch.Tensor) or len(policy) != tree.horizon:
        raise ValueError(f"policy must be a list of {tree.horizon} per-depth probability tables (V**h, V)")
    levels = []
    for h, p in enumerate(policy):
        shape = (tree.vocab_size**h, tree.vocab_size)
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != shape or not p.is_floating_point():
            raise ValueError(f"policy[{h}] (depth {h}) must be a float tensor of shape {shape}, got {getattr(p, 'shape', type(p).__name__)}")
        p = p.to(torch.float64)
        if not bool((p >= 0).all()) or not torch.allclose(p.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-9):
            raise ValueError(f"policy[{h}] (depth {h}) must hold probabilities: non-negative rows summing to 1")
        levels.append(p)
    return levels


def _step_rewards(tree: TokenTree, tokens: torch.Tensor) -> torch.Tensor:
    """Mean reward of each step r(s_t, a_t); tokens (N, H) -> (N, H) float64."""
    nodes = prefix_index(tokens, tree.vocab_size)  # (N, H)
    return torch.stack([tree.rewards[t][nodes[:, t], tokens[:, t]] for t in range(tree.horizon)], dim=1)


def path_probability(policy: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """π(y) = Π_t π(a_t | s_t) of full paths; policy: per-depth tables (V**h, V); tokens (N, H) -> (N,)."""
    nodes = prefix_index(tokens, policy[0].shape[-1])
    steps = [policy[t][nodes[:, t], tokens[:, t]] for t in range(tokens.shape[1])]
    return torch.stack(steps, dim=1).prod(dim=1)


def _check_noise(env: Bandit | TokenTree, reward_noise: float) -> None:
    check_number("reward_noise", reward_noise, allow_zero=True)
    if isinstance(env, Bandit) and reward_noise:
        raise ValueError("a Bandit's reward noise is its noise_std; leave reward_noise at 0")


def _dataset(tokens: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor) -> Dataset:
    """Tree paths from the one root: tokens, rewards (..., N, H), weights (..., N); every token an action."""
    return Dataset(
        tokens=tokens,
        rewards=rewards,
        mask=torch.ones(tokens.shape, dtype=torch.bool),
        prompt_ids=torch.zeros(tokens.shape[:-1], dtype=torch.int64),
        weights=weights,
    )


def _sample_tokens(levels: Sequence[torch.Tensor], uniforms: torch.Tensor) -> torch.Tensor:
    """Ancestral sampling by inverse CDF: levels[h] (..., V**h, V) probabilities, uniforms (..., N, H) in
    [0, 1) -> tokens (..., N, H). Token a is taken where cdf(a − 1) <= u < cdf(a) (zero-probability tokens
    never), with the cdf normalised so that its last entry is exactly 1."""
    vocab = levels[0].shape[-1]
    tokens = torch.zeros(uniforms.shape, dtype=torch.int64)
    node = torch.zeros(uniforms.shape[:-1], dtype=torch.int64)  # (..., N)
    for h, probs in enumerate(levels):  # a loop over depth, vectorised over sequences and copies
        rows = probs.gather(-2, node[..., None].expand(*node.shape, vocab))  # (..., N, V)
        cdf = rows.cumsum(-1)
        cdf = cdf / cdf[..., -1:]
        tokens[..., h] = (uniforms[..., h, None] >= cdf).sum(-1).clamp(max=vocab - 1)
        node = node * vocab + tokens[..., h]
    return tokens


def _draw(
    env: Bandit | TokenTree, tree: TokenTree, levels: Sequence[torch.Tensor], generators: Sequence[torch.Generator], num: int, reward_noise: float
) -> Dataset:
    """``num`` sequences per copy from probabilities levels[h] (C, V**h, V), copy c drawn with ``generators[c]``
    alone: first uniforms (num, H) for the tokens, then the reward noise (a Bandit's ``sample_rewards``, or
    ``reward_noise · ε`` on a tree's last step). Returns (C, num, H) fields, weights 1/num."""
    uniforms = torch.stack([torch.rand(num, tree.horizon, generator=g, dtype=torch.float64) for g in generators])  # (C, N, H)
    tokens = _sample_tokens(levels, uniforms)  # (C, N, H)
    if isinstance(env, Bandit):
        rewards = torch.stack([env.sample_rewards(tokens[c, :, 0], generator=g) for c, g in enumerate(generators)])[..., None]
    else:
        rewards = _step_rewards(tree, tokens.flatten(0, 1)).view(tokens.shape)  # (C, N, H)
        if reward_noise:
            noise = torch.stack([torch.randn(num, generator=g, dtype=torch.float64) for g in generators])  # (C, N)
            rewards[..., -1] += reward_noise * noise
    return _dataset(tokens, rewards, torch.full(tokens.shape[:-1], 1.0 / num, dtype=torch.float64))


def sample_dataset(
    env: Bandit | TokenTree,
    num: int,
    *,
    generator: torch.Generator,
    policy: Sequence[torch.Tensor] | torch.Tensor | None = None,
    reward_noise: float = 0.0,
) -> Dataset:
    """``num`` sequences sampled from a behaviour policy (π_ref by default), each with weight 1/num.

    policy: per-depth probability tables (V**h, V) (a bandit also takes (K,)). Rewards are the mean
    rewards of the steps plus noise: a Bandit's ``noise_std`` through ``Bandit.sample_rewards``; for a tree,
    ``reward_noise · ε`` (ε ~ N(0, 1), one draw per sequence) added to the reward of the last step, i.e.
    a noisy sequence-level reward. Draws, in order: uniforms (num, H) for the tokens, then the noise.
    Returns a :class:`Dataset` with (num, H) fields.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    _check_noise(env, reward_noise)
    tree = as_tree(env)
    levels = [x[None] for x in _policy_levels(env, tree, policy)]  # one copy: (1, V**h, V)
    return Dataset(*(x[0] for x in _draw(env, tree, levels, [generator], num, reward_noise)))


def exhaustive_dataset(env: Bandit | TokenTree, *, policy: Sequence[torch.Tensor] | torch.Tensor | None = None) -> Dataset:
    """Every path once, with its mean rewards (no noise): (V**H, H) fields in leaf order.

    Weights are uniform (1 / V**H) when ``policy`` is None, else the path probabilities π(y) under
    ``policy`` (per-depth tables, as :func:`sample_dataset`): the infinite-data limit of sampling from it.
    """
    tree = as_tree(env)
    tokens = all_sequences(tree.vocab_size, tree.horizon)
    if policy is None:
        weights = torch.full((tokens.shape[0],), 1.0 / tokens.shape[0], dtype=torch.float64)
    else:
        weights = path_probability(_policy_levels(env, tree, policy), tokens)
        weights = weights / weights.sum()
    return _dataset(tokens, _step_rewards(tree, tokens), weights)


def stack_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """C datasets of the same shape -> one :class:`Dataset` with a leading copies dimension (C, N, H)."""
    if len(datasets) == 0:
        raise ValueError("stack_datasets needs at least one dataset")
    shapes = {tuple(d.tokens.shape) for d in datasets}
    if len(shapes) != 1:
        raise ValueError(f"datasets must all have the same shape to be stacked, got {sorted(shapes)}")
    return Dataset(*(torch.stack(field) for field in zip(*datasets)))


def on_policy_sampler(
    env: Bandit | TokenTree,
    num: int,
    *,
    generators: torch.Generator | Sequence[torch.Generator],
    reward_noise: float = 0.0,
) -> Callable[[list[torch.Tensor]], Dataset]:
    """Online data: a function mapping the current logits tables to ``num`` fresh sequences from softmax(ℓ).

    With one generator the tables are per-depth (V**h, V) and the batch (num, H); with a list of C
    generators the tables are (C, V**h, V) and copy c's batch is drawn with ``generators[c]`` alone, so a
    stacked run of C copies sees exactly the samples of C separate runs. Sampling as :func:`sample_dataset`.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    _check_noise(env, reward_noise)
    tree = as_tree(env)
    single = isinstance(generators, torch.Generator)
    gens = [generators] if single else list(generators)

    def sample(tables: list[torch.Tensor]) -> Dataset:
        if single:
            tables = [x[None] for x in tables]
        if tables[0].dim() != 3 or tables[0].shape[0] != len(gens):
            raise ValueError(f"expected tables stacking {len(gens)} copies (one per generator), got {tuple(tables[0].shape)}")
        batch = _draw(env, tree, [torch.softmax(x, dim=-1) for x in tables], gens, num, reward_noise)  # (C, N, H)
        return Dataset(*(x[0] for x in batch)) if single else batch

    return sample
