"""Write-then-rename: a file or a directory appears at its path complete, or not at all.

Every writer of this package that must survive a kill goes through these two context managers: the shards of
``generate`` / ``score``, the sweep's result files, the final model, checkpoints' manifests, the reference
cache, the tiny base models. The rename is ``os.replace`` within one directory (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write", "atomic_directory"]


@contextlib.contextmanager
def atomic_write(path: str | Path, *, encoding: str = "utf-8") -> Iterator:
    """Open a text file that appears at ``path`` only when the block ends without an exception.

    The text goes to ``path.tmp-<pid>`` in the same directory, is flushed to disk, and is renamed over ``path``;
    on an exception the temporary file is deleted and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields ``path.tmp`` (emptied first: a leftover of a killed write is
    cleared); when the block ends without an exception it replaces ``path`` (an older ``path`` is moved aside to
    ``path.old`` and removed only once the new one is in place). On an exception ``path`` is kept as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
