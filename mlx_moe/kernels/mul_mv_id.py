"""Typed calls of the mul_mv_id kernel family (metal/mul_mv_id.metal).

Each function takes MLX arrays, picks the template arguments and the launch
geometry, and returns the kernel's output.  `flavor` is "metal", "cuda" or
"emulated" (see registry.py).  Weights are either Q4_0 (uint16 words
[E, rows, cols/32*9]) or float [E, rows, cols]; the kernel reads ids to find
each slot's expert and never touches weights of identity or padding ids.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from . import dispatch
from .dispatch import DOWN, GATE_UP, Geometry, LayerGeometry
from .registry import check_counter, get_kernel
from .registry import kernel as registry_kernel

FAMILY = "mul_mv_id"


def _shape(w: mx.array) -> Tuple[str, int, int]:
    """(kind, rows, cols) of stacked expert weights."""
    if w.ndim != 3:
        raise ValueError(f"expert weights must be [E, rows, cols]; got shape {tuple(w.shape)}")
    if w.dtype == mx.uint16:
        if w.shape[2] % 9:
            raise ValueError(
                f"Q4_0 expert weights hold 9 uint16 words per 32 columns; last dim {w.shape[2]} is not a multiple of 9"
            )
        return "q4_0", w.shape[1], w.shape[2] // 9 * 32
    if w.dtype in (mx.float16, mx.bfloat16, mx.float32):
        return "float", w.shape[1], w.shape[2]
    raise TypeError(f"mul_mv_id reads Q4_0 (uint16) or float expert weights, not {w.dtype}")


def _gate_up_shape(wg: mx.array, wu: mx.array) -> Tuple[str, int, int]:
    """_shape of gate weights that up weights match."""
    if wu.shape != wg.shape or wu.dtype != wg.dtype:
        raise ValueError(f"gate and up weights differ: {wg.shape} {wg.dtype} vs {wu.shape} {wu.dtype}")
    return _shape(wg)


def _gemv_grid(rows: int, g: Geometry, z: int):
    n_tg = -(-rows // (g.nr * g.nsg))
    return (n_tg * 32 * g.nsg, 1, z), (32 * g.nsg, 1, 1)


def mul_mv_id(
    src: mx.array, ids: mx.array, w: mx.array, broadcast: bool, flavor: str,
    geometry: Optional[Geometry] = None,
) -> mx.array:
    """out[t*k + s] = W[ids[t, s]] @ src[t if broadcast else t*k + s]: [T*k, rows] float32.

    Rows of identity or padding slots are zero.
    """
    kind, rows, cols = _shape(w)
    T, k = ids.shape
    g = geometry or GATE_UP[kind]
    grid, tg = _gemv_grid(rows, g, T * k)
    kernel = get_kernel(flavor, FAMILY, "mul_mv_id", ["src", "ids", "w"], ["out"])
    return kernel(
        inputs=[src, ids, w],
        template=[("T", src.dtype), ("WT", w.dtype), ("K", cols), ("N", rows), ("NE", w.shape[0]),
                  ("KS", k), ("NR", g.nr), ("NSG", g.nsg), ("BCAST", bool(broadcast)), ("NQ", g.nq)],
        grid=grid, threadgroup=tg, output_shapes=[(T * k, rows)], output_dtypes=[mx.float32],
    )[0]


def mul_mv_id_swiglu(
    x: mx.array, ids: mx.array, wg: mx.array, wu: mx.array, flavor: str,
    geometry: Optional[Geometry] = None,
) -> mx.array:
    """h[t*k + s] = silu(Wg[e] @ x[t]) * (Wu[e] @ x[t]), e = ids[t, s]: [T*k, ffn] float32.

    Rows of identity or padding slots are left unwritten.
    """
    kind, rows, cols = _gate_up_shape(wg, wu)
    T, k = ids.shape
    g = geometry or GATE_UP[kind]
    grid, tg = _gemv_grid(rows, g, T * k)
    kernel = get_kernel(flavor, FAMILY, "mul_mv_id_swiglu", ["x", "ids", "wg", "wu"], ["h"])
    return kernel(
        inputs=[x, ids, wg, wu],
        template=[("T", x.dtype), ("WT", wg.dtype), ("K", cols), ("N", rows), ("NE", wg.shape[0]),
                  ("KS", k), ("NR", g.nr), ("NSG", g.nsg), ("NQ", g.nq)],
        grid=grid, threadgroup=tg, output_shapes=[(T * k, rows)], output_dtypes=[mx.float32],
    )[0]


def mul_mv_id_swiglu_route(
    x: mx.array, logits: mx.array, params, wg: mx.array, wu: mx.array, flavor: str,
    geometry: Optional[Geometry] = None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """(h, ids, weights): mul_mv_id_swiglu's h with the routing done in the same launch,
    ids [T, k] int32 and weights [T, k] float32 as router.fused_topk returns them for
    `logits` [T, experts] under rule `params` (a mlx_moe.router.RouterParams that
    router.unsupported accepts)."""
    from .router import check_logits, rule_arguments

    kind, rows, cols = _gate_up_shape(wg, wu)
    if logits.ndim != 2 or x.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"logits must be [tokens, experts] beside x [tokens, hidden]; got {tuple(logits.shape)}, "
                         f"{tuple(x.shape)}")
    check_logits(logits, params)
    T, k = logits.shape[0], params.k
    inputs, rule = rule_arguments(logits.shape[1], params)
    g = geometry or GATE_UP[kind]
    grid, tg = _gemv_grid(rows, g, T * k)
    return tuple(registry_kernel(flavor, "mul_mv_id_swiglu_route")(
        inputs=[x, logits, *inputs, wg, wu],
        template=[("T", x.dtype), ("WT", wg.dtype), ("K", cols), ("N", rows), ("NE", wg.shape[0]),
                  ("KS", k), ("NR", g.nr), ("NSG", g.nsg), ("NQ", g.nq), *rule],
        grid=grid, threadgroup=tg, output_shapes=[(T * k, rows), (T, k), (T, k)],
        output_dtypes=[mx.float32, mx.int32, mx.float32],
    ))


def mul_mv_id_down_combine(
    h: mx.array, ids: mx.array, weights: mx.array, x: mx.array, wd: mx.array, n_identity: int,
    flavor: str, geometry: Optional[Geometry] = None, residual: Optional[mx.array] = None,
) -> mx.array:
    """y[t] = sum_s w[t,s] * Wd[ids[t,s]] @ h[t*k+s] (real ids) + sum_s w[t,s] * x[t] (identity ids).

    h [T*k, ffn] float32, x [T, hidden]; returns [T, hidden] in x's dtype.
    residual [T, hidden] (x's dtype): y + residual instead, in the same launch (the
    decoder layer's residual add after the MoE block; rounded as mlx-lm adds).
    """
    kind, rows, cols = _shape(wd)
    T, k = ids.shape
    g = geometry or DOWN[kind]
    nsg = min(g.nsg, k)
    n_tg = -(-rows // g.nr)
    if residual is None:
        kernel = get_kernel(flavor, FAMILY, "mul_mv_id_down_combine", ["h", "ids", "wts", "x", "wd"], ["y"])
        extra = []
    else:
        if residual.shape != (T, rows) or residual.dtype != x.dtype:
            raise ValueError(f"residual must be [{T}, {rows}] {x.dtype}; got {tuple(residual.shape)} {residual.dtype}")
        kernel = registry_kernel(flavor, "mul_mv_id_down_combine_res")
        extra = [residual]
    return kernel(
        inputs=[h, ids, weights, x, wd, *extra],
        template=[("T", x.dtype), ("WT", wd.dtype), ("K", cols), ("N", rows), ("NE", wd.shape[0]),
                  ("NI", int(n_identity)), ("KS", k), ("NR", g.nr), ("NSG", nsg), ("NQ", g.nq)],
        grid=(n_tg * 32 * nsg, T, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(T, rows)], output_dtypes=[x.dtype],
    )[0]


def mul_mv_id_moe(
    x: mx.array, logits: mx.array, params, wg: mx.array, wu: mx.array, wd: mx.array, n_identity: int,
    residual: mx.array, count: mx.array, flavor: str, geometry: Optional[LayerGeometry] = None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """(y, ids, weights) of one decode MoE layer in one launch: y = residual + the
    experts of x [T, hidden] routed by `logits` [T, experts] under rule `params`, as
    mul_mv_id_swiglu_route then mul_mv_id_down_combine(residual=...) give them.

    count: registry.ticket_counter() (uint32, >= 2 words, zero), one per call site:
    the launch's down threadgroups wait on it for the gate/up ones and leave it zero.
    The kernel leans on in-order threadgroup starts (registry.KernelSpec.in_order).
    """
    y, ids, weights, _ = moe_layer_launch(x, logits, params, wg, wu, wd, n_identity, residual, count, flavor,
                                          geometry)
    return y, ids, weights


def moe_layer_launch(x, logits, params, wg, wu, wd, n_identity, residual, count, flavor, geometry=None):
    """mul_mv_id_moe's launch: (y, ids, weights, h), h the experts' SwiGLU rows [T * k,
    ffn] of real slots (float32, or bfloat16 at stage bit 16; others unwritten)."""
    return _moe_layer(x, logits, params, wg, wu, wd, n_identity, residual, count, flavor, geometry, False)


TRACE_STAMPS = 7  # clock stamps a threadgroup writes with the TRACE option


def moe_layer_trace(x, logits, params, wg, wu, wd, n_identity, residual, count, flavor, geometry=None):
    """moe_layer_launch through mul_mv_id_moe_trace: (y, ids, weights, h, trace), trace
    [threadgroups, 7] uint32, each threadgroup's clock (low 32 bits of nanoseconds; CUDA
    only, zeros elsewhere) at its start, router outputs loaded, rule done, routed, rows
    staged, h ready (down) or stored (gate/up), end (metal/mul_mv_id.metal, option TRACE;
    tools/trace_moe_layer.py)."""
    return _moe_layer(x, logits, params, wg, wu, wd, n_identity, residual, count, flavor, geometry, True)


def _moe_layer(x, logits, params, wg, wu, wd, n_identity, residual, count, flavor, geometry, trace: bool):
    from .router import check_logits

    kind, ffn, hidden = _gate_up_shape(wg, wu)
    if logits.ndim != 2 or x.ndim != 2 or logits.shape[0] != x.shape[0] or x.shape[1] != hidden:
        raise ValueError(f"logits must be [tokens, experts] beside x [tokens, {hidden}]; got {tuple(logits.shape)}, "
                         f"{tuple(x.shape)}")
    T = x.shape[0]
    if residual.shape != (T, hidden) or residual.dtype != x.dtype:
        raise ValueError(f"residual must be [{T}, {hidden}] {x.dtype}; got {tuple(residual.shape)} {residual.dtype}")
    check_logits(logits, params)
    rule_inputs, template, groups, nsg, h_dtype = moe_layer_args(T, x.dtype, logits.shape[1], params, wg, wu, wd,
                                                                 n_identity, count, geometry)
    k = params.k
    out = registry_kernel(flavor, "mul_mv_id_moe_trace" if trace else "mul_mv_id_moe")(
        inputs=[x, logits, *rule_inputs, wg, wu, wd, residual, count], template=template,
        grid=(groups * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(T * k, ffn), (T, k), (T, k), (T, hidden)] + [(groups, TRACE_STAMPS)] * trace,
        output_dtypes=[h_dtype, mx.int32, mx.float32, x.dtype] + [mx.uint32] * trace,
    )
    h, ids, weights, y = out[:4]
    return (y, ids, weights, h) + tuple(out[4:])


def mul_mv_id_moe_ids(
    x: mx.array, ids: mx.array, weights: mx.array, wg: mx.array, wu: mx.array, wd: mx.array, n_identity: int,
    residual: mx.array, count: mx.array, flavor: str, geometry: Optional[LayerGeometry] = None,
    trace: bool = False,
):
    """y = residual + the experts of x [T, hidden] under given routing (ids [T, k] int32,
    weights [T, k] float32): one decode MoE layer's gate + up + down + combine in one
    launch (mul_mv_id_moe's body, option IDS), for routing made upstream once per token.
    Returns (y, h), h as moe_layer_launch's; with trace, (y, h, trace) as moe_layer_trace's
    (stamps 1 and 2, the rule's, equal the start).  count as mul_mv_id_moe's."""
    kind, ffn, hidden = _gate_up_shape(wg, wu)
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [tokens, {hidden}]; got {tuple(x.shape)}")
    T = x.shape[0]
    if ids.ndim != 2 or ids.shape[0] != T or ids.dtype != mx.int32:
        raise ValueError(f"ids must be int32 [{T}, k]; got {tuple(ids.shape)} {ids.dtype}")
    if weights.shape != ids.shape or weights.dtype != mx.float32:
        raise ValueError(f"weights must be float32 {tuple(ids.shape)} beside ids; got {tuple(weights.shape)} "
                         f"{weights.dtype}")
    if residual.shape != (T, hidden) or residual.dtype != x.dtype:
        raise ValueError(f"residual must be [{T}, {hidden}] {x.dtype}; got {tuple(residual.shape)} {residual.dtype}")
    k = ids.shape[1]
    _, template, groups, nsg, h_dtype = moe_layer_args(T, x.dtype, 0, None, wg, wu, wd, n_identity, count, geometry,
                                                       k=k)
    out = registry_kernel(flavor, "mul_mv_id_moe_ids_trace" if trace else "mul_mv_id_moe_ids")(
        inputs=[x, ids, weights, wg, wu, wd, residual, count], template=template,
        grid=(groups * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(T * k, ffn), (T, hidden)] + [(groups, TRACE_STAMPS)] * trace,
        output_dtypes=[h_dtype, x.dtype] + [mx.uint32] * trace,
    )
    return (out[1], out[0]) + tuple(out[2:])


# LayerGeometry.stage bits taken only with bfloat16 activations and Q4_0 weights (h in bfloat16
# and the tensor-core tiles with what they build on), dropped elsewhere.
BF16_Q4_0_BITS = 16 | 32 | 128 | 512 | 1024 | 8192


def moe_layer_args(T: int, dtype, n_logits: int, params, wg: mx.array, wu: mx.array, wd: mx.array, n_identity: int,
                   count: mx.array, geometry: Optional[LayerGeometry] = None, k: Optional[int] = None):
    """(rule inputs, template, threadgroups, simdgroups a threadgroup, h's dtype) of
    mul_mv_id_moe's body for T tokens of `dtype` routed over n_logits router outputs,
    checked (the kernels that run the body: mul_mv_id_moe, decode_chain's oproj_moe).
    params None: the routing given (option IDS, k slots a token): no rule inputs, rule
    template or SHARE_ROUTE.  h is float32 but where the geometry's stage bit 16 asks
    for bfloat16 h (taken only with bfloat16 activations and Q4_0 weights, as bit 32's
    tensor cores; elsewhere both bits are dropped)."""
    from .router import rule_arguments

    kind, ffn, hidden = _gate_up_shape(wg, wu)
    dkind, drows, dcols = _shape(wd)
    if dkind != kind or drows != hidden or dcols != ffn or wd.shape[0] != wg.shape[0]:
        raise ValueError(f"down weights {tuple(wd.shape)} {wd.dtype} do not match gate/up {tuple(wg.shape)} {wg.dtype} "
                         f"(want [{wg.shape[0]}, {hidden}, {ffn}] columns of the same format)")
    share = params is not None and bool(dispatch.SHARE_ROUTE)  # looked up per call: tools switch it
    check_counter(count, 3 if share else 2, "mul_mv_id_moe")
    if params is not None:
        k = params.k
        inputs, rule = rule_arguments(n_logits, params)
    elif k is None:
        raise ValueError("moe_layer_args: the routing given (params None) needs k, the slots a token")
    else:
        inputs, rule = [], []
    g = geometry or dispatch.MOE_LAYER[kind]  # looked up per call: tools switch it
    n_gate_up = -(-ffn // (g.gate_nr * g.nsg)) * T * k
    n_down = -(-hidden // g.down_nr) * T
    stage = int(g.stage) if dtype == mx.bfloat16 and kind == "q4_0" else int(g.stage) & ~BF16_Q4_0_BITS
    template = [("T", dtype), ("WT", wg.dtype), ("D", hidden), ("F", ffn), ("NE", wg.shape[0]),
                ("NI", int(n_identity)), ("KS", k), ("NT", T), ("NRG", g.gate_nr), ("NRD", g.down_nr),
                ("NSG", g.nsg), ("NQ", g.nq), ("STAGE", stage), *rule] + [("SHARE_ROUTE", share)] * (params is not None)
    return inputs, template, n_gate_up + n_down, g.nsg, mx.bfloat16 if stage & 16 else mx.float32
