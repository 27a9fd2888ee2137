"""ShiQTrainer (loss_type="shiq") against TRL's DPOTrainer on the same model, data and batch: responses per
second and peak memory, side by side in one run, for a vocabulary of 32k and of 128k tokens.

Set-up, identical for both trainers: a tiny Llama (hidden 256, 2 layers, tied head) with V output rows and a
word-level tokenizer of V words built locally (no download); P prompts of 24 random words, each with two
responses of 40 random words. TRL trains on the P pairs {prompt, chosen, rejected} with
``precompute_ref_log_probs=True`` (its fairest setting: no reference model in the loop, like ShiQ's cached
reference) and a batch of ``--pairs`` pairs; ShiQ trains on the 2P rows {prompt, completion, reward} with a
batch of 2 × ``--pairs`` sequences, i.e. the same responses and tokens per step. Both: AdamW, float32, no
gradient accumulation, ``max_steps = --steps``. The reference pass (ShiQ's cache, TRL's precomputation) is
not timed: the clock runs from the end of the first optimizer step (a warm-up) to the end of the last one.

Each (trainer, V) runs in a fresh subprocess (``benchmarks.harness``). Peak memory is the growth of the peak
over what the process held once the model was built (``benchmarks.harness.PeakMemory``: CPU resident set,
CUDA ``max_memory_allocated``), reference passes included. Ratios are ShiQ / TRL.

    python benchmarks/vs_trl.py                       # V = 32,000 and 128,256, 6 steps of 8 pairs each
    python benchmarks/vs_trl.py --vocab 32000 --steps 4 --pairs 4     # quicker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import PeakMemory, random_texts, run_worker, serve_worker, step_clock, word_tokenizer  # noqa: E402

PROMPT_WORDS, RESPONSE_WORDS = 24, 40


def worker(trainer_name: str, *, vocab: int, pairs: int, steps: int, device: str) -> dict:
    import datasets
    import torch

    from shiq_llm.core.models import tiny_causal_lm

    tokenizer = word_tokenizer(vocab)
    model = tiny_causal_lm(tokenizer, hidden_size=256, num_layers=2, num_heads=4, max_positions=256, seed=0)
    model.train()
    texts = random_texts(vocab, pairs * steps, prompt_words=PROMPT_WORDS, response_words=RESPONSE_WORDS)
    out = tempfile.mkdtemp(prefix=f"vs_trl_{trainer_name}_")
    common = dict(output_dir=out, max_steps=steps, learning_rate=1e-5, logging_steps=steps, save_strategy="no",
                  report_to="none", disable_tqdm=True, use_cpu=device == "cpu", dataloader_pin_memory=False, seed=0)
    memory = PeakMemory(device).start()  # both reference passes (ShiQ's cache, TRL's precomputation) count
    clock = step_clock(torch.cuda.synchronize if device == "cuda" else None)
    if trainer_name == "shiq":
        from shiq_llm import ShiQConfig, ShiQTrainer

        rows = [{"prompt": p, "completion": c, "reward": r} for p, a, b in texts for c, r in ((a, 1.0), (b, 0.0))]
        args = ShiQConfig(loss_type="shiq", beta=0.1, per_device_train_batch_size=2 * pairs, max_length=256, **common)
        trainer = ShiQTrainer(model, args, train_dataset=rows, processing_class=tokenizer, callbacks=[clock])
    else:
        from trl import DPOConfig, DPOTrainer

        data = datasets.Dataset.from_dict({"prompt": [t[0] for t in texts], "chosen": [t[1] for t in texts],
                                           "rejected": [t[2] for t in texts]})
        args = DPOConfig(beta=0.1, per_device_train_batch_size=pairs, precompute_ref_log_probs=True, max_length=256,
                         **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    peak = memory.stop()
    responses = 2 * pairs * clock.steps
    return {"responses_per_s": responses / clock.seconds, "peak_mib": peak / 2**20, "seconds": clock.seconds}


def _run(trainer_name: str, **kwargs) -> dict:
    return run_worker(__file__, "worker", {"trainer_name": trainer_name, **kwargs})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="vocabulary sizes V")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch (ShiQ: twice as many sequences)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is a warm-up)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    if serve_worker(argv, {"worker": worker}):
        return
    args = parser.parse_args(argv)
    import torch
    import transformers
    import trl

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, {device}; "
          f"tiny Llama H=256, 2 layers; {args.pairs} pairs per step ({2 * args.pairs} responses of "
          f"{RESPONSE_WORDS} tokens after {PROMPT_WORDS}-token prompts), {args.steps} steps, first one untimed")
    print(f"{'V':>7} | {'TRL DPO resp/s':>14} {'ShiQ resp/s':>11} {'ratio':>6} | {'TRL peak MiB':>12} "
          f"{'ShiQ peak MiB':>13} {'ratio':>6}")
    print("-" * 82)
    for vocab in args.vocab:
        kwargs = dict(vocab=vocab, pairs=args.pairs, steps=args.steps, device=device)
        trl_result, shiq_result = _run("trl", **kwargs), _run("shiq", **kwargs)
        print(f"{vocab:>7} | {trl_result['responses_per_s']:>14.1f} {shiq_result['responses_per_s']:>11.1f} "
              f"{shiq_result['responses_per_s'] / trl_result['responses_per_s']:>6.2f} | {trl_result['peak_mib']:>12.0f} "
              f"{shiq_result['peak_mib']:>13.0f} {shiq_result['peak_mib'] / trl_result['peak_mib']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
