"""Worker of ``tests/test_llm_stats_distributed.py``, run by ``torchrun --nproc_per_node 2`` (gloo, CPU).

For each scheme (DDP, FSDP2 with the head in the root's group, tied or not, or wrapped by its own
``fully_shard``, with a frozen head, FSDP1 with and without ``use_orig_params``) it wraps a tiny Llama, gives
each rank half of a global batch, and runs ``LOSSES["shiq"]`` on ``response_token_stats`` and one SGD step
(lr = 1, so that a parameter's change is minus its gradient, gathered by ``get_model_state_dict`` the same way
for every scheme). The reference is one process without any wrapper on the whole batch, on the full-logit
statistics (``naive_response_token_stats``). The ``trainer-*`` schemes go through ``ShiQTrainer``'s statistics
forward (``shiq_llm.train.trainer.add_stats_forward``: ``model(…, shiq_response_mask=…)`` on the wrapped model). Rank 0 writes, per scheme, the largest differences of the
per-sequence losses and of the gradients, and what ran, to ``--out`` (JSON); the test asserts on them.

DeepSpeed (schemes ``zero2``, ``zero3``, ``zero3-tied``; DeepSpeed is not a dependency, so the test does not
run them)::

    pip install deepspeed   # its first init on CPU JIT-builds a shared-memory op (minutes)
    torchrun --standalone --nproc_per_node 2 tests/dist_fsdp_stats.py --out ds.json --schemes zero2 zero3 zero3-tied
"""

from __future__ import annotations

import argparse
import copy
import functools
import json

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from shiq_llm.core import stats as stats_module
from shiq_llm.core.models import tiny_causal_lm
from shiq_llm.core.stats import exact_path_reason, head_sharding, naive_response_token_stats, response_token_stats
from shiq_llm.train.trainer import add_stats_forward
from shiq_toy.losses import LOSSES, TokenStats

VOCAB, BETA, GAMMA = 97, 0.5, 0.9
SCHEMES = ["ddp", "fsdp2", "fsdp2-tied", "fsdp2-own-head", "fsdp2-frozen-head", "fsdp1", "fsdp1-flat", "dtensor-head",
           "trainer-ddp", "trainer-fsdp2", "trainer-fsdp2-own-head"]
DEEPSPEED_SCHEMES = ["zero2", "zero3", "zero3-tied"]


def _batch(world: int):
    """Global batch of 2·world left-padded rows: input_ids, attention_mask, response_mask (B, L), rewards (B, L)."""
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 5, 7, 8][: 2 * world] + [6] * max(0, 2 * world - 4)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros(ids.shape, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        attention[row, width - n :] = 1
        response[row, width - n + 2 :] = True  # a 2-token prompt
    response[1, -2] = False  # a hole
    rewards = torch.randn(ids.shape, generator=gen)
    return ids, attention, response, rewards


def _wrap(scheme: str, model: torch.nn.Module) -> torch.nn.Module:
    if scheme.startswith("zero"):
        import deepspeed

        stage = int(scheme[4])
        config = {
            "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # plain SGD
        }  # fmt: skip
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
    if scheme == "ddp":
        return DistributedDataParallel(model)
    if scheme.startswith("fsdp2"):
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if scheme == "fsdp2-own-head":
            fully_shard(model.lm_head, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    policy = ModuleWrapPolicy({LlamaDecoderLayer})
    return FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=scheme == "fsdp1", device_id=torch.device("cpu")
    )


def _sgd_step_gradients(model: torch.nn.Module, loss: torch.Tensor, before: dict[str, torch.Tensor]) -> dict:
    """Backward, one SGD step with lr = 1, and the full (gathered) gradient of each parameter: before − after.
    A DeepSpeed engine: its backward, and DeepSpeed's own gather of the gradients (tied weights: one name)."""
    if hasattr(model, "backward") and hasattr(model, "module"):  # a DeepSpeed engine
        from deepspeed.utils import safe_get_full_grad

        model.backward(loss)
        full = {name: safe_get_full_grad(p) for name, p in model.module.named_parameters()}
        return {name: full[name] if name in full else full[_tied_name(name)] for name in before}
    loss.backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()
    after = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: before[name] - after[name] for name in before}


def run_dtensor_head(world: int) -> dict:
    """A head weight sharded as a DTensor without FSDP (as tensor parallelism does): a clear ValueError."""
    model = tiny_causal_lm(VOCAB, arch="llama", hidden_size=32, num_layers=2, num_heads=4, tie_word_embeddings=False)
    mesh = init_device_mesh("cpu", (world,))
    model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
    ids, attention, response, _ = _batch(world)
    errors = {}
    calls = {
        "head_sharding": lambda: head_sharding(model),
        "response_token_stats": lambda: response_token_stats(model, ids, attention, response),
    }
    for name, call in calls.items():
        try:
            call()
        except ValueError as error:
            errors[name] = str(error)
    return {"errors": errors}


def _tied_name(name: str) -> str:
    return {"lm_head.weight": "model.embed_tokens.weight", "model.embed_tokens.weight": "lm_head.weight"}[name]


def run(scheme: str, rank: int, world: int) -> dict:
    if scheme == "dtensor-head":
        return run_dtensor_head(world)
    tied = scheme.endswith("-tied")
    model = tiny_causal_lm(VOCAB, arch="llama", hidden_size=32, num_layers=2, num_heads=4, tie_word_embeddings=tied)
    reference = tiny_causal_lm(VOCAB, arch="llama", hidden_size=32, num_layers=2, num_heads=4, seed=1)
    if scheme == "fsdp2-frozen-head":
        model.lm_head.requires_grad_(False)
    ids, attention, response, rewards = _batch(world)
    with torch.no_grad():
        ref = naive_response_token_stats(reference, ids, attention, response)

    single = copy.deepcopy(model)  # one process, no wrapper, the whole batch, full logits
    before = {name: p.detach().clone() for name, p in single.state_dict().items()}
    stats = naive_response_token_stats(single, ids, attention, response)
    loss_single = LOSSES["shiq"](stats, ref, rewards, response, beta=BETA, gamma=GAMMA)  # (B,)
    grads_single = _sgd_step_gradients(single, loss_single.mean(), before)

    rows = slice(rank * ids.shape[0] // world, (rank + 1) * ids.shape[0] // world)
    local = [x[rows] for x in (ids, attention, response)]
    if scheme.startswith("trainer-"):  # ShiQTrainer's path: the statistics forward called as the wrapped model
        add_stats_forward(model, chunk_size=3)
        wrapped = _wrap(scheme[len("trainer-"):], model)
        out = wrapped(input_ids=local[0], attention_mask=local[1], shiq_response_mask=local[2])
        stats = TokenStats(out.logit_taken, out.logsumexp)
    else:
        wrapped = _wrap(scheme, model)
        stats = response_token_stats(wrapped, *local, chunk_size=3)
    local_ref = type(ref)(*(x[rows] for x in ref))
    loss = LOSSES["shiq"](stats, local_ref, rewards[rows], local[2], beta=BETA, gamma=GAMMA)  # (B / world,)
    grads = _sgd_step_gradients(wrapped, loss.mean(), before)
    losses = [torch.empty_like(loss) for _ in range(world)]
    dist.all_gather(losses, loss.detach())

    trainable = {name for name, g in grads_single.items() if g.abs().max() > 0}
    return {
        "sharding": head_sharding(wrapped),
        "exact_path_reason": exact_path_reason(wrapped),
        "loss_max_abs_diff": float((torch.cat(losses) - loss_single.detach()).abs().max()),
        "loss_max_abs": float(loss_single.detach().abs().max()),
        "grad_max_abs_diff": max(float((grads[name] - grads_single[name]).abs().max()) for name in grads_single),
        "grad_max_abs": max(float(g.abs().max()) for g in grads_single.values()),
        "parameters": sorted(grads_single),
        "parameters_with_gradient": sorted(trainable),
        "head_weight_changed": bool(grads["lm_head.weight"].abs().max() > 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES + DEEPSPEED_SCHEMES, default=SCHEMES)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    calls = []  # every call of the chunked head (the exact path would not make one)
    original = stats_module.linear_head_token_stats

    @functools.wraps(original)
    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    stats_module.linear_head_token_stats = counted
    results = {}
    for scheme in args.schemes:
        before = len(calls)
        results[scheme] = run(scheme, rank, world)
        results[scheme]["chunked_head_calls"] = len(calls) - before
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
