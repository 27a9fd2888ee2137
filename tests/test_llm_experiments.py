"""The LLM experiments (``shiq-llm experiment multiturn|ablation``) and the machinery they add to the sweep:
95 % intervals against hand-worked numbers, the final-reward rows, the long rows of a sweep, evaluation during
training (which must not change the run), and smoke runs of both experiments on tiny budgets."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shiq_llm.cli import commands as cli_commands
from shiq_llm.cli import main as cli_main
from shiq_llm.experiments import prepare_data
from shiq_llm.experiments.report import compare, final_rows, summarise
from shiq_llm.experiments.sweep import curve_rows, load_sweep_config
from shiq_toy.experiments import difference_ci, mean_ci
from shiq_toy.options import resolve_options


def _bisect(f, low: float, high: float) -> float:
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if f(mid) < 0 else (low, mid)
    return (low + high) / 2


# Student-t quantiles from the closed-form CDFs (x = t / √(ν + t²)): ν = 2, F = ½ + x/2, so x = 0.95;
# ν = 4, F = ½ + ¾ x (1 − x²/3), solved for F = 0.975 by bisection.
T_975_2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
_X4 = _bisect(lambda x: 0.75 * x * (1 - x**2 / 3) - 0.475, 0.0, 1.0)
T_975_4 = 2 * _X4 / math.sqrt(1 - _X4**2)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------
# Intervals and tables
# --------------------------------------------------------------------------------------------------


def test_mean_ci_is_the_student_t_interval_worked_by_hand():
    """[1, 2, 3]: mean 2, s = 1, so the half-width is t_{0.975,2} · 1/√3 = 2.4841."""
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-12)
    assert mean_ci([5.0])[0] == 5.0 and math.isnan(mean_ci([5.0])[1])  # no interval from one run
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_difference_ci_is_welchs_interval_worked_by_hand():
    """[1, 2, 3] − [4, 5, 6]: d = −3, s²/n = 1/3 each, se = √(2/3), ν = (2/3)² / (2 · (1/3)² / 2) = 4."""
    diff, half = difference_ci([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert diff == -3.0 and half == pytest.approx(T_975_4 * math.sqrt(2 / 3), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 runs"):
        difference_ci([1.0], [2.0, 3.0])


def test_summarise_final_rows_and_compare_on_hand_made_rows():
    rows = []
    for seed, (loss, reward) in enumerate([(9.0, 1.0), (7.0, 2.0), (8.0, 3.0)]):
        rows += [{"method": "shiq", "beta": 0.1, "seed": seed, "step": 0, "mean_reward": 0.5},
                 {"method": "shiq", "beta": 0.1, "seed": seed, "step": 1, "loss": loss},
                 {"method": "shiq", "beta": 0.1, "seed": seed, "step": 2, "loss": 1.0, "mean_reward": reward},
                 {"method": "dpo", "beta": 0.1, "seed": seed, "step": 2, "mean_reward": reward + 3.0}]
    finals = final_rows(rows)
    shiq = sorted((r for r in finals if r["method"] == "shiq"), key=lambda r: r["seed"])
    assert [(r["step"], r["mean_reward"], r["initial_loss"]) for r in shiq] == [(2, 1.0, 9.0), (2, 2.0, 7.0), (2, 3.0, 8.0)]
    (summary,) = [s for s in summarise(finals, ("method", "beta"), ["mean_reward", "initial_loss"]) if s["method"] == "shiq"]
    assert summary["mean_reward"] == 2.0 and summary["mean_reward_ci"] == pytest.approx(T_975_2 / math.sqrt(3))
    assert summary["initial_loss"] == 8.0 and summary["mean_reward_n"] == 3
    (c,) = compare(finals, "mean_reward", "shiq", "dpo")
    # same seeds, same data: the paired t-test on the seed-matched differences, all −3 (no spread: the interval is
    # the point −3, p = 0)
    assert c["diff"] == -3.0 and c["paired"] and c["p"] == 0.0 and c["ci"] == 0.0
    (c,) = compare(finals, "mean_reward", "shiq", "dpo", paired=False)
    assert c["diff"] == -3.0 and c["ci"] == pytest.approx(T_975_4 * math.sqrt(2 / 3)) and not c["paired"]


def test_curve_rows_merge_the_training_log_and_the_evaluations_with_the_reference_at_step_0(tmp_path):
    run = tmp_path / "runs" / "shiq_beta0.1_seed0"
    run.mkdir(parents=True)
    run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 4.0, "kl_estimate": 0.0, "grad_norm": 1.0}, {"step": 2, "loss": 3.0, "kl_estimate": 0.1},
        {"step": 2, "train_runtime": 1.0}]))
    reference = {"method": "reference", "algo": "reference", "beta": math.nan, "seed": math.nan, "mean_reward": 0.5,
                 "kl": 0.0, "train_seconds": 0.0}
    cell = {"method": "shiq", "algo": "shiq", "beta": 0.1, "seed": 0, "mean_reward": 0.9, "kl": 0.3, "steps": 2,
            "curve": [{"step": 1, "mean_reward": 0.7, "kl": 0.1}, {"step": 2, "mean_reward": 0.9, "kl": 0.3}]}
    rows = curve_rows([reference, cell], tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"method": "shiq", "algo": "shiq", "beta": 0.1, "seed": 0, "step": 0, "mean_reward": 0.5, "kl": 0.0}
    assert rows[1]["loss"] == 4.0 and rows[1]["mean_reward"] == 0.7 and "grad_norm" not in rows[1]
    assert rows[2]["loss"] == 3.0 and rows[2]["mean_reward"] == 0.9


def test_sweep_file_refuses_bad_evaluators_variants_and_eval_every(tmp_path):
    import yaml

    base = dict(out="o", model="m", train_data="d", algos=["shiq"], betas=[0.1])
    path = tmp_path / "s.yaml"

    def load(**values):
        path.write_text(yaml.safe_dump({**base, **values}))
        return load_sweep_config(path)

    with pytest.raises(ValueError, match="s.yaml: evaluator must be one of"):
        load(evaluator="chat")
    with pytest.raises(ValueError, match="eval_every must be an integer >= 0"):
        load(eval_every=-1)
    with pytest.raises(ValueError, match="variants.final must be a mapping with an 'algo'"):
        load(variants={"final": {"algo": "ppo"}})
    with pytest.raises(ValueError, match="variants.shiq must be"):
        load(variants={"shiq": {"algo": "shiq"}})
    with pytest.raises(ValueError, match="variants.final: unknown key 'data'"):
        load(variants={"final": {"algo": "shiq", "data": "x"}})
    with pytest.raises(ValueError, match=r"variants.final.train.beta is set by the sweep"):
        load(variants={"final": {"algo": "shiq", "train": {"beta": 1}}})
    assert load(algos=[], variants={"final": {"algo": "shiq"}}).variants == {"final": {"algo": "shiq"}}


def test_prepare_data_builds_once_reuses_and_refuses_other_settings(tmp_path):
    built = []

    def build(path):
        built.append(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("reference", "train.jsonl", "eval_prompts.jsonl"):
            (path / name).touch()

    assert prepare_data("", tmp_path / "d", {"steps": 10}, build) == tmp_path / "d"
    assert prepare_data("", tmp_path / "d", {"steps": 10}, build) == tmp_path / "d" and len(built) == 1
    with pytest.raises(ValueError, match="built with steps=10, not 20"):
        prepare_data("", tmp_path / "d", {"steps": 20}, build)
    with pytest.raises(ValueError, match="missing reference .make it with `shiq-llm make-data"):
        prepare_data(str(tmp_path / "none"), tmp_path / "x", {}, build, command="shiq-llm make-data")


def test_final_reward_rows_move_the_turn_rewards_to_the_last_turn():
    """Same dialogues, rewards [0, 0, Σ]: ShiQ's return to go from the first action is unchanged (Σ either way),
    but the later turns' actions now also see the rewards of the earlier turns; sequence methods see the same Σ."""
    from shiq_llm.data import collate, load_rows, tokenize_rows
    from shiq_llm.experiments.multiturn import final_reward_rows
    from shiq_llm.generation.evaluate import turn_index
    from shiq_llm.tasks.multiturn import build_task_tokenizer, demonstration_rows
    from shiq_toy.losses import RESIDUALS, TokenStats

    rows = [r for r in demonstration_rows(40, noise=0.3, seed=3) if sum(r["rewards"]) > 0][:4]
    final = final_reward_rows(rows)
    for row, moved in zip(rows, final):
        assert moved["messages"] == row["messages"]
        assert moved["rewards"] == [0.0, 0.0, sum(row["rewards"])]
    tokenizer = build_task_tokenizer()
    batches = [collate(tokenize_rows(load_rows(r), tokenizer)[0].to_list(), pad_token_id=tokenizer.pad_token_id)
               for r in (rows, final)]
    mask = batches[0]["response_mask"]
    assert torch.equal(mask, batches[1]["response_mask"])
    sums = [torch.where(b["response_mask"], b["rewards"], 0.0).sum(-1) for b in batches]
    torch.testing.assert_close(sums[0], sums[1])  # what dpo / copg / dro read
    at_init = TokenStats(torch.zeros(mask.shape), torch.zeros(mask.shape))  # ℓ = ℓ_ref: residual = −disc_t(r)
    per_turn, summed = (RESIDUALS["shiq"](at_init, at_init, b["rewards"].float(), mask, beta=0.1) for b in batches)
    turns = turn_index(mask)
    first = turns == 0
    torch.testing.assert_close(per_turn[first], summed[first])
    torch.testing.assert_close(summed[mask], -sums[1][:, None].expand_as(mask)[mask])


def test_quick_presets_and_command_line_options_combine():
    from shiq_llm.experiments import ablation, multiturn

    table = cli_commands()
    [args] = resolve_options(table["experiment multiturn"], ["--quick", "--seeds", "3", "--out", "x"], prog="t")
    assert args.seeds == 3 and args.steps == multiturn.QUICK.steps and args.out == Path("x")
    [args] = resolve_options(table["experiment ablation"], ["--no-progress", "--betas", "0.3", "1"], prog="t")
    assert args.betas == (0.3, 1.0) and args.progress is False and args.steps == ablation.AblationArgs().steps
    [args] = resolve_options(table["experiment ablation"], ["--quick", "--steps", "7", "--betas", "0.3,1"], prog="t")
    assert args.steps == 7 and args.betas == (0.3, 1.0) and args.seeds == ablation.QUICK.seeds
    assert multiturn.QUICK.seeds >= 2 and ablation.QUICK.seeds >= 2


def test_experiment_command_refuses_bad_values_in_one_line(tmp_path, capsys):
    assert cli_main(["experiment", "multiturn", "--out", str(tmp_path), "--betas", "-1"]) == 2
    assert "shiq-llm: error: betas must be finite numbers > 0" in capsys.readouterr().err
    assert cli_main(["experiment", "ablation", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "shiq-llm: error: seeds must be >= 1" in capsys.readouterr().err
    assert cli_main(["experiment", "multiturn", "--out", str(tmp_path), "--data", str(tmp_path / "no")]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli_main(["experiment", "ablation", "--methods", "ppo"]) == 2  # an unknown method: a usage error
    assert "--methods" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Smoke runs on tiny budgets
# --------------------------------------------------------------------------------------------------

TINY_MULTITURN = dict(betas=(0.3,), seeds=2, steps=4, batch_size=8, log_every=1, eval_every=2, eval_prompts=4,
                      eval_samples=1, train_prompts=8, samples_per_prompt=2, ref_steps=60, progress=False)


@pytest.fixture(scope="module")
def multiturn_run(tmp_path_factory):
    from shiq_llm.experiments.multiturn import MultiturnArgs, main

    out = tmp_path_factory.mktemp("multiturn")
    args = MultiturnArgs(out=out, methods=("shiq", "shiq_final_reward", "copg", "dro"), **TINY_MULTITURN)
    return out, args, main(args)


def test_multiturn_smoke_writes_the_long_csv_figure_and_table(multiturn_run):
    out, args, summary = multiturn_run
    rows = read_csv(out / "multiturn.csv")
    assert list(rows[0])[:5] == ["method", "algo", "beta", "seed", "step"]
    assert {"loss", "mean_reward", "success", "reward_turn1", "reward_turn3", "kl", "kl_turn2"} <= set(rows[0])
    cells = {(r["method"], r["seed"]) for r in rows}
    assert cells == {(m, s) for m in args.methods for s in ("0", "1")}
    for method, seed in cells:
        steps = [int(r["step"]) for r in rows if (r["method"], r["seed"]) == (method, seed)]
        assert steps == [0, 1, 2, 3, 4]  # the reference, a log at every step, evaluations at 2 and 4
        evaluated = [int(r["step"]) for r in rows if (r["method"], r["seed"]) == (method, seed) and r["mean_reward"]]
        assert evaluated == [0, 2, 4]
    reference = read_csv(out / "sweep" / "results.csv")[0]
    assert all(r["mean_reward"] == reference["mean_reward"] for r in rows if r["step"] == "0")
    assert {r["algo"] for r in rows if r["method"] == "shiq_final_reward"} == {"shiq"}
    assert (out / "multiturn.png").stat().st_size > 20_000
    table = (out / "multiturn_table.md").read_text()
    assert "| 0.3 | shiq_final_reward |" in table and " ± " in table and "shiq − dro" in table
    assert len(summary["cell_seconds"]) == 1 and {r["method"] for r in summary["final"]} == set(args.methods)
    assert "Holm" in table and "95 % Student-t interval of the mean over seeds" in table


def test_multiturn_smoke_trains_the_final_reward_variant_on_moved_rewards(multiturn_run):
    import yaml

    out, _, _ = multiturn_run
    per_turn = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    final = [json.loads(x) for x in (out / "train_final_reward.jsonl").read_text().splitlines()]
    assert [r["rewards"] for r in final] == [[0.0, 0.0, sum(r["rewards"])] for r in per_turn]
    cell = out / "sweep" / "runs" / "shiq_final_reward_beta0.3_seed0"
    assert yaml.safe_load((cell / "run_args.yaml").read_text())["dataset_name"] == str(out / "train_final_reward.jsonl")
    assert json.loads((cell / "result.json").read_text())["algo"] == "shiq"
    # the same tokens as the per-turn rows (only the rewards moved): the reference statistics are shared
    assert not (out / "sweep" / "reference_shiq_final_reward").exists()
    assert (out / "sweep" / "reference" / "manifest.json").is_file()


def test_evaluating_during_training_does_not_change_the_run(multiturn_run, tmp_path):
    """The sweep's shiq cell was evaluated at step 2 during training; the same run without the callback (from its
    run_args.yaml, rows re-tokenised from the file) ends with the same weights, bit for bit."""
    from shiq_llm.train.config import parse_train_args
    from shiq_llm.train.run import train_run

    out, _, _ = multiturn_run
    cell = out / "sweep" / "runs" / "shiq_beta0.3_seed0"
    model_args, data_args, args = parse_train_args(["--config", str(cell / "run_args.yaml"), "--output_dir",
                                                    str(tmp_path / "again"), "--disable_tqdm", "true"])
    again = train_run(model_args, data_args, args, print_logs=False)
    trained, replayed = load_file(cell / "final" / "model.safetensors"), load_file(again.final_dir / "model.safetensors")
    assert trained.keys() == replayed.keys()
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)
    assert not all(torch.equal(trained[k], load_file(out / "data" / "reference" / "model.safetensors")[k]) for k in trained)


def test_multiturn_rerun_skips_finished_cells(multiturn_run):
    from shiq_llm.experiments.multiturn import main

    out, args, summary = multiturn_run
    result = out / "sweep" / "runs" / "dro_beta0.3_seed1" / "result.json"
    before = result.stat().st_mtime_ns
    again = main(args)
    assert result.stat().st_mtime_ns == before
    assert again["markdown"] == summary["markdown"]


def test_ablation_smoke_on_both_tasks(multiturn_run, tmp_path):
    from shiq_llm.experiments.ablation import AblationArgs, main

    _, _, _ = multiturn_run
    multi_data = multiturn_run[0] / "data"
    args = AblationArgs(out=tmp_path, methods=("shiq", "shiq_init"), betas=(0.3,), seeds=2, steps=3, batch_size=8,
                        log_every=1, eval_every=2, single_eval_samples=1, multi_eval_prompts=4, multi_eval_samples=1,
                        single_ref_steps=40, completions_per_prompt=2, multi_data=str(multi_data), progress=False)
    summary = main(args)
    rows = read_csv(tmp_path / "ablation.csv")
    assert list(rows[0])[:6] == ["task", "method", "algo", "beta", "seed", "step"]
    assert {(r["task"], r["method"], r["seed"]) for r in rows} == {
        (t, m, s) for t in ("single_turn", "multi_turn") for m in args.methods for s in ("0", "1")}
    first_losses = {(r["task"], r["method"], r["seed"]): float(r["loss"]) for r in rows if r["step"] == "1"}
    assert len(first_losses) == 8
    # the same first batch (same seed): ShiQ/init's residual adds β vℓ_t to ShiQ's −disc_t(r) at initialisation
    for task in ("single_turn", "multi_turn"):
        for seed in ("0", "1"):
            assert first_losses[task, "shiq_init", seed] > 0 and first_losses[task, "shiq", seed] >= 0
            assert first_losses[task, "shiq_init", seed] != first_losses[task, "shiq", seed]
    assert {r["step"] for r in rows if r["task"] == "single_turn" and r["mean_reward"]} == {"0", "2", "3"}
    assert (tmp_path / "ablation.png").stat().st_size > 20_000
    assert "| single_turn | 0.3 | shiq_init |" in (tmp_path / "ablation_table.md").read_text()
    assert set(summary["seconds_by_stage"]) == {"single_turn", "multi_turn"}
    assert not (tmp_path / "data_multi_turn").exists()  # --multi-data was used as is


def test_tables_re_derived_from_the_csv_alone_are_the_run_s(multiturn_run, tmp_path):
    from shiq_llm.experiments.multiturn import main

    out, args, summary = multiturn_run
    again = main(dataclasses.replace(args, out=tmp_path, tables_from=str(out / "multiturn.csv")))
    assert again["markdown"] == summary["markdown"]
    assert (tmp_path / "multiturn_table.md").read_text() == (out / "multiturn_table.md").read_text()
    assert (tmp_path / "multiturn.png").is_file() and not (tmp_path / "multiturn.csv").exists()


def test_a_failed_cell_is_named_and_the_others_are_still_reported(multiturn_run, tmp_path, capsys):
    """Rows whose rewards are all equal give DPO no preference pair: its cell fails, the command says which and
    exits with status 1, and the CSV, figure and table of the other cells are written."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(multiturn_run[0] / "data" / "reference", data / "reference")
    shutil.copy(multiturn_run[0] / "data" / "eval_prompts.jsonl", data / "eval_prompts.jsonl")
    rows = [json.loads(x) for x in (multiturn_run[0] / "data" / "train.jsonl").read_text().splitlines()]
    (data / "train.jsonl").write_text("".join(json.dumps({**r, "rewards": [0.0, 0.0, 0.0]}) + "\n" for r in rows))
    out = tmp_path / "out"
    status = cli_main(["experiment", "multiturn", "--out", str(out), "--data", str(data), "--methods", "shiq", "dpo",
                       "--betas", "0.1", "--seeds", "1", "--steps", "2", "--batch-size", "4", "--eval-every", "0",
                       "--eval-prompts", "2", "--eval-samples", "1", "--no-progress"])
    assert status == 1
    printed = capsys.readouterr().out
    assert "1 of 2 sweep cells failed: dpo_beta0.1_seed0: ValueError: no usable pair" in printed, printed[-3000:]
    assert {r["method"] for r in read_csv(out / "multiturn.csv")} == {"shiq"}
    assert (out / "multiturn.png").is_file() and "| 0.1 | shiq |" in (out / "multiturn_table.md").read_text()
