"""The embedded synthetic task: counting prompts, a programmatic reward, a tiny reference model, offline data.

Everything here runs on a CPU in seconds and needs no download, so that ``shiq-llm demo`` shows learning
end to end (reference → offline data → ShiQ / baselines → reward against KL).

**Prompts.** Three families over a start number ``n ∈ [NUMBER_MIN, NUMBER_MAX]`` (:data:`FAMILIES`)::

    "count up from 7:"     →  " 8 9 10 11"
    "count down from 7:"   →  " 6 5 4 3"
    "repeat 7:"            →  " 7 7 7 7"

A quarter of the 81 prompts is held out for evaluation (:func:`task_prompts`). Completions start with a
space so that a number is the same token wherever it appears (byte-level BPE tokenises ``"8"`` and ``" 8"``
differently; with an unspaced first word a model this small learns the first word of each training prompt
separately and does not carry what fine-tuning teaches it to held-out prompts — measured while designing
the task).

**Reward** (:func:`reward`), in ``[0, 1]``: the number of positions where the completion's i-th word equals
the i-th target word, divided by ``max(len(target), len(words))`` — so a missing word, a wrong word and an
extra word each cost one slot. It is a sequence-level reward: the data puts it on the last token (EOS).

**Reference model.** A tiny Llama (``shiq_llm.core.models.tiny_causal_lm``: hidden 64, 2 layers, 4 heads) and a
byte-level BPE tokenizer trained on the task's text (every number is one token), pre-trained by maximum
likelihood for a few hundred steps on *noisy demonstrations* (:func:`demonstration`): each target word is
replaced, with probability ``noise`` (default 0.3), by a number drawn uniformly from
``[0, NUMBER_MAX + ANSWER_WORDS]``. The reference thus writes well-formed answers (four numbers, then EOS)
whose words are right a bit more than half of the time: plausible but mediocre (mean reward ≈ 0.6; a
perfect fit of the demonstrations would get ≈ 0.71). That is the starting point reward-driven fine-tuning
should improve — unlike a random-weight model, whose gibberish scores 0 everywhere and gives the data no
signal. The fine-tuned policy is rewarded for what the reference already does sometimes, as in RLHF: the
optimum of spec §1, ``π* ∝ π_ref exp(q*/β)``, moves the reference's mass onto its correct words, more so for
small ``β`` (with 0.25 reward per word, a correct word gains the factor ``exp(0.25/β)`` over a wrong one).

**Offline data** (:func:`make_offline_dataset`): ``K`` completions per training prompt sampled from the
reference (temperature 1, seeded), each labelled with its reward: rows ``{prompt, completion, reward}``,
written as JSONL (``shiq_llm.storage.jsonl.write_jsonl``) that ``shiq_llm.data.load_rows`` reads (:func:`make_data` does all).

**Two variants** for the ablation's credit-assignment questions (``shiq-llm experiment ablation --tasks dense
long_horizon``):

* *dense* — the same completions with the reward split over their words (:func:`step_rewards`,
  :func:`dense_rows`): stepwise rows ``{prompt, completions: [" 8", " 9", …], rewards: [0.25, 0, …]}``, one
  reward per word on the word's token, summing to :func:`reward`. Same tokens, same returns, only where the
  reward sits differs: a method that reads each token's own reward (ShiQ's multi-step residual) can tell which
  word was right; one that sees only the sequence's total (ShiQ/tk) cannot.
* *long-horizon* — ``words`` > ``ANSWER_WORDS`` words per answer, asked for in the prompt
  (``"count up from 7 for 32:"`` → ``" 8 9 … 39"``, numbers in :func:`number_range`, negative ones two tokens),
  with the reward on the last token as in the base task: one-step residuals must carry it back ≥ 32 actions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from shiq_llm.storage.jsonl import write_jsonl

__all__ = [
    "FAMILIES",
    "NUMBER_MIN",
    "NUMBER_MAX",
    "ANSWER_WORDS",
    "number_range",
    "target_words",
    "reward",
    "step_rewards",
    "dense_rows",
    "LARGE_NUMBER",
    "proxy_reward",
    "task_prompts",
    "demonstration",
    "demonstration_rows",
    "ReferenceConfig",
    "build_task_tokenizer",
    "pretrain_reference",
    "build_reference",
    "fit_reference",
    "make_offline_dataset",
    "check_answer_budget",
    "make_data",
    "mean_reward",
]

#: Prompt template of each family, and the step between consecutive target words.
FAMILIES: dict[str, tuple[str, int]] = {
    "up": ("count up from {n}:", 1),
    "down": ("count down from {n}:", -1),
    "repeat": ("repeat {n}:", 0),
}
NUMBER_MIN = 4  #: smallest start number (so that counting down by ANSWER_WORDS stays >= 0)
NUMBER_MAX = 30  #: largest start number
ANSWER_WORDS = 4  #: words in a correct completion (of the base task; the long-horizon variant asks for more)
HOLDOUT_MODULUS = 4  #: one prompt in HOLDOUT_MODULUS is held out for evaluation (see task_prompts)

_PROMPT_PATTERNS = [
    (re.compile("^" + re.escape(template[:-1]).replace(r"\{n\}", r"(\d+)") + r"(?: for (\d+))?:$"), step)
    for template, step in FAMILIES.values()
]


def number_range(words: int = ANSWER_WORDS) -> tuple[int, int]:
    """The smallest and largest number a ``words``-word answer can hold (start numbers ± ``words``); the noisy
    demonstrations draw their random words from it too. ``(0, 34)`` for the base task."""
    return NUMBER_MIN - words, NUMBER_MAX + words


def _prompt(template: str, n: int, words: int) -> str:
    text = template.format(n=n)
    return text if words == ANSWER_WORDS else f"{text[:-1]} for {words}:"


def target_words(prompt: str) -> list[str]:
    """The correct completion of a task prompt, as a list of number words: ``ANSWER_WORDS`` of them, or ``K``
    when the prompt ends in ``" for K:"`` (the long-horizon variant).

    ``"count up from 7:"`` → ``["8", "9", "10", "11"]``. ValueError for a prompt that is not a task prompt.
    """
    for pattern, step in _PROMPT_PATTERNS:
        match = pattern.match(prompt.strip())
        if match:
            n, words = int(match.group(1)), int(match.group(2) or ANSWER_WORDS)
            if words < 1:
                break
            return [str(n + step * (i + 1)) for i in range(words)]
    templates = [t for t, _ in FAMILIES.values()]
    raise ValueError(f"not a prompt of the synthetic task: {prompt!r} (expected one of {templates})")


def reward(prompt: str, completion: str) -> float:
    """R(x, y) = #{i : words(y)[i] = target(x)[i]} / max(|target(x)|, |words(y)|) ∈ [0, 1].

    Words are the whitespace-separated pieces of ``completion``. An empty completion gets 0.
    """
    target = target_words(prompt)
    words = completion.split()
    hits = sum(w == t for w, t in zip(words, target))
    return hits / max(len(target), len(words))


def step_rewards(prompt: str, completion: str) -> tuple[list[str], list[float]]:
    """The completion split into its words and :func:`reward` split over them: ``(steps, rewards)``.

    ``steps[i]`` is the i-th word with the whitespace before it (whitespace after the last word joins the last
    step), so ``"".join(steps) == completion``; ``rewards[i] = [word i = target word i] / max(|target|, |words|)``,
    so ``sum(rewards) == reward(prompt, completion)``. ValueError for a completion without a word.
    """
    steps = re.findall(r"\s*\S+", completion)
    if not steps:
        raise ValueError(f"completion {completion!r} has no word to reward")
    steps[-1] += completion[len("".join(steps)):]
    target = target_words(prompt)
    words = [step.strip() for step in steps]
    size = max(len(target), len(words))
    return steps, [float(i < len(target) and w == target[i]) / size for i, w in enumerate(words)]


def dense_rows(rows: Sequence[dict]) -> list[dict]:
    """Single-turn rows ``{prompt, completion, reward}`` of this task as stepwise rows ``{prompt, completions,
    rewards}`` (``shiq_llm.data.rows``) with the reward on every word (:func:`step_rewards`); ValueError naming a
    row whose reward is not the task's reward of its completion."""
    out = []
    for i, row in enumerate(rows):
        steps, rewards = step_rewards(row["prompt"], row["completion"])
        if not math.isclose(sum(rewards), row["reward"], abs_tol=1e-9):
            raise ValueError(f"row {i}: reward {row['reward']!r} is not the task's reward {sum(rewards)!r} of its "
                             "completion; only rows labelled with shiq_llm.tasks.synthetic.reward can be made dense")
        out.append({"prompt": row["prompt"], "completions": steps, "rewards": rewards})
    return out


#: The surface feature the flawed :func:`proxy_reward` pays for: a word that is a number >= this.
LARGE_NUMBER = 20


def proxy_reward(prompt: str, completion: str, *, bonus: float = 1.0) -> float:
    """A flawed reward that also pays for a surface feature, large numbers:

    R̃(x, y) = R(x, y) + bonus · #{i : words(y)[i] is a number ≥ LARGE_NUMBER} / max(|target(x)|, |words(y)|).

    With ``bonus = 1`` a large wrong number earns as much as a correct word, whatever the prompt: a policy can
    raise R̃ by writing large numbers instead of the answer (the reference's noisy words are uniform over
    ``[0, NUMBER_MAX + ANSWER_WORDS]``, so its samples show the feature often enough to be learned from).
    """
    target = target_words(prompt)
    words = completion.split()
    large = sum(w.isdigit() and int(w) >= LARGE_NUMBER for w in words)
    return reward(prompt, completion) + bonus * large / max(len(target), len(words))


def task_prompts(split: str = "train", *, words: int = ANSWER_WORDS) -> list[str]:
    """All prompts of a split, in a fixed order (family-major, then start number).

    ``"eval"``: the held-out prompts, those of family ``f`` (index in ``FAMILIES``) and start number ``n`` with
    ``(n + f) % HOLDOUT_MODULUS == 0`` — a quarter of them, spread so that every number still appears in the
    training prompts of the other families; ``"train"``: the others; ``"all"``: both. ``words``: answer length
    (other than ``ANSWER_WORDS``: the long-horizon prompts ``"count up from 7 for 32:"``).
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    prompts = []
    for f, (template, _) in enumerate(FAMILIES.values()):
        for n in range(NUMBER_MIN, NUMBER_MAX + 1):
            held_out = (n + f) % HOLDOUT_MODULUS == 0
            if split == "all" or held_out == (split == "eval"):
                prompts.append(_prompt(template, n, words))
    return prompts


def demonstration(prompt: str, *, noise: float, generator: torch.Generator) -> str:
    """A noisy demonstration ``" w1 w2 w3 w4"``: each target word replaced, with probability ``noise``, by a
    number drawn uniformly from :func:`number_range` (``[0, NUMBER_MAX + ANSWER_WORDS]`` for the base task; it
    may happen to be the right one). It starts with a space: see the module docstring."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    words = target_words(prompt)
    low, high = number_range(len(words))
    flips = torch.rand(len(words), generator=generator) < noise
    randoms = torch.randint(low, high + 1, (len(words),), generator=generator)
    return " " + " ".join(str(int(r)) if f else w for w, f, r in zip(words, flips.tolist(), randoms))


def demonstration_rows(prompts: Sequence[str], num_rows: int, *, noise: float, seed: int) -> list[dict]:
    """``num_rows`` rows ``{prompt, completion, reward}`` of noisy demonstrations of prompts drawn uniformly."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(prompts), (num_rows,), generator=generator).tolist()
    rows = []
    for i in picks:
        completion = demonstration(prompts[i], noise=noise, generator=generator)
        rows.append({"prompt": prompts[i], "completion": completion, "reward": reward(prompts[i], completion)})
    return rows


@dataclass(frozen=True)
class ReferenceConfig:
    """How the reference model is built (defaults: the ``shiq-llm demo`` reference, 15–25 s on one CPU core)."""

    noise: float = 0.3
    """Probability that a demonstration word is replaced by a random number (the reference's mediocrity)."""
    steps: int = 600
    """Supervised steps (AdamW) on the noisy demonstrations."""
    demonstrations: int = 2048
    """Size of the pool of noisy demonstrations (drawn uniformly over all prompts) that batches are drawn from."""
    batch_size: int = 32
    """Demonstrations per step."""
    lr: float = 3e-3
    """AdamW learning rate (linear decay to 0)."""
    hidden_size: int = 64
    """Width of the tiny Llama."""
    num_layers: int = 2
    """Transformer blocks."""
    vocab_size: int = 384
    """Target vocabulary of the byte-level BPE tokenizer (256 bytes + specials + merges); the long-horizon task
    (words = 32) needs about 410."""
    seed: int = 0
    """Seed of the weights, the demonstrations and the batch order."""
    words: int = ANSWER_WORDS
    """Words per answer: ANSWER_WORDS is the base task, more the long-horizon variant (module docstring)."""


def build_task_tokenizer(*, vocab_size: int = 384, words: int = ANSWER_WORDS):
    """``shiq_llm.core.models.build_tokenizer`` trained on every prompt and correct answer of the task (with
    ``words`` words per answer); ValueError when ``vocab_size`` is too small for every number of
    :func:`number_range` to be one token (a minus sign is a token of its own)."""
    from shiq_llm.core.models import build_tokenizer

    prompts = task_prompts("all", words=words)
    low, high = number_range(words)
    numbers = [str(k) for k in range(low, high + 1)]
    # Every number as a word of its own, with and without a leading space, so that each is a single token.
    corpus = [p + " " + " ".join(target_words(p)) for p in prompts] + [" ".join(numbers)] * 4 + numbers * 4
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    split = [k for k in numbers if len(tokenizer(" " + k, add_special_tokens=False)["input_ids"]) != 1 + k.startswith("-")]
    if split:
        raise ValueError(f"vocab_size {vocab_size} is too small for {words}-word answers: the numbers {split[:3]} … are "
                         "not single tokens; raise vocab_size")
    return tokenizer


def pretrain_reference(
    model, tokenizer, rows: Sequence[dict], *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = False
) -> list[float]:
    """Maximum likelihood on the response tokens of ``rows``: minimise −Σ_t ln π(y_t | s_t) with AdamW.

    ``rows`` are canonical rows of either form (``shiq_llm.data.rows``): in a multi-turn row only the assistant
    tokens are trained on (the response mask has holes at the user / tool turns, which are state).

    Trains ``model`` in place (then sets it to eval mode) and returns the list of per-step mean token NLLs.
    """
    from tqdm.auto import tqdm

    from shiq_llm.core.stats import response_token_stats
    from shiq_llm.data import collate, tokenize_rows

    examples, _ = tokenize_rows(list(rows), tokenizer)
    examples = examples.to_list()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="reference", disable=not progress, leave=False):
        idx = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
        batch = collate([examples[i] for i in idx], pad_token_id=tokenizer.pad_token_id)
        stats = response_token_stats(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        mask = batch["response_mask"]
        nll = (stats.logsumexp - stats.logit_taken)[mask].mean()
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        optimizer.step()
        schedule.step()
        losses.append(nll.item())
    model.eval()
    return losses


def build_reference(
    out_dir: str | Path | None = None, config: ReferenceConfig = ReferenceConfig(), *, progress: bool = False
):
    """Tokenizer + tiny Llama pre-trained on noisy demonstrations (module docstring); returns ``(model, tokenizer)``.

    With ``out_dir``, both are saved there with ``save_pretrained`` so that ``AutoModelForCausalLM`` /
    ``AutoTokenizer.from_pretrained(out_dir)`` (and ``shiq-llm train --model out_dir``) load them.
    """
    tokenizer = build_task_tokenizer(vocab_size=config.vocab_size, words=config.words)
    rows = demonstration_rows(task_prompts("all", words=config.words), config.demonstrations, noise=config.noise,
                              seed=config.seed)
    return fit_reference(tokenizer, rows, config, out_dir, progress=progress), tokenizer


def fit_reference(tokenizer, rows: Sequence[dict], config: ReferenceConfig, out_dir: str | Path | None = None, *,
                  progress: bool = False):
    """A tiny Llama of ``config``'s size pre-trained on the action tokens of ``rows`` (canonical rows, single-
    or multi-turn: :func:`pretrain_reference`); returns the model (eval mode). ``config.noise`` and
    ``config.demonstrations`` are not read here (the caller made ``rows``; ``config.vocab_size`` and
    ``config.words`` its tokenizer).

    With ``out_dir``, the model and ``tokenizer`` are saved there with ``save_pretrained``.
    """
    from shiq_llm.core.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, seed=config.seed)
    pretrain_reference(
        model, tokenizer, rows, steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        progress=progress,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model


def make_offline_dataset(
    model,
    tokenizer,
    prompts: Sequence[str] | None = None,
    *,
    completions_per_prompt: int = 16,
    max_new_tokens: int = 12,
    seed: int = 0,
    batch_size: int = 256,
    words: int = ANSWER_WORDS,
) -> list[dict]:
    """K = ``completions_per_prompt`` completions per prompt sampled from ``model`` (temperature 1, seeded),
    labelled with :func:`reward`: a list of rows ``{prompt, completion, reward}``, prompt-major order.

    ``prompts`` defaults to ``task_prompts("train", words=words)``. Samples that are empty once decoded (EOS first) cannot
    be a row (``shiq_llm.data.rows`` refuses empty completions) and are left out.
    """
    from shiq_llm.generation.evaluate import generate

    prompts = task_prompts("train", words=words) if prompts is None else list(prompts)
    samples = generate(
        model, tokenizer, prompts, num_samples=completions_per_prompt, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size,
    )
    rows = []
    for i, completion in zip(samples.prompt_index.tolist(), samples.completions):
        if completion.strip():
            rows.append({"prompt": prompts[i], "completion": completion, "reward": reward(prompts[i], completion)})
    return rows


def check_answer_budget(words: int, max_new_tokens: int) -> None:
    """ValueError when a generation budget of ``max_new_tokens`` cannot hold a correct ``words``-word answer and its
    EOS (at least ``words + 1`` tokens)."""
    if max_new_tokens <= words:
        raise ValueError(f"max_new_tokens {max_new_tokens} cannot hold a {words}-word answer and its EOS: give at "
                         f"least {words + 1}")


def make_data(
    out_dir: str | Path,
    *,
    reference: ReferenceConfig = ReferenceConfig(),
    completions_per_prompt: int = 16,
    max_new_tokens: int = 12,
    seed: int = 0,
    progress: bool = False,
    dense: bool = False,
) -> dict[str, Path]:
    """Build the reference and the offline dataset in ``out_dir``: ``reference/`` (model + tokenizer),
    ``train.jsonl`` (offline rows on the training prompts) and ``eval_prompts.jsonl`` (``{"prompt"}`` rows
    of the held-out prompts; answers of ``reference.words`` words; with ``dense``, the training rows as stepwise
    rows with the reward on every word, :func:`dense_rows`). Returns the paths by name. ValueError when
    ``max_new_tokens`` cannot hold a correct answer (``reference.words`` numbers and EOS)."""
    check_answer_budget(reference.words, max_new_tokens)
    out_dir = Path(out_dir)
    model, tokenizer = build_reference(out_dir / "reference", reference, progress=progress)
    rows = make_offline_dataset(model, tokenizer, completions_per_prompt=completions_per_prompt,
                                max_new_tokens=max_new_tokens, seed=seed, words=reference.words)
    eval_prompts = ({"prompt": p} for p in task_prompts("eval", words=reference.words))
    paths = {
        "reference": out_dir / "reference",
        "train": write_jsonl(dense_rows(rows) if dense else rows, out_dir / "train.jsonl"),
        "eval_prompts": write_jsonl(eval_prompts, out_dir / "eval_prompts.jsonl"),
    }
    return paths


def mean_reward(rows: Sequence[dict]) -> float:
    """Mean ``reward`` of rows (NaN for no row)."""
    return sum(r["reward"] for r in rows) / len(rows) if rows else math.nan
