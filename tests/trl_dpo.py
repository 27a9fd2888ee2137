"""TRL's DPO loss as a function of sequence log-ratios, for ``shiq-toy verify tests.trl_dpo:trl_dpo_loss --as dpo``.

TRL 1.16 has no stand-alone DPO loss: the sigmoid loss is computed inline in ``DPOTrainer._compute_loss``, after a
policy forward through TRL's fused LM head (``outputs.log_probs``, per-token log π of the completion tokens) and
the reference log-probabilities. ``trl_dpo_loss`` runs that very method, unbound, on a minimal stand-in for the
trainer (the attributes it reads: ``beta``, ``loss_type=["sigmoid"]``, ``f_divergence_type="reverse_kl"``,
precomputed reference log-probs, no length desensitisation, no WPO weighting, no MoE loss; an identity
``accelerator``) and a stand-in model whose ``log_probs`` put each pair's log-ratio Δ on one completion token
(the reference log-probs are 0, so TRL's ``chosen_logps − ref_chosen_logps`` is Δ itself). The method returns
the mean over the batch, so each pair runs as a batch of one. Gradients flow from TRL's loss back to Δ.
Never imported by the library.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import DPOTrainer


class _Model:
    """Stand-in for the policy: its fused-head outputs for a batch [chosen, rejected] of one completion token."""

    training = True

    def __init__(self, logps: torch.Tensor):
        self.logps = logps  # (2,) log π(y|x) of the chosen and the rejected completion

    def __call__(self, **kwargs):
        length = kwargs["input_ids"].shape[1] - 1
        zeros = torch.zeros(2, length, dtype=self.logps.dtype)
        return SimpleNamespace(
            log_probs=torch.cat([self.logps[:, None], zeros[:, 1:]], dim=1),  # (2, L−1): Δ on the first token
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros(2, length, dtype=torch.bool),
        )


def _trainer(beta: float, model: _Model) -> SimpleNamespace:
    identity = lambda x: x  # noqa: E731 - one process: gather is the identity
    return SimpleNamespace(
        model=model,
        ref_model=None,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def trl_dpo_loss(log_ratio_chosen: torch.Tensor, log_ratio_rejected: torch.Tensor, *, beta: float) -> torch.Tensor:
    """(P,) DPO losses computed by ``trl.DPOTrainer._compute_loss`` (loss_type "sigmoid"), one pair at a time."""
    losses = []
    for chosen, rejected in zip(log_ratio_chosen, log_ratio_rejected):
        model = _Model(torch.stack([chosen, rejected]))
        inputs = {
            "input_ids": torch.zeros(2, 2, dtype=torch.long),  # prompt token, one completion token
            "attention_mask": torch.ones(2, 2, dtype=torch.long),
            "completion_mask": torch.tensor([[0, 1], [0, 1]]),
            "ref_chosen_logps": torch.zeros(1, dtype=chosen.dtype),
            "ref_rejected_logps": torch.zeros(1, dtype=chosen.dtype),
        }
        losses.append(DPOTrainer._compute_loss(_trainer(beta, model), model, inputs, return_outputs=False))
    return torch.stack(losses)
