"""The training configuration: one dataclass, loadable from YAML, every field a command-line option.

    config = TrainConfig(data="data.jsonl", out="runs/shiq", model="tiny-llama")
    config = load_config("configs/shiq_tiny.yaml", overrides={"beta": 0.5})   # YAML, then overrides
    parser = argparse.ArgumentParser(); add_config_arguments(parser)         # --data, --beta, … (one per field)

Each field's help text is its ``metadata["help"]``; ``--help`` prints it with the default. YAML keys are the
field names (``max_length``; the dashed CLI spelling ``max-length`` is accepted too). An unknown key or a value
of the wrong type is a ValueError naming the key and the file. :meth:`TrainConfig.validate` checks the values
(the trainer calls it first); errors name the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from shiq_llm.stats import DEFAULT_CHUNK_SIZE

__all__ = [
    "ALGOS",
    "TOKEN_ALGOS",
    "PAIR_ALGOS",
    "PRECISIONS",
    "MODEL_DTYPES",
    "TINY_MODELS",
    "TrainConfig",
    "load_config",
    "add_config_arguments",
    "config_from_namespace",
]

#: Token-level residual losses of ``shiq_toy.losses.LOSSES`` the trainer offers.
TOKEN_ALGOS = ("shiq", "shiq_init", "shiq_ms", "shiq_tk")
#: Baselines on pairs of responses of one prompt (``shiq_toy.baselines``).
PAIR_ALGOS = ("dpo", "copg")
ALGOS = TOKEN_ALGOS + PAIR_ALGOS + ("dro",)
PRECISIONS = ("fp32", "bf16")
#: ``transformers.get_scheduler`` names that need nothing but the warm-up and the number of steps.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
MODEL_DTYPES = ("float32", "bfloat16", "auto")
#: ``--model`` names built locally by ``shiq_llm.models`` (no download): the architecture they use.
TINY_MODELS = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}


def _opt(default, help: str, **choices):
    return field(default=default, metadata={"help": help, **choices})


@dataclass
class TrainConfig:
    """Everything ``shiq-llm train`` needs. Defaults suit a small GPU run; see ``configs/`` for examples."""

    # --- data ----------------------------------------------------------------------------------------
    data: str | None = _opt(None, "Training rows: a .jsonl/.json/.parquet file of {prompt, completion, reward} "
                            "or {messages, rewards} rows, or a hub dataset name (needs the network). Required.")
    data_format: str | None = _opt(None, "Adapter applied to the rows first (shiq_llm.adapters.ADAPTERS: paired, "
                                   "ultrafeedback, hh, bfcl); none when the rows are already canonical.")
    max_length: int = _opt(1024, "Maximum tokens per example; longer ones are truncated (prompt from the left, "
                           "response from the right; counts are logged). See shiq_llm.tokenization.")
    max_prompt_length: int | None = _opt(None, "Tokens the prompt may keep when an example is too long "
                                         "(default max_length // 2).")
    long_response: str = _opt("truncate", "A response longer than its budget: 'truncate' it or 'drop' the row.",
                              choices=("truncate", "drop"))
    padding_side: str = _opt("right", "Padding side of the batches.", choices=("right", "left"))
    # --- model ---------------------------------------------------------------------------------------
    model: str = _opt("tiny-llama", "Hugging Face model name or local path; or 'tiny-llama' / 'tiny-gpt2': a small "
                      "random-weight model and BPE tokenizer built locally (no download), saved to OUT/base_model.")
    tokenizer: str | None = _opt(None, "Tokenizer name or path (default: the model's).")
    model_dtype: str = _opt("float32", "dtype the weights are loaded in: float32, bfloat16 (halves the memory of a "
                            "frozen LoRA base), or auto (the checkpoint's).", choices=MODEL_DTYPES)
    precision: str = _opt("fp32", "Compute precision: fp32, or bf16 autocast (accelerate mixed precision). Token "
                          "statistics and the loss stay float32 either way.", choices=PRECISIONS)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward (less memory, ~30% slower).")
    disable_dropout: bool = _opt(True, "Set every dropout probability to 0 (as TRL does), so the policy's statistics "
                                 "are deterministic like the cached reference's.")
    lora_r: int = _opt(0, "LoRA rank through peft; 0 trains all weights. With LoRA the reference is the base "
                       "model with the adapters disabled.")
    lora_alpha: float = _opt(16.0, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: str = _opt("all-linear", "Modules to adapt: 'all-linear' (every linear layer but the "
                                    "output head) or a comma-separated list of module names (q_proj,v_proj).")
    # --- objective -----------------------------------------------------------------------------------
    algo: str = _opt("shiq", "Loss: shiq, shiq_init, shiq_ms, shiq_tk (token residuals of shiq_toy.losses), "
                     "dpo, copg (pairs of responses of one prompt), dro (single responses + a value head).",
                     choices=ALGOS)
    beta: float = _opt(0.1, "KL regularisation strength β > 0.")
    gamma: float = _opt(1.0, "Discount γ in (0, 1] of the token-level losses (sequence-level losses ignore it).")
    average: str = _opt("sequence", "Batch reduction: mean over sequences (pairs for dpo/copg), or 'token': sum "
                        "divided by the number of response tokens.", choices=("sequence", "token"))
    pair_mode: str = _opt("all", "dpo/copg pairs per prompt: 'all' pairs with different rewards, or 'disjoint' "
                          "(1st with 2nd, 3rd with 4th, …).", choices=("all", "disjoint"))
    value_coef: float = _opt(1.0, "dro: weight of the value head's gradient (1 = the joint squared loss).")
    # --- optimisation --------------------------------------------------------------------------------
    batch_size: int = _opt(8, "Micro-batch per device: sequences (pairs for dpo/copg).")
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = _opt(100, "Optimizer steps to train (epochs repeat the data in a new seeded order).")
    lr: float = _opt(1e-5, "AdamW learning rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    lr_scheduler: str = _opt("linear", "Learning-rate schedule (transformers.get_scheduler) over max_steps.",
                             choices=SCHEDULERS)
    warmup_steps: int = _opt(0, "Learning-rate warm-up steps.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm; 0 turns clipping off (the norm is still logged).")
    seed: int = _opt(0, "Seed of the data order, the tiny model's weights and the value head.")
    chunk_size: int = _opt(DEFAULT_CHUNK_SIZE, "Response tokens projected onto the vocabulary at once "
                           "(shiq_llm.stats).")
    # --- reference cache -----------------------------------------------------------------------------
    ref_cache: str | None = _opt(None, "Directory of the reference statistics cache (default OUT/reference). "
                                 "Point several runs on the same data and model at one directory to share it.")
    recompute_ref: bool = _opt(False, "Recompute the reference cache and overwrite a mismatching one.")
    ref_batch_size: int | None = _opt(None, "Sequences per forward pass of the reference (default 2 × batch_size).")
    # --- outputs, logging, checkpoints ---------------------------------------------------------------
    out: str | None = _opt(None, "Output directory (metrics.jsonl, checkpoints/, final/). Required.")
    overwrite: bool = _opt(False, "Start afresh in an OUT that holds an earlier run (its metrics, checkpoints "
                           "and final model are deleted).")
    resume: bool = _opt(False, "Resume from the newest complete checkpoint in OUT/checkpoints.")
    resume_from: str | None = _opt(None, "Resume from this checkpoint directory.")
    logging_steps: int = _opt(1, "Write a metrics line every this many optimizer steps.")
    save_steps: int = _opt(0, "Checkpoint every this many optimizer steps (0: only at the end).")
    save_total_limit: int = _opt(2, "Checkpoints kept (the newest ones); older complete ones are deleted.")
    tensorboard: bool = _opt(True, "Also log to TensorBoard (OUT/tensorboard) when tensorboard is installed.")
    progress_bar: bool = _opt(True, "Show a tqdm progress bar.")

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """ValueError naming the first field with a bad value; returns self."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"config field {f.name!r} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if not self.data:
            raise ValueError("config field 'data' is required (a JSONL/JSON/parquet file or a hub dataset name)")
        if not self.out:
            raise ValueError("config field 'out' is required (the output directory)")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"config field 'beta' must be a finite number > 0, got {self.beta!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"config field 'gamma' must lie in (0, 1], got {self.gamma!r}")
        positive = ["batch_size", "grad_accum", "max_steps", "logging_steps", "chunk_size", "max_length", "save_total_limit"]
        for name in positive + ["ref_batch_size"] * (self.ref_batch_size is not None):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {getattr(self, name)!r}")
        for name in ("save_steps", "warmup_steps", "lora_r", "weight_decay", "max_grad_norm", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name!r} must be >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"config field 'lr' must be a finite number > 0, got {self.lr!r}")
        if not self.value_coef > 0:
            raise ValueError(f"config field 'value_coef' must be > 0, got {self.value_coef!r}")
        if self.resume and self.overwrite:
            raise ValueError("config fields 'resume' and 'overwrite' exclude each other")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Types of the fields: parse and check a value from YAML or the command line
# --------------------------------------------------------------------------------------------------

_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> tuple[type, bool]:
    """(scalar type, optional) of a field: ``int | None`` -> (int, True)."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check (and widen int -> float) a YAML value for field ``name``; ValueError naming key and file."""
    kind, optional = _base_type(name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: key {name!r} cannot be null (expected {kind.__name__})")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: key {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(path: str | Path | None = None, *, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from a YAML mapping of field names (optional), then ``overrides`` (field name -> value).

    ValueError for an unreadable file, a top level that is not a mapping, an unknown key, or a wrong type.
    """
    import yaml

    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"cannot read config file {path}: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of option names to values, got {type(loaded).__name__}")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
            values[name] = _coerce(name, value, f"config file {path}")
    for name, value in (overrides or {}).items():
        if name not in names:
            raise ValueError(f"unknown config option {name!r}")
        values[name] = _coerce(name, value, "override")
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------------
# Command line: one option per field
# --------------------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one ``--field-name`` option per TrainConfig field (default: not given).

    Options left out keep the YAML value or the field's default; ``--help`` shows that default.
    """
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (field names as keys); "
                        "options given on the command line override it.")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        kind, optional = _base_type(f.name)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper())
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar")
        kwargs["type"] = _none_or(kind) if optional else kind
        parser.add_argument(flag, **kwargs)


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from a namespace parsed with :func:`add_config_arguments`: ``--config`` then the options given."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(getattr(args, "config", None), overrides=overrides)
