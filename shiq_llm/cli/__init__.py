"""``shiq-llm``: train causal LMs with ShiQ (and baselines) from the command line.

    shiq-llm train --dataset_name rows.jsonl --model_name_or_path tiny-llama --output_dir runs/tiny   # --help
    shiq-llm train --config configs/shiq_tiny.yaml --beta 0.5               # YAML + overrides (TRL's style)
    shiq-llm cache-ref --config configs/shiq_tiny.yaml [--verify]           # reference statistics only
    accelerate launch -m shiq_llm.cli train --config configs/shiq_llama_lora.yaml   # several GPUs, FSDP, …

``train`` and ``cache-ref`` are parsed by ``transformers.HfArgumentParser`` over ``ModelArguments``,
``DataArguments`` and ``ShiQConfig`` (``shiq_llm.train.config``): every ``TrainingArguments`` option, both
``--learning_rate`` and ``--learning-rate`` spellings, a YAML ``--config``. Other subcommands come from
``shiq_llm.cli.tasks``. Bad input (a ValueError from the data, the options, a checkpoint or the reference cache)
is printed as one ``shiq-llm: error: …`` line and exits with status 1; a bad command line exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["build_parser", "main"]

#: Subcommands parsed by HfArgumentParser (``shiq_llm.train.config.train_parser``).
HF_COMMANDS = {
    "train": "train a model with ShiQTrainer (every TrainingArguments option; YAML with --config)",
    "cache-ref": "compute (or --verify) the reference statistics cache only, with train's options",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shiq-llm", description="Train causal LMs with ShiQ, DPO, IPO, CoPG or DRO on "
                                     "reward-labelled rows {prompt, completion, reward}.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in HF_COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        cli_tasks = importlib.import_module("shiq_llm.cli.tasks")
    except ModuleNotFoundError as error:
        if error.name != "shiq_llm.cli.tasks":  # a missing dependency *inside* cli_tasks is a real error
            raise
    else:
        cli_tasks.register(subparsers)
    importlib.import_module("shiq_llm.cli.multiturn").register(subparsers)
    importlib.import_module("shiq_llm.cli.generate").register(subparsers)
    importlib.import_module("shiq_llm.cli.experiments").register(subparsers)
    return parser


def hf_parser(command: str):
    """The HfArgumentParser of ``train`` / ``cache-ref``."""
    from shiq_llm.train.config import train_parser

    parser = train_parser(prog=f"shiq-llm {command}", description=HF_COMMANDS[command] + ". Options given here override "
                          "the --config YAML file, which overrides the defaults shown.")
    if command == "cache-ref":
        parser.add_argument("--verify", action="store_true", help="only check the existing cache (error if it is "
                            "missing or does not match); compute nothing")
    return parser


def _quiet_libraries(args) -> None:
    """``--disable_tqdm`` also silences the progress bars of transformers and datasets."""
    if args.disable_tqdm:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _run_train(argv: list[str]) -> int:
    from accelerate import PartialState

    from shiq_llm.train.config import parse_train_args
    from shiq_llm.train.run import train_run

    model_args, data_args, args = parse_train_args(argv, parser=hf_parser("train"))
    _quiet_libraries(args)
    result = train_run(model_args, data_args, args)
    if PartialState().is_main_process:
        print(f"trained {result.steps} steps; final model: {result.final_dir}; metrics: {result.metrics_file}")
    return 0


def _run_cache_ref(argv: list[str]) -> int:
    from shiq_llm.train.config import parse_train_args
    from shiq_llm.train.run import cache_reference

    parser = hf_parser("cache-ref")
    verify = "--verify" in argv
    model_args, data_args, args = parse_train_args([a for a in argv if a != "--verify"], parser=parser)
    _quiet_libraries(args)
    path = cache_reference(model_args, data_args, args, verify=verify)
    print(f"reference cache {path} matches the model and data" if verify else f"reference cache: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shiq-llm``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] in HF_COMMANDS:
            if "-h" in argv[1:] or "--help" in argv[1:]:
                hf_parser(argv[0]).print_help()
                return 0
            return _run_train(argv[1:]) if argv[0] == "train" else _run_cache_ref(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"shiq-llm: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
