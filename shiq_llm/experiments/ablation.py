"""The ablation of ShiQ's three ingredients on the embedded tasks: ShiQ against ShiQ/init (no reward shaping),
ShiQ/ms (one-step residual) and ShiQ/tk (the first state's equation only), spec §3 and the paper's ablation figure.

``shiq-llm experiment ablation --out DIR [--quick] [--tasks …]``. Tasks (:data:`TASKS`; the default run takes the
first two):

- ``single_turn``: the counting task of ``shiq_llm.tasks.synthetic`` (one reward per completion, on its last token);
- ``multi_turn``: the calculator dialogues of ``shiq_llm.tasks.multiturn`` (one reward per agent turn);
- ``dense``: the single-turn task's own reference and completions with the reward split over the words
  (``synthetic.dense_rows``: stepwise rows, a reward on every word's token, the same total) — where ShiQ/tk, which
  sees only the total, must lose the per-word information if the paper is right;
- ``long_horizon``: the counting task with ``--long-words`` (32) words per answer and the reward at the end
  (its own reference; ``--long-lr``: its own learning rate) — where a one-step residual (ShiQ/ms) must carry the
  reward back over ≥ 32 actions.

For each task the reference and its offline data are built once in ``DIR/data_<task>`` (``dense`` relabels
``DIR/data_single_turn``'s rows; ``--single-data`` / ``--multi-data`` reuse existing ones), and one sweep
(:func:`shiq_llm.experiments.sweep.run_sweep`, in ``DIR/sweep_<task>``) trains every method × β × seed on the
same rows and evaluates each policy on held-out prompts, every ``eval_every`` steps and at the end.

What to look for (spec §3): at initialisation (``ℓ = ℓ_ref``) the shaped residuals are small — ``shiq``'s is
``−disc_t(r)``, ``shiq_ms``'s ``−r_t`` — while ``shiq_init``'s carries ``β vℓ_t``, the log-partition of the
logits, so its initial loss is large; ``shiq_ms`` moves a late reward back one action per update; ``shiq_tk``
constrains only the first state.

Writes, in ``args.out``:

- ``ablation.csv``: long format, one row per (task, method, β, seed, step): ``task, method, algo, beta, seed,
  step``, the training log (``loss`` — at step 1 the initial loss, before any update —, ``abs_residual``,
  ``kl_estimate``, ``nll``, ``implicit_value``) and the evaluations (``mean_reward``, ``kl`` = exact
  KL(π‖π_ref) on the policy's own samples, and the task's other measures); step 0 is the reference;
- ``ablation.png``: per task, training loss (log scale), reward and KL against steps at one β (mean and 95 %
  interval over seeds), and the final reward against KL per β;
- ``ablation_table.md`` (initial loss, final reward and KL per task, method and β with 95 % intervals, and
  ShiQ's differences: paired t-tests, Holm-adjusted, TOST equivalence) and ``ablation_summary.json`` (the same, the arguments, the run time of
  this call per task — a re-run skips the finished cells — and the wall time of training and evaluating the cells).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from shiq_toy.options import option

__all__ = ["AblationArgs", "TASKS", "DEFAULT_TASKS", "METHODS", "QUICK", "collect", "MARGINS",
           "shared_with_multiturn", "tables_of", "placement_comparisons", "placement_table", "write_dense_data", "plot",
           "main"]

TASKS = ("single_turn", "multi_turn", "dense", "long_horizon")
#: Tasks of the default run (the credit-assignment variants are run with ``--tasks dense long_horizon``).
DEFAULT_TASKS = TASKS[:2]
METHODS = ("shiq", "shiq_init", "shiq_ms", "shiq_tk")


@dataclass
class AblationArgs:
    """Arguments of the ablation (``shiq-llm experiment ablation``); the defaults are the README's run."""

    out: Path = option(Path("results/ablation"), "directory for ablation.csv, ablation.png, ablation_table.md, ablation_summary.json, data_<task>/, sweep_<task>/", aliases=("output_dir",), path="out_dir")
    tasks: tuple[str, ...] = option(DEFAULT_TASKS, "any of single_turn (counting, shiq_llm.tasks.synthetic), multi_turn (calculator dialogues, shiq_llm.tasks.multiturn), dense (single_turn's data with a reward on every word), long_horizon (counting with --long-words words, reward at the end)")
    methods: tuple[str, ...] = option(METHODS, "ShiQ and its ablations (any shiq-llm train --loss_type)")
    betas: tuple[float, ...] = option((0.1, 1.0), "KL regularisation β of every method")
    seeds: int = option(3, "training seeds per (task, method, β): seed, seed+1, …; they change the batch order and the evaluation samples")
    seed: int = option(0, "first training seed; also the seed of the references and their data")
    steps: int = option(100, "optimizer steps per run")
    batch_size: int = option(32, "sequences per step")
    lr: float = option(1e-3, "AdamW learning rate (linear decay), the same for every method", aliases=("learning_rate",))
    log_every: int = option(5, "training-log interval in steps (the loss at step 1, before any update, is logged too)")
    eval_every: int = option(25, "evaluate the policy every this many steps during training (0: only at the end)")
    single_eval_samples: int = option(16, "single_turn: completions sampled per held-out prompt (20 prompts) at each evaluation")
    multi_eval_prompts: int = option(32, "multi_turn: held-out prompts of the evaluation")
    multi_eval_samples: int = option(4, "multi_turn: dialogues sampled per held-out prompt at each evaluation")
    max_new_tokens: int = option(12, "generation budget (per agent turn in multi_turn)")
    single_data: str = option("", "an existing shiq-llm make-data directory to use instead of building OUT/data_single_turn", path="in_dir")
    single_ref_steps: int = option(600, "single_turn: supervised steps of the reference")
    completions_per_prompt: int = option(16, "single_turn: completions sampled from the reference per training prompt")
    multi_data: str = option("", "an existing shiq-llm make-multiturn-data directory to use instead of building OUT/data_multi_turn", path="in_dir")
    multi_ref_steps: int = option(400, "multi_turn: supervised steps of the reference")
    train_prompts: int = option(256, "multi_turn: training prompts of the offline data")
    samples_per_prompt: int = option(8, "multi_turn: dialogues sampled from the reference per training prompt")
    long_words: int = option(32, "long_horizon: words per answer (each a token, a negative number two); the generation budget is long_words + 8 tokens")
    long_ref_steps: int = option(600, "long_horizon: supervised steps of its reference")
    long_vocab_size: int = option(448, "long_horizon: vocabulary of its tokenizer (every number of the longer range one token)")
    long_lr: float = option(0.0, "long_horizon: AdamW learning rate of its runs (0: --lr); its 33-token returns make ShiQ's loss ~30x the single-turn one")
    curve_beta: float = option(0.0, "β whose curves over training steps are plotted (0: the first of betas)")
    threads: int = option(1, "torch CPU threads (1 is fastest for the tiny models)")
    progress: bool = option(True, "show a progress bar over each sweep's cells")
    tables_from: str = option("", "an existing ablation.csv: re-derive the figure and the table from it into OUT, without training")


#: ``--quick``: both tasks, every method, 2 seeds, one β, 20 short steps on smaller data sets (the same multi-turn
#: reference, a shorter single-turn one): a check that the whole pipeline runs, in about two minutes of one CPU core;
#: too little training to rank the methods.
QUICK = AblationArgs(betas=(0.1,), seeds=2, steps=20, batch_size=16, log_every=2, eval_every=10, single_eval_samples=4,
                     multi_eval_prompts=16, multi_eval_samples=2, single_ref_steps=300, completions_per_prompt=4,
                     train_prompts=48, samples_per_prompt=4, long_words=12, long_ref_steps=300)


def check_args(args: AblationArgs) -> None:
    from shiq_llm.train.config import LLM_METHODS

    if not args.tasks or not set(args.tasks) <= set(TASKS):
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(args.tasks)}")
    if not args.methods or not set(args.methods) <= set(LLM_METHODS):
        raise ValueError(f"methods must be a non-empty subset of {list(LLM_METHODS)}, got {list(args.methods)}")
    if not args.betas or not all(b > 0 and math.isfinite(b) for b in args.betas):
        raise ValueError(f"betas must be finite numbers > 0, got {list(args.betas)}")
    for name in ("seeds", "steps", "batch_size", "log_every", "single_eval_samples", "multi_eval_prompts",
                 "multi_eval_samples", "max_new_tokens", "single_ref_steps", "completions_per_prompt",
                 "multi_ref_steps", "train_prompts", "samples_per_prompt", "threads", "long_words", "long_ref_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.long_lr < 0:
        raise ValueError(f"long_lr must be >= 0 (0: the same as lr), got {args.long_lr}")
    if args.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {args.eval_every}")
    if args.curve_beta and args.curve_beta not in args.betas:
        raise ValueError(f"curve_beta {args.curve_beta} is not one of betas {list(args.betas)}")


def _sweep(task: str, args: AblationArgs, out: Path):
    """The SweepConfig of one task: its data (built or reused), evaluator and evaluation budget."""
    from shiq_llm.experiments.demo import prepare_single_turn_data
    from shiq_llm.experiments.multiturn import prepare_multiturn_data, train_options, write_eval_prompts
    from shiq_llm.experiments.sweep import SweepConfig

    max_new_tokens, model, lr = args.max_new_tokens, None, args.lr
    if task in ("single_turn", "dense"):
        data = prepare_single_turn_data(out / "data_single_turn", args.single_data, ref_steps=args.single_ref_steps,
                                        completions_per_prompt=args.completions_per_prompt,
                                        max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress)
        eval_prompts, evaluator, samples = data / "eval_prompts.jsonl", "completions", args.single_eval_samples
        if task == "dense":  # the same reference and completions, the reward on every word
            model, data = data / "reference", write_dense_data(data, out / "data_dense")
    elif task == "long_horizon":
        max_new_tokens, lr = args.long_words + 8, args.long_lr or args.lr
        data = prepare_single_turn_data(out / "data_long_horizon", "", ref_steps=args.long_ref_steps,
                                        completions_per_prompt=args.completions_per_prompt,
                                        max_new_tokens=max_new_tokens, seed=args.seed, progress=args.progress,
                                        words=args.long_words, vocab_size=args.long_vocab_size)
        eval_prompts, evaluator, samples = data / "eval_prompts.jsonl", "completions", args.single_eval_samples
    else:
        data = prepare_multiturn_data(out / "data_multi_turn", args.multi_data, train_prompts=args.train_prompts,
                                      samples_per_prompt=args.samples_per_prompt, ref_steps=args.multi_ref_steps,
                                      max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress)
        eval_prompts = out / "eval_prompts_multi_turn.jsonl"
        write_eval_prompts(data, args.multi_eval_prompts, eval_prompts)
        evaluator, samples = "dialogues", args.multi_eval_samples
    return SweepConfig(
        out=str(out / f"sweep_{task}"), model=str(model or data / "reference"), train_data=str(data / "train.jsonl"),
        algos=list(args.methods), betas=list(args.betas), seeds=list(range(args.seed, args.seed + args.seeds)),
        eval_prompts=str(eval_prompts), evaluator=evaluator, reward="synthetic", eval_every=args.eval_every,
        train=train_options(lr=lr, steps=args.steps, batch_size=args.batch_size, log_every=args.log_every),
        evaluation={"num_samples": samples, "max_new_tokens": max_new_tokens, "seed": 1000 + args.seed})


def write_dense_data(single: Path, out: Path) -> Path:
    """``out/train.jsonl``: the single-turn rows of ``single/train.jsonl`` as stepwise rows with the reward on every
    word (``shiq_llm.tasks.synthetic.dense_rows``); rewritten only when its content changes. Returns ``out``."""
    from shiq_llm.storage.atomic import atomic_write
    from shiq_llm.storage.jsonl import dumps, read_jsonl
    from shiq_llm.tasks.synthetic import dense_rows

    text = "".join(dumps(row) + "\n" for row in dense_rows(read_jsonl(single / "train.jsonl")))
    path = out / "train.jsonl"
    if not path.is_file() or path.read_text() != text:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            handle.write(text)
    return out


def collect(args: AblationArgs, out: Path):
    """One sweep per task (module docstring), each on its data built in ``OUT/data_<task>`` or given."""
    from shiq_llm.experiments.driver import sweep_tasks

    return sweep_tasks(lambda: ((task, _sweep(task, args, out)) for task in TASKS if task in args.tasks),
                       args.progress)


def main(args: AblationArgs) -> dict:
    """Run the ablation (module docstring) with the experiments' driver (``shiq_llm.experiments.driver``); returns
    the summary also written to ``ablation_summary.json``."""
    from shiq_llm.experiments.driver import Experiment, run

    return run(Experiment("ablation", ("task", "method", "algo", "beta", "seed", "step"), check_args, collect, tables_of,
                          plot), args)


#: Equivalence margins of the ablation table's comparisons, per task ("no difference" only within these, by TOST).
MARGINS = {"single_turn": {"mean_reward": 0.02, "kl": 0.1, "initial_loss": 0.1},
           "multi_turn": {"mean_reward": 0.1, "kl": 0.1, "initial_loss": 0.1},
           "dense": {"mean_reward": 0.02, "kl": 0.1, "initial_loss": 0.1},
           "long_horizon": {"mean_reward": 0.02, "kl": 0.1, "initial_loss": 0.1}}


#: Steps to threshold: the fraction of the best method's improvement over the reference a run must reach.
THRESHOLD_FRACTION = 0.8


def shared_with_multiturn(task: str, beta: float, method: str) -> bool:
    """Whether the ablation's cell is the same run as a cell of the multi-turn experiment at its defaults (same
    data, reference, seeds and training options): ``multi_turn`` at a β of ``MultiturnArgs().betas`` for a method
    of both experiments. Such comparisons are already in the multi-turn table and are not counted again."""
    from shiq_llm.experiments import multiturn

    return task == "multi_turn" and beta in multiturn.MultiturnArgs().betas and method in multiturn.METHODS


def tables_of(rows: list[dict], references: dict, args: AblationArgs) -> dict:
    """Initial loss, final reward and KL per (task, method, β) (mean ± 95 % t-interval over seeds); ShiQ's
    differences: paired t-tests on seed-matched runs (same rows, same seeds), Holm-adjusted over the table, TOST
    equivalence within :data:`MARGINS`; comparisons that the multi-turn table already makes are left out
    (:func:`shared_with_multiturn`)."""
    import numpy as np

    from shiq_llm.experiments.report import (
        PM_MEANING,
        compare,
        comparison_table,
        final_rows,
        fmt_ci,
        markdown_table,
        reference_cell,
        steps_to_threshold,
        summarise,
        verdicts,
    )
    from shiq_toy.experiments import mean_ci

    finals = final_rows(rows)
    summary = summarise(finals, ("task", "method", "beta"), ["initial_loss", "mean_reward", "kl"])
    order = {m: i for i, m in enumerate(args.methods)}
    summary.sort(key=lambda r: (TASKS.index(r["task"]) if r["task"] in TASKS else len(TASKS), r["beta"],
                                order.get(r["method"], len(order))))
    body = []
    for task, ref in references.items():  # the reference's own loss is not defined (nothing trains it)
        body.append([task, "–", "reference", "–", reference_cell(ref, "mean_reward", "reward_sem", 3), "0"])
    body += [[r["task"], f"{r['beta']:g}", r["method"], fmt_ci(r, "initial_loss", 3), fmt_ci(r, "mean_reward", 3),
              fmt_ci(r, "kl", 3)] for r in summary]
    comparisons, left_out = [], []
    methods = {r["method"] for r in finals}
    if "shiq" in methods:
        for other in (m for m in args.methods if m != "shiq" and m in methods):
            for key in ("mean_reward", "kl", "initial_loss"):
                for task in (t for t in TASKS if t in references):
                    found = compare([r for r in finals if r["task"] == task], key, "shiq", other, by=("task", "beta"),
                                    margin=MARGINS[task][key])
                    left_out += [c for c in found if shared_with_multiturn(task, c["beta"], other)]
                    comparisons += [c for c in found if not shared_with_multiturn(task, c["beta"], other)]
    comparisons = verdicts(comparisons)
    steps = max((r["step"] for r in finals), default=args.steps)
    seeds = sorted({r.get("mean_reward_n", 0) for r in summary})
    markdown = (f"After {steps} steps; mean over {'–'.join(map(str, seeds[::max(1, len(seeds) - 1)]))} seeds; "
                f"{PM_MEANING}. The references are evaluated once: their reward carries the 95 % normal interval "
                f"over their samples (± 1.96 standard errors). Reward: {_reward_meaning(references)}; KL in nats.\n\n"
                + markdown_table(["task", "β", "method", "initial loss", "final reward", "final KL"], body))
    if comparisons:
        margins = "; ".join(f"{t}: " + ", ".join(f"{k} ±{v:g}" for k, v in m.items()) for t, m in MARGINS.items()
                            if t in references)
        shared = sorted({f"shiq − {c['b']} at multi_turn β = {c['beta']:g}" for c in left_out})
        note = (f" Left out, because they are the same runs as the multi-turn experiment's and its table already "
                f"tests them: {', '.join(shared)}." if shared else "")
        markdown += (f"\n\nShiQ's differences (equivalence margins: {margins}).{note} "
                     + comparison_table(comparisons, ["task", "beta"], digits=3))
    placement = placement_comparisons(finals, args)
    markdown += placement_table(placement)
    speed = steps_to_threshold(rows, by=("task", "beta"), fraction=THRESHOLD_FRACTION)
    if any(r["last_step"] > 0 for r in speed):
        speed_body = []
        for task, beta in dict.fromkeys((r["task"], r["beta"]) for r in speed):
            for method in (m for m in args.methods if any(r["method"] == m for r in speed)):
                runs = [r for r in speed if (r["task"], r["beta"], r["method"]) == (task, beta, method)]
                reached = [r["step"] for r in runs if r["step"] is not None]
                cell = {"step": float(np.mean(reached))} if reached else {}
                if len(reached) > 1:
                    cell["step"], cell["step_ci"] = mean_ci(reached)
                speed_body.append([task, f"{beta:g}", method, f"{runs[0]['threshold']:.3f}",
                                   f"{len(reached)} of {len(runs)}", fmt_ci(cell, "step", 0) if reached else "–",
                                   ", ".join(str(r["step"]) if r["step"] is not None else f">{r['last_step']}"
                                             for r in sorted(runs, key=lambda r: r["seed"]))])
        markdown += (f"\n\nSteps to threshold: the first evaluated step at which a run's reward reaches the reference "
                     f"+ {THRESHOLD_FRACTION:g} × (best method's final mean − reference), per task and β; evaluated every "
                     f"{args.eval_every} steps, so a step is known to that resolution; '>N': not reached by the last step "
                     f"N (censored, left out of the mean). Mean over the seeds that reached it; {PM_MEANING}. No test: "
                     "censored runs make a t-test invalid, and the resolution is coarse.\n\n"
                     + markdown_table(["task", "β", "method", "threshold", "seeds reaching it", "steps (mean ± 95 %)",
                                       "per seed"], speed_body))
    return {"final": summary, "comparisons": comparisons, "placement": placement,
            "steps_to_threshold": speed, "markdown": markdown}


def _reward_meaning(tasks) -> str:
    words = [t for t in ("single_turn", "dense", "long_horizon") if t in tasks]
    parts = ([f"{' and '.join(words) if len(words) < 3 else ', '.join(words)} fraction of correct words in [0, 1]"]
             if words else []) + (["multi_turn episode reward in [0, 3]"] if "multi_turn" in tasks else [])
    return ", ".join(parts)


def placement_comparisons(finals: list[dict], args: AblationArgs) -> list[dict]:
    """Where the reward sits, per method and β: ``dense − single_turn`` of the final reward and KL, paired on the
    seed (the same reference, completions, batches and evaluation samples; only the rewards' positions differ),
    Holm-adjusted over these comparisons, TOST within the single-turn margins. Empty unless both tasks ran."""
    from shiq_llm.experiments.report import compare, verdicts

    both = [{**r, "method": r["task"], "variant": r["method"]} for r in finals if r["task"] in ("single_turn", "dense")]
    if {r["method"] for r in both} != {"single_turn", "dense"}:
        return []
    found = [c for key in ("mean_reward", "kl") for c in compare(both, key, "dense", "single_turn",
                                                                 by=("variant", "beta"), margin=MARGINS["dense"][key])]
    order = {m: i for i, m in enumerate(args.methods)}
    found.sort(key=lambda c: (("mean_reward", "kl").index(c["key"]), c["beta"], order.get(c["variant"], len(order))))
    return verdicts(found)


def placement_table(comparisons: list[dict]) -> str:
    """The markdown of :func:`placement_comparisons`'s result (``""`` when there are none)."""
    from shiq_llm.experiments.report import comparison_table

    if not comparisons:
        return ""
    return ("\n\nReward placement: each method trained on the same completions with the reward on the last token "
            "(single_turn) or split over the words (dense, same total), seed-matched. A method that reads only the "
            "sequence's total (shiq_tk) should not change; one that reads each token's reward can use the finer "
            "signal. " + comparison_table(comparisons, ["variant", "beta"], digits=3))


def plot(rows: list[dict], references: dict, args: AblationArgs, path: Path) -> None:
    """Per task (a row): loss, reward and KL against steps at one β; final reward against KL per β."""
    from matplotlib.figure import Figure

    from shiq_llm.experiments.report import final_rows, method_colors, plot_steps, plot_tradeoff, summarise

    tasks = [t for t in TASKS if t in references]
    colors = method_colors(args.methods)
    beta = args.curve_beta or args.betas[0]
    fig = Figure(figsize=(17, 3.8 * len(tasks) + 0.6), layout="constrained")
    axes = fig.subplots(len(tasks), 4, squeeze=False)
    for row, task in zip(axes, tasks):
        task_rows = [r for r in rows if r["task"] == task]
        curves = summarise(task_rows, ("method", "beta", "step"), ["loss", "mean_reward", "kl"])
        plot_steps(row[0], curves, "loss", colors=colors, beta=beta, log=True)
        row[0].set(title=f"{task}: training loss (β = {beta:g})", xlabel="training step", ylabel="loss (log)")
        plot_steps(row[1], curves, "mean_reward", colors=colors, beta=beta)
        row[1].set(title=f"{task}: reward (β = {beta:g})", xlabel="training step", ylabel="mean_reward")
        plot_steps(row[2], curves, "kl", colors=colors, beta=beta)
        row[2].set(title=f"{task}: KL(π‖π_ref) (β = {beta:g})", xlabel="training step", ylabel="kl (nats)")
        finals = summarise(final_rows(task_rows), ("method", "beta"), ["mean_reward", "kl"])
        plot_tradeoff(row[3], finals, x="kl", y="mean_reward", colors=colors, reference=references[task])
        row[3].set(title=f"{task}: final reward vs KL, per β", xlabel="KL(π‖π_ref) (nats)", ylabel="mean_reward")
    handles, labels = axes[0, 3].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"ShiQ ablation: {args.seeds} seeds, β ∈ {list(args.betas)}, {args.steps} steps\npoints and lines: mean "
                 "over seeds; bars and bands: 95 % t-interval of that mean over seeds (cut at 0); KL in nats",
                 fontsize=10)
    fig.savefig(path, dpi=120)
