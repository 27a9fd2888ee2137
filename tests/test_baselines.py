"""shiq_toy.baselines against the slow references of shiq_toy.testing.reference, closed forms and gradcheck."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shiq_toy.baselines import copg_loss, dpo_loss, dro_loss, make_pairs, make_preference_pairs, sequence_log_ratio
from shiq_toy.losses import TokenStats, token_stats
from shiq_toy.testing.reference import (
    copg_loss_ref,
    dpo_loss_ref,
    dro_grads_ref,
    dro_loss_ref,
    pairs_ref,
    preference_pairs_ref,
    sequence_log_ratio_ref,
)
from shiq_toy.testing.strategies import betas as beta_values

betas = beta_values()


def _vec(seed: int, n: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), length=st.integers(1, 6), vocab=st.integers(2, 5))
def test_sequence_log_ratio_matches_loop(seed, batch, length, vocab):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.rand(batch, length, generator=g) < 0.7
    policy, ref = token_stats(logits, tokens), token_stats(ref_logits, tokens)
    expected = sequence_log_ratio_ref(*(x.tolist() for x in (*policy, *ref, mask)))
    torch.testing.assert_close(sequence_log_ratio(policy, ref, mask), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # Δ is ln π(y) − ln π_ref(y): the sum of masked log-softmax differences
    logp = (logits.log_softmax(-1) - ref_logits.log_softmax(-1)).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(sequence_log_ratio(policy, ref, mask), (logp * mask).sum(-1), rtol=0, atol=1e-12)


def test_sequence_log_ratio_ignores_masked_out_nan():
    stats = TokenStats(torch.tensor([[0.3, float("nan")]], dtype=torch.float64), torch.tensor([[1.0, float("nan")]], dtype=torch.float64))
    ref = TokenStats(torch.tensor([[0.1, 0.0]], dtype=torch.float64), torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    out = sequence_log_ratio(stats, ref, torch.tensor([[True, False]]))
    torch.testing.assert_close(out, torch.tensor([(0.3 - 1.0) - (0.1 - 0.5)], dtype=torch.float64))


@given(seed=st.integers(0, 10_000), n=st.integers(1, 20), beta=betas)
def test_losses_match_references(seed, n, beta):
    da, db, ra, rb = _vec(seed, n), _vec(seed + 1, n), _vec(seed + 2, n), _vec(seed + 3, n)
    expect = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(dpo_loss(da, db, beta=beta), expect(dpo_loss_ref(da.tolist(), db.tolist(), beta)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        copg_loss(da, db, ra, rb, beta=beta), expect(copg_loss_ref(da.tolist(), db.tolist(), ra.tolist(), rb.tolist(), beta)), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(dro_loss(da, ra, rb, beta=beta), expect(dro_loss_ref(da.tolist(), ra.tolist(), rb.tolist(), beta)), rtol=1e-12, atol=1e-12)


def test_dpo_closed_form_and_trl_formula():
    """Hand derivation (TRL 1.16 has no pure DPO function: its ``DPOTrainer._compute_loss`` computes the
    'sigmoid' loss inline as ``-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))``, the same
    expression). At a zero margin the loss is ln 2 and ∂L/∂Δw = −β σ(0) = −β/2; for a margin m,
    L = ln(1 + e^(−βm)); huge margins neither overflow nor lose the linear tail."""
    beta = 0.5
    dw = torch.tensor([0.0, 2.0, 3000.0, -3000.0], dtype=torch.float64, requires_grad=True)
    dl = torch.zeros(4, dtype=torch.float64)
    loss = dpo_loss(dw, dl, beta=beta)
    expected = torch.tensor([math.log(2.0), math.log1p(math.exp(-1.0)), 0.0, 1500.0], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-15, atol=0)
    loss.sum().backward()
    torch.testing.assert_close(dw.grad, torch.tensor([-beta / 2, -beta / (1 + math.e), 0.0, -beta], dtype=torch.float64), rtol=1e-15, atol=0)


def test_copg_fixed_point_and_ipo_case():
    """CoPG is 0 exactly when βΔ differences equal reward differences (π ∝ π_ref e^(R/β)); symmetric in a↔b;
    with a constant reward gap c it is IPO's ½(βΔ-gap − c)²."""
    beta = 0.3
    ra, rb = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.2, 0.7], dtype=torch.float64)
    da, db = ra / beta + 4.0, rb / beta + 4.0  # the same per-prompt shift on both: still the fixed point
    torch.testing.assert_close(copg_loss(da, db, ra, rb, beta=beta), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-15)
    x, y = _vec(0, 5), _vec(1, 5)
    torch.testing.assert_close(copg_loss(x, y, ra[:1].expand(5), rb[:1].expand(5), beta=beta), copg_loss(y, x, rb[:1].expand(5), ra[:1].expand(5), beta=beta))
    c = 0.8
    torch.testing.assert_close(copg_loss(x, y, torch.full((5,), c, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), beta=beta), 0.5 * (beta * (x - y) - c) ** 2)


@pytest.mark.parametrize("value_coef", [1.0, 0.25])
def test_dro_split_gradients(value_coef):
    """Forward = ½e²; ∂/∂Δ = −β e; ∂/∂V = −value_coef · e (hand derivatives in shiq_toy.testing.reference)."""
    beta = 0.7
    delta, reward, value = _vec(3, 6).requires_grad_(), _vec(4, 6), _vec(5, 6).requires_grad_()
    loss = dro_loss(delta, reward, value, beta=beta, value_coef=value_coef)
    torch.testing.assert_close(loss, torch.tensor(dro_loss_ref(delta.tolist(), reward.tolist(), value.tolist(), beta), dtype=torch.float64))
    loss.sum().backward()
    grad_delta, grad_value = dro_grads_ref(delta.tolist(), reward.tolist(), value.tolist(), beta, value_coef)
    torch.testing.assert_close(delta.grad, torch.tensor(grad_delta, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(value.grad, torch.tensor(grad_value, dtype=torch.float64), rtol=1e-13, atol=1e-13)


def test_dro_split_equals_joint_gradient_with_shared_parameters():
    """With value_coef = 1 the split gradient is the joint gradient of ½e², even when V and Δ share θ."""
    beta = 0.4
    theta = _vec(6, 3).requires_grad_()
    reward = _vec(7, 4)
    basis = _vec(8, 12).reshape(4, 3)
    delta, value = basis @ theta, (basis ** 2) @ theta  # both depend on θ
    dro_loss(delta, reward, value, beta=beta).sum().backward()
    split = theta.grad.clone()
    theta.grad = None
    delta, value = basis @ theta, (basis ** 2) @ theta
    (0.5 * (reward - value - beta * delta) ** 2).sum().backward()
    torch.testing.assert_close(split, theta.grad, rtol=1e-13, atol=1e-13)


def test_gradcheck_all_losses():
    beta = 0.6
    a, b, ra, rb = (_vec(s, 5).requires_grad_() for s in range(4))
    assert torch.autograd.gradcheck(lambda x, y: dpo_loss(x, y, beta=beta), (a, b))
    assert torch.autograd.gradcheck(lambda x, y, u, v: copg_loss(x, y, u, v, beta=beta), (a, b, ra, rb))
    assert torch.autograd.gradcheck(lambda x, u, v: dro_loss(x, u, v, beta=beta), (a, ra, rb))

    g = torch.Generator().manual_seed(0)
    stats = [torch.randn(3, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2)]
    ref = TokenStats(*(torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(2)))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x, y: sequence_log_ratio(TokenStats(x, y), ref, mask), stats)


@given(ids=st.lists(st.integers(0, 3), min_size=2, max_size=14), mode=st.sampled_from(["disjoint", "all"]), seed=st.integers(0, 100))
def test_pairs_match_loops(ids, mode, seed):
    prompt_ids = torch.tensor(ids)
    expected = pairs_ref(ids, mode)
    if not expected:
        with pytest.raises(ValueError, match="no pair"):
            make_pairs(prompt_ids, mode=mode)
        return
    a, b = make_pairs(prompt_ids, mode=mode)
    assert list(zip(a.tolist(), b.tolist())) == expected
    rewards = torch.randint(0, 3, (len(ids),), generator=torch.Generator().manual_seed(seed)).double()  # ties happen
    expected = preference_pairs_ref(ids, rewards.tolist(), mode)
    if not expected:
        with pytest.raises(ValueError, match="equal rewards"):
            make_preference_pairs(prompt_ids, rewards, mode=mode)
        return
    w, l = make_preference_pairs(prompt_ids, rewards, mode=mode)
    assert list(zip(w.tolist(), l.tolist())) == expected
    assert bool((rewards[w] > rewards[l]).all()) and bool((prompt_ids[w] == prompt_ids[l]).all())


def test_bad_inputs():
    x = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        copg_loss(x, x, x, x, beta=float("nan"))
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, torch.zeros(4, dtype=torch.float64), beta=1.0)
    with pytest.raises(ValueError, match=r"shape \(P,\)"):
        dro_loss(torch.zeros(3, 1, dtype=torch.float64), x, x, beta=1.0)
    with pytest.raises(ValueError, match="reward_b is not finite"):
        copg_loss(x, x, x, torch.tensor([0.0, float("inf"), 0.0], dtype=torch.float64), beta=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        dpo_loss(torch.zeros(3, dtype=torch.int64), x, beta=1.0)
    with pytest.raises(ValueError, match="value_coef"):
        dro_loss(x, x, x, beta=1.0, value_coef=0.0)
    with pytest.raises(ValueError, match="mask"):
        sequence_log_ratio(TokenStats(x[None], x[None]), TokenStats(x[None], x[None]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="shape"):
        sequence_log_ratio(TokenStats(x[None], x[None]), TokenStats(x[None], x[None]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode"):
        make_pairs(torch.tensor([0, 0]), mode="random")
    with pytest.raises(ValueError, match="prompt_ids"):
        make_pairs(torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="no prompt has two responses"):
        make_preference_pairs(torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="rewards"):
        make_preference_pairs(torch.tensor([0, 0]), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="not finite"):
        make_preference_pairs(torch.tensor([0, 0]), torch.tensor([0.0, float("nan")]))


def test_allow_empty_returns_no_pairs():
    """An online batch may hold no preference: allow_empty gives (0,) index tensors instead of an error."""
    for ids, rewards in (([0, 0, 1, 1], [1.0, 1.0, 2.0, 2.0]), ([0, 1, 2], [0.0, 1.0, 2.0])):
        w, l = make_preference_pairs(torch.tensor(ids), torch.tensor(rewards), allow_empty=True)
        assert w.shape == l.shape == (0,) and w.dtype == torch.int64
    w, l = make_preference_pairs(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), allow_empty=True)
    assert (w.tolist(), l.tolist()) == ([1], [0])
