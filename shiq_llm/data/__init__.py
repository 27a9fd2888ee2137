"""Data for ``shiq_llm``: from reward-labelled rows to padded training batches (layer 1; the one import point).

The pipeline, one function per step::

    rows = load_rows("data.jsonl", format=None)              # datasets.Dataset, canonical rows, validated
    examples, report = tokenize_rows(rows, tokenizer, max_length=1024)   # input_ids, response_mask, rewards, …
    batch = collate([examples[i] for i in idx], pad_token_id=tokenizer.pad_token_id)  # (B, L) tensors
    chosen, rejected = preference_pairs(examples)            # index pairs for DPO / CoPG

    # or batches straight from a DataLoader (a Dataset row is a dict):
    loader = torch.utils.data.DataLoader(examples, batch_size=8, shuffle=True,
                                         collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id))

Rows (``shiq_llm.data.rows``): single-turn ``{prompt, completion, reward}`` or multi-turn ``{messages, rewards}``
(one reward per assistant turn; user/system/tool turns are state). Dataset formats (UltraFeedback, Anthropic
HH, paired preferences, BFCL) are converted by ``shiq_llm.data.adapters``. Tokenisation, the response mask and the
truncation policy: ``shiq_llm.data.tokenization``. Collation and pairing: ``shiq_llm.data.collate``; prompts for sampling and the held-out check:
``shiq_llm.data.prompts``; BFCL's tool-call rows: ``shiq_llm.data.bfcl``. Imports only :mod:`shiq_llm.storage`.

Notation used for tensor shapes: ``B`` sequences, ``L`` padded length.
"""

from shiq_llm.data.collate import PADDING_SIDES, collate, preference_pairs, sequence_rewards
from shiq_llm.data.rows import load_rows, row_conversation, validate_rows
from shiq_llm.data.tokenization import (
    LONG_RESPONSE,
    MAX_TRUNCATED_FRACTION,
    TokenizeReport,
    encode_conversation,
    tokenize_rows,
)

__all__ = [
    "load_rows",
    "validate_rows",
    "row_conversation",
    "tokenize_rows",
    "encode_conversation",
    "TokenizeReport",
    "LONG_RESPONSE",
    "MAX_TRUNCATED_FRACTION",
    "collate",
    "sequence_rewards",
    "preference_pairs",
    "PADDING_SIDES",
]
