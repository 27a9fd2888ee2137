"""shiq_toy.losses against the slow loop references of shiq_toy.testing.reference and the facts of spec §3 that
hold on any logits (telescoping, initialisation, bandit reduction, DRO at t = 1). The facts that need the exact
solution (zero residual at the fixed point, uniqueness) are in tests/test_theorems.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiq_toy import losses
from shiq_toy.losses import LOSSES, NEEDS_SOFT_VALUE, RESIDUALS, TokenStats, token_stats
from shiq_toy.testing.reference import next_on_mask, residual_reference, soft_value_reference
from shiq_toy.testing.strategies import Batch, batch_from_arrays, batches
from shiq_toy.testing.strategies import gammas as gamma_values

ALL = sorted(RESIDUALS)
gammas = gamma_values()


@pytest.mark.parametrize("name", ALL)
@given(b=batches(), gamma=gammas)
def test_residual_matches_loop_reference(name, b, gamma):
    expected = residual_reference(
        name, b.policy, b.ref, b.rewards, b.mask, beta=b.beta, gamma=gamma, soft_value=b.soft_value
    )
    got = b.residual(name, gamma)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert bool((got[~b.mask] == 0).all())


@st.composite
def long_batches(draw):
    """2 rows of 64–128 positions, a random fraction in [0.3, 0.7] of them holes (masked out)."""
    seed = draw(st.integers(0, 2**31 - 1))
    length = draw(st.integers(64, 128))
    holes = draw(st.floats(0.3, 0.7))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, length, generator=gen) >= holes
    mask[:, 0] = True  # at least one masked-in position per row
    vocab = draw(st.integers(2, 5))
    logits, ref_logits = (4 * torch.rand(2, length, vocab, generator=gen, dtype=torch.float64) - 2 for _ in range(2))
    tokens = torch.randint(0, vocab, (2, length), generator=gen)
    rewards = 2 * torch.rand(2, length, generator=gen, dtype=torch.float64) - 1
    return Batch(logits, ref_logits, tokens, rewards, mask, draw(st.floats(0.05, 5.0)))


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=6)
@given(b=long_batches(), gamma=gammas)
def test_residual_matches_loop_reference_on_long_rows_with_holes(name, b, gamma):
    """Rows of 64+ positions with holes: an unstable sort in the compaction (it reorders equal keys only
    beyond ~32 positions) would shuffle the masked-in positions, which short rows never reveal."""
    expected = residual_reference(
        name, b.policy, b.ref, b.rewards, b.mask, beta=b.beta, gamma=gamma, soft_value=b.soft_value
    )
    torch.testing.assert_close(b.residual(name, gamma), expected, rtol=1e-10, atol=1e-10)


@given(b=batches(), gamma=gammas)
def test_losses_are_per_sequence_sums_of_squares(b, gamma):
    for name in ALL:
        per_sequence = LOSSES[name](b.policy, b.ref, b.rewards, b.mask, beta=b.beta, gamma=gamma, **b.extra(name))
        assert per_sequence.shape == (b.mask.shape[0],)
        torch.testing.assert_close(per_sequence, (b.residual(name, gamma) ** 2).sum(-1))


@given(b=batches(), gamma=gammas)
def test_fact1_telescoping(b, gamma):
    """shiq_t − γ shiq_{t+1} = shiq_ms_t and shiq_init_t − γ shiq_init_{t+1} = shifted_q_t (spec §3, fact 1)."""
    for multi, single in (("shiq", "shiq_ms"), ("shiq_init", "shifted_q")):
        res = b.residual(multi, gamma)
        torch.testing.assert_close(res - gamma * next_on_mask(res, b.mask), b.residual(single, gamma), rtol=1e-9, atol=1e-9)


@given(b=batches(), gamma=gammas, pad=st.integers(1, 4))
def test_right_padding_with_garbage_changes_nothing(b, gamma, pad):
    batch = b.mask.shape[0]
    nan = torch.full((batch, pad), float("nan"), dtype=torch.float64)

    def padded(x):
        return torch.cat([x, nan], dim=1)

    mask = torch.cat([b.mask, torch.zeros(batch, pad, dtype=torch.bool)], dim=1)
    policy = TokenStats(*map(padded, b.policy))
    ref = TokenStats(*map(padded, b.ref))
    for name in ALL:
        extra = {"soft_value": padded(b.soft_value)} if name in NEEDS_SOFT_VALUE else {}
        got = RESIDUALS[name](policy, ref, padded(b.rewards), mask, beta=b.beta, gamma=gamma, **extra)
        torch.testing.assert_close(got[:, : b.mask.shape[1]], b.residual(name, gamma))
        assert bool((got[:, b.mask.shape[1] :] == 0).all())


@given(b=batches(max_batch=1), gamma=gammas)
def test_holes_equal_the_sequence_without_them(b, gamma):
    """Masked-out positions inside a row behave as if absent (environment tokens in a dialogue)."""
    keep = b.mask[0]
    dense = Batch(b.logits[:, keep], b.ref_logits[:, keep], b.tokens[:, keep], b.rewards[:, keep], b.mask[:, keep], b.beta)
    for name in ALL:
        torch.testing.assert_close(b.residual(name, gamma)[:, keep], dense.residual(name, gamma))


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name):
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])
    logits = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    ref_logits = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen)
    tokens = torch.randint(0, 3, (2, 4), generator=gen)
    rewards = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    ref = token_stats(ref_logits, tokens)

    def fn(lg):
        extra = {"soft_value": losses.logit_q_soft_value(lg, ref_logits, beta=0.7)} if name in NEEDS_SOFT_VALUE else {}
        return RESIDUALS[name](token_stats(lg, tokens), ref, rewards, mask, beta=0.7, gamma=0.9, **extra)

    assert torch.autograd.gradcheck(fn, (logits,))


@given(b=batches(), gamma=gammas)
def test_fact3_initialisation(b, gamma):
    """ℓ = ℓ_ref and r ≡ 0: shiq and shiq_ms are 0 with zero gradient; shiq_init = β vref_t and
    shifted_q = β vref_t − γ β vref_{t+1} (not 0) — spec §3, fact 3."""
    logits = b.ref_logits.clone().requires_grad_(True)
    policy = token_stats(logits, b.tokens)
    zero = torch.zeros_like(b.rewards)
    for name in ("shiq", "shiq_ms"):
        residual = RESIDUALS[name](policy, b.ref, zero, b.mask, beta=b.beta, gamma=gamma)
        assert float(residual.detach().abs().max()) < 1e-12
        (grad,) = torch.autograd.grad(LOSSES[name](policy, b.ref, zero, b.mask, beta=b.beta, gamma=gamma).sum(), logits, retain_graph=True)
        assert float(grad.abs().max()) < 1e-12
    vref = torch.where(b.mask, b.ref.logsumexp, 0.0)
    torch.testing.assert_close(losses.shiq_init(policy, b.ref, zero, b.mask, beta=b.beta, gamma=gamma), b.beta * vref)
    expected = torch.where(b.mask, b.beta * vref - gamma * b.beta * next_on_mask(vref, b.mask), 0.0)
    torch.testing.assert_close(losses.shifted_q(policy, b.ref, zero, b.mask, beta=b.beta, gamma=gamma), expected)


@given(b=batches(max_length=1), gamma=gammas)
def test_fact5_bandit_reduction(b, gamma):
    """T = 1: shiq = shiq_ms = shiq_tk = β(ℓ(a) − ℓ_ref(a)) − r(a) (spec §3, fact 5)."""
    expected = b.beta * (b.policy.logit_taken - b.ref.logit_taken) - b.rewards
    for name in ("shiq", "shiq_ms", "shiq_tk"):
        torch.testing.assert_close(b.residual(name, gamma), expected)


@given(b=batches())
def test_fact6_shiq_at_first_state_is_the_dro_residual(b):
    """At t = 1 (γ = 1): shiq = β ln π(y|x)/π_ref(y|x) + V(x) − R(x, y), V(x) = β(vℓ − vref)(x_1)."""
    for row in range(b.mask.shape[0]):
        keep = b.mask[row]
        first = int(keep.nonzero()[0])
        log_ratio_sequence = float(losses.log_ratio(b.policy, b.ref)[row, keep].sum())
        value = b.beta * float(b.policy.logsumexp[row, first] - b.ref.logsumexp[row, first])
        dro = b.beta * log_ratio_sequence + value - float(b.rewards[row, keep].sum())
        assert math.isclose(float(b.residual("shiq", 1.0)[row, first]), dro, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(float(b.residual("shiq_tk", 1.0)[row, first]), dro, rel_tol=1e-9, abs_tol=1e-9)


def test_soft_value_matches_explicit_sum():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    ref_logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    got = losses.logit_q_soft_value(logits, ref_logits, beta=0.3)
    torch.testing.assert_close(got, soft_value_reference(logits, ref_logits, beta=0.3))


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5])
@pytest.mark.parametrize("length,chunk", [(1, 256), (7, 3), (700, 64), (2000, 256)])
def test_discounted_reverse_cumsum_matches_loop(gamma, length, chunk):
    x = torch.randn(2, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    expected = torch.zeros_like(x)
    acc = torch.zeros(2, dtype=torch.float64)
    for t in reversed(range(length)):
        acc = x[:, t] + gamma * acc
        expected[:, t] = acc
    got = losses.discounted_reverse_cumsum(x, gamma=gamma, chunk=chunk)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


def test_token_stats_values_and_low_precision_upcast():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 50, generator=gen) * 4
    tokens = torch.randint(0, 50, (2, 3), generator=gen)
    stats = token_stats(logits, tokens)
    for b in range(2):
        for t in range(3):
            assert math.isclose(float(stats.logit_taken[b, t]), float(logits[b, t, tokens[b, t]]), rel_tol=1e-6)
            lse = math.log(sum(math.exp(float(v)) for v in logits[b, t]))
            assert math.isclose(float(stats.logsumexp[b, t]), lse, rel_tol=1e-6)
    low = token_stats(logits.bfloat16(), tokens)
    assert low.logsumexp.dtype == torch.float32  # accumulated in float32, not bf16
    exact = token_stats(logits.bfloat16().double(), tokens)
    torch.testing.assert_close(low.logsumexp.double(), exact.logsumexp, rtol=1e-6, atol=1e-5)


def test_reduce_loss():
    per_sequence = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(losses.reduce_loss(per_sequence, mask)) == 2.0
    assert float(losses.reduce_loss(per_sequence, mask, average="token")) == pytest.approx(4.0 / 3.0)
    with pytest.raises(ValueError, match="average"):
        losses.reduce_loss(per_sequence, mask, average="batch")


@pytest.mark.parametrize("average", ["sequence", "token"])
def test_reduce_loss_refuses_a_sequence_without_response_tokens(average):
    """Like the residuals: an all-False row would silently change the average (token: the divisor)."""
    per_sequence = torch.tensor([1.0, 0.0, 3.0])
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no masked-in \(response\) token"):
        losses.reduce_loss(per_sequence, mask, average=average)


# ---------------------------------------------------------------------------------------------- bad input


def _good():
    gen = torch.Generator().manual_seed(0)
    b = batch_from_arrays(
        torch.randn(2, 3, 4, dtype=torch.float64, generator=gen), torch.randn(2, 3, 4, dtype=torch.float64, generator=gen),
        torch.randint(0, 4, (2, 3), generator=gen), torch.randn(2, 3, dtype=torch.float64, generator=gen),
        torch.ones(2, 3, dtype=torch.bool), 0.5,
    )
    return b.policy, b.ref, b.rewards, b.mask


@pytest.mark.parametrize("name", ALL)
def test_bad_input_is_named(name):
    policy, ref, rewards, mask = _good()
    extra = {"soft_value": torch.zeros(2, 3, dtype=torch.float64)} if name in NEEDS_SOFT_VALUE else {}
    fn = RESIDUALS[name]
    with pytest.raises(ValueError, match="beta"):
        fn(policy, ref, rewards, mask, beta=0.0, **extra)
    with pytest.raises(ValueError, match="beta"):
        fn(policy, ref, rewards, mask, beta=float("nan"), **extra)
    for gamma in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gamma"):
            fn(policy, ref, rewards, mask, beta=0.5, gamma=gamma, **extra)
    with pytest.raises(ValueError, match="rewards has shape"):
        fn(policy, ref, rewards[:, :2], mask, beta=0.5, **extra)
    with pytest.raises(ValueError, match="ref.logsumexp has shape"):
        fn(policy, TokenStats(ref.logit_taken, ref.logsumexp[:1]), rewards, mask, beta=0.5, **extra)
    bad = rewards.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rewards is not finite .*row 1, t 2"):
        fn(policy, ref, bad, mask, beta=0.5, **extra)
    inf = policy.logsumexp.clone()
    inf[0, 1] = float("inf")
    with pytest.raises(ValueError, match="policy.logsumexp is not finite"):
        fn(TokenStats(policy.logit_taken, inf), ref, rewards, mask, beta=0.5, **extra)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no masked-in"):
        fn(policy, ref, rewards, empty, beta=0.5, **extra)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        fn(policy, ref, rewards, mask.long(), beta=0.5, **extra)


def test_logit_q_requires_soft_value_of_the_right_shape():
    policy, ref, rewards, mask = _good()
    with pytest.raises(TypeError):
        losses.logit_q(policy, ref, rewards, mask, beta=0.5)
    with pytest.raises(ValueError, match="soft_value has shape"):
        losses.logit_q(policy, ref, rewards, mask, beta=0.5, soft_value=torch.zeros(2, 4, dtype=torch.float64))


def test_token_stats_bad_input():
    logits = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="logits must have shape"):
        token_stats(logits[0], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must have shape"):
        token_stats(logits, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\)"):
        token_stats(logits, torch.full((2, 3), 4, dtype=torch.long))
