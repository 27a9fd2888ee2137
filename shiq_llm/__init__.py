"""ShiQ on Hugging Face causal LMs. ``ShiQTrainer`` and ``ShiQConfig`` are imported lazily (they need transformers)."""

__all__ = ["ShiQConfig", "ShiQTrainer"]


def __getattr__(name):
    if name == "ShiQConfig":
        from shiq_llm.train.config import ShiQConfig

        return ShiQConfig
    if name == "ShiQTrainer":
        from shiq_llm.train.trainer import ShiQTrainer

        return ShiQTrainer
    raise AttributeError(f"module 'shiq_llm' has no attribute {name!r}")
