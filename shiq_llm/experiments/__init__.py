"""LLM experiments, one module each (``sweep``: a grid of methods × β × seeds, trained and evaluated)."""
