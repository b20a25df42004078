"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
the per-linear solver, round-to-nearest for comparison, and the GPTQ v1 checkpoint packing.

Why our own: measured on this project's 2-core machines, auto-gptq cannot quantize without CUDA, GPTQModel
quantizes on CPU but slowly (171-883 s for SmolLM2-135M INT4), and llm-compressor pins an older transformers.
GPTQ itself is small (mlx-lm and gpt-fast each carry one file of it); owning it lets the format module stream the
model layer by layer from disk and stay deterministic. GPTQModel remains available as `quantizer: gptqmodel`.

The solver, for a weight W [out, in] and the Hessian of its layer-wise loss H = 2 X Xᵀ / n over calibration
inputs X: dead input columns (zero diagonal) are zeroed, H is dampened by `damp` times its mean diagonal, and its
inverse's upper Cholesky factor drives column-by-column rounding in which each column's error is spread over the
columns not yet rounded, in blocks of `block` columns with lazy batch updates. Groups of `group_size` input
columns share a scale and zero (-1: one group per output row). Act-order (`desc_act`) visits columns by decreasing
Hessian diagonal; with `static_groups` the group grids are fixed from the original weights beforehand, so the
checkpoint's group index stays in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block: int = 64  # columns per lazy batch update (at least one group; 64 measured faster than 128 on CPU)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else -(-columns // self.group_size)

    def width(self, columns: int) -> int:
        return columns if self.group_size == -1 else self.group_size


@dataclass
class Quantized:
    q: torch.Tensor  # uint8 [out, in], integer levels 0..maxq
    scales: torch.Tensor  # float32 [groups, out]
    zeros: torch.Tensor  # int32 [groups, out], the level that represents 0.0
    g_idx: torch.Tensor  # int32 [in], the group of each input column
    dequantized: torch.Tensor  # float32 [out, in]


def grid(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero level per row of `w` [rows, columns] (the classic GPTQ min-max grid)."""
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / spec.maxq).half().float()  # the checkpoint stores fp16 scales: round with those
    zero = torch.full_like(scale, (spec.maxq + 1) // 2) if spec.sym else torch.round(-xmin / scale)
    return scale, zero


def levels(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn(weight: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Round-to-nearest on the same grid: the floor GPTQ must beat."""
    w = weight.float()
    out, columns = w.shape
    width = spec.width(columns)
    if columns % width:
        raise ValueError(f"group size {width} does not divide {columns} columns")
    grouped = w.reshape(out, columns // width, width).transpose(0, 1).reshape(-1, width)  # [groups·out, width]
    scale, zero = grid(grouped, spec)
    q = levels(grouped, scale[:, None], zero[:, None], spec.maxq)
    q = q.reshape(columns // width, out, width).transpose(0, 1).reshape(out, columns)
    g_idx = torch.arange(columns, dtype=torch.int32) // width
    return _result(q, scale.reshape(-1, out), zero.reshape(-1, out), g_idx)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize `weight` [out, in] given the Hessian [in, in] of its inputs (float32 computation)."""
    w = weight.float().clone()
    h = hessian.float().clone()
    out, columns = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if spec.desc_act else torch.arange(columns)
    width = spec.width(columns)
    by_position = spec.desc_act and not spec.static_groups  # groups follow the visiting order, not the input order
    g_idx = torch.empty(columns, dtype=torch.long)
    g_idx[order] = torch.arange(columns) // width if by_position else (order // width)
    groups = spec.groups(columns)
    scales, zeros = torch.zeros(groups, out), torch.zeros(groups, out)
    if spec.static_groups:  # grids fixed from the original weights, before any column is rounded
        for g, start in enumerate(range(0, columns, width)):
            scales[g], zeros[g] = grid(w[:, start : start + width], spec)
    w, h = w[:, order], h[order][:, order]
    hinv = _inverse_cholesky(h, spec.damp)
    group_at = g_idx[order]  # the group of the column visited at each position

    # the columns being rounded are rows here ([in, out], each contiguous): the per-column loop is the hot path
    wt, qt = w.T.contiguous(), torch.zeros(columns, out)
    block = max(spec.block, width)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1, err1 = wt[i1:i2], torch.zeros(i2 - i1, out)
        starts = [0] + [i for i in range(1, i2 - i1) if not spec.static_groups and (i1 + i) % width == 0]
        for start, end in zip(starts, [*starts[1:], i2 - i1]):
            if not spec.static_groups and (i1 + start) % width == 0:  # a new group: grid from the updated weights
                group = int(group_at[i1 + start])
                scales[group], zeros[group] = grid(wt[i1 + start : i1 + start + width].T, spec)
            segment = group_at[i1 + start : i1 + end]
            _solve_columns(w1, hinv[i1:i2, i1:i2], qt[i1:i2], err1, scales[segment], zeros[segment], start, end,
                           float(spec.maxq))  # fmt: skip
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1
    inverse = torch.argsort(order)
    q = qt.T[:, inverse]
    return _result(q, scales, zeros, g_idx)


def _solve_columns(w1: torch.Tensor, hinv1: torch.Tensor, q1: torch.Tensor, err1: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor, start: int, end: int, maxq: float):  # fmt: skip
    """Round columns start..end of a block one by one (rows of w1 [block, out]), spreading each column's error over
    the block's later columns (scale, zero: [end - start, out], the grid of each column). The loop runs once per
    input column."""
    for i in range(start, end):
        column, s, z = w1[i], scale[i - start], zero[i - start]
        levels_ = torch.div(column, s).round_().add_(z).clamp_(0.0, maxq)
        q1[i] = levels_
        error = torch.addcmul(column, levels_.sub_(z), s, value=-1.0).div_(hinv1[i, i])
        w1[i:].addr_(hinv1[i, i:], error, alpha=-1.0)
        err1[i] = error


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H's inverse; more dampening (up to 10x) if H is not positive definite.
    With J the reversal permutation and J H J = L Lᵀ, H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is upper triangular:
    one Cholesky and one triangular inverse instead of a Cholesky, an inverse and a second Cholesky."""
    mean, eye = torch.mean(torch.diag(h)), torch.eye(h.shape[0])
    for factor in (1, 2, 5, 10):
        lower, info = torch.linalg.cholesky_ex((h + factor * damp * mean * eye).flip(0, 1))
        if int(info) == 0:
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    raise ValueError("the Hessian is not positive definite even with 10x dampening: too few calibration tokens?")


def _result(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> Quantized:
    index = g_idx.long()
    dequantized = scales[index].T * (q - zeros[index].T)
    return Quantized(q.to(torch.uint8), scales, zeros.to(torch.int32), g_idx.to(torch.int32), dequantized)


def split_rows(quantized: Quantized, sizes: list[int]) -> list[Quantized]:
    """Split a solve over stacked weights (q/k/v, say) back into one result per weight. Rows are independent given
    the shared Hessian; the group index is shared."""
    parts, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        parts.append(Quantized(quantized.q[rows], quantized.scales[:, rows], quantized.zeros[:, rows],
                               quantized.g_idx.clone(), quantized.dequantized[rows]))  # fmt: skip
        start += size
    return parts


def output_errors(weight: torch.Tensor, candidates: dict[str, torch.Tensor], hessian: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:  # fmt: skip
    """Relative squared error of the layer's outputs on the calibration inputs, tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), of each
    candidate quantization of `weight`, with one matmul for all; in `dtype` (bfloat16 is ample for a reported figure
    and several times faster where the CPU has bf16 matmuls)."""
    w = weight.float()
    stacked = torch.cat([w, *(w - c.float() for c in candidates.values())])
    energy = ((stacked.to(dtype) @ hessian.to(dtype)).float() * stacked).sum(dim=1)
    sums = energy.reshape(len(candidates) + 1, -1).sum(dim=1)
    return {name: float(sums[k + 1] / sums[0]) for k, name in enumerate(candidates)}


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    return output_errors(weight, {"q": quantized}, hessian)["q"]


# GPTQ v1 checkpoint layout (what transformers via gptqmodel, vLLM, TGI and Xinference read): qweight packs input
# rows into int32, lowest bits first; qzeros packs output columns and stores zero - 1; scales are float16.


def pack(levels_: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer levels along `dim` into int32 words, `32 // bits` values a word, lowest bits first."""
    per = 32 // bits
    x = levels_.to(torch.int64).movedim(dim, 0)
    if x.shape[0] % per:
        raise ValueError(f"{x.shape[0]} values do not pack into words of {per}")
    x = x.reshape(x.shape[0] // per, per, *x.shape[1:])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, *[1] * (x.dim() - 2))
    words = (x << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).movedim(0, dim)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 32 // bits
    x = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, *[1] * (x.dim() - 1))
    values = (x.unsqueeze(1) >> shifts) & (2**bits - 1)
    return values.reshape(x.shape[0] * per, *x.shape[1:]).movedim(0, dim)


def to_checkpoint(quantized: Quantized, bits: int) -> dict[str, torch.Tensor]:
    """qweight [in·bits/32, out], qzeros [groups, out·bits/32] (zero - 1), scales fp16 [groups, out], g_idx [in]."""
    return {
        "qweight": pack(quantized.q.T, bits, dim=0),
        "qzeros": pack(quantized.zeros - 1, bits, dim=1),
        "scales": quantized.scales.to(torch.float16),
        "g_idx": quantized.g_idx,
    }


def from_checkpoint(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The float weight [out, in] a GPTQ v1 checkpoint's tensors stand for."""
    q = unpack(tensors["qweight"], bits, dim=0)  # [in, out]
    zeros = unpack(tensors["qzeros"], bits, dim=1) + 1  # [groups, out]
    index = tensors["g_idx"].long()
    scales = tensors["scales"].float()
    return (scales[index] * (q - zeros[index])).T
