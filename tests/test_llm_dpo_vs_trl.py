"""Our DPO equals TRL's: the loss, the log-probabilities and the gradients of one batch (issue #4 §6).

Reference: ``trl.DPOTrainer`` itself. TRL has no stand-alone DPO loss function; its loss lives in
``DPOTrainer.compute_loss`` (→ ``_compute_loss``): the policy and reference forwards go through TRL's own fused
LM head (``add_fused_lm_head``: per-token ``log π(y_t | x, y_<t)`` of the completion tokens, computed in tiles
without the (B, L, V) logits), their sum over the completion gives ``log π(y|x)``, and ``loss_type="sigmoid"``
is ``mean_pairs −ln σ(β ((πc − rc) − (πr − rr)))``. Here a real ``DPOTrainer`` tokenises a small
``datasets.Dataset`` of {prompt, chosen, rejected} strings (it appends EOS to both completions), its own
``DataCollatorForPreference`` collates one batch (rows ``[:P]`` prompt+chosen, ``[P:]`` prompt+rejected, right
padding, ``completion_mask`` on the completion tokens), and ``trainer.compute_loss(model, batch)`` gives TRL's
loss; no training loop runs.

Ours, on the same token ids: ``response_mask = completion_mask``; the policy goes through ShiQTrainer's
statistics forward (``shiq_llm.train.trainer.add_stats_forward``: ``shiq_llm.core.stats.response_token_stats``, our chunked
head, with a chunk size small enough for several chunks), the reference through ``response_token_stats`` under ``no_grad``;
``Δ = shiq_toy.baselines.sequence_log_ratio``; the loss both as ``dpo_loss(Δ[:P], Δ[P:], beta=β).mean()`` and as
``shiq_llm.train.trainer.algorithm_loss("dpo", …)`` (the training path: P chosen rows, then P rejected ones, the
layout TRL's collator also uses). Gradients: TRL's loss is back-propagated into one policy, ours into a second
policy built from the same seed (identical weights, checked).

Compared: the loss (and ``algorithm_loss``'s), TRL's logged per-batch means (``logps/chosen``,
``logps/rejected``, ``rewards/chosen`` = β·mean Δc, ``rewards/rejected``, ``rewards/margins``), and every
parameter's gradient. Settings that would make TRL compute something else are pinned in ``_dpo_config``:
``loss_type=["sigmoid"]``, ``label_smoothing=0``, no length-desensitisation (``ld_alpha=None``), no WPO weighting,
``f_divergence_type="reverse_kl"``, reference log-probs computed on the batch (not precomputed), no truncation
(``max_length=None``), float32 (no bf16 autocast), no gradient checkpointing.

What differs, and why it does not matter here: TRL calls the model without ``position_ids`` (0, 1, 2, … per
row) whereas we pass ``position_ids_from_mask`` (attended tokens counted); with TRL's right padding they agree on
every real token, and causal attention keeps padding out of them. The two sides differ in summation order only
(TRL's tiled log-softmax vs our chunked log-sum-exp and custom backward), so they agree to float32 rounding.

Tolerances: float32 throughout. Loss and the logged means: ``torch.testing.assert_close``'s float32 defaults
(rtol = 1.3e-6, atol = 1e-5). Gradients: each tensor to ``atol = 1e-5 · max|g|`` of that tensor (≈ 170 unit
roundoffs 2⁻²⁴ of its scale; an elementwise relative test would be meaningless on entries that cancel to ~0)
and ``rtol = 1e-5``.
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from trl import DPOConfig, DPOTrainer

from shiq_llm.core.models import build_tokenizer, tiny_causal_lm
from shiq_llm.core.stats import response_token_stats
from shiq_llm.train.trainer import add_stats_forward, algorithm_loss
from shiq_toy.baselines import dpo_loss, sequence_log_ratio
from shiq_toy.losses import TokenStats

#: A β away from TRL's default 0.1, so a silently ignored ``beta`` would show, and large enough that
#: β (Δc − Δr) is O(1): the loss is visibly not ln 2.
BETA = 0.5
#: Rows of hidden states per pass of our chunked head: the batch has ~100 completion tokens, so several chunks.
CHUNK_SIZE = 16
#: Prompts and completions of different token lengths, so the collator pads and chosen/rejected lengths differ.
ROWS = {
    "prompt": ["user: what is the capital of france?", "the quick brown", "2 + 3 =", "a language model"],
    "chosen": [" the capital of france is paris.", " fox jumps over the lazy dog.", " 5", " reads its logits"],
    "rejected": [" london", " dog", " 7 or 8 or 9", " is a soft q value of a regularised decision process"],
}
PAIRS = len(ROWS["prompt"])


def _dpo_config(tmp_path) -> DPOConfig:
    """Plain sigmoid DPO on CPU in float32, one batch of all pairs; every option that changes the loss pinned."""
    return DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=PAIRS,
        beta=BETA,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        ld_alpha=None,
        use_weighting=False,
        f_divergence_type="reverse_kl",
        precompute_ref_log_probs=False,
        max_length=None,
    )


def _trl_loss_and_batch(tmp_path, tokenizer, policy, ref):
    """TRL's loss (back-propagated into ``policy``), the batch TRL built, and TRL's logged metrics."""
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=_dpo_config(tmp_path), train_dataset=datasets.Dataset.from_dict(ROWS),
        processing_class=tokenizer,
    )
    assert trainer.beta == BETA and trainer.loss_types == ["sigmoid"] and trainer.ld_alpha is None
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()  # dropout is off in the tiny models; "train" only selects the metrics bucket
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), batch, metrics


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dpo_matches_trl_dpo_trainer(tmp_path, arch):
    tokenizer = build_tokenizer()
    trl_policy, trl_ref = tiny_causal_lm(tokenizer, arch=arch, seed=0), tiny_causal_lm(tokenizer, arch=arch, seed=1)
    our_policy, our_ref = tiny_causal_lm(tokenizer, arch=arch, seed=0), tiny_causal_lm(tokenizer, arch=arch, seed=1)
    for ours, theirs in zip(our_policy.state_dict().values(), trl_policy.state_dict().values()):
        assert torch.equal(ours, theirs)  # the same starting weights on both sides

    trl_loss, batch, trl_metrics = _trl_loss_and_batch(tmp_path, tokenizer, trl_policy, trl_ref)

    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (2P, L): P chosen rows, P rejected
    response_mask = batch["completion_mask"].bool()  # (2P, L): the completion tokens TRL scores
    assert input_ids.shape[0] == 2 * PAIRS
    ends = attention_mask.sum(dim=1) - 1
    assert (input_ids[torch.arange(2 * PAIRS), ends] == tokenizer.eos_token_id).all()  # TRL appended EOS ...
    assert response_mask[torch.arange(2 * PAIRS), ends].all()  # ... and scores it, so we do too
    assert not (attention_mask == 1).all()  # the batch is padded

    our_policy.train()
    add_stats_forward(our_policy, chunk_size=CHUNK_SIZE)  # ShiQTrainer's statistics forward
    out = our_policy(input_ids=input_ids, attention_mask=attention_mask, shiq_response_mask=response_mask)
    stats = TokenStats(out.logit_taken, out.logsumexp)  # (2P, L)
    with torch.no_grad():
        ref_stats = response_token_stats(our_ref, input_ids, attention_mask, response_mask, chunk_size=CHUNK_SIZE)
    delta = sequence_log_ratio(stats, ref_stats, response_mask)  # (2P,) Δ = ln π(y|x) − ln π_ref(y|x)
    direct = dpo_loss(delta[:PAIRS], delta[PAIRS:], beta=BETA).mean()
    rewards = torch.zeros(input_ids.shape, dtype=torch.float32)  # DPO reads no reward
    loss, _, extras = algorithm_loss("dpo", stats, ref_stats, {"response_mask": response_mask, "rewards": rewards},
                                     beta=BETA)
    loss.backward()

    assert abs(trl_loss.item() - math.log(2)) > 1e-2  # policy ≠ reference: not the trivial value ln 2
    torch.testing.assert_close(loss.detach(), trl_loss)
    torch.testing.assert_close(direct.detach(), trl_loss)

    logps = torch.where(response_mask, stats.logit_taken - stats.logsumexp, 0.0).sum(dim=1).detach()  # (2P,)
    ours = {
        "logps/chosen": logps[:PAIRS].mean(),
        "logps/rejected": logps[PAIRS:].mean(),
        "rewards/chosen": BETA * delta[:PAIRS].detach().mean(),
        "rewards/rejected": BETA * delta[PAIRS:].detach().mean(),
        "rewards/margins": extras["dpo_margin"].detach().mean(),
    }
    for name, value in ours.items():
        torch.testing.assert_close(value, torch.tensor(trl_metrics[name]), msg=lambda m, name=name: f"{name}: {m}")

    trl_grads = dict(trl_policy.named_parameters())
    for name, param in our_policy.named_parameters():
        ours_grad, trl_grad = param.grad, trl_grads[name].grad
        assert ours_grad is not None and trl_grad is not None, name
        scale = ours_grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
