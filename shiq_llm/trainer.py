"""Train a causal LM with ShiQ (or DPO, CoPG, DRO) on reward-labelled rows: ``train(TrainConfig) -> TrainResult``.

transformers loads the model and tokenizer and makes the schedule, peft adds LoRA, accelerate places devices,
runs bf16 autocast, accumulates gradients, launches distributed runs and saves states, datasets holds the
data. Our code is the batching and the loss call::

    stats = response_token_stats(model, input_ids, attention_mask, response_mask)      # (B, L) ℓ, vℓ
    ref = TokenStats(cached ℓref, cached vref)                                         # shiq_llm.reference
    loss = reduce_loss(LOSSES[algo](stats, ref, rewards, response_mask, beta=β, gamma=γ), response_mask)

The run, in order (:func:`train`): check the output directory and a checkpoint to resume; load the tokenizer
and model and check that they fit, load, validate and tokenise the rows, add LoRA (:mod:`shiq_llm.loading`;
``model="tiny-llama"`` / ``"tiny-gpt2"`` builds a small local model in ``OUT/base_model``); load or compute the
reference statistics (:func:`shiq_llm.reference.reference_cache`); train for ``max_steps`` optimizer steps,
logging metrics (:mod:`shiq_llm.metrics`) and saving checkpoints (:mod:`shiq_llm.checkpoint`); save the final
model with ``save_pretrained`` (+ tokenizer) to ``OUT/final`` (with LoRA: merged weights, and the adapter alone
in ``OUT/final/adapter``).

Batches. Token algorithms (``shiq*``) and ``dro`` draw batches of examples; ``dpo`` and ``copg`` draw batches of
pairs ``(chosen, rejected)`` from ``shiq_llm.data.preference_pairs`` (same prompt, different rewards), collated
as the ``P`` chosen rows followed by the ``P`` rejected ones. ``R(x, y)`` is the sum of the example's per-token
rewards. The order is a permutation of the items drawn from ``(seed, epoch)`` alone (:mod:`shiq_llm.batching`),
so a resumed run skips the micro-batches already consumed and continues with exactly the batches the
uninterrupted run would have seen; accelerate's ``load_state`` restores weights, optimizer, schedule, RNG and
its gradient-accumulation counter. A resumed run must keep the options of :data:`RESUME_INVARIANT`, the same
number of processes, and the same base model and data (compared by fingerprint).

Distributed runs: ``accelerate launch -m shiq_llm.cli train …`` (data parallel, DDP). The model's forward
goes through :class:`PolicyStats`, one module that accelerate wraps. The chunked head reads the output
weight directly, so sharded-parameter schemes (FSDP, DeepSpeed ZeRO-3) are not supported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from shiq_llm.batching import EpochPermutation, TrainingItems, collate_items
from shiq_llm.checkpoint import (
    check_trainable_saved,
    prune_checkpoints,
    resume_point,
    save_checkpoint,
    save_trainable_only,
)
from shiq_llm.config import PAIR_ALGOS, TINY_MODELS, TOKEN_ALGOS, TrainConfig
from shiq_llm.loading import apply_lora, load_examples, load_model_and_tokenizer
from shiq_llm.metrics import JsonlWriter, MetricsWindow, batch_metrics, peak_memory_mib
from shiq_llm.models import check_tokenizer_fits_model
from shiq_llm.reference import data_fingerprint, model_fingerprint, reference_cache
from shiq_llm.stats import response_token_stats
from shiq_toy.baselines import copg_loss, dpo_loss, dro_loss, sequence_log_ratio
from shiq_toy.losses import RESIDUALS, TokenStats, reduce_loss

__all__ = ["TrainResult", "PolicyStats", "algorithm_loss", "train"]

logger = logging.getLogger(__name__)

#: Config fields that must not change when a run is resumed (they change the trajectory). The data and the
#: base model are compared by fingerprint (shiq_llm.reference), not by path, so either may move.
RESUME_INVARIANT = (
    "data_format", "max_length", "max_prompt_length", "long_response", "padding_side", "model_dtype", "precision",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "algo", "beta", "gamma", "average", "pair_mode",
    "value_coef", "batch_size", "grad_accum", "lr", "weight_decay", "lr_scheduler", "warmup_steps",
    "max_grad_norm", "seed",
)
_RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "tensorboard")


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and its last logged metrics."""

    out_dir: Path
    final_dir: Path
    metrics_file: Path
    checkpoint: Path | None
    steps: int
    final_metrics: dict[str, float]


# --------------------------------------------------------------------------------------------------
# The loss of one batch
# --------------------------------------------------------------------------------------------------


class PolicyStats(nn.Module):
    """The trained LM (and DRO's value head V_φ) behind one forward, so accelerate/DDP wrap a single module.

    forward(input_ids (B, L), attention_mask (B, L), response_mask (B, L), prompt_state (B, H) | None)
    -> (TokenStats of (B, L) float32, value (B,) float32 | None).
    """

    def __init__(self, model: nn.Module, value_head: nn.Module | None = None, *, chunk_size: int):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, response_mask, prompt_state=None):
        stats = response_token_stats(self.model, input_ids, attention_mask, response_mask, chunk_size=self.chunk_size)
        value = None
        if self.value_head is not None:
            value = self.value_head(prompt_state).squeeze(-1).float()  # (B,) V_φ(x)
        return stats, value


def algorithm_loss(
    algo: str,
    policy: TokenStats,
    ref: TokenStats,
    batch: Mapping[str, torch.Tensor],
    *,
    beta: float,
    gamma: float = 1.0,
    average: str = "sequence",
    value: torch.Tensor | None = None,
    value_coef: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch from its statistics: ``(loss, per_item, extras)``.

    policy, ref: TokenStats of (B, L); batch: ``response_mask`` (B, L) bool and ``rewards`` (B, L).
    Token algorithms: per_item (B,) = ``LOSSES[algo]`` = Σ_t residual_t², reduced by ``reduce_loss(…, average)``.
    ``dro``: per_item (B,) = ``dro_loss(Δ, R, value)`` with value (B,) = V_φ(x). ``dpo``/``copg``: the B rows are
    P = B/2 pairs, rows ``[:P]`` chosen and ``[P:]`` rejected; per_item (P,); the ``"token"`` average divides
    by the response tokens of both members. extras: diagnostics (``residual`` (B, L) of token algorithms,
    ``dpo_margin`` (P,), ``value`` (B,)), read by ``shiq_llm.metrics.batch_metrics``.
    """
    mask, rewards = batch["response_mask"], batch["rewards"]
    if algo in TOKEN_ALGOS:
        residual = RESIDUALS[algo](policy, ref, rewards, mask, beta=beta, gamma=gamma)  # (B, L)
        per_item = residual.square().sum(dim=1)  # (B,) = LOSSES[algo](…): Σ_t residual_t²
        return reduce_loss(per_item, mask, average=average), per_item, {"residual": residual}
    delta = sequence_log_ratio(policy, ref, mask)  # (B,) Δ(y) = Σ_t ρ_t
    reward = rewards.sum(dim=1)  # (B,) R(x, y)
    if algo == "dro":
        if value is None:
            raise ValueError("algo 'dro' needs the value V_φ(x) of every sequence")
        per_item = dro_loss(delta, reward, value, beta=beta, value_coef=value_coef)  # (B,)
        return reduce_loss(per_item, mask, average=average), per_item, {"value": value}
    if algo not in PAIR_ALGOS:
        raise ValueError(f"unknown algo {algo!r}")
    half = mask.shape[0] // 2
    if mask.shape[0] != 2 * half:
        raise ValueError(f"a pair batch needs an even number of rows (chosen then rejected), got {mask.shape[0]}")
    pair_mask = torch.cat([mask[:half], mask[half:]], dim=1)  # (P, 2L): the tokens of both responses
    if algo == "dpo":
        per_item = dpo_loss(delta[:half], delta[half:], beta=beta)  # (P,)
        extras = {"dpo_margin": beta * (delta[:half] - delta[half:])}
    else:
        per_item = copg_loss(delta[:half], delta[half:], reward[:half], reward[half:], beta=beta)  # (P,)
        extras = {}
    return reduce_loss(per_item, pair_mask, average=average), per_item, extras


# --------------------------------------------------------------------------------------------------
# One micro-batch
# --------------------------------------------------------------------------------------------------


def _train_micro_batch(policy, batch, *, accelerator, optimizer, scheduler, config: TrainConfig):
    """Forward, loss, backward (and the optimizer step at an accumulation boundary) of one micro-batch."""
    with accelerator.accumulate(policy):
        stats, value = policy(batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                              batch.get("ref_prompt_state"))
        ref = TokenStats(batch["ref_logit_taken"], batch["ref_logsumexp"])
        loss, per_item, extras = algorithm_loss(config.algo, stats, ref, batch, beta=config.beta, gamma=config.gamma,
                                                average=config.average, value=value, value_coef=config.value_coef)
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), config.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    metrics = batch_metrics(config.algo, stats, ref, batch, per_item, beta=config.beta, extras=extras)
    return loss.detach(), metrics, grad_norm


# --------------------------------------------------------------------------------------------------
# The run, phase by phase
# --------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with ``config.algo``; see the module docstring and TrainConfig."""
    config = dataclasses.replace(config).validate()
    out = Path(config.out)
    accelerator, resume = _start(config, out)
    tokenizer, model, examples, pairs, fingerprints = _load(config, out, accelerator)
    if resume is not None:
        _check_same_inputs(resume, fingerprints)
    examples = _with_reference(config, out, accelerator, model, examples, tokenizer, fingerprints)
    policy, optimizer, loader, scheduler, n_items = _prepare(config, accelerator, model, examples, pairs, tokenizer)
    step, micro_batches = 0, 0
    if resume is not None:
        check_trainable_saved(resume[0], accelerator.unwrap_model(policy))
        accelerator.load_state(str(resume[0]), strict=not config.lora_r)  # LoRA checkpoints hold the adapters only
        step, micro_batches = resume[1]["step"], resume[1]["micro_batches"]
        logger.info("resumed from %s at step %d", resume[0], step)
    state = {"num_processes": accelerator.num_processes, "config": config.to_dict(),
             "model_fingerprint": fingerprints[0], "data_fingerprint": fingerprints[1]}
    last, checkpoint = _loop(config, out, accelerator, policy, optimizer, loader, scheduler, step, micro_batches, state)
    final = _save_final(accelerator, policy, tokenizer, out, config, last)
    accelerator.end_training()
    return TrainResult(out_dir=out, final_dir=final, metrics_file=out / "metrics.jsonl", checkpoint=checkpoint,
                       steps=last.get("step", step), final_metrics=last)


def _start(config: TrainConfig, out: Path):
    """The Accelerator, and the checkpoint to resume from (checked against the config) or None."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, set_seed

    _reset_accelerate_state()
    accelerator = Accelerator(
        mixed_precision="bf16" if config.precision == "bf16" else "no",
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard" if config.tensorboard and is_tensorboard_available() else None,
        project_dir=str(out),
    )
    resume = resume_point(out / "checkpoints", resume=config.resume, resume_from=config.resume_from, warn=logger.warning)
    if resume is not None:
        _check_resumable(config, resume[1], resume[0], accelerator.num_processes)
    if accelerator.is_main_process:
        _prepare_out_dir(out, config, resuming=resume is not None)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    return accelerator, resume


def _load(config: TrainConfig, out: Path, accelerator):
    """Tokenizer and model (checked to fit), tokenised examples, pairs, and their fingerprints; LoRA added."""
    tokenizer, model = load_model_and_tokenizer(config, out=out, accelerator=accelerator)
    check_tokenizer_fits_model(tokenizer, model)
    examples, report, pairs = load_examples(config, tokenizer)
    check_tokenizer_fits_model(tokenizer, model, token_ids=[max(max(ids) for ids in examples["input_ids"])])
    if accelerator.is_main_process:
        logger.info("data: %s%s", report, f"; {len(pairs[0])} pairs" if pairs else "")
        (out / "config.yaml").write_text(_yaml(config.to_dict()))
        summary = {**dataclasses.asdict(report), "pairs": len(pairs[0]) if pairs else None}
        (out / "data_report.json").write_text(json.dumps(summary, indent=2))
    fingerprints = (model_fingerprint(model), data_fingerprint(examples))  # the base model: before LoRA
    if config.lora_r:
        model = apply_lora(model, config)
    return tokenizer, model.to(accelerator.device), examples, pairs, fingerprints


def _with_reference(config: TrainConfig, out: Path, accelerator, model, examples, tokenizer, fingerprints):
    """The examples with the cached reference statistics as extra columns (computed on the main process first)."""
    import datasets

    with accelerator.main_process_first():
        ref = reference_cache(
            Path(config.ref_cache) if config.ref_cache else out / "reference", model, examples,
            settings={"precision": config.precision}, recompute=config.recompute_ref and accelerator.is_main_process,
            need_prompt_state=config.algo == "dro", fingerprints=fingerprints, log=logger.info,
            pad_token_id=tokenizer.pad_token_id, batch_size=config.ref_batch_size or 2 * config.batch_size,
            padding_side=config.padding_side, chunk_size=config.chunk_size, autocast=accelerator.autocast,
            progress=config.progress_bar and accelerator.is_main_process,
        )
    return datasets.concatenate_datasets([examples, ref], axis=1)


def _prepare(config: TrainConfig, accelerator, model, examples, pairs, tokenizer):
    """Policy (+ DRO value head), AdamW, schedule and seeded loader, all through ``accelerator.prepare``."""
    from transformers import get_scheduler

    value_head = None
    if config.algo == "dro":
        value_head = nn.Linear(len(examples[0]["ref_prompt_state"]), 1)
        nn.init.zeros_(value_head.weight), nn.init.zeros_(value_head.bias)  # V_φ ≡ 0 at the start
    policy = PolicyStats(model, value_head, chunk_size=config.chunk_size).to(accelerator.device)
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    processes = accelerator.num_processes  # accelerate steps a prepared scheduler once per process
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps * processes,
                              num_training_steps=config.max_steps * processes)
    items = TrainingItems(examples, pairs)
    collate = functools.partial(collate_items, pad_token_id=tokenizer.pad_token_id, padding_side=config.padding_side)
    loader = torch.utils.data.DataLoader(items, batch_size=config.batch_size,
                                         sampler=EpochPermutation(len(items), seed=config.seed), collate_fn=collate)
    prepared = accelerator.prepare(policy, optimizer, loader, scheduler)
    accelerator.register_save_state_pre_hook(save_trainable_only)
    return (*prepared, len(items))


def _loop(config: TrainConfig, out: Path, accelerator, policy, optimizer, loader, scheduler, step: int,
          micro_batches: int, state: Mapping[str, Any]):
    """Train from ``step`` to ``config.max_steps``, logging and checkpointing; returns (last metrics, checkpoint)."""
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    writer = JsonlWriter(out / "metrics.jsonl") if main else None
    tracking = _init_trackers(accelerator, config)
    window, last, checkpoint = MetricsWindow(), {}, None
    tokens, tick = torch.zeros((), device=accelerator.device), time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=step, desc=f"train {config.algo}", disable=not (config.progress_bar and main))
    while step < config.max_steps:
        epoch, skip = divmod(micro_batches, len(loader))
        loader.set_epoch(epoch)  # the seeded order of this epoch; skip what a resumed run already consumed
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            loss, metrics, grad_norm = _train_micro_batch(policy, batch, accelerator=accelerator, optimizer=optimizer,
                                                          scheduler=scheduler, config=config)
            micro_batches += 1
            tokens += batch["attention_mask"].sum()
            window.add({"loss": loss, **metrics, **({"grad_norm": grad_norm} if grad_norm is not None else {})})
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % config.logging_steps == 0 or step == config.max_steps:
                last = _log_window(accelerator, window, tokens, time.perf_counter() - tick, step=step,
                                   epoch=micro_batches / len(loader), lr=scheduler.get_last_lr()[0])
                if main:
                    writer.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.4g}")
                if tracking:
                    accelerator.log({k: v for k, v in last.items() if k != "step"}, step=step)
                window.reset()
                tokens, tick = torch.zeros((), device=accelerator.device), time.perf_counter()
            if (config.save_steps and step % config.save_steps == 0) or step == config.max_steps:
                checkpoint = save_checkpoint(accelerator, out / "checkpoints", step,
                                             {**state, "step": step, "micro_batches": micro_batches})
                if main:
                    prune_checkpoints(out / "checkpoints", keep=config.save_total_limit, protect=checkpoint)
            if step >= config.max_steps:
                break
    bar.close()
    if writer is not None:
        writer.close()
    return last, checkpoint


# --------------------------------------------------------------------------------------------------
# Helpers: output directory, resuming, logging, the final model
# --------------------------------------------------------------------------------------------------


def _prepare_out_dir(out: Path, config: TrainConfig, *, resuming: bool) -> None:
    """Refuse an OUT that holds an earlier run unless resuming; with ``overwrite`` clear that run first."""
    earlier = [name for name in _RUN_OUTPUTS if (out / name).exists()]
    if earlier and not resuming:
        if not config.overwrite:
            raise ValueError(f"output directory {out} holds an earlier run ({', '.join(earlier)}): pass --resume to "
                             "continue it, --overwrite to start afresh (deletes those outputs), or another --out")
        for name in earlier:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if config.model in TINY_MODELS:
            shutil.rmtree(out / "base_model", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _check_resumable(config: TrainConfig, state: Mapping[str, Any], path: Path, num_processes: int) -> None:
    saved = state.get("config", {})
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in RESUME_INVARIANT if saved.get(k) != getattr(config, k)]
    if changed:
        raise ValueError(f"cannot resume from {path}: these options differ from the checkpoint's run: {'; '.join(changed)}")
    if state.get("num_processes") != num_processes:
        raise ValueError(f"cannot resume from {path}: it was saved by {state.get('num_processes')} process(es), "
                         f"this run has {num_processes} (the data order depends on it)")
    if state["step"] >= config.max_steps:
        raise ValueError(f"cannot resume from {path}: it is at step {state['step']} >= max_steps = {config.max_steps}; "
                         "raise --max-steps to train further")


def _check_same_inputs(resume: tuple[Path, Mapping[str, Any]], fingerprints: tuple[str, str]) -> None:
    path, state = resume
    for name, value in zip(("model", "data"), fingerprints):
        if state.get(f"{name}_fingerprint") != value:
            what = "base model" if name == "model" else "tokenised data"
            raise ValueError(f"cannot resume from {path}: the {what} differs from the checkpoint's run "
                             f"({name}_fingerprint {state.get(f'{name}_fingerprint')!r} in {path / 'trainer_state.json'}, "
                             f"this run has {value!r})")


def _reset_accelerate_state() -> None:
    """Forget the precision and gradient-accumulation state a previous ``train`` call left in this process.

    accelerate keeps them in process-wide singletons: without this, a second run in one process (a sweep, the
    demo, the tests) could not change ``precision``, and would inherit the previous run's half-consumed
    dataloader. The process group (``PartialState``) is kept, so ``accelerate launch`` runs are unaffected.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _init_trackers(accelerator, config: TrainConfig) -> bool:
    if not accelerator.log_with:
        return False
    hparams = {k: ("none" if v is None else v) for k, v in config.to_dict().items()}
    try:
        accelerator.init_trackers("tensorboard", config=hparams)
    except Exception as error:  # a broken tensorboard install must not stop training
        logger.warning("TensorBoard logging disabled: %s", error)
        return False
    return True


def _log_window(accelerator, window: MetricsWindow, tokens, seconds: float, *, step: int, epoch: float, lr: float) -> dict:
    """Average the window's metrics over processes; add throughput, learning rate and memory."""
    means = window.means()
    keys = sorted(means)
    values = accelerator.reduce(torch.stack([means[k].to(accelerator.device) for k in keys]), reduction="mean")
    total_tokens = accelerator.reduce(tokens.float(), reduction="sum")
    record = {"step": step, "epoch": round(epoch, 4)}
    record.update({k: float(v) for k, v in zip(keys, values.tolist())})
    record.update(lr=lr, tokens_per_s=float(total_tokens) / max(seconds, 1e-9),
                  peak_memory_mib=peak_memory_mib(accelerator.device))
    return record


def _save_final(accelerator, policy, tokenizer, out: Path, config: TrainConfig, metrics: Mapping[str, float]) -> Path:
    """``save_pretrained`` the trained model (merged, for LoRA; adapter alone in ``adapter/``) + tokenizer to OUT/final.

    Written to ``final.tmp`` and moved into place; an older ``final`` is replaced only once the new one is complete.
    """
    final = out / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(policy).model
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if config.lora_r:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {"config": config.to_dict(), "final_metrics": dict(metrics)}
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2))
        if final.exists():
            old = out / "final.old"
            shutil.rmtree(old, ignore_errors=True)
            final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old)
        else:
            tmp.replace(final)
    accelerator.wait_for_everyone()
    return final


def _yaml(values: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(values), sort_keys=False)
