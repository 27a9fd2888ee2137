"""Layer 3 — training: ``ShiQConfig`` and ``ShiQTrainer`` on transformers' ``Trainer``.

- :mod:`~shiq_llm.train.config`: ``ShiQConfig`` (a ``TrainingArguments``), model and data arguments.
- :mod:`~shiq_llm.train.batching`: training items and their collation with the cached reference statistics.
- :mod:`~shiq_llm.train.metrics`: the loss of a batch through ``shiq_toy.methods`` and its diagnostics.
- :mod:`~shiq_llm.train.trainer`: ``ShiQTrainer``.
- :mod:`~shiq_llm.train.checkpoint`: atomic checkpoints, manifests, resume.
- :mod:`~shiq_llm.train.loading`: a model and tokenizer from a path or a tiny config.
- :mod:`~shiq_llm.train.run`: one training run end to end (``shiq-llm train`` / ``cache-ref``).

Imports: the layers below (storage, data, core); never :mod:`shiq_llm.generation` (its sibling), the embedded
tasks or above.
"""
