"""One launch that gathers every MoE layer's (ids, weights) of a forward pass
(metal/routing_join.metal), for the routing hook on MLX's CUDA backend, where
each device array the host reads costs a cudaMallocManaged and a synchronous
copy (see the .metal file's header)."""

from __future__ import annotations

from typing import List, Tuple

import mlx.core as mx

from .registry import layered_kernel

THREADS = 256


def routing_join(ids: List[mx.array], weights: List[mx.array], flavor: str) -> Tuple[mx.array, mx.array]:
    """ids int32 [L, T, k] and weights float32 [L, T, k] of L per-layer [T, k] arrays.

    flavor: a kernel flavor (mlx_moe/kernels/registry.py), or "mlx" for MLX's own ops
    (what the emulated flavor cannot do: run inside mx.compile, in tests)."""
    if not ids or len(ids) != len(weights):
        raise ValueError(f"routing_join needs one ids and one weights array per layer; got {len(ids)} and "
                         f"{len(weights)}")
    shape = ids[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in ids + weights):
        raise ValueError(f"routing_join: every layer's ids and weights must have the same [T, k] shape; got "
                         f"{sorted({tuple(a.shape) for a in ids + weights})}")
    if flavor == "mlx":  # MLX ops: the same result, one copy per input (a stand-in where kernels can't run)
        return mx.stack(ids).astype(mx.int32), mx.stack(weights).astype(mx.float32)
    L, n = len(ids), shape[0] * shape[1]
    total = L * n
    return tuple(layered_kernel(flavor, "routing_join", L)(
        inputs=list(ids) + list(weights), template=[("NL", L), ("N", n), ("TG", THREADS)],
        grid=(max(1, -(-total // THREADS)) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(L, *shape), (L, *shape)], output_dtypes=[mx.int32, mx.float32]))
