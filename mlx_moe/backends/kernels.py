"""The `metal` and `cuda` expert backends: the project's kernels (metal/).

Decode-sized batches (see mlx_moe/kernels/dispatch.py) run in two dispatches:

1. mul_mv_id_swiglu: gate and up GEMVs of every (token, slot) pair, SwiGLU
   fused, into h [T*k, ffn] float32;
2. mul_mv_id_down_combine: the down GEMVs of all slots of a token, weighted
   and summed in threadgroup memory, plus weight * x for identity experts,
   written once in x's dtype.

Larger batches (see `kernel_path` in mlx_moe/kernels/dispatch.py) run the
prefill path in four steps:

1. mul_mm_id_map0: the pairs of each real expert (a counting sort on the
   device, no host sync) and the table of GEMM tiles (or the same from two
   launches over the whole GPU, mul_mm_id_map0_count + _lists: mul_mm_id.MAP0);
2. mul_mm_id_swiglu: gate and up as tiled GEMMs over each expert's pairs,
   SwiGLU fused, into h [T*k, ffn] float32 (bfloat16 from the CUDA async body);
3. mul_mm_id: down over the same tiles, into d [T*k, hidden] float32
   (bfloat16 from the CUDA async body with mul_mm_id.ASYNC_D_BF16);
4. mul_mm_id_combine: the weighted sum over slots plus weight * x for
   identity experts, in x's dtype.

Identity and padding slots launch no weight reads on either path.  Other
batches and formats go to the `mlx` backend.  `fuse_swiglu=False` /
`fuse_combine=False` select the unfused variants (separate gate and up
dispatches, per-slot down outputs combined with MLX ops) that
tools/bench_kernels.py measures against.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..kernels.chain import oproj_moe
from ..kernels.dispatch import expert_weights, kernel_path, kernels_cover, pairs_path, weight_kind
from ..kernels.mul_mm_id import map0, mul_mm_id, mul_mm_id_combine, mul_mm_id_swiglu
from ..kernels.mul_mv_id import (mul_mv_id, mul_mv_id_down_combine, mul_mv_id_moe, mul_mv_id_moe_ids,
                                  mul_mv_id_swiglu, mul_mv_id_swiglu_route)
from ..kernels.router import covers as router_covers
from ..kernels.router import fused_topk
from .base import ExpertBackend, identity_term
from .mlx import MLXBackend


class KernelBackend(ExpertBackend):
    """Expert compute on the custom kernels of one flavor: "metal", "cuda" or "emulated".

    stats.rows counts (token, slot) pairs launched on the kernel path
    (identity and padding pairs included: counting only real ones would need
    a host sync); delegated batches count as in the `mlx` backend.
    """

    def __init__(self, flavor: str, fuse_swiglu: bool = True, fuse_combine: bool = True):
        super().__init__()
        self.name = flavor
        self.flavor = flavor
        self.fuse_swiglu = fuse_swiglu
        self.fuse_combine = fuse_combine
        self.fallback = MLXBackend()
        self.fallback.stats = self.stats
        self._cover: dict = {}

    def supports(self, experts) -> bool:
        return kernels_cover(experts)

    def route(self, logits, params):
        """The family's routing rule as one fused kernel (metal/router.metal)
        instead of five to eight MLX ops: in host-bound decode every op counts."""
        if logits.ndim == 2 and router_covers(logits.shape[-1], params):
            return fused_topk(logits, params, self.flavor)
        return super().route(logits, params)

    def _kind(self, experts, wg, wu, wd):
        """The layer's weight kind ("q4_0", "float") if the kernels cover it, else None;
        remembered per layer while its weight arrays stay the same (the full check
        reads module attributes: microseconds per call, per layer)."""
        entry = self._cover.get(id(experts))
        if entry is None or entry[0] is not wg or entry[1] is not wu or entry[2] is not wd:
            kind = weight_kind(experts["gate_proj"]) if kernels_cover(experts) else None
            entry = (wg, wu, wd, kind)
            self._cover[id(experts)] = entry
        return entry[3]

    def _count(self, pairs: int) -> None:
        self.stats.calls += 1
        self.stats.rows += pairs

    def _launch(self, ids, weights):
        """Count the launched pairs; ids int32 and weights float32 as the kernels read them.
        (astype always adds a graph node, a launch on the GPU: only convert when needed.)"""
        self._count(ids.size)
        if ids.dtype != mx.int32:
            ids = ids.astype(mx.int32)
        if weights.dtype != mx.float32:
            weights = weights.astype(mx.float32)
        return ids, weights

    def __call__(self, x, ids, weights, experts, n_identity=0, may_pad=False):
        wg, wu, wd = expert_weights(experts)
        path = kernel_path(x, ids, self._kind(experts, wg, wu, wd))
        if path is None:
            return self.fallback(x, ids, weights, experts, n_identity=n_identity, may_pad=may_pad)
        if path == "mm":
            return self.prefill(x, ids, weights, experts, wg, wu, wd, n_identity)
        T, k = ids.shape
        ids, weights = self._launch(ids, weights)
        f = self.flavor
        if self.fuse_swiglu:
            h = mul_mv_id_swiglu(x, ids, wg, wu, f)
        else:
            h = nn.silu(mul_mv_id(x, ids, wg, True, f)) * mul_mv_id(x, ids, wu, True, f)
        if self.fuse_combine:
            return mul_mv_id_down_combine(h, ids, weights, x, wd, n_identity, f)
        E = experts.num_experts
        down = mul_mv_id(h, ids, wd, False, f).reshape(T, k, -1)  # zero rows for non-real slots
        real = (ids >= 0) & (ids < E)
        y = (down * mx.where(real, weights, 0.0)[..., None]).sum(axis=1)
        if n_identity:
            y = y + identity_term(x, ids, weights, E, n_identity)
        return y.astype(x.dtype)

    def decode_residual(self, x, ids, weights, experts, n_identity, residual, count=None):
        """residual + the layer's experts for a decode-sized batch in two launches
        (mul_mv_id_swiglu, then mul_mv_id_down_combine with the residual add), or in one
        (mul_mv_id_moe_ids) where `count` is given (the call site's
        registry.ticket_counter); None where the GEMV kernels do not take it (the caller
        then adds the residual to this backend's plain call).  mlx_moe/fused_step.py's
        decoder layers use it."""
        wg, wu, wd = expert_weights(experts)
        if kernel_path(x, ids, self._kind(experts, wg, wu, wd)) != "mv":
            return None
        ids, weights = self._launch(ids, weights)
        if count is not None:
            return mul_mv_id_moe_ids(x, ids, weights, wg, wu, wd, n_identity, residual, count, self.flavor)[0]
        h = mul_mv_id_swiglu(x, ids, wg, wu, self.flavor)
        return mul_mv_id_down_combine(h, ids, weights, x, wd, n_identity, self.flavor, residual=residual)

    def decode_residual_routed(self, x, logits, params, experts, n_identity, residual, count=None):
        """(residual + the layer's experts, ids, weights) for one decode token from its
        router outputs, in two launches (mul_mv_id_swiglu_route runs the routing rule
        too, then mul_mv_id_down_combine with the residual add), or in one
        (mul_mv_id_moe) where `count` is given (the call site's registry.ticket_counter);
        None where the kernels do not take it (the caller then routes with fused_topk
        and calls decode_residual).  mlx_moe/fused_step.py's decoder layers use it."""
        if logits.ndim != 2:
            return None
        routed = self._routed_weights(x, logits.shape[-1], logits.shape[0] * params.k, params, experts)
        if routed is None:
            return None
        wg, wu, wd = routed
        if count is not None:
            return mul_mv_id_moe(x, logits, params, wg, wu, wd, n_identity, residual, count, self.flavor)
        h, ids, weights = mul_mv_id_swiglu_route(x, logits, params, wg, wu, self.flavor)
        out = mul_mv_id_down_combine(h, ids, weights, x, wd, n_identity, self.flavor, residual=residual)
        return out, ids, weights

    def _routed_weights(self, x, n_logits: int, pairs: int, params, experts):
        """(wg, wu, wd) where the routed decode kernels take these experts for `pairs`
        (token, slot) pairs of x routed over n_logits router outputs (counted), else None."""
        wg, wu, wd = expert_weights(experts)
        if not router_covers(n_logits, params) or pairs_path(x, pairs, self._kind(experts, wg, wu, wd)) != "mv":
            return None
        self._count(pairs)
        return wg, wu, wd

    def oproj_routed(self, parts_ml, o, residual, tail, params, experts, n_identity, moe_count, count):
        """(y, ids, weights) of o_proj with the split router tail (dense.dense_residual's)
        and then the layer's experts on its outputs, residual included, in one launch
        (kernels.chain.oproj_moe); None where the one-launch MoE layer would not take the
        experts (the caller then launches the two).  mlx_moe/fused_step.py's layers use it."""
        routed = self._routed_weights(residual, tail.gate.rows, params.k, params, experts)  # (xn: residual's shape)
        if routed is None:
            return None
        wg, wu, wd = routed
        return oproj_moe(parts_ml, o, residual, tail, params, wg, wu, wd, n_identity, moe_count, count, self.flavor)

    def prefill(self, x, ids, weights, experts, wg, wu, wd, n_identity):
        """map0 -> gate/up GEMMs with SwiGLU -> down GEMM -> combine (module docstring)."""
        ids, weights = self._launch(ids, weights)
        f = self.flavor
        E = wg.shape[0]
        route = map0(ids, E, f)
        if self.fuse_swiglu:
            h = mul_mm_id_swiglu(x, route, wg, wu, f)
        else:
            h = nn.silu(mul_mm_id(x, route, wg, True, f)) * mul_mm_id(x, route, wu, True, f)
        d = mul_mm_id(h, route, wd, False, f)
        return mul_mm_id_combine(d, ids, weights, x, E, n_identity, f)


def _available(flavor: str) -> bool:
    if flavor == "metal":
        return mx.metal.is_available()
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def register() -> None:
    from . import register_backend

    for flavor in ("metal", "cuda"):
        if _available(flavor):
            register_backend(flavor, lambda flavor=flavor: KernelBackend(flavor))


register()
