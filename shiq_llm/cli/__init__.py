"""``shiq-llm``: train causal LMs with ShiQ (and baselines) from the command line.

    shiq-llm train --dataset_name rows.jsonl --model_name_or_path tiny-llama --output_dir runs/tiny   # --help
    shiq-llm train --config configs/shiq_tiny.yaml --beta 0.5               # YAML + overrides (TRL's style)
    shiq-llm cache-ref --config configs/shiq_tiny.yaml [--verify]           # reference statistics only
    accelerate launch -m shiq_llm.cli train --config configs/shiq_llama_lora.yaml   # several GPUs, FSDP, …

Every command is a dataclass of options parsed by one mechanism, :mod:`shiq_toy.options` (a
``transformers.HfArgumentParser`` per command, as TRL's scripts): ``train`` and ``cache-ref`` over
``ModelArguments``, ``DataArguments`` and ``ShiQConfig`` (``shiq_llm.train.config``: every ``TrainingArguments``
option), the others over their job's config dataclass (``GenerateConfig``, ``ScoreConfig``, ``SweepConfig``,
``DemoConfig``, the experiments' arguments). Each accepts ``--config FILE.yaml`` (keys: option names, checked by
type), both spellings of every option and the TRL names of the shared options (``--model_name_or_path``,
``--dataset_name``, ``--output_dir``, ``--learning_rate``, ``--data_format``, ``--data_format_options``) beside the
short ones (``--model``, ``--data``, ``--out``, ``--lr``, ``--format``, ``--format-option``). Options, paths and
files are checked before any work: a bad one is one ``shiq-llm: error: …`` line, status 2; a ValueError of the
work itself (data, checkpoint, reference cache) one such line, status 1.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

from shiq_toy.options import Command, option, run_cli

__all__ = ["commands", "main"]

#: Modules that add commands (each has ``commands() -> dict[str, Command]``).
COMMAND_MODULES = ("shiq_llm.cli.tasks", "shiq_llm.cli.generate", "shiq_llm.cli.multiturn", "shiq_llm.cli.experiments")


@dataclass
class CacheRefFlags:
    """The option ``cache-ref`` adds to ``train``'s."""

    verify: bool = option(False, "only check the existing cache (error if it is missing or does not match); compute "
                          "nothing")


def _quiet_libraries(args) -> None:
    """``--disable_tqdm`` also silences the progress bars of transformers and datasets."""
    if args.disable_tqdm:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _run_train(model_args, data_args, args) -> int:
    from accelerate import PartialState

    from shiq_llm.train.run import train_run

    _quiet_libraries(args)
    result = train_run(model_args, data_args, args)
    if PartialState().is_main_process:
        print(f"trained {result.steps} steps; final model: {result.final_dir}; metrics: {result.metrics_file}")
    return 0


def _run_cache_ref(model_args, data_args, args, flags: CacheRefFlags) -> int:
    from shiq_llm.train.run import cache_reference

    _quiet_libraries(args)
    path = cache_reference(model_args, data_args, args, verify=flags.verify)
    print(f"reference cache {path} matches the model and data" if flags.verify else f"reference cache: {path}")
    return 0


def _check_train(model_args, data_args, args, *flags) -> None:
    from shiq_toy.options import check_path

    if not data_args.dataset_name:
        raise ValueError("missing option --dataset_name (a JSONL/JSON/parquet file or a hub dataset name)")
    check_path("data", data_args.dataset_name, "--dataset_name")
    check_path("data", data_args.eval_dataset_name, "--eval_dataset_name")
    check_path("out_dir", args.output_dir, "--output_dir")
    if args.ref_cache:
        check_path("out_dir", args.ref_cache, "--ref_cache")
    model_args.peft_config()


def _train_commands() -> dict[str, Command]:
    from shiq_llm.train.config import train_command

    return {
        "train": train_command(_run_train, _check_train,
                               help="train a model with ShiQTrainer (every TrainingArguments option; YAML with --config)",
                               description="Train a model with ShiQTrainer. Options given here override the --config "
                               "YAML file, which overrides the defaults shown. A short run: --max_steps N."),
        "cache-ref": train_command(_run_cache_ref, _check_train, name="cache-ref", extra=(CacheRefFlags,),
                                   help="compute (or --verify) the reference statistics cache only, with train's "
                                   "options"),
    }


@functools.cache
def commands() -> dict[str, Command]:
    """Every ``shiq-llm`` command, by name (``experiment multiturn``: a group and its member)."""
    table = _train_commands()
    for name in COMMAND_MODULES:
        table.update(importlib.import_module(name).commands())
    return table


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shiq-llm``; returns the exit status (2: bad options, 1: the work failed)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli("shiq-llm", commands(), argv, runtime_status=1, runtime_errors=(ValueError, FileNotFoundError),
                   description="Train causal LMs with ShiQ, DPO, IPO, CoPG or DRO on reward-labelled rows "
                   "{prompt, completion, reward}.")

