"""Credit assignment in dialogues: ShiQ with per-turn rewards against ShiQ given only the final reward, its one-step
and first-state ablations and the sequence-level baselines, on the embedded multi-turn task (``shiq_llm.tasks.multiturn``).

``shiq-llm experiment multiturn --out DIR [--quick]``. The task's reference and offline dialogues (the reference's
own samples with the tool in the loop, one reward per agent turn) are built once in ``DIR/data`` (or reused with
``--data``); then one sweep (:func:`shiq_llm.experiments.sweep.run_sweep`, in ``DIR/sweep``) trains every method ×
β × seed and evaluates each policy on its own dialogues on held-out prompts, during training (every
``eval_every`` steps) and at the end. The methods (:data:`METHODS`):

- ``shiq``: ShiQ on the per-turn rewards (each turn's reward on its last token);
- ``shiq_final_reward``: ShiQ on the same dialogues with every reward moved to the last turn, which carries
  the sum (:func:`final_reward_rows`): the sequence-level information only;
- ``shiq_ms`` (one-step residual), ``shiq_tk`` (the first state's equation only), on the per-turn rewards;
- ``dpo``, ``copg``, ``dro``: sequence-level baselines; they read the summed reward ``R = Σ_k r_k`` of a row.

Writes, in ``args.out``:

- ``multiturn.csv``: long format, one row per (method, β, seed, step): ``method, algo, beta, seed, step``, the
  training log at logged steps (``loss``, ``abs_residual``, ``kl_estimate``, ``nll``, ``implicit_value``) and the
  evaluation at evaluated steps (``mean_reward`` = episode reward in [0, 3], ``success``, ``reward_turn{k}``,
  ``success_turn{k}``, ``kl`` = exact KL(π‖π_ref) summed over the agent tokens, ``kl_turn{k}``, …); step 0 is the
  reference;
- ``multiturn.png``: episode reward, episode success and each turn's reward against KL (mean over seeds and
  95 % intervals, one line per method through its β values), and episode reward over training steps;
- ``multiturn_table.md``: the final numbers per β with 95 % intervals over seeds, and ShiQ's differences
  (paired t-tests on seed-matched runs, Holm-adjusted over the table, TOST equivalence within :data:`MARGINS`;
  ``shiq_llm.experiments.report``); ``multiturn_summary.json``: the same, the arguments, the run time of this call (``seconds``; a re-run
  skips the finished cells) and the wall time of training and evaluating every cell (``cell_seconds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from shiq_toy.options import option

__all__ = ["MultiturnArgs", "METHODS", "FINAL_REWARD", "QUICK", "final_reward_rows", "prepare_multiturn_data",
           "write_eval_prompts", "train_options", "collect", "MARGINS", "tables_of", "plot", "main"]

FINAL_REWARD = "shiq_final_reward"
#: The methods of the experiment, in the order of the figure and the table.
METHODS = ("shiq", FINAL_REWARD, "shiq_ms", "shiq_tk", "dpo", "copg", "dro")


@dataclass
class MultiturnArgs:
    """Arguments of the multi-turn experiment (``shiq-llm experiment multiturn``); the defaults are the README's run."""

    out: Path = option(Path("results/multiturn"), "directory for multiturn.csv, multiturn.png, multiturn_table.md, multiturn_summary.json, data/ and sweep/", aliases=("output_dir",), path="out_dir")
    methods: tuple[str, ...] = option(METHODS, "methods: shiq_final_reward (shiq on the summed reward, on the last turn) or any shiq-llm train --loss_type")
    betas: tuple[float, ...] = option((0.1, 0.3), "KL regularisation β of every method")
    seeds: int = option(3, "training seeds per (method, β): seed, seed+1, …; they change the batch order and the evaluation samples")
    seed: int = option(0, "first training seed; also the seed of the reference and its dialogues")
    steps: int = option(100, "optimizer steps per run")
    batch_size: int = option(32, "dialogues per step (dpo and copg: batch_size // 2 pairs)")
    lr: float = option(1e-3, "AdamW learning rate (linear decay), the same for every method", aliases=("learning_rate",))
    log_every: int = option(5, "training-log interval in steps (the loss at step 1, before any update, is logged too)")
    eval_every: int = option(25, "evaluate the policy every this many steps during training, for reward over training steps (0: only at the end)")
    eval_prompts: int = option(32, "held-out prompts of the evaluation (the first of the data's eval_prompts.jsonl)")
    eval_samples: int = option(4, "dialogues sampled per held-out prompt at each evaluation")
    max_new_tokens: int = option(12, "generation budget per agent turn")
    train_prompts: int = option(256, "training prompts of the offline data (built in OUT/data unless --data is given)")
    samples_per_prompt: int = option(8, "dialogues sampled from the reference per training prompt")
    ref_steps: int = option(400, "supervised steps of the reference (shiq_llm.tasks.multiturn.REFERENCE)")
    data: str = option("", "an existing shiq-llm make-multiturn-data directory to use instead of building OUT/data", aliases=("dataset_name",), path="in_dir")
    curve_beta: float = option(0.0, "β whose reward over training steps is plotted (0: the first of betas)")
    threads: int = option(1, "torch CPU threads (1 is fastest for the tiny model)")
    progress: bool = option(True, "show a progress bar over the sweep's cells")
    tables_from: str = option("", "an existing multiturn.csv: re-derive the figure and the table from it into OUT, without training")


#: ``--quick``: every method, 2 seeds, one β, 20 short steps on a smaller data set (the same reference): a check that
#: the whole pipeline runs, in about a minute of one CPU core; too little training to rank the methods.
QUICK = MultiturnArgs(betas=(0.1,), seeds=2, steps=20, batch_size=16, log_every=2, eval_every=10, eval_prompts=16,
                      eval_samples=2, train_prompts=48, samples_per_prompt=4)


def final_reward_rows(rows: list[dict]) -> list[dict]:
    """The same dialogues with only a final reward: every turn's reward 0 except the last, which carries the sum
    (``[r1, r2, r3]`` → ``[0, 0, r1 + r2 + r3]``). Sequence-level methods see the same rows either way."""
    out = []
    for row in rows:
        rewards = [float(r) for r in row["rewards"]]
        out.append({**row, "rewards": [0.0] * (len(rewards) - 1) + [sum(rewards)]})
    return out


def prepare_multiturn_data(default: Path, given: str, *, train_prompts: int, samples_per_prompt: int, ref_steps: int,
                           max_new_tokens: int, seed: int, progress: bool = False) -> Path:
    """The task's data directory: ``given`` (checked) or ``default``, built once with these settings
    (:func:`shiq_llm.tasks.multiturn.make_multiturn_data`; ``shiq_llm.experiments.prepare_data``)."""
    from shiq_llm.experiments import prepare_data
    from shiq_llm.tasks import multiturn

    reference = replace(multiturn.REFERENCE, steps=ref_steps, seed=seed)
    settings = {"reference": reference.__dict__, "train_prompts": train_prompts, "samples_per_prompt": samples_per_prompt,
                "max_new_tokens": max_new_tokens, "seed": seed}

    def build(path: Path) -> None:
        multiturn.make_multiturn_data(path, reference=reference, samples_per_prompt=samples_per_prompt,
                                      train_prompts=train_prompts, max_new_tokens=max_new_tokens, seed=seed,
                                      progress=progress)

    return prepare_data(given, default, settings, build, command="shiq-llm make-multiturn-data")


def check_args(args: MultiturnArgs) -> None:
    from shiq_llm.train.config import LLM_METHODS

    bad = [m for m in args.methods if m not in (*LLM_METHODS, FINAL_REWARD)]
    if not args.methods or bad:
        raise ValueError(f"methods must be a non-empty subset of {[*LLM_METHODS, FINAL_REWARD]}, got {list(args.methods)}")
    if not args.betas or not all(b > 0 and math.isfinite(b) for b in args.betas):
        raise ValueError(f"betas must be finite numbers > 0, got {list(args.betas)}")
    for name in ("seeds", "steps", "batch_size", "log_every", "eval_prompts", "eval_samples", "max_new_tokens",
                 "train_prompts", "samples_per_prompt", "ref_steps", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (pair methods train on batch_size // 2 pairs), got {args.batch_size}")
    if args.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {args.eval_every}")
    if args.curve_beta and args.curve_beta not in args.betas:
        raise ValueError(f"curve_beta {args.curve_beta} is not one of betas {list(args.betas)}")


def train_options(*, lr: float, steps: int, batch_size: int, log_every: int) -> dict:
    """The ``ShiQConfig`` options of every run of the LLM experiments (the demo's: AdamW with linear decay, gradient
    norm clipped at 1), logging every ``log_every`` steps and at step 1 (the initial loss)."""
    return {"learning_rate": lr, "lr_scheduler_type": "linear", "max_steps": steps,
            "per_device_train_batch_size": batch_size, "max_grad_norm": 1.0, "logging_steps": log_every,
            "logging_first_step": True}


def write_eval_prompts(data: Path, count: int, path: Path) -> list[str]:
    """The first ``count`` prompts of ``data/eval_prompts.jsonl``, written to ``path``; ValueError when it has fewer."""
    from shiq_llm.storage.jsonl import read_jsonl, write_jsonl

    prompts = [r["prompt"] for r in read_jsonl(data / "eval_prompts.jsonl")]
    if len(prompts) < count:
        raise ValueError(f"{data / 'eval_prompts.jsonl'} has {len(prompts)} prompts, fewer than eval_prompts={count}")
    write_jsonl(({"prompt": p} for p in prompts[:count]), path)
    return prompts[:count]


def collect(args: MultiturnArgs, out: Path):
    """The experiment's one sweep (module docstring), on the data built in ``OUT/data`` or given."""
    from shiq_llm.experiments.driver import sweep_tasks
    from shiq_llm.experiments.sweep import SweepConfig
    from shiq_llm.storage.jsonl import read_jsonl, write_jsonl

    def configs():
        data = prepare_multiturn_data(out / "data", args.data, train_prompts=args.train_prompts,
                                      samples_per_prompt=args.samples_per_prompt, ref_steps=args.ref_steps,
                                      max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress)
        write_eval_prompts(data, args.eval_prompts, out / "eval_prompts.jsonl")
        variants = {}
        if FINAL_REWARD in args.methods:
            final = write_jsonl(final_reward_rows(read_jsonl(data / "train.jsonl")), out / "train_final_reward.jsonl")
            variants[FINAL_REWARD] = {"algo": "shiq", "train_data": str(final)}
        yield None, SweepConfig(
            out=str(out / "sweep"), model=str(data / "reference"), train_data=str(data / "train.jsonl"),
            algos=[m for m in args.methods if m != FINAL_REWARD], variants=variants, betas=list(args.betas),
            seeds=list(range(args.seed, args.seed + args.seeds)), eval_prompts=str(out / "eval_prompts.jsonl"),
            evaluator="dialogues", eval_every=args.eval_every,
            train=train_options(lr=args.lr, steps=args.steps, batch_size=args.batch_size, log_every=args.log_every),
            evaluation={"num_samples": args.eval_samples, "max_new_tokens": args.max_new_tokens, "seed": 1000 + args.seed})

    return sweep_tasks(configs, args.progress)


def main(args: MultiturnArgs) -> dict:
    """Run the experiment (module docstring) with the experiments' driver (``shiq_llm.experiments.driver``);
    returns the summary also written to ``multiturn_summary.json``."""
    from shiq_llm.experiments.driver import Experiment, run

    return run(Experiment("multiturn", ("method", "algo", "beta", "seed", "step"), check_args, collect, tables_of, plot),
               args)


def _turns(reference: dict) -> int:
    return int(reference["max_reward"])


#: Equivalence margins of the multi-turn table's comparisons ("no difference" only within these, by TOST).
MARGINS = {"mean_reward": 0.1, "success": 0.05, "kl": 0.1}


def tables_of(rows: list[dict], references: dict, args: MultiturnArgs) -> dict:
    """The final numbers per (method, β) (mean ± 95 % t-interval over seeds), the reference with its interval over
    dialogues, and ShiQ's differences: paired t-tests on seed-matched runs (every method trains on the same
    dialogues with the same seeds), Holm-adjusted over the table, TOST equivalence within :data:`MARGINS`."""
    from shiq_llm.experiments.report import (
        PM_MEANING,
        compare,
        comparison_table,
        final_rows,
        fmt_ci,
        markdown_table,
        reference_cell,
        summarise,
        verdicts,
    )

    reference = references[None] if None in references else next(iter(references.values()))
    turns = _turns(reference)
    keys = ["mean_reward", "success", *(f"reward_turn{k}" for k in range(1, turns + 1)), "kl", "initial_loss"]
    finals = final_rows(rows)
    summary = summarise(finals, ("method", "beta"), keys)
    order = {m: i for i, m in enumerate(args.methods)}
    summary.sort(key=lambda r: (r["beta"], order.get(r["method"], len(order))))
    header = ["β", "method", "episode reward (of 3)", "success", *(f"turn {k}" for k in range(1, turns + 1)), "KL"]
    body = [["–", "reference", reference_cell(reference, "mean_reward", "reward_sem"),
             f"{reference['success']:.2f}", *(f"{reference[f'reward_turn{k}']:.2f}" for k in range(1, turns + 1)), "0"]]
    body += [[f"{r['beta']:g}", r["method"], fmt_ci(r, "mean_reward"), fmt_ci(r, "success"),
              *(fmt_ci(r, f"reward_turn{k}") for k in range(1, turns + 1)), fmt_ci(r, "kl")] for r in summary]
    comparisons = []
    methods = {r["method"] for r in finals}
    if "shiq" in methods:
        for other in (m for m in args.methods if m != "shiq" and m in methods):
            for key in ("mean_reward", "success", "kl"):
                comparisons += compare(finals, key, "shiq", other, margin=MARGINS[key])
    comparisons = verdicts(comparisons)
    seeds = {r["method"]: r.get("mean_reward_n", 0) for r in summary}
    steps = max((r["step"] for r in finals), default=args.steps)
    markdown = (f"Final policies after {steps} steps; mean over {min(seeds.values(), default=0)}–"
                f"{max(seeds.values(), default=0)} seeds; {PM_MEANING}. The reference is evaluated once: its "
                "episode reward carries the 95 % normal interval over its dialogues (± 1.96 standard errors), the "
                f"other reference values none. {args.eval_prompts} held-out prompts × {args.eval_samples} dialogues "
                "per evaluation; KL in nats, summed over the agent tokens.\n\n"
                + markdown_table(header, body))
    if comparisons:
        margins = ", ".join(f"{k} ±{v:g}" for k, v in MARGINS.items())
        markdown += (f"\n\nShiQ's differences (equivalence margins: {margins}). " + comparison_table(comparisons, ["beta"]))
    return {"final": summary, "comparisons": comparisons, "markdown": markdown}


def plot(rows: list[dict], references: dict, args: MultiturnArgs, path: Path) -> None:
    """Episode reward, success and each turn's reward against KL; episode reward against training steps."""
    from matplotlib.figure import Figure

    from shiq_llm.experiments.report import final_rows, method_colors, plot_steps, plot_tradeoff, summarise

    reference = references[None] if None in references else next(iter(references.values()))
    turns = _turns(reference)
    colors = method_colors(args.methods)
    keys = ["mean_reward", "success", "kl", *(f"reward_turn{k}" for k in range(1, turns + 1))]
    finals = summarise(final_rows(rows), ("method", "beta"), keys)
    curves = summarise(rows, ("method", "beta", "step"), ["mean_reward"])
    fig = Figure(figsize=(4.2 * max(3, turns), 7.6), layout="constrained")
    axes = fig.subplots(2, max(3, turns), squeeze=False)
    panels = [(axes[0, 0], "mean_reward", "episode reward (sum of the turns' rewards)"),
              (axes[0, 1], "success", "episode success (every turn right)")]
    panels += [(axes[1, k - 1], f"reward_turn{k}", f"reward of turn {k}") for k in range(1, turns + 1)]
    for ax, key, title in panels:
        plot_tradeoff(ax, finals, x="kl", y=key, colors=colors, reference=reference)
        ax.set(title=title, xlabel="KL(π‖π_ref), agent tokens (nats)", ylabel=key)
    beta = args.curve_beta or args.betas[0]
    plot_steps(axes[0, 2], curves, "mean_reward", colors=colors, beta=beta)
    axes[0, 2].set(title=f"episode reward over training (β = {beta:g})", xlabel="training step", ylabel="mean_reward")
    used = {id(ax) for ax, _, _ in panels} | {id(axes[0, 2])}
    for ax in axes.flat:
        ax.set_visible(id(ax) in used)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"multi-turn calculator task: {args.seeds} seeds, β ∈ {list(args.betas)}, {args.steps} steps; "
                 f"{args.eval_prompts} held-out prompts × {args.eval_samples} dialogues\npoints and lines: mean over seeds; "
                 "bars and bands: 95 % t-interval of that mean over seeds (cut at 0); KL in nats", fontsize=10)
    fig.savefig(path, dpi=120)
