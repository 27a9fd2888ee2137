"""The reference pass split across processes (``shiq_llm.core.reference.reference_cache`` with ``world_size > 1``):
each rank computes its contiguous shard, rank 0 assembles the cache, every rank loads it, and the cache's files
are byte for byte those of one process — for ranks simulated by threads, and for 2 gloo processes launched with
torchrun through ``shiq-llm cache-ref``."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shiq_llm.core import reference as R
from shiq_llm.core.models import build_tokenizer, tiny_causal_lm
from shiq_llm.data.tokenization import tokenize_rows


def rows(n: int):
    return [{"prompt": f"what is {i} plus {i % 3}?", "completion": " it is" + " ten" * (1 + i % 3), "reward": float(i % 2)}
            for i in range(n)]


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_ranks(world: int, function) -> list:
    """``function(rank, barrier)`` in ``world`` threads (one rank each); returns the results by rank."""
    barrier = threading.Barrier(world, timeout=120)
    results, errors = [None] * world, []

    def target(rank):
        try:
            results[rank] = function(rank, barrier.wait)
        except BaseException as error:  # noqa: BLE001 — re-raised below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_pass_writes_the_one_process_cache(tmp_path, world):
    """7 examples, one sequence per forward pass (so every rank's batches are the one process's): the cache of
    ``world`` ranks (shards of 4+3, or 3+2+2 examples) has the same files, byte for byte, including the
    manifest's checksums, and every rank returns the same statistics."""
    tokenizer = build_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_heads=4, seed=3)
    examples = tokenize_rows(rows(7), tokenizer)[0]
    options = {"settings": {"precision": "fp32"}, "pad_token_id": tokenizer.pad_token_id, "batch_size": 1,
               "log": lambda message: None}
    single = R.reference_cache(tmp_path / "one", model, examples, **options)
    models = [copy.deepcopy(model) for _ in range(world)]  # one per thread: forward hooks are per model

    def rank_call(rank, barrier):
        return R.reference_cache(tmp_path / "many", models[rank], examples, rank=rank, world_size=world,
                                 barrier=barrier, **options)

    stats = run_ranks(world, rank_call)
    assert files(tmp_path / "many") == files(tmp_path / "one")
    assert all(s.to_dict() == single.to_dict() for s in stats)
    assert not R.shard_directory(tmp_path / "many").exists()  # the shards are removed once assembled
    assert json.loads((tmp_path / "many" / "manifest.json").read_text())["num_examples"] == 7
    # a second call reuses the cache on every rank (no barrier needed, nothing recomputed)
    again = run_ranks(world, lambda rank, barrier: R.reference_cache(tmp_path / "many", models[rank], examples, rank=rank,
                                                                     world_size=world, barrier=barrier, **options))
    assert all(s.to_dict() == single.to_dict() for s in again)


def test_more_ranks_than_examples_and_a_missing_barrier(tmp_path):
    tokenizer = build_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_heads=4)
    examples = tokenize_rows(rows(2), tokenizer)[0]
    options = {"settings": {}, "pad_token_id": tokenizer.pad_token_id, "batch_size": 1, "log": lambda m: None}
    single = R.reference_cache(tmp_path / "one", model, examples, need_prompt_state=True, **options)
    models = [copy.deepcopy(model) for _ in range(3)]
    stats = run_ranks(3, lambda rank, barrier: R.reference_cache(tmp_path / "many", models[rank], examples, rank=rank,
                                                                 world_size=3, barrier=barrier, need_prompt_state=True,
                                                                 **options))
    assert files(tmp_path / "many") == files(tmp_path / "one") and stats[2].to_dict() == single.to_dict()
    with pytest.raises(ValueError, match="world_size > 1 needs a barrier"):
        R.reference_cache(tmp_path / "x", model, examples, rank=0, world_size=2, **options)


def test_two_gloo_processes_write_the_one_process_cache(tmp_path):
    """``torchrun --nproc_per_node 2 -m shiq_llm.cli cache-ref`` (gloo on the CPU) and the same command in one
    process write the same cache, byte for byte (DRO's prompt states included). 8 rows, ``ref_batch_size`` 2:
    the shards of 4 rows make the same batches as one process."""
    from shiq_llm import cli

    tokenizer = build_tokenizer()
    tiny_causal_lm(tokenizer, hidden_size=32, num_heads=4, seed=5).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(8)))
    args = ["cache-ref", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(data), "--loss_type",
            "dro", "--ref_batch_size", "2", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none"]
    assert cli.main(args + ["--output_dir", str(tmp_path / "one")]) == 0
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "shiq_llm.cli", *args, "--output_dir", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2 process(es))" in done.stderr  # the sharded pass ran
    one, two = files(tmp_path / "one" / "reference"), files(tmp_path / "two" / "reference")
    assert "data/data-00000-of-00001.arrow" in one and two == one
    assert json.loads(one["manifest.json"])["has_prompt_state"] is True
