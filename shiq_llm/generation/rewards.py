"""Rewards of completions, for ``shiq-llm score`` and ``shiq-llm evaluate``: a Python callable or a reward model.

Both sources have one interface, a *scorer*::

    scorer.score(prompts, completions, first_row=0) -> list[float]          # single-turn rows
    scorer.score_turns(conversations, first_row=0) -> list[list[float]]     # multi-turn rows (messages)

:class:`RewardFunction` wraps a callable given as ``module:function``. Four signatures, chosen by the rows'
form and by a ``batched`` attribute on the function (set it with the :func:`batched` decorator or
``fn.batched = True``):

==================  ===============================================  ==============================================
rows                per row (default)                                batched (``fn.batched = True``)
==================  ===============================================  ==============================================
single-turn         ``fn(prompt, completion) -> float``              ``fn(prompts, completions) -> list[float]``
multi-turn          ``fn(messages) -> list[float]``, one reward per  ``fn(conversations) -> list[list[float]]``
                    assistant message, in order
==================  ===============================================  ==============================================

``prompt`` is a string or a list of ``{"role", "content"}`` messages, ``completion`` a string. A reward may
be a Python, NumPy or 0-d torch number.

:class:`RewardModel` scores ``prompt ⊕ completion`` with an ``AutoModelForSequenceClassification`` (one
label; the logit is the reward), with its own tokenizer and chat template, in batches on a chosen device.

Every reward is checked: a value that is not a real finite number, a callable that raises, or a list of the
wrong length is a ValueError naming the row (its index in the file and the start of its prompt).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "batched",
    "describe_row",
    "check_reward",
    "RewardFunction",
    "RewardModel",
    "load_reward_fn",
    "check_reward_model",
    "load_reward",
    "as_scorer",
]


def batched(fn: Callable) -> Callable:
    """Mark a reward callable as batched: it takes lists (prompts, completions) and returns a list."""
    fn.batched = True
    return fn


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt:
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        first = users[0] if users else prompt[0]
        return str(first.get("content", "")) if isinstance(first, dict) else str(first)
    return str(prompt)


def describe_row(index: int, prompt: Any, *, width: int = 40) -> str:
    """``"row 17 (prompt 'count up from 7:')"``: a row's index and the start of its prompt (first user message)."""
    text = " ".join(_prompt_text(prompt).split())
    return f"row {index} (prompt {text[:width] + ('…' if len(text) > width else '')!r})"


def check_reward(value: Any, index: int, prompt: Any) -> float:
    """``value`` as a float; ValueError naming the row when it is not a real finite number."""
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or getattr(value, "ndim", None) == 0:
        value = value.item()  # a one-element torch tensor or a 0-d NumPy array
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{describe_row(index, prompt)}: the reward must be a real number, got {value!r:.60}")
    if not math.isfinite(value):
        raise ValueError(f"{describe_row(index, prompt)}: the reward must be finite, got {float(value)}")
    return float(value)


def _assistant_turns(messages: Sequence) -> int:
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


class RewardFunction:
    """A reward callable (module docstring: four signatures) with every value checked."""

    def __init__(self, fn: Callable, *, name: str | None = None):
        if not callable(fn):
            raise ValueError(f"reward {name or fn!r} is not callable")
        self.fn, self.name, self.batched = fn, name or getattr(fn, "__name__", repr(fn)), bool(getattr(fn, "batched", False))

    def _call(self, args: tuple, first_row: int, prompts: Sequence) -> Any:
        """Call the function; on an exception name the row (a batched call is retried row by row to find it)."""
        try:
            return self.fn(*args)
        except Exception as error:  # the user's code: any exception is a bad row
            bad, index = error, 0
            if self.batched and len(prompts) > 1:
                for k in range(len(prompts)):
                    try:
                        self.fn(*([a[k]] for a in args))
                    except Exception as single:  # this row raises alone
                        bad, index = single, k
                        break
                else:
                    last = first_row + len(prompts) - 1
                    raise ValueError(f"rows {first_row}–{last}: the reward function {self.name} raised "
                                     f"{type(error).__name__}: {error}") from error
            raise ValueError(f"{describe_row(first_row + index, prompts[index])}: the reward function {self.name} "
                             f"raised {type(bad).__name__}: {bad}") from bad

    def _batched_values(self, values: Any, count: int, first_row: int) -> list:
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != count:
            got = len(values) if isinstance(values, Sequence) else type(values).__name__
            raise ValueError(f"rows {first_row}–{first_row + count - 1}: the batched reward function {self.name} "
                             f"must return a list of {count} values, got {got}")
        return list(values)

    def score(self, prompts: Sequence, completions: Sequence[str], *, first_row: int = 0) -> list[float]:
        """One reward per ``(prompt, completion)``; rows are numbered from ``first_row`` in errors."""
        if self.batched:
            values = self._call((list(prompts), list(completions)), first_row, prompts)
            values = self._batched_values(values, len(prompts), first_row)
        else:
            values = [self._call((p, c), first_row + k, [p]) for k, (p, c) in enumerate(zip(prompts, completions))]
        return [check_reward(v, first_row + k, p) for k, (v, p) in enumerate(zip(values, prompts))]

    def score_turns(self, conversations: Sequence[Sequence[dict]], *, first_row: int = 0) -> list[list[float]]:
        """One list of rewards per conversation, one reward per assistant message."""
        if self.batched:
            values = self._call((list(conversations),), first_row, conversations)
            values = self._batched_values(values, len(conversations), first_row)
        else:
            values = [self._call((m,), first_row + k, [m]) for k, m in enumerate(conversations)]
        out = []
        for k, (turns, messages) in enumerate(zip(values, conversations)):
            if isinstance(turns, torch.Tensor):
                turns = turns.tolist()
            expected = _assistant_turns(messages)
            if not isinstance(turns, Sequence) or isinstance(turns, str) or len(turns) != expected:
                raise ValueError(f"{describe_row(first_row + k, messages)}: the reward function {self.name} must "
                                 f"return a list of {expected} reward(s), one per assistant message, got {turns!r:.60}")
            out.append([check_reward(v, first_row + k, messages) for v in turns])
        return out


class RewardModel:
    """``AutoModelForSequenceClassification`` with one label: the reward of ``prompt ⊕ completion`` is its logit.

    The text is the reward model's own chat template applied to ``prompt`` (a string is one user message) and
    an assistant message ``completion``, tokenised without adding special tokens (the template writes them: no
    doubled BOS); without a template, ``prompt + completion`` tokenised with the tokenizer's special tokens
    (a prompt given as messages then needs a template). Batches of ``batch_size`` texts are padded on the
    tokenizer's side; the model pools as its own ``forward`` does (decoder reward models: the last token that
    is not padding). A tokenizer without a pad token pads with EOS.

    source: hub name or local path (or pass ``model`` and ``tokenizer`` already loaded).
    """

    def __init__(self, source: str, *, device: str | torch.device = "auto", dtype: str = "auto",
                 batch_size: int = 16, model=None, tokenizer=None):
        from transformers import AutoModelForSequenceClassification

        from shiq_llm.core.models import check_tokenizer_fits_model, load_tokenizer, resolve_device, resolve_dtype

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name, self.batch_size = str(source), batch_size
        device = resolve_device(device) if isinstance(device, str) else device
        try:
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(source))
            if tokenizer is not None and tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if self.tokenizer.pad_token is None:
                raise ValueError("its tokenizer has neither a pad nor an EOS token")
            if model is None:
                check_reward_model(str(source))
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(source), dtype=resolve_dtype(dtype, device)
                )
            self.model = model.to(device).eval()
            labels = self.model.config.num_labels
            if labels != 1:
                raise ValueError(f"it has {labels} output labels; a reward model has one (the score)")
            check_tokenizer_fits_model(self.tokenizer, self.model)
        except (ValueError, OSError) as error:
            raise ValueError(f"reward model {self.name}: {error}") from error
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # the model finds the padding with it
        self.device = device
        self.use_chat_template = getattr(self.tokenizer, "chat_template", None) is not None
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def text(self, prompt: Any, completion: str, index: int) -> str:
        """The string the reward model reads for one row."""
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            try:
                return self.tokenizer.apply_chat_template(
                    messages + [{"role": "assistant", "content": completion}], tokenize=False
                )
            except Exception as error:  # jinja TemplateError
                raise ValueError(f"{describe_row(index, prompt)}: the reward model's chat template cannot render "
                                 f"it: {error}") from error
        if not isinstance(prompt, str):
            raise ValueError(f"{describe_row(index, prompt)}: a prompt given as messages needs a reward model "
                             f"whose tokenizer has a chat template ({self.name} has none)")
        return prompt + completion

    @torch.no_grad()
    def score(self, prompts: Sequence, completions: Sequence[str], *, first_row: int = 0) -> list[float]:
        """One reward per ``(prompt, completion)``: (B,) logits of the single label, as floats."""
        rewards: list[float] = []
        rows = self.model.get_input_embeddings().weight.shape[0]
        for start in range(0, len(prompts), self.batch_size):
            part = range(start, min(start + self.batch_size, len(prompts)))
            texts = [self.text(prompts[k], completions[k], first_row + k) for k in part]
            batch = self.tokenizer(texts, padding=True, return_tensors="pt",
                                   add_special_tokens=not self.use_chat_template)
            lengths = batch["attention_mask"].sum(dim=-1).tolist()
            for k, length in zip(part, lengths):
                if self.max_positions is not None and length > self.max_positions:
                    raise ValueError(f"{describe_row(first_row + k, prompts[k])}: {length} tokens, more than the "
                                     f"reward model's {self.max_positions} positions")
            if int(batch["input_ids"].max()) >= rows:
                raise ValueError(f"reward model {self.name}: its tokenizer emits id {int(batch['input_ids'].max())}, "
                                 f"outside the model's vocabulary of {rows}: the tokenizer does not fit the model")
            logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits  # (b, 1)
            values = logits[:, 0].float().cpu().tolist()
            rewards += [check_reward(v, first_row + k, prompts[k]) for k, v in zip(part, values)]
        return rewards

    def score_turns(self, conversations: Sequence, *, first_row: int = 0) -> list[list[float]]:
        raise ValueError(f"{describe_row(first_row, conversations[0] if conversations else '')}: multi-turn rows "
                         "(messages) need one reward per assistant turn; give --reward module:function returning a "
                         "list (a reward model scores single-turn {prompt, completion} rows)")


def load_reward_fn(spec: str | None) -> Callable | None:
    """``"synthetic"`` → ``shiq_llm.tasks.synthetic.reward``; ``"module:function"`` or ``"path/file.py:function"``
    → that callable (module docstring for its signatures), found by :func:`shiq_toy.options.load_callable` (the
    resolver of ``shiq-toy verify``: the current folder is on the path); ``None`` / ``"none"`` → no reward."""
    from shiq_toy.options import load_callable

    if spec is None or spec == "none":
        return None
    if spec == "synthetic":
        spec = "shiq_llm.tasks.synthetic:reward"
    if ":" not in str(spec):
        raise ValueError(f"--reward must be 'synthetic', 'none', 'module:function' or 'path/file.py:function', "
                         f"got {spec!r}")
    return load_callable(spec, what="--reward")


def check_reward_model(source: str) -> None:
    """ValueError unless ``source`` (a local folder or hub name) holds a sequence-classification model, read from
    its config alone (no weights): a causal LM is named as such, not as a model with the wrong number of labels."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise ValueError(f"reward model {source}: cannot read its config ({' '.join(str(error).split())[:200]})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"reward model {source}: not a sequence-classification model ({architectures[0]}); a reward "
                         "model is an AutoModelForSequenceClassification with one label")


def load_reward(
    reward: str | None = None, reward_model: str | None = None, *, device: str | torch.device = "auto",
    dtype: str = "auto", batch_size: int = 16,
):
    """The scorer of ``--reward SPEC`` (:func:`load_reward_fn`) or ``--reward-model RM`` (:class:`RewardModel`);
    None when neither gives a reward. ValueError when both are given."""
    if reward_model is not None:
        if reward not in (None, "none"):
            raise ValueError("give either --reward or --reward-model, not both")
        return RewardModel(reward_model, device=device, dtype=dtype, batch_size=batch_size)
    fn = load_reward_fn(reward)
    return None if fn is None else RewardFunction(fn, name=reward)


def as_scorer(reward) -> RewardFunction | RewardModel | None:
    """None, a scorer (anything with ``score``), or a plain callable (wrapped in :class:`RewardFunction`)."""
    if reward is None or hasattr(reward, "score"):
        return reward
    return RewardFunction(reward)
