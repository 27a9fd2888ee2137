"""``shiq-llm train`` / ``cache-ref`` and TrainConfig: YAML + overrides, every option documented, smoke runs,
and bad input reported as one clear line with a non-zero exit status (nothing already written is lost)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from shiq_llm import cli
from shiq_llm.train.config import TRAIN_ARGUMENT_CLASSES, ShiQConfig, parse_train_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "shiq_tiny.yaml"


def rows(n_prompts: int = 3):
    return [
        {"prompt": f"what is {p} plus {p}?", "completion": f"it is {2 * p + k}", "reward": float(k == 0)}
        for p in range(n_prompts)
        for k in range(2)
    ]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # json writes NaN / Infinity for non-finite floats
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def train_args(tmp_path: Path, data: Path, out: str = "run", *extra):
    return ["train", "--config", TINY, "--dataset_name", data, "--output_dir", tmp_path / out, "--disable_tqdm", "true",
            "--per_device_train_batch_size", "6", "--max_steps", "3", "--logging_steps", "1", *extra]


# --------------------------------------------------------------------------------------------------
# Options: YAML, then the command line (HfArgumentParser over ModelArguments, DataArguments, ShiQConfig)
# --------------------------------------------------------------------------------------------------


def test_yaml_then_overrides_in_both_spellings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss_type: dpo\nbeta: 1\nlearning_rate: 1e-4\nmax-steps: 7\nref_cache: null\n"
                    "lora_target_modules: q_proj,v_proj\noutput_dir: x\n")
    model_args, data_args, args = parse_train_args(["--config", str(path), "--beta", "0.25", "--learning-rate", "2e-4",
                                                    "--dataset_name", "d.jsonl"])
    assert (args.loss_type, args.beta, args.learning_rate, args.max_steps, args.output_dir) == ("dpo", 0.25, 2e-4, 7, "x")
    assert isinstance(args.beta, float) and args.ref_cache is None and data_args.dataset_name == "d.jsonl"
    assert model_args.lora_target_modules == "q_proj,v_proj"
    assert args.per_device_train_batch_size == ShiQConfig(output_dir="x").per_device_train_batch_size  # defaults kept


def test_example_configs_are_valid():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths, f"no example config in {CONFIGS}"
    for path in paths:
        if "algos:" in path.read_text():  # a sweep file (shiq-llm sweep --config)
            from shiq_llm.experiments.sweep import load_sweep_config

            config = load_sweep_config(path)
            assert config.algos and config.betas and config.train_data and config.model
            continue
        model_args, data_args, args = parse_train_args(["--config", str(path), "--use_cpu", "true"])
        assert data_args.dataset_name and args.output_dir and model_args.model_name_or_path


@pytest.mark.parametrize(
    "text, message",
    [
        ("loss_type: shiq\nbta: 0.1\n", r"config file .*bad.yaml: unknown key 'bta'"),
        ("- loss_type\n", "must hold a mapping"),
        ("loss_type: [shiq\n", "cannot read config file"),
    ],
)
def test_bad_yaml_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_train_args(["--config", str(path)])


@pytest.mark.parametrize(
    "argv, message",
    [(["--beta", "0"], "'beta' must be a finite number > 0"), (["--gamma", "1.5"], "'gamma' must lie in"),
     (["--loss_type", "dpo", "--gamma", "0.9"], "'gamma' must be 1 for the sequence-level method 'dpo'"),
     (["--chunk_size", "0"], "'chunk_size' must be >= 1"), (["--bta", "0.1"], "unknown option '--bta'")],
)
def test_bad_values_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_train_args(["--output_dir", "o", *argv])


def test_help_of_every_command_renders_and_documents_every_option(capsys):
    """--help of each subcommand renders (no format error from a stray '%'); train's lists every field."""
    from dataclasses import fields

    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls in TRAIN_ARGUMENT_CLASSES:
        for f in fields(cls):
            if f.init:
                assert f"--{f.name}" in text, f.name
    assert "--config FILE" in text and "KL regularisation strength beta" in text
    assert cli.main(["cache-ref", "--help"]) == 0 and "--verify" in capsys.readouterr().out
    for name, command in cli.commands().items():  # every command's --help lists every option with its default
        assert cli.main([*name.split(), "--help"]) == 0, name
        text = " ".join(capsys.readouterr().out.split())
        assert text.startswith(f"usage: shiq-llm {name}"), name
        for cls in command.options:
            for f in fields(cls):
                if f.init:
                    assert f"--{f.name}" in text, (name, f.name)
        shown = text.count("(default: ") + text.count("(required)")
        assert shown >= sum(1 for cls in command.options for f in fields(cls) if f.init), name
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main([]) == 2


# --------------------------------------------------------------------------------------------------
# Smoke runs
# --------------------------------------------------------------------------------------------------


def test_train_then_cache_ref_reuse_and_verify(tmp_path, capsys, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "rows.jsonl", rows())
    cache = tmp_path / "shared_reference"
    status, out, err = run(capsys, "cache-ref", "--config", TINY, "--dataset_name", data, "--output_dir",
                           tmp_path / "run", "--ref_cache", cache, "--disable_tqdm", "true")
    assert status == 0, err
    assert (cache / "manifest.json").is_file()
    status, out, _ = run(capsys, "cache-ref", "--config", TINY, "--dataset_name", data, "--output_dir",
                         tmp_path / "run", "--ref_cache", cache, "--verify")
    assert status == 0 and "matches the model and data" in out

    with caplog.at_level(logging.INFO, logger="shiq_llm"):  # (the demo quiets this logger for the session)
        status, out, err = run(capsys, *train_args(tmp_path, data, "run", "--ref-cache", cache))  # the dashed spelling
    assert status == 0, err
    assert "reusing the cache" in caplog.text  # computed once, by cache-ref
    lines = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(math.isfinite(line["loss"]) for line in lines)
    final = tmp_path / "run" / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("what is 1 plus 1?", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    again = parse_train_args(["--config", str(tmp_path / "run" / "run_args.yaml")])  # the run's options, read back
    assert again[2].max_steps == 3 and again[1].dataset_name == str(data) and again[0].model_name_or_path == "tiny-llama"

    import struct

    import datasets

    value = datasets.load_from_disk(str(cache / "data"))[0]["ref_logsumexp"][0]
    (arrow,) = (cache / "data").glob("*.arrow")  # one cached statistic altered in its last bit: --verify says so
    data_bytes = bytearray(arrow.read_bytes())
    at = data_bytes.find(struct.pack("<f", value))
    assert at >= 0
    data_bytes[at] ^= 0x01
    arrow.write_bytes(bytes(data_bytes))
    status, _, err = run(capsys, "cache-ref", "--config", TINY, "--dataset_name", data, "--output_dir",
                         tmp_path / "run", "--ref_cache", cache, "--verify")
    assert status == 1 and f"{arrow} does not match its sha256" in err, err


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr, exit status 1
# --------------------------------------------------------------------------------------------------


def _bad(rows_, index: int, **fields):
    rows_ = [dict(r) for r in rows_]
    rows_[index].update(fields)
    return rows_


@pytest.mark.parametrize(
    "records, message",
    [
        (_bad(rows(), 3, reward=float("nan")), "row 3: field 'reward' must be finite, got nan"),
        (_bad(rows(), 2, reward=float("inf")), "row 2: field 'reward' must be finite, got inf"),
        (_bad(rows(), 4, completion=""), "row 4: field 'completion' is empty"),
        ([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows()], r"missing column\(s\) \['reward'\]"),
    ],
)
def test_bad_rows_print_the_row_and_field(tmp_path, capsys, records, message):
    import re

    data = write_jsonl(tmp_path / "rows.jsonl", records)
    status, _, err = run(capsys, *train_args(tmp_path, data))
    assert status == 1
    assert re.search(message, err), err
    assert err.strip().splitlines()[-1].startswith("shiq-llm: error: ") and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_usable_pair_for_dpo_or_copg(tmp_path, capsys):
    distinct = [{"prompt": f"prompt {i}", "completion": "yes", "reward": float(i)} for i in range(4)]
    data = write_jsonl(tmp_path / "rows.jsonl", distinct)
    for algo in ("dpo", "copg"):
        status, _, err = run(capsys, *train_args(tmp_path, data, f"run_{algo}", "--loss_type", algo))
        assert status == 1 and "no usable pair for the pair methods" in err, err


def test_long_prompts_are_truncated_and_counted(tmp_path, capsys, caplog):
    long_prompt = "tell me " + "very " * 60 + "much"
    records = rows() + [{"prompt": long_prompt, "completion": "ok", "reward": 1.0}, {"prompt": long_prompt + "!", "completion": "no", "reward": 0.0}]
    data = write_jsonl(tmp_path / "rows.jsonl", records)
    with caplog.at_level(logging.INFO, logger="shiq_llm"):
        status, _, err = run(capsys, *train_args(tmp_path, data, "run", "--max_length", "32", "--max_steps", "1"))
    assert status == 0, err
    report = json.loads((tmp_path / "run" / "data_report_train.json").read_text())
    assert report["prompt_truncated"] == 2 and report["kept"] == len(records)
    assert "prompt_truncated=2" in caplog.text


def test_tokenizer_that_does_not_fit_the_model(tmp_path, capsys):
    from shiq_llm.core.models import build_tokenizer, tiny_causal_lm

    tokenizer = build_tokenizer()
    small = tiny_causal_lm(64, hidden_size=16, num_heads=2)  # 64 embedding rows < the tokenizer's ids
    small.save_pretrained(tmp_path / "small_model")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    data = write_jsonl(tmp_path / "rows.jsonl", rows())
    status, _, err = run(capsys, *train_args(tmp_path, data, "run", "--model_name_or_path", tmp_path / "small_model",
                                             "--tokenizer_name_or_path", tmp_path / "tokenizer"))
    assert status == 1
    assert f"tokenizer has {len(tokenizer)} tokens but the model's embedding has 64 rows" in err


def test_reference_cache_of_other_data_is_refused_by_name(tmp_path, capsys):
    cache = tmp_path / "ref"
    first = write_jsonl(tmp_path / "a.jsonl", rows())
    second = write_jsonl(tmp_path / "b.jsonl", rows(4))
    assert run(capsys, *train_args(tmp_path, first, "a", "--ref_cache", cache, "--max_steps", "1"))[0] == 0
    status, _, err = run(capsys, *train_args(tmp_path, second, "b", "--ref_cache", cache, "--max_steps", "1"))
    assert status == 1
    assert f"reference cache {cache} does not match the tokenised data" in err and "--recompute-ref" in err
    status, _, err = run(capsys, *train_args(tmp_path, second, "b", "--ref_cache", cache, "--max_steps", "1", "--recompute-ref"))
    assert status == 0, err


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", rows())
    assert run(capsys, *train_args(tmp_path, data, "run", "--max_steps", "1"))[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    status, _, err = run(capsys, *train_args(tmp_path, data, "run", "--max_steps", "1"))
    assert status == 1 and "holds an earlier run" in err and "--overwrite_output_dir" in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    status, _, err = run(capsys, *train_args(tmp_path, data, "run", "--max_steps", "2", "--overwrite_output_dir", "true"))
    assert status == 0, err
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2]


def test_bad_command_line_exits_2(capsys):
    assert cli.main(["train", "--loss_type", "ppo"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'ppo'" in err and len(err.strip().splitlines()) == 1


def test_distributed_launch_on_two_cpu_processes(tmp_path):
    """``torchrun`` with 2 gloo processes (accelerate's MULTI_CPU): the batches are sharded (each step consumes
    2 × batch_size items), the reference is computed once, every rank's RNG state is checkpointed, one final
    model is written."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "rows.jsonl", rows())  # 6 examples
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "shiq_llm.cli",
               "train", "--config", str(TINY), "--dataset_name", str(data), "--output_dir", str(tmp_path / "run"),
               "--per_device_train_batch_size", "1", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2",
               "--disable_tqdm", "true", "--use_cpu", "true"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 steps") == 1  # printed by the main process only
    lines = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [line["epoch"] for line in lines] == [pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4)]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert json.loads((checkpoint / "shiq_state.json").read_text())["num_processes"] == 2
    assert (checkpoint / "manifest.json").is_file()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
