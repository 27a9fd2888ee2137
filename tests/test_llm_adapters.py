"""shiq_llm.data.adapters on fixtures written in each dataset's own schema (tests/fixtures/), offline.

Every expected row below is read off the fixture file by hand, following the adapter's documented rule.
"""

import json
from pathlib import Path

import pytest

from shiq_llm.core.models import build_tokenizer
from shiq_llm.data import load_rows, preference_pairs, tokenize_rows
from shiq_llm.data.adapters import (
    ADAPTERS,
    BFCL_SYSTEM_PROMPT,
    bfcl_multi_turn,
    hh_rlhf,
    paired_preferences,
    stepwise_supervision,
    ultrafeedback,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def load(name, fmt, tmp_path, **options):
    return load_rows(FIXTURES / name, format=fmt, format_options=options or None, cache_dir=str(tmp_path / "cache")).to_list()


def read_jsonl(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_registry():
    assert ADAPTERS == {"paired": paired_preferences, "ultrafeedback": ultrafeedback, "hh": hh_rlhf, "bfcl": bfcl_multi_turn,
                        "stepwise": stepwise_supervision}


# --------------------------------------------------------------------------------------------------
# Paired preferences
# --------------------------------------------------------------------------------------------------


def test_paired_ultrafeedback_binarized_fixture(tmp_path):
    rows = load("ultrafeedback_binarized.jsonl", "paired", tmp_path)
    assert rows == [
        {"prompt": [user("Name a primary colour.")], "completion": "Red is a primary colour.", "reward": 9.0},
        {"prompt": [user("Name a primary colour.")], "completion": "Green.", "reward": 4.0},
        {"prompt": [user("What is 3 times 4?")], "completion": "3 times 4 is 12.", "reward": 10.0},
        {"prompt": [user("What is 3 times 4?")], "completion": "It is 7.", "reward": 2.5},
        {"prompt": [user("Say hello in French.")], "completion": "Bonjour!", "reward": 8.5},
        {"prompt": [user("Say hello in French.")], "completion": "Hola!", "reward": 3.0},
    ]


def test_paired_plain_fixture_and_pairs_round_trip(tmp_path, tok):
    rows = load("paired_plain.jsonl", "paired", tmp_path)
    assert rows == [
        {"prompt": "The sky is", "completion": " blue.", "reward": 1.0},
        {"prompt": "The sky is", "completion": " green.", "reward": 0.0},
        {"prompt": "Two plus two is", "completion": " four.", "reward": 1.0},
        {"prompt": "Two plus two is", "completion": " five.", "reward": 0.0},
    ]
    examples, _ = tokenize_rows(rows, tok)
    assert preference_pairs(examples) == ([0, 2], [1, 3])  # each input pair comes back, chosen first
    rows = load("paired_plain.jsonl", "paired", tmp_path, chosen_reward=2.0, rejected_reward=-1.0)
    assert [r["reward"] for r in rows] == [2.0, -1.0, 2.0, -1.0]


def test_paired_trl_conversational_form():
    rows = paired_preferences([
        {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")], "score_chosen": 3, "score_rejected": 1}
    ]).to_list()
    assert rows == [
        {"prompt": [user("hi")], "completion": "hello", "reward": 3.0},
        {"prompt": [user("hi")], "completion": "go away", "reward": 1.0},
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a"}, r"paired: row 0: missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, r"paired: row 0: missing field 'prompt'"),
        ({"prompt": "p", "chosen": "a", "rejected": [assistant("b")]}, "both be strings or both lists"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1.0}, "'score_chosen' and 'score_rejected' must be given together"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": float("nan"), "score_rejected": 1.0}, "field 'score_chosen' must be a finite number"),
        ({"chosen": [user("x"), assistant("a")], "rejected": [user("y"), assistant("b")]}, "do not share the same prompt"),
        ({"chosen": [user("x"), user("a")], "rejected": [user("x"), assistant("b")]}, "must end with an assistant message"),
    ],
)
def test_paired_bad_rows(row, message):
    with pytest.raises(ValueError, match=message):
        paired_preferences([row])


# --------------------------------------------------------------------------------------------------
# UltraFeedback
# --------------------------------------------------------------------------------------------------


def test_ultrafeedback_fixture_overall_score(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="shiq_llm.data.adapters"):
        rows = load("ultrafeedback.jsonl", "ultrafeedback", tmp_path)
    assert rows == [
        {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris.", "reward": 8.0},
        {"prompt": "What is the capital of France?", "completion": "Paris is the capital and largest city of France.", "reward": 9.5},
        {"prompt": "What is the capital of France?", "completion": "The capital of France is Lyon.", "reward": 2.0},
        {"prompt": "Add 2 and 3.", "completion": "2 + 3 = 5", "reward": 7.5},
    ]  # wizardlm-7b's empty response is skipped …
    assert "skipped 1 completions" in caplog.text  # … and counted


def test_ultrafeedback_other_scores(tmp_path):
    fine = [r["reward"] for r in load("ultrafeedback.jsonl", "ultrafeedback", tmp_path, score="fine-grained_score")]
    assert fine == [4.75, 5.0, 1.75, pytest.approx(14 / 3)]
    # mean of the numeric ratings, "N/A" left out: (4+5+5+5)/4, 5, (1+2+3+1)/4, (5+5+4)/3
    mean = [r["reward"] for r in load("ultrafeedback.jsonl", "ultrafeedback", tmp_path, score="mean_rating")]
    assert mean == [4.75, 5.0, 1.75, pytest.approx(14 / 3)]
    helpful = [r["reward"] for r in load("ultrafeedback.jsonl", "ultrafeedback", tmp_path, score="helpfulness")]
    assert helpful == [4.0, 5.0, 1.0, 5.0]
    # honesty is "N/A" for the last completion: it has no such score and is skipped
    honest = [r["reward"] for r in load("ultrafeedback.jsonl", "ultrafeedback", tmp_path, score="honesty")]
    assert honest == [5.0, 5.0, 2.0]
    with pytest.raises(ValueError, match="score must be one of"):
        ultrafeedback(read_jsonl("ultrafeedback.jsonl"), score="stars")


def test_ultrafeedback_bad_and_empty():
    with pytest.raises(ValueError, match="ultrafeedback: row 0: missing field 'completions'"):
        ultrafeedback([{"instruction": "x"}])
    with pytest.raises(ValueError, match=r"ultrafeedback: no usable row \(skipped 1"):
        ultrafeedback([{"instruction": "x", "completions": [{"response": "y", "overall_score": None}]}])


# --------------------------------------------------------------------------------------------------
# Anthropic HH
# --------------------------------------------------------------------------------------------------


def test_hh_fixture_as_messages(tmp_path):
    rows = load("hh_rlhf.jsonl", "hh", tmp_path)
    bread = [user("Can you help me bake bread?"), assistant("Sure. Do you have flour and yeast?"), user("Yes, both.")]
    assert rows == [
        {"prompt": [user("What is a good name for a cat?")], "completion": "Whiskers is a popular name for a cat.", "reward": 1.0},
        {"prompt": [user("What is a good name for a cat?")], "completion": "I don't know.", "reward": 0.0},
        {"prompt": bread, "completion": "Mix them with water and salt, knead, let it rise, then bake.", "reward": 1.0},
        {"prompt": bread, "completion": "Buy bread instead.", "reward": 0.0},
        {"prompt": [user("Tell me a joke.")], "completion": "Why did the chicken cross the road? To get to the other side.", "reward": 1.0},
    ]  # the third row's rejected transcript ends with an empty "Assistant:" turn: skipped


def test_hh_as_text_round_trips_the_transcript(tmp_path):
    raw = read_jsonl("hh_rlhf.jsonl")
    rows = load("hh_rlhf.jsonl", "hh", tmp_path, as_messages=False, rejected_reward=-1.0)
    texts = [raw[0]["chosen"], raw[0]["rejected"], raw[1]["chosen"], raw[1]["rejected"], raw[2]["chosen"]]
    assert [r["prompt"] + r["completion"] for r in rows] == texts
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in rows)
    assert rows[2]["completion"] == " Mix them with water and salt, knead, let it rise, then bake."
    assert [r["reward"] for r in rows] == [1.0, -1.0, 1.0, -1.0, 1.0]


def test_hh_multi_turn_prompt_is_state(tmp_path, tok):
    """The earlier assistant turn of an HH dialogue is part of the prompt: masked out, no reward."""
    rows = load("hh_rlhf.jsonl", "hh", tmp_path)
    examples, _ = tokenize_rows(rows, tok)
    ex = examples[2]
    response = tok.decode([i for i, m in zip(ex["input_ids"], ex["response_mask"]) if m])
    assert response == "Mix them with water and salt, knead, let it rise, then bake.<|eos|>"
    assert examples["prompt_id"] == [0, 0, 1, 1, 2]
    assert preference_pairs(examples) == ([0, 2], [1, 3])


@pytest.mark.parametrize(
    "text, message",
    [
        ("Human: hi\n\nAssistant: yo", "must start with"),
        ("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: more", "must end with an '\\\\n\\\\nAssistant:' turn"),
        ("\n\nAssistant: yo", "no Human turn"),
    ],
)
def test_hh_bad_transcripts(text, message):
    with pytest.raises(ValueError, match=f"hh: row 0: field 'chosen'.*{message}"):
        hh_rlhf([{"chosen": text, "rejected": "\n\nHuman: hi\n\nAssistant: ok"}])


# --------------------------------------------------------------------------------------------------
# BFCL multi-turn function calling
# --------------------------------------------------------------------------------------------------


def tool(text):
    return {"role": "tool", "content": text}


def test_bfcl_fixture(tmp_path):
    rows = load("bfcl_multi_turn.jsonl", "bfcl", tmp_path)
    assert rows == [
        {
            "id": "multi_turn_base_0",
            "messages": [
                user("Go to the document folder and make a directory called temp."),
                assistant("[cd(folder='document')]"),
                tool('{"current_working_directory": "document"}'),
                assistant("[mkdir(dir_name='temp')]"),
                tool("None"),
                user("Now list what is in the current folder."),
                assistant("[ls()]"),
                tool('{"current_directory_content": ["temp"]}'),
            ],
            "rewards": [0.0, 1.0, 0.5],  # turn 0 has two steps: its score sits on the second
        },
        {
            "id": "multi_turn_miss_func_3",
            "messages": [
                user("Post a tweet saying hello."),
                assistant("[]"),  # no call in turn 0 (the function is missing)
                assistant("[post_tweet(content='hello')]"),  # turn 1 has no user message
                tool('{"id": 0, "username": "alex", "content": "hello"}'),
                user("Thanks, that is all."),
                assistant("[]"),
            ],
            "rewards": [1.0, 0.0, 1.0],
        },
    ]


def test_bfcl_tokenized_tool_outputs_are_state(tmp_path, tok):
    rows = load("bfcl_multi_turn.jsonl", "bfcl", tmp_path)
    examples, _ = tokenize_rows(rows, tok)
    ex = examples[0]
    runs, start = [], None
    for p, m in enumerate(ex["response_mask"] + [False]):
        if m and start is None:
            start = p
        elif not m and start is not None:
            runs.append((start, p))
            start = None
    assert [tok.decode(ex["input_ids"][s:e]) for s, e in runs] == [
        "[cd(folder='document')]<|eos|>", "[mkdir(dir_name='temp')]<|eos|>", "[ls()]<|eos|>"
    ]
    assert [ex["rewards"][e - 1] for s, e in runs] == [0.0, 1.0, 0.5]
    state = tok.decode([i for i, m in zip(ex["input_ids"], ex["response_mask"]) if not m])
    assert '<|tool|>{"current_working_directory": "document"}' in state and "<|tool|>None" in state
    # the tool output after the last action is after the episode: not part of the example
    assert state.endswith("<|user|>Now list what is in the current folder.<|assistant|>")


def test_bfcl_function_docs_and_fc_results():
    functions = [{"name": "cd", "description": "Change directory.", "parameters": {"type": "dict", "properties": {"folder": {"type": "string"}}, "required": ["folder"]}}]
    row = {
        "id": "multi_turn_base_7",
        "question": [[user("open docs and list")]],
        "function": functions,
        # a BFCL result of a function-calling model: per step, a list of {name: json arguments}
        "result": [[[{"cd": "{\"folder\": \"docs\"}"}], [{"ls": "{}"}, {"pwd": "{}"}]]],
        "execution_results": [[["ok"], ["a.txt", "/docs"]]],
        "turn_scores": [1.0],
    }
    out = bfcl_multi_turn([row], calls="result").to_list()[0]
    assert out["messages"] == [
        {"role": "system", "content": BFCL_SYSTEM_PROMPT.format(functions=json.dumps(functions))},
        user("open docs and list"),
        assistant("[cd(folder='docs')]"),
        tool("ok"),
        assistant("[ls(), pwd()]"),
        tool("a.txt\n/docs"),
    ]
    assert out["rewards"] == [0.0, 1.0]
    # a prompt-mode result step, already written as "[...]", is kept as is; no system message when asked
    row = {"question": [[user("q")]], "result": [["[cd(folder='x')]"]], "turn_scores": [0.5], "function": functions}
    out = bfcl_multi_turn([row], calls="result", system_prompt=None).to_list()[0]
    assert out["messages"] == [user("q"), assistant("[cd(folder='x')]")]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"turn_scores": [1.0]}, r"bfcl: row 0: field 'turn_scores' must have one entry per turn \(2 turns"),
        ({"ground_truth": [["ls()"]]}, r"field 'ground_truth' must have one entry per turn"),
        ({"turn_scores": [1.0, float("inf")]}, r"bfcl: row 0: turn 1: field 'turn_scores' must be a finite number"),
        ({"execution_results": [[["a"], ["b"]], [["c"]]]}, r"turn 0: field 'execution_results' has 2 step\(s\), field 'ground_truth' has 1"),
        ({"ground_truth": [[42], ["ls()"]]}, r"turn 0: field 'ground_truth': a call must be a string or a one-key dict"),
        ({"question": None}, r"bfcl: row 0: missing field 'question'"),
    ],
)
def test_bfcl_bad_rows(change, message):
    row = {"question": [[user("a")], [user("b")]], "ground_truth": [["cd(folder='x')"], ["ls()"]], "turn_scores": [1.0, 0.0]}
    with pytest.raises(ValueError, match=message):
        bfcl_multi_turn([{**row, **change}])


# --------------------------------------------------------------------------------------------------
# Stepwise supervision (TRL's format: trl-lib/math_shepherd, trl-lib/prm800k)
# --------------------------------------------------------------------------------------------------


def test_stepwise_math_shepherd_fixture_each_step_s_label_on_its_separator(tmp_path, tok):
    rows = load("math_shepherd.jsonl", "stepwise", tmp_path)
    source = read_jsonl("math_shepherd.jsonl")
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in source]
    assert rows[0]["completions"] == ["Step 1: The boxes hold 3 * 4 = 12 apples.\n",
                                      "Step 2: After eating 2, 12 - 2 = 10 apples are left.\n", "The answer is: 10\n"]
    assert [r["rewards"] for r in rows] == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    [example], _ = tokenize_rows(rows[:1], tok)
    first = example["response_mask"].index(True)
    response_ids, rewards = example["input_ids"][first:], example["rewards"][first:]
    rewarded = [k for k, r in enumerate(rewards) if r != 0.0]
    assert len(rewarded) == 3 and rewarded[-1] == len(response_ids) - 1  # the last step carries EOS (the template's)
    assert [tok.decode(response_ids[k]) for k in rewarded[:2]] == ["\n", "\n"]  # the first two on their separator
    shaped = load("math_shepherd.jsonl", "stepwise", tmp_path, correct_reward=0.5, incorrect_reward=-1.0, separator="")
    assert shaped[1] == {"prompt": source[1]["prompt"], "completions": source[1]["completions"], "rewards": [-1.0] * 3}


def test_stepwise_numeric_labels_and_bad_rows():
    [row] = stepwise_supervision([{"prompt": [user("p")], "completions": ["a", "b"], "labels": [0.25, -1]}]).to_list()
    assert row == {"prompt": [user("p")], "completions": ["a\n", "b\n"], "rewards": [0.25, -1.0]}
    bad = [({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, r"^stepwise: row 0: field 'labels' must hold one label per step \(2 step\(s\)\)"),
           ({"prompt": "p", "completions": ["a"], "labels": ["yes"]}, r"^stepwise: row 0: field 'labels'\[0\] must be a finite number, got 'yes'$"),
           ({"prompt": "p", "completions": "a b", "labels": [True]}, r"^stepwise: row 0: field 'completions' must be a list of strings"),
           ({"completions": ["a"], "labels": [True]}, r"^stepwise: row 0: missing field 'prompt'$")]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            stepwise_supervision([value])
    with pytest.raises(ValueError, match=r"^stepwise: no usable row \(skipped 1 row\(s\) without steps\)$"):
        stepwise_supervision([{"prompt": "p", "completions": [], "labels": []}])
