"""A small trainer for tabular logits: any ShiQ-family loss of :mod:`shiq_toy.losses`, or a baseline.

``method`` is a row of :data:`shiq_toy.methods.METHODS`: a key of :data:`shiq_toy.losses.LOSSES` (``shiq``, ``shiq_init``, ``shiq_ms``, ``shiq_tk``,
``shifted_q``, ``logit_q``) or a baseline of :mod:`shiq_toy.baselines` (``dpo``, ``copg``, ``dro``). Data
is either a fixed offline :class:`~shiq_toy.data.Dataset` (full batch, or minibatches drawn with the
sequence weights) or, online, a fresh batch each step from ``sampler(current logits tables)``.

Independent runs are vectorised. A model with ``copies=C`` holds C independent tables; the step minimises
the *sum* over copies of each copy's own loss. Copy c's parameters receive exactly the gradient of copy c's
loss (the other terms do not depend on them), and Adam (like SGD) updates every parameter element-wise
from its own gradient history, so a vectorised run is the same computation as C separate runs — one
Python loop instead of C (``tests/test_tabular.py`` checks this against separate runs).

The per-token statistics come from :meth:`TabularLogits.token_stats` (equal to
``losses.token_stats(model(tokens), tokens)``, one log-sum-exp per state instead of per token).

Notation used for tensor shapes: ``C`` copies, ``N`` sequences per copy, ``H`` depth, ``V`` vocabulary,
``P`` pairs, ``K`` evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from shiq_toy import baselines
from shiq_toy.checks import check_number
from shiq_toy.data import Dataset
from shiq_toy.losses import TokenStats, logit_q_soft_value
from shiq_toy.methods import METHODS as METHOD_TABLE
from shiq_toy.methods import get_method, per_item_loss
from shiq_toy.tabular import TabularLogits

__all__ = ["BASELINES", "METHODS", "OPTIMIZERS", "History", "pairs_of", "method_loss", "dataset_loss", "train"]

#: Sequence-level methods (baselines) of :data:`shiq_toy.methods.METHODS`.
BASELINES = tuple(name for name, row in METHOD_TABLE.items() if row.sequence_level)
#: Every method name :func:`train` accepts: the rows of :data:`shiq_toy.methods.METHODS`.
METHODS = tuple(METHOD_TABLE)
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class History:
    """What :func:`train` records. ``steps`` (K,) are the numbers of updates done at each evaluation
    (0 = the initial model); ``metrics[name]`` is (K, C) (or (K,) without copies); ``loss`` is (steps, C)
    (or (steps,)), the training loss of each step."""

    steps: list[int] = field(default_factory=list)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None


def _pair_keys(batch: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """What the baselines pair on, from (C, N, H) fields: prompt ids made unique across copies (so that pairs
    never mix two copies) and sequence rewards R = Σ_t r_t, both flattened to (C·N,)."""
    ids = batch.prompt_ids
    groups = torch.arange(ids.shape[0])[:, None] * (int(ids.max()) + 1) + ids  # (C, N)
    return groups.flatten(), torch.where(batch.mask, batch.rewards, 0.0).sum(-1).flatten()


def pairs_of(method: str, batch: Dataset, *, pair_mode: str = "disjoint", allow_empty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs a pair method trains on, as (P,) indices into the flattened (C·N,) sequences of ``batch``
    ((C, N, H) fields): responses of the same prompt and copy, paired by the method's ``pairing``.
    ``allow_empty`` applies to preference pairs (an online batch may hold no preference)."""
    row = get_method(method)
    groups, returns = _pair_keys(batch)  # (C·N,) each
    if row.pairing == "preference":
        return baselines.make_preference_pairs(groups, returns, mode=pair_mode, allow_empty=allow_empty)  # winner, loser
    return baselines.make_pairs(groups, mode=pair_mode)  # ValueError when no prompt has two responses


def method_loss(
    method: str,
    policy: TokenStats,
    ref: TokenStats,
    batch: Dataset,
    *,
    beta: float,
    gamma: float = 1.0,
    soft_value: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    pair_mode: str = "disjoint",
) -> torch.Tensor:
    """Loss of each copy on a batch: (C,), through the method's row of :data:`shiq_toy.methods.METHODS`.

    policy, ref: TokenStats with (C, N, H) fields on ``batch.tokens`` (gradients flow through ``policy``);
    batch: :class:`Dataset` with (C, N, H) fields. Methods on sequences (the ShiQ family, ``dro``):
    Σ_n w_n L_n (``logit_q`` also needs ``soft_value`` (C, N, H), see
    :func:`shiq_toy.losses.logit_q_soft_value`; ``dro`` reads ``values`` (C, prompts), the value table V_φ).
    Pair methods (``dpo``, ``ipo``, ``copg``): pairs of responses of the same prompt (:func:`pairs_of`),
    weighted by w_a·w_b normalised per copy; a copy with no pair in the batch contributes 0.
    """
    row = get_method(method)
    num_copies, num, _ = batch.tokens.shape
    flat = lambda x: x.flatten(0, 1)  # noqa: E731  (C, N, H) -> (C·N, H)
    policy, ref = TokenStats(*map(flat, policy)), TokenStats(*map(flat, ref))
    rewards, mask, weights = flat(batch.rewards), flat(batch.mask), batch.weights  # weights (C, N)
    value = pairs = None
    if row.needs_value:
        if values is None or values.dim() != 2 or values.shape[0] != num_copies:
            raise ValueError(f"{method} needs values, the (C, prompts) value table V_φ with C = {num_copies}")
        value = values[torch.arange(num_copies).repeat_interleave(num), batch.prompt_ids.flatten()]  # (C·N,)
    if row.consumes == "pairs":
        pairs = pairs_of(method, batch, pair_mode=pair_mode)
    per_item = per_item_loss(row, policy, ref, rewards, mask, beta=beta, gamma=gamma, pairs=pairs, value=value,
                             soft_value=flat(soft_value) if soft_value is not None else None)
    if row.consumes != "pairs":
        return (weights * per_item.view(num_copies, num)).sum(-1)
    idx_a, idx_b = pairs
    flat_weights = weights.flatten()
    pair_weight, pair_copy = flat_weights[idx_a] * flat_weights[idx_b], idx_a // num  # (P,)
    total = torch.zeros(num_copies, dtype=per_item.dtype).index_add(0, pair_copy, pair_weight * per_item)
    norm = torch.zeros(num_copies, dtype=per_item.dtype).index_add(0, pair_copy, pair_weight)
    return total / norm.clamp(min=torch.finfo(norm.dtype).tiny)


def _as_stacked(batch: Dataset, num_copies: int) -> Dataset:
    """(N, H) fields -> (C, N, H), the same data for every copy; (C, N, H) fields are checked and kept."""
    if batch.tokens.dim() == 2:
        return Dataset(*(x.expand(num_copies, *x.shape) for x in batch))
    if batch.tokens.shape[0] != num_copies:
        raise ValueError(f"the batch stacks {batch.tokens.shape[0]} copies but the model has {num_copies}")
    return batch


def _model_tokens(model: TabularLogits, tokens: torch.Tensor) -> torch.Tensor:
    """(C, N, H) tokens as the model reads them: kept with C stacked copies, (C·N, H) for one shared table."""
    return tokens if model.copies is not None else tokens.flatten(0, 1)


def _stats(model: TabularLogits, tokens: torch.Tensor) -> TokenStats:
    """(C, N, H) tokens -> TokenStats of (C, N, H), whether the model stacks C copies or one shared table."""
    return TokenStats(*(x.view(tokens.shape) for x in model.token_stats(_model_tokens(model, tokens))))


def _soft_value(model: TabularLogits, ref: TabularLogits, tokens: torch.Tensor, *, beta: float) -> torch.Tensor:
    """logit_q's statistic β ln Σ_a π_ref(a|s) exp(ℓ(s,a)/β), once per state, at each token: (C, N, H)."""
    per_state = []
    for level, ref_level in zip(model.levels, ref.levels):  # (..., S, V); ref may omit the copies dimension
        lead = level.reshape(-1, *level.shape[-2:])  # (C, S, V), C = 1 for one table: the states as "positions"
        values = logit_q_soft_value(lead, ref_level.expand_as(level).reshape(lead.shape), beta=beta)  # (C, S)
        per_state.append(values.view(level.shape[:-1]))  # (..., S)
    return model.gather_states(per_state, _model_tokens(model, tokens)).view(tokens.shape)


def dataset_loss(
    model: TabularLogits,
    ref: TabularLogits,
    method: str,
    data: Dataset,
    *,
    beta: float,
    gamma: float = 1.0,
    values: torch.Tensor | None = None,
    pair_mode: str = "disjoint",
) -> torch.Tensor:
    """The loss :func:`train` minimises, of the current model on a whole dataset, without gradients:
    (C,) with copies, else a scalar. data: (N, H) or (C, N, H) fields; ``values`` (C, prompts) for dro."""
    batch = _as_stacked(data, model.copies or 1)
    with torch.no_grad():
        soft_value = _soft_value(model, ref, batch.tokens, beta=beta) if get_method(method).needs_soft_value else None
        loss = method_loss(
            method, _stats(model, batch.tokens), _stats(ref, batch.tokens), batch,
            beta=beta, gamma=gamma, soft_value=soft_value, values=values, pair_mode=pair_mode,
        )
    return loss if model.copies is not None else loss[0]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (C, b) of each copy: (C, N, ...) -> (C, b, ...)."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def _check_args(model, ref, method, steps, lr, optimizer, eval_every, batch_size, data, sampler) -> None:
    get_method(method)  # ValueError naming the known methods
    if ref.copies not in (None, model.copies) or ref.vocab_size != model.vocab_size or ref.horizon != model.horizon:
        raise ValueError(
            f"ref must match the model (V={model.vocab_size}, H={model.horizon}, copies {model.copies} or none), "
            f"got V={ref.vocab_size}, H={ref.horizon}, copies {ref.copies}"
        )
    for name, value in (("steps", steps), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'steps' else 1}, got {value!r}")
    check_number("lr", lr)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    if (data is None) == (sampler is None):
        raise ValueError("give exactly one of data (offline) or sampler (online)")
    if batch_size is not None and (data is None or isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, and only with offline data; got {batch_size!r}")


def _check_pairs(method: str, data: Dataset, pair_mode: str) -> None:
    """Offline pair methods: refuse data that holds no usable pair at all (a clear error before training)."""
    if get_method(method).consumes == "pairs":
        pairs_of(method, data, pair_mode=pair_mode, allow_empty=False)


def train(
    model: TabularLogits,
    ref: TabularLogits,
    method: str,
    *,
    beta: float,
    gamma: float = 1.0,
    steps: int,
    data: Dataset | None = None,
    sampler: Callable[[list[torch.Tensor]], Dataset] | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    optimizer: str = "adam",
    lr: float = 0.05,
    evaluate: Callable[[list[torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    eval_every: int = 10,
    pair_mode: str = "disjoint",
    progress: bool = False,
) -> History:
    """Train ``model`` (in place) for ``steps`` updates of ``optimizer`` ('adam' or 'sgd', learning rate ``lr``).

    model: trained logits, ``copies=C`` or none; ref: frozen reference logits, shared or with C copies.
    data: offline :class:`Dataset`, (N, H) fields (shared by all copies) or (C, N, H). ``batch_size``: None
    for full batch, else minibatches of that size per copy drawn with replacement, with probabilities
    ``data.weights`` (``generator`` draws them). sampler: online; called each step with the current tables
    (detached, list over depth of (C, V**h, V) or (V**h, V)) and returns a fresh (C, B, H) or (B, H) batch.
    evaluate: called with the tables before training, every ``eval_every`` steps and after the last step;
    returns named metrics, each (C,) or a scalar. ``dro`` trains a value table V_φ (C, prompts), zero at
    start (prompts: from ``data``; 1 online), jointly with the same optimiser.
    """
    _check_args(model, ref, method, steps, lr, optimizer, eval_every, batch_size, data, sampler)
    num_copies = model.copies or 1
    stacked = model.copies is not None

    params = list(model.parameters())
    values = None
    if get_method(method).needs_value:
        prompts = 1 if data is None else int(data.prompt_ids.max()) + 1
        values = torch.zeros(num_copies, prompts, dtype=torch.float64, requires_grad=True)
        params.append(values)
    opt = OPTIMIZERS[optimizer](params, lr=lr)
    if data is not None:
        fixed = _as_stacked(data, num_copies)
        _check_pairs(method, fixed, pair_mode)
        with torch.no_grad():  # offline: the reference statistics are computed once
            fixed_ref = _stats(ref, fixed.tokens)  # (C, N, H)

    history, losses = History(), []

    def record(step: int) -> None:
        if evaluate is None:
            return
        history.steps.append(step)
        for name, value in evaluate(model.tables()).items():
            history.metrics.setdefault(name, []).append(torch.as_tensor(value, dtype=torch.float64))

    record(0)
    for step in tqdm(range(1, steps + 1), disable=not progress, desc=method, leave=False):
        if data is None:
            batch = _as_stacked(sampler(model.tables()), num_copies)
            with torch.no_grad():
                ref_stats = _stats(ref, batch.tokens)  # (C, B, H)
        elif batch_size is None:
            batch, ref_stats = fixed, fixed_ref
        else:
            idx = torch.multinomial(fixed.weights, batch_size, replacement=True, generator=generator)  # (C, b)
            batch = Dataset(*(_take(x, idx) for x in fixed[:-1]), weights=torch.full(idx.shape, 1.0 / batch_size, dtype=torch.float64))
            ref_stats = TokenStats(*(_take(x, idx) for x in fixed_ref))  # (C, b, H)
        soft_value = _soft_value(model, ref, batch.tokens, beta=beta) if get_method(method).needs_soft_value else None
        loss = method_loss(
            method, _stats(model, batch.tokens), ref_stats, batch,
            beta=beta, gamma=gamma, soft_value=soft_value, values=values, pair_mode=pair_mode,
        )  # (C,)
        opt.zero_grad()
        loss.sum().backward()  # copies are independent: Σ_c keeps each copy's own gradient
        opt.step()
        losses.append(loss.detach())
        if step % eval_every == 0 or step == steps:
            record(step)

    history.metrics = {name: torch.stack(v) if stacked else torch.stack(v).reshape(len(v), -1)[:, 0] for name, v in history.metrics.items()}
    loss_table = torch.stack(losses) if losses else torch.zeros(0, num_copies, dtype=torch.float64)
    history.loss = loss_table if stacked else loss_table[:, 0]
    return history
