"""``shiq-llm make-data``, ``evaluate``, ``demo`` and ``sweep``: the embedded task and the reward-vs-KL experiment.

    shiq-llm make-data --out data/                    # tiny reference + offline rows (shiq_llm.tasks.synthetic)
    shiq-llm evaluate --model runs/shiq/final --ref data/reference --prompts synthetic
    shiq-llm sweep --config SWEEP.yaml                 # methods × β × seeds: train, evaluate, results.csv, figure
    shiq-llm demo --out demo/                          # make-data, then the sweep of the embedded task

The demo is spec §5's LLM-scale experiment on the embedded task: it builds the reference and the offline data
(:func:`shiq_llm.tasks.synthetic.make_data`) and runs the sweep ``shiq_llm/experiments/embedded_sweep.yaml``
(:mod:`shiq_llm.experiments.sweep`: every ``(algo, β)`` trained with ``ShiQTrainer``, evaluated on the held-out
prompts, ``results.csv`` and ``reward_vs_kl.png``). :func:`register` adds the subcommands to ``shiq-llm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import math
from pathlib import Path

from shiq_llm.data.prompts import load_prompts
from shiq_llm.experiments.demo import DemoConfig, quiet_libraries, run_demo
from shiq_llm.storage.jsonl import read_jsonl
from shiq_toy.experiments import num_threads, step_cap

__all__ = ["register"]

# --------------------------------------------------------------------------------------------------
# Command-line handlers
# --------------------------------------------------------------------------------------------------


def _make_data(args: argparse.Namespace) -> int:
    from shiq_llm.tasks import synthetic

    if args.completions_per_prompt < 1 or args.max_new_tokens < 1 or args.ref_steps < 1:
        raise ValueError("--completions-per-prompt, --max-new-tokens and --ref-steps must be >= 1")
    reference = synthetic.ReferenceConfig(noise=args.noise, steps=step_cap(args.ref_steps), seed=args.seed)
    with num_threads(args.threads):
        paths = synthetic.make_data(args.out, reference=reference, completions_per_prompt=args.completions_per_prompt,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.no_progress)
    rows = read_jsonl(paths["train"])
    print(f"reference model: {paths['reference']}")
    print(f"offline rows: {paths['train']} ({len(rows)} rows, mean reward {synthetic.mean_reward(rows):.3f})")
    print(f"held-out prompts: {paths['eval_prompts']}")
    print(f"next: shiq-llm train --model_name_or_path {paths['reference']} --dataset_name {paths['train']} "
          "--output_dir runs/shiq --max_steps 150 --learning_rate 1e-3 --per_device_train_batch_size 32")
    return 0


def _training_prompts(args: argparse.Namespace, model: str) -> tuple[list | None, str]:
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
    options = parse_format_options(args.train_format_option)
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
            raise ValueError(f"--train-data auto: the training data {source!r} of the run ({config}) cannot be read "
                             f"from {Path.cwd()} ({re.sub(r'^--prompts [^:]*: ', '', str(error).splitlines()[0]) if str(error) else type(error).__name__});"
                             " give --train-data PATH, or --train-data none to skip the held-out check") from None
        return train, source
    train = load_prompts(source, split=split, format=data_format, default_split="train", format_options=options or None)
    return train, source


def _evaluate(args: argparse.Namespace) -> int:
    from shiq_llm.core.models import (
        check_tokenizer_fits_model,
        load_causal_lm,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        resolve_model_source,
    )
    from shiq_llm.data.prompts import check_held_out, parse_format_options
    from shiq_llm.generation.evaluate import evaluate_policy
    from shiq_llm.generation.generate import make_sampler, resolve_backend
    from shiq_llm.generation.rewards import load_reward

    if args.reward is None and args.reward_model is None:
        args.reward = "synthetic" if args.prompts == "synthetic" else "none"
    prompts = load_prompts(args.prompts, split=args.split, prompt_field=args.prompt_field, format=args.format,
                           format_options=parse_format_options(args.format_option) or None, default_split=(
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
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if hasattr(args, f.name)}
    if "algos" in values:
        values["algos"] = tuple(a.strip() for a in values["algos"].split(",") if a.strip())
    if "betas" in values:
        values["betas"] = tuple(_parse_betas(values["betas"]))
    values["progress"] = not args.no_progress
    config = DemoConfig.quick(**values) if args.quick else DemoConfig(**values)
    config = dataclasses.replace(config, steps=step_cap(config.steps), ref_steps=step_cap(config.ref_steps))
    run_demo(config)
    return 0


def _parse_betas(text: str) -> list[float]:
    try:
        return [float(b) for b in text.split(",") if b.strip()]
    except ValueError as error:
        raise ValueError(f"--betas must be comma-separated numbers, got {text!r}") from error


def register(subparsers) -> None:
    """Add ``make-data``, ``evaluate``, ``demo`` and ``sweep`` to the ``shiq-llm`` subparsers (``shiq_llm.cli``).

    Each sets ``handler`` (the name ``shiq_llm.cli.main`` calls) to a function ``(args) -> int``.
    """
    _register_make_data(subparsers)
    _register_evaluate(subparsers)
    _register_demo(subparsers)
    _register_sweep(subparsers)


def _sweep(args: argparse.Namespace) -> int:
    from shiq_llm.experiments.sweep import load_sweep_config, run_sweep

    config = load_sweep_config(args.config, out=getattr(args, "out", None))
    quiet_libraries()
    with num_threads(args.threads):
        try:
            run_sweep(config, progress=not args.no_progress)
        except RuntimeError as error:  # some cells failed: every output is written, the failures named
            print(f"shiq-llm sweep: {error}")
            return 1
    return 0


def _register_sweep(subparsers) -> None:
    from shiq_llm.experiments.sweep import RESULT_COLUMNS

    sweep = subparsers.add_parser(
        "sweep", formatter_class=_FORMATTER, help="train and evaluate a grid of methods × β × seeds; results.csv "
        "and the reward-vs-KL figure",
        description="Train every (algo, beta, seed) of a sweep file with ShiQTrainer (the reference statistics "
        "computed once and shared), evaluate each on the held-out prompts (mean reward of its samples, exact and "
        "Monte-Carlo KL to the reference), and write OUT/results.csv (columns " + ",".join(RESULT_COLUMNS) +
        ", plus the reference; with 'evaluator: dialogues' the multi-turn task's per-turn columns too), "
        "OUT/curves.csv (the training log and the evaluations per cell and step; 'eval_every' evaluates during "
        "training) and OUT/reward_vs_kl.png (mean over seeds with error bars, one curve per method). "
        "Re-running skips finished cells; a failed cell is reported and the others go on. The file's keys are "
        "documented in shiq_llm.experiments.sweep (example: shiq_llm/experiments/embedded_sweep.yaml).")
    sweep.add_argument("--config", required=True, default=argparse.SUPPRESS, help="the sweep file (YAML)")
    sweep.add_argument("--out", default=argparse.SUPPRESS, help="output directory (default: the file's 'out')")
    sweep.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)")
    sweep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sweep.set_defaults(handler=_sweep)


_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _register_make_data(subparsers) -> None:
    from shiq_llm.tasks.synthetic import ReferenceConfig

    ref = ReferenceConfig()
    make = subparsers.add_parser(
        "make-data", formatter_class=_FORMATTER, help="build the embedded task's reference model and offline rows",
        description="Build the embedded synthetic task (shiq_llm.tasks.synthetic, no download, CPU seconds): a tiny Llama "
        "pre-trained on noisy counting demonstrations, saved with its tokenizer to OUT/reference (load it with "
        "`shiq-llm train --model OUT/reference`); K completions per training prompt sampled from it and labelled "
        "with the task reward, in OUT/train.jsonl ({prompt, completion, reward}); the held-out prompts in "
        "OUT/eval_prompts.jsonl.")
    make.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output directory")
    make.add_argument("--completions-per-prompt", type=int, default=16, help="completions sampled per training prompt")
    make.add_argument("--max-new-tokens", type=int, default=12, help="generation budget per completion")
    make.add_argument("--noise", type=float, default=ref.noise,
                      help="probability that a word of the reference's demonstrations is a random number")
    make.add_argument("--ref-steps", type=int, default=ref.steps, help="supervised steps of the reference")
    make.add_argument("--seed", type=int, default=0, help="seed of the reference and the samples")
    make.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    make.add_argument("--no-progress", action="store_true", help="hide progress bars")
    make.set_defaults(handler=_make_data)


def _register_evaluate(subparsers) -> None:
    from shiq_llm.core.models import INFERENCE_DTYPES
    from shiq_llm.core.stats import DEFAULT_CHUNK_SIZE
    from shiq_llm.data.prompts import LEAK_POLICIES
    from shiq_llm.generation.generate import BACKENDS

    ev = subparsers.add_parser(
        "evaluate", formatter_class=_FORMATTER, help="mean reward and KL(π‖π_ref) of a policy on its own samples",
        description="Sample completions of each prompt from the policy (pure sampling: temperature 1, no top-k/top-p, "
        "so the samples are π's) and report their mean reward and KL(π‖π_ref), each with its standard error: exact "
        "per token from both models' next-token distributions (computed from hidden states in chunks of "
        "--chunk-size rows, never the (B, L, V) logits), summed over each sample, and the Monte-Carlo Σ_t ln π/π_ref "
        "(shiq_llm.generation.evaluate); also the mean length and the fraction of samples that ended with EOS. Before "
        "sampling, the evaluation prompts are checked against the training prompts (--train-data): any overlap is "
        "an error (or a warning with the counts, --leak warn). Prints JSON; --out writes it.")
    ev.add_argument("--model", required=True, default=argparse.SUPPRESS,
                    help="the policy: a directory saved with save_pretrained (e.g. a run's OUT/final) or a hub name; "
                    "its tokenizer is used for both models")
    ev.add_argument("--ref", required=True, default=argparse.SUPPRESS, help="the reference model (same vocabulary)")
    ev.add_argument("--prompts", default="synthetic", help="'synthetic' (the embedded task's prompts), a .txt file "
                    "(one prompt per line), a .jsonl/.json/.parquet file or a hub dataset of rows with a prompt field")
    ev.add_argument("--split", default=None, help="split of the prompts: for 'synthetic' train, eval or all "
                    "(default eval, the held-out prompts); for a hub dataset its split name (default test)")
    ev.add_argument("--prompt-field", default=None, help="field of the rows holding the prompt (default 'prompt', "
                    "else the messages before the first assistant message of 'messages')")
    ev.add_argument("--format", default=None, help="adapter applied to the prompt rows first (shiq_llm.data.adapters: "
                    "paired, ultrafeedback, hh, bfcl)")
    ev.add_argument("--format-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the --format adapter (repeatable), e.g. score=fine-grained_score")
    ev.add_argument("--reward", default=None,
                    help="reward function: 'synthetic', 'module:function' (per row f(prompt, completion) -> float, or "
                    "batched with f.batched = True: f(prompts, completions) -> list) or 'none'; default: 'synthetic' "
                    "for --prompts synthetic, else 'none' (only the KL is reported)")
    ev.add_argument("--reward-model", default=None, metavar="RM",
                    help="a sequence-classification reward model (hub name or path, one label) instead of --reward")
    ev.add_argument("--reward-batch-size", type=int, default=16, help="texts per forward pass of --reward-model")
    ev.add_argument("--num-samples", type=int, default=16, help="completions sampled per prompt")
    ev.add_argument("--max-new-tokens", type=int, default=16, help="generation budget per completion")
    ev.add_argument("--batch-size", type=int, default=64, help="sequences per generation (hf) and KL batch")
    ev.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                    help="response tokens projected onto the vocabulary at once in the exact KL")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--backend", choices=BACKENDS, default="auto", help="sampler: hf (transformers), vllm (pip "
                    "install 'shiq[vllm]'), or auto (vllm on a GPU when installed); the KL always uses transformers")
    ev.add_argument("--device", default="auto", help="torch device of both models and the reward model "
                    "(auto: cuda when available, else cpu)")
    ev.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto", help="weights dtype (auto: bfloat16 on a "
                    "GPU that supports it, else float32); the KL's log-softmax runs in float32")
    ev.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="vllm backend: fraction of the GPU memory vLLM may take (the two models need the rest)")
    ev.add_argument("--train-data", default="auto", help="training rows (same forms as --prompts) whose prompts the "
                    "evaluation prompts must not include; 'auto': the training data in the run_args.yaml of the run "
                    "whose OUT/final is --model (refused when it cannot be found); 'none': skip the check")
    ev.add_argument("--train-split", default="train", help="split of --train-data")
    ev.add_argument("--train-format", default=None, help="adapter of --train-data (as --format)")
    ev.add_argument("--train-format-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the --train-format adapter (repeatable)")
    ev.add_argument("--leak", choices=LEAK_POLICIES, default="error", help="what to do when evaluation prompts "
                    "occur in the training data: stop with an error, or warn with the counts")
    ev.add_argument("--out", default=None, help="also write the JSON report to this file (default: print only)")
    ev.set_defaults(handler=_evaluate)


def _register_demo(subparsers) -> None:
    from shiq_llm.experiments.sweep import RESULT_COLUMNS

    d = DemoConfig()
    demo = subparsers.add_parser(
        "demo", formatter_class=_FORMATTER,
        help="the LLM main job: reference, data, ShiQ and baselines over β, reward-vs-KL figure",
        description="Spec §5 on the embedded task, on the CPU in about 2 minutes: build the reference and offline "
        "data (as make-data), train each method at each β with the trainer's API, evaluate each policy on the "
        "held-out prompts (mean reward of its samples, exact KL to the reference) and write OUT/results.csv "
        "(columns " + ",".join(RESULT_COLUMNS) + ") and OUT/reward_vs_kl.png. It is the sweep of "
        "shiq_llm/experiments/embedded_sweep.yaml with these options.")
    demo.add_argument("--out", default=d.out, help="output directory")
    demo.add_argument("--algos", default=argparse.SUPPRESS,
                      help=f"comma-separated methods (default: {','.join(d.algos)}; --quick: shiq,dpo)")
    demo.add_argument("--betas", default=argparse.SUPPRESS,
                      help=f"comma-separated β values (default: {','.join(f'{b:g}' for b in d.betas)}; --quick: 0.1)")
    options = [  # (name, type, help); the default comes from DemoConfig
        ("steps", int, "optimizer steps per run"),
        ("lr", float, "learning rate of every run"),
        ("batch_size", int, "sequences per step (dpo and copg: batch_size // 2 pairs)"),
        ("completions_per_prompt", int, "offline completions per training prompt"),
        ("ref_steps", int, "supervised steps of the reference"),
        ("eval_samples", int, "samples per held-out prompt"),
        ("max_new_tokens", int, "generation budget"),
        ("seed", int, "seed of everything"),
        ("threads", int, "torch CPU threads during the demo (1 is fastest for the tiny model)"),
    ]
    for name, kind, text in options:
        demo.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                          help=f"{text} (default: {getattr(d, name):g})")
    demo.add_argument("--data", default=argparse.SUPPRESS, help="reuse a `shiq-llm make-data` directory instead of "
                      "building OUT/data (default: build it)")
    demo.add_argument("--quick", action="store_true",
                      help="only shiq and dpo at β = 0.1 (under a minute): a smoke test")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=_demo)
