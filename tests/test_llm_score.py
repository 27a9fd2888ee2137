"""shiq-llm score (shiq_llm.generation.score, shiq_llm.generation.rewards).

Rewards of callables (per row, batched, multi-turn) against calling them by hand; a reward model against a
one-sequence-at-a-time forward of the same model (no padding), with its chat template; bad rewards (NaN, inf,
not a number, an exception, a list of the wrong length) naming the row, writing no partial file, and the
finished shards reused by the re-run once the function is fixed; resume after a kill; a reward model whose
tokenizer does not fit, with two labels, or given multi-turn rows; CLI errors.
"""

import json
import math
import re

import pytest
import torch

from shiq_llm.cli import main
from shiq_llm.core.models import build_tokenizer, tiny_reward_model
from shiq_llm.data.rows import validate_rows
from shiq_llm.generation.rewards import RewardFunction, RewardModel, batched
from shiq_llm.generation.score import ScoreConfig, score_rows
from shiq_llm.storage.jsonl import read_jsonl

SPEC = "tests.test_llm_score"
ROWS = [{"prompt": f"p{i}", "completion": " ".join(["w"] * (i % 4 + 1)), "sample_index": i} for i in range(10)]
BROKEN = {"row": None, "value": math.nan}  # the bad row of `sometimes_bad` and what it returns there


def word_count(prompt, completion):
    return len(completion.split())


@batched
def word_count_batched(prompts, completions):
    return torch.tensor([float(len(c.split())) for c in completions])  # a tensor is a list of numbers too


def sometimes_bad(prompt, completion):
    if BROKEN["row"] is not None and prompt == f"p{BROKEN['row']}":
        value = BROKEN["value"]
        if isinstance(value, Exception):
            raise value
        return value
    return word_count(prompt, completion)


@batched
def sometimes_bad_batched(prompts, completions):
    return [sometimes_bad(p, c) for p, c in zip(prompts, completions)]


def turn_lengths(messages):
    return [float(len(m["content"])) for m in messages if m["role"] == "assistant"]


def one_reward_only(messages):
    return [1.0]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, **overrides):
    values = dict(rows=str(_write(tmp_path / "rows.jsonl", ROWS)), out=str(tmp_path / "out.jsonl"),
                  reward=f"{SPEC}:word_count", shard_size=3, batch_size=4, progress=False)
    return ScoreConfig(**{**values, **overrides})


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("function", ["word_count", "word_count_batched"])
def test_a_reward_function_labels_every_row_in_order(tmp_path, function):
    summary = score_rows(_config(tmp_path, reward=f"{SPEC}:{function}"), log=_quiet)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert summary["rows"] == len(out) == len(ROWS)
    assert out == [{**r, "reward": float(word_count(r["prompt"], r["completion"]))} for r in ROWS]
    validate_rows(out)  # canonical rows: shiq-llm train reads them


def test_multi_turn_rows_get_one_reward_per_assistant_turn(tmp_path):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 42"}]
    rows = [{"id": i, "messages": conversation[: 2 + 2 * (i % 2)]} for i in range(4)]
    config = _config(tmp_path, rows=str(_write(tmp_path / "multi.jsonl", rows)), reward=f"{SPEC}:turn_lengths")
    score_rows(config, log=_quiet)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["rewards"] for r in out] == [[5.0], [5.0, 8.0], [5.0], [5.0, 8.0]]
    validate_rows(out)
    config = _config(tmp_path, rows=config.rows, out=str(tmp_path / "bad.jsonl"), reward=f"{SPEC}:one_reward_only")
    with pytest.raises(ValueError, match=r"row 1 \(prompt 'hi'\): .* must return a list of 2 reward\(s\)"):
        score_rows(config, log=_quiet)


@pytest.mark.parametrize("value, message", [
    (math.nan, "the reward must be finite, got nan"),
    (-math.inf, "the reward must be finite, got -inf"),
    ("high", "the reward must be a real number, got 'high'"),
    (None, "the reward must be a real number, got None"),
    (ZeroDivisionError("division by zero"), "raised ZeroDivisionError: division by zero"),
])
@pytest.mark.parametrize("function", ["sometimes_bad", "sometimes_bad_batched"])
def test_a_bad_reward_names_the_row_and_writes_nothing_partial(tmp_path, monkeypatch, value, message, function):
    monkeypatch.setitem(BROKEN, "row", 7)
    monkeypatch.setitem(BROKEN, "value", value)
    config = _config(tmp_path, reward=f"{SPEC}:{function}")
    with pytest.raises(ValueError, match=re.escape("row 7 (prompt 'p7'): ") + ".*" + re.escape(message)):
        score_rows(config, log=_quiet)
    parts = tmp_path / "out.jsonl.parts"
    assert not (tmp_path / "out.jsonl").exists()
    assert sorted(p.name for p in parts.iterdir()) == ["000000000-000000003.jsonl", "000000003-000000006.jsonl",
                                                       "manifest.json"]  # the shard of row 7, [6, 9), is not written
    monkeypatch.setitem(BROKEN, "row", None)  # the function fixed: the same command finishes the job
    shards = []
    score_rows(config, on_shard=lambda a, b: shards.append(a), log=_quiet)
    assert shards == [6, 9]
    assert [r["reward"] for r in read_jsonl(tmp_path / "out.jsonl")] == [float(word_count(r["prompt"], r["completion"]))
                                                                        for r in ROWS]


def test_a_killed_run_resumes_to_the_uninterrupted_file(tmp_path):
    score_rows(_config(tmp_path, out=str(tmp_path / "a.jsonl")), log=_quiet)

    def kill(start, stop):
        if start == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_rows(_config(tmp_path, out=str(tmp_path / "b.jsonl")), on_shard=kill, log=_quiet)
    assert not (tmp_path / "b.jsonl").exists()
    score_rows(_config(tmp_path, out=str(tmp_path / "b.jsonl")), log=_quiet)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        score_rows(_config(tmp_path, out=str(tmp_path / "b.jsonl")), log=_quiet)


# --------------------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm") / "rm"
    tokenizer = build_tokenizer()  # with a chat template
    tiny_reward_model(tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _one_at_a_time(directory, prompts, completions):
    """The reward model's logit on each text alone: chat template, tokens without added specials, no padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    out = []
    for prompt, completion in zip(prompts, completions):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 1] != tokenizer.bos_token_id  # one BOS
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def test_a_reward_model_scores_each_text_as_alone(reward_model_dir, tmp_path):
    prompts = ["what is the capital of france?", [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "0 1 2"}], "hi"]
    completions = ["the capital of france is paris.", "3", "the quick brown fox jumps over the lazy dog"]
    expected = _one_at_a_time(reward_model_dir, prompts, completions)
    assert max(expected) - min(expected) > 1e-3  # the texts get different rewards
    scorer = RewardModel(str(reward_model_dir), device="cpu", dtype="float32", batch_size=2)  # padded batches
    assert scorer.score(prompts, completions) == pytest.approx(expected, abs=1e-5)
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    rows_file = tmp_path / "rows.jsonl"
    _write(rows_file, rows)
    args = ["score", "--rows", str(rows_file), "--out", str(tmp_path / "out.jsonl"), "--reward-model",
            str(reward_model_dir), "--batch-size", "3", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert main(args) == 0
    assert [r["reward"] for r in read_jsonl(tmp_path / "out.jsonl")] == pytest.approx(expected, abs=1e-5)


def test_reward_models_that_cannot_score_are_refused(reward_model_dir, tmp_path):
    small = tiny_reward_model(100)  # 100 embedding rows for a tokenizer of 320 tokens
    small.save_pretrained(tmp_path / "small")
    build_tokenizer().save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="reward model .*small: tokenizer has 320 tokens but the model's embedding "
                                         "has 100 rows"):
        RewardModel(str(tmp_path / "small"), device="cpu", dtype="float32")
    two = tiny_reward_model(build_tokenizer(), num_labels=2)
    with pytest.raises(ValueError, match="it has 2 output labels; a reward model has one"):
        RewardModel("two-labels", model=two, tokenizer=build_tokenizer(), device="cpu")
    scorer = RewardModel(str(reward_model_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"row 4 \(prompt 'hi'\): multi-turn rows"):
        scorer.score_turns([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]], first_row=4)
    with pytest.raises(ValueError, match="no such file|does not appear|not a valid|reward model"):
        RewardModel(str(tmp_path / "missing"), device="cpu")


def test_score_cli_errors(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    _write(tmp_path / "no_completion.jsonl", [{"prompt": "a"}])
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    out = ["--out", str(tmp_path / "out.jsonl"), "--reward", f"{SPEC}:word_count"]
    cases = [
        (["--rows", str(tmp_path / "missing.jsonl")], "--rows .*missing.jsonl: no such file"),
        (["--rows", str(tmp_path / "empty.jsonl")], "no rows"),
        (["--rows", str(tmp_path / "no_completion.jsonl")], "row 0 needs 'prompt' and 'completion' fields"),
        (["--rows", str(tmp_path / "broken.jsonl")], "broken.jsonl: line 2: not valid JSON"),
        (["--rows", str(tmp_path / "no_completion.jsonl"), "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ]
    for args, message in cases:
        assert main(["score"] + args + out) in (1, 2), args  # 2: the option checks, 1: the job (before any work)
        assert re.search(message, capsys.readouterr().err), args
    _write(tmp_path / "rows.jsonl", ROWS)
    assert main(["score", "--rows", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                 "--reward", "no_such_module:f"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err
    assert main(["score", "--rows", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "give exactly one of --reward" in capsys.readouterr().err


def test_reward_function_checks_return_lengths_of_batched_calls():
    scorer = RewardFunction(batched(lambda prompts, completions: [1.0]), name="short")
    with pytest.raises(ValueError, match="rows 10–11: the batched reward function short must return a list of 2"):
        scorer.score(["a", "b"], ["x", "y"], first_row=10)


def test_skip_empty_leaves_out_rows_with_a_blank_completion(tmp_path):
    rows = ROWS[:3] + [{"prompt": "p3", "completion": ""}, {"prompt": "p4", "completion": " \n"}] + ROWS[5:7]
    rows_file = str(_write(tmp_path / "with_empty.jsonl", rows))
    score_rows(_config(tmp_path, rows=rows_file, out=str(tmp_path / "all.jsonl")), log=_quiet)
    assert [r["reward"] for r in read_jsonl(tmp_path / "all.jsonl")] == [1.0, 2.0, 3.0, 0.0, 0.0, 2.0, 3.0]
    messages = []
    score_rows(_config(tmp_path, rows=rows_file, skip_empty=True), log=messages.append)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["prompt"] for r in out] == ["p0", "p1", "p2", "p5", "p6"]
    validate_rows(out)
    assert "2 row(s) with an empty completion left out" in messages[-1]
