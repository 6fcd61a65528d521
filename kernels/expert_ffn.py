"""Triton kernels of expert_ffn (the twins of csrc/common/expert_ffn.h), with the gather fused into the GEMMs.

Forward: one gather-GEMM reads the expert's token rows straight from ``hidden`` through ``token_index`` (no
``[N,H]`` gathered copy), computes the gate and up tiles of ``a = x Wgu^T`` side by side in one program, and applies
the GLU ``act(g) * u`` in its epilogue; it stores ``a`` (saved for backward) and ``h``. The second matmul
``y = h Wd^T`` has no gather to fuse, so it stays with cuBLAS (``torch.mm``).

Backward: ``dh = dy Wd`` (cuBLAS), one elementwise kernel for the GLU derivative (``h`` again, and
``da = [dg | du]``), ``dWd = dy^T h`` (cuBLAS), and a second gather-GEMM ``dWgu = da^T x`` that gathers the rows
of ``x`` along its reduction dimension; ``dhidden[token_index] += da Wgu`` is cuBLAS plus ``index_add_``.

Half-precision operands feed ``tl.dot`` as they are (tensor cores, float32 accumulation) on a GPU; float32 and
float64 use ``input_precision="ieee"`` (no TF32: plain torch's float32 matmul is full precision). Under
``TRITON_INTERPRET=1`` every value is converted to the accumulation type right after loading (the interpreter
computes bfloat16 arithmetic wrongly).

Launch: autotuned on the model's sizes (H, I), not on the token count N, which changes with every routing
decision and would re-time the kernels at each new value. The GPU tiles keep the two accumulators of the
forward GEMM and the GLU epilogue in registers (8 warps; 4 spilled, docs/KERNELS.md); the interpreter gets one
large tile.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET, autotune_configs

_GEMM = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)  # the interpreter's tile (slow per program: large)
_GLU_CONFIGS = autotune_configs(
    gpu=[
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    ],
    interpreter=_GEMM,
)
_WGRAD_CONFIGS = autotune_configs(
    gpu=[
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    ],
    interpreter=_GEMM,
)
_ELEMENTWISE_CONFIGS = autotune_configs(
    gpu=[dict(BLOCK_M=32, BLOCK_N=64, num_warps=4), dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)],
    interpreter=dict(BLOCK_M=64, BLOCK_N=64),
)

_SILU, _GELU_TANH = 0, 1  # the activation codes of csrc/common/expert_ffn.h


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """act(g) and act'(g) (see csrc/common/expert_ffn.h)."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        # As tensors of g's dtype: a bare float literal would be a float32 constant.
        k = tl.full((), 0.7978845608028654, g.dtype)
        c = tl.full((), 0.044715, g.dtype)
        # tanh(z) = 1 - 2 / (exp(2z) + 1): exact limits +-1 where exp over- or underflows.
        t = 1.0 - 2.0 / (tl.exp(2.0 * k * (g + c * g * g * g)) + 1.0)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * c * g * g)


@triton.jit
def _cast(x, OUT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """x (float32 or float64) to the output dtype. ROUND_BF16 (interpreter only): the interpreter's float32 ->
    bfloat16 cast truncates, so round to nearest even on the bits first, which that truncation then keeps exactly."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(OUT)


@triton.autotune(configs=_GLU_CONFIGS, key=["H", "I"])
@triton.jit
def _gather_glu_kernel(
    hidden_ptr,
    index_ptr,
    w_ptr,
    a_ptr,
    h_ptr,
    N,
    H,
    I,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (m, n): tokens [m*BM, (m+1)*BM) x intermediate columns [n*BN, (n+1)*BN), both halves of a.
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < N
    n_mask = rn < I
    tokens = tl.load(index_ptr + rm, mask=m_mask, other=0).to(tl.int64)
    x_rows = hidden_ptr + tokens[:, None] * H  # the gather: row pointers into hidden
    wg_cols = w_ptr + rn[None, :] * H  # Wg^T tile [BK, BN]: column n is row n of gate_up
    wu_cols = w_ptr + (rn[None, :] + I) * H
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k[None, :] < H), other=0.0)
        w_mask = (k[:, None] < H) & n_mask[None, :]
        wg = tl.load(wg_cols + k[:, None], mask=w_mask, other=0.0)
        wu = tl.load(wu_cols + k[:, None], mask=w_mask, other=0.0)
        if UPCAST:
            x = x.to(ACC)
            wg = wg.to(ACC)
            wu = wu.to(ACC)
        acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION, out_dtype=ACC)
        acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION, out_dtype=ACC)
    out_mask = m_mask[:, None] & n_mask[None, :]
    a_rows = a_ptr + rm[:, None] * (2 * I) + rn[None, :]
    out_ty = a_ptr.dtype.element_ty
    tl.store(a_rows, _cast(acc_g, out_ty, ROUND_BF16), mask=out_mask)
    tl.store(a_rows + I, _cast(acc_u, out_ty, ROUND_BF16), mask=out_mask)
    act, _ = _act_and_grad(acc_g, ACT)
    tl.store(h_ptr + rm[:, None] * I + rn[None, :], _cast(act * acc_u, out_ty, ROUND_BF16), mask=out_mask)


@triton.autotune(configs=_ELEMENTWISE_CONFIGS, key=["I"])
@triton.jit
def _glu_backward_kernel(
    a_ptr,
    dh_ptr,
    h_ptr,
    da_ptr,
    N,
    I,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < N)[:, None] & (rn < I)[None, :]
    a_rows = a_ptr + rm[:, None] * (2 * I) + rn[None, :]
    g = tl.load(a_rows, mask=mask, other=0.0).to(ACC)
    u = tl.load(a_rows + I, mask=mask, other=0.0).to(ACC)
    dh = tl.load(dh_ptr + rm[:, None] * I + rn[None, :], mask=mask, other=0.0).to(ACC)
    act, dact = _act_and_grad(g, ACT)
    out_ty = h_ptr.dtype.element_ty
    tl.store(h_ptr + rm[:, None] * I + rn[None, :], _cast(act * u, out_ty, ROUND_BF16), mask=mask)
    da_rows = da_ptr + rm[:, None] * (2 * I) + rn[None, :]
    tl.store(da_rows, _cast(dh * u * dact, out_ty, ROUND_BF16), mask=mask)
    tl.store(da_rows + I, _cast(dh * act, out_ty, ROUND_BF16), mask=mask)


@triton.autotune(configs=_WGRAD_CONFIGS, key=["H", "TWO_I"])
@triton.jit
def _gather_wgrad_kernel(
    da_ptr,
    hidden_ptr,
    index_ptr,
    out_ptr,
    N,
    H,
    TWO_I,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[2I, H] = da^T x with x = hidden[index]: the reduction runs over the N tokens, whose rows of
    # hidden are gathered as they are loaded. Program (m, n): rows [m*BM, ...) of 2I, columns [n*BN, ...) of H.
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < TWO_I
    n_mask = rn < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + rk.to(tl.int64)  # k * TWO_I passes 2**31 at realistic N and expert sizes
        k_mask = k < N
        tokens = tl.load(index_ptr + k, mask=k_mask, other=0).to(tl.int64)
        da_t = tl.load(da_ptr + k[None, :] * TWO_I + rm[:, None], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(hidden_ptr + tokens[:, None] * H + rn[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            da_t = da_t.to(ACC)
            x = x.to(ACC)
        acc = tl.dot(da_t, x, acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(
        out_ptr + rm[:, None] * H + rn[None, :],
        _cast(acc, out_ptr.dtype.element_ty, ROUND_BF16),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def _config(dtype: torch.dtype) -> dict:
    exact = dtype in (torch.float32, torch.float64)
    return dict(
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        UPCAST=INTERPRET,
        PRECISION="ieee" if exact or INTERPRET else None,  # half-precision operands: the tensor-core default
        ROUND_BF16=INTERPRET and dtype == torch.bfloat16,
    )


def _tiles(rows: int, cols: int):
    """The grid over an output [rows, cols] for the tile the autotuner picked."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]))


def _check_device(t: torch.Tensor) -> None:
    if INTERPRET and t.device.type != "cpu":
        raise RuntimeError("expert_ffn: the Triton interpreter runs on CPU tensors only (unset TRITON_INTERPRET)")


def forward(hidden, token_index, gate_up, down, activation):
    """y [N,H] and the pre-activations a [N,2I] (inputs checked by the caller)."""
    _check_device(hidden)
    n, h_size, inter = token_index.shape[0], hidden.shape[1], down.shape[1]
    a = hidden.new_empty(n, 2 * inter)
    h = hidden.new_empty(n, inter)
    if n > 0:
        _gather_glu_kernel[_tiles(n, inter)](
            hidden,
            token_index,
            gate_up,
            a,
            h,
            n,
            h_size,
            inter,
            ACT=activation,
            **_config(hidden.dtype),
        )
    return torch.mm(h, down.t()), a


def backward(grad_y, hidden, token_index, gate_up, down, gate_up_out, activation, need_hidden_grad):
    """Gradients of hidden (empty unless need_hidden_grad), gate_up and down."""
    _check_device(hidden)
    n, h_size, inter = token_index.shape[0], hidden.shape[1], down.shape[1]
    cfg = _config(hidden.dtype)
    dh = torch.mm(grad_y, down)
    h = hidden.new_empty(n, inter)
    da = hidden.new_empty(n, 2 * inter)
    if n > 0:
        _glu_backward_kernel[_tiles(n, inter)](
            gate_up_out,
            dh,
            h,
            da,
            n,
            inter,
            ACT=activation,
            ACC=cfg["ACC"],
            ROUND_BF16=cfg["ROUND_BF16"],
        )
    grad_down = torch.mm(grad_y.t(), h)
    grad_gate_up = torch.empty_like(gate_up)
    _gather_wgrad_kernel[_tiles(2 * inter, h_size)](
        da,
        hidden,
        token_index,
        grad_gate_up,
        n,
        h_size,
        2 * inter,
        **cfg,
    )
    grad_hidden = hidden.new_empty(0)
    if need_hidden_grad:
        grad_hidden = torch.zeros_like(hidden).index_add_(0, token_index, torch.mm(da, gate_up))
    return grad_hidden, grad_gate_up, grad_down
