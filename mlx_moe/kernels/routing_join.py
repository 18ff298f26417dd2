"""One launch that gathers every MoE layer's (ids, weights) of a forward pass
into one array (metal/routing_join.metal), for the routing hook on MLX's CUDA
backend, where each device array the host reads costs a cudaMallocManaged and
a synchronous copy (see the .metal file's header).

    packed = routing_join(ids, weights, flavor)      # on the device, lazily
    ids_np, weights_np = unpack(bytes(memoryview(packed)), (L, T, k))
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .registry import layered_kernel

THREADS = 256


def routing_join(ids: List[mx.array], weights: List[mx.array], flavor: str,
                 record: Optional[mx.array] = None, shape: Optional[Tuple[int, int]] = None) -> mx.array:
    """uint32 [2 * L * T * k] of L per-layer [T, k] arrays: words [0, L*T*k)
    the ids' int32 bits ([L, T, k] order), the next L*T*k words the weights' float32
    bits.  Read it back with `unpack`.

    record: the routing hook's record chain (uint32 [2 * S * T * k + 1], layout in
    metal/routing_join.metal, made by `new_record`); then the result is the chain with
    the L layers in its next L slots and its count + L (kernel routing_join_record).

    flavor: a kernel flavor (mlx_moe/kernels/registry.py), or "mlx" for MLX's own ops
    (what the emulated flavor cannot do: run inside mx.compile, in tests).

    shape: every array's [T, k], where the caller knows it without asking them (the
    routing hook: routers return [tokens, top_k] by construction); then the 2L shapes
    are not read (a nanobind call each, ~25 us per forward at 48 layers in an ad-hoc
    timing on the developers' CPU: decode is bound by host time).  Otherwise they are checked: the kernel reads T * k values of each."""
    if not ids or len(ids) != len(weights):
        raise ValueError(f"routing_join needs one ids and one weights array per layer; got {len(ids)} and "
                         f"{len(weights)}")
    if shape is not None:
        shape = tuple(shape)
    elif len(ids[0].shape) != 2 or any(a.shape != ids[0].shape for a in ids + weights):
        raise ValueError(f"routing_join: every layer's ids and weights must have the same [T, k] shape; got "
                         f"{sorted({tuple(a.shape) for a in ids + weights})}")
    else:
        shape = tuple(ids[0].shape)
    L, n = len(ids), shape[0] * shape[1]
    total = L * n
    if record is not None:
        words = record.shape[0] if record.ndim == 1 else 0
        if record.dtype != mx.uint32 or words < 1 or (words - 1) % (2 * n):
            raise ValueError(f"a routing record for [T, k] = {tuple(shape)} must be uint32 [2 * slots * {n} + 1]; "
                             f"got {record.dtype} {tuple(record.shape)}")
        if flavor == "mlx":
            return _extend_with_mlx_ops(record, ids, weights)
        groups = max(-(-total // THREADS), -(-words // (THREADS * RECORD_WORDS_PER_THREAD)), 1)
        return layered_kernel(flavor, "routing_join_record", L)(
            inputs=list(ids) + list(weights) + [record], template=[("NL", L), ("N", n), ("TG", THREADS)],
            grid=(groups * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[(words,)], output_dtypes=[mx.uint32])[0]
    if flavor == "mlx":  # MLX ops: the same result, one copy per input (a stand-in where kernels can't run)
        return mx.concatenate([mx.stack(ids).astype(mx.int32).view(mx.uint32).reshape(-1),
                               mx.stack(weights).astype(mx.float32).view(mx.uint32).reshape(-1)])
    return layered_kernel(flavor, "routing_join", L)(
        inputs=list(ids) + list(weights), template=[("NL", L), ("N", n), ("TG", THREADS)],
        grid=(max(1, -(-total // THREADS)) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(2 * total,)], output_dtypes=[mx.uint32])[0]


RECORD_WORDS_PER_THREAD = 4  # grid size of routing_join_record: at most this many chain words per thread


def record_words(slots: int, tokens: int, k: int) -> int:
    """Length of a record chain of `slots` layer slots for `tokens` tokens of top-k."""
    return 2 * slots * tokens * k + 1


_EMPTY_RECORDS: dict = {}


def new_record(slots: int, tokens: int, k: int) -> mx.array:
    """An empty record chain (all zero, no slot used), made once per size from host
    data: starting a chain adds no graph node (and works inside a compiled trace)."""
    words = record_words(slots, tokens, k)
    a = _EMPTY_RECORDS.get(words)
    if a is None:
        a = _EMPTY_RECORDS[words] = mx.array(np.zeros(words, dtype=np.uint32))
    return a


def _extend_with_mlx_ops(record: mx.array, ids: List[mx.array], weights: List[mx.array]) -> mx.array:
    """routing_join_record's result with MLX ops (the slot comes from the chain's last
    word, so it is a gather and selects over the chain, not a static slice)."""
    L, n = len(ids), ids[0].size
    words = record.shape[0]
    slots = (words - 1) // (2 * n)
    slot0 = record[-1].astype(mx.int32)
    pos = mx.arange(words, dtype=mx.int32)
    lo = mx.minimum(slot0, slots) * n
    hi = mx.minimum(slot0 + L, slots) * n
    id_bits = mx.stack(ids).astype(mx.int32).view(mx.uint32).reshape(-1)
    w_bits = mx.stack(weights).astype(mx.float32).view(mx.uint32).reshape(-1)
    in_ids = (pos >= lo) & (pos < hi)
    in_w = (pos >= slots * n + lo) & (pos < slots * n + hi)
    out = mx.where(in_ids, mx.take(id_bits, mx.clip(pos - lo, 0, L * n - 1)),
                   mx.where(in_w, mx.take(w_bits, mx.clip(pos - slots * n - lo, 0, L * n - 1)), record))
    return mx.where(pos == words - 1, (slot0 + L).astype(mx.uint32), out)


def unpack(raw, shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32, weights float32), each of `shape` (L, T, k), from the packed array's
    bytes (or a buffer of them)."""
    n = shape[0] * shape[1] * shape[2]
    words = np.frombuffer(raw, np.uint32, count=2 * n)
    return words[:n].view(np.int32).reshape(shape), words[n:].view(np.float32).reshape(shape)
