"""The one command-line dialect (``shiq_toy.options``): precedence of defaults, ``--quick``, ``--config`` and the
command line; both spellings and aliases; typed YAML values; lists and mappings; paths; the one callable resolver."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from shiq_toy.options import Command, OptionError, check_path, coerce, load_callable, option, resolve_options


@dataclass
class Args:
    out: Path = option(Path("figures"), "output folder", aliases=("output_dir",), path="out_dir")
    steps: int = option(400, "updates")
    lr: float = option(0.1, "learning rate", aliases=("learning_rate",))
    betas: tuple[float, ...] = option((0.1, 0.3), "β values")
    methods: tuple[str, ...] = option(("shiq",), "methods", choices=("shiq", "dpo"))
    train: dict = option(default_factory=dict, help="options of every run")
    progress: bool = option(True, "progress bars")
    quick: bool = option(False, "a small budget")


COMMAND = Command("toy", (Args,), run=lambda args: 0, quick={"steps": 20, "betas": (0.5,)})


def resolve(argv):
    [args] = resolve_options(COMMAND, argv, prog="toy")
    return args


def test_defaults_then_quick_then_the_file_then_the_command_line(tmp_path):
    assert resolve([]) == Args(quick=False)
    assert resolve(["--quick"]) == Args(steps=20, betas=(0.5,))  # the preset is applied once, here
    config = tmp_path / "c.yaml"
    config.write_text("steps: 30\nlearning-rate: 1e-3\ntrain: {max_steps: 5, seed: 1}\n")
    args = resolve(["--config", str(config), "--quick"])
    assert (args.steps, args.lr, args.betas, args.train) == (30, 1e-3, (0.5,), {"max_steps": 5, "seed": 1})
    args = resolve(["--config", str(config), "--quick", "--steps", "7", "--train", "seed=2", "--no-progress"])
    assert (args.steps, args.train, args.progress) == (7, {"max_steps": 5, "seed": 2}, False)


def test_both_spellings_aliases_and_lists():
    args = resolve(["--output-dir", "o", "--learning_rate", "0.5", "--betas", "0.1,0.2", "0.4", "--methods", "dpo"])
    assert (args.out, args.lr, args.betas, args.methods) == (Path("o"), 0.5, (0.1, 0.2, 0.4), ("dpo",))
    assert resolve(["--out", "p", "--lr", "2"]).out == Path("p")


@pytest.mark.parametrize("text, message", [
    ("betas: 0.1\n", "key 'betas' must be a list of numbers, got 0.1"),
    ("steps: ten\n", "key 'steps' must be an integer, got 'ten'"),
    ("train: [1, 2]\n", "key 'train' must be a mapping"),
    ("methods: [ppo]\n", "must be one of ['shiq', 'dpo'], got 'ppo'"),
    ("progress: 3\n", "key 'progress' must be true or false"),
    ("stepz: 3\n", "unknown key 'stepz'"),
])
def test_yaml_values_are_typed_and_named_with_the_file(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(OptionError) as error:
        resolve(["--config", str(config)])
    assert message in str(error.value) and str(config) in str(error.value)


def test_coerce_reads_yaml_numbers_written_as_strings_and_refuses_silent_conversions():
    assert coerce("1e-5", float, "x") == 1e-5 and coerce(3, float, "x") == 3.0 and coerce(4.0, int, "x") == 4
    for value, hint in [(True, int), (0.5, int), ([1], int), ("a", float), ({"a": 1}, str), (1, bool)]:
        with pytest.raises(OptionError, match="x must be"):
            coerce(value, hint, "x")


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OptionError, match="is a file"):
        resolve(["--out", str(tmp_path / "file")])
    with pytest.raises(OptionError, match="is a file, not a folder"):
        resolve(["--out", str(tmp_path / "file" / "below")])
    with pytest.raises(OptionError, match="exists; give --overwrite"):
        check_path("out_file", tmp_path / "file", "--out", overwrite=False)
    check_path("out_file", tmp_path / "file", "--out", overwrite=True)
    (tmp_path / "file.parts").mkdir()  # a resumable job killed after OUT was swapped in: it may finish
    check_path("out_file", tmp_path / "file", "--out", overwrite=False)
    assert (tmp_path / "file").read_text() == "keep"


def test_rows_files_name_the_file_and_the_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(OptionError, match=r"--rows .*rows.jsonl: line 3: not UTF-8"):
        check_path("rows", rows, "--rows")
    rows.write_text(json.dumps({"prompt": "a"}) + "\n{oops\n")
    with pytest.raises(OptionError, match=r"rows.jsonl: line 2: not valid JSON"):
        check_path("rows", rows, "--rows")
    check_path("data", "HuggingFaceH4/ultrafeedback_binarized", "--prompts")  # a hub name is not a local file


def test_one_resolver_finds_modules_of_the_current_folder_and_files(tmp_path, monkeypatch):
    """`score --reward mymod:fn` with mymod.py in the current folder, and `--reward ./rw.py:fn` (issue #16 item 6)."""
    from shiq_llm.generation.rewards import load_reward_fn

    (tmp_path / "mymod_for_options_test.py").write_text("def fn(prompt, completion):\n    return 2.0\n")
    (tmp_path / "rw.py").write_text("def fn(prompt, completion):\n    return 3.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("mymod_for_options_test:fn")("p", "c") == 2.0
    assert load_reward_fn("./rw.py:fn")("p", "c") == 3.0
    assert load_callable("rw.py:fn")("p", "c") == 3.0
    with pytest.raises(ValueError, match="--reward ./missing.py:fn: file not found"):
        load_reward_fn("./missing.py:fn")


def test_a_causal_lm_is_not_a_reward_model(tmp_path):
    from shiq_llm.generation.rewards import check_reward_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not a sequence-classification model .LlamaForCausalLM."):
        check_reward_model(str(tmp_path))
