"""Training metrics: what is logged, computed from the statistics the loss already has, and where it goes.

``ShiQTrainer`` logs these every ``logging_steps`` (means over the micro-batches since the last record, over
all processes) to ``trainer.state.log_history``, the ``report_to`` trackers (TensorBoard, W&B, …) and
``OUTPUT_DIR/metrics.jsonl`` (:class:`MetricsFileCallback`); evaluation records carry the same names with
``eval_``. Keys of a record:

- ``step``: optimizer steps done (the JSONL file). ``epoch``: passes over the training items.
- ``loss``: mean training loss (transformers' own).
- ``abs_residual``: token methods: mean over response tokens of ``|residual_t|``
  (``shiq_toy.losses.RESIDUALS[name]``); sequence and pair methods whose loss is the square of one residual
  (``Method.abs_residual``: dro, copg, ipo): mean of ``|e|``; not logged for ``dpo``.
- ``dpo_margin`` (pair methods): mean of ``β(Δ(y_a) − Δ(y_b))``. ``value`` (dro): mean ``V_φ(x)``.
- ``implicit_value``: mean over sequences of ``β (vℓ − vref)`` at the first response token (state s_1): the
  value ShiQ implies for the prompt (spec §3, fact 6).
- ``kl_estimate``: mean over response tokens of ``ρ_t = ln π(a_t|s_t) − ln π_ref(a_t|s_t)`` on the data's own
  tokens. An *off-policy* estimate: on tokens sampled from π it estimates KL(π‖π_ref) per token; on data
  sampled from π_ref its expectation is −KL(π_ref‖π) ≤ 0. For KL(π‖π_ref) proper, sample from π
  (``shiq_llm.generation.evaluate``).
- ``nll``: mean over response tokens of ``−ln π(a_t|s_t)``: the data's cross-entropy under π, logged as a
  proxy of the policy's entropy (equal in expectation when the data comes from π). The per-token entropy
  itself needs the full distribution, which the chunked statistics never hold.
- ``grad_norm``: total L2 norm of the gradient before clipping (transformers' own).
- ``learning_rate``: learning rate (transformers' own).
- ``tokens_per_s``: attended (non-padding) tokens processed per second of wall time, all processes together.
- ``peak_memory_mib``: GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set
  (``ru_maxrss``).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from transformers import TrainerCallback

from shiq_llm.storage.jsonl import dumps
from shiq_toy.losses import TokenStats, log_ratio
from shiq_toy.methods import METHODS

__all__ = ["batch_metrics", "peak_memory_mib", "MetricsFileCallback", "EvaluateEvery"]


def _first_response(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) values -> (B,) the value at each row's first response position."""
    first = mask.to(torch.int8).argmax(dim=1, keepdim=True)  # (B, 1)
    return values.gather(1, first).squeeze(1)


@torch.no_grad()
def batch_metrics(
    algo: str,
    policy: TokenStats,
    ref: TokenStats,
    batch: Mapping[str, torch.Tensor],
    per_item: torch.Tensor,
    *,
    beta: float,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagnostics of one micro-batch (module docstring), as 0-d float32 tensors on the batch's device.

    policy, ref: TokenStats of (B, L); batch: ``response_mask`` (B, L); per_item: the unreduced loss, (B,) or
    (P,) for pairs; extras: the loss's own diagnostics (``shiq_llm.train.trainer.algorithm_loss``): ``residual``
    (B, L) of a token algorithm gives ``abs_residual`` (so the residual is not computed twice); every other
    entry (``dpo_margin`` (P,), ``value`` (B,)) is logged as its mean.
    """
    extras = dict(extras or {})
    residual = extras.pop("residual", None)
    policy = TokenStats(*(x.detach().float() for x in policy))
    mask = batch["response_mask"]
    tokens = mask.sum().clamp(min=1)
    rho = torch.where(mask, log_ratio(policy, ref), 0.0)  # (B, L)
    logp = torch.where(mask, policy.logit_taken - policy.logsumexp, 0.0)  # (B, L)
    out = {
        "implicit_value": (beta * _first_response(policy.logsumexp - ref.logsumexp, mask)).mean(),
        "kl_estimate": rho.sum() / tokens,
        "nll": -logp.sum() / tokens,
    }
    if residual is not None:  # token algorithms: (B, L), 0 off the response tokens
        out["abs_residual"] = residual.detach().float().abs().sum() / tokens
    elif METHODS[algo].abs_residual is not None:  # a square of one residual per sequence / pair
        out["abs_residual"] = METHODS[algo].abs_residual(per_item.detach().float()).mean()
    for key, x in extras.items():
        out[key] = x.detach().float().mean()
    return out


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on a GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsFileCallback(TrainerCallback):
    """Append each log record of the main process to a JSONL file (``{"step": global_step, **logs}``), one
    line per record, flushed at once; a resumed run first cuts the file back to its checkpoint
    (``shiq_llm.train.checkpoint.truncate_metrics_log``), so the file of a resumed run equals an uninterrupted one's."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(dumps({"step": state.global_step, **logs}) + "\n")


class EvaluateEvery(TrainerCallback):
    """Evaluate the policy every ``every`` optimizer steps during training, not at the last step (the final model
    is evaluated after training): ``points`` collects ``{"step": s, **evaluate(model)}`` and ``seconds`` the time
    spent. ``evaluate`` must leave the global RNG as it found it (the samplers of ``shiq_llm.generation.sampling`` do), so
    that the run trains exactly as it would without the callback."""

    def __init__(self, every: int, evaluate: Callable[[Any], dict]):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every, self.evaluate = every, evaluate
        self.points: list[dict] = []
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            tick = time.perf_counter()
            training = model.training
            model.eval()
            self.points.append({"step": state.global_step, **self.evaluate(model)})
            model.train(training)
            self.seconds += time.perf_counter() - tick
        return control
