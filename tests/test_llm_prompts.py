"""Prompt sources (shiq_llm.data.prompts): files, rows through adapters with their options, splits, fields, and the
check that evaluation prompts do not occur in the training data. No model is loaded here."""

import json
import logging
from pathlib import Path

import pytest

from shiq_llm.data.prompts import check_held_out, load_prompts, normalized_prompt, parse_format_options
from shiq_llm.tasks.synthetic import task_prompts

FIXTURES = Path(__file__).parent / "fixtures"


def test_prompts_of_adapter_rows_and_adapter_options():
    """UltraFeedback: one prompt per instruction, whatever the score; an option the adapter rejects is named."""
    source = str(FIXTURES / "ultrafeedback.jsonl")
    expected = ["What is the capital of France?", "Add 2 and 3."]
    assert load_prompts(source, format="ultrafeedback") == expected
    assert load_prompts(source, format="ultrafeedback", format_options={"score": "helpfulness"}) == expected
    with pytest.raises(ValueError, match="score must be one of"):
        load_prompts(source, format="ultrafeedback", format_options={"score": "kindness"})
    with pytest.raises(ValueError, match="row 0 has no 'prompt' field"):
        load_prompts(source)  # without the adapter the rows have no prompt


def test_prompts_as_messages_from_hh_transcripts_and_conversations(tmp_path):
    hh = load_prompts(str(FIXTURES / "hh_rlhf.jsonl"), format="hh")
    assert hh[0] == [{"role": "user", "content": "What is a good name for a cat?"}]
    assert [m["role"] for m in hh[1]] == ["user", "assistant", "user"]  # earlier turns are part of the prompt
    assert len(hh) == 3  # chosen and rejected share their prompt: kept once
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                    {"role": "assistant", "content": "ciao"}]
    (tmp_path / "multi.jsonl").write_text(json.dumps({"messages": conversation, "rewards": [0, 1]}) + "\n")
    assert load_prompts(str(tmp_path / "multi.jsonl")) == [conversation[:2]]  # before the first assistant turn


def test_prompt_field_parquet_and_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "2 + 2?", "answer": "4"}, {"question": "3 + 3?", "answer": "6"}]).to_parquet(
        tmp_path / "qa.parquet")
    assert load_prompts(str(tmp_path / "qa.parquet"), prompt_field="question", split="train") == ["2 + 2?", "3 + 3?"]
    with pytest.raises(ValueError, match="row 0 has no 'query' field"):
        load_prompts(str(tmp_path / "qa.parquet"), prompt_field="query", split="train")
    assert load_prompts("synthetic") == task_prompts("eval")
    assert load_prompts("synthetic", default_split="train") == task_prompts("train")
    with pytest.raises(ValueError, match="--split 'test': split must be"):
        load_prompts("synthetic", split="test")
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ValueError, match="not to a .txt file"):
        load_prompts(str(tmp_path / "p.txt"), prompt_field="question")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(ValueError, match="row 0: field 'prompt' is empty"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_the_held_out_check_counts_prompts_equal_up_to_whitespace(caplog):
    train = ["repeat 5:", [{"role": "user", "content": "count up  from 7:"}], "repeat 6:"]
    held = ["  repeat 5:", "count up from 7:", "repeat 8:", "count down from 7:"]
    assert normalized_prompt("count  up\nfrom 7:") == normalized_prompt([{"role": "user", "content": "count up from 7:"}])
    with pytest.raises(ValueError, match=r"2 of 4 evaluation prompts \(50.0 %\) also occur in the training data "
                                         r"\(3 distinct prompts\), e.g. '  repeat 5:'"):
        check_held_out(held, train)
    with caplog.at_level(logging.WARNING, logger="shiq_llm.data.prompts"):
        assert check_held_out(held, train, on_leak="warn") == 2
    assert "2 of 4 evaluation prompts" in caplog.text
    assert check_held_out(task_prompts("eval"), task_prompts("train")) == 0  # the embedded task's split is clean


def test_parse_format_options():
    assert parse_format_options(["score=fine-grained_score", "chosen_reward=2", "as_messages=false"]) == {
        "score": "fine-grained_score", "chosen_reward": 2, "as_messages": False}
    assert parse_format_options(None) == {}
    with pytest.raises(ValueError, match="--format-option must be KEY=VALUE or a JSON object, got 'score'"):
        parse_format_options(["score"])
