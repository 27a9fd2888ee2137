"""Slow, independent references for the solvers, written from spec §1 with Python floats and loops.

Never imported by the library. Trees here are small (V**H paths are enumerated); the strategy that draws
them is ``shiq_toy.testing.strategies.trees``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.special import xlogy


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def solve_tree_per_node(tree, *, beta: float, gamma: float):
    """Recursive backward induction, one node at a time (q, v, policy, logits as lists over depth of tensors).

    q(s, a) = r(s, a) + γ v(s·a);  v(s) = β ln Σ_a π_ref(a|s) exp(q(s, a)/β);  π = π_ref exp((q − v)/β).
    """
    vocab, horizon = tree.vocab_size, tree.horizon
    ref = [x.tolist() for x in tree.ref_logits]
    rew = [x.tolist() for x in tree.rewards]
    q = [[None] * vocab**h for h in range(horizon)]
    v = [[None] * vocab**h for h in range(horizon)]
    pi = [[None] * vocab**h for h in range(horizon)]

    def visit(h: int, node: int) -> float:
        if h == horizon:
            return 0.0
        q_row = [rew[h][node][a] + gamma * visit(h + 1, node * vocab + a) for a in range(vocab)]
        log_ref = _log_softmax(ref[h][node])
        terms = [lr + qa / beta for lr, qa in zip(log_ref, q_row)]
        top = max(terms)
        value = beta * (top + math.log(sum(math.exp(x - top) for x in terms)))
        q[h][node], v[h][node] = q_row, value
        pi[h][node] = [math.exp(lr + (qa - value) / beta) for lr, qa in zip(log_ref, q_row)]
        return value

    visit(0, 0)
    as_t = lambda levels: [torch.tensor(x, dtype=torch.float64) for x in levels]  # noqa: E731
    logits = [[[l + qa / beta for l, qa in zip(ref[h][n], q[h][n])] for n in range(vocab**h)] for h in range(horizon)]
    return as_t(q), as_t(v), as_t(pi), as_t(logits)


def paths(vocab: int, horizon: int):
    """Every sequence of tokens and the node index of each of its prefixes: [(tokens, nodes)]."""
    out = []
    for tokens in itertools.product(range(vocab), repeat=horizon):
        nodes, node = [], 0
        for a in tokens:
            nodes.append(node)
            node = node * vocab + a
        out.append((tokens, nodes))
    return out


def log_prob_tables(logit_levels) -> list[list[list[float]]]:
    return [[_log_softmax(row) for row in level.tolist()] for level in logit_levels]


def sequence_return(tree, tokens, nodes, *, gamma: float) -> float:
    """R_γ(y) = Σ_t γ^t r(s_t, y_t)."""
    return sum(gamma**t * float(tree.rewards[t][n, a]) for t, (a, n) in enumerate(zip(tokens, nodes)))


def root_value_by_enumeration(tree, *, beta: float) -> float:
    """For γ = 1: v*(root) = β ln Σ_y π_ref(y) exp(R(y)/β), R(y) = Σ_t r_t (spec §1, sequence form)."""
    log_ref = log_prob_tables(tree.ref_logits)
    terms = []
    for tokens, nodes in paths(tree.vocab_size, tree.horizon):
        log_p = sum(log_ref[t][n][a] for t, (a, n) in enumerate(zip(tokens, nodes)))
        terms.append(log_p + sequence_return(tree, tokens, nodes, gamma=1.0) / beta)
    top = max(terms)
    return beta * (top + math.log(sum(math.exp(x - top) for x in terms)))


def objective_by_enumeration(tree, policy_logits, *, beta: float, gamma: float) -> float:
    """J(π) = Σ_y π(y) Σ_t γ^t (r(s_t, y_t) − β KL(π(·|s_t) ‖ π_ref(·|s_t))), π = softmax(policy_logits)."""
    log_pi = log_prob_tables(policy_logits)
    log_ref = log_prob_tables(tree.ref_logits)
    total = 0.0
    for tokens, nodes in paths(tree.vocab_size, tree.horizon):
        prob, value = 1.0, 0.0
        for t, (a, n) in enumerate(zip(tokens, nodes)):
            kl = sum(math.exp(lp) * (lp - lr) for lp, lr in zip(log_pi[t][n], log_ref[t][n]))
            value += gamma**t * (float(tree.rewards[t][n, a]) - beta * kl)
            prob *= math.exp(log_pi[t][n][a])
        total += prob * value
    return total


def sequence_kl_by_enumeration(tree, logits_p, logits_q) -> float:
    """KL(p ‖ q) between the sequence distributions of two tabular policies, Σ_y p(y) ln p(y)/q(y)."""
    log_p, log_q = log_prob_tables(logits_p), log_prob_tables(logits_q)
    total = 0.0
    for tokens, nodes in paths(tree.vocab_size, tree.horizon):
        lp = sum(log_p[t][n][a] for t, (a, n) in enumerate(zip(tokens, nodes)))
        lq = sum(log_q[t][n][a] for t, (a, n) in enumerate(zip(tokens, nodes)))
        total += math.exp(lp) * (lp - lq)
    return total


def policy_evaluation_linear(mdp, policy: torch.Tensor, *, beta: float, gamma: float) -> np.ndarray:
    """Regularised value of a fixed policy on a FiniteMDP by a linear solve (numpy):

    v = r_π − β KL_π + γ P_π v on live states, v = 0 on terminal ones, i.e. (I − γ P_π) v = r_π − β KL_π.
    """
    num_states, num_actions = mdp.next_state.shape
    pi = policy.numpy()
    log_ref = torch.log_softmax(mdp.ref_logits, dim=-1).numpy()
    live = ~mdp.terminal.numpy()
    nxt = mdp.next_state.numpy()
    transition = np.zeros((num_states, num_states))
    for s in range(num_states):
        for a in range(num_actions):
            transition[s, nxt[s, a]] += pi[s, a]
    kl = (xlogy(pi, pi) - pi * log_ref).sum(1)  # 0 ln 0 = 0 where π*(a|s) underflows
    reward = (pi * mdp.rewards.numpy()).sum(1) - beta * kl
    transition[~live] = 0.0
    transition[:, ~live] = 0.0
    reward[~live] = 0.0
    return np.linalg.solve(np.eye(num_states) - gamma * transition, reward)
