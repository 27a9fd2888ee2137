"""The embedded synthetic task (shiq_llm.tasks.synthetic) and the `shiq-llm make-data` / `shiq-llm demo` commands.

Rewards against hand-computed cases, the prompt split, the noise of the demonstrations against its binomial
law, the tokenizer, the saved reference, the offline rows (determinism, schema through shiq_llm.data.load_rows,
labels), and end to end: make-data, then the quick demo on that data, asserting that ShiQ's policy earns a
higher mean reward on the held-out prompts than the reference.
"""

import contextlib
import csv
import io
import json
import logging
import math
import re
import shlex

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shiq_llm.cli import main
from shiq_llm.data import load_rows, tokenize_rows
from shiq_llm.experiments.sweep import RESULT_COLUMNS
from shiq_llm.storage.jsonl import write_jsonl
from shiq_llm.tasks import synthetic
from shiq_llm.tasks.synthetic import (
    ANSWER_WORDS,
    FAMILIES,
    NUMBER_MAX,
    NUMBER_MIN,
    ReferenceConfig,
    build_reference,
    build_task_tokenizer,
    demonstration,
    make_offline_dataset,
    reward,
    target_words,
    task_prompts,
)
from shiq_toy.experiments import num_threads

# --------------------------------------------------------------------------------------------------
# Task definition
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("count up from 7:", ["8", "9", "10", "11"]),
        ("count down from 7:", ["6", "5", "4", "3"]),
        ("repeat 7:", ["7", "7", "7", "7"]),
        ("count down from 4:", ["3", "2", "1", "0"]),
        ("  count up from 30:  ", ["31", "32", "33", "34"]),
    ],
)
def test_target_words(prompt, words):
    assert target_words(prompt) == words


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("count up from 7:", " 8 9 10 11", 1.0),  # all 4 right
        ("count up from 7:", "8 9 10 12", 3 / 4),  # last word wrong
        ("count up from 7:", "9 10 11 12", 0.0),  # shifted by one: no position matches
        ("count down from 7:", "6 5", 2 / 4),  # 2 hits, 2 missing words: max(4, 2) = 4 slots
        ("repeat 7:", "7 7 7 7 7", 4 / 5),  # 4 hits, one extra word: max(4, 5) = 5 slots
        ("repeat 7:", "7 x 7 7 7 7 7 7", 3 / 8),  # hits at 0, 2, 3 over 8 slots
        ("count up from 7:", "", 0.0),  # empty: 0 hits over 4 slots
        ("count up from 7:", "  8\t9\n10 11 ", 1.0),  # any whitespace separates words
    ],
)
def test_reward_hand_computed(prompt, completion, expected):
    assert reward(prompt, completion) == pytest.approx(expected, abs=1e-15)


def test_reward_rejects_other_prompts():
    with pytest.raises(ValueError, match="not a prompt of the synthetic task"):
        reward("count sideways from 7:", "8")
    with pytest.raises(ValueError, match="not a prompt"):
        target_words("count up from seven:")


def test_prompt_split():
    train, held_out, every = task_prompts("train"), task_prompts("eval"), task_prompts("all")
    per_family = NUMBER_MAX - NUMBER_MIN + 1
    assert len(every) == len(set(every)) == len(FAMILIES) * per_family
    assert set(train) | set(held_out) == set(every) and not set(train) & set(held_out)
    numbers = range(NUMBER_MIN, NUMBER_MAX + 1)
    assert len(held_out) == sum((n + f) % synthetic.HOLDOUT_MODULUS == 0 for f in range(len(FAMILIES)) for n in numbers)
    # every start number of a held-out prompt is the start number of a training prompt of another family
    start = {p: p.rstrip(":").split()[-1] for p in every}
    for p in held_out:
        assert any(start[q] == start[p] for q in train)
    with pytest.raises(ValueError, match="split"):
        task_prompts("test")


def test_demonstration_noise_follows_its_law():
    """Each word is right with probability (1 − noise) + noise / M, M = NUMBER_MAX + ANSWER_WORDS + 1 numbers
    (a replacement can draw the right one). Checked within 5 binomial standard errors over 4,000 words."""
    generator = torch.Generator().manual_seed(0)
    prompts = task_prompts("all")
    noise, draws = 0.3, 1000
    hits = 0
    for k in range(draws):
        prompt = prompts[k % len(prompts)]
        text = demonstration(prompt, noise=noise, generator=generator)
        assert text.startswith(" ") and len(text.split()) == ANSWER_WORDS
        hits += sum(w == t for w, t in zip(text.split(), target_words(prompt)))
    p = (1 - noise) + noise / (NUMBER_MAX + ANSWER_WORDS + 1)
    n = draws * ANSWER_WORDS
    assert abs(hits / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    clean = demonstration("count up from 7:", noise=0.0, generator=generator)
    assert clean == " 8 9 10 11" and reward("count up from 7:", clean) == 1.0
    with pytest.raises(ValueError, match="noise"):
        demonstration("repeat 7:", noise=1.5, generator=generator)


def test_task_tokenizer_has_one_token_per_number():
    tokenizer = build_task_tokenizer()
    for k in range(NUMBER_MAX + ANSWER_WORDS + 1):
        assert len(tokenizer(f" {k}", add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer(" 8 9 10 11", add_special_tokens=False)["input_ids"]
    assert len(ids) == ANSWER_WORDS and tokenizer.decode(ids) == " 8 9 10 11"
    assert tokenizer.chat_template is not None and tokenizer.eos_token_id is not None


# --------------------------------------------------------------------------------------------------
# Reference and offline data (a briefly trained reference: these tests check mechanics, not quality)
# --------------------------------------------------------------------------------------------------

SMALL = ReferenceConfig(steps=40, demonstrations=256)


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    model, tokenizer = build_reference(directory, SMALL)
    return directory, model, tokenizer


def test_reference_is_saved_and_reloads_identically(small_reference):
    directory, model, tokenizer = small_reference
    loaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(directory)
    messages = [{"role": "user", "content": "repeat 9:"}]
    text = loaded_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = loaded_tokenizer(text + " 9 9", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer(text + " 9 9", add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_pretraining_lowers_the_demonstrations_nll():
    """Maximum likelihood on noisy demonstrations: the mean token NLL of the last steps is below that of the
    first ones; the first is near ln V, the NLL of the uniform predictor (freshly initialised logits are small)."""
    tokenizer = build_task_tokenizer()
    from shiq_llm.core.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, seed=0)
    rows = synthetic.demonstration_rows(task_prompts("all"), 128, noise=0.3, seed=0)
    losses = synthetic.pretrain_reference(model, tokenizer, rows, steps=30, batch_size=16, lr=3e-3, seed=0)
    assert len(losses) == 30 and not model.training
    assert abs(losses[0] - math.log(len(tokenizer))) < 0.5
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_offline_dataset_is_deterministic_and_labelled(small_reference, tmp_path):
    _, model, tokenizer = small_reference
    prompts = task_prompts("train")[:6]
    rows = make_offline_dataset(model, tokenizer, prompts, completions_per_prompt=3, max_new_tokens=8, seed=5)
    again = make_offline_dataset(model, tokenizer, prompts, completions_per_prompt=3, max_new_tokens=8, seed=5)
    other = make_offline_dataset(model, tokenizer, prompts, completions_per_prompt=3, max_new_tokens=8, seed=6)
    assert rows == again and rows != other
    assert 0 < len(rows) <= 3 * len(prompts)
    for row in rows:
        assert set(row) == {"prompt", "completion", "reward"} and row["prompt"] in prompts
        assert row["completion"].strip() and row["reward"] == reward(row["prompt"], row["completion"])
    # prompt-major order: the prompts appear in the given order
    order = [prompts.index(r["prompt"]) for r in rows]
    assert order == sorted(order)

    path = write_jsonl(rows, tmp_path / "rows.jsonl")
    loaded = load_rows(str(path))
    assert loaded.to_list() == rows
    examples, report = tokenize_rows(loaded, tokenizer)
    assert report.kept == len(rows)
    for example, row in zip(examples, rows):  # the reward sits on the last response token (EOS)
        assert example["rewards"][-1] == row["reward"] and example["input_ids"][-1] == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------
# End to end: shiq-llm make-data, then shiq-llm demo --quick on that data
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made_data(tmp_path_factory):
    """`shiq-llm make-data` with its defaults (the demo's reference and data)."""
    out = tmp_path_factory.mktemp("made") / "data"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["make-data", "--out", str(out), "--no-progress"]) == 0
    (out.parent / "printed.txt").write_text(printed.getvalue())
    return out


def test_the_printed_next_command_runs(made_data, tmp_path, monkeypatch):
    """make-data's "next:" hint is a valid train command: run as printed, with a short budget."""
    [hint] = [line for line in (made_data.parent / "printed.txt").read_text().splitlines() if line.startswith("next: ")]
    argv = shlex.split(hint.removeprefix("next: "))
    assert argv[:2] == ["shiq-llm", "train"]
    monkeypatch.chdir(tmp_path)  # its --output_dir is relative
    assert main([*argv[1:], "--max_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"]) == 0
    assert (tmp_path / "runs" / "shiq" / "final").is_dir()


def test_make_data_cli_writes_reference_rows_and_prompts(made_data):
    rows = load_rows(str(made_data / "train.jsonl")).to_list()
    train_prompts = task_prompts("train")
    assert {r["prompt"] for r in rows} == set(train_prompts)
    assert len(rows) <= 16 * len(train_prompts)  # 16 completions per prompt, empty ones left out
    assert all(r["reward"] == reward(r["prompt"], r["completion"]) for r in rows)
    held_out = [json.loads(line)["prompt"] for line in (made_data / "eval_prompts.jsonl").read_text().splitlines()]
    assert held_out == task_prompts("eval")
    model = AutoModelForCausalLM.from_pretrained(made_data / "reference")
    tokenizer = AutoTokenizer.from_pretrained(made_data / "reference")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_quick_demo_trains_shiq_above_the_reference(made_data, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--data", str(made_data), "--out", str(out), "--no-progress"]) == 0
    assert (out / "reward_vs_kl.png").stat().st_size > 10_000
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        results = {r["algo"]: r for r in reader}
    assert set(results) == {"reference", "shiq", "dpo"}
    ref, shiq = results["reference"], results["shiq"]
    assert float(ref["kl"]) == 0.0 and float(shiq["kl"]) > 0.0 and float(shiq["beta"]) == 0.1
    # ShiQ beats the reference by more than 3 standard errors of the difference (independent samples)
    gap = float(shiq["mean_reward"]) - float(ref["mean_reward"])
    assert gap > 3 * math.hypot(float(shiq["reward_sem"]), float(ref["reward_sem"]))


def test_demo_refuses_its_data_built_with_other_settings_instead_of_reusing_it(made_data, tmp_path, capsys):
    """OUT/data of `shiq-llm demo` is built once per settings (recorded in settings.json): a rerun with another
    --seed is refused in one line, never trained on the other seed's reference and rows."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(made_data, out / "data")  # make-data's defaults = the demo's with seed 0
    settings = {"reference": ReferenceConfig(steps=600, seed=0).__dict__, "completions_per_prompt": 16,
                "max_new_tokens": 12, "seed": 0}
    (out / "data" / "settings.json").write_text(json.dumps(settings))
    assert main(["demo", "--quick", "--seed", "1", "--steps", "1", "--eval-samples", "1", "--out", str(out),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'data'} was built with reference=" in err and "choose another --out" in err
    assert not (out / "results.csv").exists() and not (out / "runs").exists()


def test_experiment_misspecified_command_runs_with_quick_under_explicit_options(made_data, tmp_path, capsys):
    """`shiq-llm experiment misspecified --quick` on the made data, explicit options over the preset (one cell)."""
    out = tmp_path / "q3"
    assert main(["experiment", "misspecified", "--quick", "--out", str(out), "--data", str(made_data), "--algos", "shiq",
                 "--betas", "0.3", "--steps", "2", "--eval_samples", "1", "--batch_size", "8"]) == 0
    with (out / "misspecified_llm.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["beta"])) for r in rows if r["method"] != "reference"] == [("shiq", 0.3)]
    assert (out / "misspecified_llm.png").stat().st_size > 10_000
    assert "misspecified_llm.csv" in capsys.readouterr().out


def test_demo_rejects_bad_options(tmp_path):
    assert main(["demo", "--algos", "shiq,ppo", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--betas", "0.1,-1", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert main(["demo", "--quick", "--steps", "0", "--out", str(tmp_path)]) == 2  # --quick never hides a bad value


def test_torch_threads_restores_the_thread_count():
    before = torch.get_num_threads()
    with num_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with num_threads(0):
            pass


def test_sweep_trains_every_cell_skips_finished_ones_and_reports_a_failed_cell(made_data, tmp_path, capsys):
    """A 2 × 1 × 2 grid plus a cell that fails: results.csv has a row per finished cell and the reference, the
    failed cell is named and the exit status is 1; a re-run skips the finished cells (their results unchanged)."""
    import yaml

    rows = load_rows(str(made_data / "train.jsonl")).to_list()
    single = tmp_path / "single.jsonl"  # one completion per prompt: no pair at all, so dpo's cells fail
    seen, kept = set(), []
    for r in rows:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            kept.append(r)
    single.write_text("".join(json.dumps(r) + "\n" for r in kept))
    sweep = {"out": str(tmp_path / "sweep"), "model": str(made_data / "reference"), "train_data": str(single),
             "algos": ["shiq", "dro", "dpo"], "betas": [0.3], "seeds": [0, 1],
             "train": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-3},
             "evaluation": {"num_samples": 2, "max_new_tokens": 6, "seed": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 of 6 sweep cells failed" in out and "dpo_beta0.3_seed0: ValueError: no usable pair" in out
    with (tmp_path / "sweep" / "results.csv").open() as f:
        results = list(csv.DictReader(f))
    assert [(r["algo"], r["seed"]) for r in results] == [("reference", ""), ("dro", "0"), ("dro", "1"), ("shiq", "0"), ("shiq", "1")]
    assert all(float(r["kl"]) > 0 for r in results[1:]) and float(results[0]["kl"]) == 0.0
    assert (tmp_path / "sweep" / "reward_vs_kl.png").stat().st_size > 10_000
    assert (tmp_path / "sweep" / "reference" / "manifest.json").is_file()  # one cache for every cell
    assert not (tmp_path / "sweep" / "runs" / "shiq_beta0.3_seed0" / "reference").exists()
    finished = tmp_path / "sweep" / "runs" / "shiq_beta0.3_seed0" / "result.json"
    before = finished.stat().st_mtime_ns
    sweep["algos"] = ["shiq", "dro"]
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(path), "--no-progress"]) == 0
    assert finished.stat().st_mtime_ns == before  # skipped, not retrained


def _tiny_sweep(made_data, tmp_path, **changes) -> dict:
    sweep = {"out": str(tmp_path / "sweep"), "model": str(made_data / "reference"),
             "train_data": str(made_data / "train.jsonl"), "algos": ["shiq"], "betas": [0.3], "seeds": [0],
             "variants": {"shiq_long": {"algo": "shiq", "train": {"max_steps": 2}}},
             "train": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3},
             "evaluation": {"num_samples": 1, "max_new_tokens": 4, "seed": 1}}
    sweep.update(changes)
    return sweep


def _run_sweep_file(sweep: dict, path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(path), "--no-progress"]) == 0


def test_sweep_rerun_recomputes_the_cells_whose_settings_changed_and_keeps_the_others(made_data, tmp_path, capsys):
    """Cells and the reference result are keyed by everything that changes them: a rerun after editing a cell's
    max_steps retrains that cell only (and says so), after editing the evaluation recomputes every result; results.csv
    never holds a stale row."""
    path, out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    sweep = _tiny_sweep(made_data, tmp_path)
    _run_sweep_file(sweep, path)
    capsys.readouterr()
    kept, changed = out / "runs" / "shiq_beta0.3_seed0" / "result.json", out / "runs" / "shiq_long_beta0.3_seed0" / "result.json"
    reference = out / "reference_result.json"
    times = {p: p.stat().st_mtime_ns for p in (kept, changed, reference)}
    _run_sweep_file(sweep, path)  # nothing changed: nothing recomputed
    assert "recomputing" not in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in times.items())

    sweep["variants"]["shiq_long"]["train"]["max_steps"] = 4
    _run_sweep_file(sweep, path)
    printed = capsys.readouterr().out
    assert "sweep: recomputing 1 result(s) whose key changed: shiq_long_beta0.3_seed0 (train.max_steps: 2 → 4)" in printed
    assert kept.stat().st_mtime_ns == times[kept] and reference.stat().st_mtime_ns == times[reference]
    assert json.loads(changed.read_text())["steps"] == 4
    with (out / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"reference", "shiq", "shiq_long"}
    assert float(rows["shiq_long"]["mean_reward"]) == json.loads(changed.read_text())["mean_reward"]

    sweep["evaluation"]["num_samples"] = 2
    _run_sweep_file(sweep, path)
    printed = capsys.readouterr().out
    assert ("sweep: recomputing 3 result(s) whose key changed: reference, shiq_beta0.3_seed0, shiq_long_beta0.3_seed0 "
            "(evaluation.options.num_samples: 1 → 2)") in printed
    before = int(rows["reference"]["num_samples"])  # samples in all: one per held-out prompt before
    with (out / "results.csv").open() as f:
        assert {r["method"]: int(r["num_samples"]) for r in csv.DictReader(f)} == {
            "reference": 2 * before, "shiq": 2 * before, "shiq_long": 2 * before}

    # other training rows (here: the same file with a row left out): every cell and the shared reference cache,
    # which the trainer would refuse as made for other data, are recomputed; the reference result is kept
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join((made_data / "train.jsonl").read_text().splitlines(keepends=True)[1:]))
    times = {p: p.stat().st_mtime_ns for p in (kept, reference)}
    sweep["train_data"] = str(fewer)
    _run_sweep_file(sweep, path)
    printed = capsys.readouterr().out
    assert re.search(r"sweep: recomputing 2 result\(s\) whose key changed: shiq_beta0.3_seed0, shiq_long_beta0.3_seed0 "
                     r"\(data.training_data_fingerprint: \w{8}… → \w{8}…\)", printed), printed
    assert f"sweep: rebuilding the reference cache {out / 'reference'} (data_fingerprint: " in printed
    assert kept.stat().st_mtime_ns != times[kept] and reference.stat().st_mtime_ns == times[reference]
    manifest = json.loads((out / "reference" / "manifest.json").read_text())
    assert manifest["num_examples"] == len((made_data / "train.jsonl").read_text().splitlines()) - 1


def test_editing_the_reward_s_file_recomputes_every_result(made_data, tmp_path, capsys):
    """The reward's code is part of the evaluation's key: a re-run after the reward's file changed recomputes the
    reference and every cell (the old rewards would be stale), and says why; an unchanged file skips them."""
    from shiq_llm.experiments.sweep import reward_code
    from shiq_llm.generation.rewards import load_reward

    scorer = tmp_path / "scorer.py"
    scorer.write_text("def score(prompt, completion):\n    return float(len(completion.split()) == 4)\n")
    path, out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    sweep = _tiny_sweep(made_data, tmp_path, variants={}, reward=f"{scorer}:score")
    _run_sweep_file(sweep, path)
    capsys.readouterr()
    result, reference = out / "runs" / "shiq_beta0.3_seed0" / "result.json", out / "reference_result.json"
    first = json.loads(result.read_text())["mean_reward"]
    _run_sweep_file(sweep, path)
    assert "recomputing" not in capsys.readouterr().out
    scorer.write_text("def score(prompt, completion):\n    return 5.0\n")
    _run_sweep_file(sweep, path)
    printed = capsys.readouterr().out
    assert re.search(r"sweep: recomputing 2 result\(s\) whose key changed: reference, shiq_beta0.3_seed0 "
                     r"\(evaluation.reward_code: \w{8}… → \w{8}…\)", printed), printed
    assert json.loads(result.read_text())["mean_reward"] == 5.0 != first
    assert json.loads(reference.read_text())["mean_reward"] == 5.0
    # the named reward: its module's file; a reward model: its weights; no reward: None
    assert reward_code(load_reward("synthetic", None), "completions") == reward_code(synthetic.reward, "completions")
    assert reward_code(None, "completions") is None and reward_code(None, "dialogues") is not None


def test_adding_dro_to_a_finished_sweep_extends_the_shared_reference_cache(made_data, tmp_path, caplog):
    """A sweep of shiq makes OUT/reference without DRO's prompt states (as `shiq-llm demo --quick` does); adding
    dro to it trains dro on that cache, rebuilt with the prompt states (manifest and checksums right), and keeps
    the finished shiq cell."""
    from shiq_llm.core.reference import load_reference_cache

    path, out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    sweep = _tiny_sweep(made_data, tmp_path, variants={})
    _run_sweep_file(sweep, path)
    assert json.loads((out / "reference" / "manifest.json").read_text())["has_prompt_state"] is False
    finished = out / "runs" / "shiq_beta0.3_seed0" / "result.json"
    before = finished.stat().st_mtime_ns
    sweep["algos"] = ["shiq", "dro"]
    with caplog.at_level(logging.INFO, logger="shiq_llm.train.trainer"):
        _run_sweep_file(sweep, path)
    assert "has no ref_prompt_state column (made for a method without a value); rebuilding it" in caplog.text
    assert finished.stat().st_mtime_ns == before
    manifest = json.loads((out / "reference" / "manifest.json").read_text())
    assert manifest["has_prompt_state"] is True
    stats = load_reference_cache(out / "reference", {k: manifest[k] for k in ("model_fingerprint", "data_fingerprint")},
                                 need_prompt_state=True)  # the checksums of the rebuilt files verify
    assert len(stats[0]["ref_prompt_state"]) > 0
    with (out / "results.csv").open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["reference", "dro", "shiq"]


def test_sweep_file_errors_name_the_key(tmp_path):
    from shiq_llm.experiments.sweep import load_sweep_config

    path = tmp_path / "s.yaml"
    path.write_text("out: o\nmodel: m\ntrain_data: d\nalgos: [shiq]\nbetas: [0.1]\nbta: 1\n")
    with pytest.raises(ValueError, match="unknown key 'bta'"):
        load_sweep_config(path)
    path.write_text("out: o\nmodel: m\nalgos: [shiq]\nbetas: [0.1]\n")
    with pytest.raises(ValueError, match="missing key 'train_data'"):
        load_sweep_config(path)
    path.write_text("out: o\nmodel: m\ntrain_data: d\nalgos: [ppo]\nbetas: [0.1]\n")
    with pytest.raises(ValueError, match="algos must be"):
        load_sweep_config(path)
    path.write_text("out: o\nmodel: m\ntrain_data: d\nalgos: [shiq]\nbetas: [0.1]\ntrain: {beta: 2}\n")
    with pytest.raises(ValueError, match="train.beta is set by the sweep"):
        load_sweep_config(path)


def test_proxy_reward_pays_for_large_numbers():
    """R̃ = R + bonus · #{large words} / max(4, #words): hand-worked on 'count up from 7:' (target 8 9 10 11)."""
    from shiq_llm.tasks.synthetic import LARGE_NUMBER, proxy_reward, reward

    prompt = "count up from 7:"
    assert LARGE_NUMBER == 20
    assert proxy_reward(prompt, " 8 9 10 11") == reward(prompt, " 8 9 10 11") == 1.0  # no large word
    assert proxy_reward(prompt, " 8 25 30 11") == 0.5 + 2 / 4  # two right words, two large wrong ones
    assert proxy_reward(prompt, " 20 21 22 23 24") == 5 / 5  # five large words, none right
    assert proxy_reward(prompt, " 8 25", bonus=0.5) == 1 / 4 + 0.5 * 1 / 4
    assert proxy_reward("count up from 25:", " 26 27 28 29") == 2.0  # the true answer is large too


def test_relabel_writes_the_proxy_and_keeps_the_true_reward(tmp_path):
    import json

    from shiq_llm.experiments.misspecified import relabel
    from shiq_llm.tasks.synthetic import proxy_reward

    rows = [{"prompt": "repeat 5:", "completion": " 5 5 31 5", "reward": 0.75}, {"prompt": "count down from 9:", "completion": " 8 7", "reward": 0.5}]
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert relabel(source, tmp_path / "proxy.jsonl", bonus=1.0) == 2
    out = [json.loads(line) for line in (tmp_path / "proxy.jsonl").read_text().splitlines()]
    assert [r["true_reward"] for r in out] == [0.75, 0.5]
    assert [r["reward"] for r in out] == [proxy_reward(r["prompt"], r["completion"]) for r in rows] == [1.0, 0.5]
