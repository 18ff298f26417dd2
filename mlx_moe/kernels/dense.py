"""Typed calls of the decode_layer kernel family (metal/decode_layer.metal): the
dense half of a one-token decoder layer, in two launches.

- `attn_qkv`: input RMSNorm -> q, k, v projections (+ biases) -> per-head q/k
  RMSNorm -> RoPE at the cache position;
- `dense_residual`: a projection plus the residual add after it (o_proj).

The dense projections are mlx's own modules, read in place: `nn.QuantizedLinear`
in MLX's affine mode (4 or 8 bits, groups of 32, 64 or 128: mlx-community
checkpoints) and `nn.Linear` with float16, bfloat16 or float32 weights (Hugging
Face checkpoints, GGUF's dense tensors).  `dense_weight` says what a module is
to the kernels, or why it cannot be read (the caller then keeps MLX's ops).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .registry import constant, constants, kernel, stand_in

FLOAT_FMT = {mx.float16: 16, mx.bfloat16: 17, mx.float32: 32}
GROUP_SIZES = (32, 64, 128)
MAX_STAGED = 8192  # activations staged per threadgroup (float32: 32 KB, Metal's threadgroup limit)

# Launch geometry (simdgroups per threadgroup, rows per simdgroup).  attn_qkv:
# one threadgroup per head, head_dim / ATTN_NSG rows per simdgroup; 16
# simdgroups (512 threads, so up to 128 registers a thread: each holds its rows'
# first weight reads in registers) with only HQ + 2 HK threadgroups.
# dense_residual: DENSE_NR rows per simdgroup, DENSE_NSG simdgroups
# (Qwen3-30B-A3B's o_proj: 256 threadgroups).
ATTN_NSG = 16
DENSE_NR, DENSE_NSG = 2, 4


class DenseWeight(NamedTuple):
    fmt: int  # 4 / 8: MLX affine bits; 16 / 17 / 32: float16 / bfloat16 / float32
    group_size: int  # affine group size (0 for float weights)
    w: mx.array  # uint32 words [N, K * bits / 32], or the float weight [N, K]
    scales: mx.array  # [N, K / group] (a 1-element stand-in for float weights)
    biases: mx.array
    rows: int
    cols: int
    bias: Optional[mx.array]  # the layer's output bias [N], or None


def dense_unsupported(module) -> Optional[str]:
    """Why the decode_layer kernels cannot read `module`'s weight, or None."""
    if isinstance(module, nn.QuantizedLinear):
        if getattr(module, "mode", "affine") != "affine":
            return f"quantization mode {module.mode!r} (the kernels read MLX's affine mode)"
        if module.bits not in (4, 8):
            return f"{module.bits}-bit weights (the kernels read 4 and 8 bits)"
        if module.group_size not in GROUP_SIZES:
            return f"group size {module.group_size} (the kernels read {GROUP_SIZES})"
        cols = module.weight.shape[1] * 32 // module.bits
        if (cols * module.bits // 8) % 16:
            return f"{cols} input features: a row is not a multiple of 16 bytes"
        return None
    if type(module) is nn.Linear:
        w = module.weight
        if w.dtype not in FLOAT_FMT:
            return f"weight dtype {w.dtype}"
        if (w.shape[1] * w.itemsize) % 16:
            return f"{w.shape[1]} input features: a row is not a multiple of 16 bytes"
        return None
    return f"{type(module).__name__} (the kernels read nn.Linear and nn.QuantizedLinear)"


def dense_weight(module) -> DenseWeight:
    """The kernels' view of an nn.Linear / nn.QuantizedLinear (no copy)."""
    problem = dense_unsupported(module)
    if problem is not None:
        raise ValueError(f"the decode_layer kernels cannot read this projection: {problem}")
    bias = module["bias"] if "bias" in module else None
    if isinstance(module, nn.QuantizedLinear):
        w = module.weight
        return DenseWeight(module.bits, module.group_size, w, module.scales, module.biases, w.shape[0],
                           w.shape[1] * 32 // module.bits, bias)
    w = module.weight
    none = constant(0.0)
    return DenseWeight(FLOAT_FMT[w.dtype], 0, w, none, none, w.shape[0], w.shape[1], bias)


def _same_format(ws) -> bool:
    a = ws[0]
    return all(b.fmt == a.fmt and b.group_size == a.group_size and b.cols == a.cols
               and b.scales.dtype == a.scales.dtype for b in ws[1:])


def attn_unsupported(q: DenseWeight, k: DenseWeight, v: DenseWeight, head_dim: int, n_heads: int,
                     n_kv_heads: int) -> Optional[str]:
    """Why attn_qkv cannot take these projections and heads, or None."""
    if not _same_format((q, k, v)):
        return "q, k and v projections differ in format"
    if (q.bias is None) != (k.bias is None) or (q.bias is None) != (v.bias is None):
        return "only some of q, k, v have a bias"
    if head_dim % 32 or head_dim > 32 * ATTN_NSG or head_dim % ATTN_NSG:
        # 32: decode_attention's lanes hold head_dim / 32 dimensions each
        return f"head dimension {head_dim} (needs a multiple of 32 and of {ATTN_NSG}, at most {32 * ATTN_NSG})"
    if q.rows != n_heads * head_dim or k.rows != n_kv_heads * head_dim or v.rows != k.rows:
        return f"projection rows {q.rows}/{k.rows}/{v.rows} do not match {n_heads}/{n_kv_heads} heads of {head_dim}"
    if q.cols > MAX_STAGED:
        return f"hidden size {q.cols} > {MAX_STAGED}"
    return None


def weight_inputs(d: DenseWeight):
    return [d.w, d.scales, d.biases]


def fmt_template(d: DenseWeight):
    return [("FMT", d.fmt), ("GS", d.group_size or 32)]


def attn_qkv(x: mx.array, norm_weight: mx.array, eps: float, q: DenseWeight, k: DenseWeight, v: DenseWeight,
             head_dim: int, n_heads: int, n_kv_heads: int, q_norm: Optional[mx.array], k_norm: Optional[mx.array],
             qk_eps: float, rope_base: float, rope_scale: float, traditional: bool, pos: mx.array,
             flavor: str) -> Tuple[mx.array, mx.array, mx.array]:
    """q [1, HQ, 1, D], k and v [1, HK, 1, D] of one token x [..., hidden]: the input
    RMSNorm, the three projections (+ biases), the per-head q/k RMSNorms (when
    q_norm / k_norm are given) and RoPE at position pos (int32 [1]), in x's dtype."""
    problem = attn_unsupported(q, k, v, head_dim, n_heads, n_kv_heads)
    if problem is not None:
        raise ValueError(f"attn_qkv: {problem}")
    if x.size != q.cols:
        raise ValueError(f"attn_qkv takes one token of {q.cols} features; got x of shape {tuple(x.shape)}")
    T = x.dtype
    qk_norm = q_norm is not None
    none = stand_in(T)
    biases = [q.bias, k.bias, v.bias] if q.bias is not None else [none] * 3
    norms = [q_norm, k_norm] if qk_norm else [none] * 2
    cst = constants((eps, qk_eps, math.log2(rope_base), rope_scale))
    D, HQ, HK = head_dim, n_heads, n_kv_heads
    outs = kernel(flavor, "attn_qkv")(
        inputs=[x, norm_weight, *weight_inputs(q), *weight_inputs(k), *weight_inputs(v),
                *biases, *norms, pos if pos.shape == (1,) else pos.reshape(1), cst],
        template=[("T", T), *fmt_template(q), ("K", q.cols), ("D", D), ("HQ", HQ), ("HK", HK),
                  ("NSG", ATTN_NSG), ("QKNORM", qk_norm), ("HAS_BIAS", q.bias is not None),
                  ("TRAD", bool(traditional))],
        grid=((HQ + 2 * HK) * 32 * ATTN_NSG, 1, 1), threadgroup=(32 * ATTN_NSG, 1, 1),
        output_shapes=[(1, HQ, 1, D), (1, HK, 1, D), (1, HK, 1, D)], output_dtypes=[T, T, T],
    )
    return outs[0], outs[1], outs[2]


def dense_residual(x: mx.array, d: DenseWeight, res: mx.array, flavor: str, nr: int = DENSE_NR,
                   nsg: int = DENSE_NSG) -> mx.array:
    """res + W . x for one token (x [..., K], res [..., N]): [N]-shaped like res, in res's dtype."""
    if d.bias is not None:
        raise ValueError("dense_residual: projections with a bias are not covered")
    if x.size != d.cols or res.size != d.rows:
        raise ValueError(f"dense_residual: x {tuple(x.shape)} / res {tuple(res.shape)} do not fit a "
                         f"{d.rows} x {d.cols} projection")
    if d.cols > MAX_STAGED:
        raise ValueError(f"dense_residual: {d.cols} input features > {MAX_STAGED}")
    n_tg = -(-d.rows // (nr * nsg))
    return kernel(flavor, "dense_residual")(
        inputs=[x, *weight_inputs(d), res],
        template=[("T", res.dtype), *fmt_template(d), ("K", d.cols), ("N", d.rows), ("NR", nr), ("NSG", nsg)],
        grid=(n_tg * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[res.shape], output_dtypes=[res.dtype],
    )[0]
