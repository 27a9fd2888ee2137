"""LLM experiments, one module each, in the shape of ``shiq_toy.experiments`` (a dataclass of arguments, ``main(args)``).

- :mod:`~shiq_llm.experiments.sweep`: a grid of methods × β × seeds, trained and evaluated (``shiq-llm sweep``,
  ``shiq-llm demo``); the machinery the others run on.
- :mod:`~shiq_llm.experiments.multiturn`: credit assignment on the multi-turn task (``shiq-llm experiment multiturn``).
- :mod:`~shiq_llm.experiments.ablation`: ShiQ against its ablations on both embedded tasks
  (``shiq-llm experiment ablation``).
- :mod:`~shiq_llm.experiments.compare`: ShiQ against DPO, CoPG, DRO and IPO with learning rates tuned on a
  validation split, reward at matched KL on the test split (``shiq-llm experiment compare``).
- :mod:`~shiq_llm.experiments.driver`: the one driver the three ``shiq-llm experiment`` commands are configurations
  of (long CSV, figure, table, summary; ``--tables-from`` re-derives them from the CSV).
- :mod:`~shiq_llm.experiments.report`: means over seeds with 95 % intervals, paired / Welch tests, Holm, TOST,
  tables and figures.

This module holds what they share: a task's data directory, built once and reused (:func:`prepare_data`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["prepare_data"]


def prepare_data(
    given: str | Path | None,
    default: Path,
    settings: dict,
    build: Callable[[Path], object],
    *,
    needs: Sequence[str] = ("reference", "train.jsonl", "eval_prompts.jsonl"),
    command: str = "",
) -> Path:
    """A task's data directory (reference model, training rows, held-out prompts).

    ``given`` (a directory made earlier, e.g. by ``shiq-llm make-multiturn-data``): checked for ``needs`` and used
    as is. Otherwise ``default``, built by ``build(default)`` unless it was built before with the same
    ``settings`` (recorded in ``default/settings.json``); one built with other settings is refused (ValueError
    naming the first difference), never silently reused or overwritten.
    """
    if given:
        path = Path(given)
        for name in needs:
            if not (path / name).exists():
                hint = f" (make it with `{command} --out {path}`)" if command else ""
                raise ValueError(f"data directory {path}: missing {name}{hint}")
        return path
    record = default / "settings.json"
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they are read back
    if record.is_file():
        before = json.loads(record.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            key = changed[0]
            raise ValueError(f"{default} was built with {key}={before.get(key)!r}, not {settings.get(key)!r}: choose "
                             "another --out, or delete that directory to rebuild it")
        if all((default / name).exists() for name in needs):
            return default
    build(default)
    record.write_text(json.dumps(settings, indent=2))
    return default
