"""The training configuration, in TRL's shape: ``ShiQConfig`` (a ``transformers.TrainingArguments``) plus the
model and data arguments of a training script, parsed from YAML and the command line.

    args = ShiQConfig(output_dir="runs/shiq", beta=0.1, loss_type="shiq", learning_rate=1e-5)
    model_args, data_args, args = parse_train_args(["--config", "configs/shiq_tiny.yaml", "--beta", "0.5"])

Every inherited ``TrainingArguments`` name keeps its meaning (``learning_rate``, ``per_device_train_batch_size``,
``gradient_accumulation_steps``, ``num_train_epochs``, ``max_steps``, ``output_dir``, ``report_to``, ``bf16``,
``logging_steps``, ``save_steps``, ``save_total_limit``, ``eval_strategy``, ``resume_from_checkpoint``,
``push_to_hub``, …). The ShiQ fields are below; a DPO config of TRL becomes a ShiQ run by changing the trainer
class and ``loss_type``. ``ModelArguments`` and ``DataArguments`` use the names of TRL's ``ModelConfig`` and
``ScriptArguments`` (``model_name_or_path``, ``dtype``, ``use_peft``, ``lora_r``…; ``dataset_name``,
``dataset_train_split``…).

YAML keys are field names; the command line overrides the file; both ``--learning_rate`` and
``--learning-rate`` spellings work (``transformers.HfArgumentParser``); an unknown key is a ValueError naming it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from transformers import TrainingArguments

from shiq_llm.core.stats import DEFAULT_CHUNK_SIZE
from shiq_llm.data.prompts import LEAK_POLICIES, parse_format_options
from shiq_toy.methods import METHODS

__all__ = [
    "LLM_METHODS",
    "TINY_MODELS",
    "MODEL_DTYPES",
    "ShiQConfig",
    "ModelArguments",
    "DataArguments",
    "TRAIN_ARGUMENT_CLASSES",
    "TRAIN_ALIASES",
    "train_command",
    "parse_train_args",
    "RESUME_INVARIANT",
]

#: Methods of :data:`shiq_toy.methods.METHODS` the LLM trainer offers: all but those that need the soft
#: value of the logits over the whole vocabulary (``logit_q``), which the chunked statistics never hold.
LLM_METHODS = tuple(name for name, row in METHODS.items() if not row.needs_soft_value)
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
#: ``model_name_or_path`` values built locally by ``shiq_llm.core.models`` (no download): the architecture they use.
TINY_MODELS = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}

#: ShiQConfig fields that must not change when a run is resumed (they change the trajectory). The data and
#: the base model are compared by fingerprint, not by path, so either may move.
RESUME_INVARIANT = (
    "loss_type", "beta", "gamma", "average", "pair_mode", "value_coef", "max_length", "max_prompt_length",
    "long_response", "padding_side", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "weight_decay", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "seed", "bf16",
)


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class ShiQConfig(TrainingArguments):
    """``transformers.TrainingArguments`` plus the ShiQ fields (each with its help text; ``--help`` lists all)."""

    # --- objective -----------------------------------------------------------------------------------
    loss_type: str = _opt("shiq", "Method (shiq_toy.methods.METHODS): shiq, shiq_init, shiq_ms, shiq_tk, shifted_q "
                          "(token residuals), dpo, ipo, copg (pairs of responses of one prompt), dro (single "
                          "responses + a value head).", choices=LLM_METHODS)
    beta: float = _opt(0.1, "KL regularisation strength beta > 0.")
    gamma: float = _opt(1.0, "Discount gamma in (0, 1] of the token residuals (sequence-level methods need 1).")
    average: str = _opt("sequence", "Batch reduction: mean over sequences (pairs for pair methods), or 'token': sum "
                        "divided by the number of response tokens.", choices=("sequence", "token"))
    pair_mode: str = _opt("all", "Pairs per prompt for pair methods: 'all' pairs, or 'disjoint' (1st with 2nd, "
                          "3rd with 4th, ...).", choices=("all", "disjoint"))
    value_coef: float = _opt(1.0, "dro: weight of the value head's gradient (1 = the joint squared loss).")
    chunk_size: int = _opt(DEFAULT_CHUNK_SIZE, "Response tokens projected onto the vocabulary at once "
                           "(shiq_llm.core.stats): peak extra memory is one chunk_size x V float32 buffer.")
    # --- tokenisation --------------------------------------------------------------------------------
    max_length: int = _opt(1024, "Maximum tokens per example; longer ones are truncated (prompt from the left, "
                           "response from the right; counts are logged).")
    max_prompt_length: int | None = _opt(None, "Tokens the prompt may keep when an example is too long "
                                         "(default max_length // 2).")
    long_response: str = _opt("truncate", "A response longer than its budget: 'truncate' it or 'drop' the row.",
                              choices=("truncate", "drop"))
    padding_side: str = _opt("right", "Padding side of the batches.", choices=("right", "left"))
    dataset_num_proc: int | None = _opt(None, "Processes that tokenise the rows (datasets.Dataset.map's num_proc, "
                                        "as in TRL); None: in this process. Rows read from files are tokenised "
                                        "once and reused from the datasets cache.")
    disable_dropout: bool = _opt(True, "Set every dropout probability to 0 (as TRL does), so the policy's statistics "
                                 "are deterministic like the cached reference's.")
    # --- reference cache -----------------------------------------------------------------------------
    ref_cache: str | None = _opt(None, "Directory of the reference statistics cache (default OUTPUT_DIR/reference). "
                                 "Point several runs on the same data and model at one directory to share it.")
    recompute_ref: bool = _opt(False, "Recompute the reference cache and overwrite a mismatching one.")
    ref_batch_size: int | None = _opt(None, "Sequences per forward pass of the reference "
                                      "(default 2 x per_device_train_batch_size).")
    # --- outputs -------------------------------------------------------------------------------------
    overwrite_output_dir: bool = _opt(False, "Start afresh in an OUTPUT_DIR that holds an earlier run (its "
                                      "checkpoints, metrics and final model are deleted).")
    # --- TrainingArguments defaults changed to TRL's / ours -------------------------------------------
    learning_rate: float = _opt(1e-6, "The initial learning rate for AdamW (TRL's DPO default).")
    logging_steps: float = _opt(10, "Log every X update steps (a float in (0, 1) is a fraction of the run).")
    remove_unused_columns: bool = _opt(False, "Kept False: the trainer builds its own batches.")

    def __post_init__(self):
        super().__post_init__()
        if self.use_cpu or not _has_accelerator():
            self.dataloader_pin_memory = False  # nothing to pin to (silences torch's warning)
        self.check_shiq_fields()

    def check_shiq_fields(self) -> None:
        """ValueError naming the first ShiQ field with a bad value."""
        own = {f.name for f in fields(ShiQConfig)} - {f.name for f in fields(TrainingArguments)}
        for f in fields(ShiQConfig):
            choices = f.metadata.get("choices") if f.name in own else None
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"option {f.name!r} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"option 'beta' must be a finite number > 0, got {self.beta!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"option 'gamma' must lie in (0, 1], got {self.gamma!r}")
        if METHODS[self.loss_type].sequence_level and self.gamma != 1.0:
            raise ValueError(f"option 'gamma' must be 1 for the sequence-level method {self.loss_type!r}, got {self.gamma!r}")
        optional = tuple(n for n in ("ref_batch_size", "dataset_num_proc") if getattr(self, n) is not None)
        for name in ("chunk_size", "max_length") + optional:
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} must be >= 1, got {getattr(self, name)!r}")
        if not (self.value_coef > 0 and math.isfinite(self.value_coef)):
            raise ValueError(f"option 'value_coef' must be a finite number > 0, got {self.value_coef!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"option 'learning_rate' must be a finite number > 0, got {self.learning_rate!r}")

    @property
    def precision(self) -> str:
        """Compute precision, as recorded in the reference cache's key: ``bf16``, ``fp16`` or ``fp32``."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


@dataclass
class ModelArguments:
    """The model of a training run (names of TRL's ``ModelConfig``)."""

    model_name_or_path: str = _opt("tiny-llama", "Hugging Face model name or local path; or 'tiny-llama' / "
                                   "'tiny-gpt2': a small random-weight model and BPE tokenizer built locally (no "
                                   "download), saved to OUTPUT_DIR/base_model.")
    tokenizer_name_or_path: str | None = _opt(None, "Tokenizer name or path (default: the model's).")
    dtype: str = _opt("float32", "dtype the weights are loaded in: float32, bfloat16 (halves the memory of a frozen "
                      "LoRA base), float16, or auto (the checkpoint's).", choices=MODEL_DTYPES)
    use_peft: bool = _opt(False, "Train LoRA adapters (peft) instead of all weights; the reference is then the base "
                          "model with the adapters disabled.")
    lora_r: int = _opt(16, "LoRA rank.")
    lora_alpha: int = _opt(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: str = _opt("all-linear", "Modules to adapt: 'all-linear' (every linear layer but the output "
                                    "head) or a comma-separated list of module names (q_proj,v_proj).")

    def peft_config(self):
        """The ``peft.LoraConfig`` of these arguments, or None without ``use_peft``."""
        if not self.use_peft:
            return None
        from peft import LoraConfig

        if self.lora_r < 1:
            raise ValueError(f"option 'lora_r' must be >= 1 with use_peft, got {self.lora_r}")
        targets: Any = self.lora_target_modules
        if targets != "all-linear":
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        return LoraConfig(task_type="CAUSAL_LM", r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout, target_modules=targets)


@dataclass
class DataArguments:
    """The data of a training run (names of TRL's ``ScriptArguments``)."""

    dataset_name: str | None = _opt(None, "Training rows: a .jsonl/.json/.parquet file of {prompt, completion, reward} "
                                    "or {messages, rewards} rows, or a hub dataset name (needs the network). Required.")
    dataset_config: str | None = _opt(None, "Configuration name of a hub dataset.")
    dataset_train_split: str = _opt("train", "Split to train on.")
    dataset_test_split: str = _opt("test", "Split to evaluate on when eval_dataset_name names a hub dataset.")
    eval_dataset_name: str | None = _opt(None, "Evaluation rows (file or hub dataset) for eval_strategy != 'no'.")
    data_format: str | None = _opt(None, "Adapter applied to the rows first (shiq_llm.data.adapters.ADAPTERS: paired, "
                                   "ultrafeedback, hh, bfcl, stepwise); none when the rows are already canonical.")
    data_format_options: list[str] | None = _opt(None, "Options of the data_format adapter (its keyword arguments), "
                                                 "for the training and the evaluation rows: KEY=VALUE items, values "
                                                 "read as JSON when they parse (--data_format_options "
                                                 "score=fine-grained_score: which UltraFeedback score is the reward), "
                                                 "or one JSON object; in YAML a mapping {score: fine-grained_score}.",
                                                 key_values=True)
    eval_leak: str = _opt("error", "When prompts of eval_dataset_name also occur in the training rows (whitespace "
                          "runs collapsed): 'error' refuses the run naming the counts and an example, 'warn' logs "
                          "them and trains.", choices=LEAK_POLICIES)

    def __post_init__(self):
        if self.eval_leak not in LEAK_POLICIES:
            raise ValueError(f"option 'eval_leak' must be one of {list(LEAK_POLICIES)}, got {self.eval_leak!r}")
        if isinstance(self.data_format_options, (str, dict)):  # one item, or a mapping given from Python
            self.data_format_options = [self.data_format_options if isinstance(self.data_format_options, str)
                                        else json.dumps(self.data_format_options)]
        options = self.format_options()
        if options and self.data_format is None:
            raise ValueError(f"option 'data_format_options' ({options}) needs a data_format")

    def format_options(self) -> dict[str, Any]:
        """The adapter's keyword arguments of ``data_format_options`` (``shiq_llm.data.prompts.parse_format_options``);
        ValueError naming an item that is neither KEY=VALUE nor a JSON object."""
        return parse_format_options(self.data_format_options, option="option 'data_format_options'")


TRAIN_ARGUMENT_CLASSES = (ModelArguments, DataArguments, ShiQConfig)

#: Short names of the training options, as the other commands spell them (``--model``, ``--data``, ``--out``,
#: ``--lr``, ``--batch_size``, ``--format``, ``--format_option``, ``--algo`` as in the sweep's ``algos``; both spellings).
TRAIN_ALIASES = {"model_name_or_path": ("model",), "dataset_name": ("data",), "output_dir": ("out",),
                 "learning_rate": ("lr",), "per_device_train_batch_size": ("batch_size",),
                 "data_format_options": ("format_option",), "data_format": ("format",), "loss_type": ("algo",)}


def train_command(run=None, check=None, *, name: str = "train", extra: tuple = (), **kwargs):
    """The ``shiq_toy.options.Command`` of a training script over (ModelArguments, DataArguments, ShiQConfig, *extra)."""
    from shiq_toy.options import Command

    return Command(name, (*TRAIN_ARGUMENT_CLASSES, *extra), run or (lambda *args: 0), check=check,
                   aliases=TRAIN_ALIASES, **kwargs)


def parse_train_args(argv: Sequence[str] | None = None):
    """(ModelArguments, DataArguments, ShiQConfig) from ``--config`` YAML, then the command line
    (``shiq_toy.options.resolve_options``: the one parser of every command).

    ValueError naming an unknown key (file or command line) or a bad value. YAML values are checked against the
    fields' types (``1e-5`` is read as a number, ``ten`` for an integer is an error naming the key and the file).
    """
    from shiq_toy.options import resolve_options

    argv = list(sys.argv[1:] if argv is None else argv)
    return tuple(resolve_options(train_command(), argv, prog="shiq-llm train"))
