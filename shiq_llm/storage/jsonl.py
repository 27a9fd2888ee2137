"""JSON Lines: one reader and one writer for every ``.jsonl`` file of the package.

Rows files, prompts files, completions, metrics logs: :func:`read_jsonl` returns their JSON objects and names
the file and line of any problem (bytes that are not UTF-8, a line that is not JSON, a value that is not an
object, an empty file); :func:`write_jsonl` writes them atomically (:func:`shiq_llm.storage.atomic.atomic_write`)
in the one format of the package (:func:`dumps`: UTF-8, not ASCII-escaped).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterable

from shiq_llm.storage.atomic import atomic_write

__all__ = ["read_jsonl", "write_jsonl", "dumps", "utf8_text", "parse_json_lines"]


def dumps(record: Any) -> str:
    """One JSON line (without the newline) in the package's format."""
    return json.dumps(record, ensure_ascii=False)


def utf8_text(path: str | Path) -> str:
    """The text of ``path`` (a UTF-8 byte-order mark dropped); ValueError naming the file, line and column of
    the first byte that is not UTF-8, or naming a missing file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def parse_json_lines(text: str, path: str | Path, *, skip_broken_lines: bool = False) -> tuple[list[Any], list[str]]:
    """The JSON values of the non-empty lines of ``text`` and where each one is (``"line N"``); ValueError naming
    ``path`` and the line of the first line that is not JSON, unless ``skip_broken_lines`` (a log cut by a kill)."""
    records, where = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if skip_broken_lines:
                continue
            raise ValueError(f"{path}: line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        where.append(f"line {number}")
    return records, where


def read_jsonl(path: str | Path, *, what: str | None = None, allow_empty: bool = False,
               skip_broken_lines: bool = False) -> list[dict]:
    """The JSON objects of a JSON Lines file, one per non-empty line.

    ValueError naming the file (after ``what``, e.g. ``"--rows"``, when given) and the line: a missing file,
    bytes that are not UTF-8, a line that is not JSON (skipped instead with ``skip_broken_lines``), a value
    that is not an object, and an empty file unless ``allow_empty``.
    """
    prefix = f"{what} " if what else ""
    try:
        records, where = parse_json_lines(utf8_text(path), path, skip_broken_lines=skip_broken_lines)
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from None
    for record, at in zip(records, where):
        if not isinstance(record, dict):
            raise ValueError(f"{prefix}{path}: {at}: expected a JSON object (one row), got {type(record).__name__}")
    if not records and not allow_empty:
        raise ValueError(f"{prefix}{path}: no rows (the file is empty)")
    return records


def write_jsonl(records: Iterable[Any], path: str | Path) -> Path:
    """Write ``records`` as JSON Lines to ``path`` atomically (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        for record in records:
            f.write(dumps(record) + "\n")
    return path
