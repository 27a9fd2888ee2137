"""``ShiQTrainer``: ShiQ (and DPO, IPO, CoPG, DRO) on ``transformers.Trainer``, used like TRL's trainers.

    from shiq_llm import ShiQConfig, ShiQTrainer
    args = ShiQConfig(output_dir="runs/shiq", loss_type="shiq", beta=0.1, learning_rate=1e-5)
    trainer = ShiQTrainer(model, args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
    trainer.train()

transformers runs the loop (optimizer, schedule, gradient accumulation, mixed precision, DDP / FSDP through
accelerate, logging to ``report_to`` trackers, evaluation during training, checkpoints, resume, hub push). What
is ours is the batch and its loss::

    stats = model(input_ids, attention_mask, shiq_response_mask=mask)      # chunked (B, L) ℓ, vℓ: shiq_llm.core.stats
    ref = TokenStats(cached ℓref, cached vref)                            # computed once: shiq_llm.core.reference
    loss = reduce_loss(per_item_loss(loss_type, stats, ref, rewards, mask, beta=β, gamma=γ), mask)  # shiq_toy

The model's ``forward`` gains a statistics mode (:func:`add_stats_forward`, as TRL adds its fused LM head), so
the statistics are computed inside the wrapped model's forward and DDP / FSDP see an ordinary forward.

Data. ``train_dataset`` / ``eval_dataset`` are rows in the library's formats (``shiq_llm.data.rows``: single-turn
``{prompt, completion, reward}`` or multi-turn ``{messages, rewards}``; a ``datasets.Dataset``, a list of
dicts, or a file path). They are tokenised (``shiq_llm.data.tokenization``), paired for pair methods
(``shiq_llm.data.preference_pairs``, by the method's ``pairing``), and the reference statistics are computed
once before training with the initial model (with LoRA: adapters disabled) and cached
(``OUTPUT_DIR/reference``, keyed by model and data fingerprints); no reference model is held during training.
A micro-batch holds ``per_device_train_batch_size`` items: sequences, or pairs (P chosen rows then P rejected).

Checkpoints (:mod:`shiq_llm.train.checkpoint`): ``OUTPUT_DIR/checkpoint-N`` as transformers writes them, plus our
``shiq_state.json`` (options, fingerprints) and a checksum manifest written last; older checkpoints are
pruned only after that, by an atomic rename. ``train(resume_from_checkpoint=True)`` takes the newest
checkpoint whose manifest verifies (a corrupt one is named and skipped) and refuses a run whose options, data
or base model differ.

Metrics (logged every ``logging_steps`` to the trackers, ``trainer.state.log_history`` and
``OUTPUT_DIR/metrics.jsonl``): ``loss``, ``abs_residual``, ``implicit_value``, ``kl_estimate``, ``nll``,
method extras (``dpo_margin``, ``value``), ``grad_norm``, ``learning_rate``, ``tokens_per_s``,
``peak_memory_mib`` (see :mod:`shiq_llm.train.metrics`); the same with ``eval_`` on ``eval_dataset``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import ModelOutput

from shiq_llm.core.models import check_tokenizer_fits_model
from shiq_llm.core.reference import data_fingerprint, model_fingerprint, reference_cache, training_data_fingerprint
from shiq_llm.core.sharding import head_sharding, unwrap_model
from shiq_llm.core.stats import response_token_stats
from shiq_llm.data import load_rows, preference_pairs, tokenize_rows
from shiq_llm.storage.atomic import atomic_directory
from shiq_llm.train import checkpoint as ckpt
from shiq_llm.train.batching import TrainingItems, collate_items
from shiq_llm.train.config import LLM_METHODS, RESUME_INVARIANT, ShiQConfig
from shiq_llm.train.metrics import MetricsFileCallback, batch_metrics, peak_memory_mib
from shiq_toy.losses import TokenStats, reduce_loss
from shiq_toy.methods import METHODS, Method, loss_and_diagnostics

__all__ = ["ShiQTrainer", "ShiQStatsOutput", "add_stats_forward", "algorithm_loss", "VALUE_HEAD"]

logger = logging.getLogger(__name__)

#: Attribute of the model that holds DRO's value head V_φ (a Linear on the reference's last prompt state).
VALUE_HEAD = "shiq_value_head"


# --------------------------------------------------------------------------------------------------
# The statistics forward and the loss of one batch
# --------------------------------------------------------------------------------------------------


@dataclass
class ShiQStatsOutput(ModelOutput):
    """What the statistics forward returns: ``logit_taken``, ``logsumexp`` (B, L) float32, ``value`` (B,) or None."""

    logit_taken: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    value: torch.Tensor | None = None


def add_stats_forward(model: nn.Module, *, chunk_size: int) -> None:
    """Give ``model`` (a transformers causal LM, or a peft model around one) a statistics mode.

    ``model(input_ids=…, attention_mask=…, shiq_response_mask=mask, shiq_prompt_state=state)`` returns a
    :class:`ShiQStatsOutput` of :func:`shiq_llm.core.stats.response_token_stats` (chunked, no (B, L, V) logits)
    and, when the model has a value head (:data:`VALUE_HEAD`), ``value = V_φ(state)`` (B,). Without
    ``shiq_response_mask`` the forward is the original one (generation is unchanged). Idempotent.
    """
    head_sharding(model)  # a tensor-parallel head fails here, before training (the forward does not check again)
    hf_model = unwrap_model(model)
    hf_model._shiq_chunk_size = chunk_size
    if getattr(hf_model, "_shiq_stats_forward", False):
        return
    original = hf_model.forward

    @functools.wraps(type(hf_model).forward)
    def forward(*args, shiq_response_mask=None, shiq_prompt_state=None, **kwargs):
        if shiq_response_mask is None:
            return original(*args, **kwargs)
        stats = response_token_stats(hf_model, kwargs["input_ids"], kwargs["attention_mask"], shiq_response_mask,
                                     chunk_size=hf_model._shiq_chunk_size, in_forward=True)
        head = getattr(hf_model, VALUE_HEAD, None)
        value = head(shiq_prompt_state.to(head.weight.dtype)).squeeze(-1).float() if head is not None else None  # (B,)
        return ShiQStatsOutput(logit_taken=stats.logit_taken, logsumexp=stats.logsumexp, value=value)

    hf_model.forward = forward
    hf_model._shiq_stats_forward = True


def algorithm_loss(
    method: str | Method,
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
    """The loss of one micro-batch: ``(loss, per_item, extras)``, through the method's row of
    :data:`shiq_toy.methods.METHODS` (:func:`shiq_toy.methods.loss_and_diagnostics`).

    policy, ref: TokenStats of (B, L); batch: ``response_mask`` (B, L) bool and ``rewards`` (B, L). Sequence
    methods: per_item (B,), reduced by ``reduce_loss(…, average)``. Pair methods: the B rows are P = B/2 pairs,
    rows ``[:P]`` the first members (chosen) and ``[P:]`` the second; per_item (P,); the ``"token"`` average
    divides by the response tokens of both members. ``value`` (B,) = V_φ(x) for methods that need it.
    extras: diagnostics for :func:`shiq_llm.train.metrics.batch_metrics` (``residual`` (B, L) of token methods,
    ``dpo_margin`` (P,) of pair methods, ``value`` (B,)).
    """
    row = method if isinstance(method, Method) else METHODS[method]
    mask, rewards = batch["response_mask"], batch["rewards"]
    pairs, reduce_mask = None, mask
    if row.consumes == "pairs":
        half = mask.shape[0] // 2
        if mask.shape[0] != 2 * half:
            raise ValueError(f"a pair batch needs an even number of rows (chosen then rejected), got {mask.shape[0]}")
        pairs = (torch.arange(half, device=mask.device), torch.arange(half, 2 * half, device=mask.device))
        reduce_mask = torch.cat([mask[:half], mask[half:]], dim=1)  # (P, 2L): the tokens of both responses
    per_item, diagnostics = loss_and_diagnostics(row, policy, ref, rewards, mask, beta=beta, gamma=gamma, pairs=pairs,
                                                 value=value, value_coef=value_coef)  # (B,) or (P,)
    diagnostics.pop("delta", None)  # logged as kl_estimate per token by batch_metrics
    return reduce_loss(per_item, reduce_mask, average=average), per_item, diagnostics


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class ShiQTrainer(Trainer):
    """``transformers.Trainer`` with the ShiQ loss (module docstring). Arguments as TRL's trainers.

    model: a causal LM or its name/path; args: :class:`shiq_llm.train.config.ShiQConfig`; train_dataset,
    eval_dataset: rows (``datasets.Dataset``, list of dicts, or a file path), or already tokenised examples
    (columns ``input_ids``, ``response_mask``, ``rewards``, ``prompt_id``, ``row_index``); processing_class:
    the tokenizer (default: the model's); peft_config: a ``peft.LoraConfig`` to train adapters.
    """

    def __init__(self, model, args: ShiQConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, optimizers=(None, None),
                 data_format: str | None = None):
        args = args if args is not None else ShiQConfig(output_dir="shiq_output")
        if not isinstance(args, ShiQConfig):
            raise ValueError(f"args must be a ShiQConfig, got {type(args).__name__}")
        if args.loss_type not in LLM_METHODS:
            raise ValueError(f"loss_type {args.loss_type!r} is not offered by the LLM trainer; choose one of {LLM_METHODS}")
        self.method = METHODS[args.loss_type]
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            from shiq_llm.core.models import resolve_model_source

            model = AutoModelForCausalLM.from_pretrained(resolve_model_source(model))
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model.name_or_path)
        tokenizer = processing_class
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        check_tokenizer_fits_model(tokenizer, model)
        self.model_fingerprint = model_fingerprint(model)  # the base model: before LoRA and the value head
        if self.method.needs_value:
            hidden = model.config.get_text_config().hidden_size
            head = nn.Linear(hidden, 1, dtype=torch.float32)
            nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)  # V_φ ≡ 0 at the start
            setattr(model, VALUE_HEAD, head)
        if peft_config is not None:
            from peft import get_peft_model

            if self.method.needs_value:
                peft_config.modules_to_save = list(peft_config.modules_to_save or []) + [VALUE_HEAD]
            model = get_peft_model(model, peft_config)
            if args.activation_checkpointing or args.gradient_checkpointing:
                model.enable_input_require_grads()
        add_stats_forward(model, chunk_size=args.chunk_size)
        collate = functools.partial(collate_items, pad_token_id=tokenizer.pad_token_id, padding_side=args.padding_side)
        # the raw datasets satisfy Trainer's checks; they are replaced by their training items below, once the
        # accelerator (device, main process, autocast) exists for the reference pass
        super().__init__(model=model, args=args, data_collator=collate, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks, optimizers=optimizers)
        self.model_accepts_loss_kwargs = False  # our loss is a mean per micro-batch: Trainer divides by accumulation
        # per micro-batch: (metric names, their values gathered over processes) as device tensors, read on the host
        # only when logged (no synchronisation per step); attended tokens since the last log, on the device
        self._metrics: dict[str, list[tuple[tuple[str, ...], torch.Tensor]]] = {"train": [], "eval": []}
        self._tokens, self._last_log = None, time.perf_counter()
        self.data_format = data_format
        self.data_fingerprint = self.training_data_fingerprint = None
        self.train_dataset, (self.data_fingerprint, self.training_data_fingerprint) = self._prepare(train_dataset, "train")
        self.eval_dataset, _ = self._prepare(eval_dataset, "eval")
        self.add_callback(MetricsFileCallback(Path(args.output_dir) / "metrics.jsonl"))

    # ----------------------------------------------------------------------------------------------
    # Data: rows -> tokenised examples -> (pairs) -> + cached reference statistics -> training items
    # ----------------------------------------------------------------------------------------------

    def _prepare(self, dataset, split: str):
        """(TrainingItems, (data fingerprint, training data fingerprint)) of ``dataset``, or (None, (None, None)).

        The data fingerprint (ids and masks) keys the reference cache; the training data fingerprint
        (``shiq_llm.core.reference.training_data_fingerprint``: also the rewards and the pairs) keys a resume."""
        import datasets

        if dataset is None:
            return None, (None, None)
        args = self.args
        if isinstance(dataset, datasets.Dataset) and "input_ids" in dataset.column_names:
            examples = dataset
        else:
            rows = load_rows(dataset, format=self.data_format) if not isinstance(dataset, datasets.Dataset) or self.data_format else dataset
            if isinstance(dataset, datasets.Dataset) and not self.data_format:
                from shiq_llm.data.rows import validate_rows

                validate_rows(rows)
            with self.accelerator.main_process_first():  # rows read from files: the others load the map's cache
                examples, report = tokenize_rows(rows, self.processing_class, max_length=args.max_length,
                                                 max_prompt_length=args.max_prompt_length,
                                                 long_response=args.long_response, num_proc=args.dataset_num_proc)
            if self.is_world_process_zero():
                logger.info("%s data: %s", split, report)
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                summary = {**asdict(report), "pairs": None}
                if self.method.consumes == "pairs":
                    summary["pairs"] = len(preference_pairs(examples, mode=args.pair_mode, pairing=self.method.pairing)[0])
                (Path(args.output_dir) / f"data_report_{split}.json").write_text(json.dumps(summary, indent=2))
        check_tokenizer_fits_model(self.processing_class, self.model,
                                   token_ids=[max(max(ids) for ids in examples["input_ids"])])
        pairs = None
        if self.method.consumes == "pairs":
            pairs = preference_pairs(examples, mode=args.pair_mode, pairing=self.method.pairing)
        fingerprint = data_fingerprint(examples)
        training_fingerprint = training_data_fingerprint(examples, pairs)
        if split == "train":
            self._check_resume_inputs(fingerprint, training_fingerprint)  # before the cache: a resumed run names the checkpoint
        root = Path(args.ref_cache) if args.ref_cache else Path(args.output_dir) / "reference"
        path = root if split == "train" else root.with_name(root.name + f"_{split}")
        accelerator = self.accelerator  # each rank computes its shard of the reference pass; rank 0 assembles
        ref = reference_cache(
            path, self.model, examples, settings={"precision": args.precision},
            recompute=args.recompute_ref, need_prompt_state=self.method.needs_value,
            fingerprints=(self.model_fingerprint, fingerprint), log=logger.info,
            rank=accelerator.process_index, world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
            pad_token_id=self.processing_class.pad_token_id,
            batch_size=args.ref_batch_size or 2 * args.per_device_train_batch_size, padding_side=args.padding_side,
            chunk_size=args.chunk_size, autocast=accelerator.autocast, device=self.args.device,
            progress=not args.disable_tqdm and self.is_world_process_zero(),
        )
        examples = datasets.concatenate_datasets([examples, ref], axis=1)
        return TrainingItems(examples, pairs), (fingerprint, training_fingerprint)

    # ----------------------------------------------------------------------------------------------
    # The loss, evaluation and logging
    # ----------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    shiq_response_mask=inputs["response_mask"], shiq_prompt_state=inputs.get("ref_prompt_state"))
        stats = TokenStats(out.logit_taken, out.logsumexp)
        ref = TokenStats(inputs["ref_logit_taken"], inputs["ref_logsumexp"])
        args = self.args
        loss, per_item, extras = algorithm_loss(self.method, stats, ref, inputs, beta=args.beta, gamma=args.gamma,
                                                average=args.average, value=out.value, value_coef=args.value_coef)
        metrics = batch_metrics(self.method.name, stats, ref, inputs, per_item, beta=args.beta, extras=extras)
        names = tuple(sorted(metrics))
        values = self.accelerator.gather_for_metrics(torch.stack([metrics[k] for k in names])[None]).mean(0)
        self._metrics[mode].append((names, values.detach()))
        if mode == "train":
            tokens = inputs["attention_mask"].sum()
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        groups: dict[tuple[str, ...], list[torch.Tensor]] = defaultdict(list)
        for names, values in self._metrics[mode]:
            groups[names].append(values)
        metrics = {}
        for names, values in groups.items():  # one host synchronisation per group (one group per method)
            metrics.update(zip(names, torch.stack(values).mean(0).tolist()))
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        elif "loss" in logs:
            now = time.perf_counter()
            tokens = self._tokens if self._tokens is not None else torch.zeros((), device=self.args.device)
            tokens = self.accelerator.reduce(tokens.to(self.args.device, torch.float64), reduction="sum")
            metrics["tokens_per_s"] = float(tokens) / max(now - self._last_log, 1e-9)
            metrics["peak_memory_mib"] = peak_memory_mib(self.args.device)
            self._tokens, self._last_log = None, now
        logs.update(metrics)  # in place: evaluate() returns this dict
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ----------------------------------------------------------------------------------------------
    # Checkpoints: manifest written last, atomic pruning, verified resume
    # ----------------------------------------------------------------------------------------------

    def shiq_state(self) -> dict[str, Any]:
        """What a resumed run must share with this one (saved as ``shiq_state.json`` in each checkpoint)."""
        return {"num_processes": self.args.world_size, "model_fingerprint": self.model_fingerprint,
                "data_fingerprint": self.data_fingerprint, "training_data_fingerprint": self.training_data_fingerprint,
                "config": {k: getattr(self.args, k) for k in RESUME_INVARIANT}}

    def _save_checkpoint(self, model, trial):
        root = Path(self._get_output_dir(trial=trial))
        path = root / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            ckpt.clear_for_save(path)
        self.accelerator.wait_for_everyone()
        keep, self.args.save_total_limit = self.args.save_total_limit, None  # prune only once the manifest is written
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = keep
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            ckpt.finish_checkpoint(path, self.shiq_state())
            if keep:
                ckpt.prune_checkpoints(root, keep=keep, protect=path)
        self.accelerator.wait_for_everyone()

    def _resume_path(self, resume_from_checkpoint, warn=logger.warning) -> str | None:
        """The checkpoint ``resume_from_checkpoint`` designates: True / "true" / "latest": the newest under
        ``output_dir`` that verifies (ValueError if there is none); a path: itself; None / False: None."""
        if resume_from_checkpoint in (None, False, "", "false", "False"):
            return None
        if resume_from_checkpoint in (True, "true", "True", "latest"):
            out = Path(self.args.output_dir)
            found = ckpt.latest_checkpoint(out, warn=warn)
            if found is None:
                raise ValueError(f"resume_from_checkpoint: no checkpoint in {out} (nothing to resume)")
            return str(found[0])
        return str(resume_from_checkpoint)

    def _check_resume_inputs(self, fingerprint: str, training_fingerprint: str) -> None:
        """With ``args.resume_from_checkpoint``: refuse other data (rewards and pairs included), base model or
        options early."""
        path = self._resume_path(self.args.resume_from_checkpoint, warn=lambda message: None)
        if path is not None:
            state = {**self.shiq_state(), "data_fingerprint": fingerprint, "training_data_fingerprint": training_fingerprint}
            ckpt.check_resumable(path, ckpt.verify_checkpoint(path), state)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest checkpoint that verifies."""
        out = Path(self.args.output_dir)
        resume_from_checkpoint = self._resume_path(resume_from_checkpoint)
        if resume_from_checkpoint:
            state = ckpt.verify_checkpoint(resume_from_checkpoint)
            ckpt.check_resumable(resume_from_checkpoint, state, self.shiq_state())
            if self.is_world_process_zero():
                step = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text())["global_step"]
                ckpt.truncate_metrics_log(out / "metrics.jsonl", step)
        if self.is_world_process_zero():
            ckpt.clean_stale(out)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def save_final(self, path: str | Path) -> Path:
        """Write the trained model (merged weights, for LoRA, with the adapter in ``adapter/``; DRO's value head
        in ``value_head.safetensors``) and the tokenizer to ``path``, atomically (``path.tmp`` then renamed). The
        trainer's model is left as it was (LoRA is merged into a copy), so training or evaluation may go on."""
        path = Path(path)
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.model) if self.is_fsdp_enabled else None
        if self.is_world_process_zero():
            with atomic_directory(path) as tmp:
                model = self.accelerator.unwrap_model(self.model)
                _save_model_files(model, tmp, state_dict=state_dict)
                self.processing_class.save_pretrained(tmp)
                (tmp / "training_summary.json").write_text(json.dumps(
                    {"args": self.args.to_dict(), "log_history": self.state.log_history}, indent=2, default=str))
        self.accelerator.wait_for_everyone()
        return path


def _save_model_files(model: nn.Module, directory: Path, *, state_dict=None) -> None:
    """save_pretrained without the value head (saved beside as ``value_head.safetensors``); LoRA: the adapter in
    ``adapter/`` and the weights merged into a copy of the model (peft's ``merge_and_unload`` on the live model
    would leave the trainer with merged weights and no adapter; the copy holds one more model in memory while
    saving)."""
    from safetensors.torch import save_file

    hf_model = unwrap_model(model)
    head = getattr(hf_model, VALUE_HEAD, None)
    if head is not None:
        head_module = getattr(head, "modules_to_save", None)
        head_module = head_module["default"] if head_module is not None else head
        save_file({k: v.detach().cpu().contiguous() for k, v in head_module.state_dict().items()},
                  str(directory / "value_head.safetensors"))
        delattr(hf_model, VALUE_HEAD)
    try:
        if hf_model is not model:  # peft: the adapter alone, then the merged weights of a copy
            model.save_pretrained(directory / "adapter")
            merged = copy.deepcopy(model).merge_and_unload()  # merging in place would change the live model
            merged.save_pretrained(directory)
            del merged
        else:
            model.save_pretrained(directory, state_dict=state_dict)
    finally:
        if head is not None:
            setattr(hf_model, VALUE_HEAD, head)
    ckpt.normalise_modes(directory)
