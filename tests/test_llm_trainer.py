"""shiq_llm.train.trainer.ShiQTrainer: the loss it trains is the one definition, every method learns, evaluation and
trackers work, runs resume exactly, checkpoints survive kills, and a corrupt one is refused by name.

References: ``shiq_toy.losses`` / ``shiq_toy.baselines`` evaluated on full-logit statistics
(``naive_response_token_stats``) of the same batch; closed forms of each loss at the first step, where the
policy is the reference (ρ ≡ 0); an uninterrupted run for resumed ones.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shiq_llm.core.models import build_tokenizer, tiny_causal_lm
from shiq_llm.core.stats import naive_response_token_stats
from shiq_llm.data import collate, preference_pairs, sequence_rewards, tokenize_rows
from shiq_llm.train import checkpoint as ckpt
from shiq_llm.train.config import LLM_METHODS, parse_train_args
from shiq_llm.train.metrics import batch_metrics
from shiq_llm.train.run import train_run
from shiq_llm.train.trainer import VALUE_HEAD, add_stats_forward, algorithm_loss
from shiq_toy.baselines import copg_loss, dpo_loss, dro_loss, sequence_log_ratio
from shiq_toy.losses import LOSSES, RESIDUALS, TokenStats, discounted_reverse_cumsum, reduce_loss
from shiq_toy.methods import METHODS

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shiq_tiny.yaml"
#: float32 statistics of O(1) logits; the two paths differ by summation order only.
ATOL, RTOL = 1e-5, 1e-4
TOKEN_METHODS = [m for m in LLM_METHODS if METHODS[m].consumes == "tokens"]
PAIR_METHODS = [m for m in LLM_METHODS if METHODS[m].consumes == "pairs"]
#: Keys whose values depend on the clock, not on the computation, and transformers' end-of-run summary of the
#: steps this process ran (``train_loss`` averages the resumed steps only).
TIMING = {"tokens_per_s", "peak_memory_mib", "train_runtime", "train_samples_per_second", "train_steps_per_second",
          "train_loss"}


def rows():
    """4 prompts × 3 completions with distinct rewards (so every method has pairs), lengths 1–3 words."""
    words = ["paris", "the capital is paris", "i do not know"]
    return [
        {"prompt": f"question {p}: what is the capital of france?", "completion": words[k], "reward": float(k == 1) - 0.5 * (k == 2) + 0.1 * p}
        for p in range(4)
        for k in range(3)
    ]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def arguments(tmp_path: Path, name: str = "run", **overrides):
    """(ModelArguments, DataArguments, ShiQConfig) of the example tiny config with this test's data and output."""
    data = tmp_path / "rows.jsonl"
    if not data.exists():
        write_jsonl(data, rows())
    values = dict(dataset_name=str(data), output_dir=str(tmp_path / name), disable_tqdm=True, logging_steps=1,
                  save_strategy="no")
    values.update(overrides)
    argv = ["--config", str(CONFIG)]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return parse_train_args(argv)


def train(tmp_path: Path, name: str = "run", **overrides):
    return train_run(*arguments(tmp_path, name, **overrides))


def read_metrics(path: Path) -> list[dict]:
    """The training records of a metrics.jsonl (the end-of-run summary has no 'loss')."""
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if "loss" in r]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# The loss of a batch is the one definition, on statistics that equal the full-logit ones
# --------------------------------------------------------------------------------------------------


def _full_batch(tokenizer, method):
    examples, _ = tokenize_rows(rows(), tokenizer, max_length=64)
    if METHODS[method].consumes == "pairs":
        chosen, rejected = preference_pairs(examples, pairing=METHODS[method].pairing)
        order = chosen + rejected
    else:
        order = list(range(len(examples)))
    return examples, collate([examples[i] for i in order], pad_token_id=tokenizer.pad_token_id)


def _naive_loss(method, policy, ref, batch, value, *, beta, gamma, average):
    """The loss written directly from shiq_toy's functions on full-logit statistics (the contract)."""
    mask, rewards = batch["response_mask"], batch["rewards"]
    if method in TOKEN_METHODS:
        return reduce_loss(LOSSES[method](policy, ref, rewards, mask, beta=beta, gamma=gamma), mask, average=average)
    delta, reward = sequence_log_ratio(policy, ref, mask), rewards.sum(1)
    if method == "dro":
        return reduce_loss(dro_loss(delta, reward, value, beta=beta), mask, average=average)
    p = len(delta) // 2
    if method == "dpo":
        per_pair = dpo_loss(delta[:p], delta[p:], beta=beta)
    elif method == "ipo":
        per_pair = (delta[:p] - delta[p:] - 1 / (2 * beta)).square()  # Azar et al. 2024, eq. (17)
    else:
        per_pair = copg_loss(delta[:p], delta[p:], reward[:p], reward[p:], beta=beta)
    tokens = mask[:p].sum() + mask[p:].sum()
    return per_pair.mean() if average == "sequence" else per_pair.sum() / tokens


@pytest.mark.parametrize("average", ["sequence", "token"])
@pytest.mark.parametrize("method", LLM_METHODS)
def test_step_loss_and_gradients_equal_shiq_toy_on_full_logits(method, average):
    """The statistics forward (chunked head inside the model's forward) + algorithm_loss = shiq_toy's losses on
    full logits, values and every gradient (value head included)."""
    tokenizer = build_tokenizer()
    reference = tiny_causal_lm(tokenizer, hidden_size=32, seed=0)
    model = tiny_causal_lm(tokenizer, hidden_size=32, seed=1)  # a policy away from the reference
    _, batch = _full_batch(tokenizer, method)
    with torch.no_grad():
        ref = naive_response_token_stats(reference, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    states = torch.randn(len(batch["input_ids"]), 32, generator=torch.Generator().manual_seed(0))
    if METHODS[method].needs_value:
        head = torch.nn.Linear(32, 1)
        setattr(model, VALUE_HEAD, head)
    beta, gamma = 0.5, (0.9 if method in TOKEN_METHODS else 1.0)
    add_stats_forward(model, chunk_size=7)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                shiq_response_mask=batch["response_mask"], shiq_prompt_state=states)
    loss, _, _ = algorithm_loss(method, TokenStats(out.logit_taken, out.logsumexp), ref, batch, beta=beta,
                                gamma=gamma, average=average, value=out.value)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    naive = naive_response_token_stats(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    naive_value = head(states).squeeze(-1) if METHODS[method].needs_value else None
    expected = _naive_loss(method, naive, ref, batch, naive_value, beta=beta, gamma=gamma, average=average)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_abs_residual_metric_is_the_mean_absolute_residual_per_response_token(method):
    """batch_metrics reads the residual algorithm_loss computed (not logged itself as a mean)."""
    tokenizer = build_tokenizer()
    reference, model = (tiny_causal_lm(tokenizer, hidden_size=32, seed=seed) for seed in (0, 1))
    _, batch = _full_batch(tokenizer, method)
    mask = batch["response_mask"]
    with torch.no_grad():
        ref, stats = (naive_response_token_stats(m, batch["input_ids"], batch["attention_mask"], mask) for m in (reference, model))
    _, per_item, extras = algorithm_loss(method, stats, ref, batch, beta=0.5, gamma=0.9)
    metrics = batch_metrics(method, stats, ref, batch, per_item, beta=0.5, extras=extras)
    expected = RESIDUALS[method](stats, ref, batch["rewards"], mask, beta=0.5, gamma=0.9)[mask].abs().mean()
    assert set(metrics) == {"abs_residual", "implicit_value", "kl_estimate", "nll"}
    torch.testing.assert_close(metrics["abs_residual"], expected, atol=ATOL, rtol=RTOL)
    assert float(expected) > 0


# --------------------------------------------------------------------------------------------------
# Training lowers the loss, for every method
# --------------------------------------------------------------------------------------------------


def _loss_at_reference(method, *, beta):
    """Closed form of the first step's loss: the policy is the reference, so ρ ≡ 0, vℓ = vref, V_φ ≡ 0.

    shiq: residual_t = −disc_t(r) (γ = 1); shiq_tk keeps t = 1 only; shiq_ms: −r_t (the next-state term
    vanishes). dpo: ln 2. ipo: (1/(2β))². copg: ½(R_a − R_b)². dro: ½R². Mean over sequences (pairs).
    shiq_init and shifted_q have no closed form here (they carry β vℓ terms, unshaped); they are checked
    against the naive path above.
    """
    examples, _ = tokenize_rows(rows(), build_tokenizer(), max_length=128)
    reward = sequence_rewards(examples)  # (N,)
    if method in ("shiq", "shiq_tk", "shiq_ms"):
        per = []
        for ex in examples:
            r = torch.tensor(ex["rewards"], dtype=torch.float64)[torch.tensor(ex["response_mask"])]
            residual = -discounted_reverse_cumsum(r, gamma=1.0) if method in ("shiq", "shiq_tk") else -r
            per.append(residual[:1].square().sum() if method == "shiq_tk" else residual.square().sum())
        return float(torch.stack(per).mean())
    if method == "dro":
        return float((0.5 * reward.square()).mean())
    if method == "dpo":
        return math.log(2.0)
    if method == "ipo":
        return (1 / (2 * beta)) ** 2
    a, b = preference_pairs(examples, pairing="any")
    return float((0.5 * (reward[a] - reward[b]).square()).mean())


@pytest.mark.parametrize("method", LLM_METHODS)
def test_training_lowers_the_loss_on_a_fixed_batch_and_changes_the_weights(tmp_path, method):
    """Batch = all items (12 examples or their 12 pairs), so every logged loss is on the same batch: the first
    is the loss at the reference (closed form), later ones after Adam steps."""
    result = train(tmp_path, loss_type=method, per_device_train_batch_size=12, max_steps=6, beta=0.5)
    losses = [line["loss"] for line in read_metrics(result.metrics_file)]
    assert len(losses) == 6
    if method not in ("shiq_init", "shifted_q"):
        assert losses[0] == pytest.approx(_loss_at_reference(method, beta=0.5), rel=1e-4, abs=1e-5)
    assert losses[-1] < losses[0]
    trained, base = weights(result.final_dir), weights(result.out_dir / "base_model")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.final_dir)  # the final model loads as a plain HF model
    assert model.get_input_embeddings().weight.shape[0] == len(build_tokenizer())
    assert (result.final_dir / "value_head.safetensors").is_file() == METHODS[method].needs_value


def test_metrics_evaluation_and_tensorboard(tmp_path):
    """Every documented key is logged; eval_* records on eval_dataset, whose loss before training is the closed
    form at the reference; report_to=tensorboard writes event files."""
    eval_rows = write_jsonl(tmp_path / "eval.jsonl", rows())
    result = train(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, beta=0.5,
                   eval_dataset_name=str(eval_rows), eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=12,
                   report_to="tensorboard", eval_leak="warn")  # the training rows on purpose (closed form below)
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    keys = {"step", "epoch", "loss", "abs_residual", "implicit_value", "kl_estimate", "nll", "grad_norm",
            "learning_rate", "tokens_per_s", "peak_memory_mib"}
    assert keys <= set(train_lines[0])
    assert train_lines[0]["kl_estimate"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference: ρ = 0
    assert train_lines[0]["implicit_value"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in train_lines)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every eval_steps, and at the end of training
    assert {"eval_abs_residual", "eval_implicit_value", "eval_kl_estimate", "eval_nll"} <= set(evals[0])
    assert evals[0]["eval_loss"] != pytest.approx(_loss_at_reference("shiq", beta=0.5))  # trained 2 steps
    assert list((result.out_dir / "runs").rglob("events.out.tfevents.*"))

    # before training: the eval loss is the closed form at the reference
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shiq_llm.train.trainer import ShiQTrainer

    _, _, args = arguments(tmp_path, "fresh", beta=0.5, per_device_eval_batch_size=12)
    model = AutoModelForCausalLM.from_pretrained(result.out_dir / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir / "base_model")
    trainer = ShiQTrainer(model, args, eval_dataset=str(eval_rows), processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(_loss_at_reference("shiq", beta=0.5), rel=1e-4)
    assert metrics["eval_kl_estimate"] == pytest.approx(0.0, abs=1e-6)


def test_lora_trains_only_the_adapters_and_saves_a_merged_model(tmp_path):
    result = train(tmp_path, use_peft=True, lora_r=4, lora_alpha=8, per_device_train_batch_size=12, max_steps=4,
                   save_strategy="steps", save_steps=4)
    losses = [line["loss"] for line in read_metrics(result.metrics_file)]
    assert losses[-1] < losses[0]
    assert (result.final_dir / "adapter" / "adapter_config.json").is_file()
    merged, base = weights(result.final_dir), weights(result.out_dir / "base_model")
    assert set(merged) == set(base)  # merged back into a plain model
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 0
    saved = load_file(str(result.out_dir / "checkpoint-4" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # checkpoints hold the trainable parameters only


def test_save_final_merges_a_copy_and_leaves_the_trainers_lora_model_as_it_was(tmp_path):
    """save_final writes merged weights whose outputs equal the adapter model's, and the trainer keeps its peft
    model: adapters present, base weights unmerged (adapters off = the reference), so evaluate() and train()
    after saving see the adapter model."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from shiq_llm.train.trainer import ShiQTrainer

    _, _, args = arguments(tmp_path, "lora", per_device_train_batch_size=12, max_steps=2, learning_rate=1e-2)
    tokenizer = build_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = ShiQTrainer(model, args, train_dataset=rows(), eval_dataset=rows(), processing_class=tokenizer,
                          peft_config=lora)
    trainer.train()
    live = trainer.model
    batch = collate(tokenize_rows(rows(), tokenizer, max_length=64)[0].to_list(), pad_token_id=tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    live.eval()
    with torch.no_grad():
        adapted = live(**inputs).logits
        with live.disable_adapter():
            base = live(**inputs).logits
    before = {k: v.clone() for k, v in live.state_dict().items()}
    trainer.save_final(tmp_path / "final")
    assert trainer.model is live and any("lora_" in k for k in live.state_dict())
    after = live.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(live(**inputs).logits, adapted, atol=0, rtol=0)
        with live.disable_adapter():
            torch.testing.assert_close(live(**inputs).logits, base, atol=0, rtol=0)  # still the reference
    assert float((adapted - base).abs().max()) > 1e-4  # the adapters were trained
    metrics = trainer.evaluate()
    assert metrics["eval_kl_estimate"] > 0  # evaluated with the adapters against the cached reference
    trainer.args.max_steps = 3
    trainer.train()  # goes on with the adapter model
    assert trainer.state.global_step == 3 and any("lora_" in k for k in trainer.model.state_dict())


def test_bf16_and_gradient_checkpointing_run(tmp_path):
    result = train(tmp_path, bf16=True, use_cpu=True, activation_checkpointing=True, per_device_train_batch_size=12, max_steps=2)
    lines = read_metrics(result.metrics_file)
    assert len(lines) == 2 and all(math.isfinite(line["loss"]) for line in lines)
    manifest = json.loads((result.out_dir / "reference" / "manifest.json").read_text())
    assert manifest["settings"] == {"precision": "bf16"}
    args = json.loads((result.final_dir / "training_summary.json").read_text())["args"]
    assert args["activation_checkpointing"] and args["bf16"]


def test_dro_value_coef_reaches_the_value_head_gradient(tmp_path):
    """value_coef scales the value head's gradient only (dro_loss's split gradients), through the trainer."""
    from shiq_llm.train.trainer import ShiQTrainer

    grads = {}
    for coef in (1.0, 3.0):
        _, _, args = arguments(tmp_path, f"coef{coef}", loss_type="dro", value_coef=coef, per_device_train_batch_size=12)
        tokenizer = build_tokenizer()
        model = tiny_causal_lm(tokenizer, seed=0)
        trainer = ShiQTrainer(model, args, train_dataset=rows(), processing_class=tokenizer)
        with torch.no_grad():
            getattr(model, VALUE_HEAD).bias.fill_(0.3)  # V_φ ≠ 0 so that the residual moves the head
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(12)])
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads[coef] = (getattr(model, VALUE_HEAD).bias.grad.clone(), model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[3.0][0], 3 * grads[1.0][0])
    torch.testing.assert_close(grads[3.0][1], grads[1.0][1])  # the policy's gradient is unchanged
    assert float(grads[1.0][0].abs().sum()) > 0


def test_compute_loss_reads_the_cached_reference_columns(tmp_path):
    """ShiQTrainer.compute_loss on a collated batch: its reference columns are the reference's ℓref, vref
    (full-logit statistics of the initial model), and the loss equals shiq_toy's, written by hand from the batch's
    columns and the policy's full-logit statistics; swapping ref_logit_taken and ref_logsumexp changes it."""
    import copy

    from shiq_llm.train.trainer import ShiQTrainer

    _, _, args = arguments(tmp_path, "direct", per_device_train_batch_size=12, gamma=0.9)
    tokenizer = build_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)
    reference = copy.deepcopy(model)
    trainer = ShiQTrainer(model, args, train_dataset=rows(), processing_class=tokenizer)
    with torch.no_grad():  # the policy moves away from the reference (the cache stays the initial model's)
        model.lm_head.weight.add_(0.05 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(12)])
    mask = batch["response_mask"]
    with torch.no_grad():
        ref = naive_response_token_stats(reference, batch["input_ids"], batch["attention_mask"], mask)
        policy = naive_response_token_stats(model, batch["input_ids"], batch["attention_mask"], mask)
    torch.testing.assert_close(batch["ref_logit_taken"][mask], ref.logit_taken[mask], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(batch["ref_logsumexp"][mask], ref.logsumexp[mask], atol=ATOL, rtol=RTOL)
    cached = TokenStats(batch["ref_logit_taken"], batch["ref_logsumexp"])
    expected = reduce_loss(LOSSES["shiq"](policy, cached, batch["rewards"], mask, beta=args.beta, gamma=0.9), mask,
                           average=args.average)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
    swapped = {**batch, "ref_logit_taken": batch["ref_logsumexp"], "ref_logsumexp": batch["ref_logit_taken"]}
    with torch.no_grad():
        wrong = trainer.compute_loss(model, swapped)
    assert abs(float(wrong) - float(loss)) > 1e-2 * abs(float(loss))
    swapped_expected = reduce_loss(LOSSES["shiq"](policy, TokenStats(cached.logsumexp, cached.logit_taken),
                                                  batch["rewards"], mask, beta=args.beta, gamma=0.9), mask,
                                   average=args.average)
    torch.testing.assert_close(wrong, swapped_expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------------
# Resume reproduces the uninterrupted run; kills leave a usable run; a corrupt checkpoint is refused by name
# --------------------------------------------------------------------------------------------------

RESUME = dict(per_device_train_batch_size=5, gradient_accumulation_steps=2, max_steps=6, save_strategy="steps",
              save_steps=3, save_total_limit=5, lr_scheduler_type="linear", warmup_steps=1)


def _simulate_kill_after(out: Path, step: int, *, half_line: bool = False) -> None:
    """What a kill right after checkpoint ``step`` leaves: newer checkpoints and the final model never written,
    the metrics log holding lines up to the kill (and, with ``half_line``, a half-written last line)."""
    for path in ckpt.list_checkpoints(out):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(out / "final")
    text = (out / "metrics.jsonl").read_text()
    lines = [line for line in text.splitlines() if json.loads(line)["step"] <= step + 1]  # one line past it
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + ('{"step": 5, "lo' if half_line else ""))


def _same_log(a: Path, b: Path) -> None:
    la, lb = ([{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in p.read_text().splitlines()] for p in (a, b))
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    for x, y in zip(la, lb):
        assert set(x) == set(y)
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=1e-6), key


@pytest.mark.parametrize("use_peft", [False, True])
def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path, use_peft):
    """12 examples in micro-batches of 5 (3 per epoch, the last one short), 2 per optimizer step: steps cross
    epoch boundaries and the checkpoint at step 3 sits in the middle of an epoch. The resumed run's weights
    and its metrics log (cut back from a duplicated and half-written state) equal the uninterrupted run's."""
    lora = dict(use_peft=True, lora_r=4) if use_peft else {}
    straight = train(tmp_path, "straight", **lora, **RESUME)
    shutil.copytree(straight.out_dir, tmp_path / "resumed")
    _simulate_kill_after(tmp_path / "resumed", 3, half_line=True)
    resumed = train(tmp_path, "resumed", resume_from_checkpoint="true", **lora, **RESUME)
    assert resumed.steps == 6
    a, b = weights(straight.final_dir), weights(resumed.final_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    _same_log(straight.metrics_file, resumed.metrics_file)


def test_kill_while_writing_the_final_model_is_completed_by_resume(tmp_path):
    straight = train(tmp_path, "run", **RESUME)
    reference = weights(straight.final_dir)
    shutil.rmtree(straight.final_dir)
    (straight.out_dir / "final.tmp").mkdir()
    (straight.out_dir / "final.tmp" / "model.safetensors").write_bytes(b"half")  # the kill came mid-write
    with pytest.raises(ValueError, match="holds an earlier run"):
        train(tmp_path, "run", **RESUME)  # a plain rerun never overwrites
    resumed = train(tmp_path, "run", resume_from_checkpoint="true", **RESUME)
    assert resumed.steps == 6 and not (straight.out_dir / "final.tmp").exists()
    for key, value in reference.items():
        torch.testing.assert_close(weights(resumed.final_dir)[key], value, atol=0, rtol=0)
    for directory in (resumed.final_dir, resumed.out_dir / "checkpoint-6"):  # safetensors alone would write 0600
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in directory.iterdir() if p.is_file()}
        assert set(modes.values()) == {"0o644"}, modes


def test_corrupt_newest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, caplog):
    straight = train(tmp_path, "straight", **RESUME)
    out = tmp_path / "crashed"
    shutil.copytree(straight.out_dir, out)
    newest = out / "checkpoint-6"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"checkpoint-6 is corrupt: .*optimizer.pt has 100 bytes"):
        ckpt.verify_checkpoint(newest)
    with pytest.raises(ValueError, match=r"optimizer.pt has 100 bytes"):
        train(tmp_path, "crashed", resume_from_checkpoint=str(newest), **RESUME)
    shutil.rmtree(out / "final")
    resumed = train(tmp_path, "crashed", resume_from_checkpoint="true", **RESUME)
    assert "skipping an unusable checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    for key, value in weights(straight.final_dir).items():
        torch.testing.assert_close(weights(resumed.final_dir)[key], value, atol=1e-6, rtol=0)
    assert (out / "checkpoint-6.replaced-0" / "optimizer.pt").stat().st_size == 100  # kept, not deleted
    ckpt.verify_checkpoint(out / "checkpoint-6")  # the new one is complete


def _fake_checkpoint(root: Path, step: int, files=("model.safetensors", "optimizer.pt")) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_bytes(name.encode() * 10)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_manifests_pruning_and_stale_directories(tmp_path):
    """The manifest is written last: without it a checkpoint is skipped; pruning renames before deleting, so a
    kill mid-prune leaves only a '.deleting' directory, which clean_stale removes."""
    root = tmp_path / "out"
    for step in (1, 2, 3, 4):
        ckpt.finish_checkpoint(_fake_checkpoint(root, step), {"step": step})
    half = _fake_checkpoint(root, 5, files=("scheduler.pt",))  # a kill during the save: no manifest
    assert ckpt.latest_checkpoint(root, warn=lambda m: None)[0].name == "checkpoint-4"
    deleted = ckpt.prune_checkpoints(root, keep=2)
    assert [p.name for p in deleted] == ["checkpoint-1", "checkpoint-2"]
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    (root / "checkpoint-4" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-4 is corrupt: .*optimizer.pt is missing"):
        ckpt.verify_checkpoint(root / "checkpoint-4")
    (root / "checkpoint-3" / "optimizer.pt").write_bytes(b"x" * 120)
    with pytest.raises(ValueError, match="does not match its sha256"):
        ckpt.verify_checkpoint(root / "checkpoint-3")
    messages = []
    with pytest.raises(ValueError, match="no usable checkpoint"):
        ckpt.latest_checkpoint(root, warn=messages.append)
    assert len(messages) == 3
    for message, path, problem in zip(messages, (half, root / "checkpoint-4", root / "checkpoint-3"), ("incomplete", "missing", "sha256")):
        assert f"checkpoint {path} is" in message and problem in message
    ckpt.clear_for_save(half)  # an incomplete one is removed before its step is saved again
    assert not half.exists()
    os.replace(root / "checkpoint-3", root / "checkpoint-3.deleting")  # a kill mid-prune
    assert [p.name for p in ckpt.clean_stale(root)] == ["checkpoint-3.deleting"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4"]


def test_resume_refuses_changed_options_and_keeps_the_checkpoints(tmp_path):
    first = train(tmp_path, per_device_train_batch_size=12, max_steps=2, save_strategy="steps", save_steps=2)
    before = sorted(p.name for p in first.out_dir.iterdir())
    with pytest.raises(ValueError, match=r"options differ .*beta: 0.5 -> 0.25"):
        train(tmp_path, per_device_train_batch_size=12, max_steps=4, beta=0.25, resume_from_checkpoint="true",
              save_strategy="steps", save_steps=2)
    assert sorted(p.name for p in first.out_dir.iterdir()) == before
    other = write_jsonl(tmp_path / "other.jsonl", [dict(r, completion=r["completion"] + " indeed") for r in rows()])
    with pytest.raises(ValueError, match=r"the tokenised data differs from the checkpoint's run \(data_fingerprint"):
        train(tmp_path, per_device_train_batch_size=12, max_steps=4, resume_from_checkpoint="true",
              dataset_name=str(other), save_strategy="steps", save_steps=2)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(tmp_path / "rows.jsonl", moved)  # same rows elsewhere: a path change is not a data change
    longer = train(tmp_path, per_device_train_batch_size=12, max_steps=4, resume_from_checkpoint="true",
                   dataset_name=str(moved), save_strategy="steps", save_steps=2)
    assert [line["step"] for line in read_metrics(longer.metrics_file)] == [1, 2, 3, 4]


def test_resume_refuses_other_rewards_and_other_pairs(tmp_path):
    """The reference cache is keyed without rewards (the reference does not depend on them), but a resumed run
    must see them: the same rows with other rewards are refused by name, the checkpoints kept."""
    first = train(tmp_path, per_device_train_batch_size=12, max_steps=2, save_strategy="steps", save_steps=2)
    before = sorted(p.name for p in first.out_dir.iterdir())
    relabelled = write_jsonl(tmp_path / "relabelled.jsonl", [dict(r, reward=-r["reward"]) for r in rows()])
    with pytest.raises(ValueError, match=r"the training data \(rewards or preference pairs\) differs from the "
                                         r"checkpoint's run \(training_data_fingerprint"):
        train(tmp_path, per_device_train_batch_size=12, max_steps=4, resume_from_checkpoint="true",
              dataset_name=str(relabelled), save_strategy="steps", save_steps=2)
    assert sorted(p.name for p in first.out_dir.iterdir()) == before
    # the fingerprint itself: rewards and pairs enter it, ids and masks alone (the cache's key) do not change
    from shiq_llm.core.reference import data_fingerprint, training_data_fingerprint

    tokenizer = build_tokenizer()
    examples, _ = tokenize_rows(rows(), tokenizer, max_length=64)
    other, _ = tokenize_rows([dict(r, reward=-r["reward"]) for r in rows()], tokenizer, max_length=64)
    assert data_fingerprint(examples) == data_fingerprint(other)
    assert training_data_fingerprint(examples) != training_data_fingerprint(other)
    pairs = preference_pairs(examples, pairing="preference")
    swapped = (pairs[1], pairs[0])
    assert training_data_fingerprint(examples, pairs) != training_data_fingerprint(examples, swapped)
    assert training_data_fingerprint(examples, pairs) != training_data_fingerprint(examples)


def test_multi_turn_rows_train_on_the_action_tokens_only(tmp_path):
    """BFCL dialogues: tool/user turns are holes in the response mask. At the first step (ρ ≡ 0) the shiq loss
    is Σ_t disc_t(r)² over the action tokens, in order, as if the holes were absent (spec §1, §3)."""
    fixture = Path(__file__).resolve().parent / "fixtures" / "bfcl_multi_turn.jsonl"
    result = train(tmp_path, dataset_name=str(fixture), data_format="bfcl", per_device_train_batch_size=8,
                   max_steps=2, max_length=512)
    from shiq_llm.data import load_rows

    examples, _ = tokenize_rows(load_rows(str(fixture), format="bfcl"), build_tokenizer(), max_length=512)
    per = []
    for ex in examples:
        mask = torch.tensor(ex["response_mask"])
        assert not bool(mask[mask.nonzero()[0, 0]:mask.nonzero()[-1, 0] + 1].all())  # there are holes
        r = torch.tensor(ex["rewards"], dtype=torch.float64)[mask]
        per.append(discounted_reverse_cumsum(r, gamma=1.0).square().sum())
    losses = [line["loss"] for line in read_metrics(result.metrics_file)]
    assert losses[0] == pytest.approx(float(torch.stack(per).mean()), rel=1e-5)
    assert math.isfinite(losses[1])


def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    """Same seed, same environment: bit-identical weights and the same metrics log (timing keys aside)."""
    first = train(tmp_path, "a", per_device_train_batch_size=4, max_steps=3, beta=0.5)
    second = train(tmp_path, "b", per_device_train_batch_size=4, max_steps=3, beta=0.5)
    a, b = weights(first.final_dir), weights(second.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    _same_log(first.metrics_file, second.metrics_file)
    other = train(tmp_path, "c", per_device_train_batch_size=4, max_steps=3, beta=0.5, seed=1)  # the seed matters
    assert not all(torch.equal(a[k], weights(other.final_dir)[k]) for k in a)
