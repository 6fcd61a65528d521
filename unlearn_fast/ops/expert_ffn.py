"""One MoE expert's gated FFN on the tokens routed to it, with gradients for that expert's weights only.

UOE trains a single expert ``e*`` of one MoE layer. Transformers stores the experts as fused 3-D Parameters
(``gate_up_proj [E,2I,H]``, ``down_proj [E,H,I]``); plain autograd through a slice of them allocates a gradient of
the whole ``[E,2I,H]`` tensor. This op takes one expert's 2-D weights (slices or standalone leaves) and computes,
for ``x = hidden[token_index]``::

    [g | u] = x @ gate_up.T          gate_up [2I,H]: gate rows first, then up rows (transformers' layout)
    y       = (act(g) * u) @ down.T  down [H,I]

returning ``y [N,H]``, differentiable w.r.t. ``hidden`` (the gradient is scatter-added at ``token_index``),
``gate_up`` and ``down``. ``token_index`` may be empty and may repeat a token: each entry is one row of ``y``, and the
gradients of repeated rows add up in ``hidden``'s gradient (``index_add_``: deterministic on the CPU, atomics on a
GPU). Activations: ``"silu"`` (SwiGLU, every MoE family of the library) and ``"gelu_tanh"`` (GeGLU with the tanh
approximation).

Four implementations, one contract (the dispatch rule is unlearn_fast/backend.py): ``reference_expert_ffn`` (plain
PyTorch, the spec), the C++ CPU and CUDA kernels (``torch.ops.unlearn_fast.expert_ffn``: gather and GLU kernels of
our own around ATen GEMMs; the per-element math is csrc/common/expert_ffn.h, shared by both), and Triton
(kernels/expert_ffn.py: the gather fused into the GEMMs' loads, the GLU into the forward GEMM's epilogue). The fast
backends have first-order gradients only; differentiate twice on the reference (``use_backend("reference")``).

Dtypes: float32, float64, float16, bfloat16, one for all three float inputs; the output and gradients have it too.
The GLU math runs in float32 (float64 for float64 inputs); the pre-activations ``[g | u]`` are saved for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn_fast.backend import has_kernel, select_backend

_OP = "expert_ffn"
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
"""The supported activations and their codes in the compiled op (csrc/common/expert_ffn.h)."""
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _activate(activation: str, g: torch.Tensor) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


def reference_expert_ffn(hidden, token_index, gate_up, down, activation: str = "silu") -> torch.Tensor:
    """The specification, in plain PyTorch (differentiable by autograd, to any order)."""
    x = hidden[token_index]
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(_activate(activation, gate) * up, down)


def _check_inputs(hidden, token_index, gate_up, down, activation) -> None:
    """Every backend's input contract, checked once here (the compiled op re-checks for raw calls)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_ffn: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    for name, t in (("hidden", hidden), ("token_index", token_index), ("gate_up", gate_up), ("down", down)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expert_ffn: {name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"expert_ffn: hidden must be [tokens, hidden_size], got shape {tuple(hidden.shape)}")
    size = hidden.shape[1]
    if gate_up.dim() != 2 or gate_up.shape[0] % 2 or gate_up.shape[0] == 0 or gate_up.shape[1] != size:
        raise ValueError(
            f"expert_ffn: gate_up must be [2 * intermediate, hidden_size] = [2I, {size}] with I > 0, "
            f"got shape {tuple(gate_up.shape)}"
        )
    inter = gate_up.shape[0] // 2
    if tuple(down.shape) != (size, inter):
        raise ValueError(
            f"expert_ffn: down must be [hidden_size, intermediate] = [{size}, {inter}], got {tuple(down.shape)}"
        )
    if token_index.dim() != 1 or token_index.dtype != torch.int64:
        raise TypeError(
            f"expert_ffn: token_index must be a 1-D int64 tensor, got {token_index.dtype} of shape "
            f"{tuple(token_index.shape)}"
        )
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"expert_ffn: hidden must be float32, float64, float16 or bfloat16, got {hidden.dtype}")
    if gate_up.dtype != hidden.dtype or down.dtype != hidden.dtype:
        raise TypeError(
            f"expert_ffn: hidden ({hidden.dtype}), gate_up ({gate_up.dtype}) and down ({down.dtype}) must share one "
            "dtype; cast them"
        )
    if not (token_index.device == gate_up.device == down.device == hidden.device):
        raise ValueError(
            f"expert_ffn: all inputs must be on one device, got hidden on {hidden.device}, token_index on "
            f"{token_index.device}, gate_up on {gate_up.device}, down on {down.device}"
        )
    for name, t in (("hidden", hidden), ("token_index", token_index), ("gate_up", gate_up), ("down", down)):
        if not t.is_contiguous():
            raise ValueError(f"expert_ffn: {name} must be contiguous; call .contiguous()")
    if token_index.numel():
        # Two scalars read back (a device sync on GPUs): an out-of-range index would read other memory.
        lo, hi = (int(v) for v in torch.aminmax(token_index))
        if lo < 0 or hi >= hidden.shape[0]:
            raise IndexError(
                f"expert_ffn: token_index must lie in [0, {hidden.shape[0]}) (the rows of hidden), found values in "
                f"[{lo}, {hi}]"
            )


class _Compiled:
    """The C++ (CPU) and CUDA kernels: one pair of ops, the dispatcher picks by device."""

    @staticmethod
    def forward(hidden, token_index, gate_up, down, activation):
        return torch.ops.unlearn_fast.expert_ffn(hidden, token_index, gate_up, down, activation)

    @staticmethod
    def backward(grad_y, hidden, token_index, gate_up, down, gate_up_out, activation, need_hidden_grad):
        return torch.ops.unlearn_fast.expert_ffn_backward(
            grad_y, hidden, token_index, gate_up, down, gate_up_out, activation, need_hidden_grad
        )


class _Triton:
    @staticmethod
    def forward(*args):
        from unlearn_fast.kernels import expert_ffn as k

        return k.forward(*args)

    @staticmethod
    def backward(*args):
        from unlearn_fast.kernels import expert_ffn as k

        return k.backward(*args)


_IMPLS = {"cpp": _Compiled, "cuda": _Compiled, "triton": _Triton}


class _ExpertFFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, token_index, gate_up, down, impl, activation):
        y, gate_up_out = impl.forward(hidden, token_index, gate_up, down, activation)
        ctx.save_for_backward(hidden, token_index, gate_up, down, gate_up_out)
        ctx.impl, ctx.activation = impl, activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        hidden, token_index, gate_up, down, gate_up_out = ctx.saved_tensors
        need_hidden, _, need_gate_up, need_down = ctx.needs_input_grad[:4]
        grad_hidden, grad_gate_up, grad_down = ctx.impl.backward(
            grad_y.contiguous(), hidden, token_index, gate_up, down, gate_up_out, ctx.activation, need_hidden
        )
        return (
            grad_hidden if need_hidden else None,
            None,
            grad_gate_up if need_gate_up else None,
            grad_down if need_down else None,
            None,
            None,
        )


def expert_ffn(
    hidden: torch.Tensor,
    token_index: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """``(act(x @ gate_up[:I].T) * (x @ gate_up[I:].T)) @ down.T`` with ``x = hidden[token_index]``; ``[N, H]``.

    ``hidden`` [T,H], ``token_index`` [N] int64 in [0, T) (may be empty, may repeat), ``gate_up`` [2I,H], ``down``
    [H,I], all contiguous, one float dtype and device. Differentiable w.r.t. ``hidden``, ``gate_up`` and ``down``.
    """
    _check_inputs(hidden, token_index, gate_up, down, activation)
    backend = select_backend(_OP, hidden.device)
    if backend == "reference":
        return reference_expert_ffn(hidden, token_index, gate_up, down, activation)
    return _ExpertFFNFunction.apply(hidden, token_index, gate_up, down, _IMPLS[backend], ACTIVATIONS[activation])


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels of the compiled ops, for torch.compile and torch.library.opcheck.

if has_kernel(_OP, "CPU") or has_kernel(_OP, "CUDA"):

    @torch.library.register_fake("unlearn_fast::expert_ffn")
    def _fake_forward(hidden, token_index, gate_up, down, activation):
        n = token_index.shape[0]
        return hidden.new_empty(n, hidden.shape[1]), hidden.new_empty(n, gate_up.shape[0])

    @torch.library.register_fake("unlearn_fast::expert_ffn_backward")
    def _fake_backward(grad_y, hidden, token_index, gate_up, down, gate_up_out, activation, need_hidden_grad):
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else hidden.new_empty(0)
        return grad_hidden, torch.empty_like(gate_up), torch.empty_like(down)
