"""``tokenize_rows`` through ``datasets.Dataset.map``: the same examples and report as the row-by-row loop it
replaced (``tests/ref_tokenization.py``) on every fixture, in one process and in two, errors naming the row,
and rows read from a file tokenised once (the ``datasets`` cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shiq_llm.core.models import build_tokenizer
from shiq_llm.data.rows import load_rows
from shiq_llm.data.tokenization import tokenize_rows
from tests.ref_tokenization import tokenize_rows_loop

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def fixture_rows(tmp_path_factory):
    """Canonical rows of every fixture through its adapter (Datasets read from files), and a list that mixes
    string and message prompts, single- and multi-turn rows (what Arrow cannot hold as one table)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    sets = {
        "ultrafeedback": load_rows(str(FIXTURES / "ultrafeedback.jsonl"), format="ultrafeedback", cache_dir=cache),
        "ultrafeedback_fine": load_rows(str(FIXTURES / "ultrafeedback.jsonl"), format="ultrafeedback",
                                        format_options={"score": "fine-grained_score"}, cache_dir=cache),
        "binarized": load_rows(str(FIXTURES / "ultrafeedback_binarized.jsonl"), format="paired", cache_dir=cache),
        "paired": load_rows(str(FIXTURES / "paired_plain.jsonl"), format="paired", cache_dir=cache),
        "hh": load_rows(str(FIXTURES / "hh_rlhf.jsonl"), format="hh", cache_dir=cache),
        "bfcl": load_rows(str(FIXTURES / "bfcl_multi_turn.jsonl"), format="bfcl", cache_dir=cache),
    }
    mixed = sets["hh"].to_list()[:3] + sets["bfcl"].to_list()[:1] + sets["paired"].to_list()
    sets["mixed_list"] = [{k: v for k, v in row.items() if v is not None} for row in mixed]
    return sets


def assert_same(got, want):
    (examples, report), (ref_examples, ref_report) = got, want
    assert report == ref_report
    assert examples.features == ref_examples.features
    assert examples.to_dict() == ref_examples.to_dict()


def test_map_equals_the_loop_on_every_fixture(tok, fixture_rows):
    for name, rows in fixture_rows.items():
        assert_same(tokenize_rows(rows, tok), tokenize_rows_loop(rows, tok))
    rows = fixture_rows["mixed_list"]
    for options in ({"max_length": 24}, {"max_length": 24, "long_response": "drop"},
                    {"max_length": 40, "max_prompt_length": 30}):
        options["max_truncated_fraction"] = 1.0
        want = tokenize_rows_loop(rows, tok, **options)
        assert_same(tokenize_rows(rows, tok, **options), want)
        assert want[1].prompt_truncated + want[1].response_truncated + want[1].dropped_long_response > 0  # cuts happen
    # prompt ids are numbered among the kept rows, in order: the loop's dict and Arrow's dictionary agree
    examples, report = tokenize_rows(rows, tok, max_length=24, long_response="drop", max_truncated_fraction=1.0)
    assert report.dropped_long_response > 0 and examples["prompt_id"][0] == 0


def test_two_processes_give_the_one_process_result(tok, fixture_rows):
    """``num_proc=2``: two contiguous shards tokenised in two processes, concatenated in order."""
    options = {"max_length": 24, "long_response": "drop", "max_truncated_fraction": 1.0}
    for rows in (fixture_rows["mixed_list"], fixture_rows["ultrafeedback"]):
        assert_same(tokenize_rows(rows, tok, num_proc=2, **options), tokenize_rows_loop(rows, tok, **options))


def test_a_plain_tokenizer_gives_the_loop_s_examples(fixture_rows):
    plain = build_tokenizer(chat_template=False)
    for name in ("paired", "ultrafeedback"):
        assert_same(tokenize_rows(fixture_rows[name], plain), tokenize_rows_loop(fixture_rows[name], plain))


def test_errors_name_the_row_in_any_process(tok):
    rows = [{"prompt": f"p{i}", "completion": " x", "reward": 1.0} for i in range(6)]
    rows[4] = {"prompt": "p4", "completion": " x", "reward": "0.5"}  # in the second of two shards
    for num_proc in (None, 2):
        with pytest.raises(ValueError, match=r"^row 4: field 'reward' must be a real number, got str '0.5'$"):
            tokenize_rows(rows, tok, num_proc=num_proc)
    with pytest.raises(ValueError, match="num_proc must be an integer >= 1"):
        tokenize_rows(rows, tok, num_proc=0)
    with pytest.raises(ValueError, match="the dataset has no rows"):
        tokenize_rows([], tok)


def test_rows_from_a_file_are_tokenised_once(tok, tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"count up from {i}:", "completion": " 1 2 3", "reward": i / 4}) + "\n"
                            for i in range(8)))
    rows = load_rows(str(path), cache_dir=str(tmp_path / "cache"))
    cache_dir = Path(rows.cache_files[0]["filename"]).parent
    first = tokenize_rows(rows, tok, max_length=9, max_truncated_fraction=1.0)
    files = sorted(p.name for p in cache_dir.glob("cache-*.arrow"))
    assert files  # the map's output is cached beside the rows
    again = tokenize_rows(rows, tok, max_length=9, max_truncated_fraction=1.0)
    assert sorted(p.name for p in cache_dir.glob("cache-*.arrow")) == files  # loaded, not recomputed
    assert_same(again, first)
    assert first[1] == tokenize_rows_loop(rows, tok, max_length=9, max_truncated_fraction=1.0)[1]
    assert first[1].prompt_truncated == 8  # the report comes back from the cached columns too
    other = tokenize_rows(rows, tok, max_length=10, max_truncated_fraction=1.0)  # other options: another cache file
    assert len(list(cache_dir.glob("cache-*.arrow"))) == len(files) + 1
    assert other[1] != first[1] or other[0]["input_ids"] != first[0]["input_ids"]
