"""Held-out prompts and adapter options on ``shiq-llm train`` and ``shiq-llm sweep``: ``--data_format_options``
from the command line and YAML, and the refusal (or the warning, with counts) when evaluation prompts also
occur in the training data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from shiq_llm.train.config import DataArguments, parse_train_args

FIXTURES = Path(__file__).parent / "fixtures"
TINY = Path(__file__).resolve().parents[1] / "configs" / "shiq_tiny.yaml"


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": f" {k}", "reward": float(k)}) + "\n"
                            for p in prompts for k in range(2)))
    return path


# --------------------------------------------------------------------------------------------------
# --data_format_options
# --------------------------------------------------------------------------------------------------


def test_data_format_options_from_the_command_line_and_from_yaml(tmp_path):
    _, data, _ = parse_train_args(["--data_format", "ultrafeedback", "--data_format_options", "score=fine-grained_score",
                                   "as_messages=false"])
    assert data.format_options() == {"score": "fine-grained_score", "as_messages": False}
    _, data, _ = parse_train_args(["--data_format", "hh", "--data_format_options", '{"chosen_reward": 2, "rejected_reward": -1}'])
    assert data.format_options() == {"chosen_reward": 2, "rejected_reward": -1}
    config = tmp_path / "c.yaml"
    config.write_text("data_format: ultrafeedback\ndata_format_options: {score: helpfulness}\n")
    _, data, _ = parse_train_args(["--config", str(config)])
    assert data.format_options() == {"score": "helpfulness"}
    config.write_text("data_format: ultrafeedback\ndata_format_options: [score=honesty]\n")
    _, data, _ = parse_train_args(["--config", str(config)])
    assert data.format_options() == {"score": "honesty"}
    assert DataArguments(data_format="hh", data_format_options={"chosen_reward": 3}).format_options() == {"chosen_reward": 3}


def test_bad_data_format_options_are_named():
    with pytest.raises(ValueError, match=r"option 'data_format_options' must be KEY=VALUE or a JSON object, got 'score'"):
        parse_train_args(["--data_format", "ultrafeedback", "--data_format_options", "score"])
    with pytest.raises(ValueError, match=r"option 'data_format_options' \(\{'score': 'x'\}\) needs a data_format"):
        DataArguments(data_format_options=["score=x"])
    with pytest.raises(ValueError, match=r"option 'eval_leak' must be one of \['error', 'warn'\]"):
        DataArguments(eval_leak="ignore")


def test_train_hands_the_options_to_the_adapter(tmp_path):
    """The option reaches the adapter: a score UltraFeedback does not have is the adapter's own error."""
    from shiq_llm.train.run import train_run

    model, data, args = parse_train_args(["--config", str(TINY), "--dataset_name", str(FIXTURES / "ultrafeedback.jsonl"),
                                          "--data_format", "ultrafeedback", "--data_format_options", "score=style",
                                          "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"ultrafeedback: score must be one of .*got 'style'"):
        train_run(model, data, args)


# --------------------------------------------------------------------------------------------------
# shiq-llm train: eval_dataset_name against the training rows
# --------------------------------------------------------------------------------------------------


def test_train_refuses_evaluation_rows_whose_prompts_it_trains_on(tmp_path, caplog):
    from shiq_llm import cli

    train = write_jsonl(tmp_path / "train.jsonl", ["count up from 1:", "count up from 2:", "repeat 3:"])
    held = write_jsonl(tmp_path / "eval.jsonl", ["count up  from 2:", "repeat 4:"])  # one leaks up to whitespace
    argv = ["train", "--config", str(TINY), "--dataset_name", str(train), "--eval_dataset_name", str(held),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--eval_strategy", "steps", "--eval_steps", "1", "--disable_tqdm", "true"]
    assert cli.main(argv) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training
    from shiq_llm.data.rows import load_rows
    from shiq_llm.train.run import check_eval_rows_held_out

    with pytest.raises(ValueError, match=r"^1 of 2 evaluation \(eval_dataset_name\) prompts \(50.0 %\) also occur in "
                                         r"the training data \(3 distinct prompts\), e.g. 'count up  from 2:'; .*"
                                         r"pass --eval_leak warn$"):
        check_eval_rows_held_out(load_rows(str(held)), load_rows(str(train)))
    with caplog.at_level(logging.WARNING, logger="shiq_llm"):
        assert cli.main(argv + ["--eval_leak", "warn"]) == 0
    assert "1 of 2 evaluation (eval_dataset_name) prompts (50.0 %) also occur" in caplog.text
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in line for line in lines)  # trained and evaluated
    run_args = yaml.safe_load((tmp_path / "run" / "run_args.yaml").read_text())
    assert run_args["eval_leak"] == "warn" and run_args["data_format_options"] is None


# --------------------------------------------------------------------------------------------------
# shiq-llm sweep: its evaluation prompts against its training data
# --------------------------------------------------------------------------------------------------


def test_sweep_refuses_evaluation_prompts_of_its_training_data(tmp_path, caplog):
    from shiq_llm.experiments.sweep import SweepConfig, check_sweep_held_out

    train = write_jsonl(tmp_path / "train.jsonl", ["repeat 1:", "repeat 2:", "repeat 3:", "repeat 4:"])
    prompts = tmp_path / "eval.txt"
    prompts.write_text("repeat 1:\nrepeat  2:\nrepeat 9:\n")
    config = SweepConfig(out=str(tmp_path / "s"), model="m", train_data=str(train), algos=["shiq"], betas=[0.1],
                         eval_prompts=str(prompts))
    with pytest.raises(ValueError, match=r"^2 of 3 sweep evaluation prompts \(66.7 %\) also occur in the training data "
                                         r"\(4 distinct prompts\), e.g. 'repeat 1:'; .*set leak: warn$"):
        check_sweep_held_out(config)
    config.leak = "warn"
    with caplog.at_level(logging.WARNING, logger="shiq_llm"):
        assert check_sweep_held_out(config) == ["repeat 1:", "repeat  2:", "repeat 9:"]
    assert "2 of 3 sweep evaluation prompts (66.7 %)" in caplog.text
    # adapters on both sides: UltraFeedback rows (options included) against their own instructions
    uf = FIXTURES / "ultrafeedback.jsonl"
    config = SweepConfig(out=str(tmp_path / "s"), model="m", train_data=str(uf), data_format="ultrafeedback",
                         data_format_options={"score": "fine-grained_score"}, algos=["shiq"], betas=[0.1],
                         eval_prompts=str(uf), eval_format="ultrafeedback")
    with pytest.raises(ValueError, match=r"^2 of 2 sweep evaluation prompts \(100.0 %\)"):
        check_sweep_held_out(config)


def test_sweep_file_keys_are_checked(tmp_path):
    from shiq_llm.experiments.sweep import load_sweep_config

    path = tmp_path / "s.yaml"
    base = "out: o\nmodel: m\ntrain_data: d\nalgos: [shiq]\nbetas: [0.1]\n"
    for extra, message in [("leak: ignore\n", "leak must be one of"),
                           ("reward: synthetic\nreward_model: rm\n", "either reward or reward_model"),
                           ("model_options: {lora_rank: 4}\n", "model_options.lora_rank is not a model option"),
                           ("evaluation: {samples: 4}\n", "evaluation.samples is not an evaluation option")]:
        path.write_text(base + extra)
        with pytest.raises(ValueError, match=message):
            load_sweep_config(path)
