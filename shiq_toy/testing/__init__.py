"""Check your own ShiQ-style loss against the spec: hypothesis strategies, slow references and an oracle.

    shiq_toy.testing.reference    the independent slow references (Python loops, float64), written from the spec
    shiq_toy.testing.exact        inputs at the exact solution of a token tree (every sequence, each fixed point)
    shiq_toy.testing.strategies   hypothesis strategies: bandits, trees, logits, batches with padding and holes, β, γ
    shiq_toy.testing.properties   the properties and the variants they apply to (a table)
    shiq_toy.testing.oracle       the battery: reference, fixed point, initialisation, telescoping, mask, gradient
    shiq_toy.testing.token_checks    its properties for the ShiQ-style variants (per-token statistics in)
    shiq_toy.testing.baseline_checks its properties for DPO, CoPG, DRO (sequence log-ratios in)
    shiq_toy.testing.failures     the results, and the comparisons that report a counterexample
    shiq_toy.testing.adapters     from_numpy: check a NumPy (or JAX) implementation with the same battery

The command line runs the same battery: ``shiq-toy verify MODULE:FUNCTION --as VARIANT``.

``strategies`` and ``oracle`` need hypothesis, from the ``testing`` extra (``pip install "shiq[testing]"``);
``reference`` and ``exact`` do not. Names are imported lazily, so ``import shiq_toy.testing`` always works.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "verify": "oracle",
    "check": "oracle",
    "Report": "failures",
    "PropertyResult": "failures",
    "OracleFailure": "failures",
    "PROPERTIES": "properties",
    "VARIANTS": "properties",
    "from_numpy": "adapters",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'shiq_toy.testing' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"shiq_toy.testing.{_LAZY[name]}")
    except ModuleNotFoundError as error:
        if error.name == "hypothesis":
            raise ModuleNotFoundError('shiq_toy.testing needs hypothesis: pip install "shiq[testing]"', name="hypothesis") from error
        raise
    return getattr(module, name)
