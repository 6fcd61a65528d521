"""Tiny random MoE models built from transformers' own classes, a registry of MoE layouts, and router capture.

Layout in transformers 5.x (read from ``models/<family>/modeling_<family>.py``), shared by every family here:

* a decoder layer's feed-forward is ``layer.mlp``; in MoE layers that is a sparse block holding the router at
  ``mlp.gate`` and the routed experts at ``mlp.experts``;
* the router is a bare module with a ``weight`` Parameter ``[E, H]`` (not an ``nn.Linear``) whose forward returns
  ``(router_logits [tokens, E], top_k_weights [tokens, k], top_k_index [tokens, k])`` over flattened tokens;
* the experts are one module with fused 3-D Parameters ``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows)
  and ``down_proj [E, H, I]``; expert ``e`` computes ``down_proj[e] @ (act(gate) * up)``;
* the experts' forward is chosen at call time from ``config._experts_implementation`` ("eager" loop,
  "batched_mm", or the default "grouped_mm"), see :mod:`unlearn_fast.models.hvp_mode`.

Per family, the differences are in routing, shared experts, and which layers stay dense; see :data:`MOE_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from unlearn_fast.models.structure import decoder_layers, unwrap
from unlearn_fast.ops.moe_routing import Routing

# Router types.
SOFTMAX_TOPK = "softmax_topk"
"""softmax over all experts, then top-k; top-k weights renormalised to sum to 1 or not (see ``renormalizes``)."""
SOFTMAX_GROUP_LIMITED = "softmax_group_limited"
"""DeepSeek-V2: softmax; with ``topk_method="group_limited_greedy"`` experts are split into ``n_group`` groups, the
``topk_group`` groups with the highest max score are kept, top-k is taken inside them; weights are never
renormalised, only scaled by ``routed_scaling_factor``. ``topk_method="greedy"`` is plain softmax-top-k."""
SIGMOID_BIAS_GROUP_LIMITED = "sigmoid_bias_group_limited"
"""DeepSeek-V3: sigmoid scores; expert *selection* uses ``scores + gate.e_score_correction_bias`` (a buffer), groups
ranked by the sum of their top-2 biased scores, ``topk_group`` groups kept; the *weights* are the unbiased sigmoid
scores of the chosen experts, renormalised if ``norm_topk_prob``, then scaled by ``routed_scaling_factor``."""


def _no_dense_layers(config: PreTrainedConfig) -> list[int]:
    return []


def _qwen_dense_layers(config: PreTrainedConfig) -> list[int]:
    # Mirrors Qwen{2,3}MoeDecoderLayer.__init__: dense if listed in mlp_only_layers or off the sparse step.
    return [
        i
        for i in range(config.num_hidden_layers)
        if i in (config.mlp_only_layers or []) or config.num_experts == 0 or (i + 1) % config.decoder_sparse_step != 0
    ]


def _deepseek_dense_layers(config: PreTrainedConfig) -> list[int]:
    # Mirrors DeepseekV{2,3}DecoderLayer.__init__: the first `first_k_dense_replace` layers keep a dense MLP.
    return list(range(min(config.first_k_dense_replace or 0, config.num_hidden_layers)))


@dataclass(frozen=True)
class MoEFamily:
    """Where a family keeps its MoE parts in a decoder layer, and how it routes.

    Attribute paths are relative to one decoder layer (``model.model.layers[i]``).
    """

    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    router_type: str
    renormalize: bool | str
    """True/False, or the name of the config flag deciding it (``norm_topk_prob``)."""
    shared_expert: str | None
    """Attribute of the MoE block holding the always-on shared expert MLP, or None."""
    dense_layers: Callable[[PreTrainedConfig], list[int]]
    """Indices of decoder layers whose ``mlp`` is a plain dense MLP (no router)."""
    moe_block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"

    def renormalizes(self, config: PreTrainedConfig) -> bool:
        """Whether the top-k routing weights are renormalised to sum to 1 under ``config``."""
        if isinstance(self.renormalize, bool):
            return self.renormalize
        return bool(getattr(config, self.renormalize))


MOE_FAMILIES: dict[str, MoEFamily] = {
    # Router: softmax(fp32) -> top-k -> always renormalised. No shared expert, every layer MoE.
    "mixtral": MoEFamily(MixtralConfig, MixtralForCausalLM, SOFTMAX_TOPK, True, None, _no_dense_layers),
    # Router: softmax -> top-k, renormalised iff norm_topk_prob. Shared expert `mlp.shared_expert` (dense MLP) scaled
    # by sigmoid(`mlp.shared_expert_gate`(x)), a Linear(H, 1). Dense layers: mlp_only_layers / decoder_sparse_step.
    "qwen2_moe": MoEFamily(
        Qwen2MoeConfig, Qwen2MoeForCausalLM, SOFTMAX_TOPK, "norm_topk_prob", "shared_expert", _qwen_dense_layers
    ),
    # As Qwen2-MoE without the shared expert.
    "qwen3_moe": MoEFamily(
        Qwen3MoeConfig, Qwen3MoeForCausalLM, SOFTMAX_TOPK, "norm_topk_prob", None, _qwen_dense_layers
    ),
    # Router: softmax -> top-k, renormalised iff norm_topk_prob. No shared expert, every layer MoE.
    "olmoe": MoEFamily(OlmoeConfig, OlmoeForCausalLM, SOFTMAX_TOPK, "norm_topk_prob", None, _no_dense_layers),
    # Shared experts `mlp.shared_experts` (one dense MLP of width moe_intermediate_size * n_shared_experts), added
    # unweighted. The router ignores norm_topk_prob (the config field exists but is unused).
    "deepseek_v2": MoEFamily(
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        SOFTMAX_GROUP_LIMITED,
        False,
        "shared_experts",
        _deepseek_dense_layers,
    ),
    "deepseek_v3": MoEFamily(
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        SIGMOID_BIAS_GROUP_LIMITED,
        "norm_topk_prob",
        "shared_experts",
        _deepseek_dense_layers,
    ),
}


def _family_config(
    family: str, num_layers: int, hidden_size: int, num_experts: int, top_k: int, vocab_size: int
) -> PreTrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        num_experts_per_tok=top_k,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    expert_width = hidden_size  # narrower than the dense MLP, as in the real fine-grained MoEs
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=num_experts)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        moe = dict(num_experts=num_experts)
        # Match the released checkpoints: Qwen1.5/2-MoE and OLMoE do not renormalise, Qwen3-MoE does.
        moe["norm_topk_prob"] = family == "qwen3_moe"
        if family == "qwen2_moe":
            moe.update(moe_intermediate_size=expert_width, shared_expert_intermediate_size=2 * hidden_size)
        elif family == "qwen3_moe":
            moe.update(moe_intermediate_size=expert_width, head_dim=hidden_size // 4)
        return MOE_FAMILIES[family].config_class(**common, **moe)
    # DeepSeek: MLA attention with tiny low-rank projections, one dense first layer (when there is room for an MoE
    # one after it), and group-limited routing over 2 groups of which 1 is kept.
    n_group, topk_group = 2, 1
    if num_experts % n_group or top_k > topk_group * num_experts // n_group:
        raise ValueError(
            f"{family}: group-limited routing over {n_group} groups keeping {topk_group} needs num_experts divisible "
            f"by {n_group} and top_k <= {topk_group * num_experts // n_group}; got num_experts={num_experts}, "
            f"top_k={top_k}. Use e.g. num_experts=4, top_k=2."
        )
    deepseek = dict(
        num_key_value_heads=common["num_attention_heads"],  # MLA decompresses full K/V per head: no GQA
        n_routed_experts=num_experts,
        n_shared_experts=1,
        moe_intermediate_size=expert_width,
        first_k_dense_replace=1 if num_layers > 1 else 0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=n_group,
        topk_group=topk_group,
    )
    common = {**common, **deepseek}
    if family == "deepseek_v2":
        return DeepseekV2Config(**common, topk_method="group_limited_greedy")
    return DeepseekV3Config(**common, norm_topk_prob=True)


def tiny_moe(
    family: str,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_experts: int = 4,
    top_k: int = 2,
    vocab_size: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    """A small randomly initialised ``<Family>ForCausalLM`` (fp32, eager attention) for tests.

    ``hidden_size`` must be a multiple of 4 (4 attention heads, 2 KV heads). The global RNG is left untouched.
    """
    if family not in MOE_FAMILIES:
        raise ValueError(f"Unknown MoE family {family!r}; choose one of {sorted(MOE_FAMILIES)}.")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (4 attention heads); got {hidden_size}.")
    config = _family_config(family, num_layers, hidden_size, num_experts, top_k, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MOE_FAMILIES[family].model_class(config)
        if family == "deepseek_v3":
            # The correction bias initialises to 0; make it non-zero so the biased-selection path is exercised.
            for _, block in moe_layers(model):
                block.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model.eval()


def moe_family(model: nn.Module) -> MoEFamily:
    """The registry entry for ``model`` (PEFT wrappers are looked through)."""
    model_type = unwrap(model).config.model_type
    if model_type not in MOE_FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a registered MoE family; known: {sorted(MOE_FAMILIES)}.")
    return MOE_FAMILIES[model_type]


def moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(layer_index, moe_block)`` for every sparse decoder layer; dense ones (e.g. DeepSeek's first) are skipped.

    The block holds the router at ``.gate`` and the experts at ``.experts``.
    """
    family = moe_family(model)
    base = unwrap(model)
    dense = set(family.dense_layers(base.config))
    return [(i, getattr(layer, family.moe_block)) for i, layer in enumerate(decoder_layers(base)) if i not in dense]


def routing_spec(model: nn.Module, layer_idx: int) -> tuple[Routing, torch.Tensor | None]:
    """The routing of MoE layer ``layer_idx`` and its selection bias (None unless DeepSeek-V3).

    Read from the family's router code in transformers 5.x (``<Family>TopKRouter.forward``):

    * Mixtral: softmax, top-k, always renormalised;
    * Qwen2-MoE, Qwen3-MoE, OLMoE: softmax, top-k, renormalised iff ``norm_topk_prob``;
    * DeepSeek-V2: softmax; ``topk_method="group_limited_greedy"`` keeps the ``topk_group`` of
      ``n_group`` groups with the highest max score, ``"greedy"`` is plain top-k; never
      renormalised (``norm_topk_prob`` is unused); gates times ``routed_scaling_factor``;
    * DeepSeek-V3: sigmoid; selection by score + ``gate.e_score_correction_bias``, groups ranked by
      the sum of their top-2 biased scores; the unbiased scores renormalised iff ``norm_topk_prob``
      with denominator ``sum + 1e-20``; times ``routed_scaling_factor``.

    The bias returned is the layer's live buffer (not a copy).
    """
    family = moe_family(model)
    blocks = dict(moe_layers(model))
    if layer_idx not in blocks:
        raise ValueError(f"layer {layer_idx} is not an MoE layer; MoE layers: {sorted(blocks)}")
    config = unwrap(model).config
    top_k = int(config.num_experts_per_tok)
    router = getattr(blocks[layer_idx], family.router)
    if family.router_type == SOFTMAX_TOPK:
        return Routing(top_k=top_k, renormalize=family.renormalizes(config)), None
    scaling = float(config.routed_scaling_factor)
    if family.router_type == SOFTMAX_GROUP_LIMITED:
        if config.topk_method == "greedy":
            return Routing(top_k=top_k, scaling=scaling), None
        if config.topk_method == "group_limited_greedy":
            return Routing(
                top_k=top_k,
                scaling=scaling,
                n_group=int(config.n_group),
                topk_group=int(config.topk_group),
                group_score="max",
            ), None
        raise ValueError(f"deepseek_v2: topk_method {config.topk_method!r} is not routed by transformers' router")
    if family.router_type == SIGMOID_BIAS_GROUP_LIMITED:
        renormalize = family.renormalizes(config)
        routing = Routing(
            top_k=top_k,
            score="sigmoid",
            renormalize=renormalize,
            scaling=scaling,
            n_group=int(config.n_group),
            topk_group=int(config.topk_group),
            group_score="top2_sum",
            renorm_eps=1e-20 if renormalize else 0.0,
        )
        return routing, router.e_score_correction_bias
    raise ValueError(f"unknown router type {family.router_type!r}")


@contextmanager
def capture_router_logits(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Record each MoE layer's router logits ``[batch*seq, E]`` during forwards run inside the block.

    The dict is filled in place (last forward wins); the logits keep their autograd graph, so they can be
    differentiated. Hooks are removed on exit.
    """
    family = moe_family(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> None:
            captured[layer_idx] = output[0]  # routers return (logits, top_k_weights, top_k_index)

        return hook

    try:
        for layer_idx, block in moe_layers(model):
            router = getattr(block, family.router)
            handles.append(router.register_forward_hook(make_hook(layer_idx)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attribution_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[int, torch.Tensor]:
    """Run one forward and return ``{layer_index: router_logits [tokens, E]}`` for every MoE layer.

    ``tokens`` are the non-padding positions (``attention_mask == 1``) in row-major ``[batch, seq]`` order. Call under
    ``torch.no_grad()`` unless gradients of the logits are wanted.
    """
    with capture_router_logits(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if attention_mask is None:
        return captured
    keep = attention_mask.reshape(-1).bool()
    return {layer_idx: logits[keep] for layer_idx, logits in captured.items()}


@contextmanager
def masked_expert(model: nn.Module, expert: int) -> Iterator[None]:
    """Inside the block, routed expert ``expert`` of every MoE layer cannot be chosen: its router logit is
    ``-inf``, so each token's top-k falls to the next experts and their gates are recomputed by the family's
    rule (:func:`routing_spec`; renormalised where the family renormalises). Hooks are removed on exit."""
    from unlearn_fast.ops.moe_routing import routing_gates

    family = moe_family(model)
    handles = []

    def make_hook(layer_idx: int) -> Callable:
        routing, bias = routing_spec(model, layer_idx)

        def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            logits = output[0].clone()
            logits[:, expert] = float("-inf")
            gates = routing_gates(logits, routing, bias)
            index = gates.topk(routing.top_k, dim=-1).indices
            return logits, gates.gather(-1, index).to(output[1].dtype), index.to(output[2].dtype)

        return hook

    try:
        for layer_idx, block in moe_layers(model):
            num_experts = getattr(block, family.experts).gate_up_proj.shape[0]
            if not 0 <= expert < num_experts:
                raise ValueError(f"masked_expert: expert must lie in [0, {num_experts}), got {expert}")
            router = getattr(block, family.router)
            handles.append(router.register_forward_hook(make_hook(layer_idx)))
        yield
    finally:
        for handle in handles:
            handle.remove()
