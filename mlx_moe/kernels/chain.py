"""Typed calls of the decode_chain kernels (metal/decode_chain.metal): launches of the
fused decoder layer run as one, the later kernels' threadgroups waiting inside the
launch for the earlier ones (NVIDIA GPUs start a launch's threadgroups in index order;
KernelSpec.in_order).

    count = registry.ticket_counter()                      # one per call site, zero between launches
    parts, ml = qkv_attention(h, norm_w, eps, [q, k, v], ..., keys, values, pos, scale, flavor, count)
    h2, xn, logits = qkv_attention_oproj(h, norm_w, eps, [q, k, v], ..., keys, values, pos, scale, o,
                                         router_tail, flavor, count)   # and o_proj, one launch
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
    check_counter(count, 4, "qkv_attention")
    inputs, template, groups, shapes, nsg = _qkv_args(x, norm_weight, eps, ws, n_heads, n_kv_heads, q_norm, k_norm,
                                                      qk_eps, rope_base, rope_scale, traditional, keys, values, pos,
                                                      scale, flavor, nr, splits, nsg, u)
    _, parts, ml = kernel(flavor, "qkv_attention")(
        inputs=inputs + [count], template=template, grid=(groups * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=shapes, output_dtypes=[x.dtype, mx.float32, mx.float32])
    return parts, ml


def _qkv_args(x, norm_weight, eps, ws, n_heads, n_kv_heads, q_norm, k_norm, qk_eps, rope_base, rope_scale,
              traditional, keys, values, pos, scale, flavor, nr, splits, nsg, u):
    """qkv_attention's (inputs but its counter, template, threadgroups, output shapes, nsg),
    checked, at the geometry's defaults where None."""
    nr = nr or dense.DENSE_NR
    splits, nsg, u = splits or attention.SPLITS, nsg or QKV_NSG, u or attention.PARTS_U
    d_inputs, d_template, n = dense.dense_norm_args(x, norm_weight, eps, ws, flavor, nr, nsg)
    a_inputs, a_template = attention.attention_parts_args(x.dtype, n, n_heads, n_kv_heads, q_norm, k_norm, qk_eps,
                                                          rope_base, rope_scale, traditional, keys, values, pos,
                                                          scale, splits, nsg, u, write_cache=True)
    shared = {name for name, _ in d_template}
    template = d_template + [(name, value) for name, value in a_template if name not in shared]
    groups = -(-n // (nr * nsg)) + splits * n_heads
    D = keys.shape[-1]
    return d_inputs + a_inputs, template, groups, [(1, n), (n_heads, splits, D), (n_heads, splits, 2)], nsg


# o_proj's rows per simdgroup in qkv_attention_oproj: at 2 a simdgroup issues its rows'
# every weight before the wait (decode_layer.metal's moe_dense_steps: 8 / NR steps of
# 32 x 16 bytes a row, Qwen3-30B-A3B's 4096 4-bit columns being 4).
OPROJ_NR = 2
# qkv_attention_oproj's simdgroups per threadgroup, all three parts'.  H100, Qwen3-30B-A3B
# (ncu over two compiled steps, BENCHMARKS.md 2026-12-06, sixth session): 33.0 us a layer
# at 16 (96 registers: o_proj in 64 threadgroups, as its own launch), 35.0 at 8 and 41.3
# at 4 (128 registers; 128 and 256 o_proj threadgroups, each combining the whole
# attention output, and the last one adding 128 / 256 shares a router row).
ATTENTION_NSG = 16
# dense_residual's template names that qkv_attention_oproj's o_proj body takes under
# other names (its //@body line renames them): those the q/k/v body uses with other values.
_OPROJ_NAMES = {"FMT": "FMTO", "GS": "GSO", "K": "KO", "N": "NO", "NR": "NRO"}


def qkv_attention_oproj(x: mx.array, norm_weight: mx.array, eps: float, ws, n_heads: int, n_kv_heads: int,
                        q_norm: Optional[mx.array], k_norm: Optional[mx.array], qk_eps: float, rope_base: float,
                        rope_scale: float, traditional: bool, keys: mx.array, values: mx.array, pos: mx.array,
                        scale: float, o, router, flavor: str, count: mx.array, nr: Optional[int] = None,
                        onr: Optional[int] = None, splits: Optional[int] = None, nsg: Optional[int] = None,
                        u: Optional[int] = None):
    """qkv_attention, then dense.dense_residual((parts, ml), o, x, router=router) with the
    split router tail, in one launch: the decoder layer's attention block.  Returns (out
    [1, hidden] = x + o_proj(attention), xn [1, hidden], router logits [1, experts]), as
    dense_residual with a router tail (one without a routing rule: at 16 simdgroups this
    launch is at its 128-register wall, and the rule took it to 130 under nvcc).

    count: this call site's registry.ticket_counter() (4 words); router: a dense.RouterTail
    whose counter holds the split tail's shares at onr x nsg (dense.tail_counter_words).
    onr: o_proj's rows per simdgroup (default OPROJ_NR); nsg: the whole launch's simdgroups
    per threadgroup (default ATTENTION_NSG); the rest as qkv_attention's."""
    if dense.ROUTER_TAIL != "split":
        raise ValueError(f"qkv_attention_oproj chains the split router tail; dense.ROUTER_TAIL is "
                         f"{dense.ROUTER_TAIL!r}")
    check_counter(count, 4, "qkv_attention_oproj")
    if router.rule is not None:
        raise ValueError("qkv_attention_oproj runs no routing rule in its router tail; give it a RouterTail without one")
    nsg = nsg or ATTENTION_NSG
    inputs, template, groups, shapes, nsg = _qkv_args(x, norm_weight, eps, ws, n_heads, n_kv_heads, q_norm, k_norm,
                                                      qk_eps, rope_base, rope_scale, traditional, keys, values, pos,
                                                      scale, flavor, nr, splits, nsg, u)
    onr = onr or OPROJ_NR
    o_template = dense.parts_template(shapes[1], o, x, flavor, onr, nsg)
    tail_inputs, tail_template = dense.router_tail_inputs(o, router, flavor, onr, nsg)
    names = dict(template)
    for name, value in o_template:
        name = _OPROJ_NAMES.get(name, name)
        if name in names and names[name] != value:  # T, NSG, S: the launch's own
            raise ValueError(f"qkv_attention_oproj: o_proj's {name} = {value} differs from the launch's "
                             f"{names[name]}")
        names[name] = value
    template = list(names.items()) + tail_template
    o_groups = -(-o.rows // (onr * nsg))
    _, _, _, out, xn, logits = kernel(flavor, "qkv_attention_oproj")(
        inputs=inputs + [count, *dense.weight_inputs(o), *tail_inputs], template=template,
        grid=((groups + o_groups) * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=shapes + [x.shape, (1, o.rows), (1, router.gate.rows)],
        output_dtypes=[x.dtype, mx.float32, mx.float32] + [x.dtype] * 3)
    return out, xn, logits


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
    if router.rule is not None:
        raise ValueError("oproj_moe runs the routing rule in its MoE threadgroups; give it a RouterTail without one")
    check_counter(count, 2, "oproj_moe")
    T = res.shape[0] if res.ndim == 2 else 1
    rule_inputs, m_template, m_groups, nsg, h_dtype = moe_layer_args(
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
        output_dtypes=[res.dtype] * 3 + [h_dtype, mx.int32, mx.float32, res.dtype])
    return y, ids, weights
