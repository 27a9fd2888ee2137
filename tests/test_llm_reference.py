"""shiq_llm.core.reference: statistics computed once, stored, reused, and refused when they do not match.

References: the full-logit path (``naive_response_token_stats``) run on one unpadded example at a time, the
model's own ``output_hidden_states`` for the cached prompt state, and a LoRA model's base weights saved before
the adapters were added.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct

import datasets
import pytest
import torch

from shiq_llm.core import reference as R
from shiq_llm.core.models import build_tokenizer, tiny_causal_lm
from shiq_llm.core.stats import naive_response_token_stats
from shiq_llm.data import collate, tokenize_rows

#: float32: the cached and the reference values come from the same float32 weights through padded vs unpadded
#: batches and chunked vs full-logit heads; differences are summation-order roundoff of O(1) values.
ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _rows(n: int = 7, *, offset: int = 0):
    return [
        {"prompt": f"what is {i + offset} plus {i}?", "completion": "it is " + " ".join(["ten"] * (1 + i % 3)), "reward": float(i % 3)}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_rows(_rows(), tokenizer, max_length=64)[0]


def _model(tokenizer, seed=0):
    return tiny_causal_lm(tokenizer, hidden_size=32, num_heads=4, seed=seed)


def _per_example_naive(model, examples):
    """(ℓref, vref) of each example's response tokens, one unpadded example at a time, full logits."""
    out = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            mask = torch.tensor([ex["response_mask"]])
            stats = naive_response_token_stats(model, ids, torch.ones_like(ids), mask)
            out.append((stats.logit_taken[mask], stats.logsumexp[mask]))
    return out


def _compute(model, examples, tokenizer, **kwargs):
    return R.compute_reference_stats(model, examples, pad_token_id=tokenizer.pad_token_id, **kwargs)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cached_values_equal_full_logit_statistics_per_example(tokenizer, examples, padding_side):
    model = _model(tokenizer)
    stats = _compute(model, examples, tokenizer, batch_size=3, padding_side=padding_side, chunk_size=5)
    assert len(stats) == len(examples)
    for row, (taken, lse) in zip(stats, _per_example_naive(model, examples)):
        assert len(row["ref_logit_taken"]) == len(taken)  # one value per response token
        torch.testing.assert_close(torch.tensor(row["ref_logit_taken"]), taken, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(row["ref_logsumexp"]), lse, atol=ATOL, rtol=0)


def test_prompt_state_is_the_final_hidden_state_before_the_first_response_token(tokenizer, examples):
    model = _model(tokenizer)
    stats = _compute(model, examples, tokenizer, batch_size=4, with_prompt_state=True)
    with torch.no_grad():
        for ex, row in zip(examples, stats):
            ids = torch.tensor([ex["input_ids"]])
            hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]  # (L, H), after the final norm
            first = ex["response_mask"].index(True)
            torch.testing.assert_close(torch.tensor(row["ref_prompt_state"]), hidden[first - 1], atol=ATOL, rtol=0)


def test_scatter_puts_values_back_on_the_response_positions(tokenizer, examples):
    model = _model(tokenizer)
    stats = _compute(model, examples, tokenizer, batch_size=4)
    batch = collate([examples[i] for i in range(4)], pad_token_id=tokenizer.pad_token_id, padding_side="left")
    full = R.scatter_response_values(stats["ref_logsumexp"][:4], batch["response_mask"])
    expected = naive_response_token_stats(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    torch.testing.assert_close(full, expected.logsumexp.detach(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="does not belong to these examples"):
        R.scatter_response_values(stats["ref_logsumexp"][1:5], batch["response_mask"])


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def test_model_fingerprint_sees_a_weight_change_and_ignores_the_name_or_path(tokenizer):
    model = _model(tokenizer)
    before = R.model_fingerprint(model)
    other = copy.deepcopy(model)
    other.config._name_or_path = "/somewhere/else"
    assert R.model_fingerprint(other) == before
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # element 0 is always in the strided sample
    assert R.model_fingerprint(other) != before
    assert R.model_fingerprint(_model(tokenizer, seed=1)) != before


def test_model_fingerprint_reads_a_strided_sample_of_large_tensors(tokenizer):
    model = _model(tokenizer)
    before = R.model_fingerprint(model, sample=8)
    embedding = model.get_input_embeddings().weight
    stride = embedding.numel() // 8
    with torch.no_grad():
        embedding.view(-1)[stride] += 1.0  # a sampled element
    assert R.model_fingerprint(model, sample=8) != before
    changed = R.model_fingerprint(model, sample=8)
    with torch.no_grad():
        embedding.view(-1)[stride + 1] += 1.0  # between two samples: unseen, as documented
    assert R.model_fingerprint(model, sample=8) == changed


def test_data_fingerprint_covers_tokens_and_mask_not_rewards(tokenizer, examples):
    base = R.data_fingerprint(examples)
    assert R.data_fingerprint([examples[i] for i in range(len(examples))]) == base  # list of dicts = Dataset
    rewards = examples.map(lambda ex: {"rewards": [r + 1.0 for r in ex["rewards"]]})
    assert R.data_fingerprint(rewards) == base
    tokens = examples.map(lambda ex, i: {"input_ids": ex["input_ids"][:-1] + [ex["input_ids"][-1] + (i == 2)]}, with_indices=True)
    assert R.data_fingerprint(tokens) != base
    masks = examples.map(lambda ex, i: {"response_mask": [m or (i == 0 and p == 1) for p, m in enumerate(ex["response_mask"])]}, with_indices=True)
    assert R.data_fingerprint(masks) != base
    assert R.data_fingerprint(examples.select(range(len(examples) - 1))) != base


def test_data_fingerprint_sees_where_one_example_ends_and_the_next_begins():
    """Same concatenated ids and mask, split differently between two examples."""
    a = [{"input_ids": [5, 6], "response_mask": [False, True]}, {"input_ids": [7, 8, 9], "response_mask": [True, True, False]}]
    b = [{"input_ids": [5, 6, 7], "response_mask": [False, True, True]}, {"input_ids": [8, 9], "response_mask": [True, False]}]
    assert R.data_fingerprint(a) != R.data_fingerprint(b)
    assert R.data_fingerprint(datasets.Dataset.from_list(a)) != R.data_fingerprint(datasets.Dataset.from_list(b))


def test_data_fingerprint_follows_the_row_order_of_a_selected_or_shuffled_dataset(examples):
    """``select``/``shuffle`` keep the Arrow table and add an index mapping: the fingerprint must read the rows
    in the dataset's order (the cache is stored in that order), as for the same rows given as a list."""
    order = list(reversed(range(len(examples))))
    reordered = examples.select(order)
    assert R.data_fingerprint(reordered) == R.data_fingerprint([examples[i] for i in order])
    assert R.data_fingerprint(reordered) != R.data_fingerprint(examples)
    assert R.data_fingerprint(examples.select([0, 2, 4])) == R.data_fingerprint([examples[i] for i in (0, 2, 4)])


# --------------------------------------------------------------------------------------------------
# The cache on disk
# --------------------------------------------------------------------------------------------------


def _cache(path, model, examples, tokenizer, **kwargs):
    kwargs.setdefault("settings", {"precision": "fp32"})
    kwargs.setdefault("log", lambda _: None)
    return R.reference_cache(path, model, examples, pad_token_id=tokenizer.pad_token_id, batch_size=4, **kwargs)


def test_cache_is_computed_once_then_reused(tmp_path, tokenizer, examples, monkeypatch):
    model = _model(tokenizer)
    first = _cache(tmp_path / "ref", model, examples, tokenizer)
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert manifest["num_examples"] == len(examples)
    assert manifest["num_response_tokens"] == sum(sum(m) for m in examples["response_mask"])

    def fail(*args, **kwargs):
        raise AssertionError("the reference was recomputed although a matching cache exists")

    monkeypatch.setattr(R, "compute_reference_stats", fail)
    again = _cache(tmp_path / "ref", model, examples, tokenizer)
    assert again["ref_logsumexp"] == first["ref_logsumexp"]
    assert again["ref_logit_taken"] == first["ref_logit_taken"]


def test_cache_of_other_data_is_refused_then_recomputed_on_request(tmp_path, tokenizer, examples):
    model = _model(tokenizer)
    _cache(tmp_path / "ref", model, examples, tokenizer)
    other, _ = tokenize_rows(_rows(offset=3), tokenizer, max_length=64)
    with pytest.raises(ValueError, match=r"does not match the tokenised data: .*manifest.json has data_fingerprint"):
        _cache(tmp_path / "ref", model, other, tokenizer)
    stats = _cache(tmp_path / "ref", model, other, tokenizer, recompute=True)
    for row, (_, lse) in zip(stats, _per_example_naive(model, other)):
        torch.testing.assert_close(torch.tensor(row["ref_logsumexp"]), lse, atol=ATOL, rtol=0)
    assert _cache(tmp_path / "ref", model, other, tokenizer)["ref_logsumexp"] == stats["ref_logsumexp"]


def test_cache_of_another_model_or_precision_is_refused(tmp_path, tokenizer, examples):
    _cache(tmp_path / "ref", _model(tokenizer), examples, tokenizer)
    with pytest.raises(ValueError, match="does not match the reference model"):
        _cache(tmp_path / "ref", _model(tokenizer, seed=1), examples, tokenizer)
    with pytest.raises(ValueError, match="does not match the settings"):
        _cache(tmp_path / "ref", _model(tokenizer), examples, tokenizer, settings={"precision": "bf16"})


def test_cache_without_prompt_states_is_rebuilt_with_them_for_dro(tmp_path, tokenizer, examples):
    """A matching cache made for a method without a value lacks DRO's ref_prompt_state: it is rebuilt with it
    (saying so), its manifest and checksums right, its other columns unchanged; a mismatching one is still refused."""
    model = _model(tokenizer)
    first = _cache(tmp_path / "ref", model, examples, tokenizer)
    logged = []
    stats = _cache(tmp_path / "ref", model, examples, tokenizer, need_prompt_state=True, log=logged.append)
    assert logged[0] == (f"reference statistics: the cache {tmp_path / 'ref'} has no ref_prompt_state column (made "
                         "for a method without a value); rebuilding it with the prompt states")
    assert len(stats[0]["ref_prompt_state"]) == model.config.hidden_size
    assert stats["ref_logit_taken"] == first["ref_logit_taken"] and stats["ref_logsumexp"] == first["ref_logsumexp"]
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert manifest["has_prompt_state"] is True
    expected = R.expected_manifest(model, examples, settings={"precision": "fp32"})
    again = R.load_reference_cache(tmp_path / "ref", expected, need_prompt_state=True)  # checksums verify
    assert again["ref_prompt_state"] == stats["ref_prompt_state"]
    assert _cache(tmp_path / "ref", model, examples, tokenizer)["ref_logsumexp"] == first["ref_logsumexp"]
    other, _ = tokenize_rows(_rows(offset=3), tokenizer, max_length=64)
    with pytest.raises(ValueError, match="does not match the tokenised data"):
        _cache(tmp_path / "other", model, examples, tokenizer)
        _cache(tmp_path / "other", model, other, tokenizer, need_prompt_state=True)


def test_damaged_cache_is_refused_naming_the_file(tmp_path, tokenizer, examples):
    model = _model(tokenizer)
    _cache(tmp_path / "ref", model, examples, tokenizer)
    shutil.rmtree(tmp_path / "ref" / "data")
    with pytest.raises(ValueError, match=r"cannot load .*ref/data"):
        _cache(tmp_path / "ref", model, examples, tokenizer)
    (tmp_path / "ref" / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"manifest.json is missing"):
        _cache(tmp_path / "ref", model, examples, tokenizer)
    (tmp_path / "ref" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        _cache(tmp_path / "ref", model, examples, tokenizer)


def test_cache_with_altered_bytes_is_refused_naming_the_file(tmp_path, tokenizer, examples):
    model = _model(tokenizer)
    value = _cache(tmp_path / "ref", model, examples, tokenizer)[0]["ref_logsumexp"][0]
    (arrow,) = (tmp_path / "ref" / "data").glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    at = data.find(struct.pack("<f", value))
    assert at >= 0
    data[at] ^= 0x01  # one float32 value of the cache changes in its last bit: Arrow reads the file as before
    arrow.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"reference cache .*ref is corrupt: .*{arrow.name} does not match its sha256"):
        _cache(tmp_path / "ref", model, examples, tokenizer)
    arrow.write_bytes(bytes(data[:-8]))
    with pytest.raises(ValueError, match=rf"{arrow.name} has {len(data) - 8} bytes, .*manifest.json says {len(data)}"):
        _cache(tmp_path / "ref", model, examples, tokenizer)


def test_cache_of_an_older_format_is_refused(tmp_path, tokenizer, examples):
    model = _model(tokenizer)
    _cache(tmp_path / "ref", model, examples, tokenizer)
    manifest_file = tmp_path / "ref" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "format": "shiq-reference-cache/1"}))
    with pytest.raises(ValueError, match=r"format 'shiq-reference-cache/1'.*recompute-ref"):
        _cache(tmp_path / "ref", model, examples, tokenizer)


def test_failed_write_leaves_the_previous_cache_intact(tmp_path, tokenizer, examples, monkeypatch):
    model = _model(tokenizer)
    first = _cache(tmp_path / "ref", model, examples, tokenizer)
    original = first.__class__.save_to_disk

    def crash(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(first.__class__, "save_to_disk", crash)
    with pytest.raises(OSError, match="simulated"):
        _cache(tmp_path / "ref", _model(tokenizer, seed=1), examples, tokenizer, recompute=True)
    monkeypatch.undo()
    assert _cache(tmp_path / "ref", model, examples, tokenizer)["ref_logsumexp"] == first["ref_logsumexp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "ref.tmp"]  # the half-written one, beside
    _cache(tmp_path / "ref", _model(tokenizer, seed=1), examples, tokenizer, recompute=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]  # cleared by the next write


# --------------------------------------------------------------------------------------------------
# LoRA: the reference is the base model with the adapters disabled
# --------------------------------------------------------------------------------------------------


def test_lora_reference_is_the_base_model_with_adapters_disabled(tokenizer, examples):
    from peft import LoraConfig, get_peft_model

    base = _model(tokenizer)
    base_stats = _compute(base, examples, tokenizer, batch_size=4, with_prompt_state=True)
    base_fingerprint = R.model_fingerprint(base)
    parameters_before = sum(p.numel() for p in base.parameters())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # adapters that change the outputs
    assert R.model_fingerprint(peft_model) == base_fingerprint
    stats = _compute(peft_model, examples, tokenizer, batch_size=4, with_prompt_state=True)
    for column in ("ref_logit_taken", "ref_logsumexp", "ref_prompt_state"):
        for got, want in zip(stats[column], base_stats[column]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=ATOL, rtol=0)
    # with the adapters active the statistics differ: disabling them is what makes the base the reference
    adapted = []
    with torch.no_grad():
        for ex in examples:
            ids, mask = torch.tensor([ex["input_ids"]]), torch.tensor([ex["response_mask"]])
            adapted.append(naive_response_token_stats(peft_model, ids, torch.ones_like(ids), mask).logsumexp[mask])
    assert max((a - torch.tensor(b)).abs().max().item() for a, b in zip(adapted, base_stats["ref_logsumexp"])) > 1e-2
    # no copy of the model was made: the base's parameters are the peft model's frozen ones
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n) == parameters_before
    peft_model.train()  # reference_mode switches to eval for the pass and restores the mode
    _compute(peft_model, examples, tokenizer, batch_size=4)
    assert peft_model.training
