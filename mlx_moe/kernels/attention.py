"""The decode attention kernel (metal/attention.metal): one query token against the
first pos + 1 slots of a fixed-capacity KV cache, in one launch, no mask array.

Used by the compiled decode step (mlx_moe/compiled.py) when
`compiled.ATTENTION_KERNEL` is on; the same result as
mx.fast.scaled_dot_product_attention on the valid slots (tested against it).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .registry import constant, kernel

# Simdgroups (warps) per query head and slots per simdgroup step: 16 x 8 keeps
# 128 slots' loads in flight per head (512 threads: up to 128 registers each).
NSG = 16
U = 8


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
