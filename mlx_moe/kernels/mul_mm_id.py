"""Typed calls of the mul_mm_id kernel family (metal/mul_mm_id.metal, CUDA twins
in metal/mul_mm_id_cuda.h): the prefill path.

    route = map0(ids, n_experts, flavor)              # per-expert pair lists, tile table
    h = mul_mm_id_swiglu(x, route, wg, wu, flavor)    # [T*k, ffn] float32 (CUDA async: bfloat16)
    d = mul_mm_id(h, route, wd, False, flavor)        # [T*k, hidden] float32 (CUDA async: bfloat16)
    y = mul_mm_id_combine(d, ids, weights, x, n_experts, n_identity, flavor)

Only real expert ids (0 <= id < n_experts) are in the lists: identity and
padding slots launch no GEMM work, and rows of h and d that belong to them are
never written (combine never reads them).  Weights are Q4_0 (uint16 words
[E, rows, cols/32*9]) or float [E, rows, cols], as for mul_mv_id.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from .mul_mv_id import _shape
from . import registry
from .registry import KERNELS, get_kernel, kernel

# The tile of metal/mul_mm_id.metal (MOE_MM_*): weight rows x routed pairs per
# threadgroup, its thread count, and the combine kernel's threads per group.
BM = 64
BN = 32
THREADS = 128
COMBINE_TG = 256
MAP0_MAX_SIMDGROUPS = 32  # the one-threadgroup map0: at most 1024 threads
# Which kernels build the route: "grid" (mul_mm_id_map0_count + mul_mm_id_map0_lists:
# MAP0_GRID_GROUPS threadgroups of MAP0_GRID_SIMDGROUPS simdgroups, each owning a
# few experts) or "block" (mul_mm_id_map0: one threadgroup compares every id with
# every expert).  Same outputs, bit for bit.  tools/bench_kernels.py --prefill times both:
# on the H100 (BENCHMARKS.md, 2026-12-06) "grid" 36 vs 39 us at 512 tokens, 41 vs 77 at 2048.
MAP0_KINDS = ("grid", "block")
MAP0 = "grid"
MAP0_GRID_GROUPS = 128
MAP0_GRID_SIMDGROUPS = 8

# Which CUDA bodies run the two GEMMs (metal/mul_mm_id_cuda.h); Metal and the
# CPU emulation have one body each.  "pipe": software-pipelined K loop, two
# shared-memory stages, ldmatrix fragments, TF32 tensor cores (mul_mm_id_pipe,
# mul_mm_id_swiglu_pipe); "bf16": for bfloat16 activations and Q4_0 weights the
# same pipeline on bf16 tensor cores with exact q - 8 weights and the block
# scale applied in float32 (mul_mm_id_bf16, mul_mm_id_swiglu_bf16), "pipe"
# for everything else; "async": for bfloat16 activations, Q4_0 weights and K a
# multiple of ASYNC_K, the bf16 arithmetic fed by a ring of cp.async stages
# with the weights kept packed in shared memory (mul_mm_id_async,
# mul_mm_id_swiglu_async; the fused SwiGLU then writes h in bfloat16, which the
# down GEMM reads with the same body), "bf16" for other bf16 x Q4_0 shapes,
# "pipe" for the rest; "simple": the first twins (mul_mm_id, mul_mm_id_swiglu),
# one load-barrier-compute-barrier round per K step.  Same tiles and grid;
# tools/bench_kernels.py --prefill times them all.
CUDA_GEMMS = ("async", "bf16", "pipe", "simple")
CUDA_GEMM = "async"
ASYNC_K = 64  # the async bodies' K step: two Q4_0 blocks (MOE_MM_AK)
# How the async bodies' threads split a stage's weight copies (template CP):
# "lanes": 8 lanes copy 8 consecutive words of one row (a warp's copy instruction
# touches 4 rows); "rows": a thread copies the words of one row (32 rows per
# instruction).  Measured on the H100 (BENCHMARKS.md): the Qwen3-30B-A3B prefill
# layer 0.670 vs 0.983 ms at 512 tokens, 1.669 vs 2.588 ms at 2048.
# tools/bench_kernels.py --prefill times both.
ASYNC_COPIES = ("rows", "lanes")
ASYNC_COPY = "lanes"
# Whether the async plain GEMM (mul_mm_id: the down projection, or gate and up unfused)
# writes its output in bfloat16 (True, the default: half the bytes the combine reads; the
# H100's 512-token layer 0.555 vs 0.558 ms, BENCHMARKS.md 2026-12-06) or float32; the async
# swiglu body always writes h in bfloat16.
ASYNC_D_BF16 = True
# Weight rows per block of the async plain GEMM (mul_mm_id_async, template MT = rows / 64):
# 128 gives each warp two 16-row m tiles that share every activation fragment it loads
# from shared memory (the fused SwiGLU body already shares them between gate and up);
# 64 is the tile of every other body (and of this one with the "rows" copies, which have
# no 128-row form).  tools/bench_kernels.py --prefill times both: 128
# is the default (the H100's 512-token layer 0.545 vs 0.558 ms, BENCHMARKS.md 2026-12-06).
ASYNC_ROWS_CHOICES = (64, 128)
ASYNC_ROWS = 128


class Route(NamedTuple):
    """map0's output: the (token, slot) pairs of each real expert and the GEMM tiles."""

    ids: mx.array  # [T, k] int32, as given
    counts: mx.array  # [E] int32: pairs per expert
    offsets: mx.array  # [E + 1] int32: first position of each expert's list in `pairs`
    pairs: mx.array  # [T*k] int32: pair ids t*k + s grouped by expert, -1 past offsets[E]
    tiles: mx.array  # [G, 2] int32: (expert, first position) per tile, (-1, 0) unused


def tile_table_size(pairs: int, n_experts: int) -> int:
    """Tiles of BN pairs needed in the worst case: sum_e ceil(c_e / BN) with
    sum_e c_e <= pairs and at most min(E, pairs) experts with c_e > 0."""
    nz = min(n_experts, pairs)
    return max(1, (pairs + nz * (BN - 1)) // BN)


def map0_geometry(n_experts: int):
    """(simdgroups, experts per simdgroup) of map0: 4 experts per simdgroup up
    to 128 experts, then at most 32 simdgroups."""
    nsg = max(1, min(MAP0_MAX_SIMDGROUPS, -(-n_experts // 4)))
    return nsg, -(-n_experts // nsg)


def map0_grid_geometry(n_experts: int):
    """(threadgroups, experts per threadgroup) of the grid map0: at most
    MAP0_GRID_GROUPS threadgroups, each owning EPB consecutive experts."""
    epb = -(-n_experts // MAP0_GRID_GROUPS)
    return -(-n_experts // epb), epb


# The module-level settings above that pick kernels and their variants.
_SWITCHES = ("MAP0", "CUDA_GEMM", "ASYNC_COPY", "ASYNC_D_BF16", "ASYNC_ROWS")


def switched(**settings):
    """This module's switches (_SWITCHES) set to `settings` inside a with block, restored
    after: checks and benchmarks of one variant."""
    return registry.switched(__name__, _SWITCHES, **settings)


def map0(ids: mx.array, n_experts: int, flavor: str) -> Route:
    """Counting sort of the (token, slot) pairs by real expert (no atomics), by
    the kernels MAP0 names."""
    if ids.ndim != 2:
        raise ValueError(f"ids must be [tokens, k]; got shape {tuple(ids.shape)}")
    if ids.dtype != mx.int32:
        ids = ids.astype(mx.int32)
    T, k = ids.shape
    P = T * k
    if P >= 2**31 // 2:
        raise ValueError(f"{P} (token, slot) pairs is too many for int32 pair ids; split the batch")
    G = tile_table_size(P, n_experts)
    shapes = dict(output_shapes=[(n_experts,), (n_experts + 1,), (P,), (G, 2)], output_dtypes=[mx.int32] * 4)
    if MAP0 not in MAP0_KINDS:
        raise ValueError(f"mul_mm_id.MAP0 is {MAP0!r}; choose one of {', '.join(MAP0_KINDS)}")
    if MAP0 == "block":
        nsg, eps = map0_geometry(n_experts)
        counts, offsets, pairs, tiles = kernel(flavor, "mul_mm_id_map0")(
            inputs=[ids], template=[("NE", n_experts), ("NSG", nsg), ("EPS", eps)],
            grid=(32 * nsg, 1, 1), threadgroup=(32 * nsg, 1, 1), **shapes)
        return Route(ids, counts, offsets, pairs, tiles)
    groups, epb = map0_grid_geometry(n_experts)
    nw = MAP0_GRID_SIMDGROUPS
    template = [("NE", n_experts), ("EPB", epb), ("NW", nw)]
    launch = dict(template=template, grid=(32 * nw * groups, 1, 1), threadgroup=(32 * nw, 1, 1))
    (seg,) = kernel(flavor, "mul_mm_id_map0_count")(
        inputs=[ids], output_shapes=[(n_experts * nw,)], output_dtypes=[mx.int32], **launch)
    counts, offsets, pairs, tiles = kernel(flavor, "mul_mm_id_map0_lists")(inputs=[ids, seg], **launch, **shapes)
    return Route(ids, counts, offsets, pairs, tiles)


def cuda_body(x_dtype, w_dtype, K: int) -> str:
    """The CUDA body CUDA_GEMM selects for these activations, weights and K: the
    kernel name's suffix ("_async", "_bf16", "_pipe", or "" for the simple one)."""
    if CUDA_GEMM not in CUDA_GEMMS:
        raise ValueError(f"mul_mm_id.CUDA_GEMM is {CUDA_GEMM!r}; choose one of {', '.join(CUDA_GEMMS)}")
    if CUDA_GEMM == "simple":
        return ""
    q4_bf16 = x_dtype == mx.bfloat16 and w_dtype == mx.uint16
    if CUDA_GEMM == "async" and q4_bf16 and K % ASYNC_K == 0:
        return "_async"
    if CUDA_GEMM in ("async", "bf16") and q4_bf16:
        return "_bf16"
    return "_pipe"


def async_template(flavor: str, x_dtype, w_dtype, K: int) -> list:
    """The template arguments only the async bodies take (their copy layout), else []."""
    if flavor != "cuda" or cuda_body(x_dtype, w_dtype, K) != "_async":
        return []
    if ASYNC_COPY not in ASYNC_COPIES:
        raise ValueError(f"mul_mm_id.ASYNC_COPY is {ASYNC_COPY!r}; choose one of {', '.join(ASYNC_COPIES)}")
    return [("CP", ASYNC_COPIES.index(ASYNC_COPY))]


def plain_async_template(flavor: str, x_dtype, w_dtype, K: int):
    """(template arguments only the async plain GEMM takes: CP and MT, its rows per
    block) for mul_mm_id; ([], BM) for every other body."""
    args = async_template(flavor, x_dtype, w_dtype, K)
    if not args:
        return [], BM
    if ASYNC_ROWS not in ASYNC_ROWS_CHOICES:
        raise ValueError(f"mul_mm_id.ASYNC_ROWS is {ASYNC_ROWS!r}; choose one of {ASYNC_ROWS_CHOICES}")
    rows = ASYNC_ROWS if ASYNC_COPY == "lanes" else BM  # the "rows" copies exist for 64-row tiles only
    return args + [("MT", rows // BM)], rows


def gemm_kernel(flavor: str, name: str, x_dtype, w_dtype, K: int):
    """The kernel object of GEMM `name` ("mul_mm_id" or "mul_mm_id_swiglu") for
    `flavor`, the activation and weight dtypes and K: on CUDA the body cuda_body picks."""
    body = cuda_body(x_dtype, w_dtype, K) if flavor == "cuda" else ""
    if not body:
        return kernel(flavor, name)
    spec = KERNELS[name]
    return get_kernel(flavor, spec.family, name + body, list(spec.inputs), list(spec.outputs))


def _mm_grid(rows: int, route: Route, bm: int = BM):
    return (-(-rows // bm) * THREADS, route.tiles.shape[0], 1), (THREADS, 1, 1)


def mul_mm_id(src: mx.array, route: Route, w: mx.array, broadcast: bool, flavor: str) -> mx.array:
    """out[p] = W[e] @ src[p // k if broadcast else p] for every routed pair p of expert e:
    [T*k, rows] float32, bfloat16 on the CUDA async body (ASYNC_D_BF16; rows of identity
    and padding pairs are not written).  Why bfloat16 there: the down GEMM's output of a 512-token
    Qwen3-30B-A3B layer is 33.5 MB in float32, written once and read once by the
    combine; mlx-lm's SwitchGLU rounds it to the activations' dtype as well."""
    _, rows, cols = _shape(w)
    T, k = route.ids.shape
    want = T if broadcast else T * k
    if src.shape != (want, cols):
        raise ValueError(f"src must be [{want}, {cols}] for these ids and weights; got {tuple(src.shape)}")
    async_args, bm = plain_async_template(flavor, src.dtype, w.dtype, cols)  # non-empty: the async body
    bf16_out = bool(async_args) and ASYNC_D_BF16
    grid, tg = _mm_grid(rows, route, bm)
    return gemm_kernel(flavor, "mul_mm_id", src.dtype, w.dtype, cols)(
        inputs=[src, route.pairs, route.tiles, route.offsets, w],
        template=[("T", src.dtype), ("WT", w.dtype), ("K", cols), ("N", rows), ("KS", k),
                  ("BCAST", bool(broadcast))] + async_args,
        grid=grid, threadgroup=tg, output_shapes=[(T * k, rows)],
        output_dtypes=[mx.bfloat16 if bf16_out else mx.float32],
    )[0]


def mul_mm_id_swiglu(x: mx.array, route: Route, wg: mx.array, wu: mx.array, flavor: str) -> mx.array:
    """h[p] = silu(Wg[e] @ x[p // k]) * (Wu[e] @ x[p // k]) for every routed pair p:
    [T*k, ffn] float32, bfloat16 on the CUDA async body (rows of identity and
    padding pairs are not written)."""
    _, rows, cols = _shape(wg)
    if wu.shape != wg.shape or wu.dtype != wg.dtype:
        raise ValueError(f"gate and up weights differ: {wg.shape} {wg.dtype} vs {wu.shape} {wu.dtype}")
    T, k = route.ids.shape
    if x.shape != (T, cols):
        raise ValueError(f"x must be [{T}, {cols}] for these ids and weights; got {tuple(x.shape)}")
    grid, tg = _mm_grid(rows, route)
    async_args = async_template(flavor, x.dtype, wg.dtype, cols)  # non-empty: the async body, h in bfloat16
    return gemm_kernel(flavor, "mul_mm_id_swiglu", x.dtype, wg.dtype, cols)(
        inputs=[x, route.pairs, route.tiles, route.offsets, wg, wu],
        template=[("T", x.dtype), ("WT", wg.dtype), ("K", cols), ("N", rows), ("KS", k)] + async_args,
        grid=grid, threadgroup=tg, output_shapes=[(T * k, rows)],
        output_dtypes=[mx.bfloat16 if async_args else mx.float32],
    )[0]


def mul_mm_id_combine(
    d: mx.array, ids: mx.array, weights: mx.array, x: mx.array, n_experts: int, n_identity: int,
    flavor: str,
) -> mx.array:
    """y[t] = sum_s w[t,s] * d[t*k+s] (real ids) + sum_s w[t,s] * x[t] (identity ids): [T, hidden] in x's dtype."""
    T, k = ids.shape
    N = x.shape[1]
    if d.shape != (T * k, N):
        raise ValueError(f"d must be [{T * k}, {N}]; got {tuple(d.shape)}")
    tg = min(COMBINE_TG, -(-N // 32) * 32)
    return kernel(flavor, "mul_mm_id_combine")(
        inputs=[d, ids, weights, x],
        template=[("T", x.dtype), ("N", N), ("NE", int(n_experts)), ("NI", int(n_identity)),
                  ("KS", k), ("TG", tg)],
        grid=(-(-N // tg) * tg, T, 1), threadgroup=(tg, 1, 1),
        output_shapes=[(T, N)], output_dtypes=[x.dtype],
    )[0]
