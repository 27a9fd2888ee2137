"""Q3 on the embedded LLM task: train on a proxy reward that pays for a surface feature, judge on the true one.

``shiq-llm experiment misspecified --out runs/misspecified`` (``--quick`` for a small budget).

The embedded counting task of :mod:`shiq_llm.tasks.synthetic` (the ``shiq-llm demo`` reference and offline rows),
with every row relabelled by :func:`shiq_llm.tasks.synthetic.proxy_reward`: the true reward plus a bonus for each
word that is a large number (≥ ``LARGE_NUMBER``), whatever the prompt — an exploitable surface feature. ShiQ,
DPO, CoPG and DRO are trained on those rows for each β by the demo's sweep (:func:`shiq_llm.experiments.sweep.
run_sweep`, the same options as ``shiq-llm demo``) and each policy is evaluated on the held-out prompts twice
on the *same* samples (same sampling seed): with the true reward (the sweep) and with the proxy.

Writes, in ``args.out``: ``data/`` (unless ``--data``), ``train_proxy.jsonl``, ``sweep/`` (the sweep's runs,
results.csv, reward_vs_kl.png), ``misspecified_llm.csv`` (columns ``method,beta,seed,true_reward,true_reward_sem,
proxy_reward,kl,kl_sem``, the reference first) and ``misspecified_llm.png`` (true and proxy reward against
KL(π ‖ π_ref), one curve per method across β).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from shiq_toy.options import apply_preset, option

__all__ = ["ProxyArgs", "relabel", "main"]

CSV_HEADER = ["method", "beta", "seed", "true_reward", "true_reward_sem", "proxy_reward", "kl", "kl_sem"]


@dataclass
class ProxyArgs:
    """Arguments of the embedded-task flawed-reward experiment."""

    out: Path = option(Path("runs/misspecified"), 'directory for data/, train_proxy.jsonl, sweep/, '
                       'misspecified_llm.csv and misspecified_llm.png', aliases=("output_dir",), path="out_dir")
    data: str = option("", 'an existing `shiq-llm make-data` directory to reuse (default: build it in OUT/data)', aliases=("dataset_name",), path="in_dir")
    bonus: float = option(1.0, "what the proxy pays per large-number word, in units of a correct word's reward (1 = "
                          'as much)')
    algos: tuple[str, ...] = option(("shiq", "dpo", "copg", "dro"), 'methods trained')
    betas: tuple[float, ...] = option((0.1, 0.3, 1.0), 'β of every method')
    steps: int = option(150, 'optimizer steps per run (as shiq-llm demo)')
    lr: float = option(1e-3, 'AdamW learning rate (linear decay)', aliases=("learning_rate",))
    batch_size: int = option(32, 'sequences per step')
    eval_samples: int = option(16, 'completions sampled per held-out prompt')
    seed: int = option(0, 'seed of the reference, the data, the runs and the evaluation samples')
    quick: bool = option(False, 'a small budget (QUICK): shiq and dpo at β = 0.1 and 1, 60 steps, 8 samples per prompt, except '
                         'the options given explicitly')
    threads: int = option(1, 'torch CPU threads')


QUICK = {"algos": ("shiq", "dpo"), "betas": (0.1, 1.0), "steps": 60, "eval_samples": 8}


def relabel(source: Path, target: Path, *, bonus: float) -> int:
    """Copy the JSONL rows of ``source`` to ``target`` with ``reward`` = :func:`~shiq_llm.tasks.synthetic.proxy_reward`
    (the true one kept as ``true_reward``); returns the number of rows."""
    from shiq_llm.storage.jsonl import read_jsonl, write_jsonl
    from shiq_llm.tasks.synthetic import proxy_reward

    rows = read_jsonl(source)
    for row in rows:
        row["true_reward"] = row["reward"]
        row["reward"] = proxy_reward(row["prompt"], row["completion"], bonus=bonus)
    write_jsonl(rows, target)
    return len(rows)


def _proxy_rewards(results: list[dict], sweep_out: Path, config, args: ProxyArgs) -> list[float]:
    """The proxy reward of each result's policy on the same held-out samples as its true reward."""
    from functools import partial

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shiq_llm.data.prompts import load_prompts
    from shiq_llm.experiments.sweep import cell_name
    from shiq_llm.generation.evaluate import evaluate_policy
    from shiq_llm.tasks.synthetic import proxy_reward

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ref = AutoModelForCausalLM.from_pretrained(config.model).eval()
    prompts = load_prompts(config.eval_prompts, split=config.eval_split)
    options = {"num_samples": 16, "max_new_tokens": 16, "seed": 1, **config.evaluation}  # as run_sweep
    out = []
    for row in results:
        if row["algo"] == "reference":
            policy = ref
        else:
            policy = AutoModelForCausalLM.from_pretrained(sweep_out / "runs" / cell_name(row["algo"], row["beta"], row["seed"]) / "final").eval()
        metrics = evaluate_policy(policy, ref, tokenizer, prompts, reward_fn=partial(proxy_reward, bonus=args.bonus), **options)
        if not math.isclose(metrics["kl"], row["kl"], rel_tol=1e-6, abs_tol=1e-9):  # same samples, same KL
            raise RuntimeError(f"re-evaluating {row['algo']} β={row['beta']} drew other samples (KL {metrics['kl']} ≠ {row['kl']})")
        out.append(metrics["mean_reward"])
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot(rows: list[dict], path: Path, *, title: str) -> None:
    """True (left) and proxy (right) mean reward against KL(π ‖ π_ref), one curve per method across β."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    reference = next(r for r in rows if r["method"] == "reference")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "reference"]
    for ax, key in zip(axes, ("true_reward", "proxy_reward")):
        for i, method in enumerate(methods):
            points = sorted((r["kl"], r[key], r["beta"], r.get(f"{key}_sem"), r.get("kl_sem"))
                            for r in rows if r["method"] == method)
            yerr = [1.96 * p[3] if _finite(p[3]) else 0.0 for p in points]
            xerr = [1.96 * p[4] if _finite(p[4]) else 0.0 for p in points]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=yerr, xerr=xerr, fmt="o-", ms=4, capsize=2,
                        color=f"C{i}", label=method)
            for kl, value, beta, *_ in points:
                ax.annotate(f"β={beta:g}", (kl, value), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(reference[key], color="0.4", ls="--", lw=1, label="reference (KL = 0)")
        ax.set(xscale="log", xlabel="KL(π ‖ π_ref) on the policy's samples (nats, log scale)",
               ylabel=f"mean {key.replace('_', ' ')}",
               title="judged on the true reward" if key == "true_reward" else "the proxy it was trained on")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}\nbars: 95 % normal intervals (±1.96 standard errors) over one seed's evaluation samples; "
                 "proxy reward: no bar (its error not measured)", fontsize=9)
    fig.savefig(path, dpi=120)


def main(args: ProxyArgs) -> list[dict]:
    """Build or reuse the data, relabel it with the proxy, run the sweep, evaluate the proxy; write the CSV
    and the figure. Returns the rows."""
    from shiq_llm.experiments.demo import DemoConfig, demo_sweep_config
    from shiq_llm.experiments.sweep import run_sweep
    from shiq_llm.tasks import synthetic
    from shiq_toy.experiments import num_threads, write_csv

    if args.quick:  # the preset changes the fields still at their defaults (the command line applies it itself)
        args = apply_preset(args, QUICK)
    if not (args.bonus >= 0 and math.isfinite(args.bonus)):
        raise ValueError(f"bonus must be a finite number >= 0, got {args.bonus}")
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with num_threads(args.threads):
        data_dir = Path(args.data) if args.data else out / "data"
        if args.data and not (data_dir / "train.jsonl").is_file():
            raise ValueError(f"--data {data_dir}: no train.jsonl (make it with `shiq-llm make-data --out {data_dir}`)")
        if not args.data:  # built once per seed (one built with another seed is refused, never reused)
            from shiq_llm.experiments.demo import prepare_single_turn_data

            defaults = synthetic.ReferenceConfig()
            prepare_single_turn_data(data_dir, None, ref_steps=defaults.steps, completions_per_prompt=16,
                                     max_new_tokens=12, seed=args.seed)
        count = relabel(data_dir / "train.jsonl", out / "train_proxy.jsonl", bonus=args.bonus)
        demo = DemoConfig(out=str(out / "sweep"), algos=args.algos, betas=args.betas, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, eval_samples=args.eval_samples, seed=args.seed, progress=False)
        config = dataclasses.replace(demo_sweep_config(demo, data_dir), train_data=str(out / "train_proxy.jsonl"))
        results = run_sweep(config, progress=False)
        proxy = _proxy_rewards(results, out / "sweep", config, args)
    rows = [
        {"method": r["algo"], "beta": r["beta"], "seed": r["seed"], "true_reward": r["mean_reward"], "true_reward_sem": r["reward_sem"],
         "proxy_reward": p, "kl": r["kl"], "kl_sem": r["kl_sem"]}
        for r, p in zip(results, proxy)
    ]
    write_csv(out / "misspecified_llm.csv", CSV_HEADER, ([row[k] for k in CSV_HEADER] for row in rows))
    plot(rows, out / "misspecified_llm.png",
         title=f"embedded task, {count} offline rows labelled with a proxy paying {args.bonus:g}× a correct word per large "
               f"number;\n{args.steps} steps per run, one seed ({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":  # the command moved to the one command line (shiq_llm.cli), which this layer never imports
    raise SystemExit("python -m shiq_llm.experiments.misspecified is now: shiq-llm experiment misspecified --out DIR "
                     "[--quick] (shiq-llm experiment misspecified --help: every option)")
