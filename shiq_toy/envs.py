"""gymnasium environments for the bandit and the token tree, to sample trajectories with the standard API.

    env = TokenTreeEnv(tree)   # or gymnasium.make("shiq_toy.envs:shiq_toy/TokenTree-v0", tree=tree)
    obs, info = env.reset(seed=0)             # obs = {"depth": 0, "node": 0}
    obs, reward, terminated, truncated, info = env.step(token)

Randomness (the bandit's reward noise) comes from the environment's ``np_random``, seeded by ``reset(seed=...)``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from shiq_toy.mdp import Bandit, TokenTree

__all__ = ["BanditEnv", "TokenTreeEnv"]


class BanditEnv(gym.Env):
    """A :class:`Bandit` as a one-step episode: observation 0, action an arm in ``[0, K)``, reward
    ``r(a) + noise_std · ε``, then ``terminated=True``. ``info["mean_reward"]`` is the noiseless ``r(a)``.
    """

    metadata = {"render_modes": []}

    def __init__(self, bandit: Bandit):
        if not isinstance(bandit, Bandit):
            raise ValueError(f"bandit must be a shiq_toy.mdp.Bandit, got {type(bandit).__name__}")
        self.bandit = bandit
        self.observation_space = spaces.Discrete(1)
        self.action_space = spaces.Discrete(bandit.num_arms)
        self._generator = torch.Generator()
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._generator.manual_seed(int(self.np_random.integers(2**62)))
        self._done = False
        return 0, {}

    def step(self, action):
        if self._done:
            raise RuntimeError("the episode has ended: call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an arm in [0, {self.bandit.num_arms}), got {action!r}")
        arm = torch.tensor([int(action)])
        reward = float(self.bandit.sample_rewards(arm, generator=self._generator)[0])
        self._done = True
        return 0, reward, True, False, {"mean_reward": float(self.bandit.rewards[int(action)])}


class TokenTreeEnv(gym.Env):
    """A :class:`TokenTree` as an episode of H tokens.

    Observation ``{"depth": h, "node": n}``: the node index ``n`` of the current prefix within level ``h``
    (see :func:`shiq_toy.mdp.prefix_index`). Action: a token ``a ∈ [0, V)``; reward ``r(s, a)`` from
    ``tree.rewards[h][n, a]``; the next node is ``n·V + a``; ``terminated`` once ``h = H``.
    """

    metadata = {"render_modes": []}

    def __init__(self, tree: TokenTree):
        if not isinstance(tree, TokenTree):
            raise ValueError(f"tree must be a shiq_toy.mdp.TokenTree, got {type(tree).__name__}")
        self.tree = tree
        vocab, horizon = tree.vocab_size, tree.horizon
        self.observation_space = spaces.Dict(
            {"depth": spaces.Discrete(horizon + 1), "node": spaces.Discrete(vocab**horizon)}
        )
        self.action_space = spaces.Discrete(vocab)
        self._depth, self._node = horizon, 0

    def _obs(self) -> dict[str, np.int64]:
        return {"depth": np.int64(self._depth), "node": np.int64(self._node)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._depth, self._node = 0, 0
        return self._obs(), {}

    def step(self, action):
        if self._depth >= self.tree.horizon:
            raise RuntimeError("the episode has ended: call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be a token in [0, {self.tree.vocab_size}), got {action!r}")
        token = int(action)
        reward = float(self.tree.rewards[self._depth][self._node, token])
        self._node = self._node * self.tree.vocab_size + token
        self._depth += 1
        return self._obs(), reward, self._depth == self.tree.horizon, False, {}


for _name, _cls in (("Bandit", BanditEnv), ("TokenTree", TokenTreeEnv)):
    if f"shiq_toy/{_name}-v0" not in gym.registry:
        gym.register(id=f"shiq_toy/{_name}-v0", entry_point=_cls, disable_env_checker=False)
