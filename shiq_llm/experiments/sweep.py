"""``shiq-llm sweep --config SWEEP.yaml``: train every (method, β, seed) of a grid, evaluate each, and plot mean
reward against KL(π‖π_ref) — the paper's LLM experiment as one command.

One YAML file names the reference model, the training rows, the evaluation prompts and reward, the grid and
the training options shared by every cell::

    out: runs/sweep                     # OUT: results.csv, reward_vs_kl.png, runs/<cell>/, reference/
    model: data/reference               # the reference = the initial policy (model_name_or_path)
    train_data: data/train.jsonl        # rows {prompt, completion, reward} (dataset_name); data_format: optional
    eval_prompts: synthetic             # as `shiq-llm evaluate --prompts`; eval_split: eval
    reward: synthetic                   # 'synthetic' or 'module:function' (f(prompt, completion) -> float)
    algos: [shiq, dpo, copg, dro]
    betas: [0.1, 0.3, 1.0]
    seeds: [0]
    train: {learning_rate: 1.0e-3, max_steps: 150, per_device_train_batch_size: 32}   # any ShiQConfig option
    evaluation: {num_samples: 16, max_new_tokens: 12, seed: 1}
    evaluator: completions              # or 'dialogues': the multi-turn task (shiq_llm.tasks.multiturn), per-turn rewards
    eval_every: 0                       # > 0: also evaluate every that many steps during training (the curve)
    variants:                           # optional extra methods: a name, an algo, other rows or options
      shiq_final_reward: {algo: shiq, train_data: data/train_final_reward.jsonl}

Hub-scale sweeps (``recipes/``) add the adapter of the rows (``data_format``, ``data_format_options``), hub
prompts (``eval_prompts: HuggingFaceH4/ultrafeedback_binarized``, ``eval_split: test_prefs[:500]``,
``eval_format``), a reward model (``reward_model``) or a reward with options (``reward_options``), LoRA and
dtype for every cell (``model_options``) and the evaluation's ``device`` / ``dtype`` (:class:`SweepConfig`).

What it does (:func:`run_sweep`): the evaluation prompts are checked against the training data first (none
may occur there: ``leak: error``, the default, refuses the sweep naming the counts; ``leak: warn`` logs them);
the reference statistics are computed once, in ``OUT/reference`` (with DRO's
prompt states when a method needs them), and shared by every cell (a variant whose tokenised rows differ gets its own,
``OUT/reference_<variant>``; one whose rows differ in their rewards only shares it); each cell trains with :func:`shiq_llm.train.run.train_run` into
``OUT/runs/<method>_beta<β>_seed<s>`` (pair methods take half as many pairs as ``per_device_train_batch_size``,
i.e. as many sequences) and is evaluated on the held-out prompts by the config's :data:`EVALUATORS` entry
(``completions``: :func:`shiq_llm.generation.evaluate.evaluate_policy`, mean reward of its own samples, exact and
Monte-Carlo KL; ``dialogues``: :func:`shiq_llm.tasks.multiturn.evaluate_dialogues`, the same on dialogues with the
tool in the loop, per turn too), with the sampling seed ``evaluation.seed + seed`` (so that the seeds' results
are independent); with ``eval_every`` also during training (``shiq_llm.train.metrics.EvaluateEvery``: the cell's ``curve``). Its
result is written to ``OUT/runs/<cell>/result.json`` last, atomically, with its key. A cell that fails is
reported and the others go on.

**Keys: a re-run never reports stale results.** Every result is stored with the key of everything that changes
it, and a re-run keeps a result only when its key is unchanged. A cell's key: its method name, the resolved
``ShiQConfig`` of the cell (every option, defaults included, but where it writes and how it reports:
:data:`KEY_IGNORED_OPTIONS`), the ``model_options``, ``eval_every``, the training data by
``shiq_llm.core.reference.training_data_fingerprint`` (tokens, masks, rewards and pairs, after the adapter and
the length options) with its adapter and split, and the evaluation: the reference model's
``model_fingerprint``, a digest of the evaluation prompts, the evaluator, reward (name, options, model), the
evaluation options with the cell's sampling seed, device and dtype. The reference result
(``OUT/reference_result.json``) is keyed by the evaluation alone. A re-run recomputes the results whose key
changed and says so in one line (which results, and the first entries that changed, e.g. ``shiq_beta0.3_seed0
(train.max_steps: 40 → 80)``); a result of an older version, with no key, is recomputed. ``results.csv`` is
rewritten from the current grid's results only. A reference cache is keyed by the model's fingerprint and
options, the tokenised data's ``data_fingerprint`` and the precision (``OUT/reference.key.json`` beside
``OUT/reference``): when that key changed the cache is rebuilt (said in a line) instead of being refused; a
cache that lacks DRO's prompt states is extended by the trainer (``shiq_llm.core.reference.reference_cache``),
so adding ``dro`` to a finished sweep works. The reward's code is in the evaluation's key too (:func:`reward_code`:
the source file of a ``module:function`` reward, a reward model's weights). ``OUT/results.csv`` holds one row per finished cell
(:data:`RESULT_COLUMNS`, plus the per-turn columns of ``dialogues``) and the reference;
``OUT/curves.csv`` one row per cell and logged or evaluated step (:func:`curve_rows`: the training log of
``metrics.jsonl`` and the evaluations, the reference at step 0); ``OUT/reward_vs_kl.png`` plots, per method
across β, the mean over seeds with error bars (the standard error over seeds with several seeds, else the run's
own).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from shiq_llm.storage.jsonl import read_jsonl
from shiq_toy.options import option

__all__ = ["SweepConfig", "load_sweep_config", "check_sweep_config", "run_sweep", "check_sweep_held_out", "EVALUATION_KEYS", "RESULT_COLUMNS", "write_results", "plot_reward_vs_kl",
           "aggregate_over_seeds", "cell_name", "SweepError", "Evaluator", "EVALUATORS", "curve_rows", "write_curves",
           "TRAIN_LOG_KEYS", "KEY_IGNORED_OPTIONS", "digest", "training_key", "key_changes", "reward_code"]

logger = logging.getLogger(__name__)

#: Columns of ``results.csv`` (the reference row has no β, seed or training time). ``method`` is the algo, or
#: the name of a variant (``SweepConfig.variants``).
RESULT_COLUMNS = (
    "method", "algo", "beta", "seed", "mean_reward", "reward_sem", "kl", "kl_sem", "kl_mc", "mean_length",
    "finished", "num_samples", "train_seconds",
)

#: Keys of ``metrics.jsonl`` records (``shiq_llm.train.metrics``) that :func:`curve_rows` carries into ``curves.csv``.
TRAIN_LOG_KEYS = ("loss", "abs_residual", "kl_estimate", "nll", "implicit_value")


class SweepError(RuntimeError):
    """Some cells of a sweep failed (the message names them); ``results`` holds the rows of the others."""

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class Evaluator:
    """How a sweep evaluates a policy on its prompts.

    ``evaluate(policy, ref, tokenizer, prompts, reward, **options) -> dict`` (``reward``: the loaded scorer of
    ``shiq_llm.generation.rewards``, or None) of plain floats (``mean_reward``,
    ``reward_sem``, ``kl``, ``kl_sem`` at least); ``options`` are the sweep's ``evaluation`` mapping with the
    cell's sampling ``seed``. ``extra_columns``: whether the keys that :data:`RESULT_COLUMNS` lacks are written
    to ``results.csv`` too.
    """

    evaluate: Callable[..., dict]
    extra_columns: bool = False


def _evaluate_completions(policy, ref, tokenizer, prompts, reward, **options) -> dict:
    from shiq_llm.generation.evaluate import evaluate_policy

    return evaluate_policy(policy, ref, tokenizer, prompts, reward_fn=reward, **options)


def _evaluate_dialogues(policy, ref, tokenizer, prompts, reward, **options) -> dict:
    from shiq_llm.tasks.multiturn import evaluate_dialogues

    return evaluate_dialogues(policy, ref, tokenizer, prompts, **options)  # the task's checker is the reward


#: ``SweepConfig.evaluator`` names: single completions scored by ``reward``, or dialogues of the multi-turn
#: task with the tool in the loop (its per-turn rewards, success and per-turn KL go to results.csv too).
EVALUATORS: dict[str, Evaluator] = {
    "completions": Evaluator(_evaluate_completions),
    "dialogues": Evaluator(_evaluate_dialogues, extra_columns=True),
}


@dataclass
class SweepConfig:
    """A sweep (module docstring). Every key of the YAML file is a field; unknown keys are refused."""

    out: str = option(help='Output directory: results.csv, curves.csv, reward_vs_kl.png, reference/ (shared '
                      'statistics), runs/<cell>/.', aliases=("output_dir",), path="out_dir")
    model: str = option(help="The reference model (hub name or path): the initial policy of every cell and the KL's "
                        'reference.', aliases=("model_name_or_path",))
    train_data: str = option(help='Training rows: a file or hub dataset (as ``shiq-llm train --dataset_name``).', aliases=("dataset_name",), path="data")
    algos: list[str] = option(help='Methods of the grid (``shiq_llm.train.config.LLM_METHODS``).')
    betas: list[float] = option(help='β values of the grid.')
    seeds: list[int] = option(default_factory=lambda: [0], help='Training seeds of the grid (data order, value '
                              'head); a cell of seed s samples its evaluation with the seed ``evaluation.seed + s``.')
    data_format: str | None = option(None, 'Adapter of the training rows (``shiq_llm.data.adapters``), if they are '
                                     'not canonical.')
    data_format_options: dict[str, Any] = option(default_factory=dict, help='Keyword arguments of that adapter (e.g. '
                                                 '``{score: fine-grained_score}`` for ultrafeedback).')
    train_split: str = option("train", 'Split of a hub dataset ``train_data`` (``shiq-llm train '
                              '--dataset_train_split``).')
    eval_prompts: str = option("synthetic", "Evaluation prompts, as ``shiq-llm evaluate --prompts``: 'synthetic', a "
                               '.txt, a .jsonl/.json/.parquet file or a hub dataset.')
    eval_split: str = option("eval", "Split of the evaluation prompts ('eval' of the synthetic ones: held out from "
                             "training; a hub split such as 'test' or 'test_prefs[:500]').")
    eval_format: str | None = option(None, 'Adapter of the evaluation prompt rows (as ``shiq-llm evaluate '
                                     '--format``).')
    eval_format_options: dict[str, Any] = option(default_factory=dict, help='Keyword arguments of that adapter.')
    eval_prompt_field: str | None = option(None, 'Field of the evaluation rows that holds the prompt (default '
                                           "'prompt', else the messages of 'messages').")
    leak: str = option("error", "When evaluation prompts also occur in the training data: 'error' refuses the sweep "
                       "(naming the counts and an example) before anything trains, 'warn' logs the counts and goes "
                       'on.')
    reward: str | None = option(None, "Reward of the evaluation: 'synthetic' or 'module:function', f(prompt, "
                                "completion) -> float (default 'synthetic' unless ``reward_model`` is given).")
    reward_options: dict[str, Any] = option(default_factory=dict, help='Keyword arguments bound to the ``reward`` '
                                            'callable (e.g. ``{answers: runs/bfcl/eval_rows.jsonl}`` for '
                                            '``shiq_llm.data.bfcl:first_step_reward``).')
    reward_model: str | None = option(None, 'A sequence-classification reward model (hub name or path, one label) '
                                      'instead of ``reward`` (``shiq_llm.generation.rewards.RewardModel``, on '
                                      '``evaluation.device``).')
    model_options: dict[str, Any] = option(default_factory=dict, help='``ModelArguments`` of every cell other than '
                                           'the model (dtype, use_peft, lora_r, …).')
    train: dict[str, Any] = option(default_factory=dict, help='``ShiQConfig`` options shared by every cell '
                                   '(learning_rate, max_steps, per_device_train_batch_size, …).')
    evaluation: dict[str, Any] = option(default_factory=dict, help='Options of the evaluator (num_samples, '
                                        'max_new_tokens, seed — a cell of seed s samples with seed + s —, '
                                        "batch_size, chunk_size) and where it runs: device ('auto': cuda when "
                                        'available), dtype (as ``shiq-llm evaluate --dtype``), reward_batch_size.')
    evaluator: str = option("completions", "How policies are evaluated (:data:`EVALUATORS`): 'completions' (with "
                            "``reward``) or 'dialogues' (the multi-turn task, ``shiq_llm.tasks.multiturn``; "
                            '``eval_prompts`` a file of its prompts).')
    eval_every: int = option(0, 'Also evaluate every this many optimizer steps during training (0: the final model '
                             'only).')
    variants: dict[str, dict] = option(default_factory=dict, help='Further methods of the grid: name -> {algo, '
                                       'train_data, data_format, train}; unset keys come from the sweep (``train`` '
                                       "options are laid over the sweep's). E.g. an algo trained on other rewards of "
                                       'the same rows.')


def load_sweep_config(path: str | Path, **overrides) -> SweepConfig:
    """A SweepConfig from YAML (then ``overrides``); ValueError naming the file and a missing or unknown key."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read sweep file {path}: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"sweep file {path} must hold a mapping of keys to values")
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"sweep file {path}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
    missing = sorted(f.name for f in dataclasses.fields(SweepConfig)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values)
    if missing:
        raise ValueError(f"sweep file {path}: missing key {missing[0]!r}")
    config = SweepConfig(**values)
    check_sweep_config(config, str(path))
    return config


#: Keys of a sweep file's ``evaluation`` mapping.
EVALUATION_KEYS = {"num_samples", "max_new_tokens", "seed", "batch_size", "chunk_size", "device", "dtype",
                   "reward_batch_size"}


def check_sweep_config(config: SweepConfig, where: str) -> None:
    """ValueError naming ``where`` (the sweep file) and the first bad key of ``config``."""
    from shiq_llm.data.prompts import LEAK_POLICIES
    from shiq_llm.train.config import LLM_METHODS, ModelArguments

    bad = [a for a in config.algos if a not in LLM_METHODS]
    if not isinstance(config.algos, list) or bad or not (config.algos or config.variants):
        raise ValueError(f"{where}: algos must be a non-empty list of {list(LLM_METHODS)} (or empty with variants), "
                         f"got {config.algos}")
    if not config.betas or not all(isinstance(b, (int, float)) and b > 0 and math.isfinite(b) for b in config.betas):
        raise ValueError(f"{where}: betas must be a non-empty list of finite numbers > 0, got {config.betas}")
    if not config.seeds or not all(isinstance(s, int) for s in config.seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers, got {config.seeds}")
    if config.evaluator not in EVALUATORS:
        raise ValueError(f"{where}: evaluator must be one of {list(EVALUATORS)}, got {config.evaluator!r}")
    if isinstance(config.eval_every, bool) or not isinstance(config.eval_every, int) or config.eval_every < 0:
        raise ValueError(f"{where}: eval_every must be an integer >= 0, got {config.eval_every!r}")
    if not isinstance(config.variants, dict):
        raise ValueError(f"{where}: variants must be a mapping of names to {{algo, train_data, data_format, train}}")
    for name, variant in config.variants.items():
        if (name in config.algos or name == "reference" or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name))
                or not isinstance(variant, dict) or variant.get("algo") not in LLM_METHODS):
            raise ValueError(f"{where}: variants.{name} must be a mapping with an 'algo' of {list(LLM_METHODS)}, named "
                             f"with letters, digits, '_', '.', '-' and not as an algo or 'reference', got {variant!r}")
        unknown = sorted(set(variant) - {"algo", "train_data", "data_format", "train"})
        if unknown:
            raise ValueError(f"{where}: variants.{name}: unknown key {unknown[0]!r} (algo, train_data, data_format, train)")
    for key in ("output_dir", "loss_type", "beta", "seed", "ref_cache"):
        for source, options in [("train", config.train)] + [(f"variants.{n}.train", v.get("train") or {})
                                                            for n, v in config.variants.items()]:
            if key in options:
                raise ValueError(f"{where}: {source}.{key} is set by the sweep itself (out, algos, betas, seeds)")
    if config.leak not in LEAK_POLICIES:
        raise ValueError(f"{where}: leak must be one of {list(LEAK_POLICIES)}, got {config.leak!r}")
    if config.reward is not None and config.reward_model is not None:
        raise ValueError(f"{where}: give either reward or reward_model, not both")
    if config.reward_options and config.reward in (None, "synthetic"):
        raise ValueError(f"{where}: reward_options need a reward 'module:function'")
    model_fields = {f.name for f in dataclasses.fields(ModelArguments)} - {"model_name_or_path"}
    unknown = sorted(set(config.model_options) - model_fields)
    if unknown:
        raise ValueError(f"{where}: model_options.{unknown[0]} is not a model option; known: {', '.join(sorted(model_fields))}")
    unknown = sorted(set(config.evaluation) - EVALUATION_KEYS)
    if unknown:
        raise ValueError(f"{where}: evaluation.{unknown[0]} is not an evaluation option; known: "
                         f"{', '.join(sorted(EVALUATION_KEYS))}")


def cell_name(method: str, beta: float, seed: int) -> str:
    """The directory name of a cell: ``<method>_beta<β>_seed<s>``."""
    return f"{method}_beta{beta:g}_seed{seed}"


@dataclass(frozen=True)
class _Method:
    """A row of the grid: the algo of a name in ``algos``, or a variant."""

    name: str
    algo: str
    train_data: str
    data_format: str | None
    train: dict


def _methods(config: SweepConfig) -> list[_Method]:
    rows = [_Method(a, a, config.train_data, config.data_format, dict(config.train)) for a in config.algos]
    for name, v in config.variants.items():
        rows.append(_Method(name, v["algo"], v.get("train_data", config.train_data),
                            v.get("data_format", config.data_format), {**config.train, **(v.get("train") or {})}))
    return rows


#: ``ShiQConfig`` fields that do not change a cell's result (where it writes, how it reports, hub pushes): left
#: out of the cell's key (:func:`cell_key`). Every other field is in it, so a changed option or default retrains.
KEY_IGNORED_OPTIONS = frozenset({
    "output_dir", "logging_dir", "ref_cache", "overwrite_output_dir", "disable_tqdm", "report_to", "run_name",
    "recompute_ref", "resume_from_checkpoint", "push_to_hub", "local_rank", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
})


def digest(value: Any) -> str:
    """sha256 hex digest of a JSON-able value (keys sorted; other objects by ``str``)."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def reward_code(reward, evaluator: str) -> str | None:
    """A digest of the code or weights that score the evaluation, for the results' keys: a reward function by the
    source file it is defined in (``functools.partial`` unwrapped; its name where there is no file), a reward
    model by ``model_fingerprint`` of its weights, the ``dialogues`` evaluator by its task's checker module
    (``shiq_llm.tasks.multiturn``); None when nothing scores. Editing the reward's file, or retraining the reward
    model at the same path, changes it, so a re-run recomputes the results."""
    import hashlib
    import inspect

    if evaluator == "dialogues":
        from shiq_llm.tasks import multiturn

        return hashlib.sha256(Path(inspect.getsourcefile(multiturn)).read_bytes()).hexdigest()
    if reward is None:
        return None
    model = getattr(reward, "model", None)
    if model is not None:
        from shiq_llm.core.reference import model_fingerprint

        return model_fingerprint(model)
    fn = getattr(reward, "fn", reward)
    while isinstance(fn, functools.partial):
        fn = fn.func
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:  # a builtin or a C function
        source = None
    if source is None or not Path(source).is_file():
        return digest(getattr(fn, "__qualname__", repr(fn)))
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def training_key(args) -> dict:
    """The options of a cell's ``ShiQConfig`` that change its result: every field but
    :data:`KEY_IGNORED_OPTIONS` and the hub's, as JSON values."""
    values = json.loads(json.dumps(args.to_dict(), default=str))
    return {k: v for k, v in values.items() if k not in KEY_IGNORED_OPTIONS and not k.startswith("hub_")}


def key_changes(old: dict | None, new: dict, *, limit: int = 3) -> str:
    """Why ``old`` is not ``new``, in words: the first ``limit`` differing entries as ``a.b: old → new``
    (fingerprints shortened), or that no key was recorded (a result of an older version)."""
    if not isinstance(old, dict):
        return "no key recorded"
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))

    def show(value):
        text = "unset" if value is None else str(value)
        return text[:8] + "…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text

    words = [f"{k}: {show(a.get(k))} → {show(b.get(k))}" for k in changed[:limit]]
    return ", ".join(words) + (f" (+{len(changed) - limit} more)" if len(changed) > limit else "")


def _flatten(value: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in value.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _read_keyed(path: Path, key: dict) -> tuple[dict | None, str | None]:
    """(the result at ``path`` without its key, None) when it was made under ``key``; (None, why not) when
    ``path`` holds a result of another key; (None, None) when there is none."""
    if not path.is_file():
        return None, None
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return None, f"unreadable ({error})"
    old = row.pop("key", None)
    if old != json.loads(json.dumps(key, default=str)):
        return None, key_changes(old, json.loads(json.dumps(key, default=str)))
    return row, None


def run_sweep(config: SweepConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Run the sweep (module docstring); returns the result rows, the reference first. Finished cells whose key
    is unchanged are read back, not retrained; the others are recomputed, said in one line through ``log``. Raises :class:`SweepError` (a RuntimeError holding the rows of the finished cells) after
    writing every output when some cell failed."""
    from tqdm.auto import tqdm

    from shiq_llm.core.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from shiq_llm.core.reference import data_fingerprint, model_fingerprint, training_data_fingerprint
    from shiq_llm.data import load_rows, preference_pairs, tokenize_rows
    from shiq_llm.generation.rewards import RewardFunction, load_reward
    from shiq_llm.train.config import DataArguments, ModelArguments, ShiQConfig
    from shiq_llm.train.metrics import EvaluateEvery
    from shiq_llm.train.run import train_run
    from shiq_toy.methods import METHODS

    check_sweep_config(config, "sweep")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    evaluator = EVALUATORS[config.evaluator]
    prompts = check_sweep_held_out(config)
    eval_options = {"num_samples": 16, "max_new_tokens": 16, "seed": 1, **config.evaluation}
    device = resolve_device(eval_options.pop("device", "auto"))
    dtype = resolve_dtype(eval_options.pop("dtype", "auto"), device)
    reward_batch_size = eval_options.pop("reward_batch_size", 16)
    reward_fn = None
    if config.evaluator == "completions":  # a bad reward is refused before any training
        reward_fn = load_reward(config.reward or (None if config.reward_model else "synthetic"), config.reward_model,
                                device=device, dtype=str(dtype).removeprefix("torch."), batch_size=reward_batch_size)
        if config.reward_options:
            bound = functools.partial(reward_fn.fn, **config.reward_options)
            bound.batched = reward_fn.batched
            reward_fn = RewardFunction(bound, name=reward_fn.name)
    tokenizer = load_tokenizer(config.model)
    ref = load_causal_lm(config.model, device=device, dtype=dtype)

    def evaluate(policy, seed: int = 0) -> dict:
        options = {**eval_options, "seed": eval_options["seed"] + seed}
        return evaluator.evaluate(policy, ref, tokenizer, prompts, reward_fn, **options)

    # What every result depends on (module docstring, "Keys"): the reference model, the evaluation and its prompts.
    model_fp = model_fingerprint(ref)
    evaluation_key = {"model_fingerprint": model_fp, "eval_prompts": digest(prompts), "evaluator": config.evaluator,
                      "reward": config.reward, "reward_options": config.reward_options,
                      "reward_model": config.reward_model, "reward_code": reward_code(reward_fn, config.evaluator),
                      "options": eval_options, "device": str(device),
                      "dtype": str(dtype), "reward_batch_size": reward_batch_size}
    stale: dict[str, list[str]] = {}  # why -> the results recomputed for that reason
    reference_file = out / "reference_result.json"
    reference_key = {"evaluation": evaluation_key}  # evaluated with the sampling seed evaluation.seed (+ 0)
    reference, why = _read_keyed(reference_file, reference_key)
    if why:
        stale.setdefault(why, []).append("reference")
    results, failures = [], []
    methods = sorted(_methods(config), key=lambda m: not METHODS[m.algo].needs_value)  # the value caches first
    tokenised: dict[tuple, Any] = {}  # the rows of each method tokenised once, for all its cells

    def examples(method: _Method, data: DataArguments, args: ShiQConfig):
        key = (method.train_data, method.data_format, args.max_length, args.max_prompt_length, args.long_response)
        if key not in tokenised:
            rows = load_rows(method.train_data, format=method.data_format, split=data.dataset_train_split,
                             format_options=(data.format_options() or None) if method.data_format else None)
            tokenised[key], _ = tokenize_rows(rows, tokenizer, max_length=args.max_length,
                                              max_prompt_length=args.max_prompt_length, long_response=args.long_response)
        return tokenised[key]

    # First every cell's options and key, so that one line can say which results are recomputed and why.
    cells = [(m, b, s) for m in methods for b in config.betas for s in config.seeds]
    plans = []  # (name, method, beta, seed, args, data, examples, key, cache key, cache, kept result or None)
    caches: dict[str, Path] = {}  # reference cache key digest -> its directory (OUT/reference for the sweep's rows)
    fingerprints: dict[tuple, tuple[str, str]] = {}  # (rows, pairing) -> (data, training data) fingerprints
    for method, beta, seed in cells:
        name = cell_name(method.name, beta, seed)
        run_dir = out / "runs" / name
        options = {"per_device_train_batch_size": 8, "save_strategy": "no", "logging_steps": 10, "report_to": "none",
                   **method.train}
        if METHODS[method.algo].consumes == "pairs":
            options["per_device_train_batch_size"] = max(1, options["per_device_train_batch_size"] // 2)
        try:
            args = ShiQConfig(output_dir=str(run_dir), loss_type=method.algo, beta=beta, seed=seed,
                              overwrite_output_dir=True, disable_tqdm=True, **options)
            data = DataArguments(dataset_name=method.train_data, data_format=method.data_format,
                                 data_format_options=(config.data_format_options or None) if method.data_format else None,
                                 dataset_train_split=config.train_split)
            train_examples = examples(method, data, args)
            pairing = (args.pair_mode, METHODS[method.algo].pairing) if METHODS[method.algo].consumes == "pairs" else None
            if (id(train_examples), pairing) not in fingerprints:  # hashed once per rows and pairing, not per cell
                pairs = preference_pairs(train_examples, mode=pairing[0], pairing=pairing[1]) if pairing else None
                fingerprints[id(train_examples), pairing] = (data_fingerprint(train_examples),
                                                             training_data_fingerprint(train_examples, pairs))
            data_fp, training_fp = fingerprints[id(train_examples), pairing]
        except Exception as error:  # noqa: BLE001 — a failed cell is reported, the others go on
            failures.append(f"{name}: {type(error).__name__}: {error}")
            log(f"sweep: cell {name} failed: {type(error).__name__}: {error}")
            continue
        cache_key = {"model_fingerprint": model_fp, "model_options": config.model_options,
                     "data_fingerprint": data_fp, "precision": args.precision}
        cache_id = digest(cache_key)
        if cache_id not in caches:
            main_rows = (method.train_data, method.data_format) == (config.train_data, config.data_format)
            caches[cache_id] = out / ("reference" if main_rows and out / "reference" not in caches.values()
                                      else f"reference_{method.name}")
        key = {"method": method.name,
               "evaluation": {**evaluation_key, "options": {**eval_options, "seed": eval_options["seed"] + seed}},
               "eval_every": config.eval_every, "model_options": config.model_options,
               "data": {"training_data_fingerprint": training_fp,
                        "data_format": method.data_format, "data_format_options": config.data_format_options,
                        "train_split": config.train_split},
               "train": training_key(args)}
        done, why = _read_keyed(run_dir / "result.json", key)
        if why:
            stale.setdefault(why, []).append(name)
        plans.append((name, method, beta, seed, args, data, train_examples, key, cache_key, caches[cache_id], done))
    if stale:
        log(f"sweep: recomputing {sum(map(len, stale.values()))} result(s) whose key changed: "
            + "; ".join(f"{', '.join(names)} ({why})" for why, names in stale.items()))
    if reference is None:
        reference_file.unlink(missing_ok=True)
        reference = {"method": "reference", "algo": "reference", "beta": math.nan, "seed": math.nan, **evaluate(ref),
                     "train_seconds": 0.0}
        _write_json(reference_file, {**reference, "key": reference_key})
    reference["beta"] = reference["seed"] = math.nan
    results.insert(0, reference)
    # A reference cache is rebuilt when its key (model, model options, tokenised data, precision) changed since the
    # sweep made it (recorded beside it in <cache>.key.json); until a cell has remade it, each cell recomputes it.
    fresh: set[Path] = set()
    for cache_key, path in {str(p[9]): (p[8], p[9]) for p in plans}.values():
        recorded = path.with_name(path.name + ".key.json")
        if path.exists() and (not recorded.is_file() or json.loads(recorded.read_text()) != json.loads(json.dumps(cache_key))):
            old = json.loads(recorded.read_text()) if recorded.is_file() else None
            log(f"sweep: rebuilding the reference cache {path} ({key_changes(old, json.loads(json.dumps(cache_key)))})")
        elif path.exists():
            fresh.add(path)
    bar = tqdm(plans, desc="sweep", disable=not progress)
    for name, method, beta, seed, args, data, train_examples, key, cache_key, cache, done in bar:
        bar.set_postfix_str(name)
        run_dir = out / "runs" / name
        result_file = run_dir / "result.json"
        if done is not None:
            results.append(done)
            continue
        result_file.unlink(missing_ok=True)  # never left beside a retrained cell
        try:
            curve = None
            if config.eval_every:
                curve = EvaluateEvery(config.eval_every, lambda policy, s=seed: evaluate(policy, s))
            args.ref_cache, args.recompute_ref = str(cache), cache not in fresh
            tick = time.perf_counter()
            run = train_run(ModelArguments(model_name_or_path=config.model, **config.model_options), data, args,
                            callbacks=[curve] if curve else None, train_dataset=train_examples, print_logs=False)
            if cache not in fresh:
                _write_json(cache.with_name(cache.name + ".key.json"), cache_key)
                fresh.add(cache)
            seconds = time.perf_counter() - tick - (curve.seconds if curve else 0.0)
            tick = time.perf_counter()
            policy = load_causal_lm(str(run.final_dir), device=device, dtype=dtype)
            final = evaluate(policy, seed)
            del policy
            row = {"method": method.name, "algo": method.algo, "beta": beta, "seed": seed, **final,
                   "train_seconds": seconds, "eval_seconds": time.perf_counter() - tick + (curve.seconds if curve else 0.0),
                   "steps": run.steps}
            if curve:
                row["curve"] = curve.points + [{"step": run.steps, **final}]
        except Exception as error:  # noqa: BLE001 — a failed cell is reported, the others go on
            failures.append(f"{name}: {type(error).__name__}: {error}")
            log(f"sweep: cell {name} failed: {type(error).__name__}: {error}")
            continue
        _write_json(result_file, {**row, "key": key})
        results.append(row)
    bar.close()
    extra = [k for k in reference if k not in RESULT_COLUMNS and k != "curve"] if evaluator.extra_columns else []
    write_results(results, out / "results.csv", extra_columns=extra)
    write_curves(curve_rows(results, out), out / "curves.csv")
    plot_reward_vs_kl(results, out / "reward_vs_kl.png",
                      title=f"{len(prompts)} evaluation prompts × {eval_options['num_samples']} samples, "
                            f"{len(config.seeds)} seed(s)")
    log(_summary(results, time.perf_counter() - started, out))
    if failures:
        raise SweepError(f"{len(failures)} of {len(cells)} sweep cells failed: " + "; ".join(failures), results)
    return results


def _write_json(path: Path, value: dict) -> None:
    """Write ``value`` as JSON at ``path`` atomically (``shiq_llm.storage.atomic.atomic_write``)."""
    from shiq_llm.storage.atomic import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(value, indent=2, default=str))


def check_sweep_held_out(config: SweepConfig) -> list:
    """The sweep's evaluation prompts, checked against the prompts of its training data
    (``shiq_llm.data.prompts.check_held_out``): ValueError with the counts and an example when any occurs there and
    ``config.leak == "error"``, a warning with them when ``"warn"``."""
    from shiq_llm.data.prompts import check_held_out, load_prompts

    prompts = load_prompts(config.eval_prompts, split=config.eval_split, prompt_field=config.eval_prompt_field,
                           format=config.eval_format, format_options=config.eval_format_options or None)
    train = load_prompts(config.train_data, split=config.train_split, format=config.data_format,
                         format_options=config.data_format_options or None, default_split="train")
    check_held_out(prompts, train, on_leak=config.leak, where="sweep evaluation",
                   advice="evaluate on held-out prompts (another eval_prompts or eval_split), or set leak: warn")
    return prompts


def write_results(results: Sequence[dict], path: Path, *, extra_columns: Sequence[str] = ()) -> Path:
    """Write result rows as CSV with the columns :data:`RESULT_COLUMNS` and ``extra_columns`` (the reference's β
    and seed empty)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*RESULT_COLUMNS, *extra_columns], extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return Path(path)


def curve_rows(results: Sequence[dict], out: str | Path) -> list[dict]:
    """One row per cell and step: ``method, algo, beta, seed, step``, the training log's :data:`TRAIN_LOG_KEYS`
    at the steps ``OUT/runs/<cell>/metrics.jsonl`` logged, and the evaluation's keys at the steps evaluated (the
    cell's ``curve``, else its final result at its last step; the reference's evaluation at step 0, where the
    policy is the reference). Sorted by cell, then step; a key not measured at a step is absent."""
    reference = next((r for r in results if r["algo"] == "reference"), None)
    not_measured = ("method", "algo", "beta", "seed", "train_seconds", "eval_seconds", "steps", "curve")
    measured = [k for k in (reference or {}) if k not in not_measured]
    rows = []
    for r in results:
        if r["algo"] == "reference":
            continue
        method = r.get("method", r["algo"])
        by_step: dict[int, dict] = {}
        if reference is not None:
            by_step[0] = {k: reference[k] for k in measured}
        log_file = Path(out) / "runs" / cell_name(method, r["beta"], r["seed"]) / "metrics.jsonl"
        if log_file.is_file():
            for record in read_jsonl(log_file, allow_empty=True, skip_broken_lines=True):
                if "loss" in record:
                    by_step.setdefault(record["step"], {}).update({k: record[k] for k in TRAIN_LOG_KEYS if k in record})
        for point in r.get("curve") or [{"step": r.get("steps", math.nan), **r}]:
            if isinstance(point["step"], int):
                by_step.setdefault(point["step"], {}).update({k: point[k] for k in measured if k in point})
        for step in sorted(by_step):
            rows.append({"method": method, "algo": r["algo"], "beta": r["beta"], "seed": r["seed"], "step": step,
                         **by_step[step]})
    return rows


def write_curves(rows: Sequence[dict], path: Path, *,
                 first: Sequence[str] = ("method", "algo", "beta", "seed", "step")) -> Path:
    """Write long rows (:func:`curve_rows`) as CSV: the ``first`` columns, then every other key in order of first
    appearance (empty where a row lacks it: not measured at that step)."""
    columns = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return Path(path)


def aggregate_over_seeds(results: Sequence[dict], keys: Sequence[str] = ("mean_reward", "kl")) -> list[dict]:
    """One row per (method, β): ``seeds`` and, for each of ``keys``, the mean over seeds with its error bars —
    ``<key>_sem`` (``reward_sem`` / ``kl_sem`` for ``mean_reward`` / ``kl``: the standard error over the seeds
    when there are several, else the single run's own) and ``<key>_ci``, the half-width of the 95 % Student-t
    interval over the seeds (:func:`shiq_toy.experiments.mean_ci`; NaN for one seed). The reference is kept."""
    from shiq_toy.experiments import mean_ci

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        method = r.get("method", r["algo"])
        groups.setdefault((method, r["beta"] if r["algo"] != "reference" else None), []).append(r)
    rows = []
    for (method, beta), members in groups.items():
        row = {"method": method, "algo": members[0]["algo"], "beta": members[0]["beta"], "seeds": len(members)}
        for key in keys:
            sem = _SEM_NAMES.get(key, f"{key}_sem")
            values = [m[key] for m in members]
            row[key], row[_CI_NAMES.get(key, f"{key}_ci")] = mean_ci(values)
            if len(values) > 1:
                row[sem] = statistics.stdev(values) / math.sqrt(len(values))
            else:
                row[sem] = members[0].get(sem, math.nan)
        rows.append(row)
    return rows


_SEM_NAMES = {"mean_reward": "reward_sem", "kl": "kl_sem"}
_CI_NAMES = {"mean_reward": "reward_ci", "kl": "kl_ci"}


def _summary(results: Sequence[dict], seconds: float, out: Path) -> str:
    lines = [f"{'method':<18} {'beta':>5} {'seeds':>5} {'mean_reward':>14} {'kl':>13}"]
    for r in aggregate_over_seeds(results):
        beta = "" if r["algo"] == "reference" else f"{r['beta']:g}"
        lines.append(f"{r['method']:<18} {beta:>5} {r['seeds']:>5} {r['mean_reward']:>7.3f} ±{r['reward_sem']:.3f} "
                     f"{r['kl']:>6.3f} ±{r['kl_sem']:.3f}")
    lines.append(f"results: {out / 'results.csv'}, {out / 'reward_vs_kl.png'}; {seconds:.0f} s")
    return "\n".join(lines)


def plot_reward_vs_kl(results: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Mean reward against KL(π‖π_ref) with error bars (:func:`aggregate_over_seeds`: ±1 standard error, over the
    seeds with several, else over the one run's samples — the title says which), one line per method
    through its β values (each point labelled), the reference as a star at KL = 0 and a dashed line at its
    reward (spec §5). The KL axis is symlog (linear below 0.1 nats), so small and large KLs both read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate_over_seeds(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "reference"]
    for k, algo in enumerate(methods):
        line = sorted((r for r in rows if r["method"] == algo), key=lambda r: -r["beta"])
        color = f"C{k}"
        ax.errorbar([r["kl"] for r in line], [r["mean_reward"] for r in line], xerr=[r["kl_sem"] for r in line],
                    yerr=[r["reward_sem"] for r in line], marker="o", color=color, capsize=2, label=algo)
        for r in line:
            ax.annotate(f"β={r['beta']:g}", (r["kl"], r["mean_reward"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
    for r in rows:
        if r["algo"] == "reference":
            ax.axhline(r["mean_reward"], color="grey", linestyle="--", linewidth=1)
            ax.plot([0.0], [r["mean_reward"]], marker="*", markersize=12, color="black", linestyle="none",
                    label="reference", clip_on=False, zorder=3)
    ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)  # linear near the reference's 0, logarithmic beyond 0.1
    ax.set_xlim(left=-0.02)
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats; exact per token, on π's samples; symlog)")
    ax.set_ylabel("mean reward of π's samples")
    seeds = max((r["seeds"] for r in rows if r["algo"] != "reference"), default=1)
    bars = ("error bars: ±1 standard error over the seeds" if seeds > 1 else
            "error bars: ±1 standard error over the evaluation samples of the one seed")
    ax.set_title(f"{title}\n{bars}" if title else bars, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
