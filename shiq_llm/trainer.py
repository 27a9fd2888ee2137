"""Train a causal LM with ShiQ (or DPO, CoPG, DRO) on reward-labelled rows: ``train(TrainConfig) -> TrainResult``.

transformers loads the model and tokenizer and makes the schedule, peft adds LoRA, accelerate places devices,
runs bf16 autocast, accumulates gradients, launches distributed runs and saves states, datasets holds the
data. Our code is the batching and the loss call::

    stats = response_token_stats(model, input_ids, attention_mask, response_mask)      # (B, L) ℓ, vℓ
    ref = TokenStats(cached ℓref, cached vref)                                         # shiq_llm.reference
    loss = reduce_loss(LOSSES[algo](stats, ref, rewards, response_mask, beta=β, gamma=γ), response_mask)

The run, in order (:func:`train`): check the output directory and a checkpoint to resume; load the tokenizer
and model and check that they fit; load, validate and tokenise the rows; add LoRA; load or compute the
reference statistics (:func:`shiq_llm.reference.reference_cache`); train for ``max_steps`` optimizer steps,
logging metrics (:mod:`shiq_llm.metrics`) and saving checkpoints (:mod:`shiq_llm.checkpoint`); save the final
model with ``save_pretrained`` (+ tokenizer) to ``OUT/final`` (with LoRA: merged weights, and the adapter alone
in ``OUT/final/adapter``).

Batches. Token algorithms (``shiq*``) and ``dro`` draw batches of examples; ``dpo`` and ``copg`` draw batches of
pairs ``(chosen, rejected)`` from ``shiq_llm.data.preference_pairs`` (same prompt, different rewards), collated
as the ``P`` chosen rows followed by the ``P`` rejected ones. ``R(x, y)`` is the sum of the example's per-token
rewards. The order is a permutation of the items drawn from ``(seed, epoch)`` alone, so a resumed run skips the
micro-batches already consumed and continues with exactly the batches the uninterrupted run would have seen.

Tiny models. ``model="tiny-llama"`` / ``"tiny-gpt2"`` builds ``shiq_llm.models.build_tokenizer()`` and
``tiny_causal_lm(tokenizer, arch=…, seed=config.seed)`` (hidden 64, 2 layers, random weights, no download) and
saves both to ``OUT/base_model``, which is then loaded like any local model (and reloaded on resume).

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

import numpy as np
import torch
from torch import nn

from shiq_llm.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint, verify_checkpoint
from shiq_llm.config import PAIR_ALGOS, TINY_MODELS, TOKEN_ALGOS, TrainConfig
from shiq_llm.data import collate, load_rows, preference_pairs, tokenize_rows
from shiq_llm.metrics import JsonlWriter, MetricsWindow, batch_metrics, peak_memory_mib
from shiq_llm.models import check_tokenizer_fits_model
from shiq_llm.reference import reference_cache, scatter_response_values
from shiq_llm.stats import response_token_stats
from shiq_toy.baselines import copg_loss, dpo_loss, dro_loss, sequence_log_ratio
from shiq_toy.losses import LOSSES, TokenStats, reduce_loss

__all__ = [
    "TrainResult",
    "PolicyStats",
    "EpochPermutation",
    "algorithm_loss",
    "collate_items",
    "load_model_and_tokenizer",
    "load_examples",
    "train",
]

logger = logging.getLogger(__name__)

#: Config fields that must not change when a run is resumed (they change the trajectory).
RESUME_INVARIANT = (
    "data", "data_format", "max_length", "max_prompt_length", "long_response", "padding_side", "model", "tokenizer",
    "model_dtype", "precision", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "algo", "beta",
    "gamma", "average", "pair_mode", "value_coef", "batch_size", "grad_accum", "lr", "weight_decay",
    "lr_scheduler", "warmup_steps", "max_grad_norm", "seed",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}
_TINY_SPEC = "shiq_tiny_model.json"


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
    Token algorithms: per_item (B,) = ``LOSSES[algo]``, reduced by ``reduce_loss(…, average)``.
    ``dro``: per_item (B,) = ``dro_loss(Δ, R, value)`` with value (B,) = V_φ(x). ``dpo``/``copg``: the B rows are
    P = B/2 pairs, rows ``[:P]`` chosen and ``[P:]`` rejected; per_item (P,); the ``"token"`` average divides
    by the response tokens of both members. extras: diagnostics (``dpo_margin`` (P,), ``value`` (B,)).
    """
    mask, rewards = batch["response_mask"], batch["rewards"]
    if algo in TOKEN_ALGOS:
        per_item = LOSSES[algo](policy, ref, rewards, mask, beta=beta, gamma=gamma)  # (B,)
        return reduce_loss(per_item, mask, average=average), per_item, {}
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
# Data: items, order, collation
# --------------------------------------------------------------------------------------------------


class EpochPermutation(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` alone (a resumed run sees the same order)."""

    def __init__(self, n: int, *, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return iter(torch.randperm(self.n, generator=generator).tolist())


class _Items(torch.utils.data.Dataset):
    """Training items: example ``i`` (token algorithms, dro) or pair ``k`` = (chosen[k], rejected[k])."""

    def __init__(self, examples, pairs: tuple[list[int], list[int]] | None):
        self.examples, self.pairs = examples, pairs

    def __len__(self) -> int:
        return len(self.pairs[0]) if self.pairs is not None else len(self.examples)

    def __getitem__(self, k: int) -> list[dict]:
        if self.pairs is None:
            return [self.examples[int(k)]]
        return [self.examples[self.pairs[0][k]], self.examples[self.pairs[1][k]]]


def collate_items(items: list[list[dict]], *, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Items -> a batch: ``shiq_llm.data.collate`` of the examples (pairs: all first members, then all second
    members) plus the cached reference statistics as (B, L) ``ref_logit_taken``, ``ref_logsumexp`` and, when
    present, ``ref_prompt_state`` (B, H)."""
    examples = [item[j] for j in range(len(items[0])) for item in items]
    batch = collate(examples, pad_token_id=pad_token_id, padding_side=padding_side)
    for column in ("ref_logit_taken", "ref_logsumexp"):
        batch[column] = scatter_response_values([ex[column] for ex in examples], batch["response_mask"])  # (B, L)
    if "ref_prompt_state" in examples[0]:
        batch["ref_prompt_state"] = torch.tensor(np.array([ex["ref_prompt_state"] for ex in examples]), dtype=torch.float32)
    return batch


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, data
# --------------------------------------------------------------------------------------------------


def _build_tiny_model(name: str, directory: Path, *, seed: int) -> None:
    """Build the tiny tokenizer + model of ``name`` and save them to ``directory`` (atomically)."""
    from shiq_llm.models import build_tokenizer, tiny_causal_lm

    spec = {"model": name, "seed": seed}
    spec_file = directory / _TINY_SPEC
    if directory.exists():
        found = json.loads(spec_file.read_text()) if spec_file.is_file() else None
        if found == spec:
            return
        raise ValueError(f"{directory} holds another base model ({found}, this run wants {spec}); "
                         "use another --out, or --overwrite to rebuild it")
    tokenizer = build_tokenizer()
    model = tiny_causal_lm(tokenizer, arch=TINY_MODELS[name], seed=seed)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _TINY_SPEC).write_text(json.dumps(spec))
    tmp.replace(directory)


def load_model_and_tokenizer(config: TrainConfig, *, out: Path, accelerator=None):
    """(tokenizer, model) from ``config.model`` / ``config.tokenizer``; tiny models are built in ``OUT/base_model``.

    The tokenizer gets a pad token (its EOS) when it has none. Returns the model in train mode, dropout off
    when ``config.disable_dropout``, gradient checkpointing on when asked, on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = config.model
    if source in TINY_MODELS:
        directory = out / "base_model"
        if accelerator is None or accelerator.is_main_process:
            _build_tiny_model(source, directory, seed=config.seed)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        source = str(directory)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {config.tokenizer or source} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[config.model_dtype])
    if config.disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return tokenizer, model


def load_examples(config: TrainConfig, tokenizer):
    """Rows -> tokenised examples, their TokenizeReport and, for dpo/copg, the pairs ``(chosen, rejected)``."""
    rows = load_rows(config.data, format=config.data_format)
    examples, report = tokenize_rows(
        rows, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
        long_response=config.long_response,
    )
    pairs = preference_pairs(examples, mode=config.pair_mode) if config.algo in PAIR_ALGOS else None
    return examples, report, pairs


def _apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets)
    return get_peft_model(model, lora)


# --------------------------------------------------------------------------------------------------
# Output directory and resuming
# --------------------------------------------------------------------------------------------------

_RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "tensorboard")


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


def _resume_point(config: TrainConfig, out: Path) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its trainer state, or None; ValueError when resuming is impossible."""
    if config.resume_from:
        path = Path(config.resume_from)
        return path, verify_checkpoint(path)
    if not config.resume:
        return None
    found = latest_checkpoint(out / "checkpoints", warn=logger.warning)
    if found is None:
        raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'} (nothing to resume; drop --resume)")
    return found


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


def _frozen_names(models) -> list[set[str]]:
    return [{name for name, p in m.named_parameters(remove_duplicate=False) if not p.requires_grad} for m in models]


def _save_trainable_only(models, weights, output_dir) -> None:
    """accelerate save hook: drop frozen parameters (a LoRA run's base) from the saved model state."""
    for i, frozen in enumerate(_frozen_names(models)):
        if frozen:
            weights[i] = {k: v for k, v in weights[i].items() if k not in frozen}


def _check_saved_trainable(path: Path, policy: nn.Module) -> None:
    from safetensors import safe_open

    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        saved = set(f.keys())
    missing = [n for n, p in policy.named_parameters() if p.requires_grad and n not in saved]
    if missing:
        raise ValueError(f"checkpoint {path} does not belong to this model: {file} lacks {missing[:3]} "
                         f"({len(missing)} trainable parameters missing)")


# --------------------------------------------------------------------------------------------------
# Training
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
    metrics = batch_metrics(config.algo, stats, ref, batch, per_item, beta=config.beta, gamma=config.gamma, extras=extras)
    return loss.detach(), metrics, grad_norm


def _init_trackers(accelerator, config: TrainConfig) -> bool:
    if accelerator.log_with is None or not accelerator.log_with:
        return False
    hparams = {k: ("none" if v is None else v) for k, v in config.to_dict().items()}
    try:
        accelerator.init_trackers("tensorboard", config=hparams)
    except Exception as error:  # a broken tensorboard install must not stop training
        logger.warning("TensorBoard logging disabled: %s", error)
        return False
    return True


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with ``config.algo``; see the module docstring and TrainConfig."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    config = dataclasses.replace(config).validate()
    out = Path(config.out)
    tensorboard = config.tensorboard and is_tensorboard_available()
    _reset_accelerate_state()
    accelerator = Accelerator(
        mixed_precision="bf16" if config.precision == "bf16" else "no",
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard" if tensorboard else None,
        project_dir=str(out),
    )
    main = accelerator.is_main_process
    resume = _resume_point(config, out)
    if resume is not None:
        _check_resumable(config, resume[1], resume[0], accelerator.num_processes)
    if main:
        _prepare_out_dir(out, config, resuming=resume is not None)
    accelerator.wait_for_everyone()
    set_seed(config.seed)

    tokenizer, model = load_model_and_tokenizer(config, out=out, accelerator=accelerator)
    check_tokenizer_fits_model(tokenizer, model)
    examples, report, pairs = load_examples(config, tokenizer)
    check_tokenizer_fits_model(tokenizer, model, token_ids=[max(max(ids) for ids in examples["input_ids"])])
    if main:
        logger.info("data: %s%s", report, f"; {len(pairs[0])} pairs" if pairs else "")
        (out / "config.yaml").write_text(_yaml(config.to_dict()))
        (out / "data_report.json").write_text(json.dumps({**dataclasses.asdict(report), "pairs": len(pairs[0]) if pairs else None}))
    if config.lora_r:
        model = _apply_lora(model, config)
    model.to(accelerator.device)

    with accelerator.main_process_first():
        ref = reference_cache(
            Path(config.ref_cache) if config.ref_cache else out / "reference", model, examples,
            settings={"precision": config.precision}, recompute=config.recompute_ref and main,
            need_prompt_state=config.algo == "dro", log=logger.info, pad_token_id=tokenizer.pad_token_id,
            batch_size=config.ref_batch_size or 2 * config.batch_size, padding_side=config.padding_side,
            chunk_size=config.chunk_size, autocast=accelerator.autocast, progress=config.progress_bar and main,
        )
    import datasets

    examples = datasets.concatenate_datasets([examples, ref], axis=1)

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
    items = _Items(examples, pairs)
    sampler = EpochPermutation(len(items), seed=config.seed)
    loader = torch.utils.data.DataLoader(items, batch_size=config.batch_size, sampler=sampler, collate_fn=functools.partial(
        collate_items, pad_token_id=tokenizer.pad_token_id, padding_side=config.padding_side))
    policy, optimizer, loader, scheduler = accelerator.prepare(policy, optimizer, loader, scheduler)
    accelerator.register_save_state_pre_hook(_save_trainable_only)

    step, micro_batches = 0, 0
    if resume is not None:
        _check_saved_trainable(resume[0], accelerator.unwrap_model(policy))
        accelerator.load_state(str(resume[0]), strict=not config.lora_r)
        step, micro_batches = resume[1]["step"], resume[1]["micro_batches"]
        logger.info("resumed from %s at step %d", resume[0], step)
    if main:
        writer = JsonlWriter(out / "metrics.jsonl")
    tracking = _init_trackers(accelerator, config)
    window, last, checkpoint = MetricsWindow(), {}, None
    tokens, tick = torch.zeros((), device=accelerator.device), time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=step, desc=f"train {config.algo}", disable=not (config.progress_bar and main))
    while step < config.max_steps:
        epoch, skip = divmod(micro_batches, len(loader))
        loader.set_epoch(epoch)
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
                                   epoch=micro_batches * config.batch_size * processes / len(items),
                                   lr=scheduler.get_last_lr()[0])
                if main:
                    writer.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.4g}")
                if tracking:
                    accelerator.log({k: v for k, v in last.items() if k != "step"}, step=step)
                window.reset()
                tokens, tick = torch.zeros((), device=accelerator.device), time.perf_counter()
            if (config.save_steps and step % config.save_steps == 0) or step == config.max_steps:
                state = {"step": step, "micro_batches": micro_batches, "num_processes": processes, "config": config.to_dict()}
                checkpoint = save_checkpoint(accelerator, out / "checkpoints", step, state)
                if main:
                    prune_checkpoints(out / "checkpoints", keep=config.save_total_limit, protect=checkpoint)
            if step >= config.max_steps:
                break
    bar.close()
    if main:
        writer.close()
    final = _save_final(accelerator, policy, tokenizer, out, config, last)
    accelerator.end_training()
    return TrainResult(out_dir=out, final_dir=final, metrics_file=out / "metrics.jsonl", checkpoint=checkpoint,
                       steps=step, final_metrics=last)


def _reset_accelerate_state() -> None:
    """Forget the precision and gradient-accumulation state a previous ``train`` call left in this process.

    accelerate keeps them in process-wide singletons: without this, a second run in one process (a sweep, the
    demo, the tests) could not change ``precision``, and would inherit the previous run's half-consumed
    dataloader. The process group (``PartialState``) is kept, so ``accelerate launch`` runs are unaffected.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


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
    """``save_pretrained`` the trained model (merged, for LoRA; adapter alone in ``adapter/``) + tokenizer to OUT/final."""
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
        (tmp / "training_summary.json").write_text(json.dumps({"config": config.to_dict(), "final_metrics": dict(metrics)}, indent=2))
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
