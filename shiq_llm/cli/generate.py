"""``shiq-llm generate`` and ``shiq-llm score``: sample completions, then label them with rewards.

    shiq-llm generate --model M --prompts prompts.jsonl --num-completions 8 --out rows.jsonl
    shiq-llm score --rows rows.jsonl --out labelled.jsonl --reward my_module:reward
    shiq-llm train --data labelled.jsonl --model M --out runs/shiq …

The jobs are ``shiq_llm.generation.generate.generate_rows`` and ``shiq_llm.generation.score.score_rows``; every option is a field of
their config dataclass and its help is the field's docstring. :func:`register` adds both subcommands to the
``shiq-llm`` parser of ``shiq_llm.cli``.
"""

from __future__ import annotations

import argparse

from shiq_toy.experiments import field_docs

__all__ = ["register"]

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _adder(parser: argparse.ArgumentParser, cls: type):
    """``add(name, **kwargs)``: the option ``--name`` (``_`` → ``-``) with its dataclass field's docstring as help."""
    docs = field_docs(cls)

    def add(name: str, **kwargs) -> None:
        if kwargs.get("required"):
            kwargs["default"] = argparse.SUPPRESS  # no "(default: None)" in --help
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=docs[name].replace("``", ""), **kwargs)

    return add


def _register_generate(subparsers) -> None:
    from shiq_llm.core.models import INFERENCE_DTYPES
    from shiq_llm.generation.generate import BACKENDS, GenerateConfig

    d = GenerateConfig(model="", prompts="", out="")
    parser = subparsers.add_parser(
        "generate", formatter_class=_FORMATTER,
        help="sample K completions per prompt from a model (pure sampling: π itself) into resumable JSONL rows",
        description="Sample --num-completions completions of every prompt from --model and write them as rows "
        "{prompt, completion, model, seed, finish_reason, prompt_index, sample_index, num_tokens} to --out "
        "(prompt-major order). PURE SAMPLING BY DEFAULT: temperature 1, no top-k, no top-p, no repetition penalty "
        "— the completions are samples of π itself, as on-policy data and KL evaluation need; --temperature / "
        "--top-p other than 1 sample another distribution. Prompts get the model's chat template as in training "
        "(no doubled BOS). Backends: hf (transformers generate, left-padded batches, on --device in --dtype) or "
        "vllm (pip install 'shiq[vllm]'; auto-selected on a GPU when installed). Resumable: shards of "
        "--shard-size prompts are written atomically to OUT.parts/; a killed run re-run with the same command "
        "samples only the missing shards (shard [a, b) uses a seed derived from (--seed, a)), and OUT appears "
        "atomically at the end. The bar shows completions/s and tokens/s.")
    add = _adder(parser, GenerateConfig)
    add("model", required=True, metavar="M")
    add("prompts", required=True, metavar="P")
    add("num_completions", required=True, type=int, metavar="K")
    add("out", required=True, metavar="ROWS.jsonl")
    add("max_new_tokens", type=int, default=d.max_new_tokens, metavar="N")
    add("temperature", type=float, default=d.temperature)
    add("top_p", type=float, default=d.top_p)
    add("seed", type=int, default=d.seed, metavar="S")
    add("backend", choices=BACKENDS, default=d.backend)
    add("device", default=d.device)
    add("dtype", choices=INFERENCE_DTYPES, default=d.dtype)
    add("batch_size", type=int, default=d.batch_size)
    add("shard_size", type=int, default=d.shard_size)
    add("split", default=None)
    add("prompt_field", default=None)
    add("format", default=None)
    parser.add_argument("--format-option", dest="format_options", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the --format adapter, e.g. score=fine-grained_score for ultrafeedback "
                        "(repeatable; values parse as JSON when they can)")
    add("gpu_memory_utilization", type=float, default=d.gpu_memory_utilization)
    add("overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from shiq_llm.data.prompts import parse_format_options
    from shiq_llm.generation.generate import GenerateConfig, generate_rows

    values = {k: getattr(args, k) for k in GenerateConfig.__dataclass_fields__ if k != "progress"}
    values["progress"] = not args.no_progress
    values["format_options"] = parse_format_options(args.format_options)
    generate_rows(GenerateConfig(**values))
    return 0


def _register_score(subparsers) -> None:
    from shiq_llm.core.models import INFERENCE_DTYPES
    from shiq_llm.generation.score import ScoreConfig

    d = ScoreConfig(rows="", out="")
    parser = subparsers.add_parser(
        "score", formatter_class=_FORMATTER, help="label rows with rewards (a Python callable or a reward model)",
        description="Read --rows (JSONL: {prompt, completion, …} rows, e.g. from `shiq-llm generate`, or "
        "{messages, …} multi-turn rows) and write them to --out with 'reward' set (multi-turn rows: 'rewards', one "
        "per assistant message). --reward module:function is a Python callable: per row f(prompt, completion) -> "
        "float, or batched (f.batched = True) f(prompts, completions) -> list[float]; for multi-turn rows "
        "f(messages) -> list[float] (batched: f(conversations) -> list[list[float]]). --reward-model is an "
        "AutoModelForSequenceClassification with one label (hub name or path) read through its own tokenizer and "
        "chat template; its logit is the reward. A reward that is NaN, infinite or not a number, or a callable "
        "that raises, stops the run naming the row (index and prompt start); nothing partial is written. "
        "Resumable and atomic like generate (shards of --shard-size rows in OUT.parts/).")
    add = _adder(parser, ScoreConfig)
    add("rows", required=True, metavar="ROWS.jsonl")
    add("out", required=True, metavar="LABELLED.jsonl")
    source = parser.add_mutually_exclusive_group(required=True)
    docs = field_docs(ScoreConfig)
    source.add_argument("--reward", dest="reward", metavar="module:function", help=docs["reward"])
    source.add_argument("--reward-model", dest="reward_model", metavar="RM", help=docs["reward_model"])
    add("batch_size", type=int, default=d.batch_size, metavar="B")
    add("device", default=d.device)
    add("dtype", choices=INFERENCE_DTYPES, default=d.dtype)
    add("shard_size", type=int, default=d.shard_size)
    add("skip_empty", action="store_true")
    add("overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    from shiq_llm.generation.score import ScoreConfig, score_rows

    values = {k: getattr(args, k) for k in ScoreConfig.__dataclass_fields__ if k != "progress"}
    score_rows(ScoreConfig(**values, progress=not args.no_progress))
    return 0


def register(subparsers) -> None:
    """Add ``generate`` and ``score`` to the ``shiq-llm`` subparsers; each sets ``handler`` ``(args) -> int``."""
    _register_generate(subparsers)
    _register_score(subparsers)
