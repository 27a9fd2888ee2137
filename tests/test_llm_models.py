"""shiq_llm.core.models: model / tokenizer sources checked before ``from_pretrained`` (one-line errors instead of a
Hugging Face traceback) and the tokenizer-model fit (ids that would mean other tokens are refused; an
embedding padded to a round size is not)."""

from __future__ import annotations

from types import SimpleNamespace

import huggingface_hub
import pytest

from shiq_llm.cli import main
from shiq_llm.core.models import (
    EMBEDDING_PAD_MULTIPLE,
    MAX_UNUSED_EMBEDDING_FRACTION,
    build_tokenizer,
    check_tokenizer_fits_model,
    resolve_model_source,
    tiny_causal_lm,
)
from shiq_llm.train.config import ModelArguments
from shiq_llm.train.loading import load_model_and_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()  # 320 tokens; pad 0, BOS 1, EOS 2 (as tiny_causal_lm(int) sets them)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A saved tiny model + tokenizer, a directory without a model, and one with a broken config.json."""
    root = tmp_path_factory.mktemp("models")
    tiny_causal_lm(tokenizer, hidden_size=16, num_heads=2).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"model_type": "llama",')
    (root / "untyped").mkdir()
    (root / "untyped" / "config.json").write_text('{"hidden_size": 16}')
    return root


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_a_saved_model_and_a_hub_name_resolve_to_themselves(saved, monkeypatch):
    assert resolve_model_source(saved / "model") == str(saved / "model")
    assert resolve_model_source(str(saved / "model"), kind="tokenizer") == str(saved / "model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_source("some-org/some-model") == "some-org/some-model"  # left to the hub


@pytest.mark.parametrize("kind", ["model", "tokenizer"])
def test_bad_local_sources_are_one_line_errors(saved, monkeypatch, kind):
    monkeypatch.chdir(saved)
    cases = [
        ("./nope", rf"^{kind} path ./nope does not exist$"),
        (str(saved / "nope"), rf"^{kind} path {saved / 'nope'} does not exist$"),
        ("a/b/c", rf"^{kind} path a/b/c does not exist$"),  # not a hub name (two slashes): a path
        (str(saved / "empty"), rf"^{kind} path {saved / 'empty'} holds no {kind} \(no "),
        (str(saved / "model" / "config.json"), rf"^{kind} path .*config.json is a file, not a directory"),
    ]
    if kind == "model":
        cases += [
            ("broken", r"^model path broken has a broken config.json: not valid JSON \(Expecting"),
            ("untyped", r"^model path untyped has a broken config.json: no 'model_type' key"),
        ]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve_model_source(name, kind=kind)


def test_hub_names_offline_say_that_they_need_the_network(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("nope", "data/reference"):
        with pytest.raises(ValueError, match=rf"^model {name}: no such local directory, and not in the Hugging Face "
                                             r"cache; HF_HUB_OFFLINE is set, so hub names need the network"):
            resolve_model_source(name)


def test_load_model_and_tokenizer_refuses_bad_sources_in_one_line(saved, tmp_path):
    config = ModelArguments(model_name_or_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"^model path .*nope does not exist$"):
        load_model_and_tokenizer(config, out=tmp_path)
    config = ModelArguments(model_name_or_path=str(saved / "model"), tokenizer_name_or_path=str(saved / "empty"))
    with pytest.raises(ValueError, match=r"^tokenizer path .*empty holds no tokenizer"):
        load_model_and_tokenizer(config, out=tmp_path)


def test_evaluate_cli_names_a_bad_model_or_reference(saved, capsys):
    good = str(saved / "model")
    for args, message in [
        (["--model", "./nope", "--ref", good], "shiq-llm: error: model path ./nope does not exist"),
        (["--model", good, "--ref", str(saved / "broken")], f"shiq-llm: error: model path {saved / 'broken'} has a broken config.json"),
    ]:
        assert main(["evaluate", *args, "--num-samples", "1"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------------
# Tokenizer fits model
# --------------------------------------------------------------------------------------------------


def _model(rows: int, **ids):
    model = tiny_causal_lm(rows, hidden_size=16, num_heads=2)  # BOS 1, EOS 2, pad 0 like the tokenizer
    for key, value in ids.items():
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    return model


def test_an_embedding_padded_to_a_round_size_is_accepted(tokenizer):
    n = len(tokenizer)
    for rows in (n, 384, 320 + 7):  # exact; rounded up to 128 (and 64); a few reserved rows
        check_tokenizer_fits_model(tokenizer, _model(rows))
    assert EMBEDDING_PAD_MULTIPLE == 128 and MAX_UNUSED_EMBEDDING_FRACTION == 1 / 32


@pytest.mark.parametrize("rows", [385, 640, 50257])
def test_a_tokenizer_smaller_than_the_embedding_beyond_padding_is_refused(tokenizer, rows):
    with pytest.raises(ValueError, match=rf"tokenizer has 320 tokens but the model's embedding has {rows} rows: "
                                         rf"{rows - 320} unused rows"):
        check_tokenizer_fits_model(tokenizer, _model(rows))


def test_a_tokenizer_larger_than_the_embedding_is_refused(tokenizer):
    with pytest.raises(ValueError, match="tokenizer has 320 tokens but the model's embedding has 319 rows"):
        check_tokenizer_fits_model(tokenizer, _model(319))


@pytest.mark.parametrize("kind", ["bos", "eos"])
def test_special_ids_that_differ_from_the_models_are_refused(tokenizer, kind):
    with pytest.raises(ValueError, match=rf"the tokenizer's {kind} token id is {getattr(tokenizer, kind + '_token_id')} "
                                         rf"but the model's config says 7"):
        check_tokenizer_fits_model(tokenizer, _model(320, **{f"{kind}_token_id": 7}))


def test_special_ids_the_model_lists_or_does_not_set_are_accepted(tokenizer):
    check_tokenizer_fits_model(tokenizer, _model(320, eos_token_id=[7, 2]))  # several EOS ids (Llama 3)
    check_tokenizer_fits_model(tokenizer, _model(320, bos_token_id=None))  # the model names no BOS (Qwen)
    model = _model(320, eos_token_id=7)
    model.generation_config.eos_token_id = [7, 2]  # the generation config lists the tokenizer's EOS
    check_tokenizer_fits_model(tokenizer, model)
    check_tokenizer_fits_model(tokenizer, _model(320, pad_token_id=5))  # pad: masked out, never a token read


def test_a_special_id_beyond_the_embedding_is_refused(tokenizer):
    class Stub(SimpleNamespace):  # 320 tokens, but a pad id beyond them (a non-contiguous vocabulary)
        def __len__(self):
            return 320

    stub = Stub(bos_token_id=1, eos_token_id=2, pad_token_id=400, all_special_ids=[0, 1, 2, 400])
    with pytest.raises(ValueError, match=r"the tokenizer's special token id 400 is outside the model's embedding of 320"):
        check_tokenizer_fits_model(stub, _model(320))
