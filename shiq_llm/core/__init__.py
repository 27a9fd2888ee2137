"""Layer 2 — the model side of the loss: per-token statistics without the ``(B, L, V)`` logits.

- :mod:`~shiq_llm.core.models`: tokenizers, tiny models from configs, model paths, devices and dtypes.
- :mod:`~shiq_llm.core.stats`: the chunked head — ``logit_taken``, ``logsumexp`` and ``next_logsumexp`` per token.
- :mod:`~shiq_llm.core.sharding`: the same head under DDP, FSDP1/2 and DeepSpeed ZeRO-3.
- :mod:`~shiq_llm.core.reference`: the reference model's statistics, computed once and cached (checksummed).

Imports: :mod:`shiq_llm.storage`, :mod:`shiq_llm.data` and ``shiq_toy``'s core.
"""
