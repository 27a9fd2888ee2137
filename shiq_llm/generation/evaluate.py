"""Evaluation of a policy: sampled completions, their mean reward, and KL(π ‖ π_ref) on the policy's samples.

Spec §5 (LLM scale) plots the generative mean reward ``E_{x, y∼π}[R(x, y)]`` against
``KL(π ‖ π_ref) = E_x E_{y∼π(·|x)}[ln π(y|x) − ln π_ref(y|x)]``. Both are estimated on completions the
policy samples itself (temperature 1, no top-k / top-p: exactly π; ``shiq_llm.generation.sampling``, with the hf or
the vLLM backend). The KL has two estimators, per sequence::

    exact (chain rule):  KL(y) = Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)) = Σ_t Σ_a π(a|s_t) ln π(a|s_t)/π_ref(a|s_t)
    Monte Carlo:          ρ(y)  = Σ_t ρ_t = Σ_t ln π(y_t|s_t) − ln π_ref(y_t|s_t)

over the response positions ``t`` (generated tokens up to and including the first EOS). Both have expectation
``KL(π ‖ π_ref)`` under ``y ∼ π``; the exact one replaces each token's log-ratio by its expectation given the
prefix (Rao–Blackwell: never negative, usually much lower variance), the Monte-Carlo one is what needs only
the sampled tokens' log-probabilities.

The exact one reads both models' full next-token distributions. :func:`token_kl` never holds the (B, L, V)
logits: it runs each backbone (``shiq_llm.core.stats.response_hidden_states``), keeps the N states before response
tokens and projects them onto the vocabulary ``chunk_size`` rows at a time (:func:`linear_head_kl`), so the
extra memory is a few ``chunk_size × V`` float32 buffers (``benchmarks/kl_memory.py`` measures it at V = 128k).
:func:`naive_token_kl` is the full-logit computation it equals (and the path for models whose logits are not
``W h + b``, ``shiq_llm.core.stats.exact_path_reason``).

**Conversations** (:func:`conversation_kl`): for multi-turn rows the same two sums run over the agent's tokens
only — the response mask has holes at the user / tool turns, which are state — and are also split by turn.

Notation used for tensor shapes: ``B`` sequences, ``L`` positions (prompt + generated), ``V`` vocabulary,
``H`` hidden size, ``N`` response tokens, ``c`` rows in a chunk, ``K`` agent turns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from shiq_llm.core.models import position_ids_from_mask
from shiq_llm.core.stats import DEFAULT_CHUNK_SIZE, exact_path_reason, response_hidden_states, scatter_to_mask
from shiq_llm.generation.sampling import Samples, encode_prompts, generate, response_mask_from_generated

__all__ = [
    "Samples",
    "encode_prompts",
    "generate",
    "response_mask_from_generated",
    "linear_head_kl",
    "token_kl",
    "naive_token_kl",
    "sequence_kl",
    "evaluate_policy",
    "standard_error",
    "turn_index",
    "ConversationKL",
    "conversation_kl",
]


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


def _check_response_mask(response_mask: torch.Tensor) -> None:
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask is True at position 0: the first token has no state before it")


@torch.no_grad()
def naive_token_kl(
    policy, ref, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_kl` from each model's full (B, L, V) logits (the reference computation; more memory)."""
    _check_response_mask(response_mask)
    logp, taken = _response_log_probs(policy, input_ids, attention_mask, response_mask)  # (N, V), (N,)
    logq, _ = _response_log_probs(ref, input_ids, attention_mask, response_mask)
    if logp.shape != logq.shape:
        raise ValueError(f"policy and reference vocabularies differ: {logp.shape[-1]} vs {logq.shape[-1]} logits")
    exact = F.kl_div(logq, logp, reduction="none", log_target=True).sum(dim=-1)  # (N,) Σ_a p (ln p − ln q)
    rho = (logp - logq).gather(-1, taken[:, None])[:, 0]  # (N,)
    return scatter_to_mask(exact, response_mask), scatter_to_mask(rho, response_mask)


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last axis, in place: z ← z − logsumexp(z)."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


@torch.no_grad()
def linear_head_kl(
    policy_states: torch.Tensor,
    policy_head: torch.nn.Module,
    ref_states: torch.Tensor,
    ref_head: torch.nn.Module,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-token KL and log-ratio from hidden states, ``chunk_size`` rows at a time: (N,) each.

    policy_states, ref_states: (N, H_π), (N, H_ref) states before each token; policy_head, ref_head: linear
    heads (V, H); targets: (N,) the tokens taken. With ``ln p = log_softmax(W_π h_π + b_π)`` and
    ``ln q = log_softmax(W_ref h_ref + b_ref)`` (float32, or float64 for float64 states)::

        exact_n = Σ_a p_n(a) (ln p_n(a) − ln q_n(a))      rho_n = ln p_n(targets_n) − ln q_n(targets_n)

    Equivalent to ``F.kl_div(ln q, ln p, log_target=True).sum(-1)`` on the (N, V) log-probabilities, which it
    never holds: each chunk's two (c, V) buffers are turned into ``p`` and ``ln p − ln q`` in place (peak:
    three (c, V) float32 buffers, with log-sum-exp's temporary).
    """
    if policy_head.weight.shape[0] != ref_head.weight.shape[0]:
        raise ValueError(f"policy and reference vocabularies differ: {policy_head.weight.shape[0]} vs "
                         f"{ref_head.weight.shape[0]} logits")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = torch.promote_types(policy_states.dtype, torch.float32)
    n = targets.shape[0]
    exact = policy_states.new_empty(n, dtype=dtype)  # (N,)
    rho = policy_states.new_empty(n, dtype=dtype)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        logp = _log_softmax_(F.linear(policy_states[rows], policy_head.weight, policy_head.bias).to(dtype))  # (c, V)
        logq = _log_softmax_(F.linear(ref_states[rows], ref_head.weight, ref_head.bias).to(dtype))  # (c, V)
        taken = targets[rows, None]  # (c, 1)
        rho[rows] = (logp.gather(1, taken) - logq.gather(1, taken))[:, 0]
        diff = logq.neg_().add_(logp)  # (c, V) ln p − ln q, in logq's buffer
        prob = logp.exp_()  # (c, V) p, in logp's buffer
        exact[rows] = (prob[:, None, :] @ diff[:, :, None]).view(-1)  # Σ_a p (ln p − ln q), no (c, V) product
        del logp, logq, diff, prob  # free this chunk's buffers before the next chunk allocates its own
    return exact, rho


@torch.no_grad()
def token_kl(
    policy,
    ref,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL terms on response positions, (B, L) each (float32, float64 for float64 models), 0 where
    ``response_mask`` is False:

    exact: KL(π(·|s_p) ‖ π_ref(·|s_p)) = Σ_a π(a|s_p) (ln π(a|s_p) − ln π_ref(a|s_p))
    log_ratio: ρ_p = ln π(y_p|s_p) − ln π_ref(y_p|s_p)

    where ``s_p`` is the prefix before position p. Both models must share the vocabulary (same tokenizer).
    Computed from hidden states in chunks (:func:`linear_head_kl`; no (B, L, V) logits); equal to
    :func:`naive_token_kl`, which models whose head is not a plain linear layer go through (with a warning).
    """
    _check_response_mask(response_mask)
    reasons = [(m, exact_path_reason(m)) for m in (policy, ref)]
    reasons = [(m, r) for m, r in reasons if r is not None]
    if reasons:
        model, reason = reasons[0]
        warnings.warn(f"token_kl: {type(model).__name__}: {reason}; using the full-logit KL (all B·L·V logits)",
                      stacklevel=2)
        return naive_token_kl(policy, ref, input_ids, attention_mask, response_mask)
    policy_states, policy_head = response_hidden_states(policy, input_ids, attention_mask, response_mask)  # (N, H)
    ref_states, ref_head = response_hidden_states(ref, input_ids, attention_mask, response_mask)
    exact, rho = linear_head_kl(policy_states, policy_head, ref_states, ref_head, input_ids[response_mask],
                                chunk_size=chunk_size)
    return scatter_to_mask(exact, response_mask), scatter_to_mask(rho, response_mask)


@torch.no_grad()
def sequence_kl(
    policy, ref, samples: Samples, *, batch_size: int = 64, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) per-sequence ``Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t))`` (exact) and ``Σ_t ρ_t`` (Monte Carlo), float64,
    ``batch_size`` sequences per forward pass, on the policy's device (the reference must be there too)."""
    device = next(policy.parameters()).device
    ref_device = next(ref.parameters()).device
    if ref_device != device:
        raise ValueError(f"the policy is on {device} but the reference on {ref_device}: put both on one device")
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
            chunk_size=chunk_size,
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
    reward_fn=None,
    num_samples: int = 4,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    sampler=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Sample ``num_samples`` completions per prompt from ``policy`` and report (plain floats):

    ``mean_reward`` and ``reward_sem`` (mean of the samples' rewards and its standard error; NaN without a
    reward), ``kl`` and ``kl_sem`` (mean exact per-sequence KL to ``ref``), ``kl_mc`` and ``kl_mc_sem`` (the
    Monte-Carlo Σ_t ρ_t), ``mean_length`` and ``length_sem`` (response tokens, EOS included), ``finished``
    (fraction ending with EOS), ``num_samples`` (total samples).

    reward_fn: a per-row callable ``(prompt, completion) -> float`` or a scorer of ``shiq_llm.generation.rewards``
    (``RewardFunction``, ``RewardModel``); a bad reward is a ValueError naming the sample.
    sampler: a ``shiq_llm.generation.sampling`` sampler (e.g. ``VLLMSampler``); default ``HFSampler(policy, …)``.
    """
    from shiq_llm.generation.rewards import as_scorer

    scorer = as_scorer(reward_fn)
    samples = generate(
        policy, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size, sampler=sampler,
    )
    exact, mc = sequence_kl(policy, ref, samples, batch_size=batch_size, chunk_size=chunk_size)
    lengths = samples.response_mask.sum(dim=-1).double()  # (B,)
    if scorer is not None:
        sample_prompts = [prompts[i] for i in samples.prompt_index.tolist()]
        rewards = torch.tensor(scorer.score(sample_prompts, samples.completions), dtype=torch.float64)  # (B,)
        mean_reward, reward_sem = float(rewards.mean()), standard_error(rewards)
    else:
        mean_reward = reward_sem = math.nan
    return {
        "mean_reward": mean_reward,
        "reward_sem": reward_sem,
        "kl": float(exact.mean()),
        "kl_sem": standard_error(exact),
        "kl_mc": float(mc.mean()),
        "kl_mc_sem": standard_error(mc),
        "mean_length": float(lengths.mean()),
        "length_sem": standard_error(lengths),
        "finished": float(samples.finished.double().mean()),
        "num_samples": len(samples.completions),
    }


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of a 1-D sample, std(unbiased) / √n (NaN for fewer than 2 values)."""
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def _encoded_batch(tokenizer, conversations: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Right-padded (B, L) tensors of conversations ``{messages, rewards}`` (every assistant turn an action)."""
    from shiq_llm.data import collate
    from shiq_llm.data.tokenization import encode_conversation

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
