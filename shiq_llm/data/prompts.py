"""Prompts for sampling and evaluation: where they come from, and a check that held-out prompts never leak.

:func:`load_prompts` reads a list of prompts (strings, or lists of ``{"role", "content"}`` messages) from

* a named prompt source: a function ``split -> prompts`` registered under the entry-point group
  :data:`PROMPT_SOURCES` (``pyproject.toml``); shiq registers ``"synthetic"``, the embedded task's prompts of a
  split (``shiq_llm.tasks.synthetic.task_prompts``: train / eval / all). The data layer finds the tasks through
  the entry point, so it never imports the layers above it; another package can register its own sources;
* a ``.txt`` file: one prompt per non-empty line;
* a ``.jsonl`` / ``.json`` / ``.parquet`` file or a hub dataset (``split``): rows with a prompt field —
  ``prompt_field`` when given, else ``prompt``, else the messages before the first assistant message of a
  ``messages`` row; with ``format`` the rows first go through that adapter of ``shiq_llm.data.adapters``
  (``format_options`` are its keyword arguments, e.g. UltraFeedback's ``score``).

Repeated prompts (a reward-labelled file has one row per completion) are kept once, in order of appearance.
An empty source, a missing file or a row without a usable prompt is a ValueError naming it.

:func:`check_held_out` compares evaluation prompts with the prompts of the training data (whitespace runs
collapsed, so ``"repeat 7:"`` and ``" repeat  7:"`` are the same prompt) and refuses, or warns with the counts.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Mapping, Sequence

from shiq_toy.options import parse_key_values

__all__ = ["load_prompts", "named_prompt_sources", "PROMPT_SOURCES", "prompt_of_row", "distinct_prompts", "normalized_prompt", "check_held_out",
           "parse_format_options", "LEAK_POLICIES"]

logger = logging.getLogger(__name__)

#: What :func:`check_held_out` does when evaluation prompts occur in the training data.
LEAK_POLICIES = ("error", "warn")

#: Entry-point group of the named prompt sources (module docstring).
PROMPT_SOURCES = "shiq.prompt_sources"


def named_prompt_sources() -> dict[str, Any]:
    """The registered prompt sources: name -> ``importlib.metadata.EntryPoint`` (``.load()`` gives the function)."""
    return {entry.name: entry for entry in entry_points(group=PROMPT_SOURCES)}


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be a string or a non-empty list of {{'role', 'content'}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{j}] must be a dict with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_of_row(row: Mapping[str, Any], index: int, *, field: str | None = None, where: str = "") -> Any:
    """The prompt of one row: ``row[field]`` (a string or messages), else ``row["prompt"]``, else the messages
    of ``row["messages"]`` before the first assistant message. ValueError naming the row and field."""
    at = f"{where}row {index}"
    if not isinstance(row, Mapping):
        raise ValueError(f"{at} is not a JSON object")
    if field is None:
        field = "prompt" if "prompt" in row else "messages" if "messages" in row else None
        if field is None:
            raise ValueError(f"{at} has no 'prompt' field (nor 'messages'; name another with --prompt-field); "
                             f"fields: {sorted(row)}")
    if field not in row or row[field] is None:
        raise ValueError(f"{at} has no {field!r} field; fields: {sorted(row)}")
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{at}: field {field!r} is empty")
        return value
    messages = _messages(value, f"{at}: field {field!r}")
    if field == "messages":  # a whole conversation; a prompt field's earlier assistant turns are history (state)
        first = next((j for j, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        messages = messages[:first]
        if not messages:
            raise ValueError(f"{at}: field {field!r} starts with an assistant message: no prompt before it")
    return messages


def _read_rows(source: str, *, split: str, format: str | None, format_options: Mapping[str, Any] | None):
    """Rows of a local .jsonl/.json file (read as JSON: prompts may mix strings and messages) or, through
    ``shiq_llm.data.rows.load_rows``, of a parquet file or hub dataset; the adapter ``format`` applied."""
    from shiq_llm.data.rows import load_rows, read_json_records

    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        rows, _ = read_json_records(path)  # errors name the file and line
        if format is None:
            return rows
        return load_rows(rows, format=format, format_options=format_options, validate=False)
    if path.suffix in (".jsonl", ".json", ".parquet", ".txt") and not path.exists():
        raise ValueError(f"no such file {source!r}")
    try:
        return load_rows(source, format=format, format_options=format_options, split=split, validate=False)
    except (ValueError, KeyError):
        raise
    except Exception as error:  # a hub dataset that cannot be reached or read: one line, not a traceback
        raise ValueError(f"cannot load {source!r} (split {split!r}) as a dataset: {type(error).__name__}: {error}") from error


def load_prompts(
    source: str,
    *,
    split: str | None = None,
    prompt_field: str | None = None,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    default_split: str = "eval",
) -> list:
    """Prompts of ``source`` (module docstring); ``split`` defaults to ``default_split`` (for ``"synthetic"``:
    train / eval / all; for a hub dataset: its split name). ValueError naming the source on any problem."""
    split = default_split if split is None else split
    where = f"--prompts {source}: "
    named = named_prompt_sources()
    if source in named:
        if prompt_field is not None or format is not None:
            raise ValueError(f"{where}--prompt-field and --format apply to rows, not to a named prompt source")
        try:
            return list(named[source].load()(split))
        except ValueError as error:
            raise ValueError(f"{where}--split {split!r}: {error}") from error
    path = Path(source)
    if path.suffix == ".txt":
        if not path.is_file():
            raise ValueError(f"{where}no such file")
        if prompt_field is not None or format is not None:
            raise ValueError(f"{where}--prompt-field and --format apply to rows (.jsonl, .json, .parquet, hub), "
                             "not to a .txt file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        try:
            rows = _read_rows(source, split=split, format=format, format_options=format_options)
        except ValueError as error:
            raise ValueError(f"{where}{error}") from error
        prompts = distinct_prompts(rows, field=prompt_field, where=where)
    if not prompts:
        raise ValueError(f"{where}no prompt found (the source is empty)")
    return prompts


def distinct_prompts(rows, *, field: str | None = None, where: str = "") -> list:
    """The prompts of ``rows`` (:func:`prompt_of_row`; without ``field``, a row's non-null ``messages`` are a
    conversation, else its ``prompt``), each kept once in order of first appearance."""
    prompts, seen = [], set()
    for i, row in enumerate(rows):
        name = field
        if name is None and isinstance(row, Mapping):
            name = "messages" if row.get("messages") is not None else "prompt" if "prompt" in row else None
        prompt = prompt_of_row(row, i, field=name, where=where)
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts


def normalized_prompt(prompt: Any) -> str:
    """A key equal for prompts that differ only in whitespace runs; a string equals one user message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return json.dumps([[m["role"], " ".join(m["content"].split())] for m in messages], ensure_ascii=False)


def check_held_out(eval_prompts: Sequence, train_prompts: Sequence, *, on_leak: str = "error",
                   where: str = "evaluation",
                   advice: str = "evaluate on held-out prompts (another --split), or pass --leak warn") -> int:
    """Count the evaluation prompts that also occur among the training prompts (:func:`normalized_prompt`).

    on_leak: ``"error"`` raises a ValueError with the counts, an example and ``advice`` (what to change) when
    any does; ``"warn"`` logs the same as a warning. Returns the count.
    """
    if on_leak not in LEAK_POLICIES:
        raise ValueError(f"on_leak must be one of {LEAK_POLICIES}, got {on_leak!r}")
    train = {normalized_prompt(p) for p in train_prompts}
    leaked = [p for p in eval_prompts if normalized_prompt(p) in train]
    if leaked:
        example = leaked[0] if isinstance(leaked[0], str) else leaked[0][-1]["content"]
        message = (f"{len(leaked)} of {len(eval_prompts)} {where} prompts ({100 * len(leaked) / len(eval_prompts):.1f} %) "
                   f"also occur in the training data ({len(train)} distinct prompts), e.g. {example[:60]!r}")
        if on_leak == "error":
            raise ValueError(f"{message}; {advice}")
        logger.warning("%s", message)
    return len(leaked)


def parse_format_options(items: Sequence[str] | None, *, option: str = "--format-option") -> dict[str, Any]:
    """``["score=fine-grained_score", "chosen_reward=2"]`` → ``{"score": "fine-grained_score", "chosen_reward": 2}``.

    Each item is ``KEY=VALUE``, the value read as JSON when it parses (numbers, true/false, null, lists), else
    kept as a string; or a JSON object (``'{"score": "fine-grained_score"}'``) whose keys are added as they
    are. ValueError naming ``option`` and the item that is neither.
    """
    return parse_key_values(items, option=option)
