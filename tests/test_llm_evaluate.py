"""Evaluation (shiq_llm.generation.evaluate) and `shiq-llm evaluate`.

The exact per-token KL against enumeration of every response of a tiny vocabulary (sequence-level
KL(π‖π_ref) = Σ_y π(y) ln π(y)/π_ref(y), and a per-token sum written out in a loop); KL(π_ref‖π_ref) = 0;
left-padding invariance; the chunked KL (from hidden states) equal to the full-logit one; generation: EOS and
padding, prompts as the data pipeline tokenises them, seeded determinism, and samples drawn from π itself
(no top-k); evaluate_policy against a recomputation (means and standard errors); the CLI, with the held-out
check against the training data and a reward model.
"""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from shiq_llm.cli import main
from shiq_llm.core.models import build_tokenizer, tiny_causal_lm
from shiq_llm.data import tokenize_rows
from shiq_llm.data.prompts import load_prompts
from shiq_llm.generation.evaluate import (
    encode_prompts,
    evaluate_policy,
    generate,
    naive_token_kl,
    response_mask_from_generated,
    sequence_kl,
    token_kl,
)
from shiq_llm.tasks.synthetic import build_task_tokenizer, reward, task_prompts

V = 6  # vocabulary of the enumeration tests: ids 0 = pad, 1 = BOS, 2 = EOS, 3..5 ordinary


def _pair(dtype=torch.float64):
    """(policy, reference): two tiny random Llamas over the V-token vocabulary."""
    return tuple(tiny_causal_lm(V, hidden_size=16, num_heads=2, seed=seed, dtype=dtype) for seed in (0, 1))


def _all_responses(prompt: list[int], length: int):
    """Every response of ``length`` tokens after ``prompt``: input_ids (V**length, P + length), masks."""
    rows = [prompt + list(y) for y in itertools.product(range(V), repeat=length)]
    ids = torch.tensor(rows)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, len(prompt):] = True
    return ids, torch.ones_like(ids), response


def _log_prob_of_sequences(model, ids, n_prompt):
    """ln π(y|x) = Σ_t ln softmax(z_{t−1})[y_t], one sequence at a time (no padding, no batching)."""
    out = []
    with torch.no_grad():
        for row in ids:
            logp = torch.log_softmax(model(row[None]).logits[0], dim=-1)  # (L, V)
            out.append(sum(logp[p - 1, row[p]] for p in range(n_prompt, len(row))))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------


def test_exact_token_kl_matches_sequence_kl_by_enumeration():
    """Σ_y π(y) Σ_t KL_t(y) = Σ_y π(y) Σ_t ρ_t(y) = Σ_y π(y) ln π(y)/π_ref(y) over all V² responses."""
    policy, ref = _pair()
    prompt = [1, 3, 4]
    ids, attention, response = _all_responses(prompt, 2)
    exact, rho = token_kl(policy, ref, ids, attention, response)  # (V², 5)
    assert exact.dtype == torch.float64
    assert torch.all(exact[:, : len(prompt)] == 0) and torch.all(rho[:, : len(prompt)] == 0)
    logp = _log_prob_of_sequences(policy, ids, len(prompt))  # (V²,)
    logq = _log_prob_of_sequences(ref, ids, len(prompt))
    weights = logp.exp()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    kl = (weights * (logp - logq)).sum()
    assert kl > 0
    torch.testing.assert_close((weights * exact.sum(-1)).sum(), kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((weights * rho.sum(-1)).sum(), kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rho.sum(-1), logp - logq, rtol=1e-10, atol=1e-12)  # per sequence, ρ telescopes


def test_exact_token_kl_is_the_full_distribution_sum():
    """KL_t = Σ_a π(a|s_t) (ln π(a|s_t) − ln π_ref(a|s_t)), written as a loop over the V actions."""
    policy, ref = _pair()
    ids = torch.tensor([[1, 5, 3, 4, 2]])
    response = torch.tensor([[False, False, True, True, True]])
    exact, _ = token_kl(policy, ref, ids, torch.ones_like(ids), response)
    with torch.no_grad():
        p = torch.softmax(policy(ids).logits[0], -1)
        q = torch.softmax(ref(ids).logits[0], -1)
    for position in (2, 3, 4):
        expected = sum(p[position - 1, a] * math.log(p[position - 1, a] / q[position - 1, a]) for a in range(V))
        assert exact[0, position].item() == pytest.approx(float(expected), rel=1e-10)


def test_kl_of_the_reference_to_itself_is_zero():
    _, ref = _pair(torch.float32)
    ids, attention, response = _all_responses([1, 4], 2)
    exact, rho = token_kl(ref, ref, ids, attention, response)
    assert torch.all(exact == 0) and torch.all(rho == 0)


def test_kl_is_invariant_to_left_padding():
    """Batched with left padding = each sequence alone (position ids count attended tokens only)."""
    policy, ref = _pair()
    sequences = [([1, 3], [4, 5, 2]), ([1, 3, 4, 5, 3], [3]), ([1], [5, 5])]
    length = max(len(p) + len(r) for p, r in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.int64)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    alone = []
    for b, (p, r) in enumerate(sequences):
        n = len(p) + len(r)
        ids[b, length - n:] = torch.tensor(p + r)
        attention[b, length - n:] = 1
        response[b, length - len(r):] = True
        single = torch.tensor([p + r])
        mask = torch.tensor([[False] * len(p) + [True] * len(r)])
        alone.append([x.sum() for x in token_kl(policy, ref, single, torch.ones_like(single), mask)])
    exact, rho = token_kl(policy, ref, ids, attention, response)
    torch.testing.assert_close(exact.sum(-1), torch.stack([a[0] for a in alone]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rho.sum(-1), torch.stack([a[1] for a in alone]), rtol=1e-10, atol=1e-12)


def test_token_kl_rejects_a_response_at_position_zero():
    policy, ref = _pair()
    ids = torch.tensor([[3, 4]])
    with pytest.raises(ValueError, match="position 0"):
        token_kl(policy, ref, ids, torch.ones_like(ids), torch.tensor([[True, True]]))


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def test_response_mask_from_generated():
    eos = 2
    generated = torch.tensor([[5, 2, 0, 0], [5, 5, 5, 5], [2, 2, 5, 0], [4, 4, 4, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(response_mask_from_generated(generated, eos), expected)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _eos_biased(tokenizer, bias: float, seed: int = 0):
    """A random tiny model whose EOS logit is raised by ``bias`` (a hook on the head), so samples end early."""
    model = tiny_causal_lm(tokenizer, seed=seed)
    shift = torch.zeros(len(tokenizer))
    shift[tokenizer.eos_token_id] = bias
    model.lm_head.register_forward_hook(lambda module, args, output: output + shift)
    return model


PROMPTS = ["what is the capital of france?", "the quick brown fox", "0 1 2 3"]


def test_encode_prompts_matches_the_data_pipeline(tokenizer):
    """The prompt ids are the tokens before the first response token of tokenize_rows, with and without a
    chat template, for string and message prompts."""
    plain = build_tokenizer(chat_template=False)
    for tok in (tokenizer, plain):
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        prompts = PROMPTS if tok is plain else PROMPTS + [messages]
        rows = [{"prompt": p, "completion": " an answer", "reward": 0.0} for p in prompts]
        examples, _ = tokenize_rows(rows, tok)
        for ids, example in zip(encode_prompts(tok, prompts), examples):
            assert ids == example["input_ids"][: example["response_mask"].index(True)]


def test_generate_respects_eos_and_padding(tokenizer):
    model = _eos_biased(tokenizer, bias=4.0)
    max_new = 8
    samples = generate(model, tokenizer, PROMPTS, num_samples=20, max_new_tokens=max_new, seed=0)
    n = len(PROMPTS) * 20
    assert samples.input_ids.shape[0] == n and samples.prompt_index.tolist() == [i for i in range(3) for _ in range(20)]
    encoded = encode_prompts(tokenizer, PROMPTS)
    width = max(len(e) for e in encoded)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for b in range(n):
        prompt = encoded[samples.prompt_index[b]]
        assert samples.input_ids[b, width - len(prompt): width].tolist() == prompt  # left-padded prompt
        assert torch.all(samples.input_ids[b, : width - len(prompt)] == pad)
        assert samples.attention_mask[b, : width - len(prompt)].sum() == 0
        response = samples.input_ids[b][samples.response_mask[b]].tolist()
        assert torch.all(samples.response_mask[b, :width] == 0)
        assert samples.response_mask[b, width: width + len(response)].all()  # contiguous after the prompt
        tail = samples.input_ids[b, width + len(response):]
        assert torch.all(tail == pad) and samples.attention_mask[b, width + len(response):].sum() == 0
        if samples.finished[b]:
            assert response[-1] == eos and eos not in response[:-1] and len(response) <= max_new
        else:
            assert eos not in response and len(response) == max_new
        body = response[:-1] if samples.finished[b] else response
        assert samples.completions[b] == tokenizer.decode(body, skip_special_tokens=True)
    # P(EOS) ≈ e^4 / (e^4 + V − 1) ≈ 0.15 per step (near-uniform random logits, V ≈ 320): a sample ends with
    # EOS within 8 steps with probability ≈ 1 − 0.85^8 ≈ 0.73, so both endings occur among 60 samples
    assert samples.finished.any() and not samples.finished.all()


def test_generate_is_deterministic_under_a_seed(tokenizer):
    model = _eos_biased(tokenizer, bias=3.0)
    state = torch.get_rng_state()
    a = generate(model, tokenizer, PROMPTS, num_samples=4, max_new_tokens=6, seed=11, batch_size=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    b = generate(model, tokenizer, PROMPTS, num_samples=4, max_new_tokens=6, seed=11, batch_size=5)
    c = generate(model, tokenizer, PROMPTS, num_samples=4, max_new_tokens=6, seed=12, batch_size=5)
    assert torch.equal(a.input_ids, b.input_ids) and a.completions == b.completions
    assert not torch.equal(a.input_ids, c.input_ids)


def test_generate_samples_from_the_full_distribution(tokenizer):
    """First tokens of N samples against π(·|x): the total variation TV = ½ Σ_a |f_a − π_a| has
    E[TV] ≤ ½ Σ_a √(π_a (1 − π_a) / N) =: b (Jensen), and one sample moves TV by at most 1/N, so
    P(TV > b + t) ≤ exp(−2 N t²) (McDiarmid): with t = 0.05 and N = 4000, below 1e-8. A sampler truncated to
    the 50 most likely tokens (transformers' default top_k) would have TV ≥ the mass outside them, which is
    checked to exceed b + t, so the test can tell."""
    model = tiny_causal_lm(tokenizer, seed=3)
    n, t = 4000, 0.05
    samples = generate(model, tokenizer, PROMPTS[:1], num_samples=n, max_new_tokens=1, seed=0, batch_size=n)
    first = samples.input_ids[samples.response_mask]  # (N,)
    ids = torch.tensor([encode_prompts(tokenizer, PROMPTS[:1])[0]])
    with torch.no_grad():
        pi = torch.softmax(model(ids).logits[0, -1].double(), -1)  # (V,)
    freq = torch.bincount(first, minlength=len(pi)).double() / n
    bound = 0.5 * torch.sqrt(pi * (1 - pi) / n).sum()
    assert 0.5 * (freq - pi).abs().sum() < bound + t
    assert 1 - pi.topk(50).values.sum() > bound + t


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_and_kl_forward_see_the_same_distribution(tokenizer, arch):
    """Under left padding, the next-token distributions transformers samples from (``output_logits``) equal
    those the KL forward reads at the response positions (position ids from the attention mask)."""
    from shiq_llm.generation.evaluate import _response_log_probs
    from shiq_llm.generation.sampling import Completion, assemble_samples, left_pad, sampling_config

    model = tiny_causal_lm(tokenizer, arch=arch, seed=0)
    encoded = encode_prompts(tokenizer, ["a b", "the quick brown fox jumps over the lazy dog"])
    ids, mask = left_pad(encoded, tokenizer.pad_token_id)  # prompts of different lengths
    config = sampling_config(tokenizer, 5)
    config.output_logits, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    generated = out.sequences[:, ids.shape[1]:]
    keep = response_mask_from_generated(generated, tokenizer.eos_token_id)
    completions = [Completion(b, 0, generated[b][keep[b]].tolist(), False) for b in range(len(encoded))]
    samples = assemble_samples(encoded, completions, tokenizer)
    with torch.no_grad():
        logp, _ = _response_log_probs(model, samples.input_ids, samples.attention_mask, samples.response_mask)
    sampled = torch.log_softmax(torch.stack(out.logits, dim=1), dim=-1)  # (B, T, V)
    lengths = samples.response_mask.sum(-1).tolist()
    expected = torch.cat([sampled[b, :n] for b, n in enumerate(lengths)])  # (N, V), row-major like logp
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# evaluate_policy
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_models():
    tok = build_task_tokenizer()
    return tok, tiny_causal_lm(tok, seed=0), tiny_causal_lm(tok, seed=1)


def test_evaluate_policy_against_a_recomputation(task_models):
    tok, policy, ref = task_models
    prompts = task_prompts("eval")[:5]
    kwargs = dict(num_samples=6, max_new_tokens=6, seed=4, batch_size=16)
    metrics = evaluate_policy(policy, ref, tok, prompts, reward_fn=reward, **kwargs)
    samples = generate(policy, tok, prompts, **kwargs)
    rewards = torch.tensor([reward(prompts[i], c) for i, c in zip(samples.prompt_index.tolist(), samples.completions)])
    assert metrics["mean_reward"] == pytest.approx(rewards.double().mean().item(), abs=1e-12)
    assert metrics["num_samples"] == 30 and 0 <= metrics["finished"] <= 1
    assert metrics["mean_length"] == pytest.approx(samples.response_mask.sum(-1).double().mean().item())
    exact, mc = sequence_kl(policy, ref, samples, batch_size=7)  # other batching, same values
    assert metrics["kl"] == pytest.approx(exact.mean().item(), rel=1e-6) and metrics["kl"] > 0
    assert metrics["kl_mc"] == pytest.approx(mc.mean().item(), rel=1e-6, abs=1e-9)
    assert torch.all(exact >= 0)
    # both estimate KL(π‖π_ref): their per-sample difference has mean 0 (within 5 standard errors)
    diff = exact - mc
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(len(diff))


def test_evaluate_policy_of_the_reference(task_models):
    tok, _, ref = task_models
    metrics = evaluate_policy(ref, ref, tok, task_prompts("eval")[:3], reward_fn=None, num_samples=2, max_new_tokens=4)
    assert metrics["kl"] == 0 and metrics["kl_mc"] == 0 and math.isnan(metrics["mean_reward"])


# --------------------------------------------------------------------------------------------------
# shiq-llm evaluate
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(task_models, tmp_path_factory):
    tok, policy, ref = task_models
    root = tmp_path_factory.mktemp("models")
    for name, model in (("policy", policy), ("ref", ref)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "policy", root / "ref"


def test_evaluate_cli_on_synthetic_prompts(saved_models, tmp_path):
    policy, ref = saved_models
    out = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(policy), "--ref", str(ref), "--num-samples", "2", "--max-new-tokens", "6"]
    assert main(args + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_prompts"] == len(task_prompts("eval")) and report["num_samples"] == 2 * report["num_prompts"]
    assert report["reward"] == "synthetic" and 0 <= report["mean_reward"] <= 1 and report["kl"] > 0
    assert main(["evaluate", "--model", str(ref), "--ref", str(ref), "--num-samples", "1", "--out", str(out),
                 "--overwrite"]) == 0
    assert json.loads(out.read_text())["kl"] == 0


def test_evaluate_cli_on_a_prompts_file(saved_models, tmp_path):
    policy, ref = saved_models
    rows = tmp_path / "rows.jsonl"
    prompts = ["repeat 5:", "repeat 5:", "repeat 6:"]  # a reward-labelled file repeats prompts
    rows.write_text("".join(json.dumps({"prompt": p, "completion": " 1", "reward": 0.0}) + "\n" for p in prompts))
    out = tmp_path / "eval.json"
    base = ["evaluate", "--model", str(policy), "--ref", str(ref), "--prompts", str(rows), "--num-samples", "2"]
    base += ["--out", str(out)]
    assert main(base) == 0
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 2 and report["reward"] == "none" and report["mean_reward"] is None
    saved = out.read_text()
    assert main(base + ["--reward", "shiq_llm.tasks.synthetic:reward"]) == 2  # a finished report is never lost
    assert out.read_text() == saved
    assert main(base + ["--reward", "shiq_llm.tasks.synthetic:reward", "--overwrite"]) == 0
    assert 0 <= json.loads(out.read_text())["mean_reward"] <= 1
    assert main(base + ["--reward", "shiq_llm.tasks.synthetic:no_such_function", "--overwrite"]) == 2
    assert main(["evaluate", "--model", str(policy), "--ref", str(ref), "--prompts", str(tmp_path / "none.jsonl")]) == 2


def test_load_prompts_from_text_and_json(tmp_path):
    (tmp_path / "p.txt").write_text("repeat 5:\n\n  count up from 6: \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["repeat 5:", "count up from 6:"]
    rows = [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}, {"prompt": "a"}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert load_prompts(str(tmp_path / "p.json")) == ["a", [{"role": "user", "content": "b"}]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(ValueError, match="row 0 has no 'prompt'"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    assert load_prompts("synthetic", split="train") == task_prompts("train")


# --------------------------------------------------------------------------------------------------
# The chunked exact KL (no (B, L, V) logits) against the full-logit one
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, tied", [("llama", False), ("gpt2", True)])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_chunked_token_kl_equals_the_full_logit_kl(tokenizer, arch, tied, chunk_size):
    """Left-padded prompts of different lengths, right-padded responses; float64 (values to 1e-12) and float32."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        policy, ref = (tiny_causal_lm(tokenizer, arch=arch, tie_word_embeddings=tied, seed=s, dtype=dtype)
                       for s in (0, 1))
        samples = generate(policy, tokenizer, PROMPTS, num_samples=2, max_new_tokens=5, seed=0)
        args = (samples.input_ids, samples.attention_mask, samples.response_mask)
        exact, rho = token_kl(policy, ref, *args, chunk_size=chunk_size)
        naive_exact, naive_rho = naive_token_kl(policy, ref, *args)
        assert exact.dtype == naive_exact.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(exact, naive_exact, rtol=tol, atol=tol)
        torch.testing.assert_close(rho, naive_rho, rtol=tol, atol=tol)
        assert torch.all(exact[~samples.response_mask] == 0) and bool((exact[samples.response_mask] > 0).all())


def test_token_kl_of_a_head_that_is_not_linear_takes_the_full_logit_path(tokenizer):
    """A soft-capped head (Gemma-style config attribute) is seen by exact_path_reason: warned, still exact."""
    policy, ref = (tiny_causal_lm(tokenizer, seed=s, dtype=torch.float64) for s in (0, 1))
    policy.config.final_logit_softcapping = 30.0  # read by exact_path_reason only (Llama ignores it)
    samples = generate(ref, tokenizer, PROMPTS[:2], num_samples=1, max_new_tokens=4, seed=0)
    args = (samples.input_ids, samples.attention_mask, samples.response_mask)
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        exact, _ = token_kl(policy, ref, *args)
    torch.testing.assert_close(exact, naive_token_kl(policy, ref, *args)[0], rtol=0, atol=0)


def test_evaluate_policy_reports_standard_errors_and_lengths(task_models):
    tok, policy, ref = task_models
    prompts = task_prompts("eval")[:4]
    kwargs = dict(num_samples=5, max_new_tokens=6, seed=2, batch_size=8)
    metrics = evaluate_policy(policy, ref, tok, prompts, reward_fn=reward, chunk_size=3, **kwargs)
    samples = generate(policy, tok, prompts, **kwargs)
    exact, mc = sequence_kl(policy, ref, samples, batch_size=8, chunk_size=3)
    lengths = samples.response_mask.sum(-1).double()
    n = len(lengths)
    for key, values in (("kl", exact), ("kl_mc", mc), ("mean_length", lengths)):
        sem_key = {"kl": "kl_sem", "kl_mc": "kl_mc_sem", "mean_length": "length_sem"}[key]
        mean = sum(values.tolist()) / n
        sem = math.sqrt(sum((v - mean) ** 2 for v in values.tolist()) / (n - 1) / n)
        assert metrics[key] == pytest.approx(mean, rel=1e-6) and metrics[sem_key] == pytest.approx(sem, rel=1e-5)
    assert metrics["finished"] == pytest.approx(samples.finished.double().mean().item())


def test_evaluate_policy_names_the_sample_of_a_bad_reward(task_models):
    tok, policy, ref = task_models
    with pytest.raises(ValueError, match=r"row 0 \(prompt 'count up from 4:'\): the reward must be finite, got nan"):
        evaluate_policy(policy, ref, tok, ["count up from 4:"], reward_fn=lambda p, c: math.nan, num_samples=1,
                        max_new_tokens=2)


# --------------------------------------------------------------------------------------------------
# shiq-llm evaluate: held-out prompts, reward models, devices
# --------------------------------------------------------------------------------------------------


def test_evaluate_cli_refuses_prompts_of_the_training_data(saved_models, tmp_path, capsys):
    policy, ref = saved_models
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "completion": " 1", "reward": 0.0}) + "\n"
                             for p in ["repeat 5:", "repeat 6:", "repeat 6:"]))
    held = tmp_path / "eval.txt"
    held.write_text("repeat  5:\nrepeat 7:\n")  # "repeat  5:" is "repeat 5:" up to whitespace
    out = tmp_path / "eval.json"
    base = ["evaluate", "--model", str(policy), "--ref", str(ref), "--prompts", str(held), "--num-samples", "1",
            "--max-new-tokens", "3", "--out", str(out), "--overwrite"]  # re-run into one report
    assert main(base + ["--train-data", str(train)]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 evaluation prompts (50.0 %) also occur in the training data (2 distinct prompts)" in err
    assert main(base + ["--train-data", str(train), "--leak", "warn"]) == 0
    report = json.loads(out.read_text())
    assert report["leaked_prompts"] == 1 and report["train_data"] == str(train)
    # a run directory: run_args.yaml (written by shiq-llm train) next to final/ names the training data
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in policy.iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    (run / "run_args.yaml").write_text(f"dataset_name: {train}\ndataset_train_split: train\ndata_format: null\n"
                                       "data_format_options: null\n")
    auto = base[:1] + ["--model", str(run / "final")] + base[3:]
    assert main(auto) == 1 and "also occur in the training data" in capsys.readouterr().err
    assert main(auto + ["--train-data", "none"]) == 0
    assert json.loads(out.read_text())["leaked_prompts"] is None


def test_evaluate_checks_a_runs_training_data_from_any_directory_or_refuses(saved_models, tmp_path, monkeypatch, capsys):
    """run_args.yaml stores resolved paths: `evaluate --model RUN/final` run from another directory still checks
    the held-out prompts against the run's training data; a run whose training data cannot be found is refused in
    one line naming --train-data and --train-data none (never evaluated unchecked with exit 0)."""
    import yaml

    from shiq_llm.train.config import parse_train_args
    from shiq_llm.train.run import train_run

    policy, ref = saved_models
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    Path("rows.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c, "reward": r}) + "\n" for p, c, r in [
        ("repeat 5:", " 5 5 5 5", 1.0), ("repeat 5:", " 6", 0.0), ("repeat 6:", " 6 6 6 6", 1.0), ("repeat 6:", " 1", 0.0)]))
    train_run(*parse_train_args(["--model_name_or_path", str(policy), "--dataset_name", "rows.jsonl", "--output_dir",
                                 "run", "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
                                 "--disable_tqdm", "true", "--save_strategy", "no"]), print_logs=False)
    run_args = work / "run" / "run_args.yaml"
    assert yaml.safe_load(run_args.read_text())["dataset_name"] == str(work / "rows.jsonl")
    monkeypatch.chdir(elsewhere)
    held = elsewhere / "eval.txt"
    held.write_text("repeat 5:\nrepeat 7:\n")
    out = elsewhere / "eval.json"
    command = ["evaluate", "--model", str(work / "run" / "final"), "--ref", str(ref), "--prompts", str(held),
               "--reward", "none", "--num-samples", "1", "--max-new-tokens", "2", "--out", str(out)]
    assert main(command) == 1
    assert "1 of 2 evaluation prompts (50.0 %) also occur in the training data" in capsys.readouterr().err
    assert not out.exists()
    # a run_args.yaml with a path relative to where the run was trained (as written before): refused, in one line
    run_args.write_text(run_args.read_text().replace(str(work / "rows.jsonl"), "rows.jsonl"))
    assert main(command) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert (f"--train-data auto: the training data 'rows.jsonl' of the run ({run_args}) cannot be read from {elsewhere} "
            "(no such file 'rows.jsonl'); give --train-data PATH, or --train-data none to skip the held-out check") in err
    assert not out.exists()
    assert main(command + ["--train-data", "none"]) == 0  # the explicit way to skip the check, recorded
    assert json.loads(out.read_text())["train_data"] == "not checked (--train-data none)"


def test_evaluate_cli_with_a_reward_model_on_a_device(saved_models, tmp_path):
    from shiq_llm.core.models import build_tokenizer, tiny_reward_model

    policy, ref = saved_models
    rm_tokenizer = build_tokenizer()  # the reward model has a tokenizer of its own
    tiny_reward_model(rm_tokenizer).save_pretrained(tmp_path / "rm")
    rm_tokenizer.save_pretrained(tmp_path / "rm")
    out = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(policy), "--ref", str(ref), "--num-samples", "2", "--max-new-tokens", "4",
            "--reward-model", str(tmp_path / "rm"), "--device", "cpu", "--dtype", "float32", "--backend", "hf",
            "--chunk-size", "7", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["reward"] == str(tmp_path / "rm") and report["device"] == "cpu" and report["backend"] == "hf"
    assert math.isfinite(report["mean_reward"]) and report["reward_sem"] > 0
    assert {"kl_sem", "kl_mc_sem", "length_sem", "finished"} <= set(report)
