"""``shiq-llm make-multiturn-data`` and ``shiq-llm evaluate-multiturn``: the embedded multi-turn task.

    shiq-llm make-multiturn-data --out mt/          # tiny reference + its dialogues with per-turn rewards
    shiq-llm train --model mt/reference --data mt/train.jsonl --out runs/mt_shiq --max-steps 150
    shiq-llm evaluate-multiturn --model runs/mt_shiq/final --ref mt/reference --prompts mt/eval_prompts.jsonl

The task, its checker and the environment loop are in :mod:`shiq_llm.tasks.multiturn`. :func:`register` adds the two
subcommands to the ``shiq-llm`` parser of ``shiq_llm.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from shiq_llm.storage.jsonl import read_jsonl
from shiq_toy.experiments import num_threads

__all__ = ["register"]

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _make_data(args: argparse.Namespace) -> int:
    from shiq_llm.tasks import multiturn

    for name in ("samples_per_prompt", "train_prompts", "eval_prompts", "max_new_tokens", "ref_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    reference = dataclasses.replace(multiturn.REFERENCE, noise=args.noise, steps=args.ref_steps, seed=args.seed)
    with num_threads(args.threads):
        paths = multiturn.make_multiturn_data(
            args.out, reference=reference, samples_per_prompt=args.samples_per_prompt, train_prompts=args.train_prompts,
            eval_prompts=args.eval_prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
            progress=not args.no_progress,
        )
    rows = read_jsonl(paths["train"])
    turns = len(rows[0]["rewards"])
    per_turn = [sum(r["rewards"][k] for r in rows) / len(rows) for k in range(turns)]
    episode = sum(sum(r["rewards"]) for r in rows) / len(rows)
    print(f"reference model: {paths['reference']}")
    print(f"offline dialogues: {paths['train']} ({len(rows)} rows; mean episode reward {episode:.3f} of {turns}; "
          "per turn " + " ".join(f"{r:.3f}" for r in per_turn) + ")")
    print(f"held-out prompts: {paths['eval_prompts']}")
    print(f"next: shiq-llm train --model {paths['reference']} --data {paths['train']} --out runs/mt_shiq "
          "--max-steps 150 --lr 1e-3 --batch-size 32")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
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
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def register(subparsers) -> None:
    """Add ``make-multiturn-data`` and ``evaluate-multiturn`` to the ``shiq-llm`` subparsers; each sets
    ``handler`` to a function ``(args) -> int``."""
    from shiq_llm.tasks.multiturn import REFERENCE

    make = subparsers.add_parser(
        "make-multiturn-data", formatter_class=_FORMATTER,
        help="build the embedded multi-turn task's reference model and offline dialogues",
        description="Build the embedded multi-turn task (shiq_llm.tasks.multiturn, no download, CPU seconds): a tiny "
        "Llama pre-trained on noisy calculator dialogues (compute 7 +3 *2 -1 → calc(7+3), tool: 10, calc(10*2), …), "
        "saved with its tokenizer to OUT/reference; dialogues sampled from it with the tool in the loop and one "
        "reward per agent turn, in OUT/train.jsonl ({messages, rewards}); held-out prompts in OUT/eval_prompts.jsonl.")
    make.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output directory")
    make.add_argument("--samples-per-prompt", type=int, default=8, help="dialogues sampled per training prompt")
    make.add_argument("--train-prompts", type=int, default=256, help="training prompts")
    make.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts written to eval_prompts.jsonl")
    make.add_argument("--max-new-tokens", type=int, default=12, help="generation budget per agent turn")
    make.add_argument("--noise", type=float, default=REFERENCE.noise,
                      help="probability that one field of a demonstration turn's call is redrawn at random "
                      "(the reference's mediocrity)")
    make.add_argument("--ref-steps", type=int, default=REFERENCE.steps, help="supervised steps of the reference")
    make.add_argument("--seed", type=int, default=0, help="seed of the reference and the samples")
    make.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    make.add_argument("--no-progress", action="store_true", help="hide progress bars")
    make.set_defaults(handler=_make_data)

    ev = subparsers.add_parser(
        "evaluate-multiturn", formatter_class=_FORMATTER,
        help="per-turn rewards and KL(π‖π_ref) of a policy on its own dialogues",
        description="Sample dialogues of each prompt from the policy with the calculator tool in the loop "
        "(temperature 1) and report the mean episode reward, the reward and success rate of each agent turn, the "
        "episode success rate and KL(π‖π_ref) summed over the agent tokens (exact per token, and per turn; "
        "shiq_llm.tasks.multiturn.evaluate_dialogues). Prints JSON; --out writes it.")
    ev.add_argument("--model", required=True, default=argparse.SUPPRESS, help="the policy (a save_pretrained "
                    "directory, e.g. a run's OUT/final); its tokenizer is used for both models")
    ev.add_argument("--ref", required=True, default=argparse.SUPPRESS, help="the reference model (same vocabulary)")
    ev.add_argument("--prompts", default="multiturn", help="'multiturn' (the task's prompts of --split), or a "
                    ".txt / .jsonl / .json file of task prompts (e.g. OUT/eval_prompts.jsonl)")
    ev.add_argument("--split", default="eval", choices=("train", "eval"), help="split of --prompts multiturn")
    ev.add_argument("--num-samples", type=int, default=8, help="dialogues sampled per prompt")
    ev.add_argument("--max-new-tokens", type=int, default=12, help="generation budget per agent turn")
    ev.add_argument("--batch-size", type=int, default=64, help="dialogues per generation / KL batch")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ev.add_argument("--out", default=None, help="also write the JSON report to this file")
    ev.set_defaults(handler=_evaluate)
