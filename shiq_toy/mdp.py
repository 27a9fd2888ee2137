"""The toy problems of ``shiq_toy``: a bandit, a token tree and finite deterministic MDPs (spec §1).

Notation used for tensor shapes: ``K`` arms, ``V`` vocabulary (actions of a tree node), ``H`` tree depth
(number of tokens of a response), ``B`` sequences, ``T`` positions, ``S`` states, ``A`` actions.

Token tree. A state of depth ``h`` is a prefix ``(a_0 … a_{h-1})`` of tokens; its node index within
level ``h`` is ``Σ_i a_i V^(h-1-i)`` (base-V digits, most significant first), so the children of node ``n``
are ``n·V + a``. Every per-state quantity is a list over depth of ``(V**h, V)`` tables ("level arrays");
after the ``H``-th token the episode ends and every value is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shiq_toy.checks import check_number

__all__ = [
    "Bandit",
    "TokenTree",
    "FiniteMDP",
    "prefix_index",
    "all_sequences",
    "gather_levels",
    "random_bandit",
    "random_tree",
    "finite_mdp_from_gym",
    "finite_mdp_from_tree",
    "reachable_states",
    "gridworld",
    "GRID_ACTIONS",
]


def _check_table(x: Any, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A finite float tensor of the given shape, returned as float64 (no copy if it already is)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite entries")
    return x.to(torch.float64)


# --------------------------------------------------------------------------------------------------
# Bandit
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandit:
    """One state, K arms: reference logits ``ℓ_ref`` (K,), mean rewards ``r`` (K,), Gaussian reward noise.

    An observed reward of arm ``a`` is ``r(a) + noise_std · ε``, ``ε ~ N(0, 1)``.
    """

    ref_logits: torch.Tensor
    rewards: torch.Tensor
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.ref_logits, torch.Tensor) or self.ref_logits.dim() != 1 or self.ref_logits.numel() < 1:
            shape = tuple(self.ref_logits.shape) if isinstance(self.ref_logits, torch.Tensor) else type(self.ref_logits).__name__
            raise ValueError(f"ref_logits must be a (K,) tensor with K >= 1, got {shape}")
        (num_arms,) = self.ref_logits.shape
        object.__setattr__(self, "ref_logits", _check_table(self.ref_logits, (num_arms,), "ref_logits"))
        object.__setattr__(self, "rewards", _check_table(self.rewards, (num_arms,), "rewards"))
        check_number("noise_std", self.noise_std, allow_zero=True)

    @property
    def num_arms(self) -> int:
        return self.ref_logits.shape[0]

    def sample_rewards(self, arms: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """Observed rewards of pulls ``arms`` (N,) int64 -> (N,) float64: ``r(arms) + noise_std · ε``."""
        if not isinstance(arms, torch.Tensor) or arms.dim() != 1 or arms.is_floating_point():
            raise ValueError(f"arms must be a (N,) integer tensor, got {arms!r}")
        if arms.numel() and (int(arms.min()) < 0 or int(arms.max()) >= self.num_arms):
            raise ValueError(f"arms must lie in [0, K) = [0, {self.num_arms}), got range [{int(arms.min())}, {int(arms.max())}]")
        mean = self.rewards[arms.long()]
        if self.noise_std == 0:
            return mean
        noise = torch.randn(arms.shape, generator=generator, dtype=torch.float64)
        return mean + self.noise_std * noise


def random_bandit(
    num_arms: int, *, generator: torch.Generator, noise_std: float = 0.0, ref_scale: float = 1.0, reward_scale: float = 1.0
) -> Bandit:
    """A bandit with ``ℓ_ref ~ ref_scale · N(0, 1)`` and ``r ~ reward_scale · N(0, 1)`` per arm."""
    if num_arms < 1:
        raise ValueError(f"num_arms must be >= 1, got {num_arms}")
    ref_logits = ref_scale * torch.randn(num_arms, generator=generator, dtype=torch.float64)
    rewards = reward_scale * torch.randn(num_arms, generator=generator, dtype=torch.float64)
    return Bandit(ref_logits=ref_logits, rewards=rewards, noise_std=noise_std)


# --------------------------------------------------------------------------------------------------
# Token tree
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenTree:
    """A complete V-ary tree of depth H: the regularised MDP of a language model on a tiny vocabulary.

    ref_logits[h]: (V**h, V) ``ℓ_ref(s, a)`` of each node ``s`` of depth ``h`` (h = 0..H-1).
    rewards[h]:    (V**h, V) ``r(s, a)``; a sequence-level reward lives on level ``H-1`` only.
    The action ``a`` at node ``n`` of depth ``h`` leads to node ``n·V + a`` of depth ``h+1``; depth ``H`` is
    terminal. Tables are validated (shape, float, finite) and stored as float64.
    """

    ref_logits: list[torch.Tensor]
    rewards: list[torch.Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.ref_logits, (list, tuple)) or not isinstance(self.rewards, (list, tuple)):
            raise ValueError("ref_logits and rewards must be lists of tensors, one per depth")
        if len(self.ref_logits) == 0:
            raise ValueError("a TokenTree needs at least one level (H >= 1)")
        if len(self.rewards) != len(self.ref_logits):
            raise ValueError(f"ref_logits has {len(self.ref_logits)} levels but rewards has {len(self.rewards)}")
        root = self.ref_logits[0]
        if not isinstance(root, torch.Tensor) or root.dim() != 2 or root.shape[0] != 1 or root.shape[1] < 1:
            shape = tuple(root.shape) if isinstance(root, torch.Tensor) else type(root).__name__
            raise ValueError(f"ref_logits[0] must have shape (1, V) with V >= 1, got {shape}")
        vocab = root.shape[1]
        for field in ("ref_logits", "rewards"):
            levels = getattr(self, field)
            checked = [_check_table(x, (vocab**h, vocab), f"{field}[{h}] (depth {h})") for h, x in enumerate(levels)]
            setattr(self, field, checked)

    @property
    def vocab_size(self) -> int:
        """V, the number of actions (tokens) at every node."""
        return self.ref_logits[0].shape[1]

    @property
    def horizon(self) -> int:
        """H, the number of tokens of every sequence."""
        return len(self.ref_logits)

    @property
    def num_states(self) -> int:
        """Number of non-terminal states Σ_{h<H} V**h."""
        return sum(self.vocab_size**h for h in range(self.horizon))


def random_tree(
    vocab_size: int,
    horizon: int,
    *,
    generator: torch.Generator,
    reward: str = "terminal",
    ref_scale: float = 1.0,
    reward_scale: float = 1.0,
) -> TokenTree:
    """A random tree: ``ℓ_ref ~ ref_scale · N(0, 1)``, ``r ~ reward_scale · N(0, 1)``.

    reward="terminal": rewards only on the last token (a sequence-level reward ``R(y) = r(s_{H-1}, y_H)``),
    0 elsewhere; reward="dense": a reward on every token.
    """
    if vocab_size < 1 or horizon < 1:
        raise ValueError(f"vocab_size and horizon must be >= 1, got {vocab_size} and {horizon}")
    if reward not in ("terminal", "dense"):
        raise ValueError(f"reward must be 'terminal' or 'dense', got {reward!r}")
    ref_logits, rewards = [], []
    for h in range(horizon):
        shape = (vocab_size**h, vocab_size)
        ref_logits.append(ref_scale * torch.randn(shape, generator=generator, dtype=torch.float64))
        if reward == "dense" or h == horizon - 1:
            rewards.append(reward_scale * torch.randn(shape, generator=generator, dtype=torch.float64))
        else:
            rewards.append(torch.zeros(shape, dtype=torch.float64))
    return TokenTree(ref_logits=ref_logits, rewards=rewards)


def prefix_index(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Node index of the state of each position: ``node[:, t]`` is the index of the prefix ``tokens[:, :t]``.

    tokens: (B, T) int64 in ``[0, V)`` -> (B, T) int64; ``node[:, 0] = 0`` (root),
    ``node[:, t+1] = node[:, t]·V + tokens[:, t]``.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(f"tokens must be a (B, T) integer tensor, got {tokens!r}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"tokens must lie in [0, V) = [0, {vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    nodes = torch.zeros(tokens.shape, dtype=torch.int64)
    for t in range(1, tokens.shape[1]):  # a loop over positions (T <= H), not over nodes
        nodes[:, t] = nodes[:, t - 1] * vocab_size + tokens[:, t - 1]
    return nodes


def all_sequences(vocab_size: int, horizon: int) -> torch.Tensor:
    """Every token sequence of a tree, (V**H, H) int64; row ``i`` spells ``i`` in base V (leaf order)."""
    index = torch.arange(vocab_size**horizon, dtype=torch.int64)
    powers = vocab_size ** torch.arange(horizon - 1, -1, -1, dtype=torch.int64)  # (H,): V^(H-1-t)
    return (index[:, None] // powers) % vocab_size  # (V**H, H)


def gather_levels(tables: list[torch.Tensor], tokens: torch.Tensor, *, vocab_size: int | None = None) -> torch.Tensor:
    """Rows of per-level tables at the state of each position: ``out[b, t] = tables[t][node[b, t]]``.

    tables: list over depth of (V**h, ...) (usually (V**h, V)); tokens: (B, T) with T <= len(tables)
    -> (B, T, ...). ``vocab_size`` defaults to ``tables[0].shape[-1]`` (tables of shape (V**h, V)).
    E.g. ``gather_levels(solution.logits, tokens)`` are the logits a tabular "model" emits on ``tokens``.
    """
    vocab = tables[0].shape[-1] if vocab_size is None else vocab_size
    if tokens.dim() != 2 or tokens.shape[1] > len(tables):
        raise ValueError(f"tokens must have shape (B, T) with T <= {len(tables)} levels, got {tuple(tokens.shape)}")
    nodes = prefix_index(tokens, vocab)
    return torch.stack([tables[t][nodes[:, t]] for t in range(tokens.shape[1])], dim=1)  # (B, T, ...)


# --------------------------------------------------------------------------------------------------
# Finite deterministic MDPs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FiniteMDP:
    """A deterministic finite MDP with a reference policy.

    next_state: (S, A) int64, ``s' = next_state[s, a]``; rewards: (S, A) float64 ``r(s, a)``;
    terminal: (S,) bool, absorbing states of value 0 (their rows are never used);
    ref_logits: (S, A) float64, ``π_ref(·|s) = softmax(ref_logits[s])``;
    initial: (S,) float64 distribution μ0 of the first state of an episode (on live states), or None when
    the MDP has none (episodes and ``J(π) = Σ_s μ0(s) V^π(s)`` need it).
    """

    next_state: torch.Tensor
    rewards: torch.Tensor
    terminal: torch.Tensor
    ref_logits: torch.Tensor
    initial: torch.Tensor | None = None

    def __post_init__(self) -> None:
        nxt = self.next_state
        if not isinstance(nxt, torch.Tensor) or nxt.dim() != 2 or nxt.is_floating_point() or nxt.dtype == torch.bool:
            raise ValueError(f"next_state must be an (S, A) integer tensor, got {nxt!r}")
        num_states, num_actions = nxt.shape
        if nxt.numel() and (int(nxt.min()) < 0 or int(nxt.max()) >= num_states):
            raise ValueError(f"next_state must lie in [0, S) = [0, {num_states}), got range [{int(nxt.min())}, {int(nxt.max())}]")
        object.__setattr__(self, "next_state", nxt.long())
        object.__setattr__(self, "rewards", _check_table(self.rewards, (num_states, num_actions), "rewards"))
        object.__setattr__(self, "ref_logits", _check_table(self.ref_logits, (num_states, num_actions), "ref_logits"))
        term = self.terminal
        if not isinstance(term, torch.Tensor) or term.dtype != torch.bool or tuple(term.shape) != (num_states,):
            raise ValueError(f"terminal must be a bool tensor of shape ({num_states},), got {term!r}")
        if self.initial is not None:
            initial = _check_table(self.initial, (num_states,), "initial")
            if bool((initial < 0).any()) or abs(float(initial.sum()) - 1.0) > 1e-9:
                raise ValueError(f"initial must be a probability distribution over the {num_states} states (>= 0, sum 1)")
            if bool(initial[term].any()):
                raise ValueError(f"initial puts mass on terminal state(s) {(initial > 0).logical_and(term).nonzero().flatten().tolist()[:10]}")
            object.__setattr__(self, "initial", initial)

    @property
    def num_states(self) -> int:
        return self.next_state.shape[0]

    @property
    def num_actions(self) -> int:
        return self.next_state.shape[1]


def finite_mdp_from_gym(env: Any, *, ref_logits: torch.Tensor | None = None) -> FiniteMDP:
    """A :class:`FiniteMDP` from the transition table ``env.unwrapped.P`` of a gymnasium toy-text env.

    ``P[s][a] = [(prob, s', r, done)]`` must hold one outcome of probability 1 (FrozenLake with
    ``is_slippery=False``, CliffWalking, Taxi); a state is terminal when a transition into it ends the
    episode. ``initial`` is the env's ``initial_state_distrib`` when it has one. Every transition into a
    terminal state must end the episode — checked on the states reachable from ``initial`` (Taxi's
    "passenger already delivered" states are entered without ending only from states no episode reaches).
    ref_logits: (S, A), default zeros (uniform ``π_ref``). Raises ValueError on a stochastic table.
    """
    table = getattr(env.unwrapped, "P", None)
    if not isinstance(table, dict):
        raise ValueError(f"{type(env.unwrapped).__name__} has no transition table P (a toy-text environment is needed)")
    num_states = len(table)
    num_actions = len(table[0])
    next_state = torch.zeros(num_states, num_actions, dtype=torch.int64)
    rewards = torch.zeros(num_states, num_actions, dtype=torch.float64)
    done = torch.zeros(num_states, num_actions, dtype=torch.bool)
    for s in range(num_states):  # building from a Python dict: one pass over the table
        for a in range(num_actions):
            outcomes = table[s][a]
            if len(outcomes) != 1 or outcomes[0][0] != 1.0:
                raise ValueError(
                    f"stochastic transition table: P[{s}][{a}] has {len(outcomes)} outcome(s) with probabilities "
                    f"{[o[0] for o in outcomes]}; only deterministic environments are supported "
                    "(e.g. FrozenLake with is_slippery=False)"
                )
            _, s_next, r, d = outcomes[0]
            next_state[s, a], rewards[s, a], done[s, a] = int(s_next), float(r), bool(d)
    terminal = torch.zeros(num_states, dtype=torch.bool)
    terminal[next_state[done]] = True
    distribution = getattr(env.unwrapped, "initial_state_distrib", None)
    initial = None if distribution is None else torch.as_tensor(distribution, dtype=torch.float64)
    reachable = _reachable(next_state, terminal, initial)
    live = (reachable & ~terminal)[:, None].expand(-1, num_actions)
    if bool((done != terminal[next_state])[live].any()):
        raise ValueError("the table ends episodes on some but not all transitions into a state; unsupported")
    if ref_logits is None:
        ref_logits = torch.zeros(num_states, num_actions, dtype=torch.float64)
    return FiniteMDP(next_state=next_state, rewards=rewards, terminal=terminal, ref_logits=ref_logits, initial=initial)


def _reachable(next_state: torch.Tensor, terminal: torch.Tensor, initial: torch.Tensor | None) -> torch.Tensor:
    """(S,) bool: states an episode can visit from the support of ``initial`` (every state when it is None)."""
    if initial is None:
        return torch.ones(next_state.shape[0], dtype=torch.bool)
    seen = initial > 0
    while True:  # breadth-first, one sweep per distance: at most S sweeps of an (S, A) gather
        frontier = torch.zeros_like(seen)
        frontier[next_state[seen & ~terminal].flatten()] = True
        grown = seen | frontier
        if bool((grown == seen).all()):
            return seen
        seen = grown


def reachable_states(mdp: FiniteMDP) -> torch.Tensor:
    """(S,) bool: the states an episode can visit, from the support of ``mdp.initial`` (all states if None)."""
    return _reachable(mdp.next_state, mdp.terminal, mdp.initial)


def finite_mdp_from_tree(tree: TokenTree) -> FiniteMDP:
    """The tree as a :class:`FiniteMDP`: states numbered level by level (root 0), plus one terminal state.

    Node ``n`` of depth ``h`` is state ``offset_h + n`` with ``offset_h = Σ_{h'<h} V**h'``; the last
    token of every sequence leads to the terminal state ``S - 1 = num_states``.
    """
    vocab, num_live = tree.vocab_size, tree.num_states
    next_state, offset = [], 0
    for h in range(tree.horizon):
        width = vocab**h
        if h == tree.horizon - 1:
            next_state.append(torch.full((width, vocab), num_live, dtype=torch.int64))
        else:
            children = torch.arange(width * vocab, dtype=torch.int64).view(width, vocab)  # n·V + a
            next_state.append(offset + width + children)
        offset += width
    zeros = torch.zeros(1, vocab, dtype=torch.float64)
    terminal = torch.zeros(num_live + 1, dtype=torch.bool)
    terminal[-1] = True
    return FiniteMDP(
        next_state=torch.cat(next_state + [torch.full((1, vocab), num_live, dtype=torch.int64)]),
        rewards=torch.cat(list(tree.rewards) + [zeros]),
        terminal=terminal,
        ref_logits=torch.cat(list(tree.ref_logits) + [zeros]),
        initial=torch.nn.functional.one_hot(torch.tensor(0), num_live + 1).to(torch.float64),  # the root
    )


#: Actions of :func:`gridworld`, in FrozenLake's order: (row step, column step).
GRID_ACTIONS = ((0, -1), (1, 0), (0, 1), (-1, 0))  # left, down, right, up


def gridworld(
    size: int = 12,
    *,
    generator: torch.Generator,
    wall_fraction: float = 0.15,
    trap_fraction: float = 0.08,
    goal_reward: float = 1.0,
    trap_reward: float = -1.0,
    step_reward: float = 0.0,
    max_tries: int = 100,
) -> FiniteMDP:
    """A random ``size × size`` maze as a :class:`FiniteMDP`: state ``row·size + col``, 4 actions
    (:data:`GRID_ACTIONS`: left, down, right, up), uniform ``π_ref``.

    The episode starts in the top-left corner (``initial`` = state 0) and ends on entering the goal
    (bottom-right, reward ``goal_reward``) or a trap (reward ``trap_reward``); any other step pays
    ``step_reward``. Moving off the grid or into a wall leaves the agent where it is. Each other cell is a
    wall with probability ``wall_fraction`` and else a trap with probability ``trap_fraction``; the layout is
    redrawn (with ``generator``) until the goal is reachable from the start through free cells, at most
    ``max_tries`` times (then ValueError). Wall cells are states no episode visits (each action stays).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    for name, value in (("wall_fraction", wall_fraction), ("trap_fraction", trap_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    cells = size * size
    start, goal = 0, cells - 1
    rows, cols = torch.arange(cells) // size, torch.arange(cells) % size
    moves = torch.tensor(GRID_ACTIONS)  # (A, 2)
    target_row, target_col = rows[:, None] + moves[:, 0], cols[:, None] + moves[:, 1]  # (S, A)
    inside = (target_row >= 0) & (target_row < size) & (target_col >= 0) & (target_col < size)
    target = torch.where(inside, target_row.clamp(0, size - 1) * size + target_col.clamp(0, size - 1), torch.arange(cells)[:, None])
    for _ in range(max_tries):
        draw = torch.rand(2, cells, generator=generator, dtype=torch.float64)
        wall = draw[0] < wall_fraction
        trap = ~wall & (draw[1] < trap_fraction)
        wall[[start, goal]] = False
        trap[[start, goal]] = False
        next_state = torch.where(wall[target], torch.arange(cells)[:, None], target)  # a wall is not entered
        next_state[wall] = torch.arange(cells)[wall, None]
        terminal = trap.clone()
        terminal[goal] = True
        initial = torch.zeros(cells, dtype=torch.float64)
        initial[start] = 1.0
        if bool(_reachable(next_state, terminal, initial)[goal]):
            rewards = torch.full((cells, len(GRID_ACTIONS)), float(step_reward), dtype=torch.float64)
            rewards[trap[next_state]] = float(trap_reward)
            rewards[next_state == goal] = float(goal_reward)
            ref_logits = torch.zeros(cells, len(GRID_ACTIONS), dtype=torch.float64)
            return FiniteMDP(next_state=next_state, rewards=rewards, terminal=terminal, ref_logits=ref_logits, initial=initial)
    raise ValueError(f"no maze with a reachable goal in {max_tries} draws (wall_fraction={wall_fraction}, trap_fraction={trap_fraction})")
