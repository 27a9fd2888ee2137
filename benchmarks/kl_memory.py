"""Peak memory of the exact per-token KL(π ‖ π_ref) at V = 128k: full logits vs chunked from hidden states.

Two random tiny Llamas (hidden H, one layer, untied heads) over a V-token vocabulary stand in for the policy and
the reference; a batch of B sequences of P prompt and T response tokens (N = B·T response tokens) is scored by

    full     shiq_llm.generation.evaluate.naive_token_kl   each model's (B, L, V) logits, log-softmax of the (N, V) rows
    chunked  shiq_llm.generation.evaluate.token_kl         the backbones only, then (c, V) buffers per chunk of c rows

which return the same (B, L) tensors (the worker prints the sums; the table shows their largest relative
difference). The backbone is tiny on purpose: what differs between the two is the vocabulary projection.

Every measurement runs in a fresh subprocess, after the models and the batch are built and one warm-up
forward of the backbones has run; CPU peak memory is the growth of the process's peak resident set
(``ru_maxrss``) during the KL, CUDA peak memory is ``torch.cuda.max_memory_allocated`` over what is allocated
before it. The ratio is chunked / full, measured in the same run.

    python benchmarks/kl_memory.py                         # V = 128,256, B = 4, P = 32, T = 480, c = 256 and 1024
    python benchmarks/kl_memory.py --devices cuda --batch 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import PeakMemory, run_worker, serve_worker  # noqa: E402
from shiq_llm.core.models import tiny_causal_lm  # noqa: E402
from shiq_llm.generation.evaluate import naive_token_kl, token_kl  # noqa: E402


def worker(method: str, *, vocab: int, hidden: int, batch: int, prompt: int, response: int, chunk_size: int,
           device: str) -> dict:
    """One KL of one configuration in this (fresh) process: peak memory growth (bytes), seconds, result sums."""
    device = torch.device(device)
    policy, ref = (tiny_causal_lm(vocab, hidden_size=hidden, num_layers=1, num_heads=4, tie_word_embeddings=False,
                                  seed=seed).to(device) for seed in (0, 1))
    gen = torch.Generator().manual_seed(0)
    length = prompt + response
    ids = torch.randint(3, vocab, (batch, length), generator=gen).to(device)  # (B, L)
    attention = torch.ones_like(ids)
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[:, prompt:] = True  # (B, L): N = B·T response tokens
    with torch.no_grad():
        policy.model(input_ids=ids[:1, :8])  # warm-up: lazy initialisation outside the measurement
    memory = PeakMemory(device.type).start()
    start = time.perf_counter()
    if method == "full":
        exact, rho = naive_token_kl(policy, ref, ids, attention, response_mask)
    else:
        exact, rho = token_kl(policy, ref, ids, attention, response_mask, chunk_size=chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"peak_bytes": memory.stop(), "seconds": seconds, "exact": exact.double().sum().item(),
            "rho": rho.double().sum().item()}


def run_in_subprocess(method: str, args: argparse.Namespace, *, chunk_size: int, device: str) -> dict:
    return run_worker(__file__, "worker", dict(
        method=method, vocab=args.vocab, hidden=args.hidden, batch=args.batch, prompt=args.prompt,
        response=args.response, chunk_size=chunk_size, device=device,
    ))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256, help="V, vocabulary size (Llama 3: 128,256)")
    parser.add_argument("--hidden", type=int, default=64, help="H, hidden size of the two tiny models")
    parser.add_argument("--batch", type=int, default=4, help="B, sequences")
    parser.add_argument("--prompt", type=int, default=32, help="P, prompt tokens per sequence")
    parser.add_argument("--response", type=int, default=480, help="T, response tokens per sequence")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024], help="c, rows per chunk")
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", nargs="+", default=default_devices, help="cpu and/or cuda")
    if serve_worker(argv, {"worker": worker}):
        return
    args = parser.parse_args(argv)

    n = args.batch * args.response
    print(f"exact per-token KL, V = {args.vocab}, B = {args.batch}, L = {args.prompt + args.response}, N = {n} "
          f"response tokens, H = {args.hidden}, float32, torch {torch.__version__}; one process per measurement")
    header = (f"{'device':>6} {'chunk':>5} | {'full MiB':>9} {'chunked MiB':>11} {'ratio':>6} | "
              f"{'full s':>7} {'chunked s':>9} | {'max rel. diff':>13}")
    print(header)
    print("-" * len(header))
    for device in args.devices:
        full = run_in_subprocess("full", args, chunk_size=1, device=device)
        for size in args.chunk_sizes:
            chunked = run_in_subprocess("chunked", args, chunk_size=size, device=device)
            mem_f, mem_c = full["peak_bytes"] / 2**20, chunked["peak_bytes"] / 2**20
            diff = max(abs(chunked[k] - full[k]) / max(abs(full[k]), 1e-12) for k in ("exact", "rho"))
            print(f"{device:>6} {size:>5} | {mem_f:>9.0f} {mem_c:>11.0f} {mem_c / mem_f:>6.3f} | "
                  f"{full['seconds']:>7.2f} {chunked['seconds']:>9.2f} | {diff:>13.1e}", flush=True)


if __name__ == "__main__":
    main()
