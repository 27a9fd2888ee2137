"""Layer 3 — sampling and scoring: ``shiq-llm generate`` / ``score`` / ``evaluate`` as functions.

- :mod:`~shiq_llm.generation.sampling`: batched generation with left padding (transformers or vLLM).
- :mod:`~shiq_llm.generation.generate`: prompts → resumable completion shards.
- :mod:`~shiq_llm.generation.rewards`: reward functions and reward models behind one interface.
- :mod:`~shiq_llm.generation.score`: completions → reward-labelled rows.
- :mod:`~shiq_llm.generation.evaluate`: a policy's mean reward and exact KL to the reference.

Imports: the layers below (storage, data, core); never :mod:`shiq_llm.train` (its sibling) or above.
"""
