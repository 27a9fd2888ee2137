"""shiq_llm.trainer: the loss it trains is the one definition, every algorithm learns, runs resume exactly,
checkpoints are atomic, and a corrupt one is refused by name.

References: ``shiq_toy.losses`` / ``shiq_toy.baselines`` evaluated on full-logit statistics
(``naive_response_token_stats``) of the same batch; closed forms of each loss at the first step, where the
policy is the reference (ρ ≡ 0); an uninterrupted run for resumed ones.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shiq_llm import checkpoint as ckpt
from shiq_llm.config import ALGOS, PAIR_ALGOS, TOKEN_ALGOS, load_config
from shiq_llm.data import collate, preference_pairs, sequence_rewards, tokenize_rows
from shiq_llm.loading import load_model_and_tokenizer
from shiq_llm.metrics import batch_metrics
from shiq_llm.models import build_tokenizer, tiny_causal_lm
from shiq_llm.stats import naive_response_token_stats
from shiq_llm.trainer import PolicyStats, algorithm_loss, train
from shiq_toy.baselines import copg_loss, dpo_loss, dro_loss, sequence_log_ratio
from shiq_toy.losses import LOSSES, RESIDUALS, discounted_reverse_cumsum, reduce_loss

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shiq_tiny.yaml"
#: float32 statistics of O(1) logits; the two paths differ by summation order only.
ATOL, RTOL = 1e-5, 1e-4


def rows():
    """4 prompts × 3 completions with distinct rewards (so every algorithm has pairs), lengths 1–3 words."""
    words = ["paris", "the capital is paris", "i do not know"]
    return [
        {"prompt": f"question {p}: what is the capital of france?", "completion": words[k], "reward": float(k == 1) - 0.5 * (k == 2) + 0.1 * p}
        for p in range(4)
        for k in range(3)
    ]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(tmp_path: Path, name: str = "run", **overrides):
    """The example tiny config with this test's data and output directory."""
    data = tmp_path / "rows.jsonl"
    if not data.exists():
        write_jsonl(data, rows())
    values = dict(data=str(data), out=str(tmp_path / name), progress_bar=False, tensorboard=False, logging_steps=1, save_steps=0)
    values.update(overrides)
    return load_config(CONFIG, overrides=values)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# The loss of a batch is the one definition, on statistics that equal the full-logit ones
# --------------------------------------------------------------------------------------------------


def _full_batch(tokenizer, algo):
    examples, _ = tokenize_rows(rows(), tokenizer, max_length=64)
    if algo in PAIR_ALGOS:
        chosen, rejected = preference_pairs(examples)
        order = chosen + rejected
    else:
        order = list(range(len(examples)))
    return examples, collate([examples[i] for i in order], pad_token_id=tokenizer.pad_token_id)


def _naive_loss(algo, policy, ref, batch, value, *, beta, gamma, average):
    """The loss written directly from shiq_toy on full-logit statistics (the contract)."""
    mask, rewards = batch["response_mask"], batch["rewards"]
    if algo in TOKEN_ALGOS:
        return reduce_loss(LOSSES[algo](policy, ref, rewards, mask, beta=beta, gamma=gamma), mask, average=average)
    delta, reward = sequence_log_ratio(policy, ref, mask), rewards.sum(1)
    if algo == "dro":
        return reduce_loss(dro_loss(delta, reward, value, beta=beta), mask, average=average)
    p = len(delta) // 2
    per_pair = dpo_loss(delta[:p], delta[p:], beta=beta) if algo == "dpo" else copg_loss(delta[:p], delta[p:], reward[:p], reward[p:], beta=beta)
    tokens = mask[:p].sum() + mask[p:].sum()
    return per_pair.mean() if average == "sequence" else per_pair.sum() / tokens


@pytest.mark.parametrize("average", ["sequence", "token"])
@pytest.mark.parametrize("algo", ALGOS)
def test_step_loss_and_gradients_equal_shiq_toy_on_full_logits(algo, average):
    tokenizer = build_tokenizer()
    reference = tiny_causal_lm(tokenizer, hidden_size=32, seed=0)
    model = tiny_causal_lm(tokenizer, hidden_size=32, seed=1)  # a policy away from the reference
    examples, batch = _full_batch(tokenizer, algo)
    with torch.no_grad():
        ref = naive_response_token_stats(reference, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    head = torch.nn.Linear(32, 1) if algo == "dro" else None
    states = torch.randn(len(batch["input_ids"]), 32, generator=torch.Generator().manual_seed(0))
    beta, gamma = 0.5, 0.9
    policy = PolicyStats(model, head, chunk_size=7)
    stats, value = policy(batch["input_ids"], batch["attention_mask"], batch["response_mask"], states)
    loss, _, _ = algorithm_loss(algo, stats, ref, batch, beta=beta, gamma=gamma, average=average, value=value)
    params = [p for p in policy.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    naive = naive_response_token_stats(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    naive_value = head(states).squeeze(-1) if head is not None else None
    expected = _naive_loss(algo, naive, ref, batch, naive_value, beta=beta, gamma=gamma, average=average)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("algo", TOKEN_ALGOS)
def test_abs_residual_metric_is_the_mean_absolute_residual_per_response_token(algo):
    """batch_metrics reads the residual algorithm_loss computed (not logged itself as a mean)."""
    tokenizer = build_tokenizer()
    reference, model = (tiny_causal_lm(tokenizer, hidden_size=32, seed=seed) for seed in (0, 1))
    _, batch = _full_batch(tokenizer, algo)
    mask = batch["response_mask"]
    with torch.no_grad():
        ref, stats = (naive_response_token_stats(m, batch["input_ids"], batch["attention_mask"], mask) for m in (reference, model))
    _, per_item, extras = algorithm_loss(algo, stats, ref, batch, beta=0.5, gamma=0.9)
    metrics = batch_metrics(algo, stats, ref, batch, per_item, beta=0.5, extras=extras)
    expected = RESIDUALS[algo](stats, ref, batch["rewards"], mask, beta=0.5, gamma=0.9)[mask].abs().mean()
    assert set(metrics) == {"abs_residual", "implicit_value", "kl_estimate", "nll"}
    torch.testing.assert_close(metrics["abs_residual"], expected, atol=ATOL, rtol=RTOL)
    assert float(expected) > 0


# --------------------------------------------------------------------------------------------------
# Training lowers the loss, for every algorithm
# --------------------------------------------------------------------------------------------------


def _loss_at_reference(algo, tmp_path, *, beta):
    """Closed form of the first step's loss: the policy is the reference, so ρ ≡ 0, vℓ = vref, V_φ ≡ 0.

    shiq: residual_t = −disc_t(r) (γ = 1); shiq_tk keeps t = 1 only; shiq_ms: −r_t (the next-state term
    vanishes). dpo: ln 2. copg: ½(R_w − R_l)². dro: ½R². Mean over sequences (pairs).
    shiq_init has no closed form here (it carries β vℓ_t); it is checked against the naive path above.
    """
    tokenizer = build_tokenizer()
    examples, _ = tokenize_rows(rows(), tokenizer, max_length=128)
    reward = sequence_rewards(examples)  # (N,)
    if algo in ("shiq", "shiq_tk", "shiq_ms"):
        per = []
        for ex in examples:
            r = torch.tensor(ex["rewards"], dtype=torch.float64)[torch.tensor(ex["response_mask"])]
            residual = -discounted_reverse_cumsum(r, gamma=1.0) if algo != "shiq_ms" else -r
            per.append(residual[:1].square().sum() if algo == "shiq_tk" else residual.square().sum())
        return float(torch.stack(per).mean())
    if algo == "dro":
        return float((0.5 * reward.square()).mean())
    chosen, rejected = preference_pairs(examples)
    if algo == "dpo":
        return float(torch.log(torch.tensor(2.0)))
    return float((0.5 * (reward[chosen] - reward[rejected]).square()).mean())


@pytest.mark.parametrize("algo", ALGOS)
def test_training_lowers_the_loss_on_a_fixed_batch_and_changes_the_weights(tmp_path, algo):
    """Batch = all items (12 examples or their pairs), so every logged loss is on the same batch: the first is
    the loss at the reference (closed form), later ones after Adam steps."""
    n_items = len(rows()) if algo not in PAIR_ALGOS else 3 * 4  # 3 pairs per prompt ("all" mode), 4 prompts
    cfg = config(tmp_path, algo=algo, batch_size=n_items, max_steps=8, beta=0.5)
    result = train(cfg)
    losses = [line["loss"] for line in read_metrics(result.metrics_file)]
    assert len(losses) == 8
    if algo != "shiq_init":
        assert losses[0] == pytest.approx(_loss_at_reference(algo, tmp_path, beta=0.5), rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0]
    trained, base = weights(result.final_dir), weights(Path(cfg.out) / "base_model")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.final_dir)  # the final model loads as a plain HF model
    assert model.get_input_embeddings().weight.shape[0] == len(build_tokenizer())


def test_metrics_lines_hold_every_documented_key(tmp_path):
    result = train(config(tmp_path, algo="shiq", batch_size=4, max_steps=3, grad_accum=2))
    lines = read_metrics(result.metrics_file)
    assert [line["step"] for line in lines] == [1, 2, 3]
    keys = {"step", "epoch", "loss", "abs_residual", "implicit_value", "kl_estimate", "nll", "grad_norm", "lr",
            "tokens_per_s", "peak_memory_mib"}
    assert keys <= set(lines[0])
    assert lines[0]["kl_estimate"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference: ρ = 0
    assert lines[0]["implicit_value"] == pytest.approx(0.0, abs=1e-6)
    assert all(line["tokens_per_s"] > 0 and line["peak_memory_mib"] > 0 for line in lines)
    assert result.final_metrics == lines[-1]


def test_lora_trains_only_the_adapters_and_saves_a_merged_model(tmp_path):
    cfg = config(tmp_path, algo="shiq", lora_r=4, lora_alpha=8.0, batch_size=12, max_steps=4)
    result = train(cfg)
    losses = [line["loss"] for line in read_metrics(result.metrics_file)]
    assert losses[-1] < losses[0]
    assert (result.final_dir / "adapter" / "adapter_config.json").is_file()
    merged, base = weights(result.final_dir), weights(Path(cfg.out) / "base_model")
    assert set(merged) == set(base)  # merged back into a plain model
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 0
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # checkpoints hold the trainable parameters only


def test_bf16_and_gradient_checkpointing_run(tmp_path):
    cfg = config(tmp_path, precision="bf16", gradient_checkpointing=True, batch_size=12, max_steps=2)
    result = train(cfg)
    lines = read_metrics(result.metrics_file)
    assert len(lines) == 2 and all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    manifest = json.loads((Path(result.out_dir) / "reference" / "manifest.json").read_text())
    assert manifest["settings"] == {"precision": "bf16"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated transformers call
        _, model = load_model_and_tokenizer(cfg, out=Path(cfg.out))
    assert model.is_activation_checkpointing and model.training


# --------------------------------------------------------------------------------------------------
# Resume reproduces the uninterrupted run; checkpoints are atomic; a corrupt one is refused by name
# --------------------------------------------------------------------------------------------------


def _simulate_crash_after(out: Path, step: int) -> None:
    """What a crash right after checkpoint ``step`` leaves: newer checkpoints, the final model and the metrics
    lines after ``step`` never written."""
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(out / "final")
    lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


RESUME = dict(algo="shiq", batch_size=5, grad_accum=2, max_steps=6, save_steps=3, save_total_limit=5,
              lr_scheduler="linear", warmup_steps=1)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path, lora_r):
    """12 examples in micro-batches of 5 (3 per epoch, the last one short), 2 per optimizer step: steps cross
    epoch boundaries and the checkpoint at step 3 sits in the middle of an epoch."""
    straight = train(config(tmp_path, "straight", lora_r=lora_r, **RESUME))
    shutil.copytree(straight.out_dir, tmp_path / "resumed")
    _simulate_crash_after(tmp_path / "resumed", 3)
    resumed = train(config(tmp_path, "resumed", lora_r=lora_r, resume=True, **RESUME))
    assert resumed.steps == 6
    a, b = weights(straight.final_dir), weights(resumed.final_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    a_lines, b_lines = read_metrics(straight.metrics_file), read_metrics(resumed.metrics_file)
    assert [line["step"] for line in b_lines] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a_lines, b_lines):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6) and y["lr"] == pytest.approx(x["lr"])


def test_corrupt_newest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, caplog):
    straight = train(config(tmp_path, "straight", **RESUME))
    out = tmp_path / "crashed"
    shutil.copytree(straight.out_dir, out)
    newest = out / "checkpoints" / "ckpt-000006"
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"ckpt-000006 is corrupt: .*optimizer.bin has 100 bytes"):
        ckpt.verify_checkpoint(newest)
    with pytest.raises(ValueError, match=r"optimizer.bin has 100 bytes"):
        train(config(tmp_path, "crashed", resume_from=str(newest), **{**RESUME, "max_steps": 7}))
    _simulate_crash_after_keep_corrupt(out)
    resumed = train(config(tmp_path, "crashed", resume=True, **RESUME))
    assert "skipping an unusable checkpoint" in caplog.text and "ckpt-000006" in caplog.text
    for key, value in weights(straight.final_dir).items():
        torch.testing.assert_close(weights(resumed.final_dir)[key], value, atol=1e-6, rtol=0)
    assert (out / "checkpoints" / "ckpt-000006.replaced-0" / "optimizer.bin").stat().st_size == 100  # kept, not deleted
    ckpt.verify_checkpoint(out / "checkpoints" / "ckpt-000006")  # the new one is complete


def _simulate_crash_after_keep_corrupt(out: Path) -> None:
    shutil.rmtree(out / "final")
    lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


class _FakeAccelerator:
    """The part of accelerate.Accelerator that save_checkpoint uses; save_state writes two files."""

    is_main_process = True

    def __init__(self, crash: bool = False):
        self.crash = crash

    def wait_for_everyone(self):
        pass

    def save_state(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"weights" * 10)
        if self.crash:
            raise KeyboardInterrupt("killed mid-save (simulated)")
        (Path(directory) / "optimizer.bin").write_bytes(b"adam" * 10)


def test_checkpoint_write_is_atomic_and_pruning_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(_FakeAccelerator(), root, 1, {"step": 1})
    assert ckpt.verify_checkpoint(first) == {"step": 1}
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(_FakeAccelerator(crash=True), root, 2, {"step": 2})
    assert ckpt.list_checkpoints(root) == [first]  # the half-written ckpt-000002.tmp is not a checkpoint
    assert ckpt.latest_checkpoint(root) == (first, {"step": 1})
    for step in (2, 3, 4):
        ckpt.save_checkpoint(_FakeAccelerator(), root, step, {"step": step})
    assert not (root / "ckpt-000002.tmp").exists()  # cleared by the next save of that step
    (root / "ckpt-000003" / "manifest.json").unlink()  # an incomplete one is never pruned
    deleted = ckpt.prune_checkpoints(root, keep=2)
    assert [p.name for p in deleted] == ["ckpt-000001"]
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["ckpt-000002", "ckpt-000003", "ckpt-000004"]
    (root / "ckpt-000004" / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match=r"ckpt-000004 is corrupt: .*optimizer.bin is missing"):
        ckpt.verify_checkpoint(root / "ckpt-000004")
    (root / "ckpt-000004" / "optimizer.bin").write_bytes(b"adam" * 9 + b"adaX")
    with pytest.raises(ValueError, match="does not match its sha256"):
        ckpt.verify_checkpoint(root / "ckpt-000004")
    warnings = []
    path, state = ckpt.latest_checkpoint(root, warn=warnings.append)
    assert path.name == "ckpt-000002" and state == {"step": 2}
    assert len(warnings) == 2 and "ckpt-000004" in warnings[0] and "ckpt-000003" in warnings[1]


def test_resume_refuses_changed_options_and_keeps_the_checkpoints(tmp_path):
    first = train(config(tmp_path, algo="shiq", batch_size=12, max_steps=2))
    before = sorted(p.name for p in (first.out_dir / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"options differ .*beta: 0.5 -> 0.25"):
        train(config(tmp_path, algo="shiq", batch_size=12, max_steps=4, beta=0.25, resume=True))
    with pytest.raises(ValueError, match="raise --max-steps"):
        train(config(tmp_path, algo="shiq", batch_size=12, max_steps=2, resume=True))
    assert sorted(p.name for p in (first.out_dir / "checkpoints").iterdir()) == before
    longer = train(config(tmp_path, algo="shiq", batch_size=12, max_steps=4, resume=True))
    assert [line["step"] for line in read_metrics(longer.metrics_file)] == [1, 2, 3, 4]


def test_resume_refuses_other_data_by_fingerprint(tmp_path):
    first = train(config(tmp_path, algo="shiq", batch_size=12, max_steps=2))
    other = write_jsonl(tmp_path / "other.jsonl", [dict(r, completion=r["completion"] + " indeed") for r in rows()])
    with pytest.raises(ValueError, match=r"the tokenised data differs from the checkpoint's run \(data_fingerprint"):
        train(config(tmp_path, algo="shiq", batch_size=12, max_steps=4, resume=True, data=str(other)))
    moved = tmp_path / "moved.jsonl"
    shutil.copy(tmp_path / "rows.jsonl", moved)  # same rows elsewhere: a path change is not a data change
    assert train(config(tmp_path, algo="shiq", batch_size=12, max_steps=3, resume=True, data=str(moved))).steps == 3
    assert first.steps == 2


def test_multi_turn_rows_train_on_the_action_tokens_only(tmp_path):
    """BFCL dialogues: tool/user turns are holes in the response mask. At the first step (ρ ≡ 0) the shiq loss
    is Σ_t disc_t(r)² over the action tokens, in order, as if the holes were absent (spec §1, §3)."""
    fixture = Path(__file__).resolve().parent / "fixtures" / "bfcl_multi_turn.jsonl"
    cfg = config(tmp_path, data=str(fixture), data_format="bfcl", algo="shiq", batch_size=8, max_steps=2, max_length=512)
    result = train(cfg)
    from shiq_llm.data import load_rows

    tokenizer = build_tokenizer()
    examples, _ = tokenize_rows(load_rows(str(fixture), format="bfcl"), tokenizer, max_length=512)
    per = []
    for ex in examples:
        mask = torch.tensor(ex["response_mask"])
        assert not bool(mask[mask.nonzero()[0, 0]:mask.nonzero()[-1, 0] + 1].all())  # there are holes
        r = torch.tensor(ex["rewards"], dtype=torch.float64)[mask]
        per.append(discounted_reverse_cumsum(r, gamma=1.0).square().sum())
    losses = [line["loss"] for line in read_metrics(result.metrics_file)]
    assert losses[0] == pytest.approx(float(torch.stack(per).mean()), rel=1e-5)
    assert math.isfinite(losses[1])
