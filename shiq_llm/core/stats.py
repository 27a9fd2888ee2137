"""Per-token statistics of a causal LM on its response tokens, without materialising the logits.

A ShiQ loss needs two numbers per response token (``shiq_toy.losses.TokenStats``)::

    ℓ_p  = logit_taken[b, p] = z_{p−1}[input_ids[b, p]]      the logit of the token actually taken
    vℓ_p = logsumexp[b, p]   = ln Σ_a exp z_{p−1}[a]           over the whole vocabulary

where ``z_{p−1} = W h_{p−1} + b`` are the logits the model emits at position ``p − 1`` (the state before
token ``p``). The naive path computes all ``B·L·V`` logits (gigabytes at V = 128k) and keeps them for the
backward pass. :func:`response_token_stats` instead

1. runs the backbone only (``model.base_model``, as TRL does for its fused-loss paths): hidden states (B, L, H);
2. keeps the N states that precede a response token: (N, H), N = number of response tokens;
3. projects them in chunks of ``chunk_size`` rows inside a custom autograd function
   (:class:`_LinearHeadStats`) that keeps only ``ℓ`` and ``vℓ`` (accumulated in float32 even for a bf16
   model) and recomputes each chunk's logits in backward:

       ∂vℓ/∂z = softmax(z),   ∂ℓ/∂z = onehot(a),   so  ∂/∂z = g_vℓ · softmax(z) + g_ℓ · onehot(a)   (c, V)
       ∂/∂h = (∂/∂z) W   (c, H),   ∂/∂W += (∂/∂z)ᵀ h   (V, H),   ∂/∂b += Σ_rows ∂/∂z   (V,)

   Peak extra memory is one ``chunk_size × V`` float32 buffer instead of ``B·L·V`` logits and their
   gradient; the price is one extra ``(N, H) × (H, V)`` matmul (the recomputation), i.e. 4 head matmuls
   instead of 3, partly paid back by touching far less memory. A frozen head (LoRA: W and b need no
   gradient) recomputes nothing: forward also keeps ``E = softmax(z) W`` (N, H) and backward is
   ``∂/∂h = g_vℓ · E + g_ℓ · W[a]``, 2 head matmuls like the naive path (:data:`KEEP_EXPECTED_FOR_FROZEN_HEAD`).
4. scatters the (N,) results back to (B, L), 0 wherever ``response_mask`` is False.

Models whose logits are not ``W h + b`` (see :data:`LOGIT_TRANSFORM_ATTRIBUTES` and :func:`exact_path_reason`)
go through the exact full-logit path, with one warning per model class.

Sharded and wrapped models (``shiq_llm.core.sharding``, :func:`head_sharding`). Steps 1–3 run as the forward of the
model the caller passes, and step 3 as the forward of the head module, so the wrapper's own hooks gather the
parameters and reduce their gradients as they do for ``model(...)``. Supported and tested (two gloo processes
against one process on the whole batch and the full logits: same losses and gathered gradients to 1e-5):
``DistributedDataParallel``; FSDP2 (``fully_shard``, accelerate's ``fsdp_version=2``) with the head in the
root's group (tied or not, trained or frozen) or in its own ``fully_shard``; FSDP1 (``FullyShardedDataParallel``,
``use_orig_params`` True or False); DeepSpeed ZeRO-2 and ZeRO-3 (tied or not; checked by hand, DeepSpeed is not
a dependency). A head weight that is a ``DTensor`` outside FSDP (tensor parallelism) raises a ValueError.

Notation used for tensor shapes: ``B`` sequences, ``L`` positions, ``H`` hidden size, ``V`` vocabulary,
``N`` response tokens in the batch, ``c`` rows in a chunk.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from shiq_llm.core.models import position_ids_from_mask
from shiq_llm.core.sharding import (
    call_as_forward,
    check_unsharded,
    head_sharding,
    inner_module,
    module_class,
    unwrap_model,
)
from shiq_toy.losses import TokenStats, token_stats

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "KEEP_EXPECTED_FOR_FROZEN_HEAD",
    "LOGIT_TRANSFORM_ATTRIBUTES",
    "response_token_stats",
    "naive_response_token_stats",
    "linear_head_token_stats",
    "response_hidden_states",
    "scatter_to_mask",
    "exact_path_reason",
    "head_sharding",
]

#: Rows of hidden states projected at once. Each pass holds one float32 ``chunk_size × V`` buffer
#: (128 MiB at V = 32k, 512 MiB at V = 128k), plus its bf16 twin when the model runs in bf16. Chosen with
#: ``benchmarks/token_stats.py --vocab 32000 --chunk-sizes 256 512 1024 2048`` (N = 4,096, H = 1,024, CPU):
#: 256 rows cost ~1.5× the naive CPU time (small matmuls), 512–2,048 rows 1.15–1.35× (noise of a shared
#: machine), while the peak memory grows from 0.11× to 0.20× of naive; 1,024 is the middle.
DEFAULT_CHUNK_SIZE = 1024

#: Config attributes (of ``config.get_text_config()``) that put a transform between ``W h + b`` and the
#: logits, with the value that means "no transform" (``None``: any value other than None/0 is a transform).
#: A model with one of them set goes through the exact path.
LOGIT_TRANSFORM_ATTRIBUTES: dict[str, float | None] = {
    "final_logit_softcapping": None,  # Gemma 2/3/4, PaliGemma, VaultGemma, …: z ← c·tanh(z / c)
    "logit_scale": 1.0,  # Cohere, Cohere 2: z ← s·z
    "logits_scaling": 1.0,  # Granite family: z ← z / s (HyperCLOVA X: z ← s·z)
    "lm_head_multiplier": 1.0,  # Falcon-H1: z ← m·z
    "output_multiplier": 1.0,  # MuseSpark, MuseGlimmer: z ← m·z before a soft cap
}

#: Frozen head (``weight`` and ``bias`` need no gradient, e.g. LoRA): forward keeps the expected output
#: embedding ``E = softmax(z) W`` (N, H) so that backward is ``∂/∂h = g_vℓ · E + g_ℓ · W[a]``, one chunked
#: ``(N, V) × (V, H)`` matmul fewer than recomputing the logits (3 head matmuls → 2, as many as the naive path),
#: for ``N × H`` more memory. False: always recompute (``benchmarks/token_stats.py`` measures both).
KEEP_EXPECTED_FOR_FROZEN_HEAD = True

_WARNED_CLASSES: set[str] = set()


# --------------------------------------------------------------------------------------------------
# The chunked head: (N, H) hidden states -> (N,) logit_taken, (N,) logsumexp
# --------------------------------------------------------------------------------------------------


class _ChunkBuffers:
    """The chunk's logits (compute dtype) and their float32 copy, reused by every chunk of a pass, so a pass
    touches ``chunk_size × V`` fresh memory at most once instead of once per chunk (page faults on CPU). A
    forward that needs a gradient hands its buffers to its backward (``ctx.buffers``), which frees them: the
    pages are taken once per training step, not twice, and nothing is held beyond the step (keeping them
    between steps was measured to add one buffer to the step's peak memory, docs/benchmarks.md)."""

    def __init__(self, rows: int, vocab: int, like: torch.Tensor, compute_dtype: torch.dtype, stats_dtype: torch.dtype):
        self.logits = like.new_empty((rows, vocab), dtype=compute_dtype)  # (c, V)
        self.stats = self.logits if stats_dtype == compute_dtype else like.new_empty((rows, vocab), dtype=stats_dtype)

    def chunk_logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """z = h Wᵀ + b in the compute dtype, returned upcast to the stats dtype: (c, H) -> (c, V)."""
        logits = self.logits[: h.shape[0]]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        return logits if self.stats is self.logits else self.stats[: h.shape[0]].copy_(logits)

    def to_compute(self, z: torch.Tensor) -> torch.Tensor:
        """A (c, V) stats-dtype tensor in the compute dtype (no copy when they agree)."""
        return z if self.stats is self.logits else self.logits[: z.shape[0]].copy_(z)


class _LinearHeadStats(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,)) -> ℓ (N,), vℓ (N,), chunk by chunk.

    Forward keeps ``ℓ`` and ``vℓ`` only; backward recomputes each chunk's logits (see the module docstring).
    With ``keep_expected`` (a frozen head: only ``hidden`` needs a gradient) forward also keeps the expected
    output embedding ``E = softmax(z) W`` (N, H), and backward is ``∂/∂h = g_vℓ · E + g_ℓ · W[a]`` with no
    recomputation. All arithmetic runs with autocast off, in ``compute_dtype`` for the matmuls and in
    ``stats_dtype`` (float32 at least) for log-sum-exp and the softmax, so forward and backward see the same
    logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype, keep_expected):
        stats_dtype = torch.promote_types(compute_dtype, torch.float32)
        n, vocab = hidden.shape[0], weight.shape[0]
        logit_taken = hidden.new_empty(n, dtype=stats_dtype)
        logsumexp = hidden.new_empty(n, dtype=stats_dtype)
        expected = hidden.new_empty(hidden.shape, dtype=compute_dtype) if keep_expected else None  # (N, H)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            buffers = _ChunkBuffers(min(chunk_size, n), vocab, hidden, compute_dtype, stats_dtype)
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                z = buffers.chunk_logits(hidden[rows].to(compute_dtype), w, b)  # (c, V)
                logit_taken[rows] = z.gather(1, targets[rows, None]).squeeze(1)
                shift = z.amax(dim=1, keepdim=True)  # (c, 1); vℓ = m + ln Σ_a exp(z_a − m), in place
                total = z.sub_(shift).exp_().sum(dim=1)  # (c,)
                logsumexp[rows] = total.log().add_(shift.squeeze(1))
                if keep_expected:  # E = softmax(z) W: (c, V) × (V, H)
                    torch.mm(buffers.to_compute(z.div_(total[:, None])), w, out=expected[rows])
        if keep_expected:
            ctx.save_for_backward(weight, targets, expected)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
            ctx.buffers = buffers if any(ctx.needs_input_grad[:3]) else None  # backward's (same rows), freed there
        ctx.chunk_size, ctx.compute_dtype, ctx.keep_expected = chunk_size, compute_dtype, keep_expected
        ctx.hidden_dtype = hidden.dtype
        return logit_taken, logsumexp

    @staticmethod
    def backward(ctx, grad_taken, grad_lse):
        if ctx.keep_expected:
            return _frozen_head_backward(ctx, grad_taken, grad_lse), None, None, None, None, None, None
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, n, vocab = ctx.compute_dtype, hidden.shape[0], weight.shape[0]
        grad_hidden = hidden.new_empty(hidden.shape, dtype=dtype) if need_hidden else None  # (N, H)
        grad_weight = None  # (V, H), accumulated in the weight's dtype; the first chunk's addmm_ overwrites it
        if need_weight:
            grad_weight = torch.empty_like(weight) if n > 0 and weight.dtype == dtype else torch.zeros_like(weight)
        grad_bias = logsumexp.new_zeros(vocab) if need_bias else None  # (V,)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            buffers, ctx.buffers = ctx.buffers, None
            if buffers is None:  # a second backward through a retained graph
                buffers = _ChunkBuffers(min(ctx.chunk_size, n), vocab, hidden, dtype, logsumexp.dtype)
            for start in range(0, n, ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(dtype)  # (c, H)
                grad_z = buffers.chunk_logits(h, w, b)  # (c, V), turned into ∂/∂z in place:
                grad_z.sub_(logsumexp[rows, None]).exp_().mul_(grad_lse[rows, None])  # g_vℓ · softmax(z)
                chunk_rows = torch.arange(h.shape[0], device=h.device)
                grad_z.index_put_((chunk_rows, targets[rows]), grad_taken[rows], accumulate=True)  # + g_ℓ · onehot
                if need_bias:
                    grad_bias += grad_z.sum(dim=0)
                grad_z = buffers.to_compute(grad_z)
                if need_hidden:
                    torch.mm(grad_z, w, out=grad_hidden[rows])
                if need_weight:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad_z.t(), h, beta=0.0 if start == 0 else 1.0)
                    else:  # autocast: the weight is kept in float32, the matmuls run in bf16/fp16
                        grad_weight += torch.mm(grad_z.t(), h)
            del buffers
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None

def _frozen_head_backward(ctx, grad_taken: torch.Tensor, grad_lse: torch.Tensor) -> torch.Tensor:
    """∂/∂h = g_vℓ · E + g_ℓ · W[a]   (N, H), from the kept E = softmax(z) W (N, H); in the stats dtype, returned
    in the hidden states' dtype."""
    weight, targets, expected = ctx.saved_tensors
    stats_dtype = grad_lse.dtype
    with torch.autocast(expected.device.type, enabled=False):
        taken_rows = weight[targets].to(ctx.compute_dtype).to(stats_dtype)  # (N, H): W[a], as the matmuls saw it
        grad_hidden = torch.addcmul(grad_taken[:, None] * taken_rows, grad_lse[:, None], expected.to(stats_dtype))
    return grad_hidden.to(ctx.hidden_dtype)


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def linear_head_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """ℓ_n = z_n[targets_n] and vℓ_n = ln Σ_a exp z_n[a] for z_n = W h_n + b, in chunks of rows.

    hidden: (N, H); weight: (V, H); bias: (V,) or None; targets: (N,) int64 in [0, V). Returns a TokenStats
    of two (N,) tensors in float32 (float64 for float64 inputs); differentiable w.r.t. hidden, weight, bias.
    Under ``torch.autocast`` the matmuls run in the autocast dtype, like ``nn.Linear`` would. When neither
    ``weight`` nor ``bias`` requires grad (a frozen head, as with LoRA), forward keeps ``softmax(z) W`` (N, H)
    and backward recomputes nothing (see :data:`KEEP_EXPECTED_FOR_FROZEN_HEAD`). It is equivalent to (but
    never holds the (N, V) logits of)::

        token_stats(torch.nn.functional.linear(hidden, weight, bias)[None], targets[None])  # then [0]
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be an integer tensor of shape (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)} {targets.dtype}"
        )
    _check_chunk_size(chunk_size)
    if targets.numel():
        low, high = torch.aminmax(targets)
        low, high = torch.stack([low, high]).tolist()  # one host synchronisation
    if targets.numel() and (low < 0 or high >= weight.shape[0]):
        raise ValueError(f"token ids must lie in [0, V) = [0, {weight.shape[0]}), got range [{low}, {high}]")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
    keep_expected = KEEP_EXPECTED_FOR_FROZEN_HEAD and frozen_head and hidden.requires_grad and torch.is_grad_enabled()
    logit_taken, logsumexp = _LinearHeadStats.apply(
        hidden, weight, bias, targets.long(), chunk_size, compute_dtype, keep_expected
    )
    return TokenStats(logit_taken=logit_taken, logsumexp=logsumexp)


# --------------------------------------------------------------------------------------------------
# Hugging Face causal LMs
# --------------------------------------------------------------------------------------------------


def exact_path_reason(model: nn.Module) -> str | None:
    """Why ``model``'s logits are not ``W h + b`` of its backbone's last hidden state, or None if they are.

    Detected: an output embedding that is not exactly ``torch.nn.Linear`` (a LoRA-wrapped or quantised head,
    a custom module, none at all; FSDP's wrapping of a Linear is looked through); no separate backbone (``model.base_model is model``); a
    ``final_logits_bias`` buffer; a config attribute of :data:`LOGIT_TRANSFORM_ATTRIBUTES` set to a value
    that transforms the logits. Anything a model's ``forward`` does to the logits beyond these is not seen.
    """
    hf_model = unwrap_model(model)
    get_head = getattr(hf_model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if module_class(head) is not nn.Linear:
        return f"its output embedding is {module_class(head).__name__}, not a plain torch.nn.Linear"
    if getattr(hf_model, "base_model", hf_model) is hf_model:
        return "it has no separate backbone (model.base_model is the model itself)"
    if getattr(hf_model, "final_logits_bias", None) is not None:
        return "it adds final_logits_bias to the logits"
    config = getattr(hf_model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name, identity in LOGIT_TRANSFORM_ATTRIBUTES.items():
            value = getattr(text_config, name, None)
            if value is None or (identity is None and value == 0) or (identity is not None and value == identity):
                continue
            return f"config.{name} = {value!r} transforms the logits"
    return None


def _warn_once(model: nn.Module, reason: str) -> None:
    name = type(model).__name__
    if name in _WARNED_CLASSES:
        return
    _WARNED_CLASSES.add(name)
    warnings.warn(
        f"shiq_llm.core.stats: {name}: {reason}; using the exact full-logit path, which holds all B·L·V logits "
        "(correct, but without the chunked path's memory saving). Shown once per model class.",
        stacklevel=3,
    )


def _check_inputs(input_ids, attention_mask, response_mask, position_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        got = (getattr(input_ids, "shape", type(input_ids)), getattr(input_ids, "dtype", None))
        raise ValueError(f"input_ids must be an integer tensor of shape (B, L), got {got}")
    shape = tuple(input_ids.shape)
    if shape[1] < 2:
        raise ValueError(f"sequences need at least 2 positions (a state and a token), got L = {shape[1]}")
    for name, x in (("attention_mask", attention_mask), ("response_mask", response_mask), ("position_ids", position_ids)):
        if name == "position_ids" and x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            got = getattr(x, "shape", type(x))
            raise ValueError(f"{name} must be a tensor of shape (B, L) = {shape} like input_ids, got {got}")
    if response_mask.dtype != torch.bool:
        raise ValueError(f"response_mask must be a bool tensor, got {response_mask.dtype}")
    attended = attention_mask.bool()
    outside = response_mask & ~attended
    after_padding = response_mask[:, 1:] & ~attended[:, :-1]
    not_binary = (attention_mask != 0) & (attention_mask != 1)
    # one host synchronisation for the four checks; the failing one is located only when there is one
    bad = torch.stack([not_binary.any(), response_mask[:, 0].any(), outside.any(), after_padding.any()]).tolist()
    if not any(bad):
        return
    if bad[0]:
        raise ValueError("attention_mask must contain only 0 and 1")
    if bad[1]:
        row = int(response_mask[:, 0].nonzero()[0])
        raise ValueError(f"response_mask is True at position 0 (row {row}): no state precedes the first token")
    if bad[2]:
        row, pos = outside.nonzero()[0].tolist()
        raise ValueError(f"response_mask is True where attention_mask is 0 (row {row}, position {pos}): padding is no response")
    row, pos = after_padding.nonzero()[0].tolist()
    raise ValueError(
        f"response token at (row {row}, position {pos + 1}) follows a padding position: it must be predicted from an attended token"
    )


def scatter_to_mask(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(N,) values of the response positions (row-major order) -> (B, L), 0 elsewhere."""
    return torch.zeros(response_mask.shape, dtype=values.dtype, device=values.device).masked_scatter(response_mask, values)


def response_token_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    position_ids: torch.Tensor | None = None,
    in_forward: bool = False,
) -> TokenStats:
    """Per-token statistics of a causal LM on its response tokens, without the (B, L, V) logits.

    model: a transformers causal LM (or a peft model around one); input_ids: (B, L) int64;
    attention_mask: (B, L) {0, 1}; response_mask: (B, L) bool, True on the tokens the policy wrote (never
    at position 0, never on padding, never right after padding); position_ids: (B, L) or None, in which case
    they count attended tokens only (``position_ids_from_mask``), so left padding is handled.

    Returns TokenStats of (B, L) float32 tensors (float64 for a float64 model) aligned with ``input_ids``: at a response position p,
    ``logit_taken = z_{p−1}[input_ids[p]]`` and ``logsumexp = ln Σ_a exp z_{p−1}[a]`` (z_{p−1}: the logits
    emitted at p − 1); exactly 0 where ``response_mask`` is False (rows without response token: all 0).
    Pass ``response_mask`` as the loss's ``mask``. Values and gradients equal those of
    :func:`naive_response_token_stats`; models whose head is not a plain linear layer
    (:func:`exact_path_reason`) take that exact path, with a warning once per model class. ``model`` may be
    wrapped by DDP, FSDP1, FSDP2 or DeepSpeed (ZeRO-3 included; :func:`head_sharding`): the statistics then
    run as the wrapper's forward (``shiq_llm.core.sharding.call_as_forward``), so that it unshards the head;
    ``in_forward=True`` when the caller already runs inside the wrapper's forward (the head is still called
    through its own hooks).
    """
    _check_inputs(input_ids, attention_mask, response_mask, position_ids)
    _check_chunk_size(chunk_size)
    if not in_forward:  # ShiQTrainer's statistics forward: check_unsharded below still refuses a sharded head
        head_sharding(model)
    reason = exact_path_reason(model)
    if reason is not None:
        _warn_once(model, reason)
        return naive_response_token_stats(model, input_ids, attention_mask, response_mask, position_ids=position_ids)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hf_model = unwrap_model(model)
    head = hf_model.get_output_embeddings()

    def head_stats(states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H), (N,) -> ℓ (N,), vℓ (N,); run as the head's forward, so the head's weight is whole here."""
        linear = inner_module(head)  # the nn.Linear inside an FSDP1 wrapper
        check_unsharded(linear.weight, f"the output head's weight of {type(hf_model).__name__}")
        return tuple(linear_head_token_stats(states, linear.weight, targets, bias=linear.bias, chunk_size=chunk_size))

    def stats_forward(input_ids, attention_mask, position_ids):
        """(B, L) ids, mask, positions -> ℓ (N,), vℓ (N,); run as the model's forward."""
        outputs = hf_model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = outputs.last_hidden_state  # (B, L, H)
        states = hidden[:, :-1][response_mask[:, 1:]]  # (N, H): the state before each response token
        targets = input_ids[response_mask]  # (N,), same row-major order (position 0 is never a response)
        return call_as_forward(head, head_stats, states, targets)

    if in_forward:  # already inside the wrapper's forward (ShiQTrainer's statistics forward): no second redirect
        stats = stats_forward(input_ids, attention_mask, position_ids)
    else:
        stats = call_as_forward(model, stats_forward, input_ids, attention_mask, position_ids)
    return TokenStats(*(scatter_to_mask(x, response_mask) for x in stats))  # (B, L) each


def response_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, nn.Linear]:
    """The backbone's last hidden states before each response token, and the output head: ``(states, head)``.

    states: (N, H), row-major over the True entries of ``response_mask`` (B, L): ``states[n]`` is ``h_{p−1}``
    for the n-th response position p, so ``head(states)`` are the logits that predict ``input_ids[response_mask]``.
    Only the backbone runs (no (B, L, V) logits). For models with ``exact_path_reason(model) is None``;
    arguments as in :func:`response_token_stats` (position ids default to counting attended tokens).
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hf_model = unwrap_model(model)
    outputs = hf_model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden = outputs.last_hidden_state  # (B, L, H)
    return hidden[:, :-1][response_mask[:, 1:]], hf_model.get_output_embeddings()  # (N, H): state before each token


def naive_response_token_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> TokenStats:
    """The exact full-logit path; same arguments and result as :func:`response_token_stats`.

    It holds all B·L·V logits (and their gradient). It is the naive equivalent of the chunked path::

        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits  # (B, L, V)
        stats = token_stats(logits[:, :-1], input_ids[:, 1:])  # (B, L − 1): logits at p − 1, token p
        stats = where(response_mask, [0 | stats], 0)  # (B, L)
    """
    _check_inputs(input_ids, attention_mask, response_mask, position_ids)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    shifted = token_stats(logits[:, :-1], input_ids[:, 1:])  # (B, L − 1)
    zero = torch.zeros((), dtype=shifted.logit_taken.dtype, device=logits.device)
    return TokenStats(
        *(torch.where(response_mask, nn.functional.pad(x, (1, 0)), zero) for x in shifted)  # (B, L)
    )
