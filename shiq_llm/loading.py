"""Loading what a run trains: tokenizer and model (hub name, local path, or a tiny local model), rows, LoRA.

``model="tiny-llama"`` / ``"tiny-gpt2"`` builds ``shiq_llm.models.build_tokenizer()`` and
``tiny_causal_lm(tokenizer, arch=…, seed=seed)`` (hidden 64, 2 layers, random weights, no download), saves both
to ``OUT/base_model`` (atomically, with a small spec file), and loads them from there like any local model, so
a checkpoint or the final model can be reloaded later and a resumed run starts from the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from shiq_llm.config import PAIR_ALGOS, TINY_MODELS, TrainConfig
from shiq_llm.data import load_rows, preference_pairs, tokenize_rows

__all__ = ["build_tiny_model", "load_model_and_tokenizer", "load_examples", "apply_lora"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}
_TINY_SPEC = "shiq_tiny_model.json"


def build_tiny_model(name: str, directory: Path, *, seed: int) -> None:
    """Build the tiny tokenizer + model of ``name`` and save them to ``directory`` (atomically)."""
    from shiq_llm.models import build_tokenizer, tiny_causal_lm

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
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _TINY_SPEC).write_text(json.dumps(spec))
    tmp.replace(directory)


def load_model_and_tokenizer(config: TrainConfig, *, out: Path, accelerator=None):
    """(tokenizer, model) from ``config.model`` / ``config.tokenizer``; tiny models are built in ``OUT/base_model``.

    Both sources are checked first (``shiq_llm.models.resolve_model_source``: a missing or model-less
    directory, a broken config, a hub name while offline is a one-line ValueError). The tokenizer gets a pad
    token (its EOS) when it has none. Returns the model in train mode, dropout off when
    ``config.disable_dropout``, gradient checkpointing on when asked, on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shiq_llm.models import resolve_model_source

    source = config.model
    if source in TINY_MODELS:
        directory = out / "base_model"
        if accelerator is None or accelerator.is_main_process:
            build_tiny_model(source, directory, seed=config.seed)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        source = str(directory)
    source = resolve_model_source(source)
    tokenizer_source = resolve_model_source(config.tokenizer or source, kind="tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer_source} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[config.model_dtype])
    if config.disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return tokenizer, model


def load_examples(config: TrainConfig, tokenizer):
    """Rows -> tokenised examples, their TokenizeReport and, for dpo/copg, the pairs ``(chosen, rejected)``."""
    rows = load_rows(config.data, format=config.data_format)
    examples, report = tokenize_rows(
        rows, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
        long_response=config.long_response,
    )
    pairs = preference_pairs(examples, mode=config.pair_mode) if config.algo in PAIR_ALGOS else None
    return examples, report, pairs


def apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``).

    The base weights are frozen in place (no copy); with the adapters disabled the model is the reference.
    """
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets)
    return get_peft_model(model, lora)
