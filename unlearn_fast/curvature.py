"""Curvature fitted once for LLMEraser and reused by every edit: H + λI inverted in a small space.

Both objects approximate the damped Gauss-Newton matrix H + λI of the eraser's training loss,
H = Σ_z c_z GN(L(z)) (c_z = 1/n), *at the adapter Θ_fit where they were fitted*, and apply its
inverse to a block of vectors without any model pass. Both are built from per-example **rows**
u (flat LoRA gradients with a cotangent on the logits) whose Σ u uᵀ is H:

* ``labels="sampled"``: for each of ``samples`` = k draws ŷ_t ~ p_t (the model's own softmax at
  every answer token), u = ∇_Θ Σ_t √(w_t/k) (p_t − e_ŷt)ᵀ logits_t, so E[Σ u uᵀ] = GN exactly
  (the tokens' draws are independent and centred): an unbiased Fisher / Gauss-Newton estimate.
* ``labels="exact"``: one row per (token t, vocabulary entry v), √(w_t p_tv)·∇(p_t − e_v)ᵀ logits_t,
  since Σ_v p_v (p − e_v)(p − e_v)ᵀ = diag(p) − ppᵀ: Σ u uᵀ is the exact per-example GN. The rows
  of one example are compressed to the eigenvectors of its d×d block (at most d rows), so this
  is for small vocabularies or adapters only: the reference the sampled estimate converges to.

:class:`WoodburyGaussNewton` keeps the rows U [m, d] and the Cholesky factor L of the
[m, m] Gram λI + UUᵀ (float64), and solves (UᵀU + λI) x = b exactly by the Woodbury identity
x = (b − Uᵀ(λI + UUᵀ)⁻¹Ub)/λ, touching U in row chunks. Removing examples deletes their rows and
their rows/columns of L (the factor of the kept rows' Gram is the old one above the first deleted
row, and one QR of the rows below it: a rank-|S| downdate, no pass over U); adding rows appends
to L by one triangular solve.

:class:`EKFAC`: per LoRA ``nn.Linear`` (lora_A and lora_B separately, as kronfluence treats
modules), the Kronecker factors A = Σ a aᵀ of the module's inputs and S = Σ g gᵀ of its output
gradients (the rows' cotangents pulled back to the module output), eigendecomposed once; then the
corrected eigenvalues Λ_ij = Σ_rows (Q_Sᵀ dW Q_Aᵀ...)²: the exact diagonal of H in the Kronecker
eigenbasis (George et al., 2018). Block-diagonal over modules. Edits add or subtract examples'
contributions to Λ (and to A, S) recomputed at Θ_fit with the same label draws, in the fixed
eigenbasis, so the state is always "the diagonal of H over the current training set in that basis".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from unlearn_fast.io import atomic_path

LABELS = ("sampled", "exact")
CURVATURE_FILE = "curvature.safetensors"
# Rows touched at once by the Woodbury products and the Gram (bounds the float64 temporaries).
ROW_CHUNK = 4096


# ---------------------------------------------------------------------------------------------
# Per-example rows.


def example_generator(seed: int, index: int, version: int) -> torch.Generator:
    """The label draws of example ``index`` (its ``version``-th text): the same in every pass."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 1_009 + version)


def _cotangents(logits: Tensor, token_weight: float, labels: str, samples: int, generator: torch.Generator) -> Tensor:
    """[r, T, V] cotangents on the logits whose pulled-back rows give Σ u uᵀ = GN (or its estimate)."""
    p = torch.softmax(logits.detach().double(), dim=-1)
    T, V = p.shape
    if labels == "sampled":
        drawn = torch.multinomial(p.cpu(), samples, replacement=True, generator=generator).T.to(p.device)  # [k, T]
        cot = p.expand(samples, T, V) - F.one_hot(drawn, V).to(p)
        cot = cot * math.sqrt(token_weight / samples)
    else:  # row (t, v): √(w p_tv)·(p_t − e_v) at token t only
        eye = torch.eye(V, dtype=p.dtype, device=p.device)
        rows = (p[:, None, :] - eye[None]) * (token_weight * p[:, :, None]).sqrt()  # [T, V, V]
        cot = torch.zeros(T, V, T, V, dtype=p.dtype, device=p.device)
        cot[torch.arange(T), :, torch.arange(T), :] = rows
        cot = cot.reshape(T * V, T, V)
    return cot.to(logits.dtype)


@contextmanager
def _capture(model: torch.nn.Module, modules: Sequence[str]):
    """Records the input and output of each named module during the forward passes inside."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))
        )
        for name in modules
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def example_rows(
    model: torch.nn.Module,
    loss: Any,
    params: Mapping[str, Tensor],
    token_weight: float,
    *,
    labels: str,
    samples: int,
    generator: torch.Generator,
    modules: Sequence[str] = (),
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Rows [r, d] of one example (``loss`` from make_loss_fn on a batch of it alone; ``params``
    the adapter at which to differentiate, in the flat order) and, for each of ``modules``, its
    input activations [P, in] and the rows' output gradients [r, P, out]."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad(), _capture(model, modules) as seen:
        weight, bias = loss.head(leaves)
        logits = F.linear(loss.features(leaves), weight, bias) * loss.logit_scale
        cot = _cotangents(logits, token_weight, labels, samples, generator)
        outs = [seen[m][1] for m in modules]
        grads = torch.autograd.grad(logits, list(leaves.values()) + outs, cot, is_grads_batched=True, allow_unused=True)
    r = cot.shape[0]
    rows = torch.cat(
        [
            torch.zeros(r, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(r, -1)
            for p, g in zip(leaves.values(), grads)
        ],
        dim=1,
    )
    acts = {
        m: (seen[m][0].detach().reshape(-1, seen[m][0].shape[-1]), g.reshape(r, -1, g.shape[-1]))
        for m, g in zip(modules, grads[len(leaves) :])
    }
    return rows.detach(), acts


def compress_rows(rows: Tensor) -> Tensor:
    """Rows with the same Σ u uᵀ, at most min(r, d) of them (eigenvectors of the d×d block)."""
    if rows.shape[0] <= rows.shape[1]:
        return rows
    values, vectors = torch.linalg.eigh(rows.double().T @ rows.double())
    keep = values > values.max().clamp_min(0) * 1e-13
    return (vectors[:, keep] * values[keep].sqrt()).T.to(rows.dtype)


# ---------------------------------------------------------------------------------------------
# Woodbury.


def _delete_cholesky_rows(L: Tensor, drop: Tensor) -> Tensor:
    """The Cholesky factor of the Gram with rows/columns ``drop`` (bool [m]) deleted."""
    if not bool(drop.any()):
        return L
    j0 = int(drop.nonzero()[0])
    kept_after = (~drop).nonzero().flatten()
    kept_after = kept_after[kept_after > j0]
    out = torch.zeros(j0 + len(kept_after), j0 + len(kept_after), dtype=L.dtype, device=L.device)
    out[:j0, :j0] = L[:j0, :j0]
    if len(kept_after):
        out[j0:, :j0] = L[kept_after, :j0]
        # The kept trailing rows' Schur complement is M Mᵀ, M = L[kept, j0:]: its factor is Rᵀ of QR(Mᵀ).
        R = torch.linalg.qr(L[kept_after, j0:].T, mode="r").R
        out[j0:, j0:] = (R * torch.sign(torch.diagonal(R))[:, None]).T
    return out


@dataclass
class WoodburyGaussNewton:
    """(UᵀU + λI)⁻¹ by the Woodbury identity (module docstring). ``owners[j]``: the training
    example of row j; ``theta``: the adapter Θ_fit the rows were taken at."""

    rows: Tensor  # [m, d], storage dtype
    owners: Tensor  # [m] int64
    chol: Tensor  # [m, m] float64, lower: λI + UUᵀ = L Lᵀ
    damping: float
    theta: Tensor

    method = "fisher"

    @classmethod
    def fit(cls, rows: Tensor, owners: Tensor, damping: float, theta: Tensor) -> WoodburyGaussNewton:
        if damping <= 0:
            raise ValueError(f"the Woodbury solve needs damping > 0, got {damping}")
        return cls(rows, owners, _cholesky(_gram(rows, rows) + damping * _eye(len(rows), rows)), damping, theta)

    def solve(self, b: Tensor) -> Tensor:
        """x = (UᵀU + λI)⁻¹ b for b [d] or [K, d], in float64, returned in b's dtype."""
        flat = b.reshape(-1, b.shape[-1]).double()
        y = torch.cat([c.double() @ flat.T for c in self.rows.split(ROW_CHUNK)]) if len(self.rows) else None
        x = flat.clone()
        if y is not None:
            z = torch.cholesky_solve(y, self.chol)
            for c, zc in zip(self.rows.split(ROW_CHUNK), z.split(ROW_CHUNK)):
                x -= (c.double().T @ zc).T
        return (x / self.damping).reshape(b.shape).to(b.dtype)

    def matvec(self, x: Tensor) -> Tensor:
        """(UᵀU + λI) x, for residuals."""
        flat = x.reshape(-1, x.shape[-1]).double()
        out = self.damping * flat
        for c in self.rows.split(ROW_CHUNK):
            out += (c.double() @ flat.T).T @ c.double()
        return out.reshape(x.shape).to(x.dtype)

    def with_damping(self, damping: float) -> WoodburyGaussNewton:
        """The same rows with another λ (the Gram refactored; no pass over the data)."""
        return WoodburyGaussNewton.fit(self.rows, self.owners, damping, self.theta)

    def remove(self, examples: Sequence[int]) -> WoodburyGaussNewton:
        """A copy without the rows of ``examples`` (a downdate of the factor)."""
        drop = torch.isin(self.owners, torch.as_tensor(list(examples), dtype=torch.long))
        return WoodburyGaussNewton(
            self.rows[~drop], self.owners[~drop], _delete_cholesky_rows(self.chol, drop), self.damping, self.theta
        )

    def add(self, rows: Tensor, owners: Tensor) -> WoodburyGaussNewton:
        """A copy with more rows (the factor extended by a triangular solve)."""
        rows = rows.to(self.rows.dtype)
        cross = _gram(self.rows, rows)  # [m, q]
        l21 = torch.linalg.solve_triangular(self.chol, cross, upper=False).T
        l22 = _cholesky(_gram(rows, rows) + self.damping * _eye(len(rows), rows) - l21 @ l21.T)
        m, q = len(self.rows), len(rows)
        chol = torch.zeros(m + q, m + q, dtype=torch.float64, device=self.chol.device)
        chol[:m, :m], chol[m:, :m], chol[m:, m:] = self.chol, l21, l22
        return WoodburyGaussNewton(
            torch.cat([self.rows, rows]), torch.cat([self.owners, owners]), chol, self.damping, self.theta
        )

    def tensors(self) -> dict[str, Tensor]:
        return {"rows": self.rows, "owners": self.owners, "chol": self.chol, "theta": self.theta}

    @classmethod
    def from_tensors(cls, t: Mapping[str, Tensor], meta: Mapping[str, Any]) -> WoodburyGaussNewton:
        return cls(t["rows"], t["owners"], t["chol"], float(meta["damping"]), t["theta"])


def _gram(a: Tensor, b: Tensor) -> Tensor:
    out = torch.empty(len(a), len(b), dtype=torch.float64, device=a.device)
    for i in range(0, len(a), ROW_CHUNK):
        out[i : i + ROW_CHUNK] = a[i : i + ROW_CHUNK].double() @ b.double().T
    return out


def _eye(m: int, like: Tensor) -> Tensor:
    return torch.eye(m, dtype=torch.float64, device=like.device)


def _cholesky(matrix: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError("the damped Gram matrix is not positive definite (damping too small for float64?)")
    return L.contiguous()  # row-major, as a loaded one is: the same layout gives the same bits


# ---------------------------------------------------------------------------------------------
# EK-FAC.


@dataclass
class _Block:
    name: str  # the parameter
    module: str  # its nn.Linear
    offset: int
    shape: tuple[int, int]  # [out, in]


@dataclass
class EKFAC:
    """Eigenvalue-corrected Kronecker-factored H per LoRA module (module docstring)."""

    blocks: list[_Block]
    factors: dict[str, Tensor]  # "<param>.A" [in, in], "<param>.S" [out, out] (sums), float64
    basis: dict[str, Tensor]  # "<param>.QA", "<param>.QS"
    eigenvalues: dict[str, Tensor]  # "<param>" [out, in]: corrected, float64
    damping: float
    theta: Tensor

    method = "ekfac"

    @classmethod
    def empty(cls, names: Sequence[str], shapes: Sequence[torch.Size], damping: float, theta: Tensor) -> EKFAC:
        blocks, offset = [], 0
        for name, shape in zip(names, shapes):
            if len(shape) != 2 or not name.endswith(".weight"):
                raise ValueError(f"EK-FAC needs nn.Linear LoRA weights, got {name} {tuple(shape)}")
            blocks.append(_Block(name, name[: -len(".weight")], offset, (shape[0], shape[1])))
            offset += shape[0] * shape[1]
        factors = {}
        for b in blocks:
            factors[f"{b.name}.A"] = torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64)
            factors[f"{b.name}.S"] = torch.zeros(b.shape[0], b.shape[0], dtype=torch.float64)
        return cls(blocks, factors, {}, {}, damping, theta)

    @property
    def modules(self) -> list[str]:
        return [b.module for b in self.blocks]

    def add_factors(self, acts: Mapping[str, tuple[Tensor, Tensor]], sign: float = 1.0) -> None:
        """A += Σ_pos a aᵀ, S += Σ_rows Σ_pos g gᵀ of one example."""
        for b in self.blocks:
            a, g = (t.double().cpu() for t in acts[b.module])
            self.factors[f"{b.name}.A"] += sign * (a.T @ a)
            flat = g.reshape(-1, g.shape[-1])
            self.factors[f"{b.name}.S"] += sign * (flat.T @ flat)

    def eigendecompose(self) -> None:
        for b in self.blocks:
            self.basis[f"{b.name}.QA"] = torch.linalg.eigh(self.factors[f"{b.name}.A"]).eigenvectors.contiguous()
            self.basis[f"{b.name}.QS"] = torch.linalg.eigh(self.factors[f"{b.name}.S"]).eigenvectors.contiguous()
            self.eigenvalues[b.name] = torch.zeros(b.shape, dtype=torch.float64)

    def _rotate(self, flat: Tensor, b: _Block, inverse: bool = False) -> Tensor:
        """[K, out·in] block of flat vectors → Q_Sᵀ V Q_A (or back) as [K, out, in]."""
        qa, qs = self.basis[f"{b.name}.QA"], self.basis[f"{b.name}.QS"]
        v = flat.reshape(-1, *b.shape)
        return qs @ v @ qa.T if inverse else qs.T @ v @ qa

    def add_rows(self, rows: Tensor, sign: float = 1.0) -> None:
        """Λ += Σ_rows (Q_Sᵀ dW Q_A)² for one example's rows [r, d]."""
        rows = rows.double().cpu()
        for b in self.blocks:
            part = rows[:, b.offset : b.offset + b.shape[0] * b.shape[1]]
            self.eigenvalues[b.name] += sign * (self._rotate(part, b) ** 2).sum(0)

    def solve(self, vectors: Tensor) -> Tensor:
        flat = vectors.reshape(-1, vectors.shape[-1]).double().cpu()
        out = torch.empty_like(flat)
        for b in self.blocks:
            size = b.shape[0] * b.shape[1]
            # Λ can round below 0 after subtractions: clamp, the block is PSD.
            scaled = self._rotate(flat[:, b.offset : b.offset + size], b) / (
                self.eigenvalues[b.name].clamp_min(0) + self.damping
            )
            out[:, b.offset : b.offset + size] = self._rotate(scaled, b, inverse=True).reshape(len(flat), size)
        return out.reshape(vectors.shape).to(vectors)

    def matvec(self, vectors: Tensor) -> Tensor:
        """(C + λI) v with this EK-FAC's C, for residuals."""
        flat = vectors.reshape(-1, vectors.shape[-1]).double().cpu()
        out = torch.empty_like(flat)
        for b in self.blocks:
            size = b.shape[0] * b.shape[1]
            scaled = self._rotate(flat[:, b.offset : b.offset + size], b) * (
                self.eigenvalues[b.name].clamp_min(0) + self.damping
            )
            out[:, b.offset : b.offset + size] = self._rotate(scaled, b, inverse=True).reshape(len(flat), size)
        return out.reshape(vectors.shape).to(vectors)

    def with_damping(self, damping: float) -> EKFAC:
        """The same factors with another λ (λ enters at solve time only)."""
        return replace(self.copy(), damping=damping)

    def copy(self) -> EKFAC:
        return EKFAC(
            list(self.blocks),
            {k: v.clone() for k, v in self.factors.items()},
            dict(self.basis),
            {k: v.clone() for k, v in self.eigenvalues.items()},
            self.damping,
            self.theta,
        )

    def tensors(self) -> dict[str, Tensor]:
        out = {f"factor.{k}": v for k, v in self.factors.items()}
        out.update({f"basis.{k}": v for k, v in self.basis.items()})
        out.update({f"eigenvalues.{k}": v for k, v in self.eigenvalues.items()})
        return {**out, "theta": self.theta}

    @classmethod
    def from_tensors(cls, t: Mapping[str, Tensor], meta: Mapping[str, Any]) -> EKFAC:
        shapes = [torch.Size(s) for s in meta["shapes"]]
        out = cls.empty(meta["names"], shapes, float(meta["damping"]), t["theta"])
        for key, value in t.items():
            kind, _, rest = key.partition(".")
            target = {"factor": out.factors, "basis": out.basis, "eigenvalues": out.eigenvalues}.get(kind)
            if target is not None:
                target[rest] = value
        return out


FittedCurvature = WoodburyGaussNewton | EKFAC


# ---------------------------------------------------------------------------------------------
# Files.


def save(curvature: FittedCurvature, directory: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """``directory/curvature.safetensors`` (tensors + JSON metadata), written atomically."""
    path = Path(directory) / CURVATURE_FILE
    tensors = {k: v.detach().contiguous().cpu() for k, v in curvature.tensors().items()}
    header = {"meta": json.dumps({**meta, "method": curvature.method, "damping": curvature.damping})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load(directory: str | os.PathLike) -> tuple[FittedCurvature, dict[str, Any]]:
    path = Path(directory) / CURVATURE_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    # Fresh (aligned) allocations: BLAS on mmapped, unaligned buffers may sum in another order.
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    cls = {"fisher": WoodburyGaussNewton, "ekfac": EKFAC}[meta["method"]]
    return cls.from_tensors(tensors, meta), meta
