"""File integrity for what a run writes and later trusts: sha256 of files, and a manifest of a directory's files.

A manifest maps each file's path (relative to the directory, POSIX separators) to ``{"bytes": size, "sha256":
hex digest}``. :func:`file_manifest` makes one; :func:`verify_file_manifest` recomputes the sizes and hashes
(hashing reads every byte, about a second per GB) and names the first file that is missing, truncated or
altered. Used by the checkpoints (``shiq_llm.train.checkpoint``) and the reference cache (``shiq_llm.core.reference``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["sha256_file", "file_manifest", "verify_file_manifest"]


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(directory: str | Path, *, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``directory`` (recursively, sorted); files
    whose name is in ``exclude`` (e.g. the manifest itself) are left out."""
    directory, exclude = Path(directory), set(exclude)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in exclude)
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def verify_file_manifest(directory: str | Path, files: Any, *, what: str, manifest_file: str | Path = "the manifest") -> None:
    """Check the files listed in ``files`` (a :func:`file_manifest`) against ``directory``; files not listed are
    ignored. ValueError ``"{what}: …"`` naming the first missing, resized or altered file, or a bad listing."""
    directory = Path(directory)
    if not isinstance(files, Mapping) or not files:
        raise ValueError(f"{what}: {manifest_file} lists no files to check (expected {{path: {{bytes, sha256}}}}, "
                         f"got {files!r:.80})")
    for name, expected in files.items():
        if not isinstance(expected, Mapping) or not {"bytes", "sha256"} <= set(expected):
            raise ValueError(f"{what}: {manifest_file} has a bad entry for {name}: {expected!r:.80}")
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{what}: {file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(f"{what}: {file} has {size} bytes, {manifest_file} says {expected['bytes']} (truncated?)")
        if sha256_file(file) != expected["sha256"]:
            raise ValueError(f"{what}: {file} does not match its sha256 in {manifest_file} (altered or corrupted)")
