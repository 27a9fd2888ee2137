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

Hub-scale sweeps (``recipes/``) add the adapter of the rows (``data_format``, ``data_format_options``), hub
prompts (``eval_prompts: HuggingFaceH4/ultrafeedback_binarized``, ``eval_split: test_prefs[:500]``,
``eval_format``), a reward model (``reward_model``) or a reward with options (``reward_options``), LoRA and
dtype for every cell (``model_options``) and the evaluation's ``device`` / ``dtype`` (:class:`SweepConfig`).

What it does (:func:`run_sweep`): the evaluation prompts are checked against the training data first (none
may occur there: ``leak: error``, the default, refuses the sweep naming the counts; ``leak: warn`` logs them);
the reference statistics are computed once, in ``OUT/reference`` (with DRO's
prompt states when a method needs them), and shared by every cell; each cell trains with
:func:`shiq_llm.run.train_run` into ``OUT/runs/<algo>_beta<β>_seed<s>`` (pair methods take half as many pairs
as ``per_device_train_batch_size``, i.e. as many sequences) and is evaluated on the held-out prompts
(:func:`shiq_llm.evaluate.evaluate_policy`: mean reward of its own samples, exact and Monte-Carlo KL); its
result is written to ``OUT/runs/<cell>/result.json`` last, atomically, so a re-run skips finished cells. A
cell that fails is reported and the others go on. ``OUT/results.csv`` holds one row per finished cell
(:data:`RESULT_COLUMNS`) plus the reference; ``OUT/reward_vs_kl.png`` plots, per method across β, the mean over
seeds with error bars (the standard error over seeds with several seeds, else the run's own).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["SweepConfig", "load_sweep_config", "run_sweep", "check_sweep_held_out", "RESULT_COLUMNS", "EVALUATION_KEYS",
           "write_results", "plot_reward_vs_kl", "aggregate_over_seeds", "cell_name"]

logger = logging.getLogger(__name__)

#: Columns of ``results.csv`` (the reference row has no β, seed or training time).
RESULT_COLUMNS = (
    "algo", "beta", "seed", "mean_reward", "reward_sem", "kl", "kl_sem", "kl_mc", "mean_length", "finished",
    "num_samples", "train_seconds",
)


@dataclass
class SweepConfig:
    """A sweep (module docstring). Every key of the YAML file is a field; unknown keys are refused."""

    out: str
    """Output directory: results.csv, reward_vs_kl.png, reference/ (shared statistics), runs/<cell>/."""
    model: str
    """The reference model (hub name or path): the initial policy of every cell and the KL's reference."""
    train_data: str
    """Training rows: a file or hub dataset (as ``shiq-llm train --dataset_name``)."""
    algos: list[str]
    """Methods of the grid (``shiq_llm.config.LLM_METHODS``)."""
    betas: list[float]
    """β values of the grid."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds of the grid (data order, value head); the evaluation seed is ``evaluation.seed``."""
    data_format: str | None = None
    """Adapter of the training rows (``shiq_llm.adapters``), if they are not canonical."""
    data_format_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of that adapter (e.g. ``{score: fine-grained_score}`` for ultrafeedback)."""
    train_split: str = "train"
    """Split of a hub dataset ``train_data`` (``shiq-llm train --dataset_train_split``)."""
    eval_prompts: str = "synthetic"
    """Evaluation prompts, as ``shiq-llm evaluate --prompts``: 'synthetic', a .txt, a .jsonl/.json/.parquet file
    or a hub dataset."""
    eval_split: str = "eval"
    """Split of the evaluation prompts ('eval' of the synthetic ones: held out from training; a hub split such as
    'test' or 'test_prefs[:500]')."""
    eval_format: str | None = None
    """Adapter of the evaluation prompt rows (as ``shiq-llm evaluate --format``)."""
    eval_format_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of that adapter."""
    eval_prompt_field: str | None = None
    """Field of the evaluation rows that holds the prompt (default 'prompt', else the messages of 'messages')."""
    leak: str = "error"
    """When evaluation prompts also occur in the training data: 'error' refuses the sweep (naming the counts and
    an example) before anything trains, 'warn' logs the counts and goes on."""
    reward: str | None = None
    """Reward of the evaluation: 'synthetic' or 'module:function', f(prompt, completion) -> float (default
    'synthetic' unless ``reward_model`` is given)."""
    reward_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to the ``reward`` callable (e.g. ``{answers: runs/bfcl/eval_rows.jsonl}`` for
    ``shiq_llm.bfcl:first_step_reward``)."""
    reward_model: str | None = None
    """A sequence-classification reward model (hub name or path, one label) instead of ``reward``
    (``shiq_llm.rewards.RewardModel``, on ``evaluation.device``)."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """``ModelArguments`` of every cell other than the model (dtype, use_peft, lora_r, …)."""
    train: dict[str, Any] = field(default_factory=dict)
    """``ShiQConfig`` options shared by every cell (learning_rate, max_steps, per_device_train_batch_size, …)."""
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Options of ``evaluate_policy`` (num_samples, max_new_tokens, seed, batch_size, chunk_size) and where it runs:
    device ('auto': cuda when available), dtype (as ``shiq-llm evaluate --dtype``), reward_batch_size."""


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
    _check(config, str(path))
    return config


#: Keys of a sweep file's ``evaluation`` mapping.
EVALUATION_KEYS = {"num_samples", "max_new_tokens", "seed", "batch_size", "chunk_size", "device", "dtype",
                   "reward_batch_size"}


def _check(config: SweepConfig, where: str) -> None:
    from shiq_llm.config import LLM_METHODS, ModelArguments
    from shiq_llm.prompts import LEAK_POLICIES

    bad = [a for a in config.algos if a not in LLM_METHODS]
    if not config.algos or bad:
        raise ValueError(f"{where}: algos must be a non-empty list of {list(LLM_METHODS)}, got {config.algos}")
    if not config.betas or not all(isinstance(b, (int, float)) and b > 0 and math.isfinite(b) for b in config.betas):
        raise ValueError(f"{where}: betas must be a non-empty list of finite numbers > 0, got {config.betas}")
    if not config.seeds or not all(isinstance(s, int) for s in config.seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers, got {config.seeds}")
    for key in ("output_dir", "loss_type", "beta", "seed", "ref_cache"):
        if key in config.train:
            raise ValueError(f"{where}: train.{key} is set by the sweep itself (out, algos, betas, seeds)")
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


def cell_name(algo: str, beta: float, seed: int) -> str:
    return f"{algo}_beta{beta:g}_seed{seed}"


def _write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def run_sweep(config: SweepConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Run the sweep (module docstring); returns the result rows, the reference first. Finished cells are read
    back, not retrained. Raises RuntimeError after writing every output when some cell failed."""
    from tqdm.auto import tqdm

    from shiq_llm.config import DataArguments, ModelArguments, ShiQConfig
    from shiq_llm.evaluate import evaluate_policy
    from shiq_llm.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from shiq_llm.rewards import RewardFunction, load_reward
    from shiq_llm.run import train_run
    from shiq_toy.methods import METHODS

    _check(config, "sweep")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prompts = check_sweep_held_out(config)
    eval_options = {"num_samples": 16, "max_new_tokens": 16, "seed": 1, **config.evaluation}
    device = resolve_device(eval_options.pop("device", "auto"))
    dtype = resolve_dtype(eval_options.pop("dtype", "auto"), device)
    reward_fn = load_reward(config.reward or (None if config.reward_model else "synthetic"), config.reward_model,
                            device=device, dtype=str(dtype).removeprefix("torch."),
                            batch_size=eval_options.pop("reward_batch_size", 16))
    if config.reward_options:
        bound = functools.partial(reward_fn.fn, **config.reward_options)
        bound.batched = reward_fn.batched
        reward_fn = RewardFunction(bound, name=reward_fn.name)
    tokenizer = load_tokenizer(config.model)
    ref = load_causal_lm(config.model, device=device, dtype=dtype)

    def evaluate(policy) -> dict:
        return evaluate_policy(policy, ref, tokenizer, prompts, reward_fn=reward_fn, **eval_options)

    reference_file = out / "reference_result.json"
    if reference_file.is_file():
        reference = json.loads(reference_file.read_text())
    else:
        reference = {"algo": "reference", "beta": math.nan, "seed": math.nan, **evaluate(ref), "train_seconds": 0.0}
        _write_json_atomically(reference_file, reference)
    reference["beta"] = reference["seed"] = math.nan
    results, failures = [reference], []
    value_algos = [a for a in config.algos if METHODS[a].needs_value]
    cells = [(a, b, s) for a in sorted(config.algos, key=lambda a: a not in value_algos)  # the cache's first
             for b in config.betas for s in config.seeds]
    bar = tqdm(cells, desc="sweep", disable=not progress)
    for algo, beta, seed in bar:
        name = cell_name(algo, beta, seed)
        bar.set_postfix_str(name)
        run_dir = out / "runs" / name
        result_file = run_dir / "result.json"
        if result_file.is_file():
            results.append(json.loads(result_file.read_text()))
            continue
        pairs = METHODS[algo].consumes == "pairs"
        options = {"per_device_train_batch_size": 8, "save_strategy": "no", "logging_steps": 10, "report_to": "none",
                   **config.train}
        if pairs:
            options["per_device_train_batch_size"] = max(1, options["per_device_train_batch_size"] // 2)
        try:
            tick = time.perf_counter()
            args = ShiQConfig(output_dir=str(run_dir), loss_type=algo, beta=beta, seed=seed,
                              ref_cache=str(out / "reference"), overwrite_output_dir=True, disable_tqdm=True,
                              **options)
            run = train_run(ModelArguments(model_name_or_path=config.model, **config.model_options),
                            DataArguments(dataset_name=config.train_data, data_format=config.data_format,
                                          data_format_options=config.data_format_options or None,
                                          dataset_train_split=config.train_split), args,
                            quiet=True)
            seconds = time.perf_counter() - tick
            policy = load_causal_lm(str(run.final_dir), device=device, dtype=dtype)
            row = {"algo": algo, "beta": beta, "seed": seed, **evaluate(policy), "train_seconds": seconds}
            del policy
        except Exception as error:  # noqa: BLE001 — a failed cell is reported, the others go on
            failures.append(f"{name}: {type(error).__name__}: {error}")
            log(f"sweep: cell {name} failed: {type(error).__name__}: {error}")
            continue
        _write_json_atomically(result_file, row)
        results.append(row)
    bar.close()
    write_results(results, out / "results.csv")
    plot_reward_vs_kl(results, out / "reward_vs_kl.png",
                      title=f"{len(prompts)} evaluation prompts × {eval_options['num_samples']} samples, "
                            f"{len(config.seeds)} seed(s)")
    log(_summary(results, time.perf_counter() - started, out))
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(cells)} sweep cells failed: " + "; ".join(failures))
    return results


def check_sweep_held_out(config: SweepConfig) -> list:
    """The sweep's evaluation prompts, checked against the prompts of its training data
    (``shiq_llm.prompts.check_held_out``): ValueError with the counts and an example when any occurs there and
    ``config.leak == "error"``, a warning with them when ``"warn"``."""
    from shiq_llm.prompts import check_held_out, load_prompts

    prompts = load_prompts(config.eval_prompts, split=config.eval_split, prompt_field=config.eval_prompt_field,
                           format=config.eval_format, format_options=config.eval_format_options or None)
    train = load_prompts(config.train_data, split=config.train_split, format=config.data_format,
                         format_options=config.data_format_options or None, default_split="train")
    check_held_out(prompts, train, on_leak=config.leak, where="sweep evaluation",
                   advice="evaluate on held-out prompts (another eval_prompts or eval_split), or set leak: warn")
    return prompts


def write_results(results: Sequence[dict], path: Path) -> Path:
    """Write result rows as CSV with the columns :data:`RESULT_COLUMNS` (the reference's β and seed empty)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return Path(path)


def aggregate_over_seeds(results: Sequence[dict]) -> list[dict]:
    """One row per (algo, β): means over seeds of reward and KL, with error bars — the standard error over the
    seeds when there are several, else the single run's own standard errors. The reference is kept as is."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["algo"], r["beta"] if r["algo"] != "reference" else None), []).append(r)
    rows = []
    for (algo, beta), members in groups.items():
        row = {"algo": algo, "beta": members[0]["beta"], "seeds": len(members)}
        for key, sem in (("mean_reward", "reward_sem"), ("kl", "kl_sem")):
            values = [m[key] for m in members]
            row[key] = sum(values) / len(values)
            if len(values) > 1:
                var = sum((v - row[key]) ** 2 for v in values) / (len(values) - 1)
                row[sem] = math.sqrt(var / len(values))
            else:
                row[sem] = members[0][sem]
        rows.append(row)
    return rows


def _summary(results: Sequence[dict], seconds: float, out: Path) -> str:
    lines = [f"{'algo':<10} {'beta':>5} {'seeds':>5} {'mean_reward':>14} {'kl':>13}"]
    for r in aggregate_over_seeds(results):
        beta = "" if r["algo"] == "reference" else f"{r['beta']:g}"
        lines.append(f"{r['algo']:<10} {beta:>5} {r['seeds']:>5} {r['mean_reward']:>7.3f} ±{r['reward_sem']:.3f} "
                     f"{r['kl']:>6.3f} ±{r['kl_sem']:.3f}")
    lines.append(f"results: {out / 'results.csv'}, {out / 'reward_vs_kl.png'}; {seconds:.0f} s")
    return "\n".join(lines)


def plot_reward_vs_kl(results: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Mean reward against KL(π‖π_ref) with error bars (:func:`aggregate_over_seeds`), one line per method
    through its β values (each point labelled), the reference as a star at KL = 0 and a dashed line at its
    reward (spec §5). The KL axis is symlog (linear below 0.1 nats), so small and large KLs both read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate_over_seeds(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods = [a for a in dict.fromkeys(r["algo"] for r in rows) if a != "reference"]
    for k, algo in enumerate(methods):
        line = sorted((r for r in rows if r["algo"] == algo), key=lambda r: -r["beta"])
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
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
