import os

# Triton kernels run on CPU tensors only through the interpreter, which must be switched on
# before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from unlearn_fast.backend import ENV_VAR, available_backends  # noqa: E402


def cpu_backends() -> list[str]:
    """The backends that can run on CPU tensors here (the reference is the baseline)."""
    reasons = available_backends()["cpu"]
    return [b for b in ("cpp", "triton") if reasons[b] is None]


def save_tiny_model(path, family: str | None = None):
    """A tiny random model with SmolLM2's tokenizer saved at ``path`` as a user's model directory:
    a Llama, or the MoE ``family`` (``unlearn_fast.models.tiny_moe``). Returns ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn_fast.models import load_smollm2_tokenizer, tiny_moe

    tokenizer = load_smollm2_tokenizer()
    if family is None:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    else:
        model = tiny_moe(family, num_layers=2, hidden_size=16, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend(name): run the ops of this test on one backend."""

    def force(name: str) -> None:
        monkeypatch.setenv(ENV_VAR, name)

    return force
