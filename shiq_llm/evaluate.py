"""Evaluation of a policy: sampled completions, their mean reward, and KL(π ‖ π_ref) on the policy's samples.

Spec §5 (LLM scale) plots the generative mean reward ``E_{x, y∼π}[R(x, y)]`` against
``KL(π ‖ π_ref) = E_x E_{y∼π(·|x)}[ln π(y|x) − ln π_ref(y|x)]``. Both are estimated on completions the
policy samples itself (temperature 1, no top-k / top-p: exactly π). The KL has two estimators, per sequence::

    exact (chain rule):  KL(y) = Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)) = Σ_t Σ_a π(a|s_t) ln π(a|s_t)/π_ref(a|s_t)
    Monte Carlo:          ρ(y)  = Σ_t ρ_t = Σ_t ln π(y_t|s_t) − ln π_ref(y_t|s_t)

over the response positions ``t`` (generated tokens up to and including the first EOS). Both have expectation
``KL(π ‖ π_ref)`` under ``y ∼ π``; the exact one replaces each token's log-ratio by its expectation given the
prefix (Rao–Blackwell: never negative, usually much lower variance), the Monte-Carlo one is what needs only
the sampled tokens' log-probabilities. The exact one reads both models' full next-token distributions: each
forward returns ``(B, L, V)`` logits (fine at the embedded task's V ≈ 350; for a 128k vocabulary lower
``batch_size``, or a chunked version in the manner of ``shiq_llm.stats`` would be needed).

**Conversations** (:func:`conversation_kl`): for multi-turn rows the same two sums run over the agent's tokens
only — the response mask has holes at the user / tool turns, which are state — and are also split by turn.

Notation used for tensor shapes: ``B`` sequences, ``L`` positions (prompt + generated), ``V`` vocabulary,
``K`` agent turns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from shiq_llm.models import position_ids_from_mask
from shiq_llm.stats import _scatter

__all__ = [
    "Samples",
    "encode_prompts",
    "generate",
    "response_mask_from_generated",
    "token_kl",
    "sequence_kl",
    "evaluate_policy",
    "standard_error",
    "turn_index",
    "ConversationKL",
    "conversation_kl",
]


@dataclass
class Samples:
    """Completions sampled from a model, as text and as padded token tensors.

    prompt_index: (B,) int64 index of each sample's prompt in the prompt list (prompt-major order).
    input_ids: (B, L) left-padded prompt followed by the generated tokens (``pad_token_id`` after EOS).
    attention_mask: (B, L) int64, 1 on prompt tokens and response tokens.
    response_mask: (B, L) bool, True on generated tokens up to and including the first EOS.
    completions: B strings, the decoded response without special tokens.
    finished: (B,) bool, True when the sample ended with EOS (False: cut at ``max_new_tokens``).
    """

    prompt_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    completions: list[str]
    finished: torch.Tensor


def encode_prompts(tokenizer, prompts: Sequence, *, use_chat_template: bool | None = None) -> list[list[int]]:
    """Token ids of the state before the first response token, for each prompt — exactly the prompt tokens
    ``shiq_llm.data.tokenize_rows`` produces for a row with that prompt (chat template and generation prompt,
    or ``[BOS] + tokens(prompt)`` without a template), so generation continues where training data starts.

    prompts: strings, or lists of ``{"role", "content"}`` messages.
    """
    from shiq_llm.tokenization import encode_conversation

    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    encoded = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        # A placeholder answer: the tokens before it do not depend on it (segments are tokenised apart).
        example = encode_conversation(
            messages + [{"role": "assistant", "content": "x"}],
            [0.0],
            len(messages),
            tokenizer,
            use_chat_template=use_chat_template,
            where=f"prompt {i}",
        )
        encoded.append(example.input_ids[: example.response_mask.index(True)])
    return encoded


def response_mask_from_generated(generated: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) generated ids → (B, T) bool, True up to and including each row's first EOS (all True without one)."""
    is_eos = generated == eos_token_id  # (B, T)
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS strictly before t
    return eos_before == 0


def _left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.int64)  # (B, P)
    mask = torch.zeros(len(sequences), length, dtype=torch.int64)
    for b, s in enumerate(sequences):
        ids[b, length - len(s) :] = torch.as_tensor(s, dtype=torch.int64)
        mask[b, length - len(s) :] = 1
    return ids, mask


def _pure_sampling_config(tokenizer, max_new_tokens: int):
    """Temperature-1 ancestral sampling with every logits processor off: samples are exactly from π."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
) -> Samples:
    """Sample ``num_samples`` completions of each prompt from ``model`` (temperature 1, no truncation of the
    distribution), in batches of ``batch_size`` left-padded prompts.

    Deterministic given ``seed`` (and ``batch_size``): batch k samples under ``torch.manual_seed(seed + k)``
    inside ``torch.random.fork_rng``, so the caller's RNG state is untouched. Returns :class:`Samples`.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            "num_samples, max_new_tokens and batch_size must be >= 1, "
            f"got {num_samples}, {max_new_tokens}, {batch_size}"
        )
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs an EOS token and a pad token to generate (set tokenizer.pad_token)")
    encoded = encode_prompts(tokenizer, prompts)
    order = [i for i in range(len(encoded)) for _ in range(num_samples)]
    config = _pure_sampling_config(tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (prompt ids, generated ids) per sample, unpadded prompt
    for k, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start : start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in chunk], tokenizer.pad_token_id)  # (b, P)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + k)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        generated = out[:, ids.shape[1] :].cpu()  # (b, T_k)
        for b, i in enumerate(chunk):
            rows.append((torch.as_tensor(encoded[i], dtype=torch.int64), generated[b]))
    model.train(was_training)
    return _assemble(rows, order, tokenizer)


def _assemble(rows, order, tokenizer) -> Samples:
    """Left-pad the prompts, right-pad the responses (cut after the first EOS) into one batch."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = []
    finished = []
    for _, gen in rows:
        keep = response_mask_from_generated(gen[None], eos)[0]  # (T,)
        responses.append(gen[keep])
        finished.append(bool((gen[keep] == eos).any()))
    prompt_len = max(len(p) for p, _ in rows)
    response_len = max(len(r) for r in responses)
    n = len(rows)
    input_ids = torch.full((n, prompt_len + response_len), pad, dtype=torch.int64)  # (B, L)
    attention_mask = torch.zeros(n, prompt_len + response_len, dtype=torch.int64)
    response_mask = torch.zeros(n, prompt_len + response_len, dtype=torch.bool)
    for b, ((prompt, _), response) in enumerate(zip(rows, responses)):
        input_ids[b, prompt_len - len(prompt) : prompt_len] = prompt
        input_ids[b, prompt_len : prompt_len + len(response)] = response
        attention_mask[b, prompt_len - len(prompt) : prompt_len + len(response)] = 1
        response_mask[b, prompt_len : prompt_len + len(response)] = True
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Samples(
        prompt_index=torch.as_tensor(order, dtype=torch.int64),
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        completions=completions,
        finished=torch.as_tensor(finished, dtype=torch.bool),
    )


def _response_log_probs(model, input_ids, attention_mask, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) log π(·|s_p) at the N response positions (row-major; float32, or float64 for a float64 model),
    and (N,) ids of the tokens taken."""
    position_ids = position_ids_from_mask(attention_mask)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits  # (B, L, V)
    states = logits[:, :-1][response_mask[:, 1:]]  # (N, V): logits emitted just before each response token
    states = states.to(torch.promote_types(states.dtype, torch.float32))
    return torch.log_softmax(states, dim=-1), input_ids[response_mask]


@torch.no_grad()
def token_kl(
    policy, ref, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL terms on response positions, (B, L) each (float32, float64 for float64 models), 0 where
    ``response_mask`` is False:

    exact: KL(π(·|s_p) ‖ π_ref(·|s_p)) = Σ_a π(a|s_p) (ln π(a|s_p) − ln π_ref(a|s_p))
    log_ratio: ρ_p = ln π(y_p|s_p) − ln π_ref(y_p|s_p)

    where ``s_p`` is the prefix before position p. Both models must share the vocabulary (same tokenizer).
    """
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask is True at position 0: the first token has no state before it")
    logp, taken = _response_log_probs(policy, input_ids, attention_mask, response_mask)  # (N, V), (N,)
    logq, _ = _response_log_probs(ref, input_ids, attention_mask, response_mask)
    if logp.shape != logq.shape:
        raise ValueError(f"policy and reference vocabularies differ: {logp.shape[-1]} vs {logq.shape[-1]} logits")
    exact = F.kl_div(logq, logp, reduction="none", log_target=True).sum(dim=-1)  # (N,) Σ_a p (ln p − ln q)
    rho = (logp - logq).gather(-1, taken[:, None])[:, 0]  # (N,)
    return _scatter(exact, response_mask), _scatter(rho, response_mask)


@torch.no_grad()
def sequence_kl(policy, ref, samples: Samples, *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) per-sequence ``Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t))`` (exact) and ``Σ_t ρ_t`` (Monte Carlo), float64."""
    device = next(policy.parameters()).device
    exact, rho = [], []
    for start in range(0, len(samples.completions), batch_size):
        part = slice(start, start + batch_size)
        mask = samples.response_mask[part]
        keep = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1  # drop all-padding columns
        e, r = token_kl(
            policy,
            ref,
            samples.input_ids[part, :keep].to(device),
            samples.attention_mask[part, :keep].to(device),
            mask[:, :keep].to(device),
        )
        exact.append(e.double().sum(dim=-1).cpu())
        rho.append(r.double().sum(dim=-1).cpu())
    return torch.cat(exact), torch.cat(rho)


def evaluate_policy(
    policy,
    ref,
    tokenizer,
    prompts: Sequence,
    *,
    reward_fn: Callable[[object, str], float] | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Sample ``num_samples`` completions per prompt from ``policy`` and report (plain floats):

    ``mean_reward`` (mean of ``reward_fn(prompt, completion)``; NaN without ``reward_fn``) and
    ``reward_sem`` (its standard error over samples), ``kl`` (mean exact per-sequence KL to ``ref``),
    ``kl_sem``, ``kl_mc`` (mean Monte-Carlo Σ_t ρ_t), ``mean_length`` (response tokens, EOS included),
    ``finished`` (fraction ending with EOS), ``num_samples`` (total samples).
    """
    samples = generate(
        policy, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size,
    )
    exact, mc = sequence_kl(policy, ref, samples, batch_size=batch_size)
    n = len(samples.completions)
    if reward_fn is not None:
        pairs = zip(samples.prompt_index.tolist(), samples.completions)
        rewards = torch.tensor([reward_fn(prompts[i], c) for i, c in pairs], dtype=torch.float64)  # (B,)
        mean_reward, reward_sem = float(rewards.mean()), standard_error(rewards)
    else:
        mean_reward = reward_sem = math.nan
    return {
        "mean_reward": mean_reward,
        "reward_sem": reward_sem,
        "kl": float(exact.mean()),
        "kl_sem": standard_error(exact),
        "kl_mc": float(mc.mean()),
        "mean_length": float(samples.response_mask.sum(dim=-1).double().mean()),
        "finished": float(samples.finished.double().mean()),
        "num_samples": n,
    }


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of a 1-D sample, std(unbiased) / √n (NaN for fewer than 2 values)."""
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def _encoded_batch(tokenizer, conversations: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Right-padded (B, L) tensors of conversations ``{messages, rewards}`` (every assistant turn an action)."""
    from shiq_llm.data import collate
    from shiq_llm.tokenization import encode_conversation

    examples = []
    for b, c in enumerate(conversations):
        e = encode_conversation(c["messages"], c["rewards"], 0, tokenizer, use_chat_template=True, where=f"dialogue {b}")
        examples.append({"input_ids": e.input_ids, "response_mask": e.response_mask, "rewards": e.rewards,
                         "prompt_id": 0, "row_index": b})
    return collate(examples, pad_token_id=tokenizer.pad_token_id)


def turn_index(response_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool → (B, L) int64: the 0-based agent turn of each response token (a turn is a maximal run of
    True), −1 outside the mask."""
    starts = response_mask & ~F.pad(response_mask[:, :-1], (1, 0))  # (B, L) first token of a run
    return torch.where(response_mask, starts.long().cumsum(dim=-1) - 1, -1)


@dataclass
class ConversationKL:
    """KL(π ‖ π_ref) of conversations on their agent tokens, float64: ``exact`` (B,) Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)),
    ``mc`` (B,) Σ_t ρ_t, ``per_turn`` (B, K) the exact sum over each turn's tokens (0 for missing turns)."""

    exact: torch.Tensor
    mc: torch.Tensor
    per_turn: torch.Tensor


@torch.no_grad()
def conversation_kl(policy, ref, tokenizer, conversations: Sequence[Mapping], *, batch_size: int = 64) -> ConversationKL:
    """Exact and Monte-Carlo KL(π ‖ π_ref) summed over the agent tokens of each conversation, and per turn:
    :func:`token_kl` on masks with holes (user / tool tokens are state, not summed).

    conversations: multi-turn rows ``{messages, rewards}`` (every assistant message is an agent turn; an empty
    one is its end-of-turn token alone, e.g. a sampled turn that began with EOS), tokenised through the chat
    template as ``shiq_llm.data.tokenize_rows`` does.
    """
    device = next(policy.parameters()).device
    turns = max(len(c["rewards"]) for c in conversations)
    exact, mc, per_turn = [], [], []
    for start in range(0, len(conversations), batch_size):
        batch = _encoded_batch(tokenizer, conversations[start : start + batch_size])
        mask = batch["response_mask"]  # (b, L)
        e, r = token_kl(policy, ref, batch["input_ids"].to(device), batch["attention_mask"].to(device), mask.to(device))
        e, r = e.double().cpu(), r.double().cpu()
        turn = turn_index(mask).clamp(min=0)  # (b, L); masked-out tokens carry e = 0, any slot will do
        per_turn.append(torch.zeros(len(e), turns, dtype=torch.float64).scatter_add_(1, turn, e))  # (b, K)
        exact.append(e.sum(dim=-1))
        mc.append(r.sum(dim=-1))
    return ConversationKL(torch.cat(exact), torch.cat(mc), torch.cat(per_turn))
