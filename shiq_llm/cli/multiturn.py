"""``shiq-llm make-multiturn-data`` and ``shiq-llm evaluate-multiturn``: the embedded multi-turn task.

    shiq-llm make-multiturn-data --out mt/          # tiny reference + its dialogues with per-turn rewards
    shiq-llm train --model mt/reference --data mt/train.jsonl --out runs/mt_shiq --max_steps 150
    shiq-llm evaluate-multiturn --model runs/mt_shiq/final --ref mt/reference --prompts mt/eval_prompts.jsonl

The task, its checker and the environment loop are in :mod:`shiq_llm.tasks.multiturn`. :func:`commands` gives the
two commands to ``shiq-llm`` (``shiq_llm.cli``); each is a dataclass of options (``shiq_toy.options``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from shiq_llm.cli.tasks import write_report
from shiq_llm.storage.jsonl import read_jsonl
from shiq_llm.tasks.multiturn import REFERENCE
from shiq_toy.experiments import num_threads
from shiq_toy.options import Command, option

__all__ = ["commands", "MakeMultiturnDataArgs", "EvaluateMultiturnArgs"]


@dataclass
class MakeMultiturnDataArgs:
    """Options of ``shiq-llm make-multiturn-data``."""

    out: str = option(help="output directory: reference/, train.jsonl, eval_prompts.jsonl", aliases=("output_dir",),
                      path="out_dir")
    samples_per_prompt: int = option(8, "dialogues sampled per training prompt")
    train_prompts: int = option(256, "training prompts")
    eval_prompts: int = option(64, "held-out prompts written to eval_prompts.jsonl")
    max_new_tokens: int = option(12, "generation budget per agent turn")
    noise: float = option(REFERENCE.noise, "probability that one field of a demonstration turn's call is redrawn at "
                          "random (the reference's mediocrity)")
    ref_steps: int = option(REFERENCE.steps, "supervised steps of the reference (a short run: --ref_steps 20)")
    seed: int = option(0, "seed of the reference and the samples")
    threads: int = option(1, "torch CPU threads (1 is fastest for this tiny model)")
    progress: bool = option(True, "show progress bars (--no-progress: hide them)")


@dataclass
class EvaluateMultiturnArgs:
    """Options of ``shiq-llm evaluate-multiturn``."""

    model: str = option(help="the policy (a save_pretrained directory, e.g. a run's OUT/final); its tokenizer is used "
                        "for both models", aliases=("model_name_or_path",), path="in_path")
    ref: str = option(help="the reference model (same vocabulary)", path="in_path")
    prompts: str = option("multiturn", "'multiturn' (the task's prompts of --split), or a .txt / .jsonl / .json file of "
                          "task prompts (e.g. OUT/eval_prompts.jsonl)", path="data")
    split: str = option("eval", "split of --prompts multiturn", choices=("train", "eval"))
    num_samples: int = option(8, "dialogues sampled per prompt")
    max_new_tokens: int = option(12, "generation budget per agent turn")
    batch_size: int = option(64, "dialogues per generation / KL batch")
    seed: int = option(0, "sampling seed")
    threads: int = option(1, "torch CPU threads")
    out: str | None = option(None, "also write the JSON report to this file", aliases=("output_dir",), path="out_file")
    overwrite: bool = option(False, "replace an existing --out report")


def _check_positive(names):
    def check(args) -> None:
        for name in names:
            if getattr(args, name) < 1:
                raise ValueError(f"option --{name} must be >= 1, got {getattr(args, name)}")
    return check


def _make_data(args: MakeMultiturnDataArgs) -> int:
    from shiq_llm.tasks import multiturn

    reference = dataclasses.replace(multiturn.REFERENCE, noise=args.noise, steps=args.ref_steps, seed=args.seed)
    with num_threads(args.threads):
        paths = multiturn.make_multiturn_data(
            args.out, reference=reference, samples_per_prompt=args.samples_per_prompt, train_prompts=args.train_prompts,
            eval_prompts=args.eval_prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
            progress=args.progress,
        )
    rows = read_jsonl(paths["train"])
    turns = len(rows[0]["rewards"])
    per_turn = [sum(r["rewards"][k] for r in rows) / len(rows) for k in range(turns)]
    episode = sum(sum(r["rewards"]) for r in rows) / len(rows)
    print(f"reference model: {paths['reference']}")
    print(f"offline dialogues: {paths['train']} ({len(rows)} rows; mean episode reward {episode:.3f} of {turns}; "
          "per turn " + " ".join(f"{r:.3f}" for r in per_turn) + ")")
    print(f"held-out prompts: {paths['eval_prompts']}")
    print(f"next: shiq-llm train --model_name_or_path {paths['reference']} --dataset_name {paths['train']} "
          "--output_dir runs/mt_shiq --max_steps 150 --learning_rate 1e-3 --per_device_train_batch_size 32")
    return 0


def _evaluate(args: EvaluateMultiturnArgs) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shiq_llm.tasks import multiturn

    if args.prompts == "multiturn":
        prompts = multiturn.task_prompts(args.split)
    else:
        from shiq_llm.data.prompts import load_prompts

        prompts = load_prompts(args.prompts)
        for i, prompt in enumerate(prompts):
            try:
                multiturn.parse_task(prompt)
            except ValueError as error:
                raise ValueError(f"--prompts {args.prompts}: prompt {i}: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ref = AutoModelForCausalLM.from_pretrained(args.ref).eval()
    with num_threads(args.threads):
        metrics = multiturn.evaluate_dialogues(policy, ref, tokenizer, prompts, num_samples=args.num_samples,
                                               max_new_tokens=args.max_new_tokens, seed=args.seed,
                                               batch_size=args.batch_size)
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}  # JSON null
    report = {"model": args.model, "ref": args.ref, "prompts": args.prompts, "num_prompts": len(prompts), **metrics}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        write_report(args.out, text)
    return 0


def commands() -> dict[str, Command]:
    """``make-multiturn-data`` and ``evaluate-multiturn``."""
    return {
        "make-multiturn-data": Command(
            "make-multiturn-data", (MakeMultiturnDataArgs,), _make_data,
            check=_check_positive(("samples_per_prompt", "train_prompts", "eval_prompts", "max_new_tokens", "ref_steps",
                                   "threads")),
            help="build the embedded multi-turn task's reference model and offline dialogues",
            description="Build the embedded multi-turn task (shiq_llm.tasks.multiturn, no download, CPU seconds): a "
            "tiny Llama pre-trained on noisy calculator dialogues (compute 7 +3 *2 -1 → calc(7+3), tool: 10, "
            "calc(10*2), …), saved with its tokenizer to OUT/reference; dialogues sampled from it with the tool in the "
            "loop and one reward per agent turn, in OUT/train.jsonl ({messages, rewards}); held-out prompts in "
            "OUT/eval_prompts.jsonl. A short run: --ref_steps 20 --train_prompts 16."),
        "evaluate-multiturn": Command(
            "evaluate-multiturn", (EvaluateMultiturnArgs,), _evaluate,
            check=_check_positive(("num_samples", "max_new_tokens", "batch_size", "threads")),
            help="per-turn rewards and KL(π‖π_ref) of a policy on its own dialogues",
            description="Sample dialogues of each prompt from the policy with the calculator tool in the loop "
            "(temperature 1) and report the mean episode reward, the reward and success rate of each agent turn, the "
            "episode success rate and KL(π‖π_ref) summed over the agent tokens (exact per token, and per turn; "
            "shiq_llm.tasks.multiturn.evaluate_dialogues). Prints JSON; --out writes it."),
    }
