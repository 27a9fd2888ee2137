"""Checkpoints of ``ShiQTrainer``: transformers' ``checkpoint-N`` directories, made verifiable and kill-safe.

Layout of ``OUTPUT_DIR/checkpoint-120/`` (step 120)::

    model.safetensors (or adapter_model.safetensors), optimizer.pt, scheduler.pt, rng_state*.pth,
    trainer_state.json, …          written by transformers.Trainer._save_checkpoint
    shiq_state.json                ours: options a resume must keep, fingerprints of base model and data
    manifest.json                  size and sha256 of every other file; written last, atomically

A checkpoint is complete when its manifest verifies (:func:`verify_checkpoint`); a kill at any moment leaves
at most one incomplete ``checkpoint-N`` (no manifest), which resuming skips with a warning naming it, while
the previous complete checkpoint is still there: older checkpoints are pruned only after the new manifest is
written, and pruning renames a directory to ``*.deleting`` (atomic) before removing it, so a half-deleted
checkpoint never looks like a checkpoint (leftovers are cleared by :func:`clean_stale`).

Hashing reads every byte (about a second per GB). Directories are written with
``shiq_llm.storage.atomic.atomic_directory`` (the final model, checkpoints' manifests).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from shiq_llm.storage.atomic import atomic_write
from shiq_llm.storage.integrity import file_manifest, verify_file_manifest
from shiq_llm.storage.jsonl import read_jsonl, write_jsonl

__all__ = [
    "STATE_FILE",
    "MANIFEST_FILE",
    "list_checkpoints",
    "write_manifest",
    "verify_manifest",
    "clear_for_save",
    "finish_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "clean_stale",
    "check_resumable",
    "truncate_metrics_log",
    "normalise_modes",
]

logger = logging.getLogger(__name__)

STATE_FILE = "shiq_state.json"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_DELETING = ".deleting"


def list_checkpoints(root: str | Path) -> list[Path]:
    """``checkpoint-N`` directories under ``root``, oldest (smallest N) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def write_manifest(directory: str | Path, **extra: Any) -> Path:
    """Write ``directory/manifest.json``: size and sha256 of every other file (recursively), plus ``extra``.

    Written atomically (``shiq_llm.storage.atomic.atomic_write``), so a manifest is either absent or complete."""
    directory = Path(directory)
    manifest = file_manifest(directory, exclude=(MANIFEST_FILE,))
    with atomic_write(directory / MANIFEST_FILE) as f:
        f.write(json.dumps({**extra, "files": manifest}, indent=2, sort_keys=True))
    return directory / MANIFEST_FILE


def verify_manifest(directory: str | Path, *, what: str = "checkpoint") -> dict[str, Any]:
    """Check every file of ``directory`` against its manifest; returns the manifest. ValueError naming the
    missing, truncated or altered file (``what`` names the kind of directory in the message)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{what} {directory} does not exist")
    manifest_file = directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise ValueError(f"{what} {directory} is incomplete: {manifest_file} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{what} {directory} is corrupt: cannot read {manifest_file}: {error}") from error
    verify_file_manifest(directory, files, what=f"{what} {directory} is corrupt", manifest_file=manifest_file)
    return manifest


def clear_for_save(path: str | Path) -> None:
    """Before saving checkpoint ``path``: an incomplete one (no manifest: a kill during its save) is removed;
    one that has a manifest (complete once, perhaps corrupt since) is moved to ``path.replaced-<n>``, never
    deleted."""
    path = Path(path)
    if not path.exists():
        return
    if not (path / MANIFEST_FILE).is_file():
        _remove(path)
        return
    n = sum(1 for p in path.parent.iterdir() if p.name.startswith(path.name + ".replaced-"))
    os.replace(path, path.with_name(f"{path.name}.replaced-{n}"))


def normalise_modes(directory: str | Path) -> None:
    """Give every file of ``directory`` the mode the umask gives a new file (0644 under the usual umask 022):
    safetensors writes its files 0600 through a temporary file, unlike every other file of a model."""
    mask = os.umask(0)
    os.umask(mask)
    for file in Path(directory).rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~mask)


def finish_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Complete a checkpoint transformers has written: ``shiq_state.json`` (``state``), file modes, then the
    manifest."""
    path = Path(path)
    normalise_modes(path)
    (path / STATE_FILE).write_text(json.dumps(dict(state), indent=2, sort_keys=True, default=str))
    step = json.loads((path / "trainer_state.json").read_text())["global_step"]
    write_manifest(path, step=step)
    return path


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return its ``shiq_state.json``. ValueError naming the bad file."""
    path = Path(path)
    manifest = verify_manifest(path)
    if STATE_FILE not in manifest["files"]:
        raise ValueError(f"checkpoint {path} is not a ShiQTrainer checkpoint: {STATE_FILE} is not listed in {path / MANIFEST_FILE}")
    return json.loads((path / STATE_FILE).read_text())


def latest_checkpoint(root: str | Path, *, warn: Callable[[str], None] = logger.warning) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``root`` that verifies, with its state; None if there is none at all.

    Newer checkpoints that fail verification are reported through ``warn`` (naming the problem) and skipped.
    ValueError when checkpoints exist but none verifies.
    """
    candidates = list_checkpoints(root)
    errors = []
    for path in reversed(candidates):
        try:
            return path, verify_checkpoint(path)
        except ValueError as error:
            errors.append(str(error))
            warn(f"skipping an unusable checkpoint: {error}")
    if candidates:
        raise ValueError(f"no usable checkpoint in {root}: " + "; ".join(errors))
    return None


def _remove(path: Path) -> None:
    """Delete a directory atomically as far as readers are concerned: rename to ``*.deleting``, then remove."""
    doomed = path.with_name(path.name + _DELETING)
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def prune_checkpoints(root: str | Path, *, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep`` (never ``protect``); returns those deleted."""
    complete = [p for p in list_checkpoints(root) if (p / MANIFEST_FILE).is_file()]
    deleted = []
    for path in complete[: max(0, len(complete) - keep)]:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        _remove(path)
        deleted.append(path)
    return deleted


def clean_stale(root: str | Path) -> list[Path]:
    """Remove what a kill can leave behind under ``root``: ``*.deleting`` and ``*.tmp`` directories."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and (p.name.endswith(_DELETING) or p.name.endswith(".tmp"))]
    for p in stale:
        shutil.rmtree(p)
    return stale


def check_resumable(path: str | Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """ValueError unless a run with state ``current`` may resume checkpoint ``path`` (state ``saved``): the same
    options that change the trajectory, number of processes, base model and data (by fingerprint: the tokenised
    data, and the training data with its rewards and pairs; a checkpoint saved without the latter is refused)."""
    old, new = saved.get("config", {}), current["config"]
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if changed:
        raise ValueError(f"cannot resume from {path}: these options differ from the checkpoint's run: {'; '.join(changed)}")
    if saved.get("num_processes") != current["num_processes"]:
        raise ValueError(f"cannot resume from {path}: it was saved by {saved.get('num_processes')} process(es), "
                         f"this run has {current['num_processes']} (the data order depends on it)")
    for key, what in (("model_fingerprint", "base model"), ("data_fingerprint", "tokenised data"),
                      ("training_data_fingerprint", "training data (rewards or preference pairs)")):
        if saved.get(key) != current[key]:
            raise ValueError(f"cannot resume from {path}: the {what} differs from the checkpoint's run ({key} "
                             f"{saved.get(key)!r} in {Path(path) / STATE_FILE}, this run has {current[key]!r})")


def truncate_metrics_log(path: str | Path, step: int) -> None:
    """Cut a JSONL metrics log back to the records of steps <= ``step`` (a resumed run rewrites the rest), and
    drop a half-written last line. Atomic (rewritten to a temporary file and renamed)."""
    path = Path(path)
    if not path.is_file():
        return
    records = read_jsonl(path, allow_empty=True, skip_broken_lines=True)  # a line cut by a kill is dropped
    write_jsonl((r for r in records if r.get("step", 0) <= step), path)

