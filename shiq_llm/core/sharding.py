"""Running code as a wrapped or sharded model's forward, so that the wrapper's hooks do their work around it.

``shiq_llm.core.stats.response_token_stats`` calls the backbone and reads the output head's weight itself, which
bypasses a wrapper's ``forward``. Under FSDP that matters: outside a forward the parameters are shards
(FSDP2: ``DTensor`` shards, FSDP1: pieces of a flat parameter). :func:`call_as_forward` runs a function *as*
the module's forward (the redirection of Lightning's ``_FSDPForwardRedirection``, used by TRL and Liger for
their fused losses): the module's instance ``forward`` is swapped for the function while ``module(...)`` is
called, so the wrapper

- all-gathers (unshards) the parameters before the function runs and frees them after, as for any forward;
- registers its backward hooks on the function's inputs and outputs: the parameters are gathered again
  before the backward of the outputs and their gradients are reduce-scattered (FSDP, ZeRO-3) or all-reduced
  (DDP) after it, with the wrapper's own settings (mixed precision, gradient divide factor, HSDP, offloading).

Supported, each tested with two gloo processes against one process without a wrapper
(``tests/dist_fsdp_stats.py``): no wrapper; ``DistributedDataParallel``; FSDP2
(``torch.distributed.fsdp.fully_shard``, accelerate's ``fsdp_version=2``) on the model with the head in the
root's group (tied to the embedding or not, trained or frozen) or wrapped by its own ``fully_shard``; FSDP1
(``FullyShardedDataParallel``, ``use_orig_params`` True or False); DeepSpeed ZeRO-3 (a partitioned head,
tied or not: DeepSpeed gathers a module's parameters in hooks around its forward, so the head is called
through them; checked by hand, DeepSpeed is not a dependency). Not supported: a head weight that is a
``DTensor`` outside FSDP (tensor parallelism), whose gradient placement is not known (ValueError).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

__all__ = ["inner_module", "unwrap_model", "module_class", "call_as_forward", "head_sharding", "check_unsharded"]

SUPPORTED = (
    "no wrapper, DistributedDataParallel, FSDP1 (FullyShardedDataParallel), FSDP2 (fully_shard) or DeepSpeed "
    "(ZeRO 0-3)"
)


@functools.cache
def _fsdp_types() -> tuple[type, ...]:
    """(FSDP1's FullyShardedDataParallel, FSDP2's FSDPModule), or () where torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    return FullyShardedDataParallel, FSDPModule


def _is_fsdp2(module: nn.Module) -> bool:
    return bool(_fsdp_types()) and isinstance(module, _fsdp_types()[1])


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return isinstance(tensor, DTensor)


def inner_module(module: nn.Module) -> nn.Module:
    """The module inside data-parallel containers (DDP, DataParallel, FSDP1, a DeepSpeed engine)."""
    children = getattr(module, "_modules", None)
    wrapped = ("module", "_fsdp_wrapped_module", "_orig_mod")  # DDP, DataParallel, DeepSpeed; FSDP1; torch.compile
    if children is not None and not any(name in children for name in wrapped) and "_orig_mod" not in vars(module):
        # not a container: itself, without accelerate's search of the whole tree for compiled regions (a few ms per
        # call, several calls per step)
        return module
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside data-parallel containers and a peft ``PeftModel`` (adapters stay active).

    FSDP2 modules are the model itself (``fully_shard`` changes their class, not their structure).
    """
    model = inner_module(model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def module_class(module: nn.Module | None) -> type:
    """The class a module had before wrapping: FSDP1's wrapper is peeled, FSDP2's ``FSDP<Class>`` -> ``Class``."""
    module = inner_module(module) if module is not None else None
    cls = type(module)
    if _is_fsdp2(module):
        return next(base for base in cls.__bases__ if base is not _fsdp_types()[1])
    return cls


def _is_zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions one of the module's own parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def call_as_forward(module: nn.Module, fn: Callable, *args):
    """``fn(*args)``, run as ``module``'s forward when a wrapper has hooks around it, else called directly.

    module: the model or submodule as the caller holds it (wrapped or not). For a DDP / FSDP1 wrapper or a
    DeepSpeed engine the forward of the module inside it is swapped; for an FSDP2 module, or a module whose
    parameters ZeRO-3 partitions (DeepSpeed's hooks gather them around each module's forward), its own.
    ``fn`` should return a tuple of tensors (the wrappers register their backward hooks on them). The swap is
    undone on return or error.
    """
    inner = inner_module(module)
    if inner is module and not _is_fsdp2(module) and not _is_zero3_partitioned(module):
        return fn(*args)
    previous = inner.__dict__.get("forward")  # an instance-level forward (accelerate's autocast wrapper) or None
    inner.forward = fn
    try:
        return module(*args)
    finally:
        if previous is None:
            del inner.forward
        else:
            inner.forward = previous


def head_sharding(model: nn.Module) -> str:
    """How ``model``'s output head is sharded: "zero3", "fsdp2", "fsdp1" or "none"; ValueError if unsupported.

    ``response_token_stats`` handles the four (see the module docstring). Raises a ValueError for a ``DTensor``
    head outside FSDP2 (tensor parallelism). A trainer can call it once after wrapping the model, to fail
    before the first step and to log the scheme.
    """
    hf_model = unwrap_model(model)
    get_head = getattr(hf_model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(inner_module(head), "weight", None) if head is not None else None
    if weight is not None and hasattr(weight, "ds_id"):
        return "zero3"
    fsdp1, fsdp2 = _fsdp_types() or (None, None)
    modules = list(model.modules())
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in modules):
        return "fsdp2"
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in modules):
        return "fsdp1"
    if weight is not None and _is_dtensor(weight):
        raise ValueError(
            f"the output head's weight of {type(hf_model).__name__} is a DTensor outside FSDP2 (tensor "
            f"parallelism?), which shiq_llm.core.stats does not support; supported: {SUPPORTED}"
        )
    return "none"


def check_unsharded(weight: torch.Tensor, where: str) -> None:
    """ValueError unless ``weight`` is a whole tensor (called inside the forward, after the wrappers unsharded)."""
    if _is_dtensor(weight):
        raise ValueError(
            f"{where} is still a DTensor shard inside the forward: no FSDP module that is called unshards it "
            f"(shard the model with fully_shard on the model itself or on the head); supported: {SUPPORTED}"
        )
