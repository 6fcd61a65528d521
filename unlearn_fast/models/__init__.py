"""Model loading, tiny MoE builders and router capture, Llama->Mixtral upcycling, and HVP-safe kernel switching."""

from .checks import check_finite_weights
from .hvp_mode import HVP_SAFE_EXPERTS, hvp_safe
from .expert_training import SingleExpert, train_experts, train_single_expert
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
    moe_family,
    moe_layers,
    routing_spec,
    tiny_moe,
)
from .prefix_cache import PrefixCache, prefix_cached
from .upcycle import upcycle_llama_to_mixtral

__all__ = [
    "HVP_SAFE_EXPERTS",
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
    "hvp_safe",
    "load",
    "load_model",
    "load_smollm2_tokenizer",
    "smollm2_directory",
    "load_smollm2",
    "load_smollm2_moe",
    "moe_family",
    "moe_layers",
    "prefix_cached",
    "routing_spec",
    "tiny_moe",
    "train_experts",
    "train_single_expert",
    "upcycle_llama_to_mixtral",
]
