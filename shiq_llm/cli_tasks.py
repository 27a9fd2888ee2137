"""``shiq-llm make-data``, ``shiq-llm evaluate`` and ``shiq-llm demo``: the embedded task and its experiment.

    shiq-llm make-data --out data/                    # tiny reference + offline rows (shiq_llm.synthetic)
    shiq-llm evaluate --model runs/shiq/final --ref data/reference --prompts synthetic
    shiq-llm demo --out demo/                          # reference, data, ShiQ and baselines over β, the figure

The demo is spec §5's LLM-scale experiment on the embedded task: it builds the reference and the offline data
(:func:`shiq_llm.synthetic.make_data`), trains every ``(algo, β)`` of the grid with ``shiq_llm.trainer.train``,
evaluates each final policy on the held-out prompts (:func:`shiq_llm.evaluate.evaluate_policy`: mean reward of
its own samples and the exact KL to the reference) and writes ``demo_results.csv`` (one row per run, plus the
reference) and ``reward_vs_kl.png`` (mean reward against KL, one curve per method across β).
:func:`register` adds the three subcommands to the ``shiq-llm`` parser of ``shiq_llm.cli``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from shiq_llm.prompts import load_prompts
from shiq_llm.rewards import load_reward_fn
from shiq_toy.experiments import num_threads

__all__ = [
    "register",
    "DemoConfig",
    "run_demo",
    "write_results",
    "plot_reward_vs_kl",
    "load_prompts",
    "load_reward_fn",
    "RESULT_COLUMNS",
]

#: Columns of ``demo_results.csv``.
RESULT_COLUMNS = (
    "algo", "beta", "mean_reward", "reward_sem", "kl", "kl_sem", "kl_mc", "mean_length", "finished", "num_samples",
    "train_seconds",
)


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Arguments of ``shiq-llm demo`` (defaults: the full demo, about 3 minutes on a 2-core CPU)."""

    out: str = "demo"
    """Output directory: data/ (reference, rows), runs/<algo>_beta<β>/ (trainer outputs), the CSV and figure."""
    algos: tuple[str, ...] = ("shiq", "dpo", "copg", "dro")
    """Methods trained (``shiq_llm.config.ALGOS``)."""
    betas: tuple[float, ...] = (0.1, 0.3, 1.0)
    """β of every method."""
    steps: int = 150
    """Optimizer steps per run."""
    lr: float = 1e-3
    """AdamW learning rate (linear decay), the same for every method."""
    batch_size: int = 32
    """Sequences per step; dpo and copg take batch_size // 2 pairs, i.e. as many sequences."""
    completions_per_prompt: int = 16
    """Offline completions sampled from the reference per training prompt."""
    ref_steps: int = 600
    """Supervised steps of the reference (``shiq_llm.synthetic.ReferenceConfig.steps``)."""
    eval_samples: int = 16
    """Completions sampled per held-out prompt to evaluate each policy."""
    max_new_tokens: int = 12
    """Generation budget (a correct answer is 5 tokens: four numbers and EOS)."""
    seed: int = 0
    """Seed of the reference, the data, the training runs and the evaluation samples."""
    data: str | None = None
    """An existing ``make-data`` directory to reuse instead of building the reference and rows (OUT/data)."""
    progress: bool = True
    """Show tqdm progress bars."""
    threads: int = 1
    """torch CPU threads during the demo (restored afterwards). The tiny model's matrices are too small for
    intra-op parallelism: with 2 threads on a busy 2-core machine the demo ran several times slower."""

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A reduced budget (under a minute): the same reference, data and runs, but only shiq and dpo at β = 0.1."""
        values = dict(algos=("shiq", "dpo"), betas=(0.1,))
        return cls(**{**values, **overrides})


def _quiet_libraries() -> None:
    """Silence per-run chatter (dataset save bars, weight-loading bars, trainer INFO logs) under the demo's bar."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("shiq_llm").setLevel(logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "removed shared tensor" on every tied-weights save


def _run_name(algo: str, beta: float) -> str:
    return f"{algo}_beta{beta:g}"


def run_demo(config: DemoConfig = DemoConfig(), *, log: Callable[[str], None] = print) -> list[dict]:
    """Run the demo (module docstring); returns the result rows (``RESULT_COLUMNS``), the reference first.

    Writes ``OUT/demo_results.csv``, ``OUT/reward_vs_kl.png`` and, unless ``config.data`` is given, ``OUT/data/``.
    """
    with num_threads(config.threads):
        return _run_demo(config, log)


def _run_demo(config: DemoConfig, log: Callable[[str], None]) -> list[dict]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shiq_llm import synthetic
    from shiq_llm.config import ALGOS, PAIR_ALGOS, TrainConfig
    from shiq_llm.evaluate import evaluate_policy
    from shiq_llm.trainer import train

    unknown = [a for a in config.algos if a not in ALGOS]
    if unknown or not config.algos:
        raise ValueError(f"algos must be a non-empty subset of {list(ALGOS)}, got {list(config.algos)}")
    if not config.betas or not all(b > 0 and math.isfinite(b) for b in config.betas):
        raise ValueError(f"betas must be finite numbers > 0, got {list(config.betas)}")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (dpo/copg train on batch_size // 2 pairs), got {config.batch_size}")
    _quiet_libraries()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if config.data is None:
        log("building the reference and the offline data …")
        reference = synthetic.ReferenceConfig(steps=config.ref_steps, seed=config.seed)
        paths = synthetic.make_data(
            out / "data", reference=reference, completions_per_prompt=config.completions_per_prompt,
            max_new_tokens=config.max_new_tokens, seed=config.seed, progress=config.progress,
        )
        data_dir = out / "data"
    else:
        data_dir = Path(config.data)
        paths = {"reference": data_dir / "reference", "train": data_dir / "train.jsonl"}
        for name, path in paths.items():
            if not path.exists():
                raise ValueError(
                    f"--data {data_dir}: missing {path.name} (make it with `shiq-llm make-data --out {data_dir}`)"
                )
    tokenizer = AutoTokenizer.from_pretrained(paths["reference"])
    ref = AutoModelForCausalLM.from_pretrained(paths["reference"]).eval()
    prompts = synthetic.task_prompts("eval")

    def evaluate(policy) -> dict:
        return evaluate_policy(
            policy, ref, tokenizer, prompts, reward_fn=synthetic.reward, num_samples=config.eval_samples,
            max_new_tokens=config.max_new_tokens, seed=config.seed + 1,
        )

    results = [{"algo": "reference", "beta": math.nan, **evaluate(ref), "train_seconds": 0.0}]
    grid = [(algo, beta) for algo in config.algos for beta in config.betas]
    bar = tqdm(grid, desc="demo runs", disable=not config.progress)
    for algo, beta in bar:
        bar.set_postfix_str(_run_name(algo, beta))
        pairs = algo in PAIR_ALGOS
        tick = time.perf_counter()
        run = train(TrainConfig(
            data=str(paths["train"]), model=str(paths["reference"]), out=str(out / "runs" / _run_name(algo, beta)),
            algo=algo, beta=beta, lr=config.lr, max_steps=config.steps,
            batch_size=config.batch_size // 2 if pairs else config.batch_size, seed=config.seed,
            overwrite=True, progress_bar=False, tensorboard=False, save_total_limit=1,
        ))
        seconds = time.perf_counter() - tick
        policy = AutoModelForCausalLM.from_pretrained(run.final_dir).eval()
        results.append({"algo": algo, "beta": beta, **evaluate(policy), "train_seconds": seconds})
    bar.close()

    write_results(results, out / "demo_results.csv")
    title = f"Held-out prompts of the embedded task ({len(prompts)} prompts × {config.eval_samples} samples)"
    plot_reward_vs_kl(results, out / "reward_vs_kl.png", title=title)
    log(_summary(results, time.perf_counter() - started, out, data_dir))
    return results


def write_results(results: Sequence[dict], path: Path) -> Path:
    """Write result rows as CSV with the columns ``RESULT_COLUMNS`` (the reference's β is empty)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return Path(path)


def _summary(results: Sequence[dict], seconds: float, out: Path, data_dir: Path) -> str:
    lines = [f"{'algo':<10} {'beta':>5} {'mean_reward':>12} {'kl':>7} {'kl_mc':>7}"]
    for r in results:
        beta = "" if math.isnan(r["beta"]) else f"{r['beta']:g}"
        reward = f"{r['mean_reward']:.3f} ±{r['reward_sem']:.3f}"
        lines.append(f"{r['algo']:<10} {beta:>5} {reward:>12} {r['kl']:>7.3f} {r['kl_mc']:>7.3f}")
    lines.append(f"data: {data_dir}; results: {out / 'demo_results.csv'}, {out / 'reward_vs_kl.png'}; {seconds:.0f} s")
    return "\n".join(lines)


def plot_reward_vs_kl(results: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Mean reward (± standard error) against KL(π‖π_ref), one line per method through its β values (each point
    labelled with its β), the reference as a star at KL = 0 and a dashed line at its reward (spec §5). The KL
    axis is symlog (linear below 0.1 nats), so that small and large KLs both read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods = [a for a in dict.fromkeys(r["algo"] for r in results) if a != "reference"]
    for k, algo in enumerate(methods):
        rows = sorted((r for r in results if r["algo"] == algo), key=lambda r: -r["beta"])
        color = f"C{k}"
        ax.errorbar([r["kl"] for r in rows], [r["mean_reward"] for r in rows], xerr=[r["kl_sem"] for r in rows],
                    yerr=[r["reward_sem"] for r in rows], marker="o", color=color, capsize=2, label=algo)
        for r in rows:
            ax.annotate(f"β={r['beta']:g}", (r["kl"], r["mean_reward"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
    for r in results:
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


# --------------------------------------------------------------------------------------------------
# Command-line handlers
# --------------------------------------------------------------------------------------------------


def _make_data(args: argparse.Namespace) -> int:
    from shiq_llm import synthetic

    if args.completions_per_prompt < 1 or args.max_new_tokens < 1 or args.ref_steps < 1:
        raise ValueError("--completions-per-prompt, --max-new-tokens and --ref-steps must be >= 1")
    reference = synthetic.ReferenceConfig(noise=args.noise, steps=args.ref_steps, seed=args.seed)
    with num_threads(args.threads):
        paths = synthetic.make_data(args.out, reference=reference, completions_per_prompt=args.completions_per_prompt,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.no_progress)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    print(f"reference model: {paths['reference']}")
    print(f"offline rows: {paths['train']} ({len(rows)} rows, mean reward {synthetic.mean_reward(rows):.3f})")
    print(f"held-out prompts: {paths['eval_prompts']}")
    print(f"next: shiq-llm train --model {paths['reference']} --data {paths['train']} --out runs/shiq "
          "--max-steps 150 --lr 1e-3 --batch-size 32")
    return 0


def _training_prompts(args: argparse.Namespace, model: str) -> tuple[list | None, str]:
    """The training prompts the evaluation prompts are checked against, and where they came from.

    ``--train-data none``: no check. ``auto`` (default): the ``data`` of the ``config.yaml`` that
    ``shiq-llm train`` wrote next to the model (``RUN/final`` → ``RUN/config.yaml``) when it is a local file.
    """
    import yaml

    from shiq_llm.prompts import parse_format_options

    source, split, data_format = args.train_data, args.train_split, args.train_format
    if source == "none":
        return None, "not checked (--train-data none)"
    if source == "auto":
        configs = [Path(model) / "config.yaml", Path(model).parent / "config.yaml"]
        config = next((c for c in configs if c.is_file()), None)
        values = yaml.safe_load(config.read_text()) if config is not None else None
        data = values.get("data") if isinstance(values, dict) else None
        if not isinstance(data, str) or not Path(data).is_file():
            return None, "not checked (no training data found next to --model; give --train-data)"
        source, data_format = data, values.get("data_format")
        split = values.get("split") or split
    train = load_prompts(source, split=split, format=data_format, default_split="train",
                         format_options=parse_format_options(args.train_format_option) or None)
    return train, source


def _evaluate(args: argparse.Namespace) -> int:
    from shiq_llm.evaluate import evaluate_policy
    from shiq_llm.generate import make_sampler, resolve_backend
    from shiq_llm.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from shiq_llm.prompts import check_held_out, parse_format_options
    from shiq_llm.rewards import load_reward

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
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(args.model, device=device, dtype=dtype)
    ref = load_causal_lm(args.ref, device=device, dtype=dtype)
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
    run_demo(config)
    return 0


def _parse_betas(text: str) -> list[float]:
    try:
        return [float(b) for b in text.split(",") if b.strip()]
    except ValueError as error:
        raise ValueError(f"--betas must be comma-separated numbers, got {text!r}") from error


def register(subparsers) -> None:
    """Add ``make-data``, ``evaluate`` and ``demo`` to the ``shiq-llm`` subparsers (``shiq_llm.cli``).

    Each sets ``handler`` (the name ``shiq_llm.cli.main`` calls) to a function ``(args) -> int``.
    """
    _register_make_data(subparsers)
    _register_evaluate(subparsers)
    _register_demo(subparsers)


_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _register_make_data(subparsers) -> None:
    from shiq_llm.synthetic import ReferenceConfig

    ref = ReferenceConfig()
    make = subparsers.add_parser(
        "make-data", formatter_class=_FORMATTER, help="build the embedded task's reference model and offline rows",
        description="Build the embedded synthetic task (shiq_llm.synthetic, no download, CPU seconds): a tiny Llama "
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
    from shiq_llm.generate import BACKENDS
    from shiq_llm.models import INFERENCE_DTYPES
    from shiq_llm.prompts import LEAK_POLICIES
    from shiq_llm.stats import DEFAULT_CHUNK_SIZE

    ev = subparsers.add_parser(
        "evaluate", formatter_class=_FORMATTER, help="mean reward and KL(π‖π_ref) of a policy on its own samples",
        description="Sample completions of each prompt from the policy (pure sampling: temperature 1, no top-k/top-p, "
        "so the samples are π's) and report their mean reward and KL(π‖π_ref), each with its standard error: exact "
        "per token from both models' next-token distributions (computed from hidden states in chunks of "
        "--chunk-size rows, never the (B, L, V) logits), summed over each sample, and the Monte-Carlo Σ_t ln π/π_ref "
        "(shiq_llm.evaluate); also the mean length and the fraction of samples that ended with EOS. Before "
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
    ev.add_argument("--format", default=None, help="adapter applied to the prompt rows first (shiq_llm.adapters: "
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
                    "evaluation prompts must not include; 'auto': the data in config.yaml next to --model (a run's "
                    "OUT/final), when it is a local file; 'none': no check")
    ev.add_argument("--train-split", default="train", help="split of --train-data")
    ev.add_argument("--train-format", default=None, help="adapter of --train-data (as --format)")
    ev.add_argument("--train-format-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the --train-format adapter (repeatable)")
    ev.add_argument("--leak", choices=LEAK_POLICIES, default="error", help="what to do when evaluation prompts "
                    "occur in the training data: stop with an error, or warn with the counts")
    ev.add_argument("--out", default=None, help="also write the JSON report to this file (default: print only)")
    ev.set_defaults(handler=_evaluate)


def _register_demo(subparsers) -> None:
    d = DemoConfig()
    demo = subparsers.add_parser(
        "demo", formatter_class=_FORMATTER,
        help="the LLM main job: reference, data, ShiQ and baselines over β, reward-vs-KL figure",
        description="Spec §5 on the embedded task, on the CPU in about 2 minutes: build the reference and offline "
        "data (as make-data), train each method at each β with the trainer's API, evaluate each policy on the "
        "held-out prompts (mean reward of its samples, exact KL to the reference) and write OUT/demo_results.csv "
        "(columns " + ",".join(RESULT_COLUMNS) + ") and OUT/reward_vs_kl.png.")
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
