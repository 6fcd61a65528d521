"""Train one routed expert of one MoE layer (UOE) without gradients for the other experts' fused weights.

Transformers keeps a layer's experts as fused 3-D Parameters ``gate_up_proj [E,2I,H]`` and ``down_proj [E,H,I]``;
plain autograd through them allocates ``[E,2I,H]`` and ``[E,H,I]`` gradients even when only one expert trains.
:func:`train_single_expert` swaps the layer's experts forward, for the duration of a ``with`` block, for one that

* runs every routed expert ``i != e*`` on its tokens without autograd (its outputs are constants) and multiplies
  them by the routing weights ``top_k_weights``, which keep their graph, so the router still gets its full gradient;
* runs ``e*`` (or each of several: :func:`train_experts`) through :func:`unlearn_fast.ops.expert_ffn` on trainable
  leaf copies of its slices,
  :attr:`SingleExpert.gate_up` ``[2I,H]`` and :attr:`SingleExpert.down` ``[H,I]``, times its routing weights.

The block's output is that of the original experts module (up to float summation order); the fused Parameters have
``requires_grad=False`` inside the block, so their ``.grad`` stays None. Shared experts (Qwen2-MoE, DeepSeek) live
outside ``experts`` and are untouched.

The gradient that flows back into the experts' *input* ``hidden_states`` is ``e*``'s part only (the other experts
are constants). UOE needs no more: its trainable parameters are ``e*`` and the router of the same layer, and the
router's weight gradient reads ``hidden_states`` but does not pass through its gradient. A warning says so when the
input does require a gradient (something below the layer trains).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from unlearn_fast.models.moe import moe_family, moe_layers
from unlearn_fast.ops.expert_ffn import expert_ffn


def expert_activation(experts: nn.Module) -> str:
    """The :data:`unlearn_fast.ops.expert_ffn.ACTIVATIONS` name of ``experts.act_fn`` (read from the module, which is
    what its forward calls, rather than from ``config.hidden_act``)."""
    from transformers.activations import GELUTanh, NewGELUActivation, SiLUActivation

    act = getattr(experts, "act_fn", None)
    if isinstance(act, (SiLUActivation, nn.SiLU)):
        return "silu"
    if isinstance(act, (GELUTanh, NewGELUActivation)) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    raise ValueError(
        f"train_single_expert: the experts' activation {type(act).__name__} is not supported by expert_ffn "
        "(supported: SiLU, and GELU with the tanh approximation)"
    )


def _check_layout(experts: nn.Module) -> None:
    """The fused layout of every family in MOE_FAMILIES: [gate; up] concatenated, not transposed, no biases."""
    from transformers.integrations.moe import _default_apply_gate

    problems = [
        name
        for name, ok in (
            ("gate_up_proj [E,2I,H]", isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)),
            ("down_proj [E,H,I]", isinstance(getattr(experts, "down_proj", None), torch.Tensor)),
            ("has_gate", getattr(experts, "has_gate", True)),
            ("no biases", not getattr(experts, "has_bias", False)),
            ("not transposed", not getattr(experts, "is_transposed", False)),
            ("gate and up concatenated", getattr(experts, "is_concatenated", True)),
            ("no post-expert norm", not getattr(experts, "has_post_expert_norm", False)),
            ("the default gate", getattr(type(experts), "_apply_gate", _default_apply_gate) is _default_apply_gate),
        )
        if not ok
    ]
    if problems:
        raise ValueError(
            f"train_single_expert: {type(experts).__name__} does not have the fused experts layout this wrapper "
            f"supports; missing: {', '.join(problems)}"
        )


@dataclass(eq=False)
class SingleExpert:
    """The trainable copy of expert ``expert`` of MoE layer ``layer_idx`` (see :func:`train_single_expert`)."""

    layer_idx: int
    expert: int
    experts: nn.Module
    """The layer's experts module (holding the fused ``gate_up_proj`` / ``down_proj``)."""
    router: nn.Module
    """The layer's router (``mlp.gate``): UOE trains it too; its weight keeps its own ``requires_grad``."""
    gate_up: nn.Parameter
    """``[2I, H]``, a leaf copy of ``experts.gate_up_proj[expert]``."""
    down: nn.Parameter
    """``[H, I]``, a leaf copy of ``experts.down_proj[expert]``."""
    activation: str

    def parameters(self) -> list[nn.Parameter]:
        """The expert's trainable leaves ``[gate_up, down]`` (hand them, and the router's, to an optimizer)."""
        return [self.gate_up, self.down]

    @torch.no_grad()
    def commit(self) -> None:
        """Copy the trained slices back into the fused Parameters, in place (the ``with`` block does it on exit)."""
        self.experts.gate_up_proj[self.expert].copy_(self.gate_up)
        self.experts.down_proj[self.expert].copy_(self.down)


def _experts_forward(trained: list[SingleExpert], warned: list[bool]):
    """The experts' forward with the ``trained`` experts on their leaf copies, every other expert frozen."""
    experts, layer_idx = trained[0].experts, trained[0].layer_idx
    trainable = {se.expert for se in trained}
    whose = f"expert {trained[0].expert}'s" if len(trained) == 1 else f"experts {sorted(trainable)}'"

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.requires_grad and torch.is_grad_enabled() and not warned[0]:
            warned[0] = True
            warnings.warn(
                f"train_single_expert: the input of layer {layer_idx}'s experts requires a gradient; only {whose} "
                "part of it flows back (the other experts are constants). Freeze the layers below.",
                stacklevel=2,
            )
        tokens, k = top_k_index.shape
        weights = top_k_weights.to(hidden_states.dtype)
        # Outputs of the frozen experts per (token, slot): constants; zero at the trained experts' slots and at
        # sentinel slots (index >= E, expert parallelism), which the original forward skips too.
        frozen = hidden_states.new_zeros(tokens, k, hidden_states.shape[-1])
        with torch.no_grad():
            x = hidden_states.detach()
            for i in torch.unique(top_k_index).tolist():
                if i in trainable or not 0 <= i < experts.gate_up_proj.shape[0]:
                    continue
                token_idx, slot = torch.where(top_k_index == i)
                frozen[token_idx, slot] = expert_ffn(
                    x, token_idx, experts.gate_up_proj[i], experts.down_proj[i], trained[0].activation
                )
        out = (frozen * weights.unsqueeze(-1)).sum(dim=1)  # the router's gradient through the frozen experts
        for se in trained:
            token_idx, slot = torch.where(top_k_index == se.expert)
            y = expert_ffn(hidden_states, token_idx, se.gate_up, se.down, se.activation)
            out = out.index_add(0, token_idx, y * weights[token_idx, slot].unsqueeze(-1))
        return out

    return forward


@contextmanager
def train_single_expert(model: nn.Module, layer_idx: int, expert: int) -> Iterator[SingleExpert]:
    """Inside the block, MoE layer ``layer_idx`` trains expert ``expert`` through leaf copies of its slices.

    ``layer_idx`` is a decoder-layer index of a sparse layer (see :func:`unlearn_fast.models.moe.moe_layers`). Yields a
    :class:`SingleExpert`; optimise ``se.parameters()`` (and the router's weight, ``se.router.weight``). The fused
    ``gate_up_proj`` / ``down_proj`` have ``requires_grad=False`` inside the block. On a normal exit the trained
    slices are copied back into them (as :meth:`SingleExpert.commit` does at any time); on every exit, exceptions
    included, the original forward and ``requires_grad`` flags come back. After an exception the fused weights keep
    their values as of the last commit (a step interrupted half-way is not written back).
    """
    with train_experts(model, layer_idx, [expert]) as (se,):
        yield se


@contextmanager
def train_experts(model: nn.Module, layer_idx: int, experts_to_train: Sequence[int]) -> Iterator[list[SingleExpert]]:
    """:func:`train_single_expert` for several experts of one layer at once (UOE's top-M): yields one
    :class:`SingleExpert` per expert, in the order given. One forward serves them all; the blocks cannot be nested
    (each would treat the other's experts as frozen constants)."""
    family = moe_family(model)
    layers = dict(moe_layers(model))
    if layer_idx not in layers:
        raise ValueError(f"train_single_expert: layer {layer_idx} is not an MoE layer; MoE layers: {sorted(layers)}")
    block = layers[layer_idx]
    experts = getattr(block, family.experts)
    _check_layout(experts)
    num_experts = experts.gate_up_proj.shape[0]
    chosen = list(experts_to_train)
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= e < num_experts for e in chosen):
        raise ValueError(
            f"train_single_expert: every expert must lie in [0, {num_experts}) and appear once, got {chosen}"
        )
    activation = expert_activation(experts)
    trained = [
        SingleExpert(
            layer_idx=layer_idx,
            expert=e,
            experts=experts,
            router=getattr(block, family.router),
            gate_up=nn.Parameter(experts.gate_up_proj[e].detach().clone()),
            down=nn.Parameter(experts.down_proj[e].detach().clone()),
            activation=activation,
        )
        for e in chosen
    ]
    fused = (experts.gate_up_proj, experts.down_proj)
    requires_grad = [p.requires_grad for p in fused]
    own_forward = experts.__dict__.get("forward")  # an instance-level forward to restore, if one was set
    try:
        for p in fused:
            p.requires_grad_(False)
        experts.forward = _experts_forward(trained, [False])
        yield trained
        for se in trained:
            se.commit()
    finally:
        if own_forward is None:
            del experts.forward
        else:
            experts.forward = own_forward
        for p, flag in zip(fused, requires_grad):
            p.requires_grad_(flag)
