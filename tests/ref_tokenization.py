"""The loop that ``shiq_llm.data.tokenization.tokenize_rows`` was before it went through ``datasets.Dataset.map``:
one row after another in this process. Kept as the reference its outputs and reports must equal. Never imported
by the library."""

from __future__ import annotations

from typing import Any

from shiq_llm.data.rows import prompt_key, row_conversation
from shiq_llm.data.tokenization import (
    LONG_RESPONSE,
    MAX_TRUNCATED_FRACTION,
    TokenizeReport,
    encode_conversation,
    truncate_encoded,
)


def tokenize_rows_loop(
    rows,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    long_response: str = "truncate",
    use_chat_template: bool | None = None,
    max_truncated_fraction: float = MAX_TRUNCATED_FRACTION,
):
    """The previous ``tokenize_rows``: a Python loop over the rows (same arguments, outputs and errors).

    rows: a ``Dataset`` or list of dicts in a canonical form (``shiq_llm.data.rows``).
    Returns ``(dataset, report)``; the dataset has one example per kept row with columns ``input_ids``
    (list[int], L), ``response_mask`` (list[bool], L), ``rewards`` (list[float], L), ``prompt_id`` (int,
    equal for rows with the same prompt) and ``row_index`` (int, the row's index in ``rows``).
    use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
    max_length / max_prompt_length / long_response: the truncation policy of the module docstring
    (``long_response`` ∈ ``LONG_RESPONSE``). ValueError names the row and field of any bad row, and the
    counts when more than ``max_truncated_fraction`` (default :data:`MAX_TRUNCATED_FRACTION`) of the rows are
    cut; cutting fewer is logged as a warning.
    """
    import datasets

    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if not 0.0 <= max_truncated_fraction <= 1.0:
        raise ValueError(f"max_truncated_fraction must be in [0, 1], got {max_truncated_fraction!r}")
    if long_response not in LONG_RESPONSE:
        raise ValueError(f"long_response must be one of {LONG_RESPONSE}, got {long_response!r}")
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one prompt and one response token), got {max_length}")
        max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        if not 1 <= max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length), got {max_prompt_length} with max_length={max_length}")
    elif max_prompt_length is not None:
        raise ValueError("max_prompt_length needs max_length")

    report = TokenizeReport()
    cut_rows, longest = 0, 0
    prompt_ids: dict[str, int] = {}
    columns: dict[str, list[Any]] = {k: [] for k in ("input_ids", "response_mask", "rewards", "prompt_id", "row_index")}
    for index, row in enumerate(rows):
        report.rows += 1
        messages, turn_rewards, n_prompt = row_conversation(row, index)
        example = encode_conversation(
            messages, turn_rewards, n_prompt, tokenizer, use_chat_template=use_chat_template, where=f"row {index}"
        )
        longest = max(longest, len(example.input_ids))
        if max_length is not None:
            example, prompt_cut, response_cut = truncate_encoded(
                example,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                long_response=long_response,
                bos_token_id=tokenizer.bos_token_id,
            )
            report.prompt_truncated += prompt_cut
            cut_rows += prompt_cut or response_cut
            if example is None:
                report.dropped_long_response += 1
                continue
            report.response_truncated += response_cut
        report.kept += 1
        key = prompt_key(messages, n_prompt)
        columns["input_ids"].append(example.input_ids)
        columns["response_mask"].append(example.response_mask)
        columns["rewards"].append(example.rewards)
        columns["prompt_id"].append(prompt_ids.setdefault(key, len(prompt_ids)))
        columns["row_index"].append(index)
    if report.rows == 0:
        raise ValueError("the dataset has no rows")
    if report.kept == 0:
        raise ValueError(f"every row was dropped by truncation ({report}); raise max_length or use long_response='truncate'")
    if cut_rows:
        cut = (f"{cut_rows} of {report.rows} rows ({cut_rows / report.rows:.0%}) were cut by max_length={max_length}")
        if cut_rows > max_truncated_fraction * report.rows:
            raise ValueError(
                f"{cut}, more than MAX_TRUNCATED_FRACTION = {max_truncated_fraction:.0%}: {report}; raise max_length "
                f"(the longest example has {longest} tokens), or pass max_truncated_fraction to accept it"
            )
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int64")),
            "response_mask": datasets.List(datasets.Value("bool")),
            "rewards": datasets.List(datasets.Value("float64")),
            "prompt_id": datasets.Value("int64"),
            "row_index": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features), report
