"""``shiq-llm``: train causal LMs with ShiQ (and baselines) from the command line.

    shiq-llm train --data rows.jsonl --model tiny-llama --out runs/tiny        # every option: --help
    shiq-llm train --config configs/shiq_tiny.yaml --beta 0.5                  # YAML + overrides
    shiq-llm cache-ref --config configs/shiq_tiny.yaml                        # reference statistics only
    accelerate launch -m shiq_llm.cli train --config configs/shiq_llama_lora.yaml   # several GPUs

Subcommands ``demo``, ``make-data`` and ``evaluate`` come from ``shiq_llm.cli_tasks`` when it is installed.
Bad input (a ValueError from the data, the config, a checkpoint or the reference cache) is printed as one
``shiq-llm: error: …`` line and exits with status 1; a bad command line exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from shiq_llm.config import TrainConfig, add_config_arguments, config_from_namespace

__all__ = ["build_parser", "main", "cache_reference"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shiq-llm", description="Train causal LMs with ShiQ, DPO, CoPG or DRO on "
                                     "reward-labelled rows {prompt, completion, reward}.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = subparsers.add_parser("train", help="train a model (every option also reads from --config YAML)",
                                  description="Train a causal LM on rows {prompt, completion, reward}. Options "
                                  "given here override the --config YAML file, which overrides the defaults shown.", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(train)
    train.set_defaults(handler=_run_train)
    cache = subparsers.add_parser("cache-ref", help="compute (or verify) the reference statistics cache only",
                                  description="Compute the reference model's statistics on the tokenised data and "
                                  "store them in the cache (OUT/reference or --ref-cache), or check an existing one.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(cache)
    cache.add_argument("--verify", action="store_true", help="only check the existing cache (error if it is missing "
                       "or does not match); compute nothing")
    cache.set_defaults(handler=_run_cache_ref)
    try:
        cli_tasks = importlib.import_module("shiq_llm.cli_tasks")
    except ModuleNotFoundError as error:
        if error.name != "shiq_llm.cli_tasks":  # a missing dependency *inside* cli_tasks is a real error
            raise
    else:
        cli_tasks.register(subparsers)
    importlib.import_module("shiq_llm.cli_generate").register(subparsers)
    return parser


def _quiet_libraries(config: TrainConfig) -> None:
    """``--no-progress-bar`` also silences the progress bars of transformers and datasets."""
    if not config.progress_bar:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _run_train(args: argparse.Namespace) -> int:
    from shiq_llm.trainer import train

    config = config_from_namespace(args)
    _quiet_libraries(config)
    result = train(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"trained {result.steps} steps; final model: {result.final_dir}; metrics: {result.metrics_file}")
    return 0


def cache_reference(config: TrainConfig, *, verify: bool = False) -> Path:
    """Compute (or, with ``verify``, only check) the reference cache of ``config``; returns its directory."""
    from accelerate import Accelerator

    from shiq_llm.models import check_tokenizer_fits_model
    from shiq_llm.reference import expected_manifest, load_reference_cache, reference_cache
    from shiq_llm.loading import load_examples, load_model_and_tokenizer

    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(config.ref_cache) if config.ref_cache else out / "reference"
    tokenizer, model = load_model_and_tokenizer(config, out=out)
    check_tokenizer_fits_model(tokenizer, model)
    examples, _, _ = load_examples(config, tokenizer)
    settings = {"precision": config.precision}
    if verify:
        if not path.exists():
            raise ValueError(f"reference cache {path} does not exist")
        expected = expected_manifest(model, examples, settings=settings)
        load_reference_cache(path, expected, need_prompt_state=config.algo == "dro")
        print(f"reference cache {path} matches the model and data")
        return path
    accelerator = Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no")  # as in training
    reference_cache(path, model.to(accelerator.device), examples, settings=settings, recompute=config.recompute_ref,
                    need_prompt_state=config.algo == "dro", log=print, pad_token_id=tokenizer.pad_token_id,
                    batch_size=config.ref_batch_size or 2 * config.batch_size, padding_side=config.padding_side,
                    chunk_size=config.chunk_size, autocast=accelerator.autocast, progress=config.progress_bar)
    return path


def _run_cache_ref(args: argparse.Namespace) -> int:
    config = config_from_namespace(args)
    _quiet_libraries(config)
    path = cache_reference(config, verify=args.verify)
    print(f"reference cache: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shiq-llm``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"shiq-llm: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
