"""Model adapters: a causal LM as the fused LM-head ops see it, model loading, tiny MoE builders
and router capture, Llama->Mixtral / Qwen2-MoE upcycling, prefix caching and HVP-safe kernel switching."""

from .causal_lm import (
    HeadInputs,
    SequenceLogProbs,
    decoder_hidden,
    eval_mode,
    head_inputs,
    labelled_logprob_sum,
    logit_scale,
    sequence_logprobs,
)
from .checks import check_finite_weights
from .expert_training import SingleExpert, train_experts, train_single_expert
from .hvp_mode import HVP_SAFE_EXPERTS, hvp_safe
from .loaders import (
    SMOLLM2_MOE,
    load,
    load_model,
    load_smollm2,
    load_smollm2_moe,
    load_smollm2_tokenizer,
    smollm2_directory,
)
from .moe import (
    MOE_FAMILIES,
    SIGMOID_BIAS_GROUP_LIMITED,
    SOFTMAX_GROUP_LIMITED,
    SOFTMAX_TOPK,
    MoEFamily,
    attribution_forward,
    capture_router_logits,
    masked_expert,
    moe_family,
    moe_layers,
    routing_spec,
    tiny_moe,
)
from .prefix_cache import PrefixCache, input_key, prefix_cached
from .upcycle import upcycle_llama_to_mixtral, upcycle_llama_to_qwen2_moe

__all__ = [
    "HVP_SAFE_EXPERTS",
    "HeadInputs",
    "SequenceLogProbs",
    "SMOLLM2_MOE",
    "PrefixCache",
    "SingleExpert",
    "MOE_FAMILIES",
    "SIGMOID_BIAS_GROUP_LIMITED",
    "SOFTMAX_GROUP_LIMITED",
    "SOFTMAX_TOPK",
    "MoEFamily",
    "attribution_forward",
    "capture_router_logits",
    "check_finite_weights",
    "decoder_hidden",
    "eval_mode",
    "head_inputs",
    "input_key",
    "labelled_logprob_sum",
    "logit_scale",
    "hvp_safe",
    "load",
    "load_model",
    "load_smollm2_tokenizer",
    "smollm2_directory",
    "load_smollm2",
    "load_smollm2_moe",
    "masked_expert",
    "moe_family",
    "moe_layers",
    "prefix_cached",
    "routing_spec",
    "sequence_logprobs",
    "tiny_moe",
    "train_experts",
    "train_single_expert",
    "upcycle_llama_to_mixtral",
    "upcycle_llama_to_qwen2_moe",
]
