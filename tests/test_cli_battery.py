"""The bad-input battery of every ``shiq-llm`` and ``shiq-toy`` command (issue #16).

The cases are generated from the commands' option dataclasses (``shiq_llm.cli.commands()``,
``shiq_toy.cli.commands()``): a value of the wrong type for every typed option, on the command line and in a
``--config`` YAML file; a bad choice for every option with choices; a bad YAML file, an unknown key or option; and,
per command, output paths that cannot be used (under a file, a file for a folder, a folder for a file, an existing
result without ``--overwrite``), input rows that are missing, not UTF-8, not JSON, not objects or empty, reward
callables and reward models that cannot serve, experiment data of the wrong row form, ``--quick`` with an invalid
explicit value. Each case runs in-process through the CLI's ``main(argv)`` and asserts: a non-zero status, no
traceback, exactly one error line naming the option / key / file / row, and nothing created or changed in the
workspace (no partial output, nothing saved lost). Every case fails in the option checks, before any model is
loaded, so the whole battery takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from shiq_llm.cli import commands as llm_commands
from shiq_llm.cli import main as llm_main
from shiq_toy.cli import commands as toy_commands
from shiq_toy.cli import main as toy_main

MAINS = {"shiq-llm": llm_main, "shiq-toy": toy_main}
COMMANDS = {"shiq-llm": llm_commands(), "shiq-toy": toy_commands()}
#: TrainingArguments has ~150 options: the battery types the ShiQ ones and these.
TRAINING_ARGUMENTS = ("learning_rate", "max_steps", "per_device_train_batch_size", "seed", "bf16", "logging_steps",
                      "num_train_epochs", "gradient_accumulation_steps", "warmup_steps", "save_steps")
SINGLE = [{"prompt": "count up from 3:", "completion": " 4 5 6 7", "reward": 1.0},
          {"prompt": "count up from 8:", "completion": " 9 1", "reward": 0.2}]
MULTI = [{"messages": [{"role": "user", "content": "compute 1 +2"}, {"role": "assistant", "content": "calc(1+2)"}],
          "rewards": [1.0]}]

#: Arguments with which each command gets past its required options (the paths are made by ``workspace``).
VALID = {
    ("shiq-llm", "train"): ["--dataset_name", "{ws}/rows.jsonl", "--output_dir", "{ws}/new"],
    ("shiq-llm", "cache-ref"): ["--dataset_name", "{ws}/rows.jsonl", "--output_dir", "{ws}/new"],
    ("shiq-llm", "make-data"): ["--out", "{ws}/new"],
    ("shiq-llm", "evaluate"): ["--model", "m", "--ref", "r", "--out", "{ws}/new/report.json"],
    ("shiq-llm", "demo"): ["--out", "{ws}/new"],
    ("shiq-llm", "sweep"): ["--config", "{ws}/sweep.yaml", "--out", "{ws}/new"],
    ("shiq-llm", "generate"): ["--model", "m", "--prompts", "synthetic", "--out", "{ws}/new/rows.jsonl"],
    ("shiq-llm", "score"): ["--rows", "{ws}/rows.jsonl", "--reward", "shiq_llm.tasks.synthetic:reward", "--out",
                            "{ws}/new/labelled.jsonl"],
    ("shiq-llm", "make-multiturn-data"): ["--out", "{ws}/new"],
    ("shiq-llm", "evaluate-multiturn"): ["--model", "m", "--ref", "r", "--out", "{ws}/new/report.json"],
    ("shiq-llm", "experiment multiturn"): ["--out", "{ws}/new"],
    ("shiq-llm", "experiment ablation"): ["--out", "{ws}/new"],
    ("shiq-llm", "experiment misspecified"): ["--out", "{ws}/new"],
    ("shiq-llm", "experiment compare"): ["--out", "{ws}/new"],
    ("shiq-toy", "bandit"): ["--out", "{ws}/new"],
    ("shiq-toy", "tree"): ["--out", "{ws}/new"],
    ("shiq-toy", "gym"): ["--out", "{ws}/new"],
    ("shiq-toy", "online"): ["--out", "{ws}/new"],
    ("shiq-toy", "misspecified"): ["--out", "{ws}/new"],
    ("shiq-toy", "solve-tree"): [],
    ("shiq-toy", "verify"): ["shiq_toy.losses:shiq_tk", "--as", "shiq_tk"],
}


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("battery")
    (ws / "cwd").mkdir()
    (ws / "afile").write_text("keep me\n")
    (ws / "existing.json").write_text('{"saved": true}\n')
    (ws / "existing.jsonl").write_text('{"saved": true}\n')
    (ws / "adir").mkdir()
    _write_rows(ws / "rows.jsonl", SINGLE)
    _write_rows(ws / "mt.jsonl", MULTI)
    (ws / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b", "reward": 1}\n{"prompt": "caf\xe9"}\n')
    (ws / "badjson.jsonl").write_text(json.dumps(SINGLE[0]) + "\n" + json.dumps(SINGLE[1]) + '\n{"prompt": \n')
    (ws / "list.jsonl").write_text("[1, 2]\n")
    (ws / "empty.jsonl").write_text("\n")
    for name, rows in (("single_data", SINGLE), ("multi_data", MULTI)):
        (ws / name / "reference").mkdir(parents=True)
        _write_rows(ws / name / "train.jsonl", rows)
        _write_rows(ws / name / "eval_prompts.jsonl", [{"prompt": "p"}])
    (ws / "causal_lm").mkdir()
    (ws / "causal_lm" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (ws / "my_reward.py").write_text("def fn(prompt, completion):\n    return 1.0\n\nnot_fn = 3\n")
    (ws / "sweep.yaml").write_text(f"out: {ws}/new\nmodel: m\ntrain_data: {ws}/rows.jsonl\nalgos: [shiq]\nbetas: [0.1]\n")
    (ws / "yaml").mkdir()
    (ws / "yaml" / "list.yaml").write_text("- a\n- b\n")
    (ws / "yaml" / "broken.yaml").write_text("a: [1\n")
    (ws / "yaml" / "unknown.yaml").write_text("no_such_option: 1\n")
    (ws / "yaml" / "latin1.yaml").write_bytes(b"out: caf\xe9\n")
    for (cli, name), command in _all_commands():
        for field, wrong in _yaml_wrong_values(command):
            path = ws / "yaml" / f"{cli}_{name.replace(' ', '_')}_{field}.yaml"
            path.write_text(f"{field}: {wrong}\n")
    return ws


def _all_commands():
    for cli, table in COMMANDS.items():
        for name, command in table.items():
            yield (cli, name), command


def _typed_fields(command, per_kind: int = 1) -> list[tuple[str, typing.Any, dataclasses.Field]]:
    """(name, type hint, field) of the options the battery types: the first ``per_kind`` of each kind of type
    (integer, number, boolean, list of numbers, list, mapping, with choices) of every command's options."""
    seen: dict[str, int] = {}
    picked = []
    for name, hint, f in _all_typed_fields(command):
        kind = ("choices-" if command.choices_of(name) else "") + str(_kind(hint))
        seen[kind] = seen.get(kind, 0) + 1
        if seen[kind] <= per_kind:
            picked.append((name, hint, f))
    return picked


def _all_typed_fields(command) -> list[tuple[str, typing.Any, dataclasses.Field]]:
    """(name, type hint, field) of the options of a command: all, but of TrainingArguments only a few."""
    out = []
    for cls in command.options:
        hints = typing.get_type_hints(cls)
        own = {f.name for f in dataclasses.fields(cls) if "help" in f.metadata and cls.__name__ != "ShiQConfig"}
        if cls.__name__ == "ShiQConfig":
            from transformers import TrainingArguments

            inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
            own = {f.name for f in dataclasses.fields(cls)} - inherited | set(TRAINING_ARGUMENTS)
        for f in dataclasses.fields(cls):
            if f.init and f.name in own:
                out.append((f.name, _strip_optional(hints[f.name]), f))
    return out


def _strip_optional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
        return args[0]
    return hint


def _kind(hint) -> str | None:
    origin = typing.get_origin(hint)
    if hint in (int, float, bool):
        return hint.__name__
    if origin in (tuple, list) and typing.get_args(hint)[0] in (int, float):
        return "numbers"
    if origin in (tuple, list):
        return "list"
    if origin is dict or hint is dict:
        return "mapping"
    return None


def _yaml_wrong_values(command):
    for name, hint, f in _typed_fields(command):
        kind = _kind(hint)
        if kind in ("int", "float", "bool", "numbers", "list"):
            yield name, "{a: 1}"
        elif kind == "mapping":
            yield name, "[1, 2]"


def _cases():
    cases = []

    def add(cli, name, argv, expect, tag):
        cases.append(pytest.param(cli, name, argv, expect, id=f"{cli}-{name.replace(' ', '_')}-{tag}"))

    for (cli, name), command in _all_commands():
        valid = VALID[(cli, name)]
        typed = [] if name == "cache-ref" else _typed_fields(command)  # cache-ref: train's options, typed there
        # wrong types on the command line, one per typed option
        for field, hint, f in typed:
            kind = _kind(hint)
            if kind in ("int", "float", "numbers"):
                add(cli, name, [*valid, f"--{field}", "x1"], field, f"cli-type-{field}")
            elif kind == "bool":
                add(cli, name, [*valid, f"--{field}", "maybe"], field, f"cli-bool-{field}")
            if command.choices_of(field) and kind not in ("bool",):
                add(cli, name, [*valid, f"--{field}", "no_such_choice"], field, f"choice-{field}")
        # wrong types in the YAML file, one per typed option
        for field, _ in (_yaml_wrong_values(command) if typed else ()):
            add(cli, name, [*valid, "--config", f"{{ws}}/yaml/{cli}_{name.replace(' ', '_')}_{field}.yaml"], field,
                f"yaml-type-{field}")
        # bad YAML files and unknown options
        if name != "sweep":
            add(cli, name, [*valid, "--config", "{ws}/yaml/unknown.yaml"], "no_such_option", "yaml-unknown-key")
            add(cli, name, [*valid, "--config", "{ws}/yaml/list.yaml"], "list.yaml", "yaml-not-a-mapping")
            add(cli, name, [*valid, "--config", "{ws}/yaml/broken.yaml"], "broken.yaml", "yaml-broken")
            add(cli, name, [*valid, "--config", "{ws}/yaml/latin1.yaml"], "latin1.yaml", "yaml-not-utf8")
            add(cli, name, [*valid, "--config", "{ws}/yaml/missing.yaml"], "missing.yaml", "yaml-missing")
        add(cli, name, [*valid, "--no_such_flag", "1"], "--no_such_flag", "unknown-option")
        # output paths
        outs = [(f, f.metadata["path"]) for cls in command.options for f in dataclasses.fields(cls)
                if f.metadata.get("path") in ("out_dir", "out_file")]
        for f, kind in outs:
            flag = next(a for a in valid if a.startswith("--") and a.lstrip("-") in (f.name, "output_dir", "out"))
            base = [a for i, a in enumerate(valid) if a != flag and (i == 0 or valid[i - 1] != flag)]
            add(cli, name, [*base, flag, "{ws}/afile/under"], "afile", "out-under-a-file")
            if kind == "out_dir":
                add(cli, name, [*base, flag, "{ws}/afile"], "afile", "out-is-a-file")
            else:
                add(cli, name, [*base, flag, "{ws}/adir"], "adir", "out-is-a-folder")
                suffix = ".jsonl" if name in ("generate", "score") else ".json"
                add(cli, name, [*base, flag, f"{{ws}}/existing{suffix}"], "--overwrite", "out-exists")
    # train's own output folder option (a TrainingArguments field)
    for name in ("train", "cache-ref"):
        add("shiq-llm", name, ["--dataset_name", "{ws}/rows.jsonl", "--output_dir", "{ws}/afile"], "afile", "out-is-a-file")
        add("shiq-llm", name, ["--dataset_name", "{ws}/rows.jsonl", "--output_dir", "{ws}/afile/x"], "afile",
            "out-under-a-file")
    # input rows: missing, a folder, not UTF-8, not JSON, not objects, empty
    rows_options = [("train", ["--output_dir", "{ws}/new"], "--dataset_name"),
                    ("cache-ref", ["--output_dir", "{ws}/new"], "--dataset_name"),
                    ("score", ["--reward", "shiq_llm.tasks.synthetic:reward", "--out", "{ws}/new/l.jsonl"], "--rows"),
                    ("generate", ["--model", "m", "--out", "{ws}/new/r.jsonl"], "--prompts"),
                    ("evaluate", ["--model", "m", "--ref", "r"], "--prompts"),
                    ("evaluate", ["--model", "m", "--ref", "r"], "--train_data"),
                    ("sweep", ["--config", "{ws}/sweep.yaml"], "--train_data")]
    bad_rows = [("missing.jsonl", "no such file"), ("latin1.jsonl", "line 2"), ("badjson.jsonl", "line 3"),
                ("list.jsonl", "line 1"), ("empty.jsonl", "no rows")]
    for name, base, flag in rows_options:
        for file, expect in bad_rows:
            add("shiq-llm", name, [*base, flag, f"{{ws}}/{file}"], expect, f"rows-{flag.strip('-')}-{file}")
    add("shiq-llm", "score", ["--reward", "shiq_llm.tasks.synthetic:reward", "--out", "{ws}/new/l.jsonl", "--rows",
                              "{ws}/adir"], "not a file", "rows-a-folder")
    # rewards: one resolver for score, evaluate and sweep
    reward_base = {"score": ["--rows", "{ws}/rows.jsonl", "--out", "{ws}/new/l.jsonl"],
                   "evaluate": ["--model", "m", "--ref", "r"],
                   "sweep": ["--config", "{ws}/sweep.yaml"]}
    bad_rewards = [("no_such_module_xyz:f", "no_such_module_xyz"), ("{ws}/missing.py:fn", "file not found"),
                   ("{ws}/my_reward.py:nope", "nope"), ("{ws}/my_reward.py:not_fn", "not a function"),
                   ("just_a_name", "module:function")]
    for name, base in reward_base.items():
        for spec, expect in bad_rewards:
            add("shiq-llm", name, [*base, "--reward", spec], expect, f"reward-{spec.split(':')[-1]}")
        add("shiq-llm", name, [*base, "--reward_model", "{ws}/causal_lm"], "not a sequence-classification model",
            "reward-model-causal-lm")
    add("shiq-llm", "score", ["--rows", "{ws}/rows.jsonl", "--out", "{ws}/new/l.jsonl"], "--reward", "reward-none")
    add("shiq-llm", "score", ["--rows", "{ws}/rows.jsonl", "--out", "{ws}/new/l.jsonl", "--reward",
                              "shiq_llm.tasks.synthetic:reward", "--reward-model", "{ws}/causal_lm"], "--reward", "reward-both")
    # experiment data of the wrong row form, or missing
    data_cases = [("experiment multiturn", "--data", "single_data", "multi-turn rows"),
                  ("experiment ablation", "--single-data", "multi_data", "single-turn rows"),
                  ("experiment ablation", "--multi-data", "single_data", "multi-turn rows"),
                  ("experiment misspecified", "--data", "multi_data", "single-turn rows"),
                  ("experiment compare", "--data", "multi_data", "single-turn rows"),
                  ("demo", "--data", "multi_data", "single-turn rows"),
                  ("experiment multiturn", "--data", "nowhere", "no such folder"),
                  ("experiment multiturn", "--data", "adir", "missing reference")]
    for name, flag, folder, expect in data_cases:
        add("shiq-llm", name, ["--out", "{ws}/new", flag, f"{{ws}}/{folder}"], (flag, expect),
            f"data-{flag.strip('-')}-{folder}")
    # --quick never hides an invalid explicit value
    quick_cases = [("shiq-toy", "gym", ["--envs", "taxi", "--episodes", "0"], "episodes"),
                   ("shiq-toy", "online", ["--steps", "0"], "steps"),
                   ("shiq-toy", "misspecified", ["--steps", "0"], "steps"),
                   ("shiq-llm", "demo", ["--betas", "-1"], "betas"),
                   ("shiq-llm", "experiment multiturn", ["--seeds", "0"], "seeds"),
                   ("shiq-llm", "experiment ablation", ["--steps", "0"], "steps"),
                   ("shiq-llm", "experiment misspecified", ["--bonus", "-1"], "bonus"),
                   ("shiq-llm", "experiment compare", ["--learning_rates", "0"], "learning_rates")]
    for cli, name, extra, expect in quick_cases:
        for quick in ([], ["--quick"]):
            add(cli, name, ["--out", "{ws}/new", *quick, *extra], expect, f"{'quick-' if quick else ''}{expect}")
    return cases


CASES = _cases()


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0,
                                       p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_the_battery_is_large_and_covers_every_command():
    assert len(CASES) >= 150
    covered = {(case.values[0], case.values[1]) for case in CASES}
    assert covered == {key for key, _ in _all_commands()}


@pytest.mark.parametrize("cli, name, argv, expect", CASES)
def test_bad_input_is_one_clear_line_and_leaves_everything_as_it_was(cli, name, argv, expect, workspace, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(workspace / "cwd")
    before = _snapshot(workspace)
    status = MAINS[cli]([*name.split(), *(a.replace("{ws}", str(workspace)) for a in argv)])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]
    assert status != 0, (out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith(cli), err
    for token in (expect if isinstance(expect, tuple) else (expect,)):
        token = token.replace("{ws}", str(workspace))
        assert token in lines[0] or token.replace("_", "-") in lines[0], (token, lines[0])
    assert _snapshot(workspace) == before  # no partial output, nothing saved lost
