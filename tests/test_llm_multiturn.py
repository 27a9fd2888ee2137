"""The embedded multi-turn task (shiq_llm.tasks.multiturn) and `shiq-llm make-multiturn-data` / `evaluate-multiturn`.

The checker against hand-worked dialogues, the environment, the prompt split, the demonstrations' noise
against its law, the masks with holes that tokenisation gives the rows, the environment loop (determinism,
tool answers computed from the agent's calls, rewards from the checker), the KL on agent tokens against a
per-dialogue loop on full logits, and end to end: make-multiturn-data with the default reference, whose
reward is clearly between 0 and the maximum and whose per-turn success falls with the turn.
"""

import contextlib
import io
import json
import math
import shlex

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shiq_llm.cli import main
from shiq_llm.core.models import tiny_causal_lm
from shiq_llm.data import collate, load_rows, tokenize_rows
from shiq_llm.generation.evaluate import conversation_kl, turn_index
from shiq_llm.tasks import multiturn
from shiq_llm.tasks.multiturn import (
    NUMBER_MAX,
    OPERATIONS,
    PARTIAL_CREDIT,
    START_MAX,
    Task,
    build_task_tokenizer,
    demonstration,
    parse_call,
    parse_task,
    random_task,
    sample_dialogues,
    task_prompts,
    tool_answer,
    turn_rewards,
)
from shiq_llm.tasks.synthetic import ReferenceConfig

PROMPT = "compute 7 +3 *2 -1"  # values 7 → 10 → 20 → 19


# --------------------------------------------------------------------------------------------------
# Task, environment and checker
# --------------------------------------------------------------------------------------------------


def test_task_round_trip_and_values():
    task = parse_task(PROMPT)
    assert task == Task(7, (("+", 3), ("*", 2), ("-", 1)))
    assert task.prompt == PROMPT and task.values == [7, 10, 20, 19]
    assert [task.call(k) for k in range(3)] == ["calc(7+3)", "calc(10*2)", "calc(20-1)"]
    assert parse_task("  compute 12 -9  ") == Task(12, (("-", 9),))
    for bad in ("compute 7", "compute seven +3", "calc(7+3)", "compute 7 +3 /2"):
        with pytest.raises(ValueError, match="not a prompt of the multi-turn task"):
            parse_task(bad)


@pytest.mark.parametrize(
    "call, parsed, answer",
    [
        ("calc(7+3)", (7, "+", 3), "10"),
        ("  calc(10*2)\n", (10, "*", 2), "20"),
        ("calc(-6*2)", (-6, "*", 2), "-12"),  # a negative number the tool returned earlier
        ("calc(3-9)", (3, "-", 9), "-6"),
        ("calc(7 + 3)", None, "error"),  # spaces inside: not the call syntax
        ("calc(7+3) calc(1+1)", None, "error"),  # two calls
        ("10", None, "error"),
        ("", None, "error"),
    ],
)
def test_environment_answers_the_call_as_written(call, parsed, answer):
    assert parse_call(call) == parsed
    assert tool_answer(call) == answer


@pytest.mark.parametrize(
    "calls, expected",
    [
        (["calc(7+3)", "calc(10*2)", "calc(20-1)"], [1.0, 1.0, 1.0]),  # the right dialogue
        ([" calc(7+3) ", "calc(10*2)\n", "calc(20-1)"], [1.0, 1.0, 1.0]),  # surrounding whitespace is fine
        (["calc(7+3)", "calc(10*2)", "calc(20+1)"], [1.0, 1.0, PARTIAL_CREDIT]),  # last operator wrong
        (["calc(7+3)", "calc(10*3)", "calc(30-1)"], [1.0, PARTIAL_CREDIT, 0.0]),  # turn 2 wrong, turn 3 follows the tool
        (["calc(7+3)", "calc(11*2)", "calc(20-1)"], [1.0, PARTIAL_CREDIT, 0.0]),  # turn 2 ignores the tool's 10
        (["calc(7+4)", "calc(10*2)", "calc(20-1)"], [PARTIAL_CREDIT, 0.0, 0.0]),  # later "right" calls after a break
        (["7+3", "calc(10*2)", "calc(20-1)"], [0.0, 0.0, 0.0]),  # malformed first turn
        (["calc(7+3)", "", "calc(20-1)"], [1.0, 0.0, 0.0]),  # an empty turn
        (["calc(7+3)", "calc(10*2)", "calc(20-1)calc"], [1.0, 1.0, 0.0]),  # trailing junk: malformed
    ],
)
def test_checker_on_hand_worked_dialogues(calls, expected):
    assert turn_rewards(PROMPT, calls) == expected
    assert turn_rewards(parse_task(PROMPT), calls) == expected


def test_checker_needs_one_call_per_operation():
    with pytest.raises(ValueError, match="2 agent turn"):
        turn_rewards(PROMPT, ["calc(7+3)", "calc(10*2)"])


def test_random_tasks_stay_in_range():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        task = random_task(generator)
        assert 1 <= task.start <= START_MAX and len(task.steps) == multiturn.TURNS
        assert all(0 <= v <= NUMBER_MAX for v in task.values)
        assert all(k in OPERATIONS[op][0] for op, k in task.steps)
        assert parse_task(task.prompt) == task


def test_prompt_split_is_fixed_disjoint_and_sized():
    train, held_out = task_prompts("train"), task_prompts("eval")
    assert len(train) == len(set(train)) == 256 and len(held_out) == len(set(held_out)) == 64
    assert not set(train) & set(held_out)
    assert task_prompts("train") == train and task_prompts("train", 10) == train[:10]
    assert task_prompts("train", 10, seed=1) != train[:10]
    assert all(len(parse_task(p).steps) == 2 for p in task_prompts("eval", 5, turns=2))
    with pytest.raises(ValueError, match="split"):
        task_prompts("all")


def test_demonstration_noise_follows_its_law():
    """A turn's call differs from the right call on the tool's last answer with probability
    noise · (1/3)(60/61 + 2/3 + 8/9): one of three fields is redrawn, and may be redrawn to the same value
    (61 left operands, 3 operators, 9 right operands). Checked within 5 binomial standard errors; later turns
    continue from the tool's answer; the rewards are the checker's."""
    noise, draws = 0.3, 1500
    generator = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(draws):
        task = random_task(generator)
        messages = demonstration(task, noise=noise, generator=generator)
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        value = task.start
        for turn, (op, k) in enumerate(task.steps):
            call = messages[1 + 2 * turn]["content"]
            changed += call != f"calc({value}{op}{k})"
            if turn + 1 < len(task.steps):
                assert messages[2 + 2 * turn]["content"] == tool_answer(call)
                value = int(tool_answer(call))
    p = noise * (60 / 61 + 2 / 3 + 8 / 9) / 3
    n = draws * multiturn.TURNS
    assert abs(changed / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    clean = demonstration(parse_task(PROMPT), noise=0.0, generator=generator)
    assert [m["content"] for m in clean] == [PROMPT, "calc(7+3)", "10", "calc(10*2)", "20", "calc(20-1)"]
    rows = multiturn.demonstration_rows(50, noise=noise, seed=0)
    for row in rows:
        calls = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert row["rewards"] == turn_rewards(row["messages"][0]["content"], calls)
        assert multiturn.prompt_split(row["messages"][0]["content"]) == "train"
    with pytest.raises(ValueError, match="noise"):
        demonstration(parse_task(PROMPT), noise=-0.1, generator=generator)


# --------------------------------------------------------------------------------------------------
# Tokenisation: masks with holes, one reward per turn
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_task_tokenizer()


def test_tokenizer_has_one_token_per_number_and_keyword(tokenizer):
    for k in range(100):
        for text in (str(k), f" {k}"):
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1
    for word in ("compute", "calc", "error"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("calc(7+3)", add_special_tokens=False)["input_ids"]) == 6  # calc ( 7 + 3 )


def test_rows_tokenize_to_masks_with_holes(tokenizer):
    """Hand-worked: the agent's tokens are exactly `calc ( a op b ) EOS` of each turn; the user and tool turns
    (role markers and contents) are state; each turn's reward sits on its EOS."""
    calls = ["calc(7+3)", "calc(10*3)", "calc(30-1)"]
    row = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": calls[0]},
                        {"role": "tool", "content": "10"}, {"role": "assistant", "content": calls[1]},
                        {"role": "tool", "content": "30"}, {"role": "assistant", "content": calls[2]}],
           "rewards": turn_rewards(PROMPT, calls)}
    assert row["rewards"] == [1.0, PARTIAL_CREDIT, 0.0]
    examples, report = tokenize_rows(load_rows([row]), tokenizer)
    assert report.kept == 1
    ids, mask, rewards = examples[0]["input_ids"], examples[0]["response_mask"], examples[0]["rewards"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    expected = (
        [("<|bos|>", 0), ("<|user|>", 0), ("compute", 0), ("Ġ7", 0), ("Ġ+", 0), ("3", 0), ("Ġ*", 0), ("2", 0),
         ("Ġ-", 0), ("1", 0), ("<|assistant|>", 0)]
        + [("calc", 1), ("(", 1), ("7", 1), ("+", 1), ("3", 1), (")", 1), ("<|eos|>", 1)]
        + [("<|tool|>", 0), ("10", 0), ("<|assistant|>", 0)]
        + [("calc", 1), ("(", 1), ("10", 1), ("*", 1), ("3", 1), (")", 1), ("<|eos|>", 1)]
        + [("<|tool|>", 0), ("30", 0), ("<|assistant|>", 0)]
        + [("calc", 1), ("(", 1), ("30", 1), ("-", 1), ("1", 1), (")", 1), ("<|eos|>", 1)]
    )
    assert list(zip(tokens, map(int, mask))) == expected
    eos_positions = [p for p, t in enumerate(tokens) if t == "<|eos|>"]
    assert [rewards[p] for p in eos_positions] == row["rewards"]
    assert sum(abs(r) for p, r in enumerate(rewards) if p not in eos_positions) == 0
    batch = collate(examples.to_list(), pad_token_id=tokenizer.pad_token_id)
    turns = turn_index(batch["response_mask"])[0]
    assert turns.tolist() == [-1] * 11 + [0] * 7 + [-1] * 3 + [1] * 7 + [-1] * 3 + [2] * 7


def test_turn_index_counts_runs():
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1], [0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert turn_index(mask).tolist() == [[-1, 0, 0, -1, -1, 1, -1, 2], [-1, 0, 0, 0, 0, 0, -1, -1]]


# --------------------------------------------------------------------------------------------------
# The environment loop and the KL on agent tokens (a briefly trained reference: mechanics, not quality)
# --------------------------------------------------------------------------------------------------

TINY = ReferenceConfig(noise=0.25, steps=30, demonstrations=64, vocab_size=512)


@pytest.fixture(scope="module")
def tiny_reference():
    return multiturn.build_reference(None, TINY)


def test_sampled_dialogues_are_deterministic_and_scored_by_the_checker(tiny_reference):
    model, tokenizer = tiny_reference
    prompts = task_prompts("train", 4)
    rng = torch.get_rng_state()
    dialogues = sample_dialogues(model, tokenizer, prompts, num_samples=3, max_new_tokens=8, seed=5, batch_size=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    again = sample_dialogues(model, tokenizer, prompts, num_samples=3, max_new_tokens=8, seed=5, batch_size=5)
    other = sample_dialogues(model, tokenizer, prompts, num_samples=3, max_new_tokens=8, seed=6, batch_size=5)
    assert [d.row() for d in dialogues] == [d.row() for d in again] != [d.row() for d in other]
    assert [d.prompt_index for d in dialogues] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for d in dialogues:
        roles = [m["role"] for m in d.messages]
        assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        assert d.messages[0]["content"] == prompts[d.prompt_index]
        calls = [m["content"] for m in d.messages if m["role"] == "assistant"]
        tools = [m["content"] for m in d.messages if m["role"] == "tool"]
        assert tools == [tool_answer(c) for c in calls[:-1]]  # the environment answered the call as written
        assert d.rewards == turn_rewards(prompts[d.prompt_index], calls) and len(d.finished) == 3


def test_offline_rows_load_and_make_data_writes_its_files(tiny_reference, tmp_path):
    model, tokenizer = tiny_reference
    prompts = task_prompts("train", 3)
    rows = multiturn.make_offline_dataset(model, tokenizer, prompts, samples_per_prompt=2, max_new_tokens=8, seed=0)
    assert 0 < len(rows) <= 6 and all(set(r) == {"messages", "rewards"} for r in rows)
    assert load_rows(rows).to_list() == rows  # the library's multi-turn row format, validated
    paths = multiturn.make_multiturn_data(tmp_path / "d", reference=TINY, samples_per_prompt=2, train_prompts=3,
                                          eval_prompts=2, max_new_tokens=8)
    written = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert written == rows  # same reference seed, same data seed: the same data
    held_out = [json.loads(line)["prompt"] for line in paths["eval_prompts"].read_text().splitlines()]
    assert held_out == task_prompts("eval", 2)
    loaded = AutoModelForCausalLM.from_pretrained(paths["reference"])
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(paths["reference"]).get_vocab() == tokenizer.get_vocab()


def _kl_by_loop(policy, ref, tokenizer, row):
    """Σ over the agent tokens of KL(π(·|s_p) ‖ π_ref(·|s_p)) and of ρ_p, and the KL per turn: one unpadded
    dialogue rendered by hand with the tiny chat template, full logits, float64."""
    pieces = [(tokenizer.bos_token, False)]  # the template: <|role|>content, EOS after an assistant turn
    for m in row["messages"]:
        if m["role"] == "assistant":
            pieces += [("<|assistant|>", False), (m["content"] + tokenizer.eos_token, True)]
        else:
            pieces += [(f"<|{m['role']}|>" + m["content"], False)]
    ids, is_action = [], []
    for piece, action in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        is_action += [action] * len(piece_ids)
    ids = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(policy(ids).logits[0].double(), dim=-1)
        logq = torch.log_softmax(ref(ids).logits[0].double(), dim=-1)
    total, mc, per_turn, previous = 0.0, 0.0, [], False
    for p, action in enumerate(is_action):
        if action and not previous:
            per_turn.append(0.0)
        if action:
            term = float((logp[p - 1].exp() * (logp[p - 1] - logq[p - 1])).sum())
            total += term
            per_turn[-1] += term
            mc += float(logp[p - 1, ids[0, p]] - logq[p - 1, ids[0, p]])
        previous = action
    return total, mc, per_turn


def test_conversation_kl_matches_a_loop_on_full_logits(tiny_reference):
    model, tokenizer = tiny_reference
    other = tiny_causal_lm(tokenizer, seed=3)
    rows = [d.row() for d in sample_dialogues(model, tokenizer, task_prompts("train", 3), num_samples=2, max_new_tokens=8)]
    empty_turn = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ""},
                               {"role": "tool", "content": "error"}, {"role": "assistant", "content": "calc(1+1)"}],
                  "rewards": [0.0, 0.0]}  # a sampled turn that began with EOS: its action is the EOS alone
    rows.append(empty_turn)
    kl = conversation_kl(other, model, tokenizer, rows, batch_size=4)  # two batches, padding inside each
    assert kl.per_turn.shape == (7, 3) and float(kl.per_turn[6, 2]) == 0.0  # the 2-turn row has no third turn
    for b, row in enumerate(rows):
        total, mc, per_turn = _kl_by_loop(other, model, tokenizer, row)
        assert kl.exact[b].item() == pytest.approx(total, rel=1e-4)
        assert kl.mc[b].item() == pytest.approx(mc, rel=1e-4, abs=1e-5)
        assert kl.per_turn[b, : len(per_turn)].tolist() == pytest.approx(per_turn, rel=1e-4)
    assert len(_kl_by_loop(other, model, tokenizer, empty_turn)[2]) == 2
    assert float(kl.exact.min()) > 0
    same = conversation_kl(model, model, tokenizer, rows)
    assert float(same.exact.abs().max()) == 0.0 and float(same.mc.abs().max()) == 0.0


def test_evaluate_dialogues_reports_consistent_turn_metrics(tiny_reference):
    model, tokenizer = tiny_reference
    other = tiny_causal_lm(tokenizer, seed=3)
    report = multiturn.evaluate_dialogues(other, model, tokenizer, task_prompts("eval", 3), num_samples=2,
                                          max_new_tokens=8, batch_size=4)
    turns = range(1, multiturn.TURNS + 1)
    assert report["num_samples"] == 6 and report["max_reward"] == 3.0
    assert report["mean_reward"] == pytest.approx(sum(report[f"reward_turn{k}"] for k in turns))
    assert report["kl"] == pytest.approx(sum(report[f"kl_turn{k}"] for k in turns)) and report["kl"] > 0
    assert report["success"] == report["success_turn3"]
    successes = [report[f"success_turn{k}"] for k in turns]
    assert successes == sorted(successes, reverse=True)  # a turn succeeds only after every earlier one did
    assert 0.0 <= report["finished"] <= 1.0


# --------------------------------------------------------------------------------------------------
# End to end: the default reference through the command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made_data(tmp_path_factory):
    """`shiq-llm make-multiturn-data` with the default reference, on fewer prompts than the default."""
    out = tmp_path_factory.mktemp("mt") / "data"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["make-multiturn-data", "--out", str(out), "--train-prompts", "64", "--samples-per-prompt", "4",
                     "--eval-prompts", "16", "--no-progress"]) == 0
    (out.parent / "printed.txt").write_text(printed.getvalue())
    return out


def test_the_printed_next_command_runs(made_data, tmp_path, monkeypatch):
    """make-multiturn-data's "next:" hint is a valid train command: run as printed, with a short budget."""
    [hint] = [line for line in (made_data.parent / "printed.txt").read_text().splitlines() if line.startswith("next: ")]
    argv = shlex.split(hint.removeprefix("next: "))
    assert argv[:2] == ["shiq-llm", "train"]
    monkeypatch.chdir(tmp_path)  # its --output_dir is relative
    assert main([*argv[1:], "--max_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"]) == 0
    assert (tmp_path / "runs" / "mt_shiq" / "final").is_dir()


def test_default_reference_is_mediocre_and_later_turns_fail_more(made_data):
    """Its own dialogues earn a mean episode reward clearly between 0 and the maximum, and the success rate
    of each turn falls with the turn (an early mistake breaks the episode)."""
    rows = load_rows(str(made_data / "train.jsonl")).to_list()
    assert len(rows) > 200 and {r["messages"][0]["content"] for r in rows} == set(task_prompts("train", 64))
    rewards = torch.tensor([r["rewards"] for r in rows], dtype=torch.float64)  # (B, K)
    episode = rewards.sum(dim=-1) / multiturn.TURNS
    assert 0.25 < float(episode.mean()) < 0.75
    success = (rewards == 1).double().mean(dim=0)  # (K,)
    assert float(success[0]) > float(success[1]) + 0.1 > float(success[2]) + 0.2


def test_evaluate_multiturn_cli(made_data, tmp_path, capsys):
    out = tmp_path / "report.json"
    reference = str(made_data / "reference")
    assert main(["evaluate-multiturn", "--model", reference, "--ref", reference, "--prompts",
                 str(made_data / "eval_prompts.jsonl"), "--num-samples", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 16 and report["num_samples"] == 32 and report["kl"] == 0.0
    assert 0 < report["mean_reward"] < 3 and json.loads(capsys.readouterr().out) == report


def test_cli_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_text("count up from 7:\n")
    assert main(["evaluate-multiturn", "--model", "x", "--ref", "x", "--prompts", str(bad)]) == 1
    assert "prompt 0: not a prompt of the multi-turn task" in capsys.readouterr().err
    assert main(["make-multiturn-data", "--out", str(tmp_path), "--samples-per-prompt", "0"]) == 2
    assert "--samples_per_prompt must be >= 1" in capsys.readouterr().err
