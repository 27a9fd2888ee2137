"""``shiq-llm score``: label rows with rewards, resumably.

    shiq-llm score --rows rows.jsonl --out labelled.jsonl --reward my_module:reward
    shiq-llm score --rows rows.jsonl --out labelled.jsonl --reward-model OpenAssistant/reward-model-deberta-v3-base

Input: a ``.jsonl`` file of single-turn rows ``{"prompt", "completion", …}`` (e.g. ``shiq-llm generate``'s
output) or of multi-turn rows ``{"messages", …}``. Output: the same rows, in the same order, every field kept,
with ``"reward"`` (single-turn) or ``"rewards"`` (multi-turn, one per assistant message) set — the canonical
rows ``shiq-llm train`` reads (which refuses an empty completion — a sample that was EOS at once — so
``skip_empty`` leaves those rows out, counted in the log). The rewards come from ``shiq_llm.generation.rewards``: a callable (``--reward
module:function``; per row or batched) or a sequence-classification reward model (``--reward-model``).

A reward that is not a finite number, or a callable that raises, stops the run with an error naming the row
(its 0-based index among the file's rows and the start of its prompt); the shard being scored is not written,
the shards already written are kept, and OUT is not written. Like ``generate``, the rows are scored in shards
of ``shard_size`` rows written atomically (``shiq_llm.storage.shards``): a killed run re-run with the same command
continues where it stopped, and OUT appears atomically at the end.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from shiq_toy.options import option

__all__ = ["ScoreConfig", "rows_form", "score_shard", "score_rows", "check_score_config"]


@dataclass
class ScoreConfig:
    """Arguments of ``shiq-llm score`` (``--help`` prints the same)."""

    rows: str = option(help='Input .jsonl file of {prompt, completion} or {messages} rows.', aliases=("dataset_name",), path="rows")
    out: str = option(help="Output .jsonl file: the rows with 'reward' (or 'rewards') set; shards are kept in "
                      'OUT.parts/ until the end.', aliases=("output_dir",), path="out_file")
    reward: str | None = option(None, "A Python callable 'module:function' (or 'synthetic'), per row or batched "
                                '(shiq_llm.generation.rewards).')
    reward_model: str | None = option(None, 'An AutoModelForSequenceClassification reward model (hub name or path) '
                                      'with one label: its logit is the reward.')
    batch_size: int = option(16, 'Rows per call of a batched callable or per forward pass of the reward model.')
    device: str = option("auto", "torch device of the reward model ('auto': cuda when available, else cpu).")
    dtype: str = option("auto", 'Reward model dtype: auto (bfloat16 on a GPU that supports it, else float32), '
                        'float32, bfloat16, float16.')
    shard_size: int = option(1024, 'Rows per shard (the unit of resumption).')
    skip_empty: bool = option(False, 'Leave out single-turn rows whose completion is empty or blank (a sample that '
                              'was EOS at once): shiq-llm train refuses them. Counted in the log.')
    overwrite: bool = option(False, 'Replace an existing OUT (and discard unfinished shards of another run).')
    progress: bool = option(True, 'Show a progress bar.')


def rows_form(rows: Sequence[dict], *, what: str = "--rows") -> str:
    """``"multi"`` when every row has ``messages``, ``"single"`` when every row has ``prompt`` and a string
    ``completion``; ValueError naming the first row that breaks the pattern or has a bad field."""
    from shiq_llm.data.prompts import prompt_of_row

    form = "multi" if "messages" in rows[0] else "single"
    for i, row in enumerate(rows):
        if form == "multi":
            if "messages" not in row:
                raise ValueError(f"{what}: row {i} has no 'messages' field, but row 0 is a multi-turn row")
            prompt_of_row(row, i, field="messages", where=f"{what}: ")
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in row["messages"]):
                raise ValueError(f"{what}: row {i}: field 'messages' has no assistant message to reward")
        else:
            if "prompt" not in row or "completion" not in row:
                raise ValueError(f"{what}: row {i} needs 'prompt' and 'completion' fields (or 'messages'); "
                                 f"fields: {sorted(row)}")
            prompt_of_row(row, i, field="prompt", where=f"{what}: ")
            if not isinstance(row["completion"], str):
                raise ValueError(f"{what}: row {i}: field 'completion' must be a string, "
                                 f"got {type(row['completion']).__name__}")
    return form


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_score_config(config: ScoreConfig, *, has_scorer: bool = False) -> None:
    """ValueError naming the first bad option of ``config`` (before any work)."""
    for name in ("batch_size", "shard_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if not has_scorer and (config.reward is None) == (config.reward_model is None):
        raise ValueError("give exactly one of --reward module:function and --reward-model RM")
    if not str(config.out).endswith(".jsonl"):
        raise ValueError(f"--out must be a .jsonl file, got {config.out!r}")
    if Path(config.out).resolve() == Path(config.rows).resolve():
        raise ValueError("--out must differ from --rows")


def score_shard(rows: Sequence[dict], scorer, *, form: str, first_row: int, batch_size: int,
                skip_empty: bool = False) -> list[dict]:
    """The rows of one shard with their rewards (``first_row``: index of ``rows[0]`` in the file); with
    ``skip_empty``, single-turn rows with a blank completion are left out (and not scored)."""
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        at = first_row + start
        if skip_empty and form == "single":
            part = [r for r in part if r["completion"].strip()]
            if not part:
                continue
        if form == "multi":
            values = scorer.score_turns([r["messages"] for r in part], first_row=at)
            out += [{**r, "rewards": v} for r, v in zip(part, values)]
        else:
            values = scorer.score([r["prompt"] for r in part], [r["completion"] for r in part], first_row=at)
            out += [{**r, "reward": v} for r, v in zip(part, values)]
    return out


def score_rows(config: ScoreConfig, *, scorer=None, on_shard: Callable[[int, int], None] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``shiq-llm score`` (module docstring); returns a summary (out, rows, seconds, rows/s).

    scorer: an already built ``shiq_llm.generation.rewards`` scorer instead of the one ``config`` names.
    on_shard: called as ``on_shard(start, stop)`` after each shard is written.
    """
    from tqdm.auto import tqdm

    from shiq_llm.core.models import resolve_device, resolve_dtype
    from shiq_llm.generation.rewards import load_reward
    from shiq_llm.storage.jsonl import read_jsonl
    from shiq_llm.storage.shards import ShardedOutput

    check_score_config(config, has_scorer=scorer is not None)
    rows = read_jsonl(config.rows, what="--rows")
    form = rows_form(rows)
    device = resolve_device(config.device)
    dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
    manifest = {"command": "score", "rows": str(config.rows), "rows_sha256": _file_sha256(config.rows),
                "reward": config.reward, "reward_model": config.reward_model,
                "dtype": dtype if config.reward_model is not None else None, "skip_empty": config.skip_empty}
    output = ShardedOutput(config.out, manifest, total=len(rows), shard_size=config.shard_size,
                           overwrite=config.overwrite)
    pending = output.start()
    started = time.perf_counter()
    scored = 0
    if pending:
        if scorer is None:
            scorer = load_reward(config.reward, config.reward_model, device=device, dtype=config.dtype,
                                 batch_size=config.batch_size)
        done = len(rows) - sum(stop - start for start, stop in pending)
        if done:
            log(f"resuming: {done} of {len(rows)} rows already scored in {output.parts}")
        bar = tqdm(total=len(rows), initial=done, unit="row", desc="score", disable=not config.progress)
        for start, stop in pending:
            labelled = score_shard(rows[start:stop], scorer, form=form, first_row=start, batch_size=config.batch_size,
                                   skip_empty=config.skip_empty)
            output.write(start, stop, labelled)
            scored += len(labelled)
            bar.update(stop - start)
            if on_shard is not None:
                on_shard(start, stop)
        bar.close()
    count = output.finish()
    seconds = time.perf_counter() - started
    skipped = f" ({len(rows) - count} row(s) with an empty completion left out)" if config.skip_empty else ""
    log(f"wrote {count} labelled rows to {output.out}{skipped}; scored {scored} now in {seconds:.1f} s")
    return {"out": str(output.out), "rows": count, "scored_now": scored, "seconds": seconds,
            "rows_per_s": scored / max(seconds, 1e-9)}
