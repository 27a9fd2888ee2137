"""Checkpoints: accelerate's ``save_state`` written atomically, verified before use, pruned to the newest N.

Layout of ``OUT/checkpoints/ckpt-000120/`` (step 120)::

    model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl   accelerate.save_state
    trainer_state.json    our state: step, micro-batches consumed (data order), config, fingerprints
    manifest.json         size and sha256 of every other file; written last

Atomicity: everything is written to ``ckpt-000120.tmp`` and the directory is renamed with ``os.replace`` once
the manifest is on disk, so a crash mid-save leaves at most a ``.tmp`` directory (ignored, and cleared by the
next save of that step) and every ``ckpt-*`` directory is complete. The previous checkpoint is deleted (by
:func:`prune_checkpoints`, keeping the newest ``keep``) only after the new one is in place.

Verification (:func:`verify_checkpoint`) recomputes the sizes and hashes (hashing reads every byte, about a
second per GB): a missing, truncated or altered file is a ValueError naming it. :func:`latest_checkpoint`
walks back from the newest checkpoint and skips, with a warning, those that fail verification (they are left
on disk). With LoRA only trainable parameters are saved (the frozen base is reloaded from its source).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from shiq_llm.integrity import sha256_file

__all__ = [
    "STATE_FILE",
    "MANIFEST_FILE",
    "checkpoint_name",
    "list_checkpoints",
    "save_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "resume_point",
    "save_trainable_only",
    "check_trainable_saved",
]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^ckpt-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """``ckpt-*`` directories under ``root`` (no ``.tmp``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def save_checkpoint(accelerator, root: str | Path, step: int, state: Mapping[str, Any]) -> Path:
    """Save the accelerator state and ``state`` (JSON) as ``root/ckpt-<step>`` atomically; returns its path.

    Every process calls this (accelerate saves per-process RNG states); the main process writes the
    manifest and renames. An existing ``ckpt-<step>`` (e.g. an unusable one left by an earlier run) is moved
    to ``ckpt-<step>.replaced-<n>`` first, never deleted.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(dict(state), indent=2, sort_keys=True))
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(tmp)}
        manifest_tmp = tmp / (MANIFEST_FILE + ".partial")
        manifest_tmp.write_text(json.dumps({"step": step, "files": manifest}, indent=2, sort_keys=True))
        os.replace(manifest_tmp, tmp / MANIFEST_FILE)
        if final.exists():
            n = sum(1 for p in root.iterdir() if p.name.startswith(final.name + ".replaced-"))
            os.replace(final, root / f"{final.name}.replaced-{n}")
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return its trainer state. ValueError naming the bad file."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    manifest_file = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} is incomplete: {manifest_file} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint {path} is corrupt: cannot read {manifest_file}: {error}") from error
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is corrupt: {file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(f"checkpoint {path} is corrupt: {file} has {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if sha256_file(file) != expected["sha256"]:
            raise ValueError(f"checkpoint {path} is corrupt: {file} does not match its sha256 in {manifest_file}")
    if STATE_FILE not in files:
        raise ValueError(f"checkpoint {path} is corrupt: {STATE_FILE} is not listed in {manifest_file}")
    return json.loads((path / STATE_FILE).read_text())


def latest_checkpoint(root: str | Path, *, warn: Callable[[str], None] = logger.warning) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``root`` that verifies, with its trainer state; None if there is none.

    Newer checkpoints that fail verification are reported through ``warn`` and skipped (left on disk).
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
        raise ValueError("no usable checkpoint in " + str(root) + ": " + "; ".join(errors))
    return None


def prune_checkpoints(root: str | Path, *, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep`` (never ``protect``); returns those deleted."""
    candidates = [p for p in list_checkpoints(root) if (p / MANIFEST_FILE).is_file()]
    deleted = []
    for path in candidates[: max(0, len(candidates) - keep)]:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(path)
        deleted.append(path)
    return deleted


def resume_point(root: str | Path, *, resume: bool, resume_from: str | Path | None,
                 warn: Callable[[str], None] = logger.warning) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its trainer state: ``resume_from`` (verified; ValueError if unusable),
    else with ``resume`` the newest usable one under ``root`` (ValueError if there is none), else None."""
    if resume_from:
        path = Path(resume_from)
        return path, verify_checkpoint(path)
    if not resume:
        return None
    found = latest_checkpoint(root, warn=warn)
    if found is None:
        raise ValueError(f"--resume: no checkpoint in {root} (nothing to resume; drop --resume)")
    return found


def save_trainable_only(models, weights, output_dir) -> None:
    """accelerate ``register_save_state_pre_hook``: drop frozen parameters (a LoRA run's base, tied aliases
    included) from the saved model states; they are reloaded from the model's source, not the checkpoint."""
    for i, model in enumerate(models):
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        if frozen:
            weights[i] = {k: v for k, v in weights[i].items() if k not in frozen}


def check_trainable_saved(path: str | Path, model) -> None:
    """ValueError unless ``path/model.safetensors`` holds every trainable parameter of ``model`` (by name)."""
    from safetensors import safe_open

    file = Path(path) / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        saved = set(f.keys())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
    if missing:
        raise ValueError(f"checkpoint {path} does not belong to this model: {file} lacks {missing[:3]} "
                         f"({len(missing)} trainable parameters missing)")
