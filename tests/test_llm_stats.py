"""shiq_llm.core.stats: the chunked response statistics equal the full-logit path (values and gradients).

References: the full-logit path ``naive_response_token_stats`` (the model's own ``forward`` → logits →
``shiq_toy.losses.token_stats``), per-sequence runs of the model without padding read straight off its
logits, a float64 evaluation of the head, and ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiq_llm.core import stats as stats_module
from shiq_llm.core.models import tiny_causal_lm
from shiq_llm.core.stats import (
    LOGIT_TRANSFORM_ATTRIBUTES,
    exact_path_reason,
    head_sharding,
    linear_head_token_stats,
    naive_response_token_stats,
    response_token_stats,
)
from shiq_toy.losses import LOSSES, TokenStats, token_stats
from shiq_toy.testing.strategies import response_layouts

VOCAB = 97
#: float32 tolerances: both paths do the same float32 operations up to the order of the sums over the
#: vocabulary (V = 97 terms) and over the N rows of the head's weight gradient, so errors are a few ulps
#: of the largest term (float32 ulp ≈ 1.2e-7; terms and gradients here are O(1)).
ATOL, RTOL = 1e-5, 1e-4
#: bf16 unit roundoff (8 significant bits): one rounding of x moves it by at most 2^-8 |x|.
BF16_U = 2.0**-8


@functools.cache
def _model(arch: str, tied: bool, seed: int = 0):
    return tiny_causal_lm(VOCAB, arch=arch, hidden_size=32, num_layers=2, num_heads=4, tie_word_embeddings=tied, seed=seed)


def _batch(lengths, responses, *, side: str, seed: int = 0):
    """Padded batch: row i has lengths[i] real tokens; responses[i] lists response indices *within the real
    tokens* (never 0). Returns input_ids (B, L), attention_mask (B, L), response_mask (B, L)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # pad id 0
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    response = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, (n, resp) in enumerate(zip(lengths, responses)):
        offset = width - n if side == "left" else 0
        ids[row, offset : offset + n] = torch.randint(3, VOCAB, (n,), generator=gen)
        attention[row, offset : offset + n] = 1
        response[row, [offset + i for i in resp]] = True
    return ids, attention, response


def _objective(stats: TokenStats, seed: int = 1) -> torch.Tensor:
    """A generic scalar of both statistics (random weights, plus a non-linear term) to differentiate."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((3, *stats.logit_taken.shape), generator=gen)
    return (w[0] * stats.logit_taken + w[1] * stats.logsumexp + w[2] * (stats.logit_taken - stats.logsumexp).square()).sum()


def _stats_and_grads(fn, model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    stats = fn(model, *batch, **kwargs)
    _objective(stats).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return stats, grads


def _assert_same(chunked, naive, *, atol=ATOL, rtol=RTOL):
    (stats_c, grads_c), (stats_n, grads_n) = chunked, naive
    for got, want in zip(stats_c, stats_n):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert grads_c.keys() == grads_n.keys()
    for name in grads_n:
        torch.testing.assert_close(grads_c[name], grads_n[name], atol=atol, rtol=rtol, msg=name)


RIGHT = _batch([9, 6, 4], [[4, 5, 6, 7, 8], [2, 3, 5], [1, 2, 3]], side="right")  # N = 11, a hole in row 1
LEFT = _batch([9, 6, 4], [[4, 5, 6, 7, 8], [2, 3, 5], [1, 2, 3]], side="left")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])  # N = 11: every row its own chunk, 4 ∤ 11, one chunk
def test_chunked_equals_naive(arch, tied, side, chunk_size):
    model, batch = _model(arch, tied), (RIGHT if side == "right" else LEFT)
    chunked = _stats_and_grads(response_token_stats, model, batch, chunk_size=chunk_size)
    naive = _stats_and_grads(naive_response_token_stats, model, batch)
    _assert_same(chunked, naive)
    head = model.get_output_embeddings().weight
    assert (head is model.get_input_embeddings().weight) == tied
    # every parameter gets a gradient, and the head's is not trivially 0
    assert len(chunked[1]) == len(list(model.parameters()))
    head_name = next(name for name, p in model.named_parameters() if p is head)
    assert chunked[1][head_name].abs().max() > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_equals_unpadded_sequences(arch):
    """Each row of a left-padded batch equals the sequence run alone without padding, read off the model's
    own logits (default positions): this checks the position ids."""
    model = _model(arch, False)
    ids, attention, response = LEFT
    stats = response_token_stats(model, ids, attention, response, chunk_size=3)
    with torch.no_grad():
        for row in range(ids.shape[0]):
            real = attention[row].bool()
            alone = ids[row, real]  # (n,)
            logits = model(alone[None]).logits[0]  # (n, V)
            for p in response[row, real].nonzero().flatten().tolist():
                q = p + int((~real).sum())  # position in the padded row
                torch.testing.assert_close(stats.logit_taken[row, q], logits[p - 1, alone[p]], atol=ATOL, rtol=RTOL)
                torch.testing.assert_close(stats.logsumexp[row, q], torch.logsumexp(logits[p - 1], 0), atol=ATOL, rtol=RTOL)
    assert bool((stats.logit_taken[~response] == 0).all()) and bool((stats.logsumexp[~response] == 0).all())


@settings(max_examples=10)
@given(layout=response_layouts(), data=st.data())
def test_chunked_equals_naive_on_random_batches(layout, data):
    chunk_size = data.draw(st.integers(1, max(1, layout.num_response_tokens) + 2), label="chunk_size")
    batch = _batch(layout.lengths, layout.responses, side=layout.side, seed=layout.seed)
    model = _model("llama", False)
    _assert_same(
        _stats_and_grads(response_token_stats, model, batch, chunk_size=chunk_size),
        _stats_and_grads(naive_response_token_stats, model, batch),
    )


def test_rows_without_response_tokens_are_zero():
    model = _model("gpt2", True)
    ids, attention, response = RIGHT
    response = response.clone()
    response[1] = False
    stats = response_token_stats(model, ids, attention, response, chunk_size=4)
    naive = naive_response_token_stats(model, ids, attention, response)
    assert bool((stats.logit_taken[1] == 0).all()) and bool((stats.logsumexp[1] == 0).all())
    torch.testing.assert_close(stats.logsumexp, naive.logsumexp, atol=ATOL, rtol=RTOL)
    none = response_token_stats(model, ids, attention, torch.zeros_like(response))  # N = 0
    assert bool((none.logit_taken == 0).all()) and bool((none.logsumexp == 0).all())
    model.zero_grad(set_to_none=True)
    _objective(none).backward()
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# The chunked head alone
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_head_gradcheck_and_naive(with_bias):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 11, (7,), generator=gen)
    targets[:2] = 4  # a repeated target: its weight row collects several one-hot gradients

    def chunked(h, w, *b):
        return tuple(linear_head_token_stats(h, w, targets, bias=b[0] if b else None, chunk_size=3))

    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(chunked, inputs)
    naive = token_stats(torch.nn.functional.linear(hidden, weight, bias)[None], targets[None])
    for got, want in zip(chunked(*inputs), naive):
        torch.testing.assert_close(got, want[0])


@pytest.mark.parametrize("keep_expected", [True, False])
def test_frozen_head_gradcheck_and_naive(monkeypatch, keep_expected):
    """A head that needs no gradient: forward keeps E = softmax(z) W (or, switched off, backward recomputes);
    both give the values and the gradient in h of the full-logit path, and pass gradcheck (float64)."""
    monkeypatch.setattr(stats_module, "KEEP_EXPECTED_FOR_FROZEN_HEAD", keep_expected)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(11, 5, generator=gen, dtype=torch.float64), torch.randn(11, generator=gen, dtype=torch.float64)
    targets = torch.tensor([4, 4, 0, 10, 3, 4, 7])  # a repeated target
    upstream = torch.randn(2, 7, generator=gen, dtype=torch.float64)

    def chunked(h):
        return tuple(linear_head_token_stats(h, weight, targets, bias=bias, chunk_size=3))

    def naive(h):
        return tuple(x[0] for x in token_stats(torch.nn.functional.linear(h, weight, bias)[None], targets[None]))

    assert chunked(hidden)[1].grad_fn.keep_expected == keep_expected  # the path under test ran
    assert torch.autograd.gradcheck(chunked, (hidden,))
    results = []
    for fn in (chunked, naive):
        stats = fn(hidden)
        results.append((stats, torch.autograd.grad((upstream[0] * stats[0] + upstream[1] * stats[1]).sum(), hidden)[0]))
    (got, grad_got), (want, grad_want) = results
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_got, grad_want)


def _count_frozen_backward(monkeypatch) -> list:
    """Record each run of the frozen-head backward (the kept-E path)."""
    calls, original = [], stats_module._frozen_head_backward
    monkeypatch.setattr(stats_module, "_frozen_head_backward", lambda *a: calls.append(1) or original(*a))
    return calls


def test_frozen_head_model_equals_naive(monkeypatch):
    """A model whose output head is frozen (tied: the embedding too): chunked path with E kept, same values
    and gradients of every trainable parameter as the full-logit path."""
    calls = _count_frozen_backward(monkeypatch)
    for tied in (False, True):
        model = copy.deepcopy(_model("llama", tied))
        model.get_output_embeddings().requires_grad_(False)
        chunked = _stats_and_grads(response_token_stats, model, LEFT, chunk_size=4)
        assert len(calls) == 1 + tied
        _assert_same(chunked, _stats_and_grads(naive_response_token_stats, model, LEFT))
        assert len(chunked[1]) == len([p for p in model.parameters() if p.requires_grad]) > 0


def test_linear_head_accumulates_in_float32_for_bf16():
    """bf16 hidden states and weight, V = 4096: ℓ and vℓ are within one bf16 rounding of the exact logits
    of those bf16 values (|vℓ(ẑ) − vℓ(z)| ≤ max_a |ẑ_a − z_a|, and a matmul with a float32 accumulator
    rounds each logit once, by at most 2^-8 |z_a|). A bf16 sum over the vocabulary would be far off: its
    running sum of V terms of size ≈ 1 loses ~2^-8 of itself at each step."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(4096, 32, generator=gen) / 32**0.5).to(torch.bfloat16)
    targets = torch.randint(0, 4096, (64,), generator=gen)
    got = linear_head_token_stats(hidden, weight, targets, chunk_size=16)
    exact = hidden.double() @ weight.double().T  # (64, 4096) logits of the bf16 values
    bound = BF16_U * exact.abs().max(dim=-1).values  # (64,)
    assert got.logsumexp.dtype == torch.float32
    assert bool(((got.logsumexp.double() - torch.logsumexp(exact, -1)).abs() <= bound).all())
    assert bool(((got.logit_taken.double() - exact.gather(1, targets[:, None])[:, 0]).abs() <= bound).all())
    bf16_sum = torch.logsumexp(exact, -1).exp().to(torch.bfloat16)  # sanity: the exact value is representable...
    bf16_running = torch.zeros(64, dtype=torch.bfloat16)
    for column in exact.exp().to(torch.bfloat16).T:  # ...but a bf16 running sum is not
        bf16_running += column
    assert bool(((bf16_running.double() - bf16_sum.double()).abs() > bound * bf16_sum.double()).any())


@pytest.mark.parametrize("frozen_head", [False, True])
def test_bf16_model_matches_float32_within_bf16_error(frozen_head):
    """Same weights in bf16 and float32. The chunked bf16 statistics use the same bf16 logits as the naive
    bf16 path (then float32 sums), so they differ from it by at most one bf16 rounding of a logit, u·max|z|;
    their error against float32 is the naive bf16 error plus at most that. Gradients: the chunked path adds
    one bf16 rounding per chunk when it accumulates the head's weight gradient (relative u each); a frozen
    head's kept E = softmax(z) W is rounded to bf16 once per row."""
    model = copy.deepcopy(_model("llama", False))
    model.lm_head.requires_grad_(not frozen_head)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    batch, chunk_size = RIGHT, 4
    n_chunks = -(-int(batch[2].sum()) // chunk_size)
    exact, exact_grads = _stats_and_grads(naive_response_token_stats, model, batch)
    naive, naive_grads = _stats_and_grads(naive_response_token_stats, model_bf16, batch)
    chunked, chunked_grads = _stats_and_grads(response_token_stats, model_bf16, batch, chunk_size=chunk_size)
    scale = exact.logsumexp.abs().max() + exact.logit_taken.abs().max()
    for got, base, want in zip(chunked, naive, exact):
        assert got.dtype == torch.float32
        assert (got - base).abs().max() <= BF16_U * scale
        assert (got - want).abs().max() <= (base - want).abs().max() + BF16_U * scale
    for name, want in exact_grads.items():
        rel_naive = (naive_grads[name].float() - want).norm() / want.norm()
        rel_chunked = (chunked_grads[name].float() - want).norm() / want.norm()
        assert rel_chunked <= rel_naive + n_chunks * BF16_U, name


def test_autocast_bf16_matches_naive_autocast():
    """Under torch.autocast the head's matmuls run in bf16 like nn.Linear's: same logits as the naive path."""
    model, batch = _model("gpt2", False), LEFT
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, chunked_grads = _stats_and_grads(response_token_stats, model, batch, chunk_size=4)
        naive, naive_grads = _stats_and_grads(naive_response_token_stats, model, batch)
    scale = naive.logsumexp.abs().max() + naive.logit_taken.abs().max()
    for got, want in zip(chunked, naive):
        assert (got - want).abs().max() <= BF16_U * scale
    for name, want in naive_grads.items():
        assert chunked_grads[name].dtype == torch.float32
        assert (chunked_grads[name] - want).norm() <= 3 * BF16_U * want.norm(), name  # n_chunks = 3 roundings


# --------------------------------------------------------------------------------------------------
# The exact fallback, adapters, and the loss contract
# --------------------------------------------------------------------------------------------------


def _tiny_gemma2(softcap: float):
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=softcap, attention_dropout=0.0, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # raw logits of size ≈ 10 (random init gives ≈ 0.1), so the cap bites
    return model


def test_softcapped_model_takes_the_exact_path_and_warns_once(monkeypatch):
    monkeypatch.setattr(stats_module, "_WARNED_CLASSES", set())
    softcap = 1.0  # small enough that c·tanh(z / c) is far from z
    model = _tiny_gemma2(softcap)
    ids, attention, response = RIGHT
    assert "final_logit_softcapping" in exact_path_reason(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunked = _stats_and_grads(response_token_stats, model, RIGHT, chunk_size=4)
        response_token_stats(model, ids, attention, response)
    assert [str(w.message).count("exact full-logit path") for w in caught] == [1]
    _assert_same(chunked, _stats_and_grads(naive_response_token_stats, model, RIGHT))
    # the plain head would have been wrong: soft-capped logits lie in (−c, c), so vℓ ≤ c + ln V
    assert chunked[0].logsumexp[response].max() <= softcap + torch.log(torch.tensor(float(VOCAB)))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        plain = torch.logsumexp(model.lm_head(hidden[:, :-1]), -1)[response[:, 1:]]
    assert (plain - chunked[0].logsumexp[response]).abs().max() > 0.1


def test_plain_model_does_not_warn(monkeypatch):
    monkeypatch.setattr(stats_module, "_WARNED_CLASSES", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response_token_stats(_model("llama", True), *RIGHT)


@pytest.mark.parametrize("name", sorted(LOGIT_TRANSFORM_ATTRIBUTES))
def test_exact_path_reason_reads_the_config(name):
    model = copy.deepcopy(_model("llama", True))
    assert exact_path_reason(model) is None
    identity = LOGIT_TRANSFORM_ATTRIBUTES[name]
    setattr(model.config, name, identity if identity is not None else None)
    assert exact_path_reason(model) is None
    setattr(model.config, name, 0.5)
    assert name in exact_path_reason(model)


def test_non_linear_head_takes_the_exact_path(monkeypatch):
    monkeypatch.setattr(stats_module, "_WARNED_CLASSES", set())
    model = copy.deepcopy(_model("llama", False))
    model.lm_head = torch.nn.Sequential(model.lm_head)  # same logits, but not a plain nn.Linear
    assert "Sequential" in exact_path_reason(model)
    with pytest.warns(UserWarning, match="Sequential"):
        chunked = _stats_and_grads(response_token_stats, model, LEFT)
    _assert_same(chunked, _stats_and_grads(naive_response_token_stats, model, LEFT))


def test_lora_model(monkeypatch):
    """LoRA on attention: chunked path with the adapters active (the head is frozen: E is kept), same LoRA
    gradients as naive. LoRA on the head: the head is a peft module, so the exact path runs."""
    from peft import LoraConfig, get_peft_model

    calls = _count_frozen_backward(monkeypatch)

    base = copy.deepcopy(_model("llama", False))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, config)
    assert exact_path_reason(model) is None
    chunked = _stats_and_grads(response_token_stats, model, LEFT, chunk_size=5)
    assert calls == [1]
    naive = _stats_and_grads(naive_response_token_stats, model, LEFT)
    assert chunked[1] and all("lora_" in name for name in chunked[1])
    _assert_same(chunked, naive)
    head_lora = get_peft_model(copy.deepcopy(_model("llama", False)), LoraConfig(r=4, target_modules=["lm_head"]))
    assert "not a plain torch.nn.Linear" in exact_path_reason(head_lora)


def test_shiq_loss_contract():
    """LOSSES['shiq'] on the chunked statistics (policy with gradient, reference under no_grad) gives the
    same per-sequence loss and parameter gradients as on the full-logit statistics."""
    policy, reference = _model("llama", False), _model("llama", True, seed=1)
    ids, attention, response = LEFT
    rewards = torch.randn(response.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for fn, kwargs in ((response_token_stats, {"chunk_size": 4}), (naive_response_token_stats, {})):
        policy.zero_grad(set_to_none=True)
        with torch.no_grad():
            ref = fn(reference, ids, attention, response, **kwargs)
        stats = fn(policy, ids, attention, response, **kwargs)
        loss = LOSSES["shiq"](stats, ref, rewards, response, beta=0.5, gamma=0.9)  # (B,)
        loss.mean().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (loss_c, grads_c), (loss_n, grads_n) = results
    torch.testing.assert_close(loss_c, loss_n, atol=ATOL, rtol=RTOL)
    assert loss_n.abs().min() > 0
    for name in grads_n:
        torch.testing.assert_close(grads_c[name], grads_n[name], atol=ATOL, rtol=RTOL, msg=name)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _bad(ids, attention, response, match, **kwargs):
    for fn in (response_token_stats, naive_response_token_stats):
        with pytest.raises(ValueError, match=match):
            fn(_model("gpt2", True), ids, attention, response, **kwargs)


def test_bad_inputs():
    ids, attention, response = RIGHT
    at_zero = response.clone()
    at_zero[2, 0] = True
    _bad(ids, attention, at_zero, "position 0")
    on_padding = response.clone()
    on_padding[2, 6] = True  # row 2 has 4 real tokens
    _bad(ids, attention, on_padding, "attention_mask is 0")
    lids, lattention, lresponse = LEFT
    after_padding = lresponse.clone()
    after_padding[2, 5] = True  # row 2 starts at position 5
    _bad(lids, lattention, after_padding, "follows a padding position")
    _bad(ids, attention[:, :-1], response, "attention_mask must be a tensor of shape")
    _bad(ids, attention, response[:2], "response_mask must be a tensor of shape")
    _bad(ids, attention, response.long(), "response_mask must be a bool tensor")
    _bad(ids.float(), attention, response, "input_ids must be an integer tensor")
    _bad(ids, attention * 2, response, "only 0 and 1")
    _bad(ids, attention, response, "position_ids must be a tensor of shape", position_ids=ids[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        response_token_stats(_model("gpt2", True), ids, attention, response, chunk_size=0)
    with pytest.raises(ValueError, match="token ids must lie"):
        linear_head_token_stats(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 5]))


# --------------------------------------------------------------------------------------------------
# Wrapped and sharded models
# --------------------------------------------------------------------------------------------------


def test_wrapped_and_sharded_models_on_two_processes(tmp_path):
    """``torchrun`` with 2 gloo processes (``tests/dist_fsdp_stats.py``): DDP, FSDP2 (head in the root's group,
    tied or not, in its own ``fully_shard``, frozen) and FSDP1 (with and without ``use_orig_params``), each
    rank on half of the batch, give the per-sequence ShiQ losses and the gathered gradients (one SGD step) of
    one process without a wrapper on the whole batch and the full logits, through the chunked head; so does
    ShiQTrainer's statistics forward called as the DDP / FSDP2-wrapped model."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tests/dist_fsdp_stats.py", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    results = report.pop("results")
    errors = results.pop("dtensor-head")["errors"]
    for name in ("head_sharding", "response_token_stats"):
        assert "DTensor outside FSDP2" in errors[name] and "supported:" in errors[name], name
    sharding = {"ddp": "none", "trainer-ddp": "none", "fsdp1": "fsdp1", "fsdp1-flat": "fsdp1"}
    assert sorted(results) == ["ddp", "fsdp1", "fsdp1-flat", "fsdp2", "fsdp2-frozen-head", "fsdp2-own-head", "fsdp2-tied",
                               "trainer-ddp", "trainer-fsdp2", "trainer-fsdp2-own-head"]
    for scheme, result in results.items():
        assert result["sharding"] == sharding.get(scheme, "fsdp2"), scheme
        assert result["exact_path_reason"] is None and result["chunked_head_calls"] == 1, scheme
        assert result["loss_max_abs_diff"] <= 1e-5 * result["loss_max_abs"], scheme
        assert result["grad_max_abs_diff"] <= 1e-5 * result["grad_max_abs"], scheme
        frozen = {"lm_head.weight"} if scheme == "fsdp2-frozen-head" else set()
        assert set(result["parameters_with_gradient"]) == set(result["parameters"]) - frozen, scheme
        assert result["head_weight_changed"] == (not frozen), scheme


class _FakeZeroThreeParameter(torch.nn.Parameter):
    """A parameter with DeepSpeed ZeRO-3's partitioning attributes (``ds_id``, ``ds_status``)."""

    ds_id, ds_status = 0, "NOT_AVAILABLE"


def _fake_zero_three_head(model: torch.nn.Module) -> torch.nn.Module:
    """ZeRO-3's protocol on the head: its weight is empty except inside the head's forward, where a pre-hook
    gathers it and a post-hook releases it (DeepSpeed's hooks also gather it again for the backward, which
    this fake does not, so it is used under no_grad)."""
    head = model.lm_head
    full = head.weight.detach().clone()  # (V, H)
    head.weight = _FakeZeroThreeParameter(torch.empty(0))

    def gather(module, args):
        module.weight.data = full

    def release(module, args, output):
        module.weight.data = torch.empty(0)

    head.register_forward_pre_hook(gather)
    head.register_forward_hook(release)
    return model


def test_zero_three_head_is_called_through_its_hooks():
    """A ZeRO-3-partitioned head is read inside its own forward (the real DeepSpeed, trained and tied, is
    checked by hand: ``tests/dist_fsdp_stats.py --schemes zero3 zero3-tied``)."""
    model = _fake_zero_three_head(copy.deepcopy(_model("llama", False)))
    assert head_sharding(model) == "zero3" and head_sharding(_model("llama", False)) == "none"
    with torch.no_grad():
        chunked = response_token_stats(model, *LEFT, chunk_size=4)
        naive = naive_response_token_stats(_model("llama", False), *LEFT)
    assert model.lm_head.weight.numel() == 0  # released again
    for got, want in zip(chunked, naive):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_call_as_forward_restores_the_forward():
    """The redirection runs the function through the module's hooks and puts back an instance-level forward
    (accelerate's autocast wrapper is one), also when the function raises."""
    from shiq_llm.core.sharding import call_as_forward

    module = torch.nn.Linear(2, 3)
    assert call_as_forward(module, lambda x: x + 1, torch.zeros(1)).tolist() == [1.0]  # unwrapped: called directly
    from torch.distributed.fsdp import FSDPModule

    wrapped = torch.nn.Linear(2, 3)
    wrapped.__class__ = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})  # what fully_shard does
    seen = []
    wrapped.register_forward_pre_hook(lambda module, args: seen.append(args[0].tolist()))
    instance_forward = wrapped.forward = lambda x: ("instance", x)
    assert call_as_forward(wrapped, lambda x: (x * 2,), torch.ones(1))[0].tolist() == [2.0]
    assert seen == [[1.0]] and wrapped.forward is instance_forward
    with pytest.raises(RuntimeError, match="boom"):
        call_as_forward(wrapped, lambda x: (_ for _ in ()).throw(RuntimeError("boom")), torch.ones(1))
    assert wrapped.forward is instance_forward
    del wrapped.forward
    with pytest.raises(RuntimeError, match="boom"):
        call_as_forward(wrapped, lambda x: (_ for _ in ()).throw(RuntimeError("boom")), torch.ones(1))
    assert "forward" not in wrapped.__dict__



def test_forward_hands_its_chunk_buffers_to_backward_and_values_are_unchanged(monkeypatch):
    """One (c, V) buffer per training step, not one per pass: backward reuses the one forward filled (a second
    backward through a retained graph takes a new one); values and gradients equal the full-logit computation."""
    allocations = []
    init = stats_module._ChunkBuffers.__init__

    def counted(self, rows, vocab, *args):
        allocations.append((rows, vocab))
        init(self, rows, vocab, *args)

    monkeypatch.setattr(stats_module._ChunkBuffers, "__init__", counted)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (10,), generator=generator)
    out = linear_head_token_stats(hidden, weight, targets, chunk_size=4)
    (out.logit_taken.sum() + 2 * out.logsumexp.sum()).backward(retain_graph=True)
    assert allocations == [(4, 13)]  # forward's buffers, reused by backward
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (out.logit_taken.sum() + 2 * out.logsumexp.sum()).backward()
    assert allocations == [(4, 13)] * 2
    torch.testing.assert_close((hidden.grad, weight.grad), grads)
    naive_hidden, naive_weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logits = naive_hidden @ naive_weight.t()
    taken, lse = logits.gather(1, targets[:, None]).squeeze(1), logits.logsumexp(dim=1)
    (taken.sum() + 2 * lse.sum()).backward()
    torch.testing.assert_close(out.logit_taken.detach(), taken.detach())
    torch.testing.assert_close(out.logsumexp.detach(), lse.detach())
    torch.testing.assert_close(grads, (naive_hidden.grad, naive_weight.grad))
    with torch.no_grad():
        linear_head_token_stats(hidden, weight, targets, chunk_size=8)
    assert allocations[-1] == (8, 13) and len(allocations) == 3
