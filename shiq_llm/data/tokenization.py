"""Tokenising reward-labelled conversations: input ids, the action (response) mask, per-token rewards.

A conversation ``(messages, step_rewards)`` (``shiq_llm.data.rows.row_conversation``) becomes one token sequence
``input_ids`` (L,), a mask ``response_mask`` (L,) that is True on the tokens the agent wrote (actions), and
``rewards`` (L,) with each turn's reward on that turn's last action token and 0 elsewhere (spec §1). A turn
written in steps (a stepwise row) puts each step's reward on the step's last token: every step is tokenised on
its own, so a step boundary is a token boundary (the end-of-turn text of a chat template, such as EOS, belongs
to the last step).

**With a chat template** (the default when the tokenizer has one) the conversation is rendered by
``tokenizer.apply_chat_template`` and split into segments by rendering growing prefixes: the action of the
assistant message ``j`` is the text between ``render(messages[:j], add_generation_prompt=True)`` and
``render(messages[:j+1])`` — the content plus whatever the template writes to end the turn (EOS, ``<|im_end|>``
…), i.e. exactly what the model generates after the generation prompt. Whitespace the template writes *after*
an end-of-turn special token (``"<|im_end|>\\n"``) is state, not action. Each segment is tokenised on its own
with ``add_special_tokens=False`` (so the BOS the template writes is not doubled, and no token straddles a
state/action boundary: the response tokens are those the model would sample after the prompt tokens), then
the segments are concatenated. A template whose rendering of a prefix is not a prefix of the whole rendering
is refused with a ValueError.

**Without a chat template** (single-turn rows only): ``[BOS] + tokens(prompt)`` then ``tokens(completion) +
[EOS]``; BOS is added only when the tokenizer has one and the prompt does not already start with it.

**Truncation** (``max_length``; ``max_prompt_length`` defaults to ``max_length // 2``). The prompt is the
state before the first action token, the response everything from it on (later user/tool turns included).
The response keeps up to ``max_length - max_prompt_length`` tokens for sure; the prompt gets the rest of
the budget. A longer prompt is truncated from the left, keeping its leading BOS (``prompt_truncated``).
A response that still does not fit is cut from the right (``response_truncated``; state tokens left after
the last kept action are dropped, and the rewards of the cut tokens are added to the last kept action token,
so the undiscounted return-to-go of every kept token is unchanged) or, with ``long_response="drop"``, the row
is dropped (``dropped_long_response``). The response always keeps at least one action token, so no row
becomes empty. The counts are returned in a :class:`TokenizeReport` and logged, as a warning when any row
was cut. A ``max_length`` that cuts more than :data:`MAX_TRUNCATED_FRACTION` of the rows is a ValueError
naming the counts and the longest example (pass ``max_truncated_fraction`` to accept more).

**At scale.** :func:`tokenize_rows` runs :func:`encode_rows` through ``datasets.Dataset.map`` (batched,
``num_proc`` processes on contiguous shards), so rows read from files are tokenised once and then loaded from
the ``datasets`` cache (by the other ranks of a distributed run too: the trainer tokenises on the main process
first); the report and the prompt ids are computed from the mapped columns with Arrow, so a cached result
gives the same report. Its outputs equal the row-by-row loop it replaced (``tests/ref_tokenization.py``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from shiq_llm.data.rows import prompt_key, row_conversation

__all__ = [
    "Encoded",
    "TokenizeReport",
    "encode_conversation",
    "truncate_encoded",
    "encode_rows",
    "example_features",
    "tokenize_rows",
    "ENCODED_COLUMNS",
    "LONG_RESPONSE",
    "MAX_TRUNCATED_FRACTION",
]

logger = logging.getLogger(__name__)

#: What :func:`truncate_encoded` does with a response that does not fit in ``max_length``.
LONG_RESPONSE = ("truncate", "drop")

#: Largest fraction of rows :func:`tokenize_rows` may cut (prompt or response truncated, or dropped) before it
#: refuses the ``max_length``: beyond it the data trained on is mostly not the data given (a 16-token budget
#: on paragraphs is a typo, not a policy). Override per call with ``max_truncated_fraction``.
MAX_TRUNCATED_FRACTION = 0.5


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: three aligned lists of length L."""

    input_ids: list[int]
    response_mask: list[bool]
    rewards: list[float]


@dataclass
class TokenizeReport:
    """Counts of :func:`tokenize_rows`: rows read, rows kept, and what truncation did."""

    rows: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_long_response: int = 0

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def _render(tokenizer, messages, *, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises TemplateError, e.g. "roles must alternate user/assistant"
        raise ValueError(f"{where}: the chat template cannot render this conversation: {error}") from error


def _strip_after_end_of_turn(text: str, special_tokens: Sequence[str]) -> str:
    """Drop trailing whitespace that follows a special token (``"…<|im_end|>\\n"`` → ``"…<|im_end|>"``)."""
    stripped = text.rstrip()
    if len(stripped) < len(text) and any(stripped.endswith(t) for t in special_tokens if t):
        return stripped
    return text


def _step_segments(action: str, steps: Sequence[str] | None, where: str, j: int) -> list[tuple[str, bool]]:
    """An action turn's text as its steps' segments: what the template writes before the content joins the first
    step, what it writes after (end of turn) the last one."""
    if not steps:
        return [(action, True)]
    content = "".join(steps)
    at = action.find(content)
    if at < 0:
        raise ValueError(f"{where}: the chat template rewrites the content of message {j}, so its steps cannot be "
                         "located; pass use_chat_template=False or join the steps into one completion")
    pieces = list(steps)
    pieces[0] = action[:at] + pieces[0]
    pieces[-1] += action[at + len(content):]
    return [(piece, True) for piece in pieces]


def _template_segments(messages, actions: Sequence[int], tokenizer, where: str) -> list[tuple[str, bool]]:
    """Split the template rendering into alternating (text, is_action) segments, an action turn written in steps
    into one segment per step; see the module docstring."""
    steps = {j: messages[j].get("steps") for j in actions}
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, messages[: actions[-1] + 1], generation_prompt=False, where=where)
    specials = list(tokenizer.all_special_tokens)
    segments: list[tuple[str, bool]] = []
    position = 0
    for j in actions:
        head = _render(tokenizer, messages[:j], generation_prompt=True, where=where)
        body = _render(tokenizer, messages[: j + 1], generation_prompt=False, where=where)
        if not (full.startswith(head) and full.startswith(body) and position <= len(head) < len(body)):
            raise ValueError(
                f"{where}: the chat template is not prefix-stable at message {j} (rendering the conversation up to "
                "it is not a prefix of the whole rendering), so the assistant tokens cannot be located; "
                "pass a simpler chat template or use_chat_template=False"
            )
        action = _strip_after_end_of_turn(full[len(head) : len(body)], specials)
        if full[position : len(head)]:
            segments.append((full[position : len(head)], False))
        segments += _step_segments(action, steps[j], where, j)
        position = len(head) + len(action)
    return segments  # what follows the last action (trailing whitespace) is after the episode: dropped


def encode_conversation(
    messages: Sequence[Mapping],
    step_rewards: Sequence[float],
    n_prompt: int,
    tokenizer,
    *,
    use_chat_template: bool,
    where: str = "row",
) -> Encoded:
    """Tokenise one conversation (see the module docstring); ValueError naming ``where`` on failure.

    The action turns are the assistant messages at positions ``>= n_prompt``, each one step or, with a
    ``"steps"`` list, several; ``step_rewards[k]`` lands on the last token of the k-th step. Position 0 is
    never an action.
    """
    actions = [j for j, m in enumerate(messages) if m["role"] == "assistant" and j >= n_prompt]
    n_steps = sum(len(messages[j].get("steps") or [None]) for j in actions)
    if n_steps != len(step_rewards):
        raise ValueError(f"{where}: {len(step_rewards)} reward(s) for {n_steps} action step(s) in {len(actions)} "
                         "assistant turn(s)")
    if use_chat_template:
        if tokenizer.chat_template is None:
            raise ValueError(f"{where}: use_chat_template=True but the tokenizer has no chat template")
        segments = _template_segments(messages, actions, tokenizer, where)
    else:
        if len(messages) != 2 or n_prompt != 1 or messages[0]["role"] != "user":
            raise ValueError(
                f"{where}: a conversational row (prompt given as messages other than one user turn, or several "
                "turns) needs a tokenizer with a chat template"
            )
        segments = [(messages[0]["content"], False)] + _step_segments(messages[1]["content"],
                                                                       messages[1].get("steps"), where, 1)
    texts = [text for text, _ in segments]
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]

    if not use_chat_template:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token: a completion must end with one (set tokenizer.eos_token)")
        if bos is not None and (not pieces[0] or pieces[0][0] != bos):
            pieces[0] = [bos] + pieces[0]
        pieces[-1] = pieces[-1] + [eos]

    input_ids: list[int] = []
    response_mask: list[bool] = []
    rewards: list[float] = []
    step = 0
    for (text, is_action), ids in zip(segments, pieces):
        if is_action and not ids:
            raise ValueError(f"{where}: action step {step} tokenises to no token (text {text!r})")
        input_ids += ids
        response_mask += [is_action] * len(ids)
        rewards += [0.0] * len(ids)
        if is_action:
            rewards[-1] = float(step_rewards[step])
            step += 1
    if response_mask[0]:
        if tokenizer.bos_token_id is None:
            raise ValueError(f"{where}: the prompt is empty and the tokenizer has no BOS token to stand for it")
        input_ids, response_mask, rewards = [tokenizer.bos_token_id] + input_ids, [False] + response_mask, [0.0] + rewards
    return Encoded(input_ids, response_mask, rewards)


def truncate_encoded(
    encoded: Encoded, *, max_length: int, max_prompt_length: int, long_response: str, bos_token_id: int | None
) -> tuple[Encoded | None, bool, bool]:
    """Apply the truncation policy of the module docstring to one example.

    Returns ``(example or None if dropped, prompt_truncated, response_truncated)``.
    """
    ids, mask, rewards = encoded.input_ids, encoded.response_mask, encoded.rewards
    if len(ids) <= max_length:
        return encoded, False, False
    first = mask.index(True)  # prompt = ids[:first], response = ids[first:]
    response_budget = min(len(ids) - first, max_length - max_prompt_length)
    prompt_budget = max_length - response_budget
    prompt_cut = first > prompt_budget
    if prompt_cut:
        keep = 1 if ids[0] == bos_token_id else 0  # the leading BOS survives left truncation
        start = first - (prompt_budget - keep)  # first prompt token kept after the BOS
        ids = ids[:keep] + ids[start:]
        mask = mask[:keep] + mask[start:]
        rewards = rewards[:keep] + rewards[start:]
        first = prompt_budget
    if len(ids) <= max_length:
        return Encoded(ids, mask, rewards), prompt_cut, False
    if long_response == "drop":
        return None, prompt_cut, True
    last = max(p for p in range(first, max_length) if mask[p])  # last action token that fits
    kept_rewards = rewards[: last + 1]
    kept_rewards[last] += sum(rewards[last + 1 :])  # return-to-go of every kept token unchanged
    return Encoded(ids[: last + 1], mask[: last + 1], kept_rewards), prompt_cut, True


#: Columns :func:`encode_rows` writes per row: the example (empty lists when the row is dropped), then what
#: :func:`tokenize_rows` needs for its report and prompt ids.
ENCODED_COLUMNS = ("input_ids", "response_mask", "rewards", "row_index", "prompt_key", "length", "prompt_cut",
                   "response_cut", "dropped")
#: Column of the pickled rows when :func:`tokenize_rows` is given a list (any Python values, kept exactly).
_PICKLED = "__shiq_row__"


def _encoded_features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int64")),
        "response_mask": datasets.List(datasets.Value("bool")),
        "rewards": datasets.List(datasets.Value("float64")),
        "row_index": datasets.Value("int64"),
        "prompt_key": datasets.Value("string"),
        "length": datasets.Value("int64"),
        "prompt_cut": datasets.Value("bool"),
        "response_cut": datasets.Value("bool"),
        "dropped": datasets.Value("bool"),
    })


def example_features():
    """The ``datasets.Features`` of :func:`tokenize_rows`'s examples."""
    import datasets

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int64")),
        "response_mask": datasets.List(datasets.Value("bool")),
        "rewards": datasets.List(datasets.Value("float64")),
        "prompt_id": datasets.Value("int64"),
        "row_index": datasets.Value("int64"),
    })


def encode_rows(batch: Mapping[str, list], indices: Sequence[int], *, tokenizer, use_chat_template: bool,
                max_length: int | None, max_prompt_length: int | None, long_response: str) -> dict[str, list]:
    """``Dataset.map`` function (batched, with indices) of :func:`tokenize_rows`: each row of ``batch``
    tokenised (:func:`encode_conversation`) and truncated (:func:`truncate_encoded`), as the
    :data:`ENCODED_COLUMNS`. ``indices`` are the rows' indices in the whole dataset (errors name them)."""
    if _PICKLED in batch:
        import pickle

        rows = [pickle.loads(data) for data in batch[_PICKLED]]
    else:
        rows = [{name: values[j] for name, values in batch.items()} for j in range(len(indices))]
    out: dict[str, list] = {name: [] for name in ENCODED_COLUMNS}
    for index, row in zip(indices, rows):
        messages, step_rewards, n_prompt = row_conversation(row, index)
        example = encode_conversation(
            messages, step_rewards, n_prompt, tokenizer, use_chat_template=use_chat_template, where=f"row {index}"
        )
        out["length"].append(len(example.input_ids))
        prompt_cut = response_cut = False
        if max_length is not None:
            example, prompt_cut, response_cut = truncate_encoded(
                example, max_length=max_length, max_prompt_length=max_prompt_length, long_response=long_response,
                bos_token_id=tokenizer.bos_token_id,
            )
        out["input_ids"].append(example.input_ids if example is not None else [])
        out["response_mask"].append(example.response_mask if example is not None else [])
        out["rewards"].append(example.rewards if example is not None else [])
        out["row_index"].append(index)
        out["prompt_key"].append(prompt_key(messages, n_prompt))
        out["prompt_cut"].append(prompt_cut)
        out["response_cut"].append(response_cut)
        out["dropped"].append(example is None)
    return out


def tokenize_rows(
    rows,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    long_response: str = "truncate",
    use_chat_template: bool | None = None,
    max_truncated_fraction: float = MAX_TRUNCATED_FRACTION,
    num_proc: int | None = None,
):
    """Tokenise canonical rows into a ``datasets.Dataset`` of training examples, with a :class:`TokenizeReport`.

    rows: a ``Dataset`` or list of dicts in a canonical form (``shiq_llm.data.rows``).
    Returns ``(dataset, report)``; the dataset has one example per kept row with columns ``input_ids``
    (list[int], L), ``response_mask`` (list[bool], L), ``rewards`` (list[float], L), ``prompt_id`` (int,
    equal for rows with the same prompt, numbered in order of first appearance among the kept rows) and
    ``row_index`` (int, the row's index in ``rows``).
    use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
    max_length / max_prompt_length / long_response: the truncation policy of the module docstring
    (``long_response`` ∈ ``LONG_RESPONSE``). ValueError names the row and field of any bad row, and the
    counts when more than ``max_truncated_fraction`` (default :data:`MAX_TRUNCATED_FRACTION`) of the rows are
    cut; cutting fewer is logged as a warning.
    num_proc: processes of ``datasets.Dataset.map`` (:func:`encode_rows` on contiguous shards; None: this
    process). A ``Dataset`` read from files is tokenised once: a second call with the same rows, tokenizer
    and options loads the result from the ``datasets`` cache (and recomputes the report from it). A list is
    first stored as one pickled row per entry, so its values reach the tokeniser exactly as given.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if not 0.0 <= max_truncated_fraction <= 1.0:
        raise ValueError(f"max_truncated_fraction must be in [0, 1], got {max_truncated_fraction!r}")
    if long_response not in LONG_RESPONSE:
        raise ValueError(f"long_response must be one of {LONG_RESPONSE}, got {long_response!r}")
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc must be an integer >= 1 or None, got {num_proc!r}")
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one prompt and one response token), got {max_length}")
        max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        if not 1 <= max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length), got {max_prompt_length} with max_length={max_length}")
    elif max_prompt_length is not None:
        raise ValueError("max_prompt_length needs max_length")
    if len(rows) == 0:
        raise ValueError("the dataset has no rows")
    if not isinstance(rows, datasets.Dataset):
        import pickle

        rows = datasets.Dataset.from_dict({_PICKLED: [pickle.dumps(row) for row in rows]})
    encoded = rows.map(
        encode_rows, with_indices=True, batched=True, num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=rows.column_names, features=_encoded_features(), desc="tokenising",
        fn_kwargs={"tokenizer": tokenizer, "use_chat_template": use_chat_template, "max_length": max_length,
                   "max_prompt_length": max_prompt_length, "long_response": long_response},
    )
    table = encoded.with_format("arrow")[:]  # pa.Table in row order
    dropped, prompt_cut, response_cut = (table.column(c).combine_chunks() for c in ("dropped", "prompt_cut", "response_cut"))
    count = lambda mask: int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)  # noqa: E731
    report = TokenizeReport(rows=len(table), kept=len(table) - count(dropped), prompt_truncated=count(prompt_cut),
                            response_truncated=count(pc.and_(response_cut, pc.invert(dropped))),
                            dropped_long_response=count(dropped))
    cut_rows = count(pc.or_(prompt_cut, response_cut))
    if report.kept == 0:
        raise ValueError(f"every row was dropped by truncation ({report}); raise max_length or use long_response='truncate'")
    if cut_rows:
        cut = (f"{cut_rows} of {report.rows} rows ({cut_rows / report.rows:.0%}) were cut by max_length={max_length}")
        if cut_rows > max_truncated_fraction * report.rows:
            longest = pc.max(table.column("length")).as_py()
            raise ValueError(
                f"{cut}, more than MAX_TRUNCATED_FRACTION = {max_truncated_fraction:.0%}: {report}; raise max_length "
                f"(the longest example has {longest} tokens), or pass max_truncated_fraction to accept it"
            )
        logger.warning("%s: %s", cut, report)
    else:
        logger.info("tokenized %s (max_length=%s)", report, max_length)
    kept = table.filter(pc.invert(dropped))
    prompt_id = pc.dictionary_encode(kept.column("prompt_key").combine_chunks()).indices  # first appearance order
    columns = {"input_ids": kept.column("input_ids"), "response_mask": kept.column("response_mask"),
               "rewards": kept.column("rewards"), "prompt_id": pc.cast(prompt_id, pa.int64()),
               "row_index": kept.column("row_index")}
    features = example_features()
    examples = pa.table(columns).cast(features.arrow_schema).combine_chunks()
    return datasets.Dataset(examples, info=datasets.DatasetInfo(features=features)), report
