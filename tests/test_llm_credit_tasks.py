"""Stepwise rows (a reward on every step) and the two credit-assignment variants of the counting task.

The data layer: the third canonical row form ``{prompt, completions, rewards}`` validated with one-line errors
naming the row and field, tokenised with each step's reward on the step's last token (with and without a chat
template, through truncation); the task: ``step_rewards`` sums to ``reward`` (a property), ``dense_rows`` gives the
same tokens as the single-turn rows, the long-horizon prompts, answers and tokenizer; the loss at initialisation
against its closed form (ShiQ's residual is ``−Σ_{u≥t} r_u`` at every response token, ShiQ/tk's only at the first
one, so ShiQ/tk cannot tell the two placements apart and ShiQ can); ``shiq-llm make-data --dense --words``; and the
ablation on ``single_turn``, ``dense`` and ``long_horizon`` with its reward-placement table.
"""

import contextlib
import csv
import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiq_llm.cli import main as cli_main
from shiq_llm.core.models import build_tokenizer, tiny_causal_lm
from shiq_llm.core.stats import response_token_stats
from shiq_llm.data import collate, load_rows, tokenize_rows
from shiq_llm.data.rows import row_form, validate_rows
from shiq_llm.tasks import synthetic
from shiq_llm.tasks.synthetic import build_task_tokenizer, dense_rows, number_range, reward, step_rewards, target_words
from shiq_llm.train.trainer import algorithm_loss

PROMPT = "count up from 7:"
ROWS = [
    {"prompt": PROMPT, "completion": " 8 9 3 11", "reward": 0.75},
    {"prompt": "repeat 5:", "completion": " 5 2 5 5 5", "reward": 0.6},
    {"prompt": "count down from 9:", "completion": " 8 7", "reward": 0.5},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_task_tokenizer()


# --------------------------------------------------------------------------------------------------
# The stepwise row form
# --------------------------------------------------------------------------------------------------


def test_row_form_recognises_stepwise_rows_and_names_what_is_missing():
    assert row_form(["prompt", "completions", "rewards"]) == "stepwise"
    assert row_form(["prompt", "completion", "reward"]) == "single"
    assert row_form(["messages", "rewards"]) == "multi"
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rewards'\].*stepwise"):
        row_form(["prompt", "completions"])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completions": [" a", " b"], "rewards": [1.0]},
     r"^row 0: field 'rewards' has 1 value\(s\) but 'completions' has 2 step\(s\)$"),
    ({"prompt": "p", "completions": [" a", ""], "rewards": [1.0, 0.0]}, r"^row 0: field 'completions'\[1\] is empty$"),
    ({"prompt": "p", "completions": [], "rewards": []}, r"^row 0: field 'completions' must be a non-empty list"),
    ({"prompt": "p", "completions": " a b", "rewards": [1.0]}, r"^row 0: field 'completions' must be a non-empty list"),
    ({"prompt": "p", "completions": [" a", 3], "rewards": [1.0, 0.0]},
     r"^row 0: field 'completions'\[1\] must be a string, got int$"),
    ({"prompt": "p", "completions": [" ", "  "], "rewards": [1.0, 0.0]},
     r"^row 0: field 'completions' is empty \(every step is blank\)$"),
    ({"prompt": "p", "completions": [" a"], "rewards": ["1"]},
     r"^row 0: field 'rewards'\[0\] must be a real number, got str '1'$"),
    ({"prompt": "p", "completions": [" a"], "rewards": [float("nan")]}, r"^row 0: field 'rewards'\[0\] must be finite"),
    ({"prompt": "p", "completions": [" a"], "rewards": 1.0}, r"^row 0: field 'rewards' must be a list of numbers"),
    ({"prompt": " ", "completions": [" a"], "rewards": [1.0]}, r"^row 0: field 'prompt' is empty$"),
])
def test_bad_stepwise_rows_get_one_line_naming_row_and_field(row, message):
    with pytest.raises(ValueError, match=message):
        validate_rows([row])


def test_a_stepwise_jsonl_file_loads_and_a_bad_line_is_named(tmp_path):
    good = tmp_path / "steps.jsonl"
    good.write_text(json.dumps({"prompt": PROMPT, "completions": [" 8", " 9"], "rewards": [0.25, 0.25]}) + "\n")
    rows = load_rows(good)
    assert rows.column_names == ["prompt", "completions", "rewards"] and rows[0]["rewards"] == [0.25, 0.25]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"prompt": PROMPT, "completions": [" 8"], "rewards": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: row 1: field 'rewards' has 2 value"):
        load_rows(bad)


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_each_step_s_reward_lands_on_the_step_s_last_token(tokenizer, use_chat_template):
    """Steps " 8", " 9", " 3", " 11" are one token each; EOS (written by the template, or appended) belongs to the
    last step, whose reward it carries; the single-turn row has the same tokens and its reward on EOS only."""
    stepwise = {"prompt": PROMPT, "completions": [" 8", " 9", " 3", " 11"], "rewards": [0.25, 0.25, 0.0, 0.25]}
    examples, _ = tokenize_rows([stepwise, ROWS[0]], tokenizer, use_chat_template=use_chat_template)
    dense, sparse = examples[0], examples[1]
    assert dense["input_ids"] == sparse["input_ids"] and dense["response_mask"] == sparse["response_mask"]
    first = dense["response_mask"].index(True)
    assert tokenizer.decode(dense["input_ids"][first:]) == " 8 9 3 11" + tokenizer.eos_token
    assert dense["rewards"][first:] == [0.25, 0.25, 0.0, 0.0, 0.25] and sum(dense["rewards"][:first]) == 0
    assert sparse["rewards"][first:] == [0.0, 0.0, 0.0, 0.0, 0.75]


def test_a_multi_token_step_gets_its_reward_on_its_last_token_and_truncation_keeps_the_return(tokenizer):
    row = {"prompt": PROMPT, "completions": [" 8 9", " 10", " 11 12"], "rewards": [0.5, -1.0, 2.0]}
    [example], _ = tokenize_rows([row], tokenizer)
    first = example["response_mask"].index(True)
    assert example["rewards"][first:] == [0.0, 0.5, -1.0, 0.0, 0.0, 2.0]  # 8 9 | 10 | 11 12 EOS
    long_prompt = {**row, "prompt": PROMPT}
    [cut], report = tokenize_rows([long_prompt], tokenizer, max_length=first + 3, max_prompt_length=first,
                                  max_truncated_fraction=1.0)
    assert report.response_truncated == 1 and cut["rewards"][first:] == [0.0, 0.5, 1.0]  # -1 + 2 moved onto " 10"


def test_a_template_that_rewrites_the_content_is_refused_naming_the_row():
    tokenizer = build_tokenizer(["a b c"] * 4, vocab_size=280)
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | upper }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    row = {"prompt": "p", "completions": [" a", " b"], "rewards": [1.0, 0.0]}
    with pytest.raises(ValueError, match=r"^row 0: the chat template rewrites the content of message 1"):
        tokenize_rows([row], tokenizer)


# --------------------------------------------------------------------------------------------------
# The dense variant of the counting task
# --------------------------------------------------------------------------------------------------

WORDS = st.lists(st.sampled_from(["8", "9", "10", "11", "12", "3", "x"]), min_size=1, max_size=7)


@settings(max_examples=60, deadline=None)
@given(words=WORDS, gaps=st.lists(st.sampled_from([" ", "  ", "\n"]), min_size=8, max_size=8),
       tail=st.sampled_from(["", " ", "\n"]))
def test_step_rewards_split_the_reward_over_the_words(words, gaps, tail):
    completion = "".join(g + w for g, w in zip(gaps, words)) + tail
    steps, rewards = step_rewards(PROMPT, completion)
    assert "".join(steps) == completion and [s.strip() for s in steps] == words
    assert sum(rewards) == pytest.approx(reward(PROMPT, completion), abs=1e-12)
    target = target_words(PROMPT)
    size = max(len(words), len(target))
    assert rewards == [float(i < len(target) and w == target[i]) / size for i, w in enumerate(words)]


def test_dense_rows_keep_the_tokens_and_the_total_and_refuse_other_rewards(tokenizer):
    rows = dense_rows(ROWS)
    assert rows[0] == {"prompt": PROMPT, "completions": [" 8", " 9", " 3", " 11"], "rewards": [0.25, 0.25, 0.0, 0.25]}
    assert [sum(r["rewards"]) for r in rows] == pytest.approx([r["reward"] for r in ROWS])
    dense, _ = tokenize_rows(rows, tokenizer)
    sparse, _ = tokenize_rows(ROWS, tokenizer)
    assert dense["input_ids"] == sparse["input_ids"]
    assert [sum(r) for r in dense["rewards"]] == pytest.approx([sum(r) for r in sparse["rewards"]])
    with pytest.raises(ValueError, match=r"^row 1: reward 0.9 is not the task's reward 0.6"):
        dense_rows([ROWS[0], {**ROWS[1], "reward": 0.9}])
    with pytest.raises(ValueError, match="has no word"):
        step_rewards(PROMPT, "   ")


# --------------------------------------------------------------------------------------------------
# The long-horizon variant
# --------------------------------------------------------------------------------------------------


def test_long_horizon_prompts_ask_for_their_length():
    prompts = synthetic.task_prompts("eval", words=32)
    assert prompts[0] == "count up from 4 for 32:" and len(prompts) == len(synthetic.task_prompts("eval"))
    assert target_words("count up from 7 for 32:") == [str(k) for k in range(8, 40)]
    assert target_words("count down from 4 for 32:")[-1] == "-28" and number_range(32) == (-28, 62)
    assert target_words("repeat 5 for 6:") == ["5"] * 6 and number_range() == (0, 34)
    for bad in ("count up from 7 for 0:", "count up from 7 for:", "count up from 7 for 3 4:"):
        with pytest.raises(ValueError, match="not a prompt of the synthetic task"):
            target_words(bad)


def test_long_horizon_tokenizer_makes_every_number_one_token_and_refuses_a_small_vocabulary():
    tokenizer = build_task_tokenizer(vocab_size=448, words=32)
    for k in range(-28, 63):
        ids = tokenizer(f" {k}", add_special_tokens=False)["input_ids"]
        assert len(ids) == (2 if k < 0 else 1), k
    answer = " " + " ".join(target_words("count up from 7 for 32:"))
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 32
    with pytest.raises(ValueError, match=r"vocab_size 300 is too small for 32-word answers"):
        build_task_tokenizer(vocab_size=300, words=32)


# --------------------------------------------------------------------------------------------------
# The loss: ShiQ reads each token's reward, ShiQ/tk only the total
# --------------------------------------------------------------------------------------------------


def test_loss_at_initialisation_against_its_closed_form_for_both_placements(tokenizer):
    """With the policy equal to the reference (ℓ = ℓ_ref), ShiQ's residual at response token t is −Σ_{u≥t} r_u
    (the return to go) and ShiQ/tk's is −Σ_u r_u at the first response token and 0 elsewhere (spec §3), so per
    row: ShiQ Σ_t (Σ_{u≥t} r_u)², ShiQ/tk R². Computed here from the token rewards by hand."""
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    losses = {}
    for name, rows in (("sparse", ROWS), ("dense", dense_rows(ROWS))):
        examples, _ = tokenize_rows(rows, tokenizer)
        batch = collate(examples.to_list(), pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            stats = response_token_stats(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        for method in ("shiq", "shiq_tk"):
            _, per_item, _ = algorithm_loss(method, stats, stats, batch, beta=0.5)
            losses[name, method] = per_item
        expected_shiq, expected_tk = [], []
        for rewards, mask in zip(examples["rewards"], examples["response_mask"]):
            rewards = [r for r, m in zip(rewards, mask) if m]
            to_go = [sum(rewards[t:]) for t in range(len(rewards))]
            expected_shiq.append(sum(g * g for g in to_go))
            expected_tk.append(sum(rewards) ** 2)
        torch.testing.assert_close(losses[name, "shiq"], torch.tensor(expected_shiq, dtype=torch.float32))
        torch.testing.assert_close(losses[name, "shiq_tk"], torch.tensor(expected_tk, dtype=torch.float32))
    torch.testing.assert_close(losses["dense", "shiq_tk"], losses["sparse", "shiq_tk"])
    assert (losses["dense", "shiq"] < losses["sparse", "shiq"] - 1e-3).all()  # the return to go falls along the row


# --------------------------------------------------------------------------------------------------
# The command and the experiment
# --------------------------------------------------------------------------------------------------


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_make_data_writes_dense_long_rows_and_checks_the_budget_first(tmp_path):
    code, _, err = _cli(["make-data", "--out", str(tmp_path / "x"), "--words", "8", "--max_new_tokens", "8"])
    assert code == 2 and "--max_new_tokens 8 cannot hold a 8-word answer" in err and not (tmp_path / "x").exists()
    out = tmp_path / "d"
    code, stdout, err = _cli(["make-data", "--out", str(out), "--words", "6", "--max_new_tokens", "9", "--dense",
                              "--ref_steps", "5", "--completions_per_prompt", "1", "--no-progress"])
    assert code == 0, err
    assert "stepwise rows" in stdout
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows and all(set(r) == {"prompt", "completions", "rewards"} and r["prompt"].endswith(" for 6:") for r in rows)
    for r in rows:
        assert sum(r["rewards"]) == pytest.approx(reward(r["prompt"], "".join(r["completions"])))
    prompts = [json.loads(line)["prompt"] for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert prompts == synthetic.task_prompts("eval", words=6)
    load_rows(out / "train.jsonl")  # canonical: shiq-llm train reads it as is


def test_ablation_on_the_credit_assignment_tasks_writes_the_placement_table(tmp_path):
    from shiq_llm.experiments.ablation import AblationArgs, main

    args = AblationArgs(out=tmp_path, tasks=("single_turn", "dense", "long_horizon"), methods=("shiq", "shiq_tk"),
                        betas=(0.3,), seeds=2, steps=3, batch_size=8, log_every=1, eval_every=2,
                        single_eval_samples=1, single_ref_steps=40, completions_per_prompt=2, long_words=10,
                        long_ref_steps=20, progress=False)
    summary = main(args)
    with (tmp_path / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"single_turn", "dense", "long_horizon"}
    dense = [json.loads(line) for line in (tmp_path / "data_dense" / "train.jsonl").read_text().splitlines()]
    sparse = [json.loads(line) for line in (tmp_path / "data_single_turn" / "train.jsonl").read_text().splitlines()]
    assert dense == dense_rows(sparse)
    run_args = (tmp_path / "sweep_dense" / "runs" / "shiq_beta0.3_seed0" / "run_args.yaml").read_text()
    assert f"model_name_or_path: {tmp_path / 'data_single_turn' / 'reference'}\n" in run_args  # shared reference
    long_prompts = (tmp_path / "data_long_horizon" / "eval_prompts.jsonl").read_text()
    assert "for 10:" in long_prompts
    assert {(c["variant"], c["key"]) for c in summary["placement"]} == {
        (m, k) for m in args.methods for k in ("mean_reward", "kl")}
    assert all(c["a"] == "dense" and c["b"] == "single_turn" and c["n"] == 2 for c in summary["placement"])
    table = (tmp_path / "ablation_table.md").read_text()
    assert "Reward placement" in table and "| shiq_tk | 0.3 | dense − single_turn | mean_reward |" in table
    assert "| long_horizon | 0.3 | shiq |" in table
