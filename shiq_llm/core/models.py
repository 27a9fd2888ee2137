"""Models and tokenizers: checking where real ones come from and that they fit, and building tiny ones locally.

:func:`resolve_model_source` checks a user-given model or tokenizer (a local directory or a hub name) before
``from_pretrained``, so that a missing directory, one without a model, a broken ``config.json`` or a hub name
while offline is one line naming the path, not a Hugging Face traceback. :func:`check_tokenizer_fits_model`
refuses a tokenizer whose ids would mean other tokens to the model.

The tiny builders exist for tests, benchmarks and the embedded default job: a byte-level BPE tokenizer
trained in memory on a small corpus, and GPT-2 / Llama models constructed from a config with random weights,
dropout off, and BOS/EOS/pad ids taken from the tokenizer (GPT-2's config defaults to 50256 otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

#: Files of which one marks a directory as a model (a full model, or a peft adapter) / as a tokenizer.
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")

#: Embeddings are often rounded up for speed: rows beyond ``len(tokenizer)`` up to the next multiple of this
#: (which covers rounding to 8, 16, 32 or 64 too) are padding, never looked up.
EMBEDDING_PAD_MULTIPLE = 128
#: Some models also reserve rows for tokens not (yet) in their tokenizer: Qwen2 has 151,646 tokens and 151,936
#: rows (0.2 % unused), DeepSeek-LLM 100,015 and 102,400 (2.3 %). Unused rows up to this fraction of the
#: embedding are accepted too; more means the tokenizer most likely belongs to another model.
MAX_UNUSED_EMBEDDING_FRACTION = 1 / 32

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}

#: A minimal chat template (role headers + EOS after each assistant turn). Used by the tiny tokenizer so that
#: conversational data goes through ``apply_chat_template`` exactly like with a real chat model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "a language model reads its logits as soft q values of a regularised decision process. "
    "user: what is the capital of france? assistant: the capital of france is paris. "
    "tool: {\"name\": \"get_weather\", \"arguments\": {\"city\": \"paris\"}} "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) [ ] { } , ; : ! ?"
)


def build_tokenizer(corpus: Iterable[str] | None = None, *, vocab_size: int = 320, chat_template: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in memory (deterministic, no downloads).

    Byte-level, so any text round-trips (unknown words fall back to bytes). Special tokens: see
    ``SPECIAL_TOKENS``; role markers ``<|user|>``, ``<|assistant|>``, ``<|system|>``, ``<|tool|>`` are added
    as special tokens so that chat templates tokenise them as single ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    roles = ["<|user|>", "<|assistant|>", "<|system|>", "<|tool|>"]
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")] + roles
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) if corpus is not None else [_DEFAULT_CORPUS] * 4
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": roles})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    tokenizer_or_vocab_size,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool = True,
    max_positions: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small random-weight causal LM built from a config: ``arch`` ∈ {"llama", "gpt2"}.

    Dropout is off, BOS/EOS/pad ids are the tokenizer's (or 1/2/0 given a bare vocabulary size), and the
    weights are drawn under ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards).
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, bos, eos, pad = tokenizer_or_vocab_size, 1, 2, 0
    else:
        tok = tokenizer_or_vocab_size
        vocab_size, bos, eos, pad = len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=tie_word_embeddings)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            attention_dropout=0.0,
            **ids,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **ids,
        )
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def tiny_reward_model(tokenizer_or_vocab_size, *, hidden_size: int = 32, num_layers: int = 1, num_heads: int = 2,
                      num_labels: int = 1, seed: int = 0):
    """A small random-weight ``LlamaForSequenceClassification`` (a reward model when ``num_labels == 1``) built
    from a config, with the tokenizer's pad / BOS / EOS ids (or 0 / 1 / 2 given a bare vocabulary size)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, bos, eos, pad = tokenizer_or_vocab_size, 1, 2, 0
    else:
        tok = tokenizer_or_vocab_size
        vocab_size, bos, eos, pad = len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=512, num_labels=num_labels,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
        torch.nn.init.normal_(model.score.weight, std=1.0)  # rewards of order 1, not 0.02
    return model.eval()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only attended tokens, so left padding does not shift positions.

    attention_mask: (B, L) {0, 1}. Returns (B, L) int64: 0, 1, 2, … from each row's first real token
    (padding positions get 0; they are never attended).
    """
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)


def _model_ids(model, key: str) -> list[int]:
    """The ids ``model.config`` and ``model.generation_config`` give for ``key`` (e.g. ``"eos_token_id"``)."""
    ids: list[int] = []
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(config, key, None)
        ids += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int)]
    return ids


def check_tokenizer_fits_model(tokenizer, model, *, token_ids: Sequence[int] | None = None) -> None:
    """Raise a ValueError when the tokenizer's ids would not mean the model's tokens (both numbers named).

    Refused: ``len(tokenizer)`` > the embedding's rows (ids it cannot look up); fewer tokens than rows beyond
    padding (more unused rows than rounding ``len(tokenizer)`` up to a multiple of ``EMBEDDING_PAD_MULTIPLE``
    or ``MAX_UNUSED_EMBEDDING_FRACTION`` of the embedding: another model's vocabulary); a BOS or EOS id that
    the model's config (or generation config) sets to something else (a list of EOS ids must contain the
    tokenizer's); a special id (pad included) outside the embedding; any of ``token_ids`` outside it. The pad
    id is only range-checked: padded positions are never attended nor scored, and a tokenizer without a pad
    token gets its EOS as pad (``shiq_llm.train.loading``).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    n = len(tokenizer)
    if n > rows:
        raise ValueError(
            f"tokenizer has {n} tokens but the model's embedding has {rows} rows: "
            "this tokenizer does not belong to this model (resize the embeddings or pick the matching tokenizer)"
        )
    padded = -(-n // EMBEDDING_PAD_MULTIPLE) * EMBEDDING_PAD_MULTIPLE
    if rows > padded and rows - n > MAX_UNUSED_EMBEDDING_FRACTION * rows:
        raise ValueError(
            f"tokenizer has {n} tokens but the model's embedding has {rows} rows: {rows - n} unused rows is more "
            f"than padding (to {padded}, a multiple of {EMBEDDING_PAD_MULTIPLE}, or {MAX_UNUSED_EMBEDDING_FRACTION:.1%} "
            "of the embedding), so this tokenizer's ids are most likely another model's tokens (pick the model's own tokenizer)"
        )
    for kind in ("bos", "eos"):
        token_id, expected = getattr(tokenizer, f"{kind}_token_id", None), _model_ids(model, f"{kind}_token_id")
        if token_id is not None and expected and token_id not in expected:
            said = getattr(getattr(model, "config", None), f"{kind}_token_id", None)
            raise ValueError(
                f"the tokenizer's {kind} token id is {token_id} but the model's config says {said if said is not None else expected}: "
                "this tokenizer does not belong to this model (pick the model's own tokenizer)"
            )
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if i is not None]
    if special and max(special) >= rows:
        raise ValueError(f"the tokenizer's special token id {max(special)} is outside the model's embedding of {rows} rows")
    if token_ids is not None and len(token_ids) and max(token_ids) >= rows:
        raise ValueError(f"token id {max(token_ids)} is outside the model's vocabulary of {rows}")


def _is_hub_name(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _broken_json(file: Path, *, need_model_type: bool = False) -> str | None:
    """Why ``file`` is not a usable JSON config, or None."""
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        return f"cannot read it ({error})"
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    if not isinstance(content, dict):
        return f"expected a JSON object, got {type(content).__name__}"
    if need_model_type and "model_type" not in content:
        return "no 'model_type' key (transformers cannot tell which model class to build)"
    return None


def resolve_model_source(name: str | os.PathLike[str], *, kind: str = "model") -> str:
    """Check a model (``kind="model"``) or tokenizer (``kind="tokenizer"``) source; return it for ``from_pretrained``.

    A local directory (``~`` expanded) must hold a model (``MODEL_FILES``, with a readable ``config.json``
    that names its ``model_type``) or a tokenizer (``TOKENIZER_FILES``, its JSON files readable). A name that
    is no directory is a hub name when it has the hub's form (``name`` or ``org/name``), else a path that
    does not exist. A hub name is returned as is, except when ``HF_HUB_OFFLINE`` is set and the Hugging Face
    cache does not hold it. Each failure is a one-line ValueError naming the path and the problem.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if kind not in ("model", "tokenizer"):
        raise ValueError(f"kind must be 'model' or 'tokenizer', got {kind!r}")
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        markers = MODEL_FILES if kind == "model" else TOKENIZER_FILES
        present = [m for m in markers if (path / m).is_file()]
        if not present:
            raise ValueError(f"{kind} path {text} holds no {kind} (no {' / '.join(markers)}; expected a directory "
                             "written by save_pretrained)")
        checked = [m for m in present if m.endswith(".json")]
        for marker in checked:
            problem = _broken_json(path / marker, need_model_type=marker == "config.json")
            if problem is not None:
                raise ValueError(f"{kind} path {text} has a broken {marker}: {problem}")
        return str(path)
    if path.exists():
        raise ValueError(f"{kind} path {text} is a file, not a directory (from_pretrained needs the directory it was "
                         "saved to)")
    if not _is_hub_name(text):
        raise ValueError(f"{kind} path {text} does not exist")
    if constants.HF_HUB_OFFLINE:
        wanted = ("config.json", "adapter_config.json") if kind == "model" else ("tokenizer_config.json", "tokenizer.json")
        if not any(isinstance(try_to_load_from_cache(text, file), str) for file in wanted):
            raise ValueError(f"{kind} {text}: no such local directory, and not in the Hugging Face cache; HF_HUB_OFFLINE "
                             "is set, so hub names need the network (unset it to download, or give a local path)")
    return text


# --------------------------------------------------------------------------------------------------
# Loading models for inference on a chosen device and dtype (generate, score, evaluate)
# --------------------------------------------------------------------------------------------------

#: ``--dtype`` choices of the inference commands; ``auto`` is :func:`resolve_dtype`'s choice.
INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when a GPU is visible, else ``cpu``; any other string is a torch device name
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``). ValueError for an unknown name or a GPU that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` → bfloat16 on a CUDA device that supports it, float32 otherwise; else the named dtype."""
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"--dtype must be one of {INFERENCE_DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(source: str, *, padding_side: str | None = None):
    """``AutoTokenizer.from_pretrained(source)`` with a pad token: its own, else its EOS (ValueError without either)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(source, kind="tokenizer"))
    except OSError as error:  # an unknown hub name, no network
        raise ValueError(f"cannot load the tokenizer of {source!r}: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(source: str, *, device: torch.device, dtype: torch.dtype):
    """``AutoModelForCausalLM.from_pretrained(source, dtype=dtype)`` moved to ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_source(source), dtype=dtype)
    except OSError as error:
        raise ValueError(f"cannot load the model {source!r}: {error}") from error
    return model.to(device).eval()
