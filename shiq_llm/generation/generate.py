"""``shiq-llm generate``: K completions per prompt sampled from a model, written as resumable JSONL rows.

    shiq-llm generate --model M --prompts prompts.jsonl --num-completions 8 --out rows.jsonl

Each output row is a canonical ``{"prompt", "completion"}`` row (``shiq_llm.data.rows``; ``shiq-llm score`` adds
the reward) with its provenance: ``model``, ``seed`` (the run's), ``finish_reason`` (``"stop"``: ended with
EOS; ``"length"``: cut at ``max_new_tokens``), ``prompt_index`` (in the prompt list), ``sample_index``
(0 … K − 1) and ``num_tokens`` (generated tokens, EOS included). Rows are in prompt-major order.

By default the completions are pure samples of the model, π itself (temperature 1, no top-k / top-p:
``shiq_llm.generation.sampling``), as on-policy data and evaluation need. Backends: ``hf`` (transformers ``generate``
on the chosen device and dtype) or ``vllm`` (optional extra), ``auto`` picking vLLM on a GPU when installed.

**Resumable.** The prompts are cut into shards of ``shard_size`` prompts (``shiq_llm.storage.shards``), each written
atomically once sampled. Shard ``[a, b)`` is sampled with the seed :func:`shard_seed` ``(seed, a)``, so it does
not depend on what ran before it: a killed run re-run with the same command samples only the missing shards
and its final file equals an uninterrupted run's, with no row duplicated or lost. The final file appears
atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from shiq_toy.options import option

__all__ = ["GenerateConfig", "BACKENDS", "resolve_backend", "make_sampler", "shard_seed", "completion_rows",
           "generate_rows", "check_generate_config"]

#: ``--backend`` choices; ``auto`` is :func:`resolve_backend`'s choice.
BACKENDS = ("auto", "hf", "vllm")


@dataclass
class GenerateConfig:
    """Arguments of ``shiq-llm generate`` (``--help`` prints the same)."""

    model: str = option(help='The model sampled from: a hub name or a local directory (its tokenizer and chat '
                        'template are used).', aliases=("model_name_or_path",))
    prompts: str = option(help="Prompt source: 'synthetic', a .txt file (one prompt per line), a .jsonl / .json / "
                          '.parquet file or a hub dataset of rows with a prompt field '
                          '(``shiq_llm.data.prompts.load_prompts``).', path="data")
    out: str = option(help='Output .jsonl file of rows; shards are kept in OUT.parts/ until the end.', aliases=("output_dir",), path="out_file")
    num_completions: int = option(4, 'Completions sampled per prompt (K).')
    max_new_tokens: int = option(256, 'Generation budget per completion; a completion cut there has finish_reason '
                                 "'length'.")
    temperature: float = option(1.0, 'Sampling temperature; 1 samples from π itself.')
    top_p: float = option(1.0, 'Nucleus sampling mass; 1 samples from π itself.')
    seed: int = option(0, 'Run seed: shard [a, b) is sampled with shard_seed(seed, a).')
    backend: str = option("auto", "'hf' (transformers), 'vllm' (needs the vllm extra and a GPU) or 'auto' (vllm on a "
                          'GPU when installed).')
    device: str = option("auto", "torch device of the hf backend ('auto': cuda when available, else cpu).")
    dtype: str = option("auto", 'Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), float32, '
                        'bfloat16, float16.')
    batch_size: int = option(64, 'hf backend: sequences per generate call (the samples depend on it, as on the '
                             'seed).')
    shard_size: int = option(64, 'Prompts per shard (the unit of resumption).')
    split: str | None = option(None, "Split of a hub dataset (default 'train') or of the synthetic prompts (train, "
                               "eval, all; default 'train').")
    prompt_field: str | None = option(None, "Field of the rows holding the prompt (default 'prompt', else the "
                                      'messages before the first assistant one).')
    format: str | None = option(None, 'Adapter (shiq_llm.data.adapters: paired, ultrafeedback, hh, bfcl, stepwise) applied to '
                                'the rows before reading prompts.', aliases=("data_format",))
    format_options: dict[str, Any] = option(default_factory=dict, help='Keyword arguments of the adapter.', aliases=("format_option", "data_format_options"))
    gpu_memory_utilization: float = option(0.9, 'vllm backend: fraction of the GPU memory vLLM may take.')
    overwrite: bool = option(False, 'Replace an existing OUT (and discard unfinished shards of another run).')
    progress: bool = option(True, 'Show a progress bar (completions/s and tokens/s).')


def resolve_backend(backend: str, device) -> str:
    """``"auto"`` → ``"vllm"`` on a CUDA device when vLLM is importable, else ``"hf"``. ``"vllm"`` → ValueError
    when vLLM is missing (``shiq_llm.generation.sampling.import_vllm``) or the device is not a whole CUDA device set."""
    import torch

    from shiq_llm.generation.sampling import import_vllm

    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "hf"
        try:
            import_vllm()
        except ValueError:
            return "hf"
        return "vllm"
    if backend == "vllm":
        import_vllm()
        if device.type != "cuda" or device.index is not None:
            raise ValueError(f"--backend vllm places the model on the visible GPUs itself; use --device auto or cuda "
                             f"(choose GPUs with CUDA_VISIBLE_DEVICES), got {device}")
    return backend


def make_sampler(backend: str, model: str, tokenizer, *, device, dtype, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 64, seed: int = 0, gpu_memory_utilization: float = 0.9):
    """A ``shiq_llm.generation.sampling`` sampler of ``model`` for a resolved backend (``"hf"`` or ``"vllm"``)."""
    import torch

    from shiq_llm.core.models import check_tokenizer_fits_model, load_causal_lm
    from shiq_llm.generation.sampling import HFSampler, VLLMSampler

    if backend == "vllm":
        return VLLMSampler(model, tokenizer, dtype=str(dtype).removeprefix("torch."), seed=seed,
                           temperature=temperature, top_p=top_p, gpu_memory_utilization=gpu_memory_utilization)
    lm = load_causal_lm(model, device=torch.device(device), dtype=dtype)
    check_tokenizer_fits_model(tokenizer, lm)
    return HFSampler(lm, tokenizer, temperature=temperature, top_p=top_p, batch_size=batch_size)


def shard_seed(seed: int, start: int) -> int:
    """The sampling seed of the shard that starts at prompt ``start``: a 31-bit hash of ``(seed, start)``
    (``numpy.random.SeedSequence``), so shards draw independent streams whatever ran before."""
    import numpy as np

    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0] >> 1)


def completion_rows(prompts: Sequence, completions, tokenizer, *, model: str, seed: int,
                    first_prompt: int = 0) -> list[dict]:
    """``shiq_llm.generation.sampling.Completion`` records → output rows (module docstring); ``prompts[c.prompt_index]``
    is each completion's prompt, numbered ``first_prompt + c.prompt_index`` in the rows."""
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    return [
        {
            "prompt": prompts[c.prompt_index],
            "completion": text,
            "model": model,
            "seed": seed,
            "finish_reason": c.finish_reason,
            "prompt_index": first_prompt + c.prompt_index,
            "sample_index": c.sample_index,
            "num_tokens": len(c.token_ids),
        }
        for c, text in zip(completions, texts)
    ]


def _fingerprint(prompts: Sequence) -> str:
    return hashlib.sha256(json.dumps(list(prompts), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _manifest(config: GenerateConfig, prompts: Sequence, backend: str, dtype) -> dict[str, Any]:
    """What determines the rows: a re-run with a different value is refused (``shiq_llm.storage.shards``)."""
    return {
        "command": "generate", "model": config.model, "prompts": config.prompts, "prompts_sha256": _fingerprint(prompts),
        "num_completions": config.num_completions, "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature, "top_p": config.top_p, "seed": config.seed, "backend": backend,
        "dtype": str(dtype).removeprefix("torch."), "batch_size": config.batch_size if backend == "hf" else None,
    }


def check_generate_config(config: GenerateConfig) -> None:
    """ValueError naming the first bad option of ``config`` (before any work)."""
    for name in ("num_completions", "max_new_tokens", "batch_size", "shard_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if not 0 < config.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {config.gpu_memory_utilization}")
    if not str(config.out).endswith(".jsonl"):
        raise ValueError(f"--out must be a .jsonl file, got {config.out!r}")


def generate_rows(config: GenerateConfig, *, on_shard: Callable[[int, int], None] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``shiq-llm generate`` (module docstring); returns a summary (out, rows, seconds, rates).

    on_shard: called as ``on_shard(start, stop)`` after each shard is written (progress hooks, tests).
    """
    from tqdm.auto import tqdm

    from shiq_llm.core.models import load_tokenizer, resolve_device, resolve_dtype
    from shiq_llm.data.prompts import load_prompts
    from shiq_llm.generation.sampling import check_sampling, encode_prompts
    from shiq_llm.storage.shards import ShardedOutput

    check_generate_config(config)
    check_sampling(config.temperature, config.top_p)
    prompts = load_prompts(config.prompts, split=config.split, prompt_field=config.prompt_field,
                           format=config.format, format_options=config.format_options or None,
                           default_split="train")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    backend = resolve_backend(config.backend, device)
    k = config.num_completions
    output = ShardedOutput(config.out, _manifest(config, prompts, backend, dtype), total=len(prompts),
                           shard_size=config.shard_size, overwrite=config.overwrite)
    pending = output.start()
    started = time.perf_counter()
    tokens = sampled = 0
    if pending:
        tokenizer = load_tokenizer(config.model)
        encoded = encode_prompts(tokenizer, prompts)  # chat template as in training; errors name the prompt
        sampler = make_sampler(backend, config.model, tokenizer, device=device, dtype=dtype,
                               temperature=config.temperature, top_p=config.top_p, batch_size=config.batch_size,
                               seed=config.seed, gpu_memory_utilization=config.gpu_memory_utilization)
        sampling_started = time.perf_counter()  # rates exclude loading the model
        done = len(prompts) - sum(stop - start for start, stop in pending)  # prompts of finished shards
        bar = tqdm(total=len(prompts) * k, initial=done * k, unit="completion", desc="generate",
                   disable=not config.progress)
        if done:
            log(f"resuming: {len(output.ranges()) - len(pending)} of {len(output.ranges())} shards already in "
                f"{output.parts}")
        for start, stop in pending:
            completions = sampler.sample(encoded[start:stop], num_samples=k, max_new_tokens=config.max_new_tokens,
                                         seed=shard_seed(config.seed, start))
            rows = completion_rows(prompts[start:stop], completions, tokenizer, model=config.model,
                                   seed=config.seed, first_prompt=start)
            output.write(start, stop, rows)
            sampled += len(rows)
            tokens += sum(r["num_tokens"] for r in rows)
            bar.update(len(rows))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - sampling_started, 1e-9):.0f} tokens/s")
            if on_shard is not None:
                on_shard(start, stop)
        bar.close()
    count = output.finish()
    seconds = time.perf_counter() - started
    sampling = time.perf_counter() - sampling_started if pending else 0.0
    summary = {"out": str(output.out), "rows": count, "prompts": len(prompts), "backend": backend,
               "sampled_now": sampled, "seconds": seconds, "completions_per_s": sampled / max(sampling, 1e-9),
               "tokens_per_s": tokens / max(sampling, 1e-9)}
    log(f"wrote {count} rows ({len(prompts)} prompts × {k}) to {output.out}; sampled {sampled} now with {backend} "
        f"in {seconds:.1f} s ({summary['completions_per_s']:.1f} completions/s, {summary['tokens_per_s']:.0f} "
        "tokens/s while sampling)")
    return summary
