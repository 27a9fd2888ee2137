"""ShiQ's training step against the limit: supervised fine-tuning on the same response tokens.

Any method that trains every response token must at least run the model forward and backward on the batch and
put a gradient on each response token's log-probability; supervised fine-tuning (SFT, the negative
log-likelihood of the responses) does nothing more, so it is the floor. Four training steps, side by side on the
same tiny Llama (hidden 256, 2 layers, tied head), the same word-level tokenizer of V words, the same rows
(P prompts of 24 random words, each with two responses of 40 random words; 2P sequences per step), AdamW,
float32, one ``transformers.Trainer`` loop each:

    shiq       ShiQTrainer(loss_type="shiq"): 2P sequences per step (the cached reference computed before)
    dpo        ShiQTrainer(loss_type="dpo"): P pairs per step, the same 2P sequences
    floor      SFT through the same chunked head (shiq_llm.train.trainer.add_stats_forward: the statistics
               forward ShiQ uses): loss = −mean over response tokens of (ℓ − vℓ)
    labels     SFT through transformers' own loss: model(input_ids, attention_mask, labels=...).loss, with
               labels = −100 off the response tokens (the full (B, L, V) logits)

Per step: seconds of optimizer steps 2 … S (step 1 is a warm-up; the median over the timed steps of one run) —
on CPU the worker's CPU seconds (one torch thread: the work itself, which other jobs on a shared machine disturb
much less than the wall clock, also recorded as ``wall_s``), on CUDA wall-clock seconds after a synchronisation —
and the growth of the process's peak memory during ``trainer.train()`` (``benchmarks.harness.
PeakMemory``: CPU resident set reset at the start after the freed heap is returned, CUDA
``max_memory_allocated``), i.e. the training steps with their optimizer states, not the set-up (ShiQ's
reference pass runs in the trainer's constructor). Each variant runs in its own worker process
(``benchmarks.harness.WorkerProcess``; ``--fresh``: a new process per run), with one torch thread by default
(the machine is shared); a round runs every variant once, in an order that rotates from round to round, so
that other jobs on the machine disturb all alike. Ratios are taken within a round (ShiQ / floor, …) and
reported as median [min–max] over the rounds.

    python benchmarks/limit.py            # V = 200, 32,000, 128,256; P = 8; 6 steps; 3 rounds
    python benchmarks/limit.py --quick    # P = 2, 3 steps, 3 rounds (about 5 min of CPU time)
    python benchmarks/limit.py --vocab 200 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    PeakMemory,
    WorkerProcess,
    format_spread,
    random_texts,
    run_worker,
    serve_worker,
    step_clock,
    versions,
    word_tokenizer,
)

PROMPT_WORDS, RESPONSE_WORDS = 24, 40
VARIANTS = ("shiq", "dpo", "floor", "labels")
#: The ratios printed: (numerator, denominator).
RATIOS = (("shiq", "floor"), ("dpo", "floor"), ("floor", "labels"), ("shiq", "labels"))


def _sft_trainer(variant: str, model, tokenizer, rows: list[dict], args):
    """A plain ``transformers.Trainer`` doing SFT on the response tokens of ``rows``: the floor or labels."""
    import torch
    from transformers import Trainer

    from shiq_llm.data import collate, tokenize_rows
    from shiq_llm.train.trainer import add_stats_forward

    examples, _ = tokenize_rows(rows, tokenizer, max_length=256)  # as ShiQConfig(max_length=256)
    items = [examples[i] for i in range(len(examples))]

    def collator(batch):
        out = collate(batch, pad_token_id=tokenizer.pad_token_id)
        keep = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
        if variant == "labels":
            keep["labels"] = torch.where(out["response_mask"], out["input_ids"], -100)
        else:
            keep["response_mask"] = out["response_mask"]
        return keep

    class FloorTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        shiq_response_mask=inputs["response_mask"])
            mask = inputs["response_mask"]
            loss = -torch.where(mask, out.logit_taken - out.logsumexp, 0.0).sum() / mask.sum()
            return (loss, out) if return_outputs else loss

    if variant == "floor":
        add_stats_forward(model, chunk_size=1024)
        trainer = FloorTrainer(model=model, args=args, train_dataset=items, data_collator=collator)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=collator)
    trainer.model_accepts_loss_kwargs = False  # a mean per micro-batch, as ShiQTrainer
    return trainer


def worker(variant: str, *, vocab: int, pairs: int, steps: int, device: str, threads: int, seed: int = 0) -> dict:
    """One training run of ``variant`` in this process: seconds per step and peak memory growth."""
    import torch
    from transformers import TrainingArguments

    from shiq_llm import ShiQConfig, ShiQTrainer
    from shiq_llm.core.models import tiny_causal_lm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(vocab)
    model = tiny_causal_lm(tokenizer, hidden_size=256, num_layers=2, num_heads=4, max_positions=256, seed=seed)
    model.to(device).train()
    texts = random_texts(vocab, pairs * steps, prompt_words=PROMPT_WORDS, response_words=RESPONSE_WORDS, seed=seed)
    rows = [{"prompt": p, "completion": c, "reward": r} for p, a, b in texts for c, r in ((a, 1.0), (b, 0.0))]
    out = tempfile.mkdtemp(prefix=f"limit_{variant}_")
    common = dict(output_dir=out, max_steps=steps, learning_rate=1e-5, logging_steps=steps, save_strategy="no",
                  report_to="none", disable_tqdm=True, use_cpu=device == "cpu", dataloader_pin_memory=False,
                  seed=seed, remove_unused_columns=False)
    clock = step_clock(torch.cuda.synchronize if device.startswith("cuda") else None)
    if variant in ("shiq", "dpo"):
        batch = 2 * pairs if variant == "shiq" else pairs  # sequences, or pairs of sequences
        args = ShiQConfig(loss_type=variant, beta=0.1, per_device_train_batch_size=batch, max_length=256, **common)
        trainer = ShiQTrainer(model, args, train_dataset=rows, processing_class=tokenizer, callbacks=[clock])
    else:
        args = TrainingArguments(per_device_train_batch_size=2 * pairs, **common)
        trainer = _sft_trainer(variant, model, tokenizer, rows, args)
        trainer.add_callback(clock)
    memory = PeakMemory(device).start()
    trainer.train()
    peak = memory.stop()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    # CPU: the time measure is the process's CPU seconds (one thread: the work itself, little disturbed by other
    # jobs on a shared machine); CUDA: wall-clock seconds after a synchronisation
    step_s = statistics.median(clock.step_cpu_seconds if device == "cpu" else clock.step_seconds)
    return {"step_s": step_s, "wall_s": statistics.median(clock.step_seconds), "peak_mib": peak / 2**20,
            "memory": memory.method,
            "loss": losses[-1] if losses else None, "steps_timed": clock.steps}


def measure(vocabs, *, pairs: int, steps: int, rounds: int, device: str, threads: int, workers=None,
            variants=VARIANTS) -> dict:
    """{V: {variant: [result per round]}}, the variants' order rotating from round to round. ``workers``:
    {variant: WorkerProcess} (each variant in its own long-lived process), or None for a fresh process per run."""
    results: dict[int, dict[str, list[dict]]] = {}
    for vocab in vocabs:
        results[vocab] = {v: [] for v in variants}
        for r in range(rounds):
            order = list(variants[r % len(variants):]) + list(variants[: r % len(variants)])
            for variant in order:
                kwargs = dict(variant=variant, vocab=vocab, pairs=pairs, steps=steps, device=device, threads=threads)
                call = workers[variant].call if workers else functools.partial(run_worker, __file__)
                results[vocab][variant].append(call("worker", kwargs))
            print(f"  V = {vocab}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def table(results: dict, *, ratios=RATIOS) -> list[str]:
    """Markdown rows: per V, each variant's median step time and peak, and the within-round ratios."""
    variants = list(next(iter(results.values())))
    head = "| V | " + " | ".join(f"{v} s/step" for v in variants) + " | " + " | ".join(f"{v} MiB" for v in variants)
    head += " | " + " | ".join(f"time {a}/{b}" for a, b in ratios) + " | " + " | ".join(f"mem {a}/{b}" for a, b in ratios) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(variants) + 2 * len(ratios))]
    for vocab, runs in results.items():
        time = [f"{statistics.median(r['step_s'] for r in runs[v]):.3f}" for v in variants]
        mem = [f"{statistics.median(r['peak_mib'] for r in runs[v]):.0f}" for v in variants]
        cells = []
        for key in ("step_s", "peak_mib"):
            for a, b in ratios:
                values = [x[key] / max(y[key], 1e-9) for x, y in zip(runs[a], runs[b])]
                cells.append(format_spread(values))
        lines.append(f"| {vocab:,} | " + " | ".join(time + mem + cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    if serve_worker(argv, {"worker": worker}):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[200, 32000, 128256], help="vocabulary sizes V")
    parser.add_argument("--pairs", type=int, default=None, help="P: prompts per step, 2P sequences (default 8; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run, the first untimed (6; quick 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (>= 3 for a range)")
    parser.add_argument("--quick", action="store_true", help="P = 2 and 3 steps: about 5 minutes on 2 idle CPU cores")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (CPU; default 1)")
    parser.add_argument("--fresh", action="store_true", help="a fresh process per run (slower: imports each time)")
    parser.add_argument("--json", type=Path, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = args.pairs or (2 if args.quick else 8)
    steps = args.steps or (3 if args.quick else 6)
    if steps < 2 or pairs < 1 or args.rounds < 1:
        parser.error("--steps must be >= 2, --pairs and --rounds >= 1")
    clock = "CPU seconds" if device == "cpu" else "wall-clock seconds"
    print(f"{versions('torch', 'transformers')}, {device} ({clock} per step), {args.threads} thread(s) per worker; tiny Llama H=256, "
          f"2 layers; {2 * pairs} sequences per step ({PROMPT_WORDS}-token prompts, {RESPONSE_WORDS}-token "
          f"responses), {steps} steps (first untimed), {args.rounds} rounds; ratios: median [min–max] over rounds")
    results = {}
    workers = None if args.fresh else {v: WorkerProcess(__file__) for v in VARIANTS}
    try:
        for vocab in args.vocab:  # a row as soon as its vocabulary is done
            results.update(measure([vocab], pairs=pairs, steps=steps, rounds=args.rounds, device=device,
                                   threads=args.threads, workers=workers))
            lines = table(results)
            print("\n".join(lines if len(results) == 1 else lines[-1:]), flush=True)
            if args.json:
                args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    finally:
        for process in (workers or {}).values():
            process.close()

if __name__ == "__main__":
    main()
