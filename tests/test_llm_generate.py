"""shiq-llm generate (shiq_llm.generation.generate, shiq_llm.generation.sampling, shiq_llm.storage.shards).

The rows against the sampler run shard by shard with the documented seeds (prompts, indices, decoded
completions, finish reasons); resume after a kill (and a half-written file) giving the uninterrupted run's file
byte for byte; a re-run with other settings refused; a tokenizer without a pad token (EOS pads, same samples);
the vLLM path on a stand-in engine that records what it is asked (n = K, a seed per prompt, pure sampling
parameters, the prompt token ids) and samples with transformers; the clear error when vLLM is missing; bad
inputs through the CLI; --help for every option.
"""

import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from shiq_llm.cli import commands, main
from shiq_llm.core.models import tiny_causal_lm
from shiq_llm.data.rows import validate_rows
from shiq_llm.generation.generate import GenerateConfig, generate_rows, resolve_backend, shard_seed
from shiq_llm.generation.sampling import HFSampler, VLLMSampler, encode_prompts
from shiq_llm.storage.jsonl import read_jsonl
from shiq_llm.tasks.synthetic import build_task_tokenizer, task_prompts

PROMPTS = task_prompts("eval")[:5]  # prompts of different lengths: left padding is exercised
K, MAX_NEW = 3, 6


def _eos_prone(tokenizer, seed: int = 0):
    """A tiny random Llama whose EOS logit is ≈ 4 at typical states (its head row is 4 h̄ / |h̄|²), so that
    samples of 6 tokens both stop and run to the limit."""
    model = tiny_causal_lm(tokenizer, tie_word_embeddings=False, seed=seed)
    ids = torch.tensor([encode_prompts(tokenizer, PROMPTS[:1])[0]])
    with torch.no_grad():
        mean = model.model(input_ids=ids).last_hidden_state.mean(dim=(0, 1))  # (H,)
        model.lm_head.weight[tokenizer.eos_token_id] = 4 * mean / mean.dot(mean)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model directory, tokenizer, model, prompts file)."""
    root = tmp_path_factory.mktemp("generate")
    tokenizer = build_task_tokenizer()
    model = _eos_prone(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS + PROMPTS[:2]))  # repeats kept once
    return root / "model", tokenizer, model, prompts


def _config(saved, out, **overrides) -> GenerateConfig:
    model_dir, _, _, prompts = saved
    values = dict(model=str(model_dir), prompts=str(prompts), out=str(out), num_completions=K, max_new_tokens=MAX_NEW,
                  shard_size=2, batch_size=4, backend="hf", device="cpu", dtype="float32", progress=False)
    return GenerateConfig(**{**values, **overrides})


def _quiet(_: str) -> None:
    pass


def test_rows_are_the_sampled_completions_with_their_provenance(saved, tmp_path):
    _, tokenizer, model, _ = saved
    out = tmp_path / "rows.jsonl"
    summary = generate_rows(_config(saved, out, seed=7), log=_quiet)
    rows = read_jsonl(out)
    assert summary["rows"] == len(rows) == len(PROMPTS) * K and summary["prompts"] == len(PROMPTS)
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(5) for j in range(K)]
    assert all(r["prompt"] == PROMPTS[r["prompt_index"]] and r["model"] == str(saved[0]) and r["seed"] == 7
               for r in rows)
    expected = []  # shard [a, b) of 2 prompts, sampled with shard_seed(7, a), batches of 4 sequences
    for start in range(0, len(PROMPTS), 2):
        encoded = encode_prompts(tokenizer, PROMPTS[start:start + 2])
        expected += HFSampler(model, tokenizer, batch_size=4).sample(
            encoded, num_samples=K, max_new_tokens=MAX_NEW, seed=shard_seed(7, start))
    assert [r["completion"] for r in rows] == [tokenizer.decode(c.token_ids, skip_special_tokens=True)
                                               for c in expected]
    assert [r["num_tokens"] for r in rows] == [len(c.token_ids) for c in expected]
    for row, c in zip(rows, expected):
        stopped = c.token_ids[-1] == tokenizer.eos_token_id
        assert row["finish_reason"] == ("stop" if stopped else "length")
        assert stopped or row["num_tokens"] == MAX_NEW
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    validate_rows([{**r, "reward": 0.0} for r in rows if r["completion"].strip()])  # canonical rows once scored


def test_a_killed_run_resumes_to_the_uninterrupted_file(saved, tmp_path):
    generate_rows(_config(saved, tmp_path / "a.jsonl"), log=_quiet)

    class Killed(Exception):
        pass

    def kill_after_two(start, stop):
        if start == 2:  # the second shard, [2, 4), is on disk: die before the third
            raise Killed

    out = tmp_path / "b.jsonl"
    with pytest.raises(Killed):
        generate_rows(_config(saved, out), on_shard=kill_after_two, log=_quiet)
    parts = tmp_path / "b.jsonl.parts"
    assert not out.exists()
    assert sorted(p.name for p in parts.iterdir()) == ["000000000-000000002.jsonl", "000000002-000000004.jsonl",
                                                       "manifest.json"]
    (parts / "000000004-000000005.jsonl.tmp-99").write_text('{"half": ')  # a write cut short by the kill
    manifest = (parts / "manifest.json").read_text()
    shards = []
    summary = generate_rows(_config(saved, out), on_shard=lambda a, b: shards.append((a, b)), log=_quiet)
    assert shards == [(4, 5)] and summary["sampled_now"] == K  # only the missing shard was sampled
    assert out.read_bytes() == (tmp_path / "a.jsonl").read_bytes() and not parts.exists()

    parts.mkdir()  # as if killed after OUT was swapped in, before the shards were deleted
    (parts / "manifest.json").write_text(manifest)
    summary = generate_rows(_config(saved, out), on_shard=lambda a, b: shards.append((a, b)), log=_quiet)
    assert summary["rows"] == len(PROMPTS) * K and summary["sampled_now"] == 0 and not parts.exists()
    assert out.read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_rerunning_with_other_settings_or_onto_an_existing_file_is_refused(saved, tmp_path):
    out = tmp_path / "rows.jsonl"

    def kill(start, stop):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_rows(_config(saved, out), on_shard=kill, log=_quiet)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 there, 1 now\)"):
        generate_rows(_config(saved, out, seed=1), log=_quiet)
    generate_rows(_config(saved, out, seed=1, overwrite=True), log=_quiet)  # --overwrite starts afresh
    assert len(read_jsonl(out)) == len(PROMPTS) * K
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        generate_rows(_config(saved, out, seed=1), log=_quiet)


def test_a_tokenizer_without_pad_token_pads_with_eos_and_samples_the_same(saved, tmp_path):
    model_dir, tokenizer, model, _ = saved
    no_pad = build_task_tokenizer()
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    model.save_pretrained(tmp_path / "no_pad")
    no_pad.save_pretrained(tmp_path / "no_pad")
    generate_rows(_config(saved, tmp_path / "a.jsonl"), log=_quiet)
    generate_rows(_config(saved, tmp_path / "b.jsonl", model=str(tmp_path / "no_pad")), log=_quiet)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["completion"] for r in a] == [r["completion"] for r in b]  # padding is masked out either way


class _StandInVLLM:
    """A stand-in ``vllm`` module: ``LLM.generate`` records its arguments and samples each request with the
    transformers model under the request's seed, returning vLLM's output structure."""

    def __init__(self, model, tokenizer):
        self.calls = {}
        outer = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                outer.calls["LLM"] = kwargs

            def generate(self, requests, params, use_tqdm=True):
                outer.calls.setdefault("generate", []).append((requests, [p.kwargs for p in params]))
                results = []
                for request, p in zip(requests, params):
                    sampled = HFSampler(model, tokenizer).sample(
                        [request["prompt_token_ids"]], num_samples=p.kwargs["n"], max_new_tokens=p.kwargs["max_tokens"],
                        seed=p.kwargs["seed"])
                    outputs = [SimpleNamespace(token_ids=tuple(c.token_ids), text="(vLLM's own text is not used)",
                                               finish_reason=c.finish_reason) for c in sampled]
                    results.append(SimpleNamespace(outputs=outputs))
                return results

        self.SamplingParams, self.LLM = SamplingParams, LLM


def test_the_vllm_backend_asks_vllm_for_pure_samples_and_writes_the_same_rows(saved, tmp_path, monkeypatch):
    import shiq_llm.core.models

    model_dir, tokenizer, model, _ = saved
    stand_in = _StandInVLLM(model, tokenizer)
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    monkeypatch.setattr(shiq_llm.core.models, "resolve_device", lambda device: torch.device("cuda"))  # vLLM needs a GPU
    monkeypatch.setattr(shiq_llm.core.models, "resolve_dtype", lambda dtype, device: torch.float32)
    out = tmp_path / "rows.jsonl"
    generate_rows(_config(saved, out, backend="auto", seed=3, gpu_memory_utilization=0.7), log=_quiet)
    assert stand_in.calls["LLM"] == {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": "float32",
                                     "seed": 3, "gpu_memory_utilization": 0.7}
    eos = tokenizer.eos_token_id
    expected_rows = []
    for (requests, params), start in zip(stand_in.calls["generate"], range(0, len(PROMPTS), 2)):
        encoded = encode_prompts(tokenizer, PROMPTS[start:start + 2])
        assert requests == [{"prompt_token_ids": ids} for ids in encoded]  # the chat-templated prompt tokens
        assert params == [dict(n=K, seed=shard_seed(3, start) + j, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0,
                               repetition_penalty=1.0, max_tokens=MAX_NEW, stop_token_ids=[eos])
                          for j in range(len(encoded))]
        for j, ids in enumerate(encoded):
            expected_rows += HFSampler(model, tokenizer).sample([ids], num_samples=K, max_new_tokens=MAX_NEW,
                                                                seed=shard_seed(3, start) + j)
    rows = read_jsonl(out)
    assert [r["completion"] for r in rows] == [tokenizer.decode(c.token_ids, skip_special_tokens=True)
                                               for c in expected_rows]
    assert [r["finish_reason"] for r in rows] == [c.finish_reason for c in expected_rows]
    assert json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])["prompt_index"] == 0


def test_vllm_missing_is_a_clear_error(saved, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ValueError, match=r"pip install \"shiq\[vllm\]\""):
        resolve_backend("vllm", "cuda")
    with pytest.raises(ValueError, match="pip install"):
        VLLMSampler("model", saved[1])
    assert resolve_backend("auto", "cuda") == "hf" and resolve_backend("auto", "cpu") == "hf"
    args = ["generate", "--model", str(saved[0]), "--prompts", str(saved[3]), "--num-completions", "1",
            "--out", str(tmp_path / "r.jsonl"), "--backend", "vllm"]
    assert main(args) == 1
    assert "vllm backend needs vLLM" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(saved, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "no_prompt.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    base = ["generate", "--model", str(saved[0]), "--num-completions", "2"]
    cases = [
        (["--prompts", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--prompts", str(tmp_path / "empty.txt")], "no prompt found"),
        (["--prompts", str(tmp_path / "empty.jsonl")], "the file is empty"),
        (["--prompts", str(tmp_path / "no_prompt.jsonl")], "row 0 has no 'prompt' field"),
        (["--prompts", str(saved[3]), "--temperature", "0"], "temperature must be a finite number > 0"),
        (["--prompts", str(saved[3]), "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
        (["--prompts", str(saved[3]), "--device", "cuda:7"], "no CUDA device"),
        (["--prompts", str(saved[3]), "--out", str(tmp_path / "r.csv")], "must be a .jsonl file"),
    ]
    for extra, message in cases:
        out = [] if "--out" in extra else ["--out", str(tmp_path / "r.jsonl")]
        assert main(base + extra + out) in (1, 2), extra  # 2: the option checks, 1: the job (before any work)
        err = capsys.readouterr().err
        assert err.startswith("shiq-llm: error:") and len(err.strip().splitlines()) == 1
        assert re.search(message, err), (extra, err)
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("command", ["generate", "score", "evaluate"])
def test_every_option_has_help(command):
    from dataclasses import fields

    for cls in commands()[command].options:
        for f in fields(cls):
            assert len(f.metadata.get("help", "")) > 10, (command, f.name)
