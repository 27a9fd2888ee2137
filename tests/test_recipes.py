"""Every recipe of ``recipes/`` end to end on the CPU: the commands of its README run as written, in order, each
stage reading the files the previous one wrote, with only the hub models and datasets replaced (tiny models
built from configs, fixture files in the datasets' own schemas) and the sizes made tiny (tokens, steps, batch,
samples; one β and two methods of a sweep's grid); every other key of the YAML files is kept.

Not run: installation lines and BFCL's own harness (``bfcl generate``: two fixture result files in its schema
stand in for its runs), and BFCL's state checker (``--checker exact`` instead: it needs ``bfcl-eval``).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from shiq_llm import cli
from shiq_llm.data import bfcl
from shiq_llm.experiments.sweep import load_sweep_config
from shiq_llm.train.config import parse_train_args

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
RECIPES = ("ultrafeedback", "hh", "bfcl")

#: Hub names of the recipes → the tiny stand-ins (keys of the ``models`` fixture).
MODELS = {"Qwen/Qwen2.5-0.5B-Instruct": "policy", "Qwen/Qwen2.5-1.5B-Instruct": "policy",
          "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": "reward_model"}
#: Hub datasets (with their split) → fixture files in the same schema.
DATASETS = {
    "HuggingFaceH4/ultrafeedback_binarized --split 'train_prefs[:10000]'": "ultrafeedback_binarized.jsonl",
    "HuggingFaceH4/ultrafeedback_binarized --split 'test_prefs[:500]'": "ultrafeedback_binarized_test.jsonl",
    "Anthropic/hh-rlhf --format hh --split 'train[:10000]'": "hh_rlhf.jsonl --format hh",
    "Anthropic/hh-rlhf --format hh --split 'test[:500]'": "hh_rlhf_test.jsonl --format hh",
    "$BFCL_DATA/BFCL_v3_multi_turn_base.json": "bfcl_v3_multi_turn_base.json",
    "$BFCL_DATA/possible_answer/BFCL_v3_multi_turn_base.json": "bfcl_possible_answer.json",
    "$BFCL_DATA/multi_turn_func_doc": "bfcl_func_doc",
    # the result files of `bfcl generate` runs: the reference's 8 samples, its first one, the trained policy's
    "runs/bfcl/ref_*/Qwen_Qwen2.5-1.5B-Instruct/BFCL_v3_multi_turn_base_result.json":
        "bfcl_result_sample0.json bfcl_result_sample1.json",
    "runs/bfcl/ref_0/Qwen_Qwen2.5-1.5B-Instruct/BFCL_v3_multi_turn_base_result.json": "bfcl_result_sample0.json",
    "runs/bfcl/shiq_eval/Qwen_Qwen2.5-1.5B-Instruct/BFCL_v3_multi_turn_base_result.json": "bfcl_result_sample1.json",
}
#: Sizes and devices of the commands: tiny, float32 on the CPU, BFCL's checker → exact matching.
SIZES = {r"--max-new-tokens \d+": "--max-new-tokens 6", r"--num-samples \d+": "--num-samples 1",
         r"--dtype bfloat16": "--dtype float32", r"--checker bfcl": "--checker exact"}
#: YAML keys set to tiny sizes / the CPU (train files and a sweep's ``train`` mapping).
TRAIN_SIZES = {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "bf16": False,
               "dtype": "float32", "logging_steps": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama policy and a tiny reward model (each with a tokenizer of its own), saved like hub models."""
    from shiq_llm.core.models import build_tokenizer, tiny_causal_lm, tiny_reward_model

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer()
    tiny_causal_lm(tokenizer, hidden_size=32, num_heads=2, num_layers=1, max_positions=4096).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    rm_tokenizer = build_tokenizer(vocab_size=300)
    tiny_reward_model(rm_tokenizer).save_pretrained(root / "reward_model")
    rm_tokenizer.save_pretrained(root / "reward_model")
    return {name: str(root / name) for name in ("policy", "reward_model")}


def readme_pipeline(recipe: str) -> list[str]:
    """The command lines of the first ```bash block of ``recipes/<recipe>/README.md``."""
    text = (ROOT / "recipes" / recipe / "README.md").read_text()
    block = re.findall(r"```bash\n(.*?)```", text, re.S)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def substitute(line: str, models: dict[str, str]) -> str:
    for name, stand_in in sorted(MODELS.items(), key=lambda kv: -len(kv[0])):
        line = line.replace(name, models[stand_in])
    for source, fixture in DATASETS.items():
        line = line.replace(source, " ".join(str(FIXTURES / f) if (FIXTURES / f).exists() else f for f in fixture.split(" ")))
    for pattern, value in SIZES.items():
        line = re.sub(pattern, value, line)
    return line


def tiny_train(values: dict) -> dict:
    return {**values, **{k: v for k, v in TRAIN_SIZES.items() if k in values or k in ("max_steps", "bf16")}}


def write_tiny_configs(recipe: str, models: dict[str, str], work: Path) -> None:
    """``recipes/<recipe>/*.yaml`` copied to ``work`` with the models, held-out prompts and sizes replaced."""
    (work / "recipes" / recipe).mkdir(parents=True)
    train = yaml.safe_load((ROOT / "recipes" / recipe / "train.yaml").read_text())
    train["model_name_or_path"] = models[MODELS[train["model_name_or_path"]]]
    (work / "recipes" / recipe / "train.yaml").write_text(yaml.safe_dump(tiny_train(train)))
    sweep = yaml.safe_load((ROOT / "recipes" / recipe / "sweep.yaml").read_text())
    sweep["model"] = models[MODELS[sweep["model"]]]
    if sweep.get("reward_model"):
        sweep["reward_model"] = models[MODELS[sweep["reward_model"]]]
    key = f"{sweep['eval_prompts']} " + (f"--format {sweep['eval_format']} " if sweep.get("eval_format") else "") + \
        f"--split '{sweep.get('eval_split')}'"
    if key in DATASETS:  # a hub dataset: the held-out fixture
        sweep["eval_prompts"] = str(FIXTURES / DATASETS[key].split(" ")[0])
    sweep.update(algos=sweep["algos"][:2], betas=sweep["betas"][:1], seeds=sweep["seeds"][:1],
                 train=tiny_train(sweep["train"]), model_options={**sweep.get("model_options", {}),
                                                                  **({"dtype": "float32"} if sweep.get("model_options") else {})})
    sweep["evaluation"] = {**sweep["evaluation"], "num_samples": 1, "max_new_tokens": 6, "device": "cpu",
                           "dtype": "float32"}
    (work / "recipes" / recipe / "sweep.yaml").write_text(yaml.safe_dump(sweep))


def run_pipeline(recipe: str, models: dict[str, str], work: Path, monkeypatch) -> list[str]:
    """Run the README's commands in ``work`` (as the current directory); returns the commands run."""
    monkeypatch.chdir(work)
    write_tiny_configs(recipe, models, work)
    ran = []
    for line in readme_pipeline(recipe):
        if line.startswith(("pip ", "for ", "bfcl ")):  # installation, BFCL's harness: fixtures stand in for it
            continue
        command = substitute(line, models)
        argv = shlex.split(command)
        if argv[0] == "shiq-llm":
            status = cli.main(argv[1:] + (["--no-progress"] if argv[1] in ("generate", "score", "sweep") else []))
        else:
            assert argv[:3] == ["python", "-m", "shiq_llm.data.bfcl"], f"unexpected command in the README: {line}"
            status = bfcl.main(argv[3:])
        assert status == 0, f"recipe {recipe}: failed: {command}"
        ran.append(argv[1] if argv[0] == "shiq-llm" else "bfcl-rows")
    return ran


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_sweep(out: Path, cells: int) -> list[dict]:
    with (out / "results.csv").open() as f:
        results = list(csv.DictReader(f))
    assert [r["algo"] for r in results][0] == "reference" and len(results) == 1 + cells
    assert all(math.isfinite(float(r["mean_reward"])) and float(r["kl"]) > -1e-5 for r in results)  # float32 noise at 0
    assert (out / "reward_vs_kl.png").stat().st_size > 10_000
    return results


def test_recipe_files_parse_as_written():
    for recipe in RECIPES:
        model_args, data_args, args = parse_train_args(["--config", str(ROOT / "recipes" / recipe / "train.yaml"),
                                                        "--use_cpu", "true", "--bf16", "false"])
        assert model_args.model_name_or_path in MODELS and data_args.dataset_name.startswith("runs/")
        sweep = load_sweep_config(ROOT / "recipes" / recipe / "sweep.yaml")
        assert sweep.model in MODELS and sweep.leak == "error"
        assert (ROOT / "recipes" / recipe / "README.md").read_text().count("estimate") >= 2
    guide = ROOT / "docs" / "getting-started" / "practitioners.md"  # the recipes are documented in the practitioners' guide
    assert any("Recipes" in line for line in guide.read_text().splitlines() if line.startswith("#"))


@pytest.mark.parametrize("recipe, folder", [("ultrafeedback", "uf"), ("hh", "hh")])
def test_single_turn_recipe_runs_end_to_end(recipe, folder, models, tmp_path, monkeypatch):
    """generate → score (reward model) → train → evaluate (held-out prompts) → sweep and its figure."""
    ran = run_pipeline(recipe, models, tmp_path, monkeypatch)
    assert ran == ["generate", "score", "train", "evaluate", "sweep"]
    runs = tmp_path / "runs" / folder
    rows = read_jsonl(runs / "rows.jsonl")
    prompts = len({json.dumps(r["prompt"]) for r in rows})
    assert len(rows) == 4 * prompts and prompts == 3  # 4 completions of each training prompt of the fixture
    labelled = read_jsonl(runs / "labelled.jsonl")
    assert 0 < len(labelled) <= len(rows) and all(math.isfinite(r["reward"]) for r in labelled)
    assert (runs / "shiq" / "final" / "model.safetensors").is_file()
    report = json.loads((runs / "shiq" / "eval.json").read_text())
    # evaluate found the run's training rows (run_args.yaml) and checked the held-out prompts against them
    assert report["train_data"] == str((tmp_path / "runs" / folder / "labelled.jsonl").resolve())  # run_args.yaml: resolved
    assert report["leaked_prompts"] == 0
    assert report["num_prompts"] == 2 and math.isfinite(report["mean_reward"])
    check_sweep(runs / "sweep", cells=2)


def test_bfcl_recipe_runs_end_to_end(models, tmp_path, monkeypatch):
    """BFCL results → rows with per-turn scores (train and held-out entries) → train (LoRA) → sweep of
    multi-step and one-step ShiQ on the first-step reward → the trained policy's per-turn scores."""
    ran = run_pipeline("bfcl", models, tmp_path, monkeypatch)
    assert ran == ["bfcl-rows", "bfcl-rows", "train", "sweep", "bfcl-rows"]
    runs = tmp_path / "runs" / "bfcl"
    train_rows, eval_rows = read_jsonl(runs / "train_rows.jsonl"), read_jsonl(runs / "eval_rows.jsonl")
    assert len(train_rows) == 2 * 6 and len(eval_rows) == 2  # 6 training entries × 2 samples; 2 held-out entries
    assert {r["id"] for r in train_rows}.isdisjoint({r["id"] for r in eval_rows})
    assert all(len(r["turn_scores"]) == len(r["question"]) for r in train_rows)
    assert all(r["function"] for r in train_rows)  # the function docs of the entry's classes
    assert (runs / "shiq" / "final" / "adapter").is_dir()  # LoRA, merged into final/
    results = check_sweep(runs / "sweep", cells=2)
    assert {r["algo"] for r in results} == {"reference", "shiq", "shiq_ms"}
    assert all(0.0 <= float(r["mean_reward"]) <= 1.0 for r in results)
    assert [r["turn_scores"] for r in read_jsonl(runs / "shiq_eval_rows.jsonl")] == [[0.0, 0.0], [0.0, 0.0]]


def test_bfcl_turn_scores_by_hand():
    """The checker on the fixture, read off by hand: sample 0 is right on entry 0, wrong in turn 1 of entry 4
    (mkdir of another folder); sample 1 lists with an extra argument on entry 0 (turn 2 fails) and posts another
    text on entry 1 (turn 1 fails, so turn 2 fails too)."""
    entries = bfcl.read_bfcl_file(FIXTURES / "bfcl_v3_multi_turn_base.json")
    answers = bfcl.read_bfcl_file(FIXTURES / "bfcl_possible_answer.json")
    sample0 = bfcl.read_bfcl_file(FIXTURES / "bfcl_result_sample0.json")
    sample1 = bfcl.read_bfcl_file(FIXTURES / "bfcl_result_sample1.json")
    scores0 = {r["id"]: r["turn_scores"] for r in bfcl.join_results(entries, answers, sample0)}
    scores1 = {r["id"]: r["turn_scores"] for r in bfcl.join_results(entries, answers, sample1)}
    assert scores0["multi_turn_base_0"] == [1.0, 1.0] and scores0["multi_turn_base_4"] == [0.0, 0.0]
    assert scores1["multi_turn_base_0"] == [1.0, 0.0] and scores1["multi_turn_base_1"] == [0.0, 0.0]
    assert scores1["multi_turn_base_3"] == [1.0, 0.0]  # a call in a turn whose ground truth is no call
    assert scores1["multi_turn_base_6"] == [0.0, 0.0]  # text that is not a call
    assert bfcl.parse_calls("[f(b=2, a='x'), g()]") == ["f(a='x', b=2)", "g()"]
    assert bfcl.parse_calls({"f": '{"a": 1}'}) == ["f(a=1)"] and bfcl.parse_calls("no call") == []
    with pytest.raises(ValueError, match=r"result 0 \(id 'nope'\): no such id in the entries"):
        bfcl.join_results(entries, answers, [{"id": "nope", "result": []}])
    assert [r["id"] for r in bfcl.join_results(entries, answers, sample0, split="eval")] == [
        "multi_turn_base_5", "multi_turn_base_7"]  # entry_split: crc32(id) % 4 == 0


def test_first_step_reward_by_hand(tmp_path):
    """Entry 0's first turn is cd(folder='document') then mkdir(dir_name='temp0'): a first step that is a prefix
    of it scores 1, another call or text 0; entry 1's is post_tweet(content='good morning')."""
    entries = bfcl.read_bfcl_file(FIXTURES / "bfcl_v3_multi_turn_base.json")
    answers = bfcl.read_bfcl_file(FIXTURES / "bfcl_possible_answer.json")
    rows = bfcl.join_results(entries, answers, bfcl.read_bfcl_file(FIXTURES / "bfcl_result_sample0.json"))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fs = [{"role": "system", "content": "docs"}, {"role": "user", "content": "Go to the document  folder and make a "
                                                                             "directory called temp0."}]
    reward = lambda prompt, completion: bfcl.first_step_reward(prompt, completion, answers=str(path))  # noqa: E731
    assert reward(fs, "[cd(folder='document')]") == 1.0
    assert reward(fs, "[cd(folder='document'), mkdir(dir_name='temp0')]") == 1.0
    assert reward(fs, "[mkdir(dir_name='temp0')]") == 0.0 and reward(fs, "sure!") == 0.0
    assert reward("Post a tweet saying good morning.", "[post_tweet(content='good morning')]") == 1.0
    with pytest.raises(ValueError, match="first_step_reward: prompt 'Hello' is not in"):
        reward("Hello", "[]")
