"""``shiq-llm make-data``, ``evaluate``, ``demo`` and ``sweep``: the embedded task and the reward-vs-KL experiment.

    shiq-llm make-data --out data/                    # tiny reference + offline rows (shiq_llm.tasks.synthetic)
    shiq-llm evaluate --model runs/shiq/final --ref data/reference --prompts synthetic
    shiq-llm sweep --config SWEEP.yaml                 # methods × β × seeds: train, evaluate, results.csv, figure
    shiq-llm demo --out demo/                          # make-data, then the sweep of the embedded task

The demo is spec §5's LLM-scale experiment on the embedded task: it builds the reference and the offline data
(:func:`shiq_llm.tasks.synthetic.make_data`) and runs the sweep ``shiq_llm/experiments/embedded_sweep.yaml``
(:mod:`shiq_llm.experiments.sweep`: every ``(algo, β)`` trained with ``ShiQTrainer``, evaluated on the held-out
prompts, ``results.csv`` and ``reward_vs_kl.png``). :func:`commands` gives them to ``shiq-llm`` (``shiq_llm.cli``);
each is a dataclass of options (``shiq_toy.options``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiq_llm.core.models import INFERENCE_DTYPES
from shiq_llm.core.stats import DEFAULT_CHUNK_SIZE
from shiq_llm.data.prompts import LEAK_POLICIES, load_prompts
from shiq_llm.experiments.demo import DemoConfig, quiet_libraries, run_demo
from shiq_llm.generation.generate import BACKENDS
from shiq_llm.storage.atomic import atomic_write
from shiq_llm.storage.jsonl import read_jsonl
from shiq_llm.tasks.synthetic import ReferenceConfig, check_answer_budget
from shiq_toy.experiments import num_threads
from shiq_toy.options import Command, check_path, option

__all__ = ["commands", "MakeDataArgs", "EvaluateArgs", "SweepFlags", "check_reward_options", "default_reward",
           "write_report", "check_data_dir"]

_REF = ReferenceConfig()


@dataclass
class MakeDataArgs:
    """Options of ``shiq-llm make-data``."""

    out: str = option(help="output directory: reference/, train.jsonl, eval_prompts.jsonl", aliases=("output_dir",),
                      path="out_dir")
    completions_per_prompt: int = option(16, "completions sampled per training prompt")
    max_new_tokens: int = option(12, "generation budget per completion")
    noise: float = option(_REF.noise, "probability that a word of the reference's demonstrations is a random number")
    ref_steps: int = option(_REF.steps, "supervised steps of the reference (a short run: --ref_steps 20)")
    words: int = option(_REF.words, "words per answer: 4 is the task, more its long-horizon variant (prompts 'count "
                        "up from 7 for 32:'; give --max_new_tokens > words and, for 32, --vocab_size 448)")
    vocab_size: int = option(_REF.vocab_size, "vocabulary of the task's byte-level BPE tokenizer")
    dense: bool = option(False, "write train.jsonl as stepwise rows {prompt, completions, rewards} with the reward on "
                         "every word (the dense variant; the same total reward)")
    seed: int = option(0, "seed of the reference and the samples")
    threads: int = option(1, "torch CPU threads (1 is fastest for this tiny model)")
    progress: bool = option(True, "show progress bars (--no-progress: hide them)")


@dataclass
class EvaluateArgs:
    """Options of ``shiq-llm evaluate``."""

    model: str = option(help="the policy: a directory saved with save_pretrained (e.g. a run's OUT/final) or a hub "
                        "name; its tokenizer is used for both models", aliases=("model_name_or_path",), path="in_path")
    ref: str = option(help="the reference model (same vocabulary)", path="in_path")
    prompts: str = option("synthetic", "'synthetic' (the embedded task's prompts), a .txt file (one prompt per line), "
                          "a .jsonl/.json/.parquet file or a hub dataset of rows with a prompt field", path="data")
    split: str | None = option(None, "split of the prompts: for 'synthetic' train, eval or all (default eval, the "
                               "held-out prompts); for a hub dataset its split name (default test)")
    prompt_field: str | None = option(None, "field of the rows holding the prompt (default 'prompt', else the "
                                      "messages before the first assistant message of 'messages')")
    format: str | None = option(None, "adapter applied to the prompt rows first (shiq_llm.data.adapters: paired, "
                                "ultrafeedback, hh, bfcl, stepwise)", aliases=("data_format",))
    format_options: dict[str, Any] = option(default_factory=dict, help="options of the --format adapter: KEY=VALUE "
                                            "items (repeatable), e.g. score=fine-grained_score",
                                            aliases=("format_option", "data_format_options"))
    reward: str | None = option(None, "reward function: 'synthetic', 'module:function' or 'path/file.py:function' (per "
                                "row f(prompt, completion) -> float, or batched with f.batched = True) or 'none'; "
                                "default: 'synthetic' for --prompts synthetic, else 'none' (only the KL is reported)")
    reward_model: str | None = option(None, "a sequence-classification reward model (hub name or path, one label) "
                                      "instead of --reward", metavar="RM")
    reward_batch_size: int = option(16, "texts per forward pass of --reward-model")
    num_samples: int = option(16, "completions sampled per prompt")
    max_new_tokens: int = option(16, "generation budget per completion")
    batch_size: int = option(64, "sequences per generation (hf) and KL batch")
    chunk_size: int = option(DEFAULT_CHUNK_SIZE, "response tokens projected onto the vocabulary at once in the exact KL")
    seed: int = option(0, "sampling seed")
    backend: str = option("auto", "sampler: hf (transformers), vllm (pip install 'shiq[vllm]'), or auto (vllm on a GPU "
                          "when installed); the KL always uses transformers", choices=BACKENDS)
    device: str = option("auto", "torch device of both models and the reward model (auto: cuda when available, else cpu)")
    dtype: str = option("auto", "weights dtype (auto: bfloat16 on a GPU that supports it, else float32); the KL's "
                        "log-softmax runs in float32", choices=INFERENCE_DTYPES)
    gpu_memory_utilization: float = option(0.5, "vllm backend: fraction of the GPU memory vLLM may take (the two "
                                           "models need the rest)")
    train_data: str = option("auto", "training rows (same forms as --prompts) whose prompts the evaluation prompts must "
                             "not include; 'auto': the training data in the run_args.yaml of the run whose OUT/final "
                             "is --model (refused when it cannot be found); 'none': skip the check", path="data")
    train_split: str = option("train", "split of --train-data")
    train_format: str | None = option(None, "adapter of --train-data (as --format)")
    train_format_options: dict[str, Any] = option(default_factory=dict, help="options of the --train-format adapter "
                                                  "(KEY=VALUE, repeatable)", aliases=("train_format_option",))
    leak: str = option("error", "what to do when evaluation prompts occur in the training data: stop with an error, or "
                       "warn with the counts", choices=LEAK_POLICIES)
    out: str | None = option(None, "also write the JSON report to this file (default: print only)",
                             aliases=("output_dir",), path="out_file")
    overwrite: bool = option(False, "replace an existing --out report")


@dataclass
class SweepFlags:
    """Options of ``shiq-llm sweep`` beside the sweep file's keys."""

    threads: int = option(1, "torch CPU threads (1 is fastest for tiny models)")
    progress: bool = option(True, "show progress bars (--no-progress: hide them)")


def default_reward(args) -> str:
    """``--reward`` of evaluate: the given one, else 'synthetic' for the synthetic prompts, else 'none'."""
    if args.reward is not None or args.reward_model is not None:
        return args.reward if args.reward is not None else "none"
    return "synthetic" if args.prompts == "synthetic" else "none"


def check_reward_options(reward: str | None, reward_model: str | None, *, need_one: bool = False) -> None:
    """One reward source that can be found: ``--reward`` resolved now (``module:function`` or
    ``path/file.py:function``), ``--reward-model`` read from its config (a sequence-classification model)."""
    from shiq_llm.generation.rewards import check_reward_model, load_reward_fn

    if reward not in (None, "none") and reward_model is not None:
        raise ValueError("give either --reward or --reward-model, not both")
    if need_one and reward is None and reward_model is None:
        raise ValueError("give --reward module:function or --reward-model RM")
    if reward is not None:
        load_reward_fn(reward)
    if reward_model is not None:
        check_reward_model(reward_model)


def write_report(path: str | Path, text: str) -> None:
    """Write a JSON report atomically (a crash leaves the earlier file, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(text + "\n")


def check_data_dir(path: str, flag: str, form: str, *, needs=("reference", "train.jsonl", "eval_prompts.jsonl"),
                   command: str) -> None:
    """A task's data folder given with ``flag``: its files present, its rows of the ``form`` expected
    ('single': {prompt, completion, reward}; 'multi': {messages, rewards}); ValueError naming the flag."""
    if not path:
        return
    expected = {"single": "single-turn rows {prompt, completion, reward} (shiq-llm make-data)",
                "multi": "multi-turn rows {messages, rewards} (shiq-llm make-multiturn-data)"}
    for name in needs:
        if not (Path(path) / name).exists():
            raise ValueError(f"{flag} {path}: missing {name} (make it with `{command} --out {path}`)")
    check_path("rows", Path(path) / "train.jsonl", flag)
    rows = read_jsonl(Path(path) / "train.jsonl", what=flag)
    for i, row in enumerate(rows[:100]):
        multi = "messages" in row and "rewards" in row
        single = "prompt" in row and "completion" in row and "reward" in row
        if (form == "multi" and not multi) or (form == "single" and not single):
            raise ValueError(f"{flag} {path}: train.jsonl row {i} has the keys {sorted(row)}; {flag} expects "
                             f"{expected[form]}")


# --------------------------------------------------------------------------------------------------
# Command-line handlers
# --------------------------------------------------------------------------------------------------


def _check_make_data(args: MakeDataArgs) -> None:
    for name in ("completions_per_prompt", "max_new_tokens", "ref_steps", "threads", "words", "vocab_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"option --{name} must be >= 1, got {getattr(args, name)}")
    try:
        check_answer_budget(args.words, args.max_new_tokens)
    except ValueError as error:
        raise ValueError(f"option --{error}") from None
    if not 0.0 <= args.noise <= 1.0:
        raise ValueError(f"option --noise must lie in [0, 1], got {args.noise}")


def _make_data(args: MakeDataArgs) -> int:
    from shiq_llm.tasks import synthetic

    reference = synthetic.ReferenceConfig(noise=args.noise, steps=args.ref_steps, seed=args.seed, words=args.words,
                                          vocab_size=args.vocab_size)
    with num_threads(args.threads):
        paths = synthetic.make_data(args.out, reference=reference, completions_per_prompt=args.completions_per_prompt,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress,
                                    dense=args.dense)
    rows = read_jsonl(paths["train"])
    total = synthetic.mean_reward([{"reward": sum(r["rewards"])} if args.dense else r for r in rows])
    print(f"reference model: {paths['reference']}")
    print(f"offline rows: {paths['train']} ({len(rows)} {'stepwise ' * args.dense}rows, mean reward {total:.3f})")
    print(f"held-out prompts: {paths['eval_prompts']}")
    print(f"next: shiq-llm train --model_name_or_path {paths['reference']} --dataset_name {paths['train']} "
          "--output_dir runs/shiq --max_steps 150 --learning_rate 1e-3 --per_device_train_batch_size 32")
    return 0


def _training_prompts(args: "EvaluateArgs", model: str) -> tuple[list | None, str]:
    """The training prompts the evaluation prompts are checked against, and where they came from.

    ``--train-data none``: no check (the report says so). ``auto`` (default): the training data of the
    ``run_args.yaml`` that ``shiq-llm train`` wrote in its output directory (``RUN/final`` → ``RUN/run_args.yaml``:
    ``dataset_name`` — an absolute path for a local file —, ``dataset_train_split``, ``data_format``,
    ``data_format_options``). A run whose training data cannot be found from here is refused (ValueError naming
    ``--train-data`` and ``--train-data none``), never evaluated unchecked; a model with no ``run_args.yaml``
    (not a ``shiq-llm train`` run, e.g. the reference) is reported as not checked.
    """
    import yaml

    from shiq_llm.data.prompts import parse_format_options

    source, split, data_format = args.train_data, args.train_split, args.train_format
    options = args.train_format_options
    if source == "none":
        return None, "not checked (--train-data none)"
    if source == "auto":
        configs = [Path(model) / "run_args.yaml", Path(model).parent / "run_args.yaml"]
        config = next((c for c in configs if c.is_file()), None)
        values = yaml.safe_load(config.read_text()) if config is not None else None
        if config is None:
            return None, "not checked (no run_args.yaml next to --model: not a shiq-llm train run; give --train-data)"
        data = values.get("dataset_name") if isinstance(values, dict) else None
        if not isinstance(data, str) or not data:
            raise ValueError(f"--train-data auto: {config} names no training data (dataset_name); give --train-data "
                             "PATH, or --train-data none to skip the held-out check")
        source, data_format = data, values.get("data_format")
        split = values.get("dataset_train_split") or split
        options = parse_format_options(values.get("data_format_options"), option=f"{config}: data_format_options")
        try:
            train = load_prompts(source, split=split, format=data_format, default_split="train",
                                 format_options=options or None)
        except (ValueError, OSError) as error:
            reason = re.sub(r"^--prompts [^:]*: ", "", str(error).splitlines()[0]) if str(error) else type(error).__name__
            raise ValueError(f"--train-data auto: the training data {source!r} of the run ({config}) cannot be read "
                             f"from {Path.cwd()} ({reason}); give --train-data PATH, or --train-data none to skip the "
                             "held-out check") from None
        return train, source
    train = load_prompts(source, split=split, format=data_format, default_split="train", format_options=options or None)
    return train, source


def _evaluate(args: "EvaluateArgs") -> int:
    from shiq_llm.core.models import (
        check_tokenizer_fits_model,
        load_causal_lm,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        resolve_model_source,
    )
    from shiq_llm.data.prompts import check_held_out
    from shiq_llm.generation.evaluate import evaluate_policy
    from shiq_llm.generation.generate import make_sampler, resolve_backend
    from shiq_llm.generation.rewards import load_reward

    args.reward = default_reward(args)
    prompts = load_prompts(args.prompts, split=args.split, prompt_field=args.prompt_field, format=args.format,
                           format_options=args.format_options or None, default_split=(
                               "eval" if args.prompts == "synthetic" else "test"))
    train_prompts, train_source = _training_prompts(args, args.model)
    leaked = None if train_prompts is None else check_held_out(prompts, train_prompts, on_leak=args.leak)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    backend = resolve_backend(args.backend, device)
    scorer = load_reward(args.reward, args.reward_model, device=device, dtype=args.dtype,
                         batch_size=args.reward_batch_size)
    for source in (args.model, args.ref):  # a bad model path is named as a model, before its tokenizer is read
        resolve_model_source(source)
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(args.model, device=device, dtype=dtype)
    ref = load_causal_lm(args.ref, device=device, dtype=dtype)
    for name, model in (("--model", policy), ("--ref", ref)):  # one tokenizer serves both
        try:
            check_tokenizer_fits_model(tokenizer, model)
        except ValueError as error:
            raise ValueError(f"{name} {getattr(args, name[2:])}: {error}") from None
    sampler = None
    if backend == "vllm":
        sampler = make_sampler("vllm", args.model, tokenizer, device=device, dtype=dtype, seed=args.seed,
                               gpu_memory_utilization=args.gpu_memory_utilization)
    metrics = evaluate_policy(policy, ref, tokenizer, prompts, reward_fn=scorer, num_samples=args.num_samples,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                              sampler=sampler, chunk_size=args.chunk_size)
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}  # JSON null
    report = {"model": args.model, "ref": args.ref, "prompts": args.prompts, "num_prompts": len(prompts),
              "reward": args.reward_model or args.reward, "backend": backend, "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "train_data": train_source, "leaked_prompts": leaked,
              **metrics}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        write_report(args.out, text)
    return 0


def _check_evaluate(args: EvaluateArgs) -> None:
    from shiq_llm.data.prompts import parse_format_options

    for name in ("num_samples", "max_new_tokens", "batch_size", "chunk_size", "reward_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"option --{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise ValueError(f"option --gpu_memory_utilization must lie in (0, 1], got {args.gpu_memory_utilization}")
    if args.train_format_options and args.train_format is None:
        raise ValueError("option --train-format-option needs a --train-format")
    parse_format_options(args.format_options)
    check_reward_options(args.reward, args.reward_model)


def _check_demo(config: DemoConfig) -> None:
    from shiq_llm.train.config import LLM_METHODS

    bad = [a for a in config.algos if a not in LLM_METHODS]
    if not config.algos or bad:
        raise ValueError(f"option --algos must be a non-empty list of {list(LLM_METHODS)}, got {list(config.algos)}")
    if not config.betas or not all(b > 0 and math.isfinite(b) for b in config.betas):
        raise ValueError(f"option --betas must be finite numbers > 0, got {list(config.betas)}")
    for name in ("steps", "batch_size", "completions_per_prompt", "ref_steps", "eval_samples", "max_new_tokens",
                 "threads"):
        if getattr(config, name) < 1:
            raise ValueError(f"option --{name} must be >= 1, got {getattr(config, name)}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError(f"option --lr must be a finite number > 0, got {config.lr}")
    check_data_dir(config.data, "--data", "single", command="shiq-llm make-data")


def _demo(config: DemoConfig) -> int:
    run_demo(config)
    return 0


def _check_sweep(config, flags: SweepFlags, *, source: str) -> None:
    import typing

    from shiq_llm.experiments.sweep import EVALUATION_KEYS, check_sweep_config
    from shiq_llm.train.config import ModelArguments, ShiQConfig
    from shiq_toy.options import coerce

    if flags.threads < 1:
        raise ValueError(f"option --threads must be >= 1, got {flags.threads}")
    for key, cls, values in [("train", ShiQConfig, config.train), ("model_options", ModelArguments, config.model_options)] + [
            (f"variants.{n}.train", ShiQConfig, (v or {}).get("train") or {}) for n, v in config.variants.items()
            if isinstance(v, dict)]:
        if not isinstance(values, dict):
            raise ValueError(f"{source}: key {key!r} must be a mapping (key: value), got {values!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"{source}: {key}.{name} is not an option of {cls.__name__} (see shiq-llm train --help)")
            coerce(value, hints[name], f"{source}: {key}.{name}", choices=known[name].metadata.get("choices"))
    kinds = {"num_samples": int, "max_new_tokens": int, "seed": int, "batch_size": int, "chunk_size": int,
             "reward_batch_size": int, "device": str, "dtype": str}
    for name, value in (config.evaluation or {}).items():
        if name in EVALUATION_KEYS:
            coerce(value, kinds.get(name, str), f"{source}: evaluation.{name}")
    check_sweep_config(config, source)
    check_reward_options(config.reward, config.reward_model)


def _sweep(config, flags: SweepFlags) -> int:
    from shiq_llm.experiments.sweep import run_sweep

    quiet_libraries()
    with num_threads(flags.threads):
        try:
            run_sweep(config, progress=flags.progress)
        except RuntimeError as error:  # some cells failed: every output is written, the failures named
            print(f"shiq-llm sweep: {error}")
            return 1
    return 0


def commands() -> dict[str, Command]:
    """``make-data``, ``evaluate``, ``demo`` and ``sweep``."""
    from shiq_llm.experiments.sweep import RESULT_COLUMNS, SweepConfig
    from shiq_llm.train.config import LLM_METHODS

    return {
        "make-data": Command(
            "make-data", (MakeDataArgs,), _make_data, check=_check_make_data,
            help="build the embedded task's reference model and offline rows",
            description="Build the embedded synthetic task (shiq_llm.tasks.synthetic, no download, CPU seconds): a "
            "tiny Llama pre-trained on noisy counting demonstrations, saved with its tokenizer to OUT/reference (load "
            "it with `shiq-llm train --model_name_or_path OUT/reference`); K completions per training prompt sampled "
            "from it and labelled with the task reward, in OUT/train.jsonl ({prompt, completion, reward}); the "
            "held-out prompts in OUT/eval_prompts.jsonl. A short run: --ref_steps 20."),
        "evaluate": Command(
            "evaluate", (EvaluateArgs,), _evaluate, check=_check_evaluate,
            help="mean reward and KL(π‖π_ref) of a policy on its own samples",
            description="Sample completions of each prompt from the policy (pure sampling: temperature 1, no "
            "top-k/top-p, so the samples are π's) and report their mean reward and KL(π‖π_ref), each with its "
            "standard error: exact per token from both models' next-token distributions (computed from hidden states "
            "in chunks of --chunk-size rows, never the (B, L, V) logits), summed over each sample, and the "
            "Monte-Carlo Σ_t ln π/π_ref (shiq_llm.generation.evaluate); also the mean length and the fraction of "
            "samples that ended with EOS. Before sampling, the evaluation prompts are checked against the training "
            "prompts (--train-data): any overlap is an error (or a warning with the counts, --leak warn). Prints "
            "JSON; --out writes it."),
        "demo": Command(
            "demo", (DemoConfig,), _demo, check=_check_demo, quick={"algos": ("shiq", "dpo"), "betas": (0.1,)},
            choices={"algos": LLM_METHODS},
            help="the LLM main job: reference, data, ShiQ and baselines over β, reward-vs-KL figure",
            description="Spec §5 on the embedded task, on the CPU in about 2 minutes: build the reference and "
            "offline data (as make-data), train each method at each β with the trainer's API, evaluate each policy "
            "on the held-out prompts (mean reward of its samples, exact KL to the reference) and write "
            "OUT/results.csv (columns " + ",".join(RESULT_COLUMNS) + ") and OUT/reward_vs_kl.png. It is the sweep "
            "of shiq_llm/experiments/embedded_sweep.yaml with these options."),
        "sweep": Command(
            "sweep", (SweepConfig, SweepFlags), _sweep, check=_check_sweep, check_source=True,
            choices={"algos": LLM_METHODS},
            help="train and evaluate a grid of methods × β × seeds; results.csv and the reward-vs-KL figure",
            description="Train every (algo, beta, seed) of a sweep file (--config, its keys are the options below) "
            "with ShiQTrainer (the reference statistics computed once and shared), evaluate each on the held-out "
            "prompts (mean reward of its samples, exact and Monte-Carlo KL to the reference), and write "
            "OUT/results.csv (columns " + ",".join(RESULT_COLUMNS) + ", plus the reference; with 'evaluator: "
            "dialogues' the multi-turn task's per-turn columns too), OUT/curves.csv (the training log and the "
            "evaluations per cell and step; 'eval_every' evaluates during training) and OUT/reward_vs_kl.png (mean "
            "over seeds with error bars, one curve per method). Re-running skips finished cells; a failed cell is "
            "reported and the others go on. The keys are documented in shiq_llm.experiments.sweep (example: "
            "shiq_llm/experiments/embedded_sweep.yaml). Mapping options given here update the file's: a short run is "
            "--train max_steps=2 --evaluation num_samples=2."),
    }
