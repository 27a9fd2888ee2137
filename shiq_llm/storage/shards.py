"""Resumable JSONL outputs: rows written in shards, the final file swapped in atomically.

A long job (``shiq-llm generate``, ``shiq-llm score``) that turns input items ``0 … total − 1`` into rows
writes the rows of items ``[start, stop)`` to one shard ``OUT.parts/{start:09d}-{stop:09d}.jsonl``, next to
``OUT.parts/manifest.json`` (the settings that determine the rows)::

    OUT.parts/manifest.json
    OUT.parts/000000000-000000064.jsonl
    OUT.parts/000000064-000000128.jsonl   …

Every file is written to a temporary name and renamed into place (:func:`shiq_llm.storage.atomic.atomic_write`), so a shard either is
complete or does not exist. A killed job re-run with the same settings finds its finished shards and computes
only the missing ones; once all exist, OUT is written as their concatenation in order (again atomically) and
``OUT.parts`` is deleted. So OUT either does not exist or holds every row exactly once, in input order. A
re-run with other settings is refused (the manifest differs) rather than mixing rows of two runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from shiq_llm.storage.atomic import atomic_write
from shiq_llm.storage.jsonl import dumps

__all__ = ["ShardedOutput"]

_SHARD = re.compile(r"^(\d{9})-(\d{9})\.jsonl$")
MANIFEST = "manifest.json"


class ShardedOutput:
    """The shards of one output file (module docstring).

    out: the final ``.jsonl`` file; manifest: JSON-serialisable settings that determine the rows (compared on
    resume); total: number of input items; shard_size: items per shard; overwrite: delete an existing OUT
    and unfinished shards first.
    """

    def __init__(self, out: str | Path, manifest: dict[str, Any], *, total: int, shard_size: int,
                 overwrite: bool = False):
        if total < 1:
            raise ValueError("nothing to do: no input items")
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.manifest = json.loads(json.dumps({**manifest, "total": total, "shard_size": shard_size}))
        self.total, self.shard_size = total, shard_size
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.out.unlink(missing_ok=True)

    def ranges(self) -> list[tuple[int, int]]:
        """Every shard's ``[start, stop)``, in order."""
        return [(s, min(s + self.shard_size, self.total)) for s in range(0, self.total, self.shard_size)]

    def shard_path(self, start: int, stop: int) -> Path:
        return self.parts / f"{start:09d}-{stop:09d}.jsonl"

    def _check_manifest(self) -> None:
        found = json.loads((self.parts / MANIFEST).read_text(encoding="utf-8"))
        differ = sorted(k for k in set(found) | set(self.manifest) if found.get(k) != self.manifest.get(k))
        if differ:
            detail = "; ".join(f"{k}: {found.get(k)!r} there, {self.manifest.get(k)!r} now" for k in differ[:4])
            raise ValueError(f"{self.parts} holds the shards of a run with other settings ({detail}); re-run that "
                             "command to finish it, or pass --overwrite to start afresh")

    def start(self) -> list[tuple[int, int]]:
        """Check OUT and the shard directory; returns the ranges still to compute (``[]``: OUT is complete).

        ValueError when OUT already exists (without unfinished shards of this run: pass --overwrite), when the
        shard directory belongs to other settings, or when it holds files that are not this run's shards.
        """
        if self.out.exists() and not self.parts.exists():
            raise ValueError(f"{self.out} already exists; pass --overwrite to replace it")
        if self.parts.exists():
            if not (self.parts / MANIFEST).is_file():
                raise ValueError(f"{self.parts} has no {MANIFEST}: not a shard directory of this tool; remove it")
            self._check_manifest()
            expected = {self.shard_path(*r).name for r in self.ranges()}
            for path in self.parts.iterdir():
                if ".tmp-" in path.name:  # a write interrupted by the kill
                    path.unlink()
                elif path.name != MANIFEST and path.name not in expected:
                    raise ValueError(f"{self.parts}: unexpected file {path.name} (not a shard of this run)")
            if self.out.exists():  # killed after OUT was swapped in, before the shards were removed
                shutil.rmtree(self.parts)
                return []
        return [r for r in self.ranges() if not self.shard_path(*r).exists()]

    def write(self, start: int, stop: int, rows: Iterable[dict]) -> Path:
        """Write one shard atomically (the first one creates the shard directory and its manifest, so a run that
        fails before its first shard leaves nothing behind)."""
        if not self.parts.exists():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.parts.with_name(f"{self.parts.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            with atomic_write(tmp / MANIFEST) as f:
                json.dump(self.manifest, f, indent=2, ensure_ascii=False)
            os.replace(tmp, self.parts)  # the directory appears with its manifest
        path = self.shard_path(start, stop)
        with atomic_write(path) as f:
            for row in rows:
                f.write(dumps(row) + "\n")
        return path

    def finish(self) -> int:
        """Concatenate every shard into OUT (atomically), delete the shard directory; returns the row count."""
        if not self.parts.exists():  # start() found OUT complete
            return sum(1 for line in self.out.open(encoding="utf-8") if line.strip())
        missing = [self.shard_path(*r).name for r in self.ranges() if not self.shard_path(*r).exists()]
        if missing:
            raise ValueError(f"{self.parts}: shard(s) {missing[:3]} missing; re-run the command to compute them")
        count = 0
        with atomic_write(self.out) as f:
            for r in self.ranges():
                with self.shard_path(*r).open(encoding="utf-8") as shard:
                    for line in shard:
                        f.write(line)
                        count += 1
        shutil.rmtree(self.parts)
        return count
