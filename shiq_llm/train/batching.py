"""Training items and their collation into batches with the cached reference statistics.

Items are examples (methods on sequences) or pairs ``(chosen, rejected)`` of examples (pair methods). Their
order is the Trainer's seeded sampler, so a resumed run that skips the micro-batches already consumed sees
exactly the batches of an uninterrupted run.

Notation used for tensor shapes: ``B`` sequences, ``L`` padded length, ``H`` hidden size.
"""

from __future__ import annotations

import numpy as np
import torch

from shiq_llm.core.reference import scatter_response_values
from shiq_llm.data import collate

__all__ = ["TrainingItems", "collate_items"]


class TrainingItems(torch.utils.data.Dataset):
    """Training items: example ``i`` (methods on sequences) or pair ``k`` = (chosen[k], rejected[k])."""

    def __init__(self, examples, pairs: tuple[list[int], list[int]] | None):
        self.examples, self.pairs = examples, pairs

    def __len__(self) -> int:
        return len(self.pairs[0]) if self.pairs is not None else len(self.examples)

    def __getitem__(self, k: int) -> list[dict]:
        if self.pairs is None:
            return [self.examples[int(k)]]
        return [self.examples[self.pairs[0][k]], self.examples[self.pairs[1][k]]]

    def __getitems__(self, ks: list[int]) -> list[list[dict]]:
        """The items of a whole micro-batch (``DataLoader`` calls this when present): one read of the examples per
        member instead of one per example."""
        if self.pairs is None:
            return [[row] for row in self._rows([int(k) for k in ks])]
        first, second = (self._rows([self.pairs[j][int(k)] for k in ks]) for j in (0, 1))
        return [[a, b] for a, b in zip(first, second)]

    def _rows(self, indices: list[int]) -> list[dict]:
        columns = getattr(self.examples, "column_names", None)
        if columns is None:  # a list of dicts
            return [self.examples[i] for i in indices]
        batch = self.examples[indices]  # datasets.Dataset: {column: [values]}
        return [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


def collate_items(items: list[list[dict]], *, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Items -> a batch: ``shiq_llm.data.collate`` of the examples (pairs: all first members, then all second
    members) plus the cached reference statistics as (B, L) ``ref_logit_taken``, ``ref_logsumexp`` and, when
    present, ``ref_prompt_state`` (B, H)."""
    examples = [item[j] for j in range(len(items[0])) for item in items]
    batch = collate(examples, pad_token_id=pad_token_id, padding_side=padding_side)
    for column in ("ref_logit_taken", "ref_logsumexp"):
        batch[column] = scatter_response_values([ex[column] for ex in examples], batch["response_mask"])  # (B, L)
    if "ref_prompt_state" in examples[0]:
        batch["ref_prompt_state"] = torch.tensor(np.array([ex["ref_prompt_state"] for ex in examples]), dtype=torch.float32)
    return batch
