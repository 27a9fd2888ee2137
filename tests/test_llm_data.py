"""shiq_llm data pipeline: loading, validation, tokenisation (action mask, BOS/EOS, rewards), truncation,
collation and pairs.

References: transformers' own ``apply_chat_template`` tokenisation and its ``{% generation %}`` assistant mask
(an independent way to locate the assistant tokens), brute-force enumeration of pairs, and invariants of the
stated truncation policy.
"""

import functools
import json
import math
from itertools import combinations

import datasets
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shiq_llm.core.models import build_tokenizer
from shiq_llm.data import (
    TokenizeReport,
    collate,
    load_rows,
    preference_pairs,
    sequence_rewards,
    tokenize_rows,
    validate_rows,
)
from shiq_llm.data.tokenization import Encoded, truncate_encoded

# CHAT_TEMPLATE with the assistant turns wrapped in {% generation %}: transformers then returns its own
# assistant-token mask (``return_assistant_tokens_mask``), an independent reference for ours.
GENERATION_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return build_tokenizer(chat_template=False)


def action_text(tokenizer, example) -> str:
    ids = [i for i, m in zip(example["input_ids"], example["response_mask"]) if m]
    return tokenizer.decode(ids)


def mask_runs(mask) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of True."""
    runs, start = [], None
    for p, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = p
        if not m and start is not None:
            runs.append((start, p))
            start = None
    return runs


SINGLE = [
    {"prompt": "what is 2+2?", "completion": "4", "reward": 1.0},
    {"prompt": "what is 2+2?", "completion": "5", "reward": 0.0},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "completion": "hello", "reward": 0.5},
]
MULTI = [
    {
        "messages": [
            {"role": "user", "content": "weather in paris?"},
            {"role": "assistant", "content": "get_weather(city='paris')"},
            {"role": "tool", "content": "sunny, 21"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "You are welcome."},
        ],
        "rewards": [0.25, 1.0, -0.5],
    }
]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_load_rows_reads_every_file_format_to_the_same_rows(tmp_path):
    cache = str(tmp_path / "cache")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in SINGLE[:2]) + "\n")
    (tmp_path / "rows.json").write_text(json.dumps(SINGLE[:2]))
    datasets.Dataset.from_list(SINGLE[:2]).to_parquet(str(tmp_path / "rows.parquet"))
    sources = [
        tmp_path / "rows.jsonl",
        str(tmp_path / "rows.json"),
        tmp_path / "rows.parquet",
        SINGLE[:2],
        datasets.Dataset.from_list(SINGLE[:2]),
        datasets.DatasetDict({"train": datasets.Dataset.from_list(SINGLE[:2])}),
    ]
    for source in sources:
        rows = load_rows(source, cache_dir=cache) if not isinstance(source, (list, datasets.DatasetDict, datasets.Dataset)) else load_rows(source)
        assert isinstance(rows, datasets.Dataset)
        assert rows.to_list() == SINGLE[:2], source


def test_load_rows_multi_turn_jsonl_and_reward_on_messages(tmp_path, tok):
    (tmp_path / "multi.jsonl").write_text(json.dumps(MULTI[0]) + "\n")
    rows = load_rows(tmp_path / "multi.jsonl", cache_dir=str(tmp_path / "cache"))
    assert rows.to_list() == MULTI
    # the accepted alternative: a reward on each assistant message instead of a 'rewards' list
    rewards = iter(MULTI[0]["rewards"])
    inline = [{"messages": [dict(m, reward=next(rewards)) if m["role"] == "assistant" else m for m in MULTI[0]["messages"]]}]
    a, _ = tokenize_rows(load_rows(inline), tok)
    b, _ = tokenize_rows(load_rows(MULTI), tok)
    assert a.to_list() == b.to_list()


def test_load_rows_hub_path_calls_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_list(SINGLE[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("someone/reward-data", split="test", revision="main")
    assert calls == [("someone/reward-data", {"split": "test", "revision": "main"})]
    assert rows.to_list() == SINGLE[:2]


def test_load_rows_bad_sources(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt,completion,reward\n")
    with pytest.raises(ValueError, match="extension"):
        load_rows(tmp_path / "rows.csv")
    with pytest.raises(ValueError, match="file not found"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no rows"):
        load_rows([])
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        load_rows(SINGLE, format="nope")
    with pytest.raises(ValueError, match="source must be"):
        load_rows(42)


# --------------------------------------------------------------------------------------------------
# Validation: every bad input names its row and field
# --------------------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "completion": "c", "reward": 1.0}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"reward": float("nan")}, r"row 1: field 'reward' must be finite, got nan"),
        ({"reward": float("inf")}, r"row 1: field 'reward' must be finite, got inf"),
        ({"reward": None}, r"row 1: field 'reward' is missing"),
        ({"reward": "1.0"}, r"row 1: field 'reward' must be a real number, got str"),
        ({"reward": True}, r"row 1: field 'reward' must be a real number, got bool"),
        ({"completion": ""}, r"row 1: field 'completion' is empty"),
        ({"completion": "  \n"}, r"row 1: field 'completion' is empty"),
        ({"completion": None}, r"row 1: field 'completion' is missing"),
        ({"completion": 3}, r"row 1: field 'completion' must be a string, got int"),
        ({"prompt": 3}, r"row 1: field 'prompt' must be a string or a list of messages, got int"),
        ({"prompt": [{"role": "user"}]}, r"row 1: field 'prompt'\[0\] \(user\) content is missing"),
        ({"prompt": [{"content": "x"}]}, r"row 1: field 'prompt'\[0\]: 'role' must be a non-empty string"),
        ({"prompt": []}, r"row 1: field 'prompt' must be a non-empty list"),
        ({"prompt": ""}, r"row 1: field 'prompt' is empty"),
        ({"prompt": " \n"}, r"row 1: field 'prompt' is empty"),
        ({"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": " "}]},
         r"row 1: field 'prompt' is empty \(every message's content is blank\)"),
    ],
)
def test_single_turn_bad_rows(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_rows([GOOD, {**GOOD, **bad}])
    with pytest.raises(ValueError, match=message):
        load_rows([GOOD, {**GOOD, **bad}])


def test_missing_columns():
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward'\]"):
        validate_rows([{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'completion', 'reward'\]"):
        load_rows(datasets.Dataset.from_list([{"text": "x"}]))


def _multi(messages, rewards):
    return [MULTI[0], {"messages": messages, "rewards": rewards}]


U, A, T = "user", "assistant", "tool"


@pytest.mark.parametrize(
    "rows, message",
    [
        (_multi([{"role": U, "content": "q"}, {"role": A, "content": "a"}], [1.0, 2.0]),
         r"row 1: field 'rewards' has 2 value\(s\) but 'messages' has 1 assistant turn\(s\)"),
        (_multi([{"role": U, "content": "q"}, {"role": A, "content": "a"}], []),
         r"row 1: field 'rewards' has 0 value\(s\) but 'messages' has 1"),
        (_multi([{"role": U, "content": "q"}, {"role": A, "content": "a"}], [float("nan")]),
         r"row 1: field 'rewards'\[0\] must be finite"),
        (_multi([{"role": U, "content": "q"}, {"role": A, "content": ""}], [1.0]),
         r"row 1: field 'messages'\[1\] \(assistant\) content is empty"),
        (_multi([{"role": U, "content": "q"}, {"role": T, "content": "t"}], [1.0]),
         r"row 1: field 'messages' has no assistant message"),
        (_multi([{"role": A, "content": "a"}, {"role": U, "content": "q"}], [1.0]),
         r"row 1: field 'messages' starts with an assistant message"),
        (_multi("not a list", [1.0]), r"row 1: field 'messages' must be a non-empty list"),
        (_multi([{"role": U, "content": ""}, {"role": A, "content": "a"}, {"role": U, "content": "q"}, {"role": A, "content": "b"}], [1.0, 2.0]),
         r"row 1: field 'messages' has an empty prompt \(the messages before the first assistant turn are blank\)"),
        (_multi([{"role": U, "content": "q"}, {"role": A, "content": "a"}], 1.0), r"row 1: field 'rewards' must be a list"),
        ([{"messages": [{"role": U, "content": "q", "reward": 1.0}, {"role": A, "content": "a", "reward": 1.0}]}],
         r"row 0: messages\[0\] \(user\) has a reward, but only assistant turns are actions"),
        ([{"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]}],
         r"row 0: messages\[1\] \(assistant\) field 'reward' is missing"),
    ],
)
def test_multi_turn_bad_rows(rows, message):
    with pytest.raises(ValueError, match=message):
        validate_rows(rows)


def test_bad_reward_in_a_jsonl_file_names_the_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "reward": 1.0}\n{"prompt": "a", "completion": "c", "reward": NaN}\n')
    with pytest.raises(ValueError, match=r"row 1: field 'reward' must be finite"):
        load_rows(path, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_string_reward_in_a_file_is_refused_not_converted(tmp_path, name):
    """The json loader of ``datasets`` casts "0.5" to 0.5 when another row has a number; the rows are checked
    as the file states them first."""
    records = [GOOD, {**GOOD, "reward": "0.5"}]
    text = "\n".join(json.dumps(r) for r in records) + "\n" if name.endswith("l") else json.dumps(records)
    (tmp_path / name).write_text(text)
    where = r"rows.jsonl: line 2: " if name.endswith("l") else r"rows.json: "
    with pytest.raises(ValueError, match=where + r"row 1: field 'reward' must be a real number, got str '0.5'"):
        load_rows(tmp_path / name, cache_dir=str(tmp_path / "cache"))


GOOD_LINE = json.dumps(GOOD).encode() + b"\n"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("rows.jsonl", b"", r"rows.jsonl: the file is empty \(no rows\)"),
        ("rows.jsonl", b"\n  \n", r"rows.jsonl: the file is empty \(no rows\)"),
        ("rows.json", b"", r"rows.json: the file is empty \(no rows\)"),
        ("rows.json", b"[]", r"rows.json: the file is empty \(no rows\)"),
        ("rows.jsonl", GOOD_LINE + b"not json\n", r"rows.jsonl: line 2: not valid JSON \(Expecting value at column 1\)"),
        ("rows.jsonl", GOOD_LINE + b"\n" + GOOD_LINE[:-3] + b"\n",
         r"rows.jsonl: line 3: not valid JSON \(Expecting ',' delimiter at column \d+\)"),
        ("rows.jsonl", GOOD_LINE * 2 + b'{"prompt": "\xff\xfe", "completion": "c", "reward": 1.0}\n',
         r"rows.jsonl: line 3: not UTF-8 text \(byte 0xff at column 13\)"),
        ("rows.jsonl", GOOD_LINE + b"[1, 2]\n", r"rows.jsonl: line 2: expected a JSON object \(one row\), got list"),
        ("rows.json", b'[\n  {"prompt": "a",\n   "completion": }\n]',
         r"rows.json: line 3: not valid JSON \(Expecting value at column 18\)"),
        ("rows.json", b"[" + GOOD_LINE + b", 3]", r"rows.json: row 1: expected a JSON object \(one row\), got int"),
        ("rows.json", GOOD_LINE + b"{oops}\n", r"rows.json: line 2: not valid JSON \(Expecting property name"),
    ],
)
def test_unreadable_json_files_name_the_file_line_and_problem(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_rows(tmp_path / name, cache_dir=str(tmp_path / "cache"))


def test_json_file_in_json_lines_form_still_loads(tmp_path):
    (tmp_path / "rows.json").write_bytes(GOOD_LINE * 2)
    assert load_rows(tmp_path / "rows.json", cache_dir=str(tmp_path / "cache")).to_list() == [GOOD, GOOD]


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


def test_single_turn_example_exact(tok):
    out, report = tokenize_rows(load_rows(SINGLE[:1]), tok)
    ex = out[0]
    reference = tok.apply_chat_template([{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"}])
    assert ex["input_ids"] == reference["input_ids"]  # nothing lost, nothing added
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][1] != tok.bos_token_id  # one BOS
    assert ex["input_ids"].count(tok.bos_token_id) == 1
    n = len(ex["input_ids"])
    assert ex["response_mask"] == [False] * (n - 2) + [True, True]  # "4", EOS
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["rewards"] == [0.0] * (n - 1) + [1.0]
    assert (ex["prompt_id"], ex["row_index"]) == (0, 0)
    assert report == TokenizeReport(rows=1, kept=1)


def test_plain_concatenation_without_template(plain_tok):
    out, _ = tokenize_rows(load_rows([{"prompt": "The sky is", "completion": " blue.", "reward": 2.0}]), plain_tok)
    ex = out[0]
    prompt = plain_tok("The sky is", add_special_tokens=False)["input_ids"]
    completion = plain_tok(" blue.", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == [plain_tok.bos_token_id] + prompt + completion + [plain_tok.eos_token_id]
    assert ex["response_mask"] == [False] * (1 + len(prompt)) + [True] * (len(completion) + 1)
    assert ex["rewards"][-1] == 2.0 and sum(ex["rewards"]) == 2.0
    assert action_text(plain_tok, ex) == " blue.<|eos|>"
    # a prompt that already starts with BOS does not get a second one
    out, _ = tokenize_rows([{"prompt": "<|bos|>The sky is", "completion": " blue.", "reward": 2.0}], plain_tok)
    assert out[0]["input_ids"] == ex["input_ids"]


#: A template that writes only the contents (no BOS, no role headers): an empty user message renders to "".
BARE_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def bos_prepending_tokenizer(chat_template=None):
    """The tiny tokenizer with a post-processor that prepends BOS (as Llama's ``add_bos_token``)."""
    from tokenizers import processors

    tokenizer = build_tokenizer(chat_template=False)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = chat_template
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("prompt", ["", " ", "a", "<|bos|>", "hi there"])
@pytest.mark.parametrize("template", [None, BARE_TEMPLATE, "tiny"])
def test_encode_conversation_with_a_bos_prepending_tokenizer_aligns_the_mask(prompt, template):
    """encode_conversation called directly (rows refuse empty prompts, this function does not): one BOS,
    then the prompt's tokens (state), then exactly the completion's tokens + EOS (action). Compared token by
    token and by decoding, so a mask shifted by one position fails."""
    from shiq_llm.core.models import CHAT_TEMPLATE
    from shiq_llm.data.tokenization import encode_conversation

    tok = bos_prepending_tokenizer(CHAT_TEMPLATE if template == "tiny" else template)
    completion = " yes 12"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    ex = encode_conversation(messages, [1.5], 1, tok, use_chat_template=template is not None)
    ids, mask = ex.input_ids, ex.response_mask
    action = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(action)
    assert ids[-n:] == action and mask == [False] * (len(ids) - n) + [True] * n
    assert ex.rewards == [0.0] * (len(ids) - 1) + [1.5]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == completion + tok.eos_token
    # the state: without a template BOS + prompt (BOS not doubled); with one, what the template writes (as
    # transformers' apply_chat_template tokenises it: the post-processor's BOS is not added), and a BOS to
    # stand for a prompt that renders to nothing
    expected_state = {
        None: "<|bos|>" + prompt.removeprefix("<|bos|>"),
        BARE_TEMPLATE: prompt or "<|bos|>",
        "tiny": "<|bos|><|user|>" + prompt + "<|assistant|>",
    }[template]
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == expected_state
    if template is not None:
        rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == rendered or (not prompt and ids == [tok.bos_token_id] + rendered)


def test_plain_tokenizer_refuses_conversations_and_missing_eos(plain_tok):
    with pytest.raises(ValueError, match="row 0: .*needs a tokenizer with a chat template"):
        tokenize_rows(MULTI, plain_tok)
    with pytest.raises(ValueError, match="row 0: .*needs a tokenizer with a chat template"):
        tokenize_rows([SINGLE[2]], plain_tok)
    no_eos = build_tokenizer(chat_template=False)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_rows(SINGLE[:1], no_eos)


def test_multi_turn_mask_and_rewards(tok):
    out, _ = tokenize_rows(load_rows(MULTI), tok)
    ex = out[0]
    messages = MULTI[0]["messages"]
    assert ex["input_ids"] == tok.apply_chat_template(messages)["input_ids"]
    assert action_text(tok, ex) == "".join(m["content"] + "<|eos|>" for m in messages if m["role"] == "assistant")
    runs = mask_runs(ex["response_mask"])
    assert len(runs) == 3
    for (start, end), m, r in zip(runs, [m for m in messages if m["role"] == "assistant"], MULTI[0]["rewards"]):
        assert tok.decode(ex["input_ids"][start:end]) == m["content"] + "<|eos|>"
        assert ex["rewards"][end - 1] == r  # the turn's reward on its last token
    nonzero = [p for p, r in enumerate(ex["rewards"]) if r != 0]
    assert nonzero == [end - 1 for _, end in runs]
    state = [i for i, m in zip(ex["input_ids"], ex["response_mask"]) if not m]
    assert tok.decode(state) == "<|bos|><|user|>weather in paris?<|assistant|><|tool|>sunny, 21<|assistant|><|user|>thanks<|assistant|>"


messages_strategy = st.lists(
    st.tuples(
        st.sampled_from(["user", "assistant", "tool", "system"]),
        st.text(alphabet="abz XY?!.é\n0123", min_size=1, max_size=12).filter(lambda s: s.strip()),
    ),
    min_size=2,
    max_size=7,
).filter(lambda ms: ms[0][0] != "assistant" and any(r == "assistant" for r, _ in ms))


@given(turns=messages_strategy, data=st.data())
def test_mask_matches_transformers_generation_mask(tok, turns, data):
    """Our mask (growing prefixes) == transformers' {% generation %} assistant mask, on random dialogues."""
    messages = [{"role": r, "content": c} for r, c in turns]
    last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
    rewards = data.draw(st.lists(st.floats(-5, 5), min_size=sum(m["role"] == "assistant" for m in messages), max_size=sum(m["role"] == "assistant" for m in messages)))
    out, _ = tokenize_rows([{"messages": messages, "rewards": rewards}], tok)
    ex = out[0]
    gen = build_generation_tokenizer(tok)
    assert gen.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    reference = gen.apply_chat_template(messages[: last + 1], return_dict=True, return_assistant_tokens_mask=True)
    assert ex["input_ids"] == reference["input_ids"]
    assert ex["response_mask"] == [bool(m) for m in reference["assistant_masks"]]
    assert not ex["response_mask"][0]
    runs = mask_runs(ex["response_mask"])
    assert [ex["rewards"][end - 1] for _, end in runs] == pytest.approx(rewards)
    assert sum(ex["rewards"]) == pytest.approx(sum(rewards))


_GEN = {}


def build_generation_tokenizer(tok):
    if "tok" not in _GEN:
        gen = build_tokenizer()
        gen.chat_template = GENERATION_TEMPLATE
        _GEN["tok"] = gen
    return _GEN["tok"]


def test_text_header_template_keeps_exact_boundaries():
    """A template with plain-text headers (no special tokens around the content): the response tokens decode
    to exactly content + EOS, because each segment is tokenised on its own."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
        "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    )
    rows = [{"messages": [{"role": "user", "content": "say a b"}, {"role": "assistant", "content": "a b"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "ab"}], "rewards": [1.0, 2.0]}]
    ex = tokenize_rows(rows, tok)[0][0]
    runs = mask_runs(ex["response_mask"])
    assert [tok.decode(ex["input_ids"][s:e]) for s, e in runs] == ["a b<|eos|>", "ab<|eos|>"]  # the "\n" after EOS is state
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(rows[0]["messages"], tokenize=False).rstrip("\n")
    assert [ex["rewards"][e - 1] for _, e in runs] == [1.0, 2.0]


def test_template_that_rewrites_history_is_refused():
    tok = build_tokenizer()
    # renders the last message differently from the others: rendering a prefix is not a prefix of the whole
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.last %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
        "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '!' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="row 0: the chat template is not prefix-stable at message 1"):
        tokenize_rows(SINGLE[:1], tok)


def test_template_error_names_the_row():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="row 0: the chat template cannot render this conversation: roles must alternate"):
        tokenize_rows(MULTI, tok)


def test_prompt_ids_group_equal_prompts(tok):
    rows = [
        {"prompt": "hi", "completion": "a", "reward": 1.0},
        {"prompt": "ho", "completion": "b", "reward": 1.0},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": "c", "reward": 0.0},
    ]
    # rows 0 and 2 are the same prompt (a string prompt is one user message); list columns can't mix in
    # one Dataset, so a list of dicts is passed
    out, _ = tokenize_rows(rows, tok)
    assert out["prompt_id"] == [0, 1, 0]
    assert out["row_index"] == [0, 1, 2]


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def test_truncation_exact_cases(tok):
    # prompt: BOS + 6 tokens; response: 3 tokens with reward 1 on the last
    ex = Encoded(list(range(1, 8)) + [10, 11, 12], [False] * 7 + [True] * 3, [0.0] * 9 + [1.0])
    kw = dict(long_response="truncate", bos_token_id=1)
    # fits: unchanged
    assert truncate_encoded(ex, max_length=10, max_prompt_length=5, **kw) == (ex, False, False)
    # prompt left-truncated to 8 - 3 = 5 tokens, BOS kept
    out, p, r = truncate_encoded(ex, max_length=8, max_prompt_length=4, **kw)
    assert (p, r) == (True, False)
    assert out.input_ids == [1, 4, 5, 6, 7, 10, 11, 12] and out.rewards[-1] == 1.0
    # response guaranteed max_length - max_prompt_length = 2 tokens; prompt gets 2 (BOS + last token);
    # the cut token's reward moves to the last kept token
    out, p, r = truncate_encoded(ex, max_length=4, max_prompt_length=2, **kw)
    assert (p, r) == (True, True)
    assert out == Encoded([1, 7, 10, 11], [False, False, True, True], [0.0, 0.0, 0.0, 1.0])
    # drop instead
    assert truncate_encoded(ex, max_length=4, max_prompt_length=2, long_response="drop", bos_token_id=1) == (None, True, True)


def test_truncation_multi_turn_moves_cut_rewards_and_drops_trailing_state():
    # prompt [1, 2]; turn 1 [20, 21] r=0.5; tool [30, 31]; turn 2 [40, 41] r=2
    ex = Encoded([1, 2, 20, 21, 30, 31, 40, 41], [False, False, True, True, False, False, True, False][:7] + [True],
                 [0, 0, 0, 0.5, 0, 0, 0, 2.0])
    out, p, r = truncate_encoded(ex, max_length=5, max_prompt_length=2, long_response="truncate", bos_token_id=1)
    # the cut falls in the tool turn: it is dropped, turn 2's reward lands on turn 1's last token
    assert (p, r) == (False, True)
    assert out == Encoded([1, 2, 20, 21], [False, False, True, True], [0, 0, 0, 2.5])


@given(
    n_prompt=st.integers(1, 12),
    response=st.lists(st.tuples(st.booleans(), st.floats(-3, 3)), min_size=1, max_size=12),
    max_length=st.integers(2, 30),
    data=st.data(),
)
def test_truncation_invariants(n_prompt, response, max_length, data):
    # as encode_conversation makes them: the response starts and ends with an action token
    mask_r = [True] + [m for m, _ in response[1:-1]] + [True] * (len(response) > 1)
    rewards_r = [r if m else 0.0 for m, (_, r) in zip(mask_r, response)]
    ids = [1] + list(range(100, 100 + n_prompt - 1)) + list(range(200, 200 + len(response)))
    ex = Encoded(ids, [False] * n_prompt + mask_r, [0.0] * n_prompt + rewards_r)
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    out, prompt_cut, response_cut = truncate_encoded(
        ex, max_length=max_length, max_prompt_length=max_prompt_length, long_response="truncate", bos_token_id=1
    )
    assert len(out.input_ids) <= max_length
    if len(ids) <= max_length:
        assert out == ex and not prompt_cut and not response_cut
        return
    first = out.response_mask.index(True)
    kept_prompt, kept_response = out.input_ids[:first], out.input_ids[first:]
    assert kept_prompt[0] == 1  # BOS survives
    assert kept_prompt[1:] == ids[1:n_prompt][len(ids[1:n_prompt]) - (len(kept_prompt) - 1):]  # a suffix of the prompt
    assert prompt_cut == (len(kept_prompt) < n_prompt)
    assert kept_response == ids[n_prompt : n_prompt + len(kept_response)]  # a prefix of the response
    assert out.response_mask[-1]  # ends on an action token
    assert len(kept_response) >= 1
    # the response keeps every action that fits in its guaranteed budget
    budget = min(len(response), max_length - max_prompt_length)
    assert len(kept_response) >= max(p + 1 for p in range(budget) if mask_r[p])
    assert response_cut == (len(kept_response) < len(response))
    assert math.isclose(sum(out.rewards), sum(rewards_r), abs_tol=1e-9)  # return preserved


def test_tokenize_rows_truncation_counts_and_log(tok, caplog):
    long_prompt = "a b " * 40
    rows = [
        {"prompt": long_prompt, "completion": "ok", "reward": 1.0},  # prompt truncated
        {"prompt": "hi", "completion": "z y " * 40, "reward": 2.0},  # response truncated
        {"prompt": "hi", "completion": "fine", "reward": 0.0},  # untouched
    ]
    with caplog.at_level("WARNING", logger="shiq_llm.data.tokenization"):
        out, report = tokenize_rows(rows, tok, max_length=24, max_truncated_fraction=1.0)
    assert report == TokenizeReport(rows=3, kept=3, prompt_truncated=1, response_truncated=1)
    assert "prompt_truncated=1" in caplog.text and "2 of 3 rows (67%) were cut by max_length=24" in caplog.text
    assert all(len(ids) <= 24 for ids in out["input_ids"])
    assert out[0]["input_ids"][0] == tok.bos_token_id
    assert tok.decode([i for i, m in zip(out[0]["input_ids"], out[0]["response_mask"]) if m]) == "ok<|eos|>"
    assert sum(out[1]["rewards"]) == 2.0 and out[1]["rewards"][-1] == 2.0 and out[1]["response_mask"][-1]
    out, report = tokenize_rows(rows, tok, max_length=24, long_response="drop", max_truncated_fraction=1.0)
    assert report == TokenizeReport(rows=3, kept=2, prompt_truncated=1, dropped_long_response=1)
    assert out["row_index"] == [0, 2]
    with pytest.raises(ValueError, match="every row was dropped"):
        tokenize_rows(rows[1:2], tok, max_length=24, long_response="drop")


def test_tokenize_rows_refuses_a_max_length_that_cuts_most_rows(tok, caplog):
    from shiq_llm.data.tokenization import MAX_TRUNCATED_FRACTION

    assert MAX_TRUNCATED_FRACTION == 0.5
    rows = [{"prompt": f"question {i} is here", "completion": "the answer is " + "yes " * i, "reward": 1.0} for i in range(4)]
    longest = max(len(ex) for ex in tokenize_rows(rows, tok)[0]["input_ids"])
    with pytest.raises(ValueError, match=rf"4 of 4 rows \(100%\) were cut by max_length=8, more than "
                                         rf"MAX_TRUNCATED_FRACTION = 50%: .*raise max_length \(the longest example has "
                                         rf"{longest} tokens\)"):
        tokenize_rows(rows, tok, max_length=8)
    cut_two = sorted(len(ex) for ex in tokenize_rows(rows, tok)[0]["input_ids"])[1]  # 2 of 4 rows are longer
    with caplog.at_level("WARNING", logger="shiq_llm.data.tokenization"):
        _, report = tokenize_rows(rows, tok, max_length=cut_two)  # 2 of 4 = 50%: allowed, with a warning
    assert report.kept == 4 and report.response_truncated == 2
    assert f"2 of 4 rows (50%) were cut by max_length={cut_two}" in caplog.text
    with pytest.raises(ValueError, match=r"3 of 4 rows \(75%\) were cut .* more than MAX_TRUNCATED_FRACTION = 25%"):
        tokenize_rows(rows, tok, max_length=cut_two - 1, max_truncated_fraction=0.25)
    _, report = tokenize_rows(rows, tok, max_length=8, max_truncated_fraction=1.0)  # accepted when asked for
    assert report.kept == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_truncated_fraction=1.5), r"max_truncated_fraction must be in \[0, 1\], got 1.5"),
        (dict(max_length=1), "max_length must be >= 2"),
        (dict(max_length=10, max_prompt_length=10), r"max_prompt_length must be in \[1, max_length\)"),
        (dict(max_length=10, max_prompt_length=0), r"max_prompt_length must be in"),
        (dict(max_prompt_length=4), "max_prompt_length needs max_length"),
        (dict(long_response="keep"), "long_response must be one of"),
    ],
)
def test_tokenize_rows_bad_options(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tokenize_rows(SINGLE, tok, **kwargs)


# --------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------

EXAMPLES = [
    {"input_ids": [1, 5, 6], "response_mask": [False, True, True], "rewards": [0.0, 0.0, 1.5], "prompt_id": 3, "row_index": 7},
    {"input_ids": [1, 8], "response_mask": [False, True], "rewards": [0.0, -1.0], "prompt_id": 4, "row_index": 9},
]


def test_collate_right_padding():
    batch = collate(EXAMPLES, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["response_mask"].tolist() == [[False, True, True], [False, True, False]]
    assert batch["rewards"].tolist() == [[0.0, 0.0, 1.5], [0.0, -1.0, 0.0]]
    assert batch["prompt_id"].tolist() == [3, 4] and batch["row_index"].tolist() == [7, 9]
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {"input_ids": torch.int64, "attention_mask": torch.int64, "response_mask": torch.bool,
                      "rewards": torch.float32, "prompt_id": torch.int64, "row_index": torch.int64}


def test_collate_left_padding():
    batch = collate(EXAMPLES, pad_token_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 1, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["response_mask"].tolist() == [[False, True, True], [False, False, True]]
    assert batch["rewards"].tolist() == [[0.0, 0.0, 1.5], [0.0, 0.0, -1.0]]


def test_collate_of_tokenized_rows_both_sides_agree(tok):
    with pytest.raises(ValueError, match="cannot be stored as one table"):
        load_rows(SINGLE)  # string and message-list prompts cannot share an Arrow column
    out, _ = tokenize_rows(SINGLE, tok)  # … but tokenize_rows takes the list as it is
    examples = [out[i] for i in range(len(out))]
    right = collate(examples, pad_token_id=tok.pad_token_id)
    left = collate(examples, pad_token_id=tok.pad_token_id, padding_side="left")
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        for key in ("input_ids", "response_mask", "rewards"):
            assert right[key][b, :n].tolist() == pytest.approx(ex[key])
            assert left[key][b, right[key].shape[1] - n :].tolist() == pytest.approx(ex[key])
    assert not right["response_mask"][:, 0].any() and not left["response_mask"][:, 0].any()
    # a DataLoader over the tokenized Dataset yields the same batch
    loader = torch.utils.data.DataLoader(out, batch_size=len(out), collate_fn=functools.partial(collate, pad_token_id=tok.pad_token_id))
    (batch,) = list(loader)
    assert all(torch.equal(batch[k], right[k]) for k in right)


def test_collate_bad_input():
    with pytest.raises(ValueError, match="padding_side"):
        collate(EXAMPLES, pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="empty list"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate(EXAMPLES, pad_token_id=None)
    with pytest.raises(ValueError, match=r"example 0 \(row 7\): position 0 is a response token"):
        collate([{**EXAMPLES[0], "response_mask": [True, True, True]}], pad_token_id=0)
    with pytest.raises(ValueError, match=r"example 1 \(row 9\): input_ids, response_mask and rewards must have the same"):
        collate([EXAMPLES[0], {**EXAMPLES[1], "rewards": [0.0]}], pad_token_id=0)


# --------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------


def _examples(prompt_ids, rewards):
    return datasets.Dataset.from_dict({"prompt_id": prompt_ids, "rewards": [[0.0, r] for r in rewards]})


@given(
    prompt_ids=st.lists(st.integers(0, 3), min_size=2, max_size=12),
    data=st.data(),
)
def test_all_pairs_equal_brute_force(prompt_ids, data):
    rewards = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=len(prompt_ids), max_size=len(prompt_ids)))
    expected = sorted(
        (i, j) if rewards[i] > rewards[j] else (j, i)
        for i, j in combinations(range(len(prompt_ids)), 2)
        if prompt_ids[i] == prompt_ids[j] and rewards[i] != rewards[j]
    )
    if not expected:
        with pytest.raises(ValueError, match="no usable pair"):
            preference_pairs(_examples(prompt_ids, rewards))
        return
    chosen, rejected = preference_pairs(_examples(prompt_ids, rewards))
    assert sorted(zip(chosen, rejected)) == expected


def test_disjoint_pairs_and_ties():
    # prompt 0: rewards 1, 1 (tie, dropped), 3, 0 -> disjoint pairs (0, 1) tie, (2, 3) -> 2 wins
    chosen, rejected = preference_pairs(_examples([0, 0, 0, 0, 1], [1.0, 1.0, 3.0, 0.0, 5.0]), mode="disjoint")
    assert (chosen, rejected) == ([2], [3])
    with pytest.raises(ValueError, match="mode must be one of"):
        preference_pairs(_examples([0, 0], [1.0, 0.0]), mode="best")


def test_pairs_from_tokenized_multi_turn_use_summed_rewards(tok):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"},
                      {"role": "assistant", "content": "b"}], "rewards": [1.0, 1.0]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}], "rewards": [1.5]},
        {"messages": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "d"}], "rewards": [0.0]},
    ]
    out, _ = tokenize_rows(rows, tok)
    assert sequence_rewards(out).tolist() == [2.0, 1.5, 0.0]
    assert preference_pairs(out) == ([0], [1])


def test_no_usable_pair():
    with pytest.raises(ValueError, match="no usable pair for the pair methods: none of the 2 prompts"):
        preference_pairs(_examples([0, 1], [1.0, 0.0]))  # one response per prompt
    with pytest.raises(ValueError, match=r"no usable pair .*1 prompt\(s\) have several responses"):
        preference_pairs(_examples([0, 0, 1], [1.0, 1.0, 2.0]))  # tie only
