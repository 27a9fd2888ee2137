"""Reward-labelled rows: the two canonical forms, loading, and validation.

A dataset for ``shiq_llm`` is a ``datasets.Dataset`` whose rows take one of three canonical forms:

* **single-turn** ``{"prompt", "completion", "reward"}`` — ``prompt`` is a string or a list of
  ``{"role", "content"}`` messages (all of them state, even assistant messages of an earlier history),
  ``completion`` a non-empty string (the one action turn), ``reward`` a finite number (a string such as
  ``"0.5"`` is refused, never converted); the prompt must not be blank;
* **multi-turn** ``{"messages", "rewards"}`` — every ``assistant`` message is an action turn and gets one
  reward, in order (``len(rewards) == number of assistant messages``); user, system and tool messages are
  state (the messages before the first assistant turn must not all be blank). Accepted too: no ``rewards``
  column and a ``reward`` field on every assistant message.

:func:`load_rows` reads JSONL / JSON / parquet files, a hub dataset, a list of dicts or a ``Dataset``, runs an
optional adapter (``shiq_llm.data.adapters.ADAPTERS``) and validates every row. JSON files are first parsed with the
standard ``json`` module (:func:`read_json_records`), so an empty file, bytes that are not UTF-8 or a line that
is not JSON is named with its file and line, and canonical rows are validated as the file states them (the
Arrow loader of ``datasets`` would silently cast a ``"0.5"`` reward to a number). :func:`row_conversation` turns one
row into ``(messages, step_rewards, n_prompt)`` — the single representation the tokeniser works on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from shiq_llm.storage.jsonl import parse_json_lines, utf8_text

__all__ = [
    "SINGLE_TURN_COLUMNS",
    "MULTI_TURN_COLUMNS",
    "STEPWISE_COLUMNS",
    "row_form",
    "row_conversation",
    "prompt_key",
    "validate_rows",
    "read_json_records",
    "load_rows",
]

SINGLE_TURN_COLUMNS = ("prompt", "completion", "reward")
MULTI_TURN_COLUMNS = ("messages", "rewards")
STEPWISE_COLUMNS = ("prompt", "completions", "rewards")

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def row_form(columns: Iterable[str]) -> str:
    """``"single"``, ``"multi"`` or ``"stepwise"`` from a dataset's column names; ValueError naming the missing
    columns."""
    columns = set(columns)
    if "messages" in columns:
        return "multi"
    form, needed = ("stepwise", STEPWISE_COLUMNS) if "completions" in columns else ("single", SINGLE_TURN_COLUMNS)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"missing column(s) {missing}: rows need {list(SINGLE_TURN_COLUMNS)} (single turn), "
            f"{list(MULTI_TURN_COLUMNS)} (multi-turn) or {list(STEPWISE_COLUMNS)} (stepwise); found {sorted(columns)}"
        )
    return form


def _reward(value: Any, where: str) -> float:
    if value is None:
        raise ValueError(f"{where} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return float(value)


def _text(value: Any, where: str, *, allow_empty: bool) -> str:
    if value is None:
        raise ValueError(f"{where} is missing")
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where} is empty")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} messages, got {value!r:.80}")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}[{j}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}[{j}]: 'role' must be a non-empty string, got {role!r}")
        content = _text(message.get("content"), f"{where}[{j}] ({role}) content", allow_empty=role != "assistant")
        out.append({"role": role, "content": content})
    return out


def _blank(messages: Sequence[Mapping[str, str]]) -> bool:
    return not any(m["content"].strip() for m in messages)


def row_conversation(row: Mapping[str, Any], index: int) -> tuple[list[dict[str, Any]], list[float], int]:
    """One canonical row as ``(messages, step_rewards, n_prompt)``; ValueError naming the row and field.

    ``messages`` are ``{"role", "content"}`` dicts; the action turns are the assistant messages at positions
    ``>= n_prompt`` (the first ``n_prompt`` messages are the prompt, all state). An action turn is one step, or,
    when its message also has ``"steps"`` (a stepwise row: the list of texts whose concatenation is its content),
    several; ``step_rewards`` holds one reward per step of the action turns, in order. A single-turn row with a
    string prompt becomes ``[user: prompt, assistant: completion]`` with ``n_prompt = 1``.
    """
    at = f"row {index}"
    if "messages" in row and row["messages"] is not None:
        messages = _messages(row["messages"], f"{at}: field 'messages'")
        assistant = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise ValueError(f"{at}: field 'messages' has no assistant message (nothing to learn from)")
        if assistant[0] == 0:
            raise ValueError(f"{at}: field 'messages' starts with an assistant message; a prompt message must come first")
        if _blank(messages[: assistant[0]]):
            raise ValueError(f"{at}: field 'messages' has an empty prompt (the messages before the first assistant "
                             "turn are blank)")
        rewards = row.get("rewards")
        if rewards is not None:
            if not isinstance(rewards, (list, tuple)):
                raise ValueError(f"{at}: field 'rewards' must be a list of numbers, got {type(rewards).__name__}")
            if len(rewards) != len(assistant):
                raise ValueError(
                    f"{at}: field 'rewards' has {len(rewards)} value(s) but 'messages' has {len(assistant)} assistant turn(s)"
                )
            turn_rewards = [_reward(r, f"{at}: field 'rewards'[{k}]") for k, r in enumerate(rewards)]
        else:
            turn_rewards = []
            for j, raw in enumerate(row["messages"]):
                r = raw.get("reward")
                if raw["role"] == "assistant":
                    turn_rewards.append(_reward(r, f"{at}: messages[{j}] (assistant) field 'reward'"))
                elif r is not None:
                    raise ValueError(f"{at}: messages[{j}] ({raw['role']}) has a reward, but only assistant turns are actions")
        return messages, turn_rewards, 0

    stepwise = row.get("completions") is not None
    for column in STEPWISE_COLUMNS if stepwise else SINGLE_TURN_COLUMNS:
        if column not in row:
            raise ValueError(f"{at}: missing field {column!r}")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": _text(prompt, f"{at}: field 'prompt'", allow_empty=False)}]
    elif isinstance(prompt, (list, tuple)):
        prompt_messages = _messages(prompt, f"{at}: field 'prompt'")
        if _blank(prompt_messages):
            raise ValueError(f"{at}: field 'prompt' is empty (every message's content is blank)")
    else:
        raise ValueError(f"{at}: field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if stepwise:
        steps, rewards = row["completions"], row["rewards"]
        if not isinstance(steps, (list, tuple)) or not steps:
            raise ValueError(f"{at}: field 'completions' must be a non-empty list of strings (the steps), got {steps!r:.80}")
        steps = [_text(step, f"{at}: field 'completions'[{k}]", allow_empty=True) for k, step in enumerate(steps)]
        if "" in steps:  # a step of whitespace is text (it has tokens); an empty one has no token to reward
            raise ValueError(f"{at}: field 'completions'[{steps.index('')}] is empty")
        if not "".join(steps).strip():
            raise ValueError(f"{at}: field 'completions' is empty (every step is blank)")
        if not isinstance(rewards, (list, tuple)):
            raise ValueError(f"{at}: field 'rewards' must be a list of numbers, got {type(rewards).__name__}")
        if len(rewards) != len(steps):
            raise ValueError(f"{at}: field 'rewards' has {len(rewards)} value(s) but 'completions' has {len(steps)} step(s)")
        step_rewards = [_reward(r, f"{at}: field 'rewards'[{k}]") for k, r in enumerate(rewards)]
        action = {"role": "assistant", "content": "".join(steps), "steps": list(steps)}
        return prompt_messages + [action], step_rewards, len(prompt_messages)
    completion = _text(row["completion"], f"{at}: field 'completion'", allow_empty=False)
    reward = _reward(row["reward"], f"{at}: field 'reward'")
    messages = prompt_messages + [{"role": "assistant", "content": completion}]
    return messages, [reward], len(prompt_messages)


def prompt_key(messages: Sequence[Mapping[str, str]], n_prompt: int) -> str:
    """A string naming the state before the first action turn of ``row_conversation``'s output.

    Rows with equal keys share a prompt: a string prompt and the same text as one user message coincide.
    """
    first = next(j for j, m in enumerate(messages) if m["role"] == "assistant" and j >= n_prompt)
    return json.dumps([[m["role"], m["content"]] for m in messages[:first]], ensure_ascii=False)


def validate_rows(rows, *, where: Sequence[str] | None = None) -> None:
    """Check every row of a canonical dataset (``Dataset`` or list of dicts); ValueError at the first bad row.

    Checked: the columns of one of the three forms; prompt/completion/message types; empty prompts and
    completions (also empty assistant messages and steps); rewards finite real numbers (not strings); one reward
    per assistant turn (per step in a stepwise row). ``where[i]`` (e.g. ``"line 5"``), when given, is put before the error of row ``i``.
    """
    if len(rows) == 0:
        raise ValueError("the dataset has no rows")
    row_form(rows.column_names if hasattr(rows, "column_names") else _list_columns(rows))
    for i, row in enumerate(rows):
        try:
            row_conversation(row, i)
        except ValueError as error:
            if where is None:
                raise
            raise ValueError(f"{where[i]}: {error}") from None


def _list_columns(rows: Sequence[Mapping[str, Any]]) -> set[str]:
    columns: set[str] = set()
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"rows must be dicts, got {type(row).__name__}")
        columns.update(row)
    return columns


def read_json_records(path: str | Path, *, field: str | None = None) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The rows of a ``.jsonl`` / ``.json`` file parsed with the standard ``json`` module, and where each one is.

    ``.jsonl``: one JSON object per line (blank lines skipped); ``where[i] = "line N"``. ``.json``: a list of
    objects (``where`` is None: errors name the row), a single object, the list under key ``field`` of an
    object, or JSON Lines. ValueError naming the file, and the line or row: an empty file, bytes that are not
    UTF-8, text that is not JSON, a row that is not a JSON object.
    """
    path = Path(path)
    text = utf8_text(path)
    where: list[str] | None = None
    if path.suffix.lower() == ".jsonl":
        records, where = parse_json_lines(text, path)
    elif not text.strip():
        records = []
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":
                raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
            records, where = parse_json_lines(text, path)  # JSON Lines in a .json file
        else:
            if field is not None:
                if not isinstance(records, dict) or field not in records:
                    raise ValueError(f"{path}: field={field!r} needs a JSON object with that key at the top level")
                records = records[field]
            if isinstance(records, dict):
                records = [records]
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a list of JSON objects (one per row), got {type(records).__name__}")
    if not records:
        raise ValueError(f"{path}: the file is empty (no rows)")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            at = where[i] if where is not None else f"row {i}"
            raise ValueError(f"{path}: {at}: expected a JSON object (one row), got {type(record).__name__}")
    return records, where


def _read(source, *, split: str, load_kwargs: dict, check_canonical: bool):
    """The rows of ``source`` and whether they were validated already (canonical rows of a JSON file)."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source, False
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the DatasetDict (splits: {list(source)})")
        return source[split], False
    if isinstance(source, (list, tuple)):
        return list(source), False
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source must be a path, a hub dataset name, a list of dicts or a datasets.Dataset, got {type(source).__name__}")
    path = Path(source)
    if path.exists():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"cannot read {path}: the extension must be one of {sorted(_FILE_BUILDERS)}")
        if builder == "json":  # named errors first; canonical rows checked as written (not as Arrow cast them)
            records, where = read_json_records(path, field=load_kwargs.get("field"))
            if check_canonical:
                try:
                    validate_rows(records, where=where)
                except ValueError as error:
                    raise ValueError(f"{path}: {error}") from None
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", **load_kwargs)
        except Exception as error:  # arrow/parquet errors: say which file
            raise ValueError(f"cannot read {path} as {builder}: {error}") from error
        return rows, builder == "json" and check_canonical
    if path.suffix.lower() in _FILE_BUILDERS:
        raise ValueError(f"file not found: {path}")
    return datasets.load_dataset(str(source), split=split, **load_kwargs), False  # a hub dataset (needs the network)


def load_rows(
    source,
    *,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    split: str = "train",
    validate: bool = True,
    **load_kwargs,
):
    """Load reward-labelled rows as a ``datasets.Dataset`` in a canonical form (see the module docstring).

    source: a ``.jsonl`` / ``.json`` / ``.parquet`` path, a hub dataset name (``datasets.load_dataset(source,
    split=split, **load_kwargs)``), a list of dicts, or a ``Dataset`` / ``DatasetDict``. A JSON file is parsed
    by :func:`read_json_records` first (errors name the file and line; canonical rows are validated there, as
    written), then loaded by ``datasets`` (``load_kwargs`` such as ``cache_dir`` or ``field`` go to it).
    format: ``None`` when the rows are already canonical, else the name of an adapter in
    ``shiq_llm.data.adapters.ADAPTERS`` (``"paired"``, ``"ultrafeedback"``, ``"hh"``, ``"bfcl"``) applied first,
    with the keyword arguments ``format_options`` (e.g. ``{"rejected_reward": -1.0}``).
    Every row is validated (``validate_rows``) unless ``validate=False``.
    """
    import datasets

    if format is None and format_options:
        raise ValueError("format_options needs a format")
    rows, validated = _read(source, split=split, load_kwargs=load_kwargs, check_canonical=validate and format is None)
    if format is not None:
        from shiq_llm.data.adapters import ADAPTERS

        if format not in ADAPTERS:
            raise ValueError(f"unknown format {format!r}; known: {sorted(ADAPTERS)}")
        rows = ADAPTERS[format](rows, **dict(format_options or {}))
    if isinstance(rows, datasets.Dataset):
        if validate and not validated:
            validate_rows(rows)
        return rows
    rows = list(rows)
    if validate:
        validate_rows(rows)  # before Arrow sees the rows: errors name the row and field
    elif not rows:
        raise ValueError("the dataset has no rows")
    try:
        return datasets.Dataset.from_list(rows)
    except (TypeError, ValueError) as error:  # pyarrow's ArrowInvalid / ArrowTypeError
        raise ValueError(
            f"the rows cannot be stored as one table (a column mixes types, e.g. string and message-list prompts; "
            f"tokenize_rows accepts such a list directly): {error}"
        ) from error
