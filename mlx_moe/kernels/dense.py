"""Typed calls of the decode_layer kernel family (metal/decode_layer.metal): the
dense GEMVs of a one-token decoder layer, their rows spread over the GPU.

- `dense_norm`: input RMSNorm -> up to three projections (+ biases), stacked
  (q, k, v); with `xn=True` also the normalized input (the router's);
- `dense_residual`: a projection plus the residual add after it (o_proj), its
  input either a vector or the attention's split results (`parts`);
- `dense_embed`: one row of an embedding table (the token's), dequantized.

The dense projections are mlx's own modules, read in place: `nn.QuantizedLinear`
in MLX's affine mode (4 or 8 bits, groups of 32, 64 or 128: mlx-community
checkpoints) and `nn.Linear` with float16, bfloat16 or float32 weights (Hugging
Face checkpoints, GGUF's dense tensors); embedding tables likewise
(`nn.QuantizedEmbedding`, `nn.Embedding`).  `dense_weight` says what a module is
to the kernels, or why it cannot be read (the caller then keeps MLX's ops).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from . import registry
from .registry import constant, kernel, stand_in

FLOAT_FMT = {mx.float16: 16, mx.bfloat16: 17, mx.float32: 32}
GROUP_SIZES = (32, 64, 128)
# Input features a threadgroup stages (float32, rows padded to 33 floats, plus the
# affine weights' per-lane sums): Metal's 32 KB of threadgroup memory holds 6144 of
# them beside the attention combine's coefficients, CUDA's 48 KB of static shared
# memory 8192 (Qwen3-235B's o_proj).  The emulation follows Metal.
MAX_STAGED = {"metal": 6144, "emulated": 6144, "cuda": 8192}


def max_staged(flavor: str) -> int:
    return MAX_STAGED.get(flavor, min(MAX_STAGED.values()))

# Launch geometry: DENSE_NR rows per simdgroup, DENSE_NSG simdgroups per
# threadgroup (Qwen3-30B-A3B: q/k/v 640 threadgroups, o_proj 256); the router's
# few rows take ROUTER_NR per simdgroup (128 experts: 32 threadgroups).
DENSE_NR, DENSE_NSG = 2, 4
ROUTER_NR = 1
# dense_residual with the router tail (RouterTail): the launch's last threadgroup
# runs the router projection alone, TAIL_RNR rows a simdgroup at a time, so it takes
# larger threadgroups than a plain o_proj launch.  H100, Qwen3-30B-A3B (ncu; BENCHMARKS.md,
# 2026-12-05, third session): 1x16 17.9 us, 2x16 18.6 (measured end to end), 2x8 19.2,
# against 8.5 + 4.9 for o_proj and the router in two launches.
TAIL_NR, TAIL_NSG, TAIL_RNR = 2, 16, 2
# How that launch projects the router: "one" (its last threadgroup reads the whole router,
# dense_residual_parts_router) or "split" (every threadgroup projects its own rows of the
# output and the last one adds the shares: dense_residual_parts_router_split, metal/
# decode_layer.metal says why).  H100 (ncu, BENCHMARKS.md 2026-12-06, second session):
# split 14.5 us at 1x16 and 2x16 against 17.7 / 18.8 for one, 13.5 for two launches.  End
# to end (third session; that session's comparison had replayed the "one" trace, see
# BENCHMARKS.md's correction): 355.8 tok/s against 351.9, and with the MoE layer in one
# launch (fused_step.MOE_ONE_LAUNCH) 374.5 against 355.7 (5 of 5 paired repetitions
# faster), so "split" is the default.
ROUTER_TAILS = ("one", "split")
ROUTER_TAIL = "split"


def router_tail(kind: str):
    """ROUTER_TAIL = kind inside a with block, restored after: checks and benchmarks of one kind."""
    if kind not in ROUTER_TAILS:
        raise ValueError(f"router tail {kind!r}; choose one of {', '.join(ROUTER_TAILS)}")
    return registry.switched(__name__, ("ROUTER_TAIL",), ROUTER_TAIL=kind)


# The LM head (the final norm and the vocabulary projection in one dense_norm launch).
# Qwen3's 151936 x 2048 4-bit head on the H100 (ncu; BENCHMARKS.md, 2026-12-05, third
# session): 4 x 8 76.7 us (2.28 TB/s; 4 x 4 77.1, 8 x 4 77.5, 2 x 8 82.7, 2 x 4 99.1),
# MLX's rms_norm + qmv 180.2.  Fewer, larger threadgroups stage the norm fewer times.
HEAD_NR, HEAD_NSG = 4, 8


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
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
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
    if type(module) in (nn.Linear, nn.Embedding):
        w = module.weight
        if w.dtype not in FLOAT_FMT:
            return f"weight dtype {w.dtype}"
        if (w.shape[1] * w.itemsize) % 16:
            return f"{w.shape[1]} input features: a row is not a multiple of 16 bytes"
        return None
    return (f"{type(module).__name__} (the kernels read nn.Linear, nn.QuantizedLinear, nn.Embedding and "
            f"nn.QuantizedEmbedding)")


def dense_weight(module) -> DenseWeight:
    """The kernels' view of an nn.Linear / nn.QuantizedLinear (no copy)."""
    problem = dense_unsupported(module)
    if problem is not None:
        raise ValueError(f"the decode_layer kernels cannot read this projection: {problem}")
    bias = module["bias"] if "bias" in module else None
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
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


def stack_unsupported(ws, flavor: str, nr: Optional[int] = None) -> Optional[str]:
    """Why dense_norm cannot take the projections `ws` (1 to 3, stacked by rows) on
    kernel flavor `flavor` with nr rows a simdgroup (default DENSE_NR), or None."""
    nr = nr or DENSE_NR
    if not 1 <= len(ws) <= 3:
        return f"dense_norm stacks 1 to 3 projections, not {len(ws)}"
    if not _same_format(ws):
        return "the stacked projections differ in format"
    if len({w.bias is None for w in ws}) > 1:
        return "only some of the stacked projections have a bias"
    if any(w.rows % nr for w in ws[:-1]):
        return f"projection rows {[w.rows for w in ws]} are not multiples of {nr} (a simdgroup's rows)"
    if ws[0].cols > max_staged(flavor):
        return f"hidden size {ws[0].cols} > {max_staged(flavor)} (the {flavor} kernels' staging limit)"
    return None


def weight_inputs(d: DenseWeight):
    return [d.w, d.scales, d.biases]


def fmt_template(d: DenseWeight):
    return [("FMT", d.fmt), ("GS", d.group_size or 32)]


def dense_norm(x: mx.array, norm_weight: mx.array, eps: float, ws, flavor: str, xn: bool = False,
               nr: Optional[int] = None, nsg: Optional[int] = None):
    """y [1, sum of rows] = T(W . rms_norm(x) (+ bias)) for one token x [..., K] over the
    projections `ws` (DenseWeight, 1 to 3) stacked by rows, in x's dtype; with xn,
    (y, the normalized input [1, K]).  nr, nsg: the launch geometry (default DENSE_NR, DENSE_NSG)."""
    nr, nsg = nr or DENSE_NR, nsg or DENSE_NSG
    inputs, template, n = dense_norm_args(x, norm_weight, eps, ws, flavor, nr, nsg)
    T = x.dtype
    outs = kernel(flavor, "dense_norm_xn" if xn else "dense_norm")(
        inputs=inputs, template=template, grid=(-(-n // (nr * nsg)) * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(1, n)] + ([(1, ws[0].cols)] if xn else []), output_dtypes=[T] * (2 if xn else 1),
    )
    return (outs[0], outs[1]) if xn else outs[0]


def dense_norm_args(x: mx.array, norm_weight: mx.array, eps: float, ws, flavor: str, nr: int, nsg: int):
    """(inputs, template, rows) of dense_norm's body for these arguments, checked (the
    kernels that run the body: dense_norm, decode_chain's qkv_attention)."""
    problem = stack_unsupported(ws, flavor, nr)
    if problem is not None:
        raise ValueError(f"dense_norm: {problem}")
    if x.size != ws[0].cols:
        raise ValueError(f"dense_norm takes one token of {ws[0].cols} features; got x of shape {tuple(x.shape)}")
    T = x.dtype
    full = list(ws) + [ws[0]] * (3 - len(ws))  # unused matrices: stand-ins with 0 rows
    rows = [w.rows for w in ws] + [0] * (3 - len(ws))
    has_bias = ws[0].bias is not None
    biases = [w.bias for w in full] if has_bias else [stand_in(T)] * 3
    inputs = [x, norm_weight, *(a for w in full for a in weight_inputs(w)), *biases, constant(float(eps))]
    template = [("T", T), *fmt_template(ws[0]), ("K", ws[0].cols), ("N0", rows[0]), ("N1", rows[1]),
                ("N2", rows[2]), ("NR", nr), ("NSG", nsg), ("HAS_BIAS", has_bias)]
    return inputs, template, sum(rows)


EMBED_TG = 64  # dense_embed's threads per threadgroup (Qwen3's 4-bit 2048-wide rows: 64 words)


# dense_embed's rounding of an affine table's scale * q + bias, per flavor: one rounding
# (an FMA) where MLX's own dequantize is compiled to one, else two (T arithmetic, as on
# the CPU).  CUDA: ptxas fuses the bfloat16 multiply and add of MLX's kernel (PTX mul/add
# without a rounding modifier); on the H100 the kernel case (against the module on the
# GPU) passed with one rounding and the 4-bit model's greedy tokens matched MLX's path
# (BENCHMARKS.md 2026-12-06, fifth session).  Metal: unmeasured, two.
EMBED_FUSED = {"cuda": True}


def dense_embed(token: mx.array, d: DenseWeight, flavor: str, fused: Optional[bool] = None) -> mx.array:
    """Row `token` (an integer array of one element, clamped to the table) of embedding
    table `d` (dense_weight of an nn.Embedding / nn.QuantizedEmbedding) as [1, cols], in
    the scales' dtype for affine tables (as MLX's dequantize), else the weight's.
    fused: an affine value's rounding (default EMBED_FUSED for the flavor)."""
    if token.size != 1 or not mx.issubdtype(token.dtype, mx.integer):
        raise ValueError(f"dense_embed takes one token id; got {token.dtype} of shape {tuple(token.shape)}")
    if d.bias is not None:
        raise ValueError("dense_embed: an embedding table has no bias")
    T = d.scales.dtype if d.fmt in (4, 8) else d.w.dtype
    words = d.cols // (128 // d.fmt if d.fmt in (4, 8) else 16 // d.w.itemsize)
    return kernel(flavor, "dense_embed")(
        inputs=[token.reshape(1), *weight_inputs(d)],
        template=[("T", T), *fmt_template(d), ("K", d.cols), ("V", d.rows), ("TG", EMBED_TG),
                  ("FUSED", bool(EMBED_FUSED.get(flavor, False) if fused is None else fused))],
        grid=(-(-words // EMBED_TG) * EMBED_TG, 1, 1), threadgroup=(EMBED_TG, 1, 1),
        output_shapes=[(1, d.cols)], output_dtypes=[T])[0]


def dense_residual_template(x, d: DenseWeight, res: mx.array, flavor: str, nr: int, nsg: int):
    """dense_residual's template for these arguments, checked."""
    if isinstance(x, tuple):
        H, S, D = x[0].shape
        if x[1].shape != (H, S, 2):
            raise ValueError(f"dense_residual: ml {tuple(x[1].shape)} does not match parts {tuple(x[0].shape)}")
        return parts_template((H, S, D), d, res, flavor, nr, nsg)
    return _projection_template(x.size, d, res, flavor, nr, nsg)


def parts_template(parts_shape, d: DenseWeight, res: mx.array, flavor: str, nr: int, nsg: int):
    """dense_residual's template (option PARTS) over the attention's parts of shape
    (heads, splits, head_dim), checked: also for a launch that makes the parts itself
    (decode_chain's qkv_attention_oproj)."""
    H, S, D = parts_shape
    return _projection_template(H * D, d, res, flavor, nr, nsg) + [("HD", D), ("S", S)]


def _projection_template(size: int, d: DenseWeight, res: mx.array, flavor: str, nr: int, nsg: int):
    if d.bias is not None:
        raise ValueError("dense_residual: projections with a bias are not covered")
    if size != d.cols or res.size != d.rows:
        raise ValueError(f"dense_residual: x of {size} values / res {tuple(res.shape)} do not fit a "
                         f"{d.rows} x {d.cols} projection")
    if d.cols > max_staged(flavor):
        raise ValueError(f"dense_residual: {d.cols} input features > {max_staged(flavor)} (the {flavor} kernels' "
                         f"staging limit)")
    return [("T", res.dtype), *fmt_template(d), ("K", d.cols), ("N", d.rows), ("NR", nr), ("NSG", nsg)]


def router_tail_args(x, d: DenseWeight, res: mx.array, router: "RouterTail", flavor: str, nr: int, nsg: int):
    """(inputs, the tail's template) of dense_residual's ROUTER option (the kind
    ROUTER_TAIL says) for these arguments, checked (the kernels that run it:
    dense_residual_parts_router(_split), decode_chain's oproj_moe)."""
    if not isinstance(x, tuple):
        raise ValueError("dense_residual: the router tail runs with the attention's parts as input")
    inputs, template = router_tail_inputs(d, router, flavor, nr, nsg)
    return [*x, *weight_inputs(d), res, *inputs], template


def router_tail_inputs(d: DenseWeight, router: "RouterTail", flavor: str, nr: int, nsg: int):
    """The router tail's own inputs (gpost .. count) and template for projection d at
    nr x nsg, checked (router_tail_args puts the parts, d's weights and the residual
    first; decode_chain's qkv_attention_oproj makes the parts in its launch)."""
    problem = router_tail_unsupported(router.gate, d.rows, flavor)
    if problem is not None:
        raise ValueError(f"dense_residual: {problem}")
    if ROUTER_TAIL not in ROUTER_TAILS:
        raise ValueError(f"dense.ROUTER_TAIL is {ROUTER_TAIL!r}; choose one of {', '.join(ROUTER_TAILS)}")
    g = router.gate
    need = tail_counter_words(g.rows, d.rows, nr, nsg) if ROUTER_TAIL == "split" else 4
    registry.check_counter(router.count, need, f"dense_residual's {ROUTER_TAIL} router tail at {nr}x{nsg}",
                           f"registry.ticket_counter(dense.tail_counter_words({g.rows}, {d.rows}, {nr}, {nsg}))")
    inputs = [router.norm_weight, *weight_inputs(g), constant(float(router.eps)), router.count]
    template = [("RFMT", g.fmt), ("RGS", g.group_size or 32), ("RE", g.rows), ("RNR", TAIL_RNR)]
    if router.rule is not None:
        rule_inputs, rule_template = tail_rule_arguments(g.rows, router.rule)
        inputs += rule_inputs
        template += rule_template
    return inputs, template


def tail_rule_arguments(n_experts: int, params):
    """(inputs [rbias, rscale], template) of the routing rule `params` run by the split
    router tail (option RRULE): moe_router_topk's under the tail's names (R + name, RKS for
    k; NEXP is the tail's RE), checked."""
    from .router import rule_arguments
    from .router import unsupported as rule_unsupported

    if ROUTER_TAIL != "split":
        raise ValueError(f"the routing rule runs in the split router tail; dense.ROUTER_TAIL is {ROUTER_TAIL!r}")
    problem = rule_unsupported(n_experts, params)
    if problem is not None:
        raise ValueError(f"dense_residual's router tail: {problem}")
    inputs, template = rule_arguments(n_experts, params)
    return inputs, [("RKS", params.k)] + [("R" + name, value) for name, value in template if name != "NEXP"]


class RouterTail(NamedTuple):
    """What dense_residual's last threadgroup also computes (the ROUTER option): the
    post-attention RMSNorm (weight, eps) of its output and the router projection; with
    `rule` (a kernels.router.RouterParams, split tail only), the MoE layer's routing rule
    on those router outputs too (option RRULE: ids and weights out)."""
    norm_weight: mx.array
    eps: float
    gate: DenseWeight
    count: mx.array  # registry.ticket_counter(tail_counter_words(...)): one per call site
    rule: Optional[object] = None  # RouterParams: the tail also routes


def tail_counter_words(experts: int, hidden: int, nr: Optional[int] = None, nsg: Optional[int] = None) -> int:
    """uint32 words of a RouterTail counter for `experts` router rows after a `hidden`-wide
    residual at geometry nr x nsg (default TAIL_NR x TAIL_NSG): the ticket (4 words,
    zero between launches), then the split tail's shares [experts + 1, threadgroups] as
    float bits (metal/decode_layer.metal, option RSPLIT; the one-threadgroup tail leaves
    them alone).  In the counter rather than a scratch output: no allocation a launch."""
    nr, nsg = nr or TAIL_NR, nsg or TAIL_NSG
    return 4 + (experts + 1) * -(-hidden // (nr * nsg))


def router_tail_unsupported(gate: DenseWeight, hidden: int, flavor: str) -> Optional[str]:
    """Why dense_residual cannot run router projection `gate` as its tail, or None."""
    if gate.bias is not None:
        return "the router projection has a bias"
    if gate.cols != hidden:
        return f"router of {gate.cols} inputs after a {hidden}-feature residual"
    return stack_unsupported([gate], flavor, ROUTER_NR)


def dense_residual(x, d: DenseWeight, res: mx.array, flavor: str, nr: Optional[int] = None,
                   nsg: Optional[int] = None, router: Optional[RouterTail] = None):
    """res + W . x for one token, in res's dtype and shape (res [..., N]).

    x: the input vector [..., K], or a pair (parts [H, S, D], ml [H, S, 2]) of
    decode_attention_parts, the attention output in S splits per head
    (H * D = K), combined by the kernel.  nr, nsg: as dense_norm's.
    router (with parts): (out, xn [1, N], router logits [1, E]) instead, xn and the
    logits as dense_norm(out, ..., xn=True) gives them, from the same launch; where the
    router has a rule, (out, xn, logits, ids [1, k] int32, weights [1, k] float32), the
    rule's as router.fused_topk gives them on those logits."""
    nr, nsg = nr or DENSE_NR, nsg or DENSE_NSG
    parts = isinstance(x, tuple)
    template = dense_residual_template(x, d, res, flavor, nr, nsg)
    n_tg = -(-d.rows // (nr * nsg))
    if router is not None:
        split = ROUTER_TAIL == "split"
        inputs, tail_template = router_tail_args(x, d, res, router, flavor, nr, nsg)
        name = "dense_residual_parts_router_split" if split else "dense_residual_parts_router"
        k = router.rule.k if router.rule is not None else 0
        outs = kernel(flavor, name + "_route" * (k > 0))(
            inputs=inputs, template=template + tail_template,
            grid=(n_tg * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
            output_shapes=[res.shape, (1, d.rows), (1, router.gate.rows)] + [(1, k)] * 2 * (k > 0),
            output_dtypes=[res.dtype] * 3 + [mx.int32, mx.float32] * (k > 0),
        )
        return tuple(outs)
    return kernel(flavor, "dense_residual_parts" if parts else "dense_residual")(
        inputs=[*(x if parts else [x]), *weight_inputs(d), res], template=template,
        grid=(n_tg * 32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[res.shape], output_dtypes=[res.dtype],
    )[0]
