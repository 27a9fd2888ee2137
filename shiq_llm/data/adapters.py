"""Converters from public dataset schemas to the canonical rows of ``shiq_llm.data.rows``.

Each adapter is a plain function ``adapter(rows, **options) -> datasets.Dataset`` over a ``datasets.Dataset``
or a list of dicts in that dataset's own schema, registered by name in :data:`ADAPTERS` (so a command line
can say ``--format hh``). Source rows that cannot give a usable example (an empty response, a completion
without a score) are skipped and counted in a log warning; malformed rows raise a ValueError naming the row
and the field.

========== ======================================================= ==========================================
name       input schema                                            output
========== ======================================================= ==========================================
``paired`` ``prompt``, ``chosen``, ``rejected`` (strings, or lists  two single-turn rows per input row; reward
           of messages as in ``HuggingFaceH4/ultrafeedback_        ``score_chosen``/``score_rejected`` when
           binarized`` / TRL), optional ``score_chosen``,          present, else ``chosen_reward`` (1) and
           ``score_rejected``                                      ``rejected_reward`` (0)
``ultra…`` ``openbmb/UltraFeedback``: ``instruction``,             one single-turn row per rated completion;
           ``completions`` [{``response``, ``annotations``,        reward = ``score`` (default
           ``overall_score``, ``fine-grained_score``, …}]          ``overall_score``)
``hh``     ``Anthropic/hh-rlhf``: ``chosen``, ``rejected`` —       two single-turn rows; prompt = the dialogue
           ``"\\n\\nHuman: … \\n\\nAssistant: …"`` transcripts     before the last ``"\\n\\nAssistant:"``
``bfcl``   BFCL v3 multi-turn entries (``id``, ``question``,       one multi-turn row: user turns and tool
           optional ``function``) joined with per-turn calls       outputs are state, each call step an
           (``ground_truth`` or a ``result``), optional            action, each turn's score the reward of
           ``execution_results``, and ``turn_scores``              its last step
``step…``  TRL's stepwise supervision (``trl-lib/math_shepherd``,  one stepwise row: each step followed by
           ``trl-lib/prm800k``): ``prompt``, ``completions`` (the  ``separator``, its reward
           steps), ``labels`` (a bool or a number per step)        ``correct_reward`` / ``incorrect_reward``
                                                                   for a bool label, the number otherwise
========== ======================================================= ==========================================
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Callable, Iterable, Mapping

__all__ = ["paired_preferences", "ultrafeedback", "hh_rlhf", "bfcl_multi_turn", "stepwise_supervision", "ADAPTERS",
           "BFCL_SYSTEM_PROMPT"]

logger = logging.getLogger(__name__)


def _to_dataset(out: list[dict], name: str, skipped: int, what: str):
    import datasets

    if skipped:
        logger.warning("%s: skipped %d %s", name, skipped, what)
    if not out:
        raise ValueError(f"{name}: no usable row (skipped {skipped} {what})")
    return datasets.Dataset.from_list(out)


def _require(row: Mapping[str, Any], column: str, index: int, name: str) -> Any:
    value = row.get(column)
    if value is None:
        raise ValueError(f"{name}: row {index}: missing field {column!r}")
    return value


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _plain_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where} must be a string or a non-empty list of messages, got {messages!r:.80}")
    try:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    except (TypeError, KeyError):
        raise ValueError(f"{where}: every message needs 'role' and 'content'") from None


# ----------------------------------------------------------------------------------------------------------
# Paired preferences
# ----------------------------------------------------------------------------------------------------------


def _split_pair(row: Mapping[str, Any], index: int) -> tuple[Any, str, str]:
    """(prompt, chosen completion, rejected completion) of one preference row."""
    where = f"paired: row {index}"
    chosen, rejected = _require(row, "chosen", index, "paired"), _require(row, "rejected", index, "paired")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
    if isinstance(chosen, str):
        prompt = _require(row, "prompt", index, "paired")
        if not isinstance(prompt, str):
            prompt = _plain_messages(prompt, f"{where}: field 'prompt'")
        return prompt, chosen, rejected
    chosen = _plain_messages(chosen, f"{where}: field 'chosen'")
    rejected = _plain_messages(rejected, f"{where}: field 'rejected'")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError(f"{where}: 'chosen' and 'rejected' must end with an assistant message")
    if chosen[0]["role"] != "assistant":  # full conversations: the prompt is everything before the last turn
        if chosen[:-1] != rejected[:-1]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' do not share the same prompt messages")
        return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    if len(chosen) != 1 or len(rejected) != 1:  # TRL's conversational form: the prompt is its own column
        raise ValueError(f"{where}: 'chosen'/'rejected' without the prompt must be exactly one assistant message")
    prompt = _require(row, "prompt", index, "paired")
    prompt = prompt if isinstance(prompt, str) else _plain_messages(prompt, f"{where}: field 'prompt'")
    return prompt, chosen[0]["content"], rejected[0]["content"]


def paired_preferences(rows: Iterable[Mapping[str, Any]], *, chosen_reward: float = 1.0, rejected_reward: float = 0.0):
    """Preference pairs → two single-turn rows each (chosen first).

    Input: ``prompt`` (string or messages), ``chosen`` and ``rejected`` — strings, single assistant messages
    (TRL), or full conversations ending with the assistant turn (``ultrafeedback_binarized``, where the
    prompt becomes those messages). Rewards: ``score_chosen`` / ``score_rejected`` when the row has them,
    else ``chosen_reward`` / ``rejected_reward``. Pairs with an empty chosen or rejected text lose that side.
    """
    out, skipped = [], 0
    for index, row in enumerate(rows):
        prompt, chosen, rejected = _split_pair(row, index)
        scores = (row.get("score_chosen"), row.get("score_rejected"))
        if (scores[0] is None) != (scores[1] is None):
            raise ValueError(f"paired: row {index}: 'score_chosen' and 'score_rejected' must be given together")
        if scores[0] is not None:
            rewards = [_score(s, f"paired: row {index}: field {c!r}") for s, c in zip(scores, ("score_chosen", "score_rejected"))]
        else:
            rewards = [chosen_reward, rejected_reward]
        for completion, reward in zip((chosen, rejected), rewards):
            if completion.strip():
                out.append({"prompt": prompt, "completion": completion, "reward": float(reward)})
            else:
                skipped += 1
    return _to_dataset(out, "paired", skipped, "empty responses")


# ----------------------------------------------------------------------------------------------------------
# UltraFeedback
# ----------------------------------------------------------------------------------------------------------

#: The four annotation aspects of UltraFeedback, each rated 1–5 by GPT-4 (``"Rating"``, a string, may be "N/A").
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def _aspect_rating(annotation: Any) -> float | None:
    items = annotation if isinstance(annotation, list) else [annotation]
    values = []
    for item in items:
        try:
            values.append(float(item["Rating"]))
        except (TypeError, KeyError, ValueError):  # "N/A", missing
            continue
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _completion_score(completion: Mapping[str, Any], score: str) -> float | None:
    if score in ("overall_score", "fine-grained_score"):
        value = completion.get(score)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    annotations = completion.get("annotations") or {}
    if score == "mean_rating":
        ratings = [_aspect_rating(annotations.get(a)) for a in ULTRAFEEDBACK_ASPECTS if annotations.get(a) is not None]
        ratings = [r for r in ratings if r is not None]
        return sum(ratings) / len(ratings) if ratings else None
    return _aspect_rating(annotations.get(score)) if annotations.get(score) is not None else None


def ultrafeedback(rows: Iterable[Mapping[str, Any]], *, score: str = "overall_score"):
    """``openbmb/UltraFeedback`` → one single-turn row per rated completion (prompt = ``instruction``).

    score: ``"overall_score"`` (default: GPT-4's 1–10 overall rating of the response), ``"fine-grained_score"``
    (the released mean of the four aspect ratings), ``"mean_rating"`` (that mean recomputed from
    ``annotations``, "N/A" ratings left out) or one aspect: ``"helpfulness"``, ``"honesty"``,
    ``"instruction_following"``, ``"truthfulness"`` (its 1–5 rating). Completions with an empty response or no
    such score are skipped (counted in the log). The generation-time ``custom_system_prompt`` is not part
    of the prompt, as in ``ultrafeedback_binarized``.
    """
    choices = ("overall_score", "fine-grained_score", "mean_rating") + ULTRAFEEDBACK_ASPECTS
    if score not in choices:
        raise ValueError(f"ultrafeedback: score must be one of {choices}, got {score!r}")
    out, skipped = [], 0
    for index, row in enumerate(rows):
        instruction = _require(row, "instruction", index, "ultrafeedback")
        completions = _require(row, "completions", index, "ultrafeedback")
        if not isinstance(instruction, str) or not isinstance(completions, (list, tuple)):
            raise ValueError(f"ultrafeedback: row {index}: 'instruction' must be a string and 'completions' a list")
        for completion in completions:
            response = completion.get("response") if isinstance(completion, Mapping) else None
            reward = _completion_score(completion, score) if isinstance(completion, Mapping) else None
            if not isinstance(response, str) or not response.strip() or reward is None:
                skipped += 1
                continue
            out.append({"prompt": instruction, "completion": response, "reward": reward})
    return _to_dataset(out, "ultrafeedback", skipped, f"completions without a response or a {score!r}")


# ----------------------------------------------------------------------------------------------------------
# Anthropic HH
# ----------------------------------------------------------------------------------------------------------

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_LAST = "\n\nAssistant:"


def _hh_messages(text: str, where: str) -> list[dict[str, str]]:
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise ValueError(f"{where}: the transcript must start with '\\n\\nHuman:', got {text[:40]!r}")
    messages = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _HH_ROLES[marker], "content": content[1:] if content.startswith(" ") else content})
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the transcript must end with an '\\n\\nAssistant:' turn")
    return messages


def hh_rlhf(
    rows: Iterable[Mapping[str, Any]], *, chosen_reward: float = 1.0, rejected_reward: float = 0.0, as_messages: bool = True
):
    """``Anthropic/hh-rlhf`` transcripts → two single-turn rows per input row (chosen first).

    Each transcript is split at its last ``"\\n\\nAssistant:"``: the completion is the text after it (one
    leading space removed). ``as_messages=True`` (default): the prompt is the dialogue before it as
    user/assistant messages (for chat templates; the earlier assistant turns are state). ``as_messages=False``:
    the prompt is the raw transcript up to and including ``"\\n\\nAssistant:"`` and the completion keeps its
    leading space, so ``prompt + completion`` is the original text (for base models without a template).
    Rewards: ``chosen_reward`` (1) and ``rejected_reward`` (0). Transcripts whose last turn is empty are skipped.
    """
    out, skipped = [], 0
    for index, row in enumerate(rows):
        for column, reward in (("chosen", chosen_reward), ("rejected", rejected_reward)):
            text = _require(row, column, index, "hh")
            where = f"hh: row {index}: field {column!r}"
            if not isinstance(text, str):
                raise ValueError(f"{where} must be a string transcript, got {type(text).__name__}")
            if as_messages:
                messages = _hh_messages(text, where)
                prompt, completion = messages[:-1], messages[-1]["content"]
                if not prompt:
                    raise ValueError(f"{where}: the transcript has no Human turn before the last Assistant turn")
            else:
                cut = text.rfind(_HH_LAST)
                if cut < 0:
                    raise ValueError(f"{where}: no '\\n\\nAssistant:' in the transcript")
                prompt, completion = text[: cut + len(_HH_LAST)], text[cut + len(_HH_LAST) :]
            if not completion.strip():
                skipped += 1
                continue
            out.append({"prompt": prompt, "completion": completion, "reward": float(reward)})
    return _to_dataset(out, "hh", skipped, "transcripts with an empty last assistant turn")


# ----------------------------------------------------------------------------------------------------------
# BFCL multi-turn function calling
# ----------------------------------------------------------------------------------------------------------

#: System message written when a row has function docs (``function``); ``{functions}`` is their JSON.
BFCL_SYSTEM_PROMPT = (
    "You can call the functions described below (JSON). Answer with the calls to make, as a list "
    "[func_name(param=value, ...), ...], or [] when no call is needed.\n{functions}"
)


def _drop_none(value: Any) -> Any:
    """Remove the None fields that Arrow adds when it unifies dicts with different keys."""
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def _call_text(call: Any, where: str) -> str:
    if isinstance(call, str):
        return call
    if isinstance(call, Mapping):  # BFCL function-calling results: {name: arguments as a JSON string or dict}
        call = _drop_none(call)
        if len(call) == 1:
            (name, arguments), = call.items()
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"
    raise ValueError(f"{where}: a call must be a string or a one-key dict {{name: arguments}}, got {call!r:.80}")


def _step_text(step: Any, where: str) -> str:
    """One assistant step: ``"[call_1, call_2]"``; a string already written as ``"[...]"`` is kept as is."""
    if isinstance(step, str) and step.strip().startswith("[") and step.strip().endswith("]"):
        return step
    calls = step if isinstance(step, (list, tuple)) else [step]
    return "[" + ", ".join(_call_text(c, where) for c in calls) + "]"


def bfcl_multi_turn(
    rows: Iterable[Mapping[str, Any]],
    *,
    calls: str = "ground_truth",
    scores: str = "turn_scores",
    results: str = "execution_results",
    system_prompt: str | None = BFCL_SYSTEM_PROMPT,
):
    """BFCL v3 multi-turn dialogues with per-turn scores → multi-turn rows ``{id, messages, rewards}``.

    Input row: a BFCL v3 multi-turn test entry — ``question`` (one list of user messages per turn; a turn
    may have none), optional ``function`` (function docs: written into a system message with
    ``system_prompt``) and ``id`` — joined with, per turn, the agent's steps in column ``calls``
    (``ground_truth`` of ``possible_answer``: one call string per step; or a BFCL ``result``: per step a list
    of calls, strings or ``{name: json_arguments}``, or a raw ``"[...]"`` string), optionally the tool
    outputs in column ``results`` (per turn, per step: a string or a list of strings, one per call) and the
    turn scores in column ``scores`` (one number per turn, e.g. BFCL's per-turn checker outcome — not part of
    BFCL's files: added by whoever scored the dialogue).
    Output: per turn, its user messages, then for every step an assistant message ``"[call(...), ...]"``
    followed by a ``tool`` message with its outputs (when given); a turn without steps gets one assistant
    message ``"[]"`` (no call). Each turn's score is the reward of its last assistant message; its earlier
    steps get 0. Tool and user messages are state.
    """
    out = []
    for index, row in enumerate(rows):
        at = f"bfcl: row {index}"
        question = _require(row, "question", index, "bfcl")
        steps_per_turn = _require(row, calls, index, "bfcl")
        turn_scores = _require(row, scores, index, "bfcl")
        outputs = row.get(results)
        for name, value in ((calls, steps_per_turn), (scores, turn_scores)) + (((results, outputs),) if outputs is not None else ()):
            if not isinstance(value, (list, tuple)) or len(value) != len(question):
                raise ValueError(f"{at}: field {name!r} must have one entry per turn ({len(question)} turns in 'question'), got {value!r:.80}")
        messages: list[dict[str, str]] = []
        if system_prompt is not None and row.get("function"):
            functions = json.dumps(_drop_none(list(row["function"])), ensure_ascii=False)
            messages.append({"role": "system", "content": system_prompt.format(functions=functions)})
        rewards: list[float] = []
        for turn, (users, steps, score) in enumerate(zip(question, steps_per_turn, turn_scores)):
            where = f"{at}: turn {turn}"
            messages += _plain_messages(users, f"{where}: 'question'") if users else []
            tool = outputs[turn] if outputs is not None else None
            if not steps:
                steps, tool = [[]], None  # no call this turn: one empty answer "[]", nothing executed
            elif tool is not None and len(tool) != len(steps):
                raise ValueError(f"{where}: field {results!r} has {len(tool)} step(s), field {calls!r} has {len(steps)}")
            for s, step in enumerate(steps):
                messages.append({"role": "assistant", "content": _step_text(step, f"{where}: field {calls!r}")})
                rewards.append(0.0)
                if tool is not None and s < len(tool):
                    text = tool[s] if isinstance(tool[s], str) else "\n".join(str(t) for t in tool[s])
                    messages.append({"role": "tool", "content": text})
            rewards[-1] = _score(score, f"{where}: field {scores!r}")
        out.append({"id": row.get("id"), "messages": messages, "rewards": rewards})
    return _to_dataset(out, "bfcl", 0, "rows")


# ----------------------------------------------------------------------------------------------------------
# Stepwise supervision (process reward labels)
# ----------------------------------------------------------------------------------------------------------


def stepwise_supervision(rows: Iterable[Mapping[str, Any]], *, correct_reward: float = 1.0,
                         incorrect_reward: float = 0.0, separator: str = "\n"):
    """TRL's stepwise supervision rows → stepwise rows ``{prompt, completions, rewards}`` (``shiq_llm.data.rows``).

    Input: ``prompt`` (a string or messages), ``completions`` (the reasoning steps, strings), ``labels`` (one per
    step: a bool — is the step correct — or a number). Each step is written followed by ``separator`` (TRL's
    process-reward step separator, ``"\n"``; ``""`` keeps the steps as given), so the step's reward sits on its
    separator token; a bool label gives ``correct_reward`` or ``incorrect_reward``, a number is the reward as is.
    A row without steps is skipped (counted in a warning); a row whose labels do not match its steps, or a label
    that is neither, raises a ValueError naming the row and field.
    """
    name = "stepwise"
    out, skipped = [], 0
    correct, incorrect = _score(correct_reward, "correct_reward"), _score(incorrect_reward, "incorrect_reward")
    if not isinstance(separator, str):
        raise ValueError(f"{name}: separator must be a string, got {type(separator).__name__}")
    for index, row in enumerate(rows):
        prompt = _require(row, "prompt", index, name)
        steps, labels = _require(row, "completions", index, name), _require(row, "labels", index, name)
        if not isinstance(steps, (list, tuple)) or not all(isinstance(step, str) for step in steps):
            raise ValueError(f"{name}: row {index}: field 'completions' must be a list of strings (the steps)")
        if not isinstance(labels, (list, tuple)) or len(labels) != len(steps):
            raise ValueError(f"{name}: row {index}: field 'labels' must hold one label per step ({len(steps)} "
                             f"step(s)), got {labels!r:.80}")
        if not steps:
            skipped += 1
            continue
        rewards = [(correct if label else incorrect) if isinstance(label, bool)
                   else _score(label, f"{name}: row {index}: field 'labels'[{k}]") for k, label in enumerate(labels)]
        if not isinstance(prompt, str):
            prompt = _plain_messages(prompt, f"{name}: row {index}: field 'prompt'")
        out.append({"prompt": prompt, "completions": [step + separator for step in steps], "rewards": rewards})
    return _to_dataset(out, name, skipped, "row(s) without steps")


#: Adapters by name, for ``load_rows(source, format=name)`` and the command line's ``--format``.
ADAPTERS: dict[str, Callable[..., Any]] = {
    "paired": paired_preferences,
    "ultrafeedback": ultrafeedback,
    "hh": hh_rlhf,
    "bfcl": bfcl_multi_turn,
    "stepwise": stepwise_supervision,
}
