"""Sparse upcycling: turn a dense Llama-architecture model into an MoE whose experts copy the dense MLP.

:func:`upcycle_llama_to_mixtral` makes every layer an MoE (Mixtral); :func:`upcycle_llama_to_qwen2_moe` only the top
layers (Qwen2-MoE's ``mlp_only_layers`` keeps the others dense, with the Llama MLP's exact weights).
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.initialization import no_init_weights


def _mixtral_config(llama_config, num_experts: int, top_k: int) -> MixtralConfig:
    c = llama_config
    if c.attention_bias or c.mlp_bias:
        raise ValueError(
            "Mixtral has no attention or MLP biases; cannot upcycle a Llama config with "
            f"attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias}."
        )
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,  # Mixtral's per-expert width
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.attention_dropout,
        rope_parameters=copy.deepcopy(c.rope_parameters),
        sliding_window=None,  # Llama attends to the full context
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,  # jitter would break the equivalence in training mode
        attn_implementation=c._attn_implementation,
    )


@torch.no_grad()
def upcycle_llama_to_mixtral(
    llama_model: LlamaForCausalLM,
    num_experts: int = 4,
    top_k: int = 2,
    expert_noise: float = 0.0,
    router_std: float = 0.0,
    seed: int = 0,
) -> MixtralForCausalLM:
    """Build a ``MixtralForCausalLM`` from ``llama_model``: every expert is a copy of the layer's dense MLP.

    Embeddings, attention, norms and lm_head are copied (tied embeddings stay tied). The router weights are zero
    (``router_std=0``) or N(0, router_std). Mixtral renormalises its top-k weights to sum to 1, so with identical
    experts the output equals the dense model's up to fp rounding, whatever the router picks.

    ``expert_noise`` adds N(0, (expert_noise * rms(W))^2) independently to each expert's copy of each dense weight
    ``W`` to break the symmetry between experts; the output is then only approximately the dense one.
    The global RNG is left untouched.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"Need 1 <= top_k <= num_experts; got top_k={top_k}, num_experts={num_experts}.")
    config = _mixtral_config(llama_model.config, num_experts, top_k)
    return _upcycle(llama_model, config, MixtralForCausalLM, expert_noise, router_std, seed)


def _qwen2_moe_config(llama_config, num_experts: int, top_k: int, moe_layers: int) -> Qwen2MoeConfig:
    c = llama_config
    if c.attention_bias or c.mlp_bias:
        raise ValueError(
            "upcycle_llama_to_qwen2_moe: the Llama config has attention or MLP biases "
            f"(attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias}); only bias-free Llamas are supported."
        )
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        raise ValueError(
            f"upcycle_llama_to_qwen2_moe: Qwen2-MoE's head_dim is hidden_size // num_attention_heads "
            f"({c.hidden_size // c.num_attention_heads}), the Llama's is {c.head_dim}; use the Mixtral upcycling."
        )
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,  # the dense layers' MLP
        moe_intermediate_size=c.intermediate_size,  # each routed expert: a full copy of the dense MLP
        shared_expert_intermediate_size=0,  # no shared expert: its output is exactly 0
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.attention_dropout,
        rope_parameters=copy.deepcopy(c.rope_parameters),
        use_sliding_window=False,
        qkv_bias=False,  # Llama's q/k/v have no bias
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,  # top-k weights sum to 1: identical experts give the dense output
        decoder_sparse_step=1,
        mlp_only_layers=list(range(c.num_hidden_layers - moe_layers)),
        attn_implementation=c._attn_implementation,
    )


@torch.no_grad()
def upcycle_llama_to_qwen2_moe(
    llama_model: LlamaForCausalLM,
    num_experts: int = 4,
    top_k: int = 2,
    moe_layers: int = 6,
    router_std: float = 0.0,
    seed: int = 0,
) -> Qwen2MoeForCausalLM:
    """A ``Qwen2MoeForCausalLM`` from ``llama_model`` whose top ``moe_layers`` decoder layers are MoE layers of
    ``num_experts`` copies of the dense MLP (routers zero or N(0, router_std)); the layers below keep the dense MLP.

    No shared expert (width 0, its gate zero) and top-k weights renormalised, so at this point the model computes
    the Llama's function; q/k/v biases are off. The global RNG is left untouched.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"Need 1 <= top_k <= num_experts; got top_k={top_k}, num_experts={num_experts}.")
    if not 1 <= moe_layers <= llama_model.config.num_hidden_layers:
        raise ValueError(
            f"moe_layers must lie in [1, {llama_model.config.num_hidden_layers}] (the model's layers), got {moe_layers}"
        )
    config = _qwen2_moe_config(llama_model.config, num_experts, top_k, moe_layers)
    return _upcycle(llama_model, config, Qwen2MoeForCausalLM, 0.0, router_std, seed)


def _upcycle(llama_model, config, model_class, expert_noise: float, router_std: float, seed: int):
    """``model_class(config)`` holding the Llama's weights: MoE layers' experts copy the dense MLP (plus noise)."""
    if expert_noise < 0 or router_std < 0:
        raise ValueError(f"expert_noise and router_std must be >= 0; got {expert_noise}, {router_std}.")
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    ref = llama_model.get_input_embeddings().weight
    # Every tensor is overwritten below, so skip the random init (seconds for a 100M+ model).
    with no_init_weights():
        moe = model_class(config)
    moe.to(device=ref.device, dtype=ref.dtype)
    moe.tie_weights()  # no_init_weights also skipped the tying done in post_init; no-op unless tie_word_embeddings

    targets = moe.state_dict(keep_vars=True)
    written: set[str] = set()

    def write(name: str, value: torch.Tensor) -> None:
        targets[name].copy_(value)
        written.add(name)

    with torch.random.fork_rng(devices=[ref.device] if ref.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, tensor in llama_model.state_dict().items():
            prefix, sep, proj = name.rpartition(".mlp.")
            if not sep or name in targets:  # embeddings, attention, norms, lm_head, dense MLPs: same names
                write(name, tensor)
            elif proj == "gate_proj.weight":
                mlp = llama_model.get_submodule(f"{prefix}.mlp")
                # The fused experts hold gate and up as [E, 2I, H], gate rows first (chunk(2) in their forward).
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
                write(f"{prefix}.mlp.experts.gate_up_proj", gate_up.expand(num_experts, -1, -1))
                _add_noise(targets[f"{prefix}.mlp.experts.gate_up_proj"], gate_up, expert_noise)
                write(f"{prefix}.mlp.gate.weight", torch.randn_like(targets[f"{prefix}.mlp.gate.weight"]) * router_std)
            elif proj == "down_proj.weight":
                write(f"{prefix}.mlp.experts.down_proj", tensor.expand(num_experts, -1, -1))
                _add_noise(targets[f"{prefix}.mlp.experts.down_proj"], tensor, expert_noise)
    for name in targets:  # Qwen2-MoE's shared expert: width 0 and a zero gate, so it adds exactly nothing
        if ".mlp.shared_expert" in name:
            write(name, torch.zeros_like(targets[name]))
    if config.tie_word_embeddings:
        written.add("lm_head.weight")  # shares storage with embed_tokens
    if missing := set(targets) - written:
        raise RuntimeError(f"Upcycling left MoE tensors unset (unsupported Llama variant?): {sorted(missing)}")

    moe.generation_config = copy.deepcopy(llama_model.generation_config)
    return moe.train(llama_model.training)


def _add_noise(experts: torch.Tensor, dense: torch.Tensor, scale: float) -> None:
    if scale:
        rms = dense.float().pow(2).mean().sqrt().item()
        experts.add_(torch.randn_like(experts) * (scale * rms))
