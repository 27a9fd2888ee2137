"""Sampling completions from a causal LM: prompts → prompt token ids → completions, with two backends.

Both backends take the prompt token ids of :func:`encode_prompts` (exactly the prompt tokens the training
data has: chat template and generation prompt, no doubled BOS) and return :class:`Completion` records (the
generated token ids up to and including the stop token, and whether it stopped):

* :class:`HFSampler` — ``model.generate`` on batches of left-padded prompts, on the model's device and dtype;
* :class:`VLLMSampler` — ``vllm.LLM(...).generate`` with one ``SamplingParams(n=K, seed=…)`` per prompt
  (vLLM is an optional extra, ``pip install "shiq[vllm]"``, imported only here and only when used).

By default both sample **exactly from π**: temperature 1 and every logits processor off (no top-k, top-p,
min-p, repetition penalty). ``temperature`` / ``top_p`` change that, and then the samples are not π's.
A sample stops at the tokenizer's EOS (``finished``) or after ``max_new_tokens`` tokens.

Determinism: a call with the same ``seed`` returns the same samples. ``HFSampler`` draws batch ``k`` under
``torch.manual_seed(seed + k)`` (so the samples also depend on ``batch_size``); ``VLLMSampler`` seeds
prompt ``j`` of the call with ``seed + j``.

Notation used for tensor shapes: ``B`` sequences, ``P`` prompt positions, ``T`` generated positions,
``L = P + T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "Samples",
    "Completion",
    "encode_prompts",
    "left_pad",
    "sampling_config",
    "response_mask_from_generated",
    "HFSampler",
    "VLLMSampler",
    "import_vllm",
    "check_sampling",
    "assemble_samples",
    "generate",
]


@dataclass
class Completion:
    """One sampled completion: ``token_ids`` are the generated tokens up to and including the stop token
    (``finished``) or the ``max_new_tokens`` generated ones (not finished)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    finished: bool

    @property
    def finish_reason(self) -> str:
        """``"stop"`` (ended with EOS) or ``"length"`` (cut at ``max_new_tokens``), as vLLM and OpenAI say."""
        return "stop" if self.finished else "length"


@dataclass
class Samples:
    """Completions sampled from a model, as text and as padded token tensors.

    prompt_index: (B,) int64 index of each sample's prompt in the prompt list (prompt-major order).
    input_ids: (B, L) left-padded prompt followed by the generated tokens (``pad_token_id`` after EOS).
    attention_mask: (B, L) int64, 1 on prompt tokens and response tokens.
    response_mask: (B, L) bool, True on generated tokens up to and including the first EOS.
    completions: B strings, the decoded response without special tokens.
    finished: (B,) bool, True when the sample ended with EOS (False: cut at ``max_new_tokens``).
    """

    prompt_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    completions: list[str]
    finished: torch.Tensor


def encode_prompts(tokenizer, prompts: Sequence, *, use_chat_template: bool | None = None) -> list[list[int]]:
    """Token ids of the state before the first response token, for each prompt — exactly the prompt tokens
    ``shiq_llm.data.tokenize_rows`` produces for a row with that prompt (chat template and generation prompt,
    or ``[BOS] + tokens(prompt)`` without a template), so generation continues where training data starts.

    prompts: strings, or lists of ``{"role", "content"}`` messages.
    """
    from shiq_llm.data.tokenization import encode_conversation

    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    encoded = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        # A placeholder answer: the tokens before it do not depend on it (segments are tokenised apart).
        example = encode_conversation(
            messages + [{"role": "assistant", "content": "x"}],
            [0.0],
            len(messages),
            tokenizer,
            use_chat_template=use_chat_template,
            where=f"prompt {i}",
        )
        encoded.append(example.input_ids[: example.response_mask.index(True)])
    return encoded


def response_mask_from_generated(generated: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) generated ids → (B, T) bool, True up to and including each row's first EOS (all True without one)."""
    is_eos = generated == eos_token_id  # (B, T)
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS strictly before t
    return eos_before == 0


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → (B, P) int64 ids left-padded with ``pad_token_id`` and their (B, P) attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.int64)  # (B, P)
    mask = torch.zeros(len(sequences), length, dtype=torch.int64)
    for b, s in enumerate(sequences):
        ids[b, length - len(s) :] = torch.as_tensor(s, dtype=torch.int64)
        mask[b, length - len(s) :] = 1
    return ids, mask


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError unless ``temperature`` is a finite number > 0 and ``top_p`` lies in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sampling_config(tokenizer, max_new_tokens: int, *, temperature: float = 1.0, top_p: float = 1.0):
    """A transformers ``GenerationConfig`` for ancestral sampling with every logits processor off but
    ``temperature`` and ``top_p`` (both 1 by default: the samples are then exactly from π)."""
    from transformers import GenerationConfig

    check_sampling(temperature, top_p)
    return GenerationConfig(
        do_sample=True,
        temperature=float(temperature),
        top_k=0,
        top_p=float(top_p),
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _check_counts(num_samples: int, max_new_tokens: int, batch_size: int = 1) -> None:
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            "num_samples, max_new_tokens and batch_size must be >= 1, "
            f"got {num_samples}, {max_new_tokens}, {batch_size}"
        )


def _check_tokenizer(tokenizer) -> None:
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs an EOS token and a pad token to generate (set tokenizer.pad_token)")


class HFSampler:
    """Samples with transformers' ``generate`` in batches of ``batch_size`` left-padded sequences (prompt-major:
    the ``K`` samples of a prompt are ``K`` rows), on the model's device and in its dtype."""

    name = "hf"

    def __init__(self, model, tokenizer, *, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64):
        _check_tokenizer(tokenizer)
        check_sampling(temperature, top_p)
        _check_counts(1, 1, batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.batch_size = temperature, top_p, batch_size

    @torch.no_grad()
    def sample(
        self, prompt_ids: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int, seed: int
    ) -> list[Completion]:
        """``num_samples`` completions of each prompt (prompt-major); batch k under ``manual_seed(seed + k)``
        inside ``torch.random.fork_rng`` (the caller's RNG state is untouched)."""
        _check_counts(num_samples, max_new_tokens)
        tokenizer, model = self.tokenizer, self.model
        config = sampling_config(tokenizer, max_new_tokens, temperature=self.temperature, top_p=self.top_p)
        order = [(i, j) for i in range(len(prompt_ids)) for j in range(num_samples)]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out: list[Completion] = []
        for k, start in enumerate(range(0, len(order), self.batch_size)):
            chunk = order[start : start + self.batch_size]
            ids, mask = left_pad([prompt_ids[i] for i, _ in chunk], tokenizer.pad_token_id)  # (b, P)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + k)
                sequences = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
                )
            generated = sequences[:, ids.shape[1] :].cpu()  # (b, T_k)
            keep = response_mask_from_generated(generated, tokenizer.eos_token_id)  # (b, T_k)
            for b, (i, j) in enumerate(chunk):
                tokens = generated[b][keep[b]].tolist()
                finished = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
                out.append(Completion(i, j, tokens, finished))
        model.train(was_training)
        return out


def import_vllm():
    """The ``vllm`` module, or a ValueError saying how to install it (it is an optional extra)."""
    try:
        import vllm
    except ImportError as error:
        raise ValueError(
            f"the vllm backend needs vLLM, which is not installed ({error}); install it on a CUDA machine with "
            "`pip install \"shiq[vllm]\"` (or `pip install vllm`), or use --backend hf"
        ) from None
    return vllm


class VLLMSampler:
    """Samples with ``vllm.LLM(model, tokenizer, dtype, seed).generate``: one request per prompt, given as
    its token ids (``{"prompt_token_ids": ids}``, so the chat template is the one :func:`encode_prompts`
    applied), with ``SamplingParams(n=K, seed=seed + j, temperature, top_p, top_k=-1, min_p=0,
    repetition_penalty=1, max_tokens, stop_token_ids=[EOS])``. A completion's ``token_ids`` include the stop
    token (vLLM keeps it in ``CompletionOutput.token_ids``); ``finish_reason == "stop"`` means finished.

    ``llm``: an existing ``vllm.LLM`` (tests, or to share one engine); otherwise one is built from ``model``.
    Extra keyword arguments go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``).
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        tokenizer,
        *,
        dtype: str = "auto",
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        llm=None,
        **llm_kwargs,
    ):
        _check_tokenizer(tokenizer)
        check_sampling(temperature, top_p)
        self.vllm = import_vllm()
        self.tokenizer, self.temperature, self.top_p = tokenizer, temperature, top_p
        self.llm = llm if llm is not None else self.vllm.LLM(
            model=str(model), tokenizer=str(model), dtype=dtype, seed=seed, **llm_kwargs
        )

    def sample(
        self, prompt_ids: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int, seed: int
    ) -> list[Completion]:
        """``num_samples`` completions of each prompt (prompt-major); prompt j of this call seeded ``seed + j``."""
        _check_counts(num_samples, max_new_tokens)
        eos = self.tokenizer.eos_token_id
        params = [
            self.vllm.SamplingParams(
                n=num_samples, seed=seed + j, temperature=float(self.temperature), top_p=float(self.top_p),
                top_k=-1, min_p=0.0, repetition_penalty=1.0, max_tokens=max_new_tokens, stop_token_ids=[eos],
            )
            for j in range(len(prompt_ids))
        ]
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompt_ids)} prompts")
        out: list[Completion] = []
        for i, result in enumerate(outputs):  # vLLM returns the results in the order of the requests
            if len(result.outputs) != num_samples:
                raise RuntimeError(f"vLLM returned {len(result.outputs)} samples of prompt {i}, not {num_samples}")
            for j, sample in enumerate(result.outputs):
                out.append(Completion(i, j, list(sample.token_ids), sample.finish_reason == "stop"))
        return out


def assemble_samples(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion], tokenizer) -> Samples:
    """Completions → one :class:`Samples` batch: prompts left-padded, responses right-padded."""
    pad = tokenizer.pad_token_id
    rows = [(list(prompt_ids[c.prompt_index]), c.token_ids) for c in completions]
    prompt_len = max(len(p) for p, _ in rows)
    response_len = max(len(r) for _, r in rows)
    n = len(rows)
    input_ids = torch.full((n, prompt_len + response_len), pad, dtype=torch.int64)  # (B, L)
    attention_mask = torch.zeros(n, prompt_len + response_len, dtype=torch.int64)
    response_mask = torch.zeros(n, prompt_len + response_len, dtype=torch.bool)
    for b, (prompt, response) in enumerate(rows):
        input_ids[b, prompt_len - len(prompt) : prompt_len] = torch.as_tensor(prompt, dtype=torch.int64)
        input_ids[b, prompt_len : prompt_len + len(response)] = torch.as_tensor(response, dtype=torch.int64)
        attention_mask[b, prompt_len - len(prompt) : prompt_len + len(response)] = 1
        response_mask[b, prompt_len : prompt_len + len(response)] = True
    return Samples(
        prompt_index=torch.as_tensor([c.prompt_index for c in completions], dtype=torch.int64),
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        completions=tokenizer.batch_decode([r for _, r in rows], skip_special_tokens=True),
        finished=torch.as_tensor([c.finished for c in completions], dtype=torch.bool),
    )


def generate(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    sampler=None,
) -> Samples:
    """Sample ``num_samples`` completions of each prompt from ``model`` (temperature 1, no truncation of the
    distribution), in batches of ``batch_size`` left-padded sequences; returns :class:`Samples`.

    Deterministic given ``seed`` (and ``batch_size``): see :class:`HFSampler`. ``sampler``: another sampler
    with the same ``sample`` method (e.g. a :class:`VLLMSampler`) instead of ``HFSampler(model, …)``.
    """
    _check_counts(num_samples, max_new_tokens, batch_size)
    if sampler is None:
        sampler = HFSampler(model, tokenizer, batch_size=batch_size)
    encoded = encode_prompts(tokenizer, prompts)
    completions = sampler.sample(encoded, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed)
    return assemble_samples(encoded, completions, tokenizer)
