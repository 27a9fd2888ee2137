"""Check an implementation outside torch: a thin adapter from NumPy arrays (so NumPy or JAX code) to torch.

    import numpy as np
    from shiq_toy.testing import from_numpy, verify

    def shiq_numpy(policy, ref, rewards, mask, *, beta, gamma):
        # policy, ref: TokenStats of (B, T) float64 numpy arrays; rewards (B, T); mask (B, T) bool
        rho = (policy.logit_taken - policy.logsumexp) - (ref.logit_taken - ref.logsumexp)
        out = np.zeros(mask.shape)
        for b in range(mask.shape[0]):
            t = np.flatnonzero(mask[b])                    # the masked-in positions, in order
            x = beta * rho[b, t] - rewards[b, t]
            disc = np.zeros(len(t))
            for j in reversed(range(len(t))):              # disc_j = x_j + γ disc_(j+1)
                disc[j] = x[j] + (gamma * disc[j + 1] if j + 1 < len(t) else 0.0)
            out[b, t] = beta * (policy.logsumexp[b, t] - ref.logsumexp[b, t]) + disc
        return out

    print(verify(from_numpy(shiq_numpy), "shiq").table())

A JAX function works the same way: ``jnp.asarray`` its NumPy arguments inside, and return an array
(``np.asarray`` is applied to the result). The gradient checks are reported "n/a": autograd cannot see through
NumPy; check the gradient with your framework's own tools.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from shiq_toy.losses import TokenStats

__all__ = ["from_numpy"]


def _to_numpy(x):
    if isinstance(x, TokenStats):
        return TokenStats(*(_to_numpy(y) for y in x))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


def from_numpy(fn: Callable) -> Callable:
    """Wrap ``fn`` (same signature as its variant, but on NumPy arrays: TokenStats of arrays, bool mask,
    Python floats β, γ) as a torch function the oracle can run. The result keeps its dtype (float32 results
    are compared with float32 tolerances). The wrapper has ``no_autograd = True``: gradient checks are skipped.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*(_to_numpy(x) for x in args), **{k: _to_numpy(v) for k, v in kwargs.items()})
        return torch.as_tensor(np.asarray(out))

    wrapped.no_autograd = True
    return wrapped
