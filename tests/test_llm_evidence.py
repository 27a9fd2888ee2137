"""The statistics of the experiments' tables (Holm, paired / Welch tests, TOST) against scipy and hand-worked
values; the matched-KL comparison's protocol pieces (selection on validation only, the frontier interpolation);
the driver re-deriving a table from its CSV."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st

from shiq_llm.experiments import compare as cmp
from shiq_llm.experiments.report import compare, holm, paired_test, tost, verdicts, welch_test

A = [1.0, 2.0, 3.0, 5.0]
B = [0.5, 1.9, 2.2, 4.0]


def test_holm_matches_the_step_down_rule_worked_by_hand():
    # sorted: 0.01 (×4 = 0.04), 0.03 (×3 = 0.09), 0.04 (×2 = 0.08 → max 0.09), 0.5 (×1); NaN does not count
    assert holm([0.01, 0.04, 0.03, math.nan, 0.5]) == pytest.approx([0.04, 0.09, 0.09, math.nan, 0.5], nan_ok=True)
    assert holm([0.6, 0.5]) == [1.0, 1.0]  # capped at 1
    # against a slow loop over every ordering: Holm rejects H_(i) iff p_(j) < α / (m − j + 1) for all j ≤ i
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = list(rng.uniform(0, 0.1, size=6))
        adjusted = holm(p)
        order = sorted(range(6), key=lambda i: p[i])
        rejected, go = set(), True
        for j, i in enumerate(order):
            go = go and p[i] < 0.05 / (6 - j)
            if go:
                rejected.add(i)
        assert {i for i in range(6) if adjusted[i] < 0.05} == rejected


def test_paired_and_welch_tests_match_scipy():
    paired = paired_test(A, B)
    ref = st.ttest_rel(A, B)
    assert paired["p"] == pytest.approx(ref.pvalue) and paired["df"] == 3
    lo, hi = ref.confidence_interval()
    assert paired["diff"] == pytest.approx((lo + hi) / 2) and paired["ci"] == pytest.approx((hi - lo) / 2)
    welch = welch_test(A, B)
    ref = st.ttest_ind(A, B, equal_var=False)
    assert welch["p"] == pytest.approx(ref.pvalue) and welch["df"] == pytest.approx(ref.df)
    lo, hi = ref.confidence_interval()
    assert welch["ci"] == pytest.approx((hi - lo) / 2)


def test_tost_is_the_larger_of_two_one_sided_scipy_tests():
    d = np.array(A) - np.array(B)
    se = d.std(ddof=1) / math.sqrt(d.size)
    for margin in (0.3, 1.0, 2.0):
        upper = st.ttest_1samp(d, -margin, alternative="greater").pvalue  # H0: δ ≤ −margin
        lower = st.ttest_1samp(d, margin, alternative="less").pvalue  # H0: δ ≥ margin
        assert tost(d.mean(), se, d.size - 1, margin) == pytest.approx(max(upper, lower))
    assert math.isnan(tost(0.1, math.nan, 3, 1.0)) and math.isnan(tost(0.1, 0.1, 3, math.nan))
    assert tost(0.1, 0.0, 3, 1.0) == 0.0 and tost(1.5, 0.0, 3, 1.0) == 1.0  # no spread: the limits


def test_identical_runs_are_equivalent_not_inconclusive():
    """Two methods that cannot differ on the data (ShiQ/tk on dense and on sparse rewards) give the same value on
    every seed: the interval is the point 0, and TOST shows equivalence within any margin."""
    same = paired_test(A, A)
    assert same == {"diff": 0.0, "ci": 0.0, "p": 1.0, "df": len(A) - 1, "paired": True}
    rows = [{"method": m, "beta": 0.1, "seed": s, "r": v} for m in ("shiq", "x") for s, v in enumerate(A)]
    (c,) = verdicts(compare(rows, "r", "shiq", "x", margin=0.02))
    assert c["tost_p"] == 0.0 and c["verdict"] == "equivalent (±0.02)"
    shifted = paired_test([a + 0.5 for a in A], A)
    assert shifted["ci"] == 0.0 and shifted["p"] == 0.0


def test_compare_pairs_seed_matched_runs_and_verdicts_never_read_non_significance_as_equality():
    rows = [{"method": m, "beta": 0.1, "seed": s, "r": v} for m, vals in (("shiq", A), ("x", B))
            for s, v in enumerate(vals)]
    (c,) = compare(rows, "r", "shiq", "x", margin=2.0)
    assert c["paired"] and c["p"] == pytest.approx(st.ttest_rel(A, B).pvalue)
    rows_unmatched = [dict(r, seed=r["seed"] + 10 * (r["method"] == "x")) for r in rows]
    (c2,) = compare(rows_unmatched, "r", "shiq", "x")
    assert not c2["paired"] and c2["p"] == pytest.approx(st.ttest_ind(A, B, equal_var=False).pvalue)
    # p = 0.055 (not significant): equivalence within ±2 (TOST p < 0.05) is shown, within ±0.3 it is not
    assert verdicts([c])[0]["verdict"] == "equivalent (±2)"
    (c3,) = compare(rows, "r", "shiq", "x", margin=0.3)
    assert verdicts([c3])[0]["verdict"] == "inconclusive"
    # Holm: two p = 0.03 → 0.06 each, no longer a finding; alone, 0.03 is
    fake = [{"a": "shiq", "b": "x", "diff": 1.0, "p": 0.03, "margin": math.nan, "tost_p": math.nan}] * 2
    assert [v["verdict"] for v in verdicts(fake)] == ["inconclusive"] * 2
    assert verdicts(fake[:1])[0]["verdict"] == "shiq > x"


def test_frontier_interpolation_and_budgets_worked_by_hand():
    # frontier points (KL, reward), given out of order: (0.2, 0.6), (1.0, 0.8), (0.5, 0.7)
    kls, rewards = [0.2, 1.0, 0.5], [0.6, 0.8, 0.7]
    assert cmp.interpolate_frontier(kls, rewards, 0.35) == pytest.approx(0.65)  # halfway between 0.2 and 0.5
    assert cmp.interpolate_frontier(kls, rewards, 0.75) == pytest.approx(0.75)  # 0.7 + (0.25/0.5)·0.1
    assert math.isnan(cmp.interpolate_frontier(kls, rewards, 1.5))  # no extrapolation
    # common range [max(0.2, 0.4), min(1.0, 2.0)] = [0.4, 1.0]: 2 budgets at the centres of 2 cells
    means = {"a": list(zip(kls, rewards)), "b": [(0.4, 0.5), (2.0, 0.9)]}
    assert cmp.kl_budgets(means, 2) == pytest.approx([0.55, 0.85])
    assert cmp.kl_budgets({"shiq": [(0.1, 0.5), (0.3, 0.6)], "b": [(1.0, 0.5), (2.0, 0.6)]}, 2) == \
        pytest.approx([0.15, 0.25])  # no overlap: shiq's range


def _test_rows(values):
    """Test-split rows from {(method, β): [(KL, reward) per seed]}."""
    return [{"method": m, "beta": b, "seed": s, "split": "test", "kl": kl, "mean_reward": r}
            for (m, b), points in values.items() for s, (kl, r) in enumerate(points)]


def test_frontier_rows_read_the_means_frontier_and_bootstrap_over_seeds():
    rows = _test_rows({("shiq", 1.0): [(0.1, 0.5), (0.3, 0.7)], ("shiq", 0.1): [(0.9, 0.8), (1.1, 0.8)]})
    # means: (0.2, 0.6) and (1.0, 0.8); at KL 0.6: 0.6 + 0.5·0.2 = 0.7
    (row,) = cmp.frontier_rows(rows, [0.6], n_boot=500)
    assert row["reward"] == pytest.approx(0.7)
    assert 0.6 <= row["reward_lo"] <= row["reward"] <= row["reward_hi"] <= 0.8 and row["n_boot"] > 0
    same = _test_rows({("shiq", 1.0): [(0.2, 0.6)] * 3, ("shiq", 0.1): [(1.0, 0.8)] * 3})
    (row,) = cmp.frontier_rows(same, [0.6], n_boot=50)
    assert row["reward_lo"] == pytest.approx(0.7) and row["reward_hi"] == pytest.approx(0.7)  # no spread, no width


def test_budget_comparisons_are_paired_t_tests_on_each_seeds_frontier():
    shiq = {("shiq", 1.0): [(0.0, 0.5)] * 3, ("shiq", 0.1): [(1.0, 0.9), (1.0, 0.8), (1.0, 1.0)]}
    other = {("dpo", 1.0): [(0.0, 0.5)] * 3, ("dpo", 0.1): [(1.0, 0.7), (1.0, 0.7), (1.0, 0.6)]}
    (c,) = cmp.budget_comparisons(_test_rows({**shiq, **other}), [0.5], margin=0.01)
    # at KL 0.5 each seed's frontier is halfway: shiq 0.70, 0.65, 0.75; dpo 0.60, 0.60, 0.55
    ref = st.ttest_rel([0.70, 0.65, 0.75], [0.60, 0.60, 0.55])
    assert c["diff"] == pytest.approx(0.1166666) and c["p"] == pytest.approx(ref.pvalue) and c["paired"]


def test_selection_refuses_test_rows_and_picks_the_best_validation_objective():
    rows = [{"method": "shiq", "beta": 0.1, "learning_rate": lr, "seed": 0, "split": "validation", "objective": j}
            for lr, j in ((1e-3, 0.5), (3e-3, 0.7), (3e-4, 0.7))]
    assert cmp.select_learning_rates(rows) == {("shiq", 0.1): 3e-4}  # a tie goes to the smaller rate
    with pytest.raises(ValueError, match="validation rows only"):
        cmp.select_learning_rates(rows + [dict(rows[0], split="test", objective=9.0)])
    validation, test = cmp.split_prompts([f"p{i}" for i in range(5)])
    assert validation == ["p0", "p2", "p4"] and test == ["p1", "p3"]


TINY = dict(methods=("shiq", "dpo"), betas=(0.3, 1.0), learning_rates=(1e-3, 3e-3), seeds=2, steps=2, batch_size=4,
            eval_samples=1, ref_steps=60, completions_per_prompt=2, bootstrap=20, budgets=2, progress=False)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    args = cmp.CompareArgs(out=out, **TINY)
    return out, args, cmp.main(args)


def test_compare_smoke_selects_on_validation_and_tests_on_disjoint_held_out_prompts(compare_run):
    import json

    from shiq_llm.experiments.driver import read_rows

    out, args, summary = compare_run
    rows = read_rows(out / "compare.csv")
    assert (out / "compare.csv").read_text().splitlines()[0].split(",")[:9] == list(cmp.FIRST)
    validation = [json.loads(x)["prompt"] for x in (out / "validation_prompts.jsonl").read_text().splitlines()]
    test = [json.loads(x)["prompt"] for x in (out / "test_prompts.jsonl").read_text().splitlines()]
    train = {json.loads(x)["prompt"] for x in (out / "data" / "train.jsonl").read_text().splitlines()}
    assert validation and test and not set(validation) & set(test) and not (set(validation) | set(test)) & train
    # the selection sweep saw the validation prompts only; the chosen rate is the validation argmax
    assert json.loads((out / "selection" / "reference_result.json").read_text())["num_samples"] == len(validation)
    for method in args.methods:
        for beta in args.betas:
            cells = [r for r in rows if r["split"] == "validation" and r["method"] == method and r["beta"] == beta]
            best = max(cells, key=lambda r: (r["objective"], -r["learning_rate"]))
            assert [r["learning_rate"] for r in cells if r["selected"]] == [best["learning_rate"]]
            tested = {r["learning_rate"] for r in rows if r["split"] == "test" and r["method"] == method
                      and r["beta"] == beta}
            assert tested == {best["learning_rate"]}
    assert {r["seed"] for r in rows if r["split"] == "test"} == {0, 1}
    assert (out / "compare.png").stat().st_size > 0 and "95 %" in (out / "compare_table.md").read_text()
    header = (out / "frontier.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["method", "kl_budget", "reward", "reward_lo", "reward_hi"]


def test_compare_tables_re_derived_from_the_csv_are_the_same(compare_run, tmp_path):
    out, args, _ = compare_run
    again = cmp.CompareArgs(out=tmp_path, tables_from=str(out / "compare.csv"), **TINY)
    cmp.main(again)
    assert (tmp_path / "compare_table.md").read_text() == (out / "compare_table.md").read_text()
    assert (tmp_path / "frontier.csv").read_text() == (out / "frontier.csv").read_text()


def test_steps_to_threshold_worked_by_hand():
    from shiq_llm.experiments.report import steps_to_threshold

    curves = {("a", 0): [0.5, 0.6, 0.9, 0.9], ("a", 1): [0.5, 0.8, 0.85, 0.9], ("b", 0): [0.5, 0.55, 0.6, 0.7],
              ("b", 1): [0.5, 0.5, 0.6, 0.7]}
    rows = [{"task": "t", "beta": 0.1, "method": m, "seed": s, "step": 10 * i, "mean_reward": v}
            for (m, s), values in curves.items() for i, v in enumerate(values)]
    # best final mean 0.9 (a), reference 0.5: threshold 0.5 + 0.5 · 0.4 = 0.7
    found = steps_to_threshold(rows, by=("task", "beta"), fraction=0.5)
    assert all(r["threshold"] == pytest.approx(0.7) for r in found)
    assert {(r["method"], r["seed"]): r["step"] for r in found} == {("a", 0): 20, ("a", 1): 10, ("b", 0): 30,
                                                                   ("b", 1): 30}
    got = {(r["method"], r["seed"]): r["step"] for r in steps_to_threshold(rows, by=("task", "beta"), fraction=1.0)}
    assert got == {("a", 0): 20, ("a", 1): 30, ("b", 0): None, ("b", 1): None}  # b never reaches 0.9: censored


#: The tables of docs/figures and the options that re-derive them from their CSVs (docs/results.md).
DOCS_TABLES = {"multiturn": ("multiturn", []), "ablation": ("ablation", []), "compare": ("compare", []),
               "ablation_credit": ("ablation", ["--eval-every", "20"]),
               "ablation_long_lr1e-4": ("ablation", ["--eval-every", "20"])}


@pytest.mark.parametrize("name", sorted(DOCS_TABLES))
def test_the_docs_tables_are_what_their_csv_gives(name, tmp_path):
    """Every table the docs include is re-derived from its committed CSV alone by the command docs/results.md
    states, to the character: no number in the docs is typed by hand."""
    from pathlib import Path

    from shiq_llm.cli import main

    experiment, options = DOCS_TABLES[name]
    figures = Path(__file__).resolve().parents[1] / "docs" / "figures"
    assert main(["experiment", experiment, "--tables-from", str(figures / f"{name}.csv"), "--out", str(tmp_path),
                 *options]) == 0
    assert (tmp_path / f"{experiment}_table.md").read_text() == (figures / f"{name}_table.md").read_text()
