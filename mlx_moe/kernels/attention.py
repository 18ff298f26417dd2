"""The decode attention kernels (metal/attention.metal): one query token against the
first pos + 1 slots of a fixed-capacity KV cache, in one launch, no mask array.

- `decode_attention`: q, k, v as mlx-lm's attention has them; used by the
  compiled decode step (mlx_moe/compiled.py) when `compiled.ATTENTION_KERNEL` is
  on; the same result as mx.fast.scaled_dot_product_attention on the valid slots
  (tested against it).
- `decode_attention_parts`: the fused decoder layers' (mlx_moe/fused_step.py),
  from the raw q/k/v projections: the q/k norms and RoPE, the new key and value
  (returned for a cache write, or with write_cache stored in the cache in place:
  decode_attention_parts_kv), and each head's slots in SPLITS parts, which
  dense.dense_residual combines.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from .registry import constant, constants, kernel, stand_in

# Simdgroups (warps) per query head and slots per simdgroup step: 16 x 8 keeps
# 128 slots' loads in flight per head (512 threads: up to 128 registers each).
NSG = 16
U = 8

# decode_attention_parts: splits per head, simdgroups per split, slots per simdgroup
# step (Qwen3-30B-A3B: 32 heads x 4 splits = 128 threadgroups of 256 threads).
SPLITS, PARTS_NSG, PARTS_U = 4, 8, 8


def unsupported(q_shape, k_shape, v_shape) -> Optional[str]:
    """Why the kernel cannot take these shapes ([B, H, L, D] each), or None."""
    if len(q_shape) != 4 or len(k_shape) != 4 or tuple(k_shape) != tuple(v_shape):
        return f"q, k, v must be [B, H, L, D] with k and v alike; got {q_shape}, {k_shape}, {v_shape}"
    B, HQ, L, D = q_shape
    if B != 1 or L != 1:
        return f"one sequence and one query token only; got batch {B}, {L} tokens"
    if k_shape[0] != 1 or k_shape[3] != D:
        return f"keys {k_shape} do not match queries {q_shape}"
    if D % 32:
        return f"head dimension {D} is not a multiple of 32"
    if HQ % k_shape[1]:
        return f"{HQ} query heads are not a multiple of {k_shape[1]} key/value heads"
    return None


def decode_attention(q: mx.array, k: mx.array, v: mx.array, pos: mx.array, scale: float,
                     flavor: str, nsg: int = NSG, u: int = U) -> mx.array:
    """softmax(scale * q k[:pos+1]^T) v[:pos+1] for q [1, HQ, 1, D] and a cache
    k, v [1, HKV, C, D]; `pos` int32 [1] on the device (slots beyond it are never
    read).  Returns [1, HQ, 1, D] in q's dtype."""
    problem = unsupported(q.shape, k.shape, v.shape)
    if problem is not None:
        raise ValueError(f"decode_attention: {problem}")
    _, HQ, _, D = q.shape
    _, HKV, C, _ = k.shape
    if pos.dtype != mx.int32:
        pos = pos.astype(mx.int32)
    if pos.shape != (1,):  # (a reshape is one more graph node: callers pass [1] once per step)
        pos = pos.reshape(1)
    return kernel(flavor, "decode_attention")(
        inputs=[q, k, v, pos, constant(float(scale))],
        template=[("T", q.dtype), ("D", D), ("HQ", HQ), ("HKV", HKV), ("C", C), ("NSG", nsg), ("U", u)],
        grid=(HQ * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(1, HQ, 1, D)], output_dtypes=[q.dtype],
    )[0]


def decode_attention_parts(y: mx.array, n_heads: int, n_kv_heads: int, q_norm: Optional[mx.array],
                           k_norm: Optional[mx.array], qk_eps: float, rope_base: float, rope_scale: float,
                           traditional: bool, keys: mx.array, values: mx.array, pos: mx.array, scale: float,
                           flavor: str, splits: Optional[int] = None, nsg: Optional[int] = None,
                           u: Optional[int] = None, write_cache: bool = False):
    """The attention of one token from its stacked q/k/v projections y [(HQ + 2 HK) * D]
    (dense.dense_norm's output) over a cache keys / values [1, HK, C, D] holding
    positions 0..pos-1: per-head q/k RMSNorms (q_norm / k_norm, or None), RoPE at pos
    (int32 [1]), softmax(scale q k^T) v over slots 0..pos with the new key at pos.

    Returns (parts [HQ, S, D], ml [HQ, S, 2]) float32 (dense.dense_residual combines
    them) and the new key and value [1, HK, 1, D] in y's dtype, for the cache write;
    with write_cache, only (parts, ml): the kernel stores the new key and value in
    slot pos of keys / values itself, in place (the arrays change: only for a cache
    that no other pending node reads, as the compiled step's).
    splits, nsg, u: the launch geometry (default SPLITS, PARTS_NSG, PARTS_U)."""
    splits, nsg, u = splits or SPLITS, nsg or PARTS_NSG, u or PARTS_U
    inputs, template = attention_parts_args(y.dtype, y.size, n_heads, n_kv_heads, q_norm, k_norm, qk_eps, rope_base,
                                            rope_scale, traditional, keys, values, pos, scale, splits, nsg, u,
                                            write_cache)
    T, HQ, (_, HK, _, D) = y.dtype, n_heads, keys.shape
    shapes, dtypes = [(HQ, splits, D), (HQ, splits, 2)], [mx.float32, mx.float32]
    if not write_cache:
        shapes, dtypes = shapes + [(1, HK, 1, D)] * 2, dtypes + [T, T]
    return tuple(kernel(flavor, "decode_attention_parts_kv" if write_cache else "decode_attention_parts")(
        inputs=[y] + inputs, template=template, grid=(splits * 32 * nsg, HQ, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=shapes, output_dtypes=dtypes,
    ))


def attention_parts_args(T, y_size: int, n_heads: int, n_kv_heads: int, q_norm: Optional[mx.array],
                         k_norm: Optional[mx.array], qk_eps: float, rope_base: float, rope_scale: float,
                         traditional: bool, keys: mx.array, values: mx.array, pos: mx.array, scale: float,
                         splits: int, nsg: int, u: int, write_cache: bool):
    """(inputs after y, template) of decode_attention_parts' body for projections y of
    dtype T and y_size values, checked (the kernels that run the body:
    decode_attention_parts(_kv), decode_chain's qkv_attention)."""
    _, HK, C, D = keys.shape
    HQ = n_heads
    if values.shape != keys.shape or HK != n_kv_heads or y_size != (HQ + 2 * HK) * D:
        raise ValueError(f"decode_attention_parts: y of {y_size} values, cache {tuple(keys.shape)} / "
                         f"{tuple(values.shape)} do not fit {HQ} + 2 x {n_kv_heads} heads")
    if D % 32 or HQ % HK:
        raise ValueError(f"decode_attention_parts: head dimension {D} (a multiple of 32) and {HQ} query heads "
                         f"over {HK} key/value heads")
    qk_norm = q_norm is not None
    none = stand_in(T)
    cst = constants((qk_eps, math.log2(rope_base), rope_scale, scale))
    if write_cache and (keys.dtype != T or values.dtype != T):
        raise ValueError(f"decode_attention_parts: a cache of {keys.dtype} written from {T} projections")
    inputs = [q_norm if qk_norm else none, k_norm if qk_norm else none, keys, values,
              pos if pos.shape == (1,) else pos.reshape(1), cst]
    template = [("T", T), ("D", D), ("HQ", HQ), ("HKV", HK), ("C", C), ("NSG", nsg), ("U", u), ("S", splits),
                ("QKNORM", qk_norm), ("TRAD", bool(traditional))]
    return inputs, template
