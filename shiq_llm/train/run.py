"""A training run from its arguments, as ``shiq-llm train`` does it: ``train_run(model_args, data_args, args)``.

    model_args, data_args, args = parse_train_args(["--config", "configs/shiq_tiny.yaml"])
    result = train_run(model_args, data_args, args)      # -> TrainResult(final_dir, metrics_file, steps, …)

In order: refuse an ``output_dir`` that holds an earlier run unless resuming (``resume_from_checkpoint``) or
``overwrite_output_dir``; load the tokenizer and model (:mod:`shiq_llm.train.loading`; ``tiny-llama`` /
``tiny-gpt2`` are built in ``OUTPUT_DIR/base_model``); load the rows (and the evaluation rows, whose prompts must not occur in the training rows:
``eval_leak``); build a
:class:`~shiq_llm.train.trainer.ShiQTrainer` (which tokenises, pairs and caches the reference statistics); train
(resuming from the newest verified checkpoint when asked); write the final model to ``OUTPUT_DIR/final``
atomically. A run whose last checkpoint is at ``max_steps`` but whose final model is missing (killed while
writing it) completes the final save when resumed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from shiq_llm.train.config import TINY_MODELS, DataArguments, ModelArguments, ShiQConfig

__all__ = ["TrainResult", "train_run", "cache_reference", "check_eval_rows_held_out", "RUN_OUTPUTS"]

logger = logging.getLogger(__name__)

#: What a run writes in its output directory (an earlier run is recognised by these).
RUN_OUTPUTS = ("metrics.jsonl", "final", "reference")


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and its last logged training metrics."""

    out_dir: Path
    final_dir: Path
    metrics_file: Path
    steps: int
    final_metrics: dict


def _earlier_run(out: Path) -> list[str]:
    from shiq_llm.train.checkpoint import list_checkpoints

    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    return found + [p.name for p in list_checkpoints(out)]


def _prepare_output_dir(out: Path, model_args: ModelArguments, args: ShiQConfig, resuming: bool) -> None:
    """Refuse an output directory that holds an earlier run unless resuming; with ``overwrite_output_dir``
    clear that run first."""
    earlier = _earlier_run(out)
    if earlier and not resuming:
        if not args.overwrite_output_dir:
            raise ValueError(f"output directory {out} holds an earlier run ({', '.join(earlier[:4])}): pass "
                             "--resume_from_checkpoint true to continue it, --overwrite_output_dir to start afresh "
                             "(deletes it), or another --output_dir")
        for name in earlier:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if model_args.model_name_or_path in TINY_MODELS:
            shutil.rmtree(out / "base_model", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_run_args(path: Path, model_args, data_args, args) -> None:
    """Every option of the run as one YAML file that ``shiq-llm train --config`` reads back; the paths of local
    files and directories (model, data, output, reference cache) resolved to absolute ones, so that
    ``shiq-llm evaluate`` finds the training data of the run from any directory."""
    import dataclasses

    import yaml

    values = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args)}
    defaults = ShiQConfig(output_dir=args.output_dir).to_dict()
    init = {f.name for f in dataclasses.fields(ShiQConfig) if f.init}
    for name, value in args.to_dict().items():
        if name in init and value != defaults.get(name) and isinstance(value, (str, int, float, bool, type(None))):
            values[name] = value
    values["output_dir"] = args.output_dir
    for name in ("model_name_or_path", "tokenizer_name_or_path", "dataset_name", "eval_dataset_name", "output_dir",
                 "ref_cache"):  # local paths resolved: the file is read back from any directory
        value = values.get(name)
        if isinstance(value, str) and value and Path(value).exists():
            values[name] = str(Path(value).resolve())
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def check_eval_rows_held_out(eval_rows, train_rows, *, on_leak: str = "error") -> int:
    """Count the distinct prompts of ``eval_rows`` that also occur in ``train_rows``
    (``shiq_llm.data.prompts.check_held_out``): ValueError with the counts and an example when any does and
    ``on_leak == "error"``, a warning with them when ``"warn"``. Returns the count."""
    from shiq_llm.data.prompts import check_held_out, distinct_prompts

    return check_held_out(distinct_prompts(eval_rows, where="eval_dataset_name: "), distinct_prompts(train_rows),
                          on_leak=on_leak, where="evaluation (eval_dataset_name)",
                          advice="evaluate on held-out rows (another eval_dataset_name or dataset_test_split), or "
                                 "pass --eval_leak warn")


def train_run(model_args: ModelArguments, data_args: DataArguments, args: ShiQConfig, *, callbacks=None,
              train_dataset=None, print_logs: bool = True) -> TrainResult:
    """Train as ``shiq-llm train`` does (module docstring); returns where the outputs are.

    ``callbacks``: more ``TrainerCallback``s. ``train_dataset``: rows, or examples already tokenised with this
    model's tokenizer and ``args``' length options (``shiq_llm.data.tokenize_rows``), to train on instead of
    loading ``data_args.dataset_name`` (a sweep tokenises its rows once for all its runs).
    ``print_logs=False``: no log dict printed per logging step when ``disable_tqdm`` is set (they still go to
    ``metrics.jsonl`` and the trackers)."""
    from accelerate import PartialState

    from shiq_llm.data import load_rows
    from shiq_llm.train.loading import load_model_and_tokenizer
    from shiq_llm.train.trainer import ShiQTrainer

    if not data_args.dataset_name and train_dataset is None:
        raise ValueError("option 'dataset_name' is required (a JSONL/JSON/parquet file or a hub dataset name)")
    state = PartialState()
    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    resuming = resume not in (None, "", False, "false", "False")
    if state.is_main_process:
        _prepare_output_dir(out, model_args, args, resuming)
    state.wait_for_everyone()
    tokenizer, model = load_model_and_tokenizer(model_args, out=out, seed=args.seed, main_process=state.is_main_process,
                                                barrier=state.wait_for_everyone)
    split_options = {"split": data_args.dataset_train_split, "format": data_args.data_format,
                     "format_options": data_args.format_options() or None}
    if data_args.dataset_config:
        split_options["name"] = data_args.dataset_config
    rows = train_dataset if train_dataset is not None else load_rows(data_args.dataset_name, **split_options)
    eval_rows = None
    if data_args.eval_dataset_name:
        eval_options = {**split_options, "split": data_args.dataset_test_split}
        if Path(data_args.eval_dataset_name).suffix in (".jsonl", ".json", ".parquet"):
            eval_options["split"] = "train"
        eval_rows = load_rows(data_args.eval_dataset_name, **eval_options)
        check_eval_rows_held_out(eval_rows, rows, on_leak=data_args.eval_leak)
    if state.is_main_process:
        _write_run_args(out / "run_args.yaml", model_args, data_args, args)
    trainer = ShiQTrainer(model, args, train_dataset=rows, eval_dataset=eval_rows, processing_class=tokenizer,
                          peft_config=model_args.peft_config(), callbacks=callbacks)
    if not print_logs:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=True if resuming and resume in (True, "true", "True", "latest") else
                           (resume if resuming else None))
    final = trainer.save_final(out / "final")
    if args.push_to_hub:
        trainer.push_to_hub()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return TrainResult(out_dir=out, final_dir=final, metrics_file=out / "metrics.jsonl",
                       steps=result.global_step, final_metrics=logs[-1] if logs else {})


def cache_reference(model_args, data_args, args, *, verify: bool = False) -> Path:
    """Compute (or, with ``verify``, only check) the reference cache of a training run; returns its directory."""
    from shiq_llm.core.models import check_tokenizer_fits_model
    from shiq_llm.core.reference import expected_manifest, load_reference_cache
    from shiq_llm.data import load_rows, tokenize_rows
    from shiq_llm.train.loading import load_model_and_tokenizer
    from shiq_llm.train.trainer import ShiQTrainer
    from shiq_toy.methods import METHODS

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.ref_cache) if args.ref_cache else out / "reference"
    if not data_args.dataset_name:
        raise ValueError("option 'dataset_name' is required (a JSONL/JSON/parquet file or a hub dataset name)")
    from accelerate import PartialState

    state = PartialState()
    tokenizer, model = load_model_and_tokenizer(model_args, out=out, seed=args.seed, main_process=state.is_main_process,
                                                barrier=state.wait_for_everyone)
    check_tokenizer_fits_model(tokenizer, model)
    extra = {"name": data_args.dataset_config} if data_args.dataset_config else {}
    rows = load_rows(data_args.dataset_name, format=data_args.data_format, split=data_args.dataset_train_split,
                     format_options=data_args.format_options() or None, **extra)
    if verify:
        if not path.exists():
            raise ValueError(f"reference cache {path} does not exist")
        examples, _ = tokenize_rows(rows, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                    long_response=args.long_response, num_proc=args.dataset_num_proc)
        expected = expected_manifest(model, examples, settings={"precision": args.precision})
        load_reference_cache(path, expected, need_prompt_state=METHODS[args.loss_type].needs_value)
        return path
    ShiQTrainer(model, args, train_dataset=rows, processing_class=tokenizer)  # computes (or reuses) the cache
    return path
