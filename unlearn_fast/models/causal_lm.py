"""A Hugging Face causal LM as the fused LM-head ops see it.

The ops of :mod:`unlearn_fast.ops` (``token_logprobs``, ``token_logprob_sum``, ``ce_curvature``)
take the last hidden states of the scored positions, the LM head's weight and bias, and the
labels those positions predict; they never materialise the [tokens, vocab] logits, which for a
large vocabulary are the biggest tensor of a training step. This module runs the decoder alone
(not ``model(...)``, whose head would compute every logit), gathers those inputs with the
labels shifted (position t predicts token t+1) and folds in the constant logit scale of the
families that have one (Cohere, Granite), so that every likelihood of the library is one call
to :func:`sequence_logprobs` or :func:`labelled_logprob_sum`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from unlearn_fast.data import IGNORE_INDEX
from unlearn_fast.models.checks import check_token_ids
from unlearn_fast.ops import TokenLogProbSum, token_logprob_sum, token_logprobs


class HeadInputs(NamedTuple):
    hidden: torch.Tensor  # [T, H] hidden states of the T scored positions, logit scale applied
    weight: torch.Tensor  # [V, H] LM-head weight
    bias: torch.Tensor | None  # [V], logit scale applied
    labels: torch.Tensor  # [T] the tokens they predict
    scored: torch.Tensor  # [B, S-1] bool, where labels[:, 1:] is scored


class SequenceLogProbs(NamedTuple):
    sum_logp: torch.Tensor  # [B] sum of log p over the labelled tokens of each sequence
    n_tokens: torch.Tensor  # [B] number of labelled tokens
    token_logp: torch.Tensor  # [B, S-1] log p of labels[:, 1:]; 0 where the label is ignored


def logit_scale(config: Any) -> float:
    """The constant some model families multiply their logits by after the LM head."""
    if getattr(config, "final_logit_softcapping", None) is not None:
        # tanh soft-capping is not a linear map of the hidden state, so the fused op cannot apply it.
        raise ValueError(
            f"{type(config).__name__} soft-caps its logits (final_logit_softcapping), which the "
            "fused LM-head ops do not support; use a model family without logit soft-capping"
        )
    # Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling.
    multiplier = getattr(config, "logit_scale", None) or 1.0
    divisor = getattr(config, "logits_scaling", None) or 1.0
    return multiplier / divisor


def decoder_hidden(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states [B, S, H], without the LM head: the one decoder forward
    of every likelihood (and of the activation-based objectives, which hook its layers)."""
    decoder = model.get_decoder()
    if decoder is model:
        raise ValueError(f"{type(model).__name__} exposes no separate decoder (get_decoder()); a causal LM is needed")
    check_token_ids(model, batch["input_ids"])
    input_device = model.get_input_embeddings().weight.device
    attention_mask = batch.get("attention_mask")
    return decoder(
        input_ids=batch["input_ids"].to(input_device),
        attention_mask=None if attention_mask is None else attention_mask.to(input_device),
        use_cache=False,
    ).last_hidden_state


def head_inputs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> HeadInputs:
    """Run the decoder once and gather what the fused LM-head op needs for the labelled tokens."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} exposes no LM head (get_output_embeddings()); a causal LM is needed")
    scale = logit_scale(model.config)
    hidden = decoder_hidden(model, batch)

    # Position t predicts token t+1.
    targets = batch["labels"][:, 1:].to(hidden.device)
    scored = targets != IGNORE_INDEX
    # Autocast may hand back hidden states in a lower precision than the head's weight.
    positions = hidden[:, :-1][scored].to(head.weight.dtype)
    if scale != 1.0:
        positions = positions * scale  # (h W^T + b) s == (s h) W^T + s b
    bias = getattr(head, "bias", None)
    if bias is not None and scale != 1.0:
        bias = bias * scale
    return HeadInputs(positions, head.weight, bias, targets[scored], scored)


def sequence_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> SequenceLogProbs:
    """Log-probabilities of the labelled tokens of a batch under a causal LM.

    ``batch`` holds ``input_ids`` [B, S], ``labels`` [B, S] (aligned with the inputs, -100 where
    not scored, as made by :func:`~unlearn_fast.data.collate`) and optionally ``attention_mask``.
    The decoder runs once; only the scored positions go through the fused LM-head op. Works with
    or without gradients (unlearning objectives differentiate through it).
    """
    x = head_inputs(model, batch)
    logp = token_logprobs(x.hidden, x.weight, x.labels, x.bias).logp
    token_logp = logp.new_zeros(x.scored.shape).masked_scatter(x.scored, logp)
    return SequenceLogProbs(token_logp.sum(-1), x.scored.sum(-1), token_logp)


def labelled_logprob_sum(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], scale: float) -> TokenLogProbSum:
    """``scale * (sum of log p over the labelled tokens of the batch)``, differentiable.

    For losses linear in the token log-probs (cross-entropy is ``scale = -1 / n_tokens``,
    gradient ascent ``+1 / n_tokens``): :func:`~unlearn_fast.ops.token_logprob_sum` forms the
    LM-head gradient during the forward pass, one [tokens, vocab] matmul fewer than
    :func:`sequence_logprobs`. Bake the loss's sign and weight into ``scale``, so that backward
    receives a gradient of 1 and no [V, H] gradient copy is scaled. ``logp`` of the result holds
    the detached log-probs of the labelled tokens, flattened.
    """
    x = head_inputs(model, batch)
    # float64 weights: the op casts them to its accumulation dtype, never to a low-precision one.
    weights = torch.full(x.labels.shape, scale, dtype=torch.float64, device=x.labels.device)
    return token_logprob_sum(x.hidden, x.weight, x.labels, weights, x.bias)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; restores every module's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training
