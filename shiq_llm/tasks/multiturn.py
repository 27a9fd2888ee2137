"""The embedded multi-turn task: a calculator dialogue with one reward per agent turn (tool-call style).

Everything runs on a CPU in seconds with no download, like ``shiq_llm.tasks.synthetic``, but the episode is a
dialogue in which an environment answers between the agent's turns, so that later turns depend on earlier
ones and rewards arrive turn by turn (spec §1: environment tokens are state, each turn's reward sits on its
last token).

**Task.** The user asks for a chain of ``TURNS`` operations on a start number (:class:`Task`); the agent
performs one per turn by calling a calculator tool, and the tool answers with the result, which the next call
must use::

    user:       compute 7 +3 *2 -1
    assistant:  calc(7+3)          tool: 10
    assistant:  calc(10*2)         tool: 20
    assistant:  calc(20-1)                      (the episode ends after the last agent turn)

Operations are ``+k`` and ``-k`` (k ∈ 1..9) and ``*k`` (k ∈ 2..3); every intermediate value of a task lies
in ``[0, NUMBER_MAX]``. The environment (:func:`tool_answer`) evaluates whatever call the agent wrote
(``"error"`` for text that is not a call), so a wrong call propagates: the next turn sees a wrong number.

**Reward** (:func:`turn_rewards`), per agent turn: 1 for exactly the right call (``calc(v+k)`` with ``v`` the
current value and ``+k`` the turn's operation), ``PARTIAL_CREDIT`` for a well-formed call with a wrong operand
or operator, 0 for anything else, and 0 for every turn after the first turn that was not exactly right (the
episode is broken: the user's result is lost whatever comes next). The episode reward is the sum, in
``[0, TURNS]``; an episode *succeeds* when every turn earns 1. So an early mistake costs every later reward:
the credit of a late reward belongs to the early turns too.

**Reference.** A tiny Llama pre-trained (``shiq_llm.tasks.synthetic.fit_reference``: maximum likelihood on the
agent tokens only) on *noisy demonstrations* (:func:`demonstration`): in each turn, with probability
``noise``, one field of the right call (left operand, operator or right operand, chosen uniformly) is replaced
by a random value; the tool answers the call as written and later turns continue from its answer. It writes
well-formed calls, right in at most about ``1 − noise`` of the turns (measured with :data:`REFERENCE`: 65–72 %
of first turns, over three seeds), so per-turn success falls with the turn index (a turn succeeds only if every
earlier one did: 0.65 / 0.37 / 0.17 on held-out prompts) and the mean episode reward sits well between 0 and
``TURNS`` (1.37 of 3).

**Offline data** (:func:`make_offline_dataset`): dialogues sampled from the reference with the environment in
the loop (:func:`sample_dialogues`), as multi-turn rows ``{"messages": [...], "rewards": [r1, r2, r3]}`` (roles
user / assistant / tool) that ``shiq_llm.data.load_rows`` / ``tokenize_rows`` read and every trainer consumes.
:func:`make_multiturn_data` writes the reference, ``train.jsonl`` and ``eval_prompts.jsonl``;
:func:`evaluate_dialogues` reports a policy's per-turn rewards and ``KL(π ‖ π_ref)`` on its own dialogues.

Notation used for tensor shapes: ``B`` dialogues, ``L`` tokens, ``K`` agent turns.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from shiq_llm.storage.jsonl import write_jsonl
from shiq_llm.tasks.synthetic import ReferenceConfig, fit_reference

__all__ = [
    "OPERATIONS",
    "START_MAX",
    "NUMBER_MAX",
    "TURNS",
    "PARTIAL_CREDIT",
    "Task",
    "parse_task",
    "parse_call",
    "tool_answer",
    "turn_rewards",
    "random_task",
    "prompt_split",
    "task_prompts",
    "demonstration",
    "demonstration_rows",
    "build_task_tokenizer",
    "REFERENCE",
    "build_reference",
    "Dialogue",
    "sample_dialogues",
    "make_offline_dataset",
    "make_multiturn_data",
    "evaluate_dialogues",
]

#: Operator → (operand range, function). The operand is the right-hand side of the call.
OPERATIONS: dict[str, tuple[range, Callable[[int, int], int]]] = {
    "+": (range(1, 10), lambda a, b: a + b),
    "-": (range(1, 10), lambda a, b: a - b),
    "*": (range(2, 4), lambda a, b: a * b),
}
START_MAX = 20  #: start numbers are drawn from 1..START_MAX
NUMBER_MAX = 60  #: every intermediate value of a task lies in [0, NUMBER_MAX]
TURNS = 3  #: operations (agent turns) per task
PARTIAL_CREDIT = 0.25  #: reward of a well-formed but wrong call
HOLDOUT_MODULUS = 4  #: a task is held out for evaluation when crc32(prompt) % HOLDOUT_MODULUS == 0

_TASK = re.compile(r"^compute (\d+)((?: [+*-]\d+)+)$")
_STEP = re.compile(r" ([+*-])(\d+)")
_CALL = re.compile(r"^calc\((-?\d+)([+*-])(\d+)\)$")


@dataclass(frozen=True)
class Task:
    """A start number and the operations of the agent's turns, e.g. ``Task(7, (("+", 3), ("*", 2), ("-", 1)))``."""

    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def prompt(self) -> str:
        """The user's message: ``"compute 7 +3 *2 -1"``."""
        return f"compute {self.start} " + " ".join(f"{op}{k}" for op, k in self.steps)

    @property
    def values(self) -> list[int]:
        """The running values ``[v_0 = start, v_1, …, v_K]``; turn k's right call is ``calc(v_{k−1} op_k k_k)``."""
        values = [self.start]
        for op, k in self.steps:
            values.append(OPERATIONS[op][1](values[-1], k))
        return values

    def call(self, turn: int) -> str:
        """The right call of turn ``turn`` (0-based) in an unbroken episode: ``"calc(7+3)"``."""
        op, k = self.steps[turn]
        return f"calc({self.values[turn]}{op}{k})"


def parse_task(prompt: str) -> Task:
    """The :class:`Task` of a user message ``"compute 7 +3 *2 -1"``; ValueError for any other text."""
    match = _TASK.match(prompt.strip()) if isinstance(prompt, str) else None
    if not match:
        raise ValueError(f"not a prompt of the multi-turn task: {prompt!r} (expected e.g. 'compute 7 +3 *2 -1')")
    steps = tuple((op, int(k)) for op, k in _STEP.findall(match.group(2)))
    return Task(int(match.group(1)), steps)


def parse_call(text: str) -> tuple[int, str, int] | None:
    """``"calc(7+3)"`` → ``(7, "+", 3)``; None when the text (stripped) is not exactly one call."""
    match = _CALL.match(text.strip())
    return (int(match.group(1)), match.group(2), int(match.group(3))) if match else None


def tool_answer(call: str) -> str:
    """The environment's answer to an agent turn: the call's result (``"10"``), or ``"error"`` if it is not a call."""
    parsed = parse_call(call)
    if parsed is None:
        return "error"
    a, op, b = parsed
    return str(OPERATIONS[op][1](a, b))


def turn_rewards(prompt: str | Task, calls: Sequence[str]) -> list[float]:
    """The programmatic checker: one reward per agent turn (module docstring).

    r_k = 0 if an earlier turn was not exactly right; else 1 for the right call, ``PARTIAL_CREDIT`` for a
    well-formed wrong call, 0 otherwise. ``calls`` are the agent's turns in order, one per operation.
    """
    task = prompt if isinstance(prompt, Task) else parse_task(prompt)
    if len(calls) != len(task.steps):
        raise ValueError(f"{len(calls)} agent turn(s) for a task of {len(task.steps)} operation(s): {task.prompt!r}")
    rewards, broken = [], False
    for turn, call in enumerate(calls):
        if broken:
            rewards.append(0.0)
        elif call.strip() == task.call(turn):
            rewards.append(1.0)
        else:
            rewards.append(PARTIAL_CREDIT if parse_call(call) is not None else 0.0)
            broken = True
    return rewards


# --------------------------------------------------------------------------------------------------
# Prompts and demonstrations
# --------------------------------------------------------------------------------------------------


def random_task(generator: torch.Generator, *, turns: int = TURNS) -> Task:
    """A task drawn uniformly step by step: start in 1..START_MAX, then each operation uniform over the
    operators and its operand range, redrawn while the running value would leave [0, NUMBER_MAX]."""
    value = int(torch.randint(1, START_MAX + 1, (), generator=generator))
    start, steps, ops = value, [], list(OPERATIONS)
    while len(steps) < turns:
        op = ops[int(torch.randint(len(ops), (), generator=generator))]
        operands, fn = OPERATIONS[op]
        k = operands[int(torch.randint(len(operands), (), generator=generator))]
        if 0 <= fn(value, k) <= NUMBER_MAX:
            steps.append((op, k))
            value = fn(value, k)
    return Task(start, tuple(steps))


def prompt_split(prompt: str) -> str:
    """``"eval"`` for a held-out prompt (``crc32(prompt) % HOLDOUT_MODULUS == 0``, a quarter of them), else ``"train"``."""
    return "eval" if zlib.crc32(prompt.encode()) % HOLDOUT_MODULUS == 0 else "train"


def task_prompts(split: str = "train", count: int | None = None, *, turns: int = TURNS, seed: int = 0) -> list[str]:
    """``count`` distinct prompts of a split, in a fixed order (random tasks drawn with ``seed``).

    A prompt is held out (``"eval"``) when ``crc32(prompt) % HOLDOUT_MODULUS == 0`` (a quarter of all tasks),
    else it is a ``"train"`` prompt: the splits never share a prompt. Default ``count``: 256 train, 64 eval.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    count = (256 if split == "train" else 64) if count is None else count
    generator = torch.Generator().manual_seed(seed)
    prompts: dict[str, None] = {}
    for _ in range(100 * count):
        prompt = random_task(generator, turns=turns).prompt
        if prompt_split(prompt) == split:
            prompts.setdefault(prompt)
            if len(prompts) == count:
                return list(prompts)
    raise ValueError(f"could not draw {count} distinct {split} prompts of {turns} turn(s)")


def demonstration(task: Task, *, noise: float, generator: torch.Generator) -> list[dict[str, str]]:
    """A noisy demonstration dialogue ``[user, assistant, tool, assistant, …, assistant]``.

    In each turn the agent calls ``calc(v op k)`` on the tool's last answer ``v`` (the start number in turn 1);
    with probability ``noise`` one of the three fields, chosen uniformly, is replaced by a uniform random value
    (left operand in 0..NUMBER_MAX, an operator, or an operand in 1..9; it may happen to be the right one).
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    messages = [{"role": "user", "content": task.prompt}]
    value, ops = task.start, list(OPERATIONS)
    for turn, (op, k) in enumerate(task.steps):
        fields: list = [value, op, k]
        if float(torch.rand((), generator=generator)) < noise:
            which = int(torch.randint(3, (), generator=generator))
            fields[which] = (
                int(torch.randint(0, NUMBER_MAX + 1, (), generator=generator)) if which == 0
                else ops[int(torch.randint(len(ops), (), generator=generator))] if which == 1
                else int(torch.randint(1, 10, (), generator=generator))
            )
        call = f"calc({fields[0]}{fields[1]}{fields[2]})"
        messages.append({"role": "assistant", "content": call})
        answer = tool_answer(call)
        if turn + 1 < len(task.steps):
            messages.append({"role": "tool", "content": answer})
        value = int(answer)
    return messages


def demonstration_rows(num_rows: int, *, noise: float, seed: int, turns: int = TURNS) -> list[dict]:
    """``num_rows`` multi-turn rows ``{messages, rewards}`` of noisy demonstrations of random training tasks
    (fresh draws, not only the ``task_prompts("train")`` list; held-out tasks are never demonstrated)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < num_rows:
        task = random_task(generator, turns=turns)
        if prompt_split(task.prompt) == "train":
            messages = demonstration(task, noise=noise, generator=generator)
            calls = [m["content"] for m in messages if m["role"] == "assistant"]
            rows.append({"messages": messages, "rewards": turn_rewards(task, calls)})
    return rows


# --------------------------------------------------------------------------------------------------
# Tokenizer and reference
# --------------------------------------------------------------------------------------------------


def build_task_tokenizer(*, vocab_size: int = 512):
    """``shiq_llm.core.models.build_tokenizer`` trained on demonstration dialogues of the task, so that every
    number in 0..99 (with and without a leading space) and the words ``compute``, ``calc``, ``error`` are
    single tokens."""
    from shiq_llm.core.models import build_tokenizer

    rows = demonstration_rows(512, noise=0.2, seed=12345)
    corpus = [" ".join(m["content"] for m in row["messages"]) for row in rows]
    numbers = [str(k) for k in range(100)]
    corpus += [" ".join(numbers)] * 8 + ["".join(f"calc({k}+{k})" for k in numbers)] * 4 + ["error"] * 64
    return build_tokenizer(corpus, vocab_size=vocab_size)


#: The reference of ``make_multiturn_data``: about 25 s of one CPU core (400 steps on 1,024 demonstrations).
#: Fewer steps give a much weaker model (300 steps: mean episode reward ≈ 0.7 of 3 instead of ≈ 1.5, measured):
#: learning to copy the tool's answer into the next call takes a few hundred steps.
REFERENCE = ReferenceConfig(noise=0.25, steps=400, demonstrations=1024, vocab_size=512)


def build_reference(
    out_dir: str | Path | None = None, config: ReferenceConfig = REFERENCE, *, turns: int = TURNS, progress: bool = False
):
    """Task tokenizer + tiny Llama pre-trained on ``config.demonstrations`` noisy demonstration dialogues
    (``config.noise``); returns ``(model, tokenizer)``, both saved to ``out_dir`` when given."""
    tokenizer = build_task_tokenizer(vocab_size=config.vocab_size)
    rows = demonstration_rows(config.demonstrations, noise=config.noise, seed=config.seed, turns=turns)
    return fit_reference(tokenizer, rows, config, out_dir, progress=progress), tokenizer


# --------------------------------------------------------------------------------------------------
# Dialogues with the environment in the loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Dialogue:
    """One sampled episode: the conversation, the checker's reward of each agent turn, and for each agent
    turn whether it ended with EOS (False: cut at ``max_new_tokens``)."""

    prompt_index: int
    messages: list[dict[str, str]]
    rewards: list[float]
    finished: list[bool]

    def row(self) -> dict:
        """The library's multi-turn row ``{"messages", "rewards"}`` (``shiq_llm.data.rows``)."""
        return {"messages": self.messages, "rewards": self.rewards}


def _turn_seeds(seed: int, turns: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**31 - 1, (turns,), generator=generator).tolist()


def sample_dialogues(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 12,
    seed: int = 0,
    batch_size: int = 256,
) -> list[Dialogue]:
    """``num_samples`` dialogues per prompt, prompt-major: the environment loop.

    For each agent turn, every dialogue whose task has that turn is rendered with the chat template up to the
    generation prompt and the model samples one turn (``shiq_llm.generation.evaluate.generate``: temperature 1, until EOS
    or ``max_new_tokens``); the tool's answer to the decoded call (:func:`tool_answer`) is appended before the
    next turn. The state is the *text* of the dialogue, as in a chat server: each turn's context is the
    canonical tokenisation of the history, exactly the tokens ``shiq_llm.data.tokenize_rows`` gives the row
    (a turn the model spelt with other tokens is re-tokenised: measured on 768 turns, 2 % of the default
    reference's — wrong calls with a number spelt digit by digit or a stray byte — and none of a ShiQ-trained
    policy's; the KL of :func:`evaluate_dialogues` is computed on the re-tokenised turns).
    Deterministic given ``seed`` (turn k samples with a seed drawn from it; the caller's RNG state is untouched).
    """
    from shiq_llm.generation.evaluate import generate

    tasks = [parse_task(p) for p in prompts]
    order = [i for i in range(len(tasks)) for _ in range(num_samples)]
    histories = [[{"role": "user", "content": tasks[i].prompt}] for i in order]
    finished: list[list[bool]] = [[] for _ in order]
    horizon = max((len(t.steps) for t in tasks), default=0)
    for turn, turn_seed in enumerate(_turn_seeds(seed, horizon)):
        active = [b for b, i in enumerate(order) if len(tasks[i].steps) > turn]
        samples = generate(model, tokenizer, [histories[b] for b in active], num_samples=1,
                           max_new_tokens=max_new_tokens, seed=turn_seed, batch_size=batch_size)
        for b, call, done in zip(active, samples.completions, samples.finished.tolist()):
            histories[b].append({"role": "assistant", "content": call})
            finished[b].append(done)
            if turn + 1 < len(tasks[order[b]].steps):
                histories[b].append({"role": "tool", "content": tool_answer(call)})
    dialogues = []
    for b, i in enumerate(order):
        calls = [m["content"] for m in histories[b] if m["role"] == "assistant"]
        dialogues.append(Dialogue(i, histories[b], turn_rewards(tasks[i], calls), finished[b]))
    return dialogues


def make_offline_dataset(
    model,
    tokenizer,
    prompts: Sequence[str] | None = None,
    *,
    samples_per_prompt: int = 8,
    max_new_tokens: int = 12,
    seed: int = 0,
    batch_size: int = 256,
) -> list[dict]:
    """The offline data: ``samples_per_prompt`` dialogues per prompt sampled from ``model`` with the
    environment in the loop, as multi-turn rows ``{messages, rewards}`` (prompt-major). ``prompts`` defaults to
    ``task_prompts("train")``. A dialogue with an empty agent turn (EOS first) cannot be a row
    (``shiq_llm.data.rows`` refuses empty assistant messages) and is left out."""
    prompts = task_prompts("train") if prompts is None else list(prompts)
    dialogues = sample_dialogues(model, tokenizer, prompts, num_samples=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    return [d.row() for d in dialogues if all(m["content"].strip() for m in d.messages if m["role"] == "assistant")]


def make_multiturn_data(
    out_dir: str | Path,
    *,
    reference: ReferenceConfig = REFERENCE,
    samples_per_prompt: int = 8,
    train_prompts: int = 256,
    eval_prompts: int = 64,
    max_new_tokens: int = 12,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Path]:
    """Build the task's reference and offline data in ``out_dir``: ``reference/`` (model + tokenizer),
    ``train.jsonl`` (the reference's dialogues on ``train_prompts`` training prompts, ``samples_per_prompt``
    each, with per-turn rewards) and ``eval_prompts.jsonl`` (``{"prompt"}`` rows of ``eval_prompts`` held-out
    prompts). Returns the paths by name. Deterministic given ``seed`` and ``reference.seed``."""
    out_dir = Path(out_dir)
    model, tokenizer = build_reference(out_dir / "reference", reference, progress=progress)
    rows = make_offline_dataset(model, tokenizer, task_prompts("train", train_prompts),
                                samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, seed=seed)
    return {
        "reference": out_dir / "reference",
        "train": write_jsonl(rows, out_dir / "train.jsonl"),
        "eval_prompts": write_jsonl(({"prompt": p} for p in task_prompts("eval", eval_prompts)),
                                    out_dir / "eval_prompts.jsonl"),
    }


# --------------------------------------------------------------------------------------------------
# Evaluation: per-turn rewards and KL(π ‖ π_ref) on the policy's own dialogues
# --------------------------------------------------------------------------------------------------


def evaluate_dialogues(
    policy,
    ref,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 4,
    max_new_tokens: int = 12,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Sample ``num_samples`` dialogues per prompt from ``policy`` (environment in the loop) and report, as
    plain floats:

    ``mean_reward`` (mean episode reward Σ_k r_k, in ``[0, max_reward]``), ``reward_sem``, ``max_reward``
    (turns per task), ``success`` (fraction of episodes with every turn right), ``reward_turn{k}`` and
    ``success_turn{k}`` (mean reward of agent turn k = 1…K, and the fraction where it is exactly right),
    ``kl`` (mean exact Σ_t KL(π ‖ π_ref) over the agent tokens), ``kl_sem``, ``kl_mc`` (Monte Carlo Σ_t ρ_t),
    ``kl_turn{k}``, ``finished`` (fraction of agent turns ending with EOS), ``num_samples``.
    Every prompt must have the same number of turns.
    """
    from shiq_llm.generation.evaluate import conversation_kl, standard_error

    turns = {len(parse_task(p).steps) for p in prompts}
    if len(turns) != 1:
        raise ValueError(f"the prompts must be a non-empty list of tasks with one number of turns, got {sorted(turns)}")
    dialogues = sample_dialogues(policy, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 seed=seed, batch_size=batch_size)
    rewards = torch.tensor([d.rewards for d in dialogues], dtype=torch.float64)  # (B, K)
    kl = conversation_kl(policy, ref, tokenizer, [d.row() for d in dialogues], batch_size=batch_size)
    episode = rewards.sum(dim=-1)  # (B,)
    report = {
        "mean_reward": float(episode.mean()),
        "reward_sem": standard_error(episode),
        "max_reward": float(rewards.shape[1]),
        "success": float((rewards == 1).all(dim=-1).double().mean()),
    }
    for k in range(rewards.shape[1]):
        report[f"reward_turn{k + 1}"] = float(rewards[:, k].mean())
        report[f"success_turn{k + 1}"] = float((rewards[:, k] == 1).double().mean())
    report.update(kl=float(kl.exact.mean()), kl_sem=standard_error(kl.exact), kl_mc=float(kl.mc.mean()))
    for k in range(rewards.shape[1]):
        report[f"kl_turn{k + 1}"] = float(kl.per_turn[:, k].mean())
    report["finished"] = sum(sum(d.finished) for d in dialogues) / sum(len(d.finished) for d in dialogues)
    report["num_samples"] = len(dialogues)
    return report
