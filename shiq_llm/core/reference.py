"""Reference statistics computed once, cached on disk, and checked against their model and data (spec §2).

Every loss needs, per response token, the reference's ``ℓref_t`` and ``vref_t``. They never change during
training, so they are computed once, under ``torch.no_grad``, with ``shiq_llm.core.stats.response_token_stats``,
and stored; training then holds one model. With LoRA the reference is the base model with the adapters
disabled (``with model.disable_adapter():``, :func:`reference_mode`), never a copy.

**Cache layout** (a directory, written with ``shiq_llm.storage.atomic.atomic_directory``)::

    DIR/manifest.json      format, fingerprints (model, data), settings, counts, has_prompt_state, and
                           files: size and sha256 of every file under DIR/data (shiq_llm.storage.integrity)
    DIR/data/…             datasets.Dataset.save_to_disk, one row per example, same order as the examples:
        ref_logit_taken  list[float32]   ℓref at the example's response positions, in order (length = number
        ref_logsumexp    list[float32]   vref     of True entries of its response_mask; not full length)
        ref_prompt_state list[float32]   (optional, H) the reference's final hidden state at the last prompt
                                          token, i.e. at the state s_1 before the first response token

**Fingerprints.** ``model``: sha256 over the model config (minus bookkeeping keys such as ``_name_or_path``,
``dtype``, ``use_cache``) and, for every parameter in name order, its name, shape, dtype and the bytes of up to
:data:`SAMPLE_ELEMENTS` elements taken at an even stride through the flattened tensor (all elements of smaller
tensors). It reads at most ``SAMPLE_ELEMENTS`` numbers per tensor, so it costs seconds even for a 70B model; a
change that touches no sampled element would go unseen (fine-tuning changes essentially all elements). LoRA
parameters (``lora_*``) are skipped and peft's ``.base_layer`` is removed from names, so a peft-wrapped model
has its base model's fingerprint. ``data``: sha256 over the number of examples, then per column
(``input_ids``, ``response_mask``) every example's length and the concatenated values, in the dataset's row order
(an index mapping left by ``select``/``shuffle`` is followed); rewards do not enter the reference (they enter
:func:`training_data_fingerprint`, the key of a resumed run and of a sweep cell). ``settings``: the compute precision (statistics of a
bf16-autocast forward differ from fp32 ones by bf16 rounding; the cache is made with the training precision so
that the policy starts exactly at ``ℓ = ℓ_ref``).

**Several processes.** In a distributed run every rank computes the statistics of its contiguous shard of
the examples and the main rank assembles the cache from the shards (:func:`reference_cache`), so a long
reference pass is split across the ranks instead of leaving them waiting at a barrier; the cache's files are
the same whatever the number of processes.

**Checks.** A cache whose manifest differs from the current model, data or settings, or whose files are
missing, unreadable or altered (a size or sha256 that differs from the manifest: hashing reads the whole cache,
about a second per GB), is refused with a ValueError naming the file and what differs (never silently used);
``recompute=True`` overwrites it (``--recompute-ref``). A cache that matches but lacks the ``ref_prompt_state``
column a method needs (``shiq_toy.methods.METHODS[...].needs_value``: DRO) is rebuilt with it automatically.

**DRO's value.** DRO-V needs a value ``V_φ(x)`` of the prompt. Our choice: a separate linear head
``V_φ(x) = w·s_1(x) + b`` on the *reference's* final hidden state at the last prompt token, cached here
(``ref_prompt_state``), trained jointly with the policy (split gradients, ``shiq_toy.baselines.dro_loss``). It
costs no extra forward and no second model, and the features are fixed, so the value is a linear probe of the
frozen reference's representation of the prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from shiq_llm.core.sharding import unwrap_model
from shiq_llm.core.stats import DEFAULT_CHUNK_SIZE, response_token_stats
from shiq_llm.data import collate
from shiq_llm.storage.atomic import atomic_directory
from shiq_llm.storage.integrity import file_manifest, verify_file_manifest

__all__ = [
    "CACHE_FORMAT",
    "SAMPLE_ELEMENTS",
    "REF_COLUMNS",
    "reference_mode",
    "model_fingerprint",
    "data_fingerprint",
    "training_data_fingerprint",
    "compute_reference_stats",
    "save_reference_cache",
    "load_reference_cache",
    "expected_manifest",
    "reference_cache",
    "shard_directory",
    "contiguous_shard",
    "scatter_response_values",
]

CACHE_FORMAT = "shiq-reference-cache/2"  # /2: the manifest lists the sha256 of every data file
#: Elements of each parameter read by :func:`model_fingerprint`.
SAMPLE_ELEMENTS = 65_536
#: Columns of the cache (``ref_prompt_state`` only when asked for).
REF_COLUMNS = ("ref_logit_taken", "ref_logsumexp")
_CONFIG_KEYS_IGNORED = ("transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
                        "output_hidden_states", "return_dict")


# --------------------------------------------------------------------------------------------------
# The reference model
# --------------------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


@contextlib.contextmanager
def reference_mode(model: nn.Module):
    """The reference inside ``model``: a peft model with its adapters disabled, otherwise the model as is.

    Also switches to eval mode and no-grad for the duration (training mode is restored afterwards).
    """
    training = model.training
    adapters_off = model.disable_adapter() if _is_peft(model) else contextlib.nullcontext()
    try:
        model.eval()
        with adapters_off, torch.no_grad():
            yield model
    finally:
        model.train(training)


def model_fingerprint(model: nn.Module, *, sample: int = SAMPLE_ELEMENTS) -> str:
    """sha256 hex digest of the reference model (config + strided parameter samples; module docstring)."""
    hf_model = unwrap_model(model)
    digest = hashlib.sha256()
    config = getattr(hf_model, "config", None)
    if config is not None:
        entries = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_KEYS_IGNORED}
        digest.update(json.dumps(entries, sort_keys=True, default=str).encode())
    params = sorted(
        (name.replace(".base_layer", ""), p) for name, p in hf_model.named_parameters() if "lora_" not in name
    )
    for name, param in params:
        flat = param.detach().reshape(-1)
        if flat.numel() > sample:
            flat = flat[:: flat.numel() // sample][:sample]
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(examples, columns: tuple[str, ...] = ("input_ids", "response_mask")) -> str:
    """sha256 hex digest of the tokenised examples' ``columns`` (default ``input_ids`` and ``response_mask``: what
    the reference statistics depend on), in order."""
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    digest.update(f"examples={len(examples)}|".encode())
    columns = list(columns)
    # a Dataset as an Arrow table in its row order (``.data`` would ignore the index mapping of select/shuffle)
    table = examples.with_format("arrow", columns=columns)[:] if hasattr(examples, "with_format") else None
    for column in columns:
        if table is not None:
            col = table.column(column).combine_chunks()
            lengths = np.asarray(pc.list_value_length(col), dtype=np.int64)
            values = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
        else:  # a list of dicts
            rows = [ex[column] for ex in examples]
            lengths = np.array([len(r) for r in rows], dtype=np.int64)
            values = np.concatenate([np.asarray(r) for r in rows]) if rows else np.zeros(0)
        dtype = {"input_ids": np.int64, "response_mask": np.uint8}.get(column, np.float64)
        digest.update(column.encode() + lengths.tobytes() + values.astype(dtype).tobytes())
    return digest.hexdigest()


def training_data_fingerprint(examples, pairs: tuple | None = None) -> str:
    """sha256 hex digest of what training sees of the examples: :func:`data_fingerprint` over ``input_ids``,
    ``response_mask`` and the per-token ``rewards``, and the ``pairs`` ``(first, second)`` index lists of a pair
    method (None for methods on sequences). Unlike the reference cache's key it changes with the rewards, so a
    resumed run (``shiq_llm.train.checkpoint.check_resumable``) or a sweep cell sees other rewards."""
    digest = hashlib.sha256(data_fingerprint(examples, ("input_ids", "response_mask", "rewards")).encode())
    if pairs is None:
        digest.update(b"|pairs=none")
    else:
        first, second = pairs
        digest.update(b"|pairs=" + np.asarray(first, dtype=np.int64).tobytes() + b"|"
                      + np.asarray(second, dtype=np.int64).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Computing the statistics
# --------------------------------------------------------------------------------------------------


class _LastHidden:
    """Forward hook on a transformers backbone that keeps its ``last_hidden_state`` (B, L, H)."""

    def __init__(self, model: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = unwrap_model(model).base_model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def compute_reference_stats(
    model: nn.Module,
    examples,
    *,
    pad_token_id: int,
    batch_size: int = 16,
    padding_side: str = "right",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_prompt_state: bool = False,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    device: torch.device | str | None = None,
    progress: bool = False,
):
    """The reference's statistics on every example: a ``datasets.Dataset`` with one row per example.

    model: the reference (a peft model is used with adapters disabled, :func:`reference_mode`);
    examples: ``shiq_llm.data.tokenize_rows`` output. Columns: ``ref_logit_taken``, ``ref_logsumexp``
    (float32, one per response token of the example, in order) and, with ``with_prompt_state``,
    ``ref_prompt_state`` (float32, H). ``autocast``: a context factory for the forward (the trainer passes
    ``accelerator.autocast``), so the cache is made at the training precision.
    """
    import datasets
    import pyarrow as pa
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = len(examples)
    if n == 0:  # an empty shard of a distributed pass
        empty = pa.LargeListArray.from_arrays(pa.array([0], pa.int64()), pa.array([], pa.float32()))
        names = REF_COLUMNS + ("ref_prompt_state",) * with_prompt_state
        return datasets.Dataset(pa.table({name: empty for name in names}))
    columns: dict[str, list[np.ndarray]] = {k: [] for k in REF_COLUMNS}
    counts: list[int] = []
    states: list[np.ndarray] = []
    hook = _LastHidden(model) if with_prompt_state else None
    try:
        with reference_mode(model), autocast():
            for start in tqdm(range(0, n, batch_size), desc="reference statistics", disable=not progress):
                batch = collate([examples[i] for i in range(start, min(start + batch_size, n))],
                                pad_token_id=pad_token_id, padding_side=padding_side)
                mask = batch["response_mask"].to(device)  # (B, L)
                stats = response_token_stats(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                             mask, chunk_size=chunk_size)
                for name, values in zip(REF_COLUMNS, stats):
                    columns[name].append(values[mask].float().cpu().numpy())  # (N,) row-major = per example, in order
                counts += mask.sum(dim=1).tolist()
                if hook is not None:
                    first = mask.to(torch.int8).argmax(dim=1)  # (B,) first response position
                    rows = torch.arange(mask.shape[0], device=device)
                    states.append(hook.value[rows, first - 1].float().cpu().numpy())  # (B, H): state s_1
    finally:
        if hook is not None:
            hook.handle.remove()
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), pa.int64())
    table = {name: pa.LargeListArray.from_arrays(offsets, pa.array(np.concatenate(parts), pa.float32()))
             for name, parts in columns.items()}
    if with_prompt_state:
        flat = np.concatenate(states)  # (n, H)
        width = flat.shape[1]
        state_offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int64), pa.int64())
        table["ref_prompt_state"] = pa.LargeListArray.from_arrays(state_offsets, pa.array(flat.reshape(-1), pa.float32()))
    return datasets.Dataset(pa.table(table))


# --------------------------------------------------------------------------------------------------
# The cache on disk
# --------------------------------------------------------------------------------------------------


def save_reference_cache(path: str | Path, stats, manifest: Mapping[str, Any]) -> Path:
    """Write ``stats`` (a Dataset) and ``manifest`` to directory ``path`` atomically; replaces an old cache.

    Written with ``shiq_llm.storage.atomic.atomic_directory``: an old cache at ``path`` is replaced only once the
    new one is complete.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        stats.save_to_disk(str(tmp / "data"))
        files = file_manifest(tmp / "data")
        (tmp / "manifest.json").write_text(json.dumps({"format": CACHE_FORMAT, **manifest, "files": files}, indent=2,
                                                      sort_keys=True))
    return path


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_file = path / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"reference cache {path}: {manifest_file} is missing (not a reference cache, or an "
                         "interrupted write); use --recompute-ref to rebuild it") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"reference cache {path}: cannot read {manifest_file}: {error}; use --recompute-ref") from error
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"reference cache {path}: format {manifest.get('format')!r} in {manifest_file}, expected "
                         f"{CACHE_FORMAT!r}; use --recompute-ref")
    return manifest


def load_reference_cache(path: str | Path, expected: Mapping[str, Any], *, need_prompt_state: bool = False):
    """Load a cache and check it against ``expected`` (manifest entries: fingerprints, settings, counts).

    Returns the statistics Dataset. ValueError naming the file and the first entry that differs, a missing
    or altered file (size and sha256 against the manifest), or a missing ``ref_prompt_state`` column when
    ``need_prompt_state``.
    """
    import datasets

    path = Path(path)
    manifest = _read_manifest(path)
    what = {"model_fingerprint": "the reference model", "data_fingerprint": "the tokenised data",
            "settings": "the settings", "num_examples": "the number of examples"}
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise ValueError(
                f"reference cache {path} does not match {what.get(key, key)}: {path / 'manifest.json'} has "
                f"{key} = {manifest.get(key)!r}, this run has {value!r}. The cache was made for another model or "
                "data set; use --recompute-ref to overwrite it, or point --ref-cache elsewhere"
            )
    if need_prompt_state and not manifest.get("has_prompt_state"):
        raise ValueError(f"reference cache {path} has no ref_prompt_state column (it was made for an algorithm other "
                         "than dro); use --recompute-ref to rebuild it with the prompt states dro needs")
    if not (path / "data").is_dir():
        raise ValueError(f"reference cache {path}: cannot load {path / 'data'}: the directory is missing; "
                         "use --recompute-ref")
    try:
        verify_file_manifest(path / "data", manifest.get("files"), what=f"reference cache {path} is corrupt",
                             manifest_file=path / "manifest.json")
    except ValueError as error:
        raise ValueError(f"{error}; use --recompute-ref to rebuild it") from None
    try:
        stats = datasets.load_from_disk(str(path / "data"))
    except Exception as error:  # missing/corrupt arrow files: say which cache
        raise ValueError(f"reference cache {path}: cannot load {path / 'data'}: {error}; use --recompute-ref") from error
    if len(stats) != manifest.get("num_examples"):
        raise ValueError(f"reference cache {path}: {path / 'data'} has {len(stats)} rows but the manifest says "
                         f"{manifest.get('num_examples')}; use --recompute-ref")
    return stats


def expected_manifest(model: nn.Module, examples, *, settings: Mapping[str, Any],
                      fingerprints: tuple[str, str] | None = None) -> dict[str, Any]:
    """The manifest entries a cache of ``examples`` under ``model`` must match (:func:`load_reference_cache`):
    fingerprints (given, or computed here), ``settings`` and the number of examples."""
    model_fp, data_fp = fingerprints if fingerprints is not None else (model_fingerprint(model), data_fingerprint(examples))
    return {"model_fingerprint": model_fp, "data_fingerprint": data_fp, "settings": dict(settings),
            "num_examples": len(examples)}


def shard_directory(path: str | Path) -> Path:
    """Where the ranks of a distributed reference pass leave their shards: ``DIR.shards`` beside the cache."""
    path = Path(path)
    return path.with_name(f"{path.name}.shards")


def contiguous_shard(examples, num_shards: int, index: int):
    """``examples.shard(num_shards=num_shards, index=index, contiguous=True)`` (the first ``len % num_shards``
    shards hold one more row), also when that shard is empty (more ranks than examples)."""
    if _shard_length(len(examples), num_shards, index) == 0:
        return examples.select([])
    return examples.shard(num_shards=num_shards, index=index, contiguous=True)


def _shard_length(n: int, num_shards: int, index: int) -> int:
    div, mod = divmod(n, num_shards)
    return div + (index < mod)


def _canonical_stats(stats, fingerprint: str):
    """``stats`` as one contiguous Arrow table with a fingerprint derived from the manifest, so that the files
    ``save_to_disk`` writes depend on the statistics only (not on how many shards made them, nor on a random
    fingerprint in ``state.json``)."""
    import datasets

    table = stats.with_format("arrow")[:].combine_chunks()
    return datasets.Dataset(table, fingerprint=fingerprint)


def reference_cache(
    path: str | Path,
    model: nn.Module,
    examples,
    *,
    settings: Mapping[str, Any],
    recompute: bool = False,
    need_prompt_state: bool = False,
    fingerprints: tuple[str, str] | None = None,
    log: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    **compute_kwargs,
):
    """The reference statistics of ``examples``: loaded from ``path`` if it matches, else computed and saved.

    A cache at ``path`` that does not match the model, data or settings raises ValueError unless
    ``recompute``. A matching cache that lacks a column this run needs (``ref_prompt_state`` with
    ``need_prompt_state``: DRO after a cache made for another method) is rebuilt with it, manifest and
    checksums included, and says so through ``log``. ``fingerprints``: ``(model_fingerprint(model), data_fingerprint(examples))`` when the caller
    has them already. ``compute_kwargs`` go to :func:`compute_reference_stats`. Returns the stats Dataset.

    **Several processes** (``world_size > 1``; every rank calls this with the same arguments, its ``rank`` and
    a ``barrier`` that waits for all ranks): each rank computes its contiguous shard
    (``examples.shard(num_shards=world_size, index=rank, contiguous=True)``) and saves it to
    :func:`shard_directory`; after one barrier the main rank (0) concatenates the shards in order and writes
    the cache (manifest and checksums, :func:`save_reference_cache`); after a second barrier every rank loads
    it. No rank waits while another computes everything, and the files equal those of one process.
    """
    import datasets

    path = Path(path)
    if world_size > 1 and barrier is None:
        raise ValueError("reference_cache: world_size > 1 needs a barrier (e.g. accelerator.wait_for_everyone)")
    if not 0 <= rank < world_size:
        raise ValueError(f"reference_cache: rank must lie in [0, {world_size}), got {rank}")
    expected = expected_manifest(model, examples, settings=settings, fingerprints=fingerprints)
    if path.exists() and not recompute:  # every rank decides before the first barrier, so all decide alike
        stats = load_reference_cache(path, expected)  # checked: model, data, settings and every file
        if not need_prompt_state or _read_manifest(path).get("has_prompt_state"):
            log(f"reference statistics: reusing the cache {path}")
            return stats
        # a matching cache made for a method without a value: rebuilt with the prompt states (a superset)
        log(f"reference statistics: the cache {path} has no ref_prompt_state column (made for a method without a "
            "value); rebuilding it with the prompt states")
        del stats
    shard = contiguous_shard(examples, world_size, rank) if world_size > 1 else examples
    stats = compute_reference_stats(model, shard, with_prompt_state=need_prompt_state, **compute_kwargs)
    if world_size > 1:
        shards = shard_directory(path)
        own = shards / f"{rank:05d}-of-{world_size:05d}"
        if own.exists():  # left by a crashed run
            shutil.rmtree(own)
        if len(stats):  # an empty shard (more ranks than examples) is not saved
            stats.save_to_disk(str(own))
        barrier()
        if rank == 0:
            parts = [datasets.load_from_disk(str(shards / f"{r:05d}-of-{world_size:05d}")) for r in range(world_size)
                     if _shard_length(len(examples), world_size, r)]
            stats = datasets.concatenate_datasets(parts)
    if rank == 0:
        stats = _canonical_stats(stats, hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16])
        manifest = {
            **expected,
            "num_response_tokens": _num_values(stats, "ref_logsumexp"),
            "has_prompt_state": need_prompt_state,
        }
        save_reference_cache(path, stats, manifest)
        if world_size > 1:
            shutil.rmtree(shard_directory(path))
        log(f"reference statistics: computed for {len(examples)} examples ({world_size} process(es)) and saved to {path}")
    if world_size > 1:
        barrier()
    return load_reference_cache(path, expected, need_prompt_state=need_prompt_state)


def _num_values(stats, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(stats.data.column(column))).as_py() or 0)


def scatter_response_values(values, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-example lists of response-position values -> (B, L) float32, 0 off ``response_mask``.

    values: B sequences (lists/arrays), the b-th of length ``response_mask[b].sum()``; response_mask: (B, L).
    """
    flat = torch.cat([torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in values])  # (N,)
    if flat.numel() != int(response_mask.sum()):
        raise ValueError(f"reference statistics hold {flat.numel()} values but the batch has {int(response_mask.sum())} "
                         "response tokens: the cache does not belong to these examples")
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    return out.masked_scatter(response_mask.cpu(), flat)  # row-major = each row's response positions in order
