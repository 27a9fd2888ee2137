"""Collation and pairing: tokenised examples → padded ``(B, L)`` batches, and preference pairs.

Notation used for tensor shapes: ``B`` sequences, ``L`` padded length.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

__all__ = ["collate", "sequence_rewards", "preference_pairs", "PADDING_SIDES"]

PADDING_SIDES = ("right", "left")


def collate(
    examples: Sequence[Mapping[str, Any]], *, pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad tokenised examples (``tokenize_rows`` rows) into a batch of tensors.

    Returns ``input_ids`` (B, L) int64 (``pad_token_id`` on padding), ``attention_mask`` (B, L) int64 (1 on
    real tokens), ``response_mask`` (B, L) bool, ``rewards`` (B, L) float32 (0 on padding), ``prompt_id``
    (B,) int64 and ``row_index`` (B,) int64; L is the longest example. ``padding_side`` is ``"right"`` or
    ``"left"`` (use ``shiq_llm.core.models.position_ids_from_mask`` for position ids under left padding).
    ValueError when an example's lists differ in length or its first token is a response token.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token) first")
    lengths = []
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n == 0 or len(ex["response_mask"]) != n or len(ex["rewards"]) != n:
            raise ValueError(
                f"example {b} (row {ex.get('row_index')}): input_ids, response_mask and rewards must have the same "
                f"non-zero length, got {n}, {len(ex['response_mask'])}, {len(ex['rewards'])}"
            )
        if ex["response_mask"][0]:
            raise ValueError(f"example {b} (row {ex.get('row_index')}): position 0 is a response token; the prompt must be non-empty")
        lengths.append(n)
    batch_size, length = len(examples), max(lengths)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.int64)  # (B, L)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.int64)
    response_mask = torch.zeros(batch_size, length, dtype=torch.bool)
    rewards = torch.zeros(batch_size, length, dtype=torch.float32)
    for b, (ex, n) in enumerate(zip(examples, lengths)):
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[b, span] = torch.as_tensor(ex["input_ids"], dtype=torch.int64)
        attention_mask[b, span] = 1
        response_mask[b, span] = torch.as_tensor(ex["response_mask"], dtype=torch.bool)
        rewards[b, span] = torch.as_tensor(ex["rewards"], dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "rewards": rewards,
        "prompt_id": torch.as_tensor([int(ex["prompt_id"]) for ex in examples], dtype=torch.int64),
        "row_index": torch.as_tensor([int(ex["row_index"]) for ex in examples], dtype=torch.int64),
    }


def sequence_rewards(examples) -> torch.Tensor:
    """(N,) float64 sequence reward of each tokenised example: the sum of its per-token rewards.

    For a single-turn row this is its ``reward``; for a multi-turn row, the undiscounted sum of its turns.
    """
    return torch.tensor([sum(r) for r in examples["rewards"]], dtype=torch.float64)


def preference_pairs(examples, *, mode: str = "all", pairing: str = "preference") -> tuple[list[int], list[int]]:
    """Pairs of examples with the same prompt for the pair methods (spec §4), by the method's ``pairing``.

    examples: the dataset returned by ``tokenize_rows`` (columns ``prompt_id`` and ``rewards``).
    Returns ``(chosen, rejected)``, two equal-length lists of indices into ``examples``: for every pair,
    same ``prompt_id`` and ``sequence_rewards[chosen] > sequence_rewards[rejected]``; pairs with equal
    rewards are dropped. ``mode="all"``: every such pair of each prompt (K responses give up to K(K−1)/2
    pairs); ``mode="disjoint"``: responses paired 1st with 2nd, 3rd with 4th … in dataset order, each used
    at most once. ``pairing="preference"`` (DPO, IPO): the pair is (winner, loser), ties dropped
    (``shiq_toy.baselines.make_preference_pairs`` per prompt); ``pairing="any"`` (CoPG): any two responses of
    the prompt, ties included, in dataset order (``shiq_toy.baselines.make_pairs``); see
    ``shiq_toy.methods.Method.pairing``. ValueError when no pair exists.
    """
    from shiq_toy.baselines import PAIR_MODES, make_pairs, make_preference_pairs

    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {PAIR_MODES}, got {mode!r}")
    if pairing not in ("preference", "any"):
        raise ValueError(f"pairing must be 'preference' or 'any', got {pairing!r}")
    prompt_ids = torch.as_tensor(examples["prompt_id"], dtype=torch.int64)  # (N,)
    rewards = sequence_rewards(examples)  # (N,)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_ids.tolist()):
        groups.setdefault(p, []).append(i)
    chosen: list[int] = []
    rejected: list[int] = []
    for members in groups.values():
        if len(members) > 1:
            local = torch.tensor(members)  # (K,) this prompt's responses; empty pairs when all rewards tie
            same_prompt = torch.zeros(len(members), dtype=torch.int64)
            if pairing == "preference":
                idx_w, idx_l = make_preference_pairs(same_prompt, rewards[local], mode=mode, allow_empty=True)
            else:
                idx_w, idx_l = make_pairs(same_prompt, mode=mode)
            chosen += local[idx_w].tolist()
            rejected += local[idx_l].tolist()
    if not chosen:
        raise ValueError(
            f"no usable pair for the pair methods: none of the {len(groups)} prompts has two responses with different "
            f"rewards ({sum(len(m) > 1 for m in groups.values())} prompt(s) have several responses)"
        )
    return chosen, rejected
