"""shiq_toy.methods: every method is one row, and every row runs through the tabular trainer (the LLM trainer
runs every row it offers in tests/test_llm_trainer.py). IPO, the row added last, against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from shiq_toy.baselines import copg_loss, dpo_loss, dro_loss, sequence_log_ratio
from shiq_toy.data import exhaustive_dataset
from shiq_toy.losses import LOSSES, TokenStats, token_stats
from shiq_toy.mdp import random_tree
from shiq_toy.methods import METHODS, Method, get_method, ipo_loss, per_item_loss
from shiq_toy.tabular import TabularLogits
from shiq_toy.train import dataset_loss, train


def _tree(seed: int = 0):
    return random_tree(2, 3, generator=torch.Generator().manual_seed(seed))


def _frozen(tree):
    ref = TabularLogits.from_tree(tree)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def test_the_table_names_what_each_method_consumes():
    assert {name for name, row in METHODS.items() if row.consumes == "tokens"} == set(LOSSES)
    assert {name: row.pairing for name, row in METHODS.items() if row.consumes == "pairs"} == {
        "dpo": "preference", "ipo": "preference", "copg": "any"}
    assert [name for name, row in METHODS.items() if row.needs_value] == ["dro"]
    assert [name for name, row in METHODS.items() if row.needs_soft_value] == ["logit_q"]
    assert all(row.name == name and row.description for name, row in METHODS.items())
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        get_method("ppo")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_row_trains_in_the_tabular_trainer(method):
    """A few Adam steps on all paths of a random tree lower the row's own loss."""
    tree = _tree(1)
    data, ref = exhaustive_dataset(tree), _frozen(tree)
    model = TabularLogits.from_tree(tree)
    kwargs = dict(beta=0.5, pair_mode="all")
    values = torch.zeros(1, 1, dtype=torch.float64) if METHODS[method].needs_value else None
    before = float(dataset_loss(model, ref, method, data, values=values, **kwargs))
    train(model, ref, method, steps=30, data=data, lr=0.05, **kwargs)
    after = float(dataset_loss(model, ref, method, data, values=values, **kwargs))
    assert math.isfinite(before) and after < before


def _stats(logits: torch.Tensor, tokens: torch.Tensor) -> TokenStats:
    return token_stats(logits, tokens)


def test_per_item_loss_dispatches_to_the_one_definition():
    """per_item_loss on one batch equals each loss function called directly."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    policy, ref = (_stats(torch.randn(4, 5, 3, generator=g, dtype=torch.float64), tokens) for _ in range(2))
    rewards = torch.randn(4, 5, generator=g, dtype=torch.float64)
    beta = 0.7
    delta = sequence_log_ratio(policy, ref, mask)
    returns = torch.where(mask, rewards, 0.0).sum(-1)
    pairs = (torch.tensor([0, 2]), torch.tensor([1, 3]))
    value = torch.randn(4, generator=g, dtype=torch.float64)
    expected = {
        "dpo": dpo_loss(delta[pairs[0]], delta[pairs[1]], beta=beta),
        "copg": copg_loss(delta[pairs[0]], delta[pairs[1]], returns[pairs[0]], returns[pairs[1]], beta=beta),
        "ipo": (delta[pairs[0]] - delta[pairs[1]] - 1 / (2 * beta)).square(),
        "dro": dro_loss(delta, returns, value, beta=beta),
        "shiq": LOSSES["shiq"](policy, ref, rewards, mask, beta=beta, gamma=0.9),
    }
    for name, want in expected.items():
        got = per_item_loss(name, policy, ref, rewards, mask, beta=beta, gamma=0.9 if name == "shiq" else 1.0,
                            pairs=pairs, value=value)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="gamma must be 1"):
        per_item_loss("dpo", policy, ref, rewards, mask, beta=beta, gamma=0.9, pairs=pairs)
    with pytest.raises(ValueError, match="needs value"):
        per_item_loss("dro", policy, ref, rewards, mask, beta=beta)
    with pytest.raises(ValueError, match="give pairs"):
        per_item_loss("copg", policy, ref, rewards, mask, beta=beta)


def test_ipo_fixed_point_is_a_margin_of_one_over_two_beta():
    """Minimising IPO on one preference pair drives Δ_a − Δ_b to 1/(2β) (Azar et al. 2024), whatever the rewards."""
    beta = 0.25
    margin = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([margin], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        ipo_loss(margin, torch.zeros(1, dtype=torch.float64), torch.ones(1), torch.zeros(1), beta=beta).sum().backward()
        opt.step()
    assert float(margin) == pytest.approx(1 / (2 * beta), abs=1e-8)
    assert float(ipo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.ones(1), torch.zeros(1), beta=beta)) == 0.0


def test_a_new_method_is_one_function_and_one_row(monkeypatch):
    """Registering a row is all the tabular trainer needs: here a 'hinge' pair loss max(0, 1 − β(Δ_a − Δ_b))."""

    def hinge(delta_a, delta_b, reward_a, reward_b, *, beta):
        return torch.relu(1 - beta * (delta_a - delta_b))

    monkeypatch.setitem(METHODS, "hinge", Method("hinge", "pairs", hinge, pairing="preference", description="SLiC hinge"))
    tree = _tree(2)
    data, ref = exhaustive_dataset(tree), _frozen(tree)
    model = TabularLogits.from_tree(tree)
    before = float(dataset_loss(model, ref, "hinge", data, beta=1.0, pair_mode="all"))
    train(model, ref, "hinge", beta=1.0, steps=20, data=data, lr=0.05, pair_mode="all")
    assert float(dataset_loss(model, ref, "hinge", data, beta=1.0, pair_mode="all")) < before
