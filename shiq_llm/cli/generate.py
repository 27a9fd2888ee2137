"""``shiq-llm generate`` and ``shiq-llm score``: sample completions, then label them with rewards.

    shiq-llm generate --model M --prompts prompts.jsonl --num-completions 8 --out rows.jsonl
    shiq-llm score --rows rows.jsonl --out labelled.jsonl --reward my_module:reward
    shiq-llm train --dataset_name labelled.jsonl --model_name_or_path M --output_dir runs/shiq …

The jobs are ``shiq_llm.generation.generate.generate_rows`` and ``shiq_llm.generation.score.score_rows``; the options
of each command are the fields of their config dataclass (``GenerateConfig``, ``ScoreConfig``), parsed by
``shiq_toy.options``. :func:`commands` gives both to ``shiq-llm`` (``shiq_llm.cli``).
"""

from __future__ import annotations

from shiq_toy.options import Command

__all__ = ["commands"]


def _check_generate(config) -> None:
    from shiq_llm.generation.generate import check_generate_config

    check_generate_config(config)
    if config.format_options and config.format is None:
        raise ValueError("option --format-option needs a --format")


def _generate(config) -> int:
    from shiq_llm.generation.generate import generate_rows

    generate_rows(config)
    return 0


def _check_score(config) -> None:
    from shiq_llm.cli.tasks import check_reward_options
    from shiq_llm.generation.score import check_score_config

    check_score_config(config)
    check_reward_options(config.reward, config.reward_model, need_one=True)


def _score(config) -> int:
    from shiq_llm.generation.score import score_rows

    score_rows(config)
    return 0


def commands() -> dict[str, Command]:
    """``generate`` and ``score``."""
    from shiq_llm.core.models import INFERENCE_DTYPES
    from shiq_llm.generation.generate import BACKENDS, GenerateConfig
    from shiq_llm.generation.score import ScoreConfig

    return {
        "generate": Command(
            "generate", (GenerateConfig,), _generate, check=_check_generate,
            choices={"backend": BACKENDS, "dtype": INFERENCE_DTYPES},
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
        "atomically at the end. The bar shows completions/s and tokens/s."),
        "score": Command(
            "score", (ScoreConfig,), _score, check=_check_score, choices={"dtype": INFERENCE_DTYPES},
            help="label rows with rewards (a Python callable or a reward model)",
            description="Read --rows (JSONL: {prompt, completion, …} rows, e.g. from `shiq-llm generate`, or "
        "{messages, …} multi-turn rows) and write them to --out with 'reward' set (multi-turn rows: 'rewards', one "
        "per assistant message). --reward module:function is a Python callable: per row f(prompt, completion) -> "
        "float, or batched (f.batched = True) f(prompts, completions) -> list[float]; for multi-turn rows "
        "f(messages) -> list[float] (batched: f(conversations) -> list[list[float]]). --reward-model is an "
        "AutoModelForSequenceClassification with one label (hub name or path) read through its own tokenizer and "
        "chat template; its logit is the reward. A reward that is NaN, infinite or not a number, or a callable "
        "that raises, stops the run naming the row (index and prompt start); nothing partial is written. "
        "Resumable and atomic like generate (shards of --shard-size rows in OUT.parts/)."),
    }
