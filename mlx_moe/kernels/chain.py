"""Typed calls of the decode_chain kernels (metal/decode_chain.metal): launches of the
fused decoder layer run as one, the later kernels' threadgroups waiting inside the
launch for the earlier ones (NVIDIA GPUs start a launch's threadgroups in index order;
KernelSpec.in_order).

    count = registry.ticket_counter()                      # one per call site, zero between launches
    parts, ml = qkv_attention(h, norm_w, eps, [q, k, v], ..., keys, values, pos, scale, flavor, count)
    y, ids, weights = oproj_moe((parts, ml), o, h, router_tail, params, wg, wu, wd, n_identity,
                                moe_count, count, flavor)
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from . import attention, dense
from .registry import check_counter, kernel

# qkv_attention's simdgroups per threadgroup, the q/k/v projections' and the attention's
# alike (a launch has one threadgroup size).  H100, Qwen3-30B-A3B, two compiled steps
# under ncu on one machine (BENCHMARKS.md 2026-12-06, fifth session): 4 654.9 us a step
# (13.6 a layer), 8 (the attention's PARTS_NSG alone) 666.9, 16 777.7.  At 4 the
# projections run at dense.DENSE_NSG as the separate dense_norm launch does.
QKV_NSG = 4


def qkv_attention(x: mx.array, norm_weight: mx.array, eps: float, ws, n_heads: int, n_kv_heads: int,
                  q_norm: Optional[mx.array], k_norm: Optional[mx.array], qk_eps: float, rope_base: float,
                  rope_scale: float, traditional: bool, keys: mx.array, values: mx.array, pos: mx.array,
                  scale: float, flavor: str, count: mx.array, nr: Optional[int] = None,
                  splits: Optional[int] = None, nsg: Optional[int] = None, u: Optional[int] = None):
    """dense.dense_norm (x's input RMSNorm, the stacked q/k/v projections `ws`) then
    attention.decode_attention_parts with write_cache (the new key and value stored in
    keys / values in place) in one launch; returns (parts [HQ, S, D], ml [HQ, S, 2]).

    count: a ticket counter (registry.ticket_counter(), 4 words) only this call site uses.
    nr: dense rows per simdgroup (default dense.DENSE_NR); splits, nsg, u: the attention's
    geometry (default attention.SPLITS, QKV_NSG, attention.PARTS_U); nsg is the dense
    part's too."""
    nr = nr or dense.DENSE_NR
    splits, nsg, u = splits or attention.SPLITS, nsg or QKV_NSG, u or attention.PARTS_U
    check_counter(count, 4, "qkv_attention")
    d_inputs, d_template, n = dense.dense_norm_args(x, norm_weight, eps, ws, flavor, nr, nsg)
    a_inputs, a_template = attention.attention_parts_args(x.dtype, n, n_heads, n_kv_heads, q_norm, k_norm, qk_eps,
                                                          rope_base, rope_scale, traditional, keys, values, pos,
                                                          scale, splits, nsg, u, write_cache=True)
    shared = {name for name, _ in d_template}
    template = d_template + [(name, value) for name, value in a_template if name not in shared]
    groups = -(-n // (nr * nsg)) + splits * n_heads
    D = keys.shape[-1]
    _, parts, ml = kernel(flavor, "qkv_attention")(
        inputs=d_inputs + a_inputs + [count], template=template,
        grid=(groups * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(1, n), (n_heads, splits, D), (n_heads, splits, 2)],
        output_dtypes=[x.dtype, mx.float32, mx.float32])
    return parts, ml


def oproj_moe(parts_ml, o, res: mx.array, router, params, wg: mx.array, wu: mx.array, wd: mx.array,
              n_identity: int, moe_count: mx.array, count: mx.array, flavor: str, nr: Optional[int] = None,
              geometry=None):
    """dense.dense_residual(parts_ml, o, res, router=router) with the split router tail,
    then mul_mv_id.mul_mv_id_moe on its (xn, logits) with its output as the residual, in one
    launch; returns (y, ids, weights) as mul_mv_id_moe does.

    router: a dense.RouterTail whose counter holds the split tail's shares at nr x nsg;
    moe_count: mul_mv_id_moe's counter; count: this chain's (registry.ticket_counter()).
    nr: o_proj rows per simdgroup (default dense.TAIL_NR); the simdgroups per threadgroup
    are the MoE layer's geometry's (default dispatch.MOE_LAYER), one size for the launch."""
    from .mul_mv_id import _gate_up_shape, moe_layer_args

    if dense.ROUTER_TAIL != "split":
        raise ValueError(f"oproj_moe chains the split router tail; dense.ROUTER_TAIL is {dense.ROUTER_TAIL!r}")
    check_counter(count, 2, "oproj_moe")
    T = res.shape[0] if res.ndim == 2 else 1
    rule_inputs, m_template, m_groups, nsg = moe_layer_args(
        T, res.dtype, router.gate.rows, params, wg, wu, wd, n_identity, moe_count, geometry)
    nr = nr or dense.TAIL_NR
    o_template = dense.dense_residual_template(parts_ml, o, res, flavor, nr, nsg)
    o_inputs, tail_template = dense.router_tail_args(parts_ml, o, res, router, flavor, nr, nsg)
    shared = {name for name, _ in o_template + tail_template}
    template = o_template + tail_template + [(n, v) for n, v in m_template if n not in shared]
    o_groups = -(-o.rows // (nr * nsg))
    ffn, k = _gate_up_shape(wg, wu)[1], params.k
    out, xn, logits, h, ids, weights, y = kernel(flavor, "oproj_moe")(
        inputs=o_inputs + [*rule_inputs, wg, wu, wd, moe_count, count], template=template,
        grid=((o_groups + m_groups) * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[res.shape, (1, o.rows), (1, router.gate.rows), (T * k, ffn), (T, k), (T, k), res.shape],
        output_dtypes=[res.dtype] * 3 + [mx.float32, mx.int32, mx.float32, res.dtype])
    return y, ids, weights
