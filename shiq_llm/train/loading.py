"""Loading what a run trains: tokenizer and model (hub name, local path, or a tiny local model).

``model="tiny-llama"`` / ``"tiny-gpt2"`` builds ``shiq_llm.core.models.build_tokenizer()`` and
``tiny_causal_lm(tokenizer, arch=…, seed=seed)`` (hidden 64, 2 layers, random weights, no download), saves both
to ``OUT/base_model`` (atomically, with a small spec file), and loads them from there like any local model, so
a checkpoint or the final model can be reloaded later and a resumed run starts from the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shiq_llm.storage.atomic import atomic_directory
from shiq_llm.train.config import TINY_MODELS

__all__ = ["build_tiny_model", "load_model_and_tokenizer"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
_TINY_SPEC = "shiq_tiny_model.json"


def build_tiny_model(name: str, directory: Path, *, seed: int) -> None:
    """Build the tiny tokenizer + model of ``name`` and save them to ``directory`` (atomically)."""
    from shiq_llm.core.models import build_tokenizer, tiny_causal_lm

    spec = {"model": name, "seed": seed}
    spec_file = directory / _TINY_SPEC
    if directory.exists():
        found = json.loads(spec_file.read_text()) if spec_file.is_file() else None
        if found == spec:
            return
        raise ValueError(f"{directory} holds another base model ({found}, this run wants {spec}); "
                         "use another --out, or --overwrite to rebuild it")
    tokenizer = build_tokenizer()
    model = tiny_causal_lm(tokenizer, arch=TINY_MODELS[name], seed=seed)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _TINY_SPEC).write_text(json.dumps(spec))


def load_model_and_tokenizer(model_args, *, out: Path, seed: int = 0, main_process: bool = True, barrier=None):
    """(tokenizer, model) from ``ModelArguments`` (``model_name_or_path``, ``tokenizer_name_or_path``,
    ``dtype``); tiny models are built in ``OUT/base_model`` (by the main process; ``barrier()`` then waits).

    Both sources are checked first (``shiq_llm.core.models.resolve_model_source``: a missing or model-less
    directory, a broken config, a hub name while offline is a one-line ValueError). The tokenizer gets a pad
    token (its EOS) when it has none. Returns the model in train mode, on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shiq_llm.core.models import resolve_model_source

    source = model_args.model_name_or_path
    if source in TINY_MODELS:
        directory = out / "base_model"
        if main_process:
            build_tiny_model(source, directory, seed=seed)
        if barrier is not None:
            barrier()
        source = str(directory)
    source = resolve_model_source(source)
    tokenizer_source = resolve_model_source(model_args.tokenizer_name_or_path or source, kind="tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer_source} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[model_args.dtype])
    model.train()
    return tokenizer, model
