"""Decode MoE-layer microbenchmark: the project's kernels against mlx-lm's SwitchGLU.

One token (or a few), top-k of E experts on Qwen3-30B-A3B layer shapes by
default (hidden 2048, expert ffn 768, 128 experts, top-8).  Each layer has its
own weights and its own routing, and a timed pass runs all layers, so the
weights read per pass (layers x k experts x 3 projections) are far larger
than the GPU's L2 and every layer reads from HBM.

Reported per variant: microseconds per MoE layer (gate + up + down + combine;
median over reps of one pass of all layers divided by the layer count) and
effective GB/s (bytes of the routed experts' weights / time).  The HBM read
rate is measured in the same run (a sum over 1 GiB) for reference.

    python tools/bench_kernels.py [--layers 48] [--tokens 1] [--geometries ...] [--json out.json]

`--geometries "gate_up=1x8x1 down=8x8x1"` (NRxNSG[xNQ], see below) also times
the one-token Q4_0 layer with each listed gate_up geometry (down at its default) and
each listed down geometry (gate_up at its default), in the same run.

Prefill mode (`--prefill`): the map0 + mul_mm_id path at 512 and 2048 tokens
(default) on the same shapes, in ms per MoE layer and TFLOP/s (2 * tokens *
k * 3 * hidden * ffn flops), against mlx-lm's SwitchGLU in the same run;
`--crossover` also times the GEMV (mul_mv_id) and GEMM (mul_mm_id) paths on
1..128 tokens per weight kind, to set dispatch.MV_MAX_PAIRS:

    python tools/bench_kernels.py --prefill [--tokens 512 2048] [--crossover] [--json out.json]

Dense mode (`--dense`): the attention projections of Qwen3-30B-A3B (q 2048->4096,
k and v 2048->512, o 4096->2048; MLX affine 4-bit g64 as in mlx-community
checkpoints) on T tokens, mx.quantized_matmul against dequantize-then-GEMM
(mlx_moe/prefill.py), all 48 layers' weights in turn, ms per layer and
TFLOP/s; sets whether and from how many rows `dequantized_prefill` pays:

    python tools/bench_kernels.py --dense [--tokens 16 64 512 2048]

`--ncu --fused "dense=4x4,4x8 attn=8x8x8"` does the same for the fused decoder
layer's dense and attention kernels (mlx_moe/fused_step.py: dense_norm,
dense_residual_parts, decode_attention_parts_kv, dense_norm_xn) at their defaults
and the listed geometries (dense NRxNSG, attention NSGxUxS); `head=NRxNSG,...` also
times the LM head (final norm + 151936 x 2048 4-bit projection) as one dense_norm
launch per geometry against MLX's rms_norm + quantized_matmul (profile those too:
`--kernel-name regex:"mlx_moe|qmv|rms_norm"`); `tail=NRxNSG,...` times o_proj with the
router tail at its default and each geometry, in both kinds (dense.ROUTER_TAILS:
dense_residual_parts_router and dense_residual_parts_router_split).

GPU kernel times of decode launch geometries, all in one process under ncu
(each geometry once on 4 layers after a warm-up launch; NRxNSG[xNQ]), then a
table of median us and GB/s per kernel and the best geometry of each:

    ncu --kernel-name regex:mlx_moe --metrics gpu__time_duration.sum,dram__bytes_read.sum \
        --csv --log-file ncu.csv python tools/bench_kernels.py --ncu \
        --geometries "gate_up=8x2x4,2x4x1 down=2x8x4,4x8x1"
    python tools/ncu_summary.py ncu.csv

Routed decode (`--layer-geometries "1x4x4x1,1x4x8x1"`, T = 1): the fused decode
step's MoE layer from router outputs, as two launches (mul_mv_id_swiglu_route, then
mul_mv_id_down_combine with the residual add) against one (mul_mv_id_moe, its down
threadgroups waiting inside the launch for its gate/up ones) at its default and each
listed geometry (GATE_NRxDOWN_NRxNSGxNQ[xSTAGE]); with --ncu, each once on 4 layers.

`--ncu --floor` (CUDA only) instead runs a read-only kernel over exactly the bytes a
one-token layer's kernels must read (the k routed experts' gate and up, then their down;
16-byte loads, nothing computed): the GPU time any kernel reading them in one launch
needs at least, on this device, to set the decode kernels' times against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

from mlx_moe.backends.kernels import KernelBackend  # noqa: E402
from mlx_moe.backends.mlx import MLXBackend  # noqa: E402
from mlx_moe.experts import Experts  # noqa: E402
from mlx_moe.kernels import cuda_cache, dispatch  # noqa: E402
from mlx_moe.kernels.dispatch import Geometry  # noqa: E402
from mlx_moe.q4_0 import Q4_0SwitchLinear  # noqa: E402


def flavor() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    raise SystemExit("bench_kernels needs a GPU (Metal or CUDA)")


def timed(fn, reps: int, warmup: int = 3) -> float:
    """Median wall seconds of fn() followed by a full eval (no overlap)."""
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_pipelined(fn, reps: int, warmup: int = 3) -> float:
    """Seconds per fn() in steady state, building the next graph while the GPU
    runs the previous one (mx.async_eval), as mlx-lm's decode loop does: the
    larger of host cost and GPU time."""
    for _ in range(warmup):
        mx.eval(fn())
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
        mx.async_eval(out)
    mx.eval(out)
    return (time.perf_counter() - t0) / reps


def build_only(fn, reps: int) -> float:
    """Seconds of Python graph building per fn() (no evaluation)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    t = (time.perf_counter() - t0) / reps
    mx.eval(out)
    return t


def hbm_read_gbs(reps: int) -> float:
    a = mx.random.uniform(shape=(1 << 28,))  # 1 GiB float32
    mx.eval(a)
    t = timed(lambda: mx.sum(a), reps)
    del a
    return (1 << 30) / t / 1e9


# -- weights ---------------------------------------------------------------------------------

def _bits16(shape) -> mx.array:
    return mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32).astype(mx.uint16)


def q4_0_words(e: int, rows: int, cols: int) -> mx.array:
    """Random Q4_0 words [e, rows, cols/32*9] with sane fp16 scales."""
    nb = cols // 32
    q = _bits16((e, rows, nb, 8))
    d = mx.random.uniform(0.002, 0.02, (e, rows, nb, 1)).astype(mx.float16).view(mx.uint16)
    return mx.concatenate([d, q], axis=-1).reshape(e, rows, nb * 9)


def q4_0_experts(e, hidden, ffn) -> Experts:
    ex = Experts(hidden, ffn, 1)
    for name, (rows, cols) in {"gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
                               "down_proj": (hidden, ffn)}.items():
        proj = Q4_0SwitchLinear(32, 1, 1)
        proj.weight = q4_0_words(e, rows, cols)
        setattr(ex, name, proj)
    mx.eval(ex.parameters())
    return ex


def float_experts(e, hidden, ffn, dtype) -> Experts:
    ex = Experts(hidden, ffn, 1)
    for name, (rows, cols) in {"gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
                               "down_proj": (hidden, ffn)}.items():
        getattr(ex, name).weight = (mx.random.normal((e, rows, cols)) * cols ** -0.5).astype(dtype)
    mx.eval(ex.parameters())
    return ex


def mlx_lm_switch_glu(e, hidden, ffn, group_size=64, bits=4) -> SwitchGLU:
    """mlx-lm's SwitchGLU with MLX affine 4-bit experts (random, made small then widened)."""
    glu = SwitchGLU(hidden, ffn, 1)
    nn.quantize(glu, group_size=group_size, bits=bits)
    for name, (rows, cols) in {"gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
                               "down_proj": (hidden, ffn)}.items():
        proj = getattr(glu, name)
        shape = (e, rows, cols * bits // 32)
        proj.weight = (_bits16(shape).astype(mx.uint32) << 16) | _bits16(shape).astype(mx.uint32)
        proj.scales = mx.random.uniform(0.002, 0.02, (e, rows, cols // group_size)).astype(mx.float16)
        proj.biases = (-8 * proj.scales).astype(mx.float16)
    mx.eval(glu.parameters())
    return glu


def routing(layers, tokens, k, e):
    ids, ws = [], []
    for _ in range(layers):
        ids.append(mx.stack([mx.random.permutation(e)[:k] for _ in range(tokens)]).astype(mx.int32))
        ws.append(mx.softmax(mx.random.normal((tokens, k)), axis=-1))
    mx.eval(ids, ws)
    return ids, ws


def parse_geometries(text: str) -> dict:
    """'gate_up=8x2x4,2x4 down=2x8,4x8x1' -> {"gate_up": [Geometry...], "down": [...]}.

    Each geometry is NRxNSG or NRxNSGxNQ (rows per simdgroup, simdgroups per
    threadgroup, Q4_0 quant words per lane; NQ defaults to 1)."""
    out = {"gate_up": [], "down": []}
    for part in text.replace(";", " ").split():
        kernel, _, geoms = part.partition("=")
        if kernel not in out or not geoms:
            raise SystemExit(f"--geometries: {part!r} is not gate_up=NRxNSG[xNQ],... or down=NRxNSG[xNQ],...")
        for g in geoms.split(","):
            nums = g.lower().split("x")
            if len(nums) not in (2, 3) or not all(n.isdigit() for n in nums):
                raise SystemExit(f"--geometries: {g!r} in {part!r} is not NRxNSG or NRxNSGxNQ (e.g. 2x4x1)")
            try:
                out[kernel].append(Geometry(*(int(n) for n in nums)))
            except ValueError as e:
                raise SystemExit(f"--geometries: {g!r}: {e}")
    return out


def routed_layers(fl, q4, k, layer_geometries, route_both=False, fence_both=False):
    """[(label, layer_fn)] of the routed decode MoE layer (one token, router outputs in)
    over the layers' experts q4: two launches, then one (mul_mv_id_moe) at its default
    and each listed geometry; then the same one launch under given routing
    (mul_mv_id_moe_ids: gate + up + down + combine, the ids and weights made beforehand
    from the same router outputs, as mlx-lm's SwitchGLU is given its indices)."""
    from mlx_moe import router as R
    from mlx_moe.kernels.mul_mv_id import mul_mv_id_down_combine, mul_mv_id_moe, mul_mv_id_moe_ids, mul_mv_id_swiglu_route
    from mlx_moe.kernels import registry
    from mlx_moe.kernels.registry import ticket_counters
    from mlx_moe.kernels.router import RouterParams

    def one(g, l):
        """Layer l's routed one-launch layer at geometry g (None: the default)."""
        return mul_mv_id_moe(x, logits[l], params, w[l][0], w[l][1], w[l][2], 0, x, counts[l], fl, g)[0]

    def one_with(module, name, value, g, l):
        """one(g, l) with module.name set to value for that launch (read as the launch and its
        kernel are made: dispatch.SHARE_ROUTE, registry.CUDA_FENCE -- whose kernels' names
        carry it, registry.fence_tag), set back after."""
        was = getattr(module, name)
        setattr(module, name, value)
        try:
            return one(g, l)
        finally:
            setattr(module, name, was)

    layers = len(q4)
    E, D = q4[0]["gate_proj"]["weight"].shape[0], q4[0]["down_proj"]["weight"].shape[1]
    w = [(ex["gate_proj"]["weight"], ex["up_proj"]["weight"], ex["down_proj"]["weight"]) for ex in q4]
    logits = [mx.random.normal((1, E)).astype(mx.bfloat16) for _ in range(layers)]
    x = mx.random.normal((1, D)).astype(mx.bfloat16)
    counts = ticket_counters(layers)
    mx.eval(logits, x)
    params = RouterParams(k, normalize=True)

    def two(l):
        h, ids, wts = mul_mv_id_swiglu_route(x, logits[l], params, w[l][0], w[l][1], fl)
        return mul_mv_id_down_combine(h, ids, wts, x, w[l][2], 0, fl, residual=x)

    given = [tuple(a.astype(t) for a, t in zip(R.route(logits[l], params), (mx.int32, mx.float32)))
             for l in range(layers)]
    mx.eval(given)
    geoms = [(g, g.tag if g is not None else f"{dispatch.MOE_LAYER['q4_0'].tag} default")
             for g in [None] + list(layer_geometries)]
    out = [("ours q4_0 routed, 2 launches (swiglu_route + down_combine_res)", two)]
    out += [(f"ours q4_0 routed, 1 launch (mul_mv_id_moe {tag})", lambda l, g=g: one(g, l)) for g, tag in geoms]
    if route_both:  # the down threadgroups running the rule / reading what the token's first gate/up one wrote
        flip = "rule in every threadgroup" if dispatch.SHARE_ROUTE else "routing shared"
        out += [(f"ours q4_0 routed, 1 launch (mul_mv_id_moe {tag}, {flip})",
                 lambda l, g=g: one_with(dispatch, "SHARE_ROUTE", not dispatch.SHARE_ROUTE, g, l)) for g, tag in geoms]
    if fence_both:  # the threadgroups' hand-offs under the other fence
        other = "acq_rel" if registry.CUDA_FENCE == "sc" else "sc"
        out += [(f"ours q4_0 routed, 1 launch (mul_mv_id_moe {tag}, fence {other})",
                 lambda l, g=g: one_with(registry, "CUDA_FENCE", other, g, l)) for g, tag in geoms]
    out += [(f"ours q4_0 routing given, 1 launch (mul_mv_id_moe_ids {tag})",
             lambda l, g=g: mul_mv_id_moe_ids(x, given[l][0], given[l][1], w[l][0], w[l][1], w[l][2], 0, x, counts[l],
                                              fl, g)[0])
            for g, tag in geoms]
    return out


def ncu_once(fl, E, D, F, k, layers=4, geometries=None, layer_geometries=None, route_both=False,
             fence_both=False) -> int:
    """Each variant on `layers` layers, once after a warm-up, for ncu's kernel timings.

    With `geometries` (parse_geometries), the Q4_0 decode kernels run once per listed
    geometry instead (gate_up: mul_mv_id_swiglu, down: mul_mv_id_down_combine on the
    default gate_up's h), and mlx-lm is left out; the geometry is in each kernel's
    name (template arguments NR, NSG, NQ last), which tools/ncu_summary.py reads.
    With `layer_geometries`, routed_layers' variants run instead."""
    if layer_geometries is not None:
        for _, run in routed_layers(fl, [q4_0_experts(E, D, F) for _ in range(layers)], k, layer_geometries,
                                    route_both, fence_both):
            mx.eval(run(0))  # compile and warm up on one layer
            mx.eval([run(l) for l in range(layers)])
        return 0
    q4 = [q4_0_experts(E, D, F) for _ in range(layers)]
    ids, ws = routing(layers, 1, k, E)
    xs = mx.random.normal((1, D)).astype(mx.bfloat16)
    if geometries:
        from mlx_moe.kernels.mul_mv_id import mul_mv_id_down_combine, mul_mv_id_swiglu

        w = [(ex["gate_proj"]["weight"], ex["up_proj"]["weight"], ex["down_proj"]["weight"]) for ex in q4]
        hs = [mul_mv_id_swiglu(xs, ids[l], w[l][0], w[l][1], fl) for l in range(layers)]
        mx.eval(hs)
        runs = [lambda l, g=g: mul_mv_id_swiglu(xs, ids[l], w[l][0], w[l][1], fl, g)
                for g in geometries.get("gate_up", [])]
        runs += [lambda l, g=g: mul_mv_id_down_combine(hs[l], ids[l], ws[l], xs, w[l][2], 0, fl, g)
                 for g in geometries.get("down", [])]
        for run in runs:
            mx.eval(run(0))  # compile and warm up on one layer (one extra launch per variant)
            mx.eval([run(l) for l in range(layers)])
        return 0
    glu = [mlx_lm_switch_glu(E, D, F) for _ in range(layers)]
    be = KernelBackend(fl)
    for _ in range(2):  # the first round compiles and warms up
        mx.eval([be(xs, ids[l], ws[l], q4[l]) for l in range(layers)])
        mx.eval([(glu[l](xs, ids[l]) * ws[l][..., None].astype(mx.bfloat16)).sum(axis=-2) for l in range(layers)])
    return 0


# A kernel that only reads: each thread loads U 16-byte words of every routed expert's
# matrices (M of them, one input each) and folds them into one word, so nothing is elided.
_READ_FLOOR = """
  const int e = ids[blockIdx.y];
  const size_t j0 = size_t(blockIdx.x) * blockDim.x * U + threadIdx.x;
  unsigned acc = 0u;
  #pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4* base = reinterpret_cast<const uint4*>(m == 0 ? w0 : w1) + size_t(e) * EW;
    uint4 v[U];
    #pragma unroll
    for (int i = 0; i < U; ++i) {
      const size_t j = j0 + size_t(i) * blockDim.x;
      v[i] = j < size_t(EW) ? base[j] : make_uint4(0u, 0u, 0u, 0u);
    }
    #pragma unroll
    for (int i = 0; i < U; ++i) {
      acc ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    }
  }
  out[(size_t(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x] = acc;
"""


def read_floor_once(E, D, F, k, layers=4) -> int:
    """The read-only kernel over each layer's routed gate+up bytes, then its down bytes,
    once per layer after a warm-up, for ncu (kernel names contain read_floor)."""
    if flavor() != "cuda":
        raise SystemExit("--floor runs a CUDA kernel (mx.fast.cuda_kernel): it needs MLX's CUDA backend")
    kern = mx.fast.cuda_kernel(name="mlx_moe_read_floor", input_names=["ids", "w0", "w1"],
                               output_names=["out"], source=_READ_FLOOR)
    q4 = [q4_0_experts(E, D, F) for _ in range(layers)]
    ids, _ = routing(layers, 1, k, E)
    tpb, U = 128, 4
    for names in (("gate_proj", "up_proj"), ("down_proj",)):
        for l in [0] + list(range(layers)):
            ws = [q4[l][n]["weight"] for n in names]
            nbytes = ws[0][0].size * 2  # uint16 words of one expert's matrix
            if nbytes % 16:
                raise SystemExit(f"--floor: an expert matrix of {nbytes} bytes is not a whole number of 16-byte words")
            ew = nbytes // 16
            nblk = -(-ew // (tpb * U))
            (o,) = kern(inputs=[ids[l].reshape(-1), ws[0], ws[-1]],
                        template=[("M", len(ws)), ("U", U), ("EW", ew)],
                        grid=(nblk * tpb, k, 1), threadgroup=(tpb, 1, 1),
                        output_shapes=[(k * nblk * tpb,)], output_dtypes=[mx.uint32])
            mx.eval(o)
    return 0


# -- runs ------------------------------------------------------------------------------------

def per_layer_us(layer_fn, layers: int, reps: int) -> dict:
    """us per layer: pipelined steady state (headline), blocking, and graph building alone."""
    fn = lambda: [layer_fn(l) for l in range(layers)]  # noqa: E731
    return {"pipelined": timed_pipelined(fn, reps) / layers * 1e6,
            "blocking": timed(fn, reps) / layers * 1e6,
            "build": build_only(fn, reps) / layers * 1e6}


def switch_variants(mm, async_body: bool) -> list:
    """(label, settings) for each prefill switch of mul_mm_id (`mm`) turned away from its
    default (the async body's only where it runs), then all of them at once."""
    out = [(f"map0 {k}", {"MAP0": k}) for k in mm.MAP0_KINDS if k != mm.MAP0]
    if async_body:
        out.append((f"d {'float32' if mm.ASYNC_D_BF16 else 'bfloat16'}", {"ASYNC_D_BF16": not mm.ASYNC_D_BF16}))
        out += [(f"down in {r}-row tiles", {"ASYNC_ROWS": r}) for r in mm.ASYNC_ROWS_CHOICES if r != mm.ASYNC_ROWS]
    if len(out) > 1:
        out.append((", ".join(label for label, _ in out), {k: v for _, st in out for k, v in st.items()}))
    return out


def prefill_main(a, fl: str) -> dict:
    """ms per MoE layer and TFLOP/s of the prefill path against mlx-lm's SwitchGLU."""
    E, D, F, k = a.experts, a.hidden, a.ffn, a.k
    L = min(a.layers, a.prefill_layers)
    mv_max_saved = dict(dispatch.MV_MAX_PAIRS)  # the measured crossover: restored after each forced path
    tokens = a.tokens if a.tokens != [1] else [512, 2048]
    results = {"device": str(mx.default_device()), "flavor": fl, "args": vars(a), "rows": []}

    def report(name, T, sec):
        tflops = 2 * T * k * 3 * D * F / sec / 1e12
        results["rows"].append({"variant": name, "tokens": T, "ms_per_layer": round(sec * 1e3, 4),
                                "TFLOP_s": round(tflops, 2)})
        print(f"{name:62s} T={T:<5d} {sec * 1e3:9.3f} ms/layer {tflops:7.2f} TFLOP/s", flush=True)

    def per_layer(layer_fn, reps):
        return timed(lambda: [layer_fn(l) for l in range(L)], reps) / L

    from mlx_moe.kernels import mul_mm_id

    # Every CUDA GEMM body (mul_mm_id.CUDA_GEMM), the default first; Metal has one.
    gemm0 = mul_mm_id.CUDA_GEMM
    copy0 = mul_mm_id.ASYNC_COPY
    gemms = [gemm0] + [g for g in mul_mm_id.CUDA_GEMMS if g != gemm0] if fl == "cuda" else [gemm0]
    q4 = [q4_0_experts(E, D, F) for _ in range(L)]
    glu = [mlx_lm_switch_glu(E, D, F) for _ in range(L)]
    mb = MLXBackend()
    for T in tokens:
        ids, ws = routing(L, T, k, E)
        xs = mx.random.normal((T, D)).astype(mx.bfloat16)
        reps = max(3, a.reps // (1 + T // 512))
        dispatch.MV_MAX_PAIRS["q4_0"] = 0  # the GEMM path at every size measured here
        for gemm in gemms:
            mul_mm_id.CUDA_GEMM = gemm
            # The async bodies in both copy layouts (mul_mm_id.ASYNC_COPY), the default first.
            copies = ([copy0] + [c for c in mul_mm_id.ASYNC_COPIES if c != copy0]
                      if gemm == "async" and fl == "cuda" else [copy0])
            for copy in copies:
                mul_mm_id.ASYNC_COPY = copy
                tag = f"{gemm}, {copy} copies" if len(copies) > 1 else gemm
                variants = [(f"ours q4_0 (map0 + mul_mm_id {tag}, swiglu fused)", KernelBackend(fl))]
                if gemm == gemms[0] and copy == copy0:
                    variants.append((f"ours q4_0 ({tag}, gate|up separate GEMMs)", KernelBackend(fl, fuse_swiglu=False)))
                for name, be in variants:
                    report(name, T, per_layer(lambda l, be=be: be(xs, ids[l], ws[l], q4[l]), reps))
                if gemm == gemms[0] and copy == copy0:
                    # The layer with each prefill switch of mul_mm_id turned the other way,
                    # then all of them, and map0 alone in each kind.
                    for label, settings in switch_variants(mul_mm_id, gemm == "async" and fl == "cuda"):
                        with mul_mm_id.switched(**settings):
                            report(f"ours q4_0 ({tag}, swiglu fused, {label})", T,
                                   per_layer(lambda l: KernelBackend(fl)(xs, ids[l], ws[l], q4[l]), reps))
                    for kind in mul_mm_id.MAP0_KINDS:
                        with mul_mm_id.switched(MAP0=kind):
                            report(f"map0 alone ({kind})", T, per_layer(lambda l: mul_mm_id.map0(ids[l], E, fl), reps))
            mul_mm_id.ASYNC_COPY = copy0
        mul_mm_id.CUDA_GEMM = gemm0

        def mlx_lm_layer(l):
            y = glu[l](xs, ids[l])
            return (y * ws[l][..., None].astype(y.dtype)).sum(axis=-2)

        report("mlx-lm SwitchGLU (gather_qmm affine 4-bit g64) + combine", T, per_layer(mlx_lm_layer, reps))
        report("mlx backend q4_0 (gather_qmm affine g32, sorted)", T,
               per_layer(lambda l: mb(xs, ids[l], ws[l], q4[l]), reps))
    dispatch.MV_MAX_PAIRS["q4_0"] = mv_max_saved["q4_0"]

    if a.crossover:
        for T in (1, 2, 4, 8, 16, 32, 64, 128):
            ids, ws = routing(L, T, k, E)
            xs = mx.random.normal((T, D)).astype(mx.bfloat16)
            for path, limit in (("mv", 10**9), ("mm", 0)):
                dispatch.MV_MAX_PAIRS["q4_0"] = limit
                be = KernelBackend(fl)
                report(f"crossover q4_0 {path}", T, per_layer(lambda l: be(xs, ids[l], ws[l], q4[l]), a.reps))
        dispatch.MV_MAX_PAIRS["q4_0"] = mv_max_saved["q4_0"]
    del q4, glu
    mx.clear_cache()

    Lf = min(L, a.float_layers)
    for dtype in (mx.bfloat16, mx.float16) if Lf else ():
        fe = [float_experts(E, D, F, dtype) for _ in range(Lf)]
        kind_tokens = tokens + ([1, 2, 4, 8, 16, 32, 64, 128] if a.crossover else [])
        for T in kind_tokens:
            ids, ws = routing(Lf, T, k, E)
            xs = mx.random.normal((T, D)).astype(dtype)
            paths = [("mv", 10**9), ("mm", 0)] if (a.crossover and T <= 128) else [("mm", 0)]
            for path, limit in paths:
                dispatch.MV_MAX_PAIRS["float"] = limit
                for gemm in gemms if path == "mm" else gemms[:1]:
                    mul_mm_id.CUDA_GEMM = gemm
                    be = KernelBackend(fl)
                    report(f"ours {dtype} ({path}{' ' + gemm if path == 'mm' else ''})", T,
                           timed(lambda: [be(xs, ids[l], ws[l], fe[l]) for l in range(Lf)], a.reps) / Lf)
                mul_mm_id.CUDA_GEMM = gemm0
            dispatch.MV_MAX_PAIRS["float"] = mv_max_saved["float"]
            if T >= 512:
                report(f"mlx backend {dtype} (gather_mm)", T,
                       timed(lambda: [mb(xs, ids[l], ws[l], fe[l]) for l in range(Lf)], a.reps) / Lf)
        del fe
        mx.clear_cache()
    return results


def random_qlinear(cin: int, cout: int, bits: int = 4) -> nn.QuantizedLinear:
    """An MLX affine g64 projection with random words (as mlx-community checkpoints store them)."""
    q = nn.QuantizedLinear(cin, cout, bias=False, group_size=64, bits=bits)
    q.weight = mx.random.randint(0, 1 << 16, (cout, 2 * cin * bits // 32)).astype(mx.uint16).view(mx.uint32)
    q.scales = mx.full(q.scales.shape, 0.01, dtype=mx.bfloat16)
    q.biases = mx.full(q.biases.shape, -0.075, dtype=mx.bfloat16)
    mx.eval(q.parameters())
    return q


def parse_fused(text: str) -> dict:
    """'dense=2x4,4x8 attn=8x8x4 head=4x8' -> {"dense": [(2, 4), (4, 8)], "attn": [(8, 8, 4)],
    "head": [(4, 8)]}."""
    out = {"dense": [], "attn": [], "head": [], "tail": []}
    for part in text.replace(";", " ").split():
        kind, _, geoms = part.partition("=")
        want = {"dense": 2, "attn": 3, "head": 2, "tail": 2}.get(kind)
        for g in geoms.split(",") if want else []:
            nums = g.lower().split("x")
            if len(nums) != want or not all(n.isdigit() and int(n) > 0 for n in nums):
                raise SystemExit(f"--fused: {g!r} in {part!r} is not {'NRxNSG' if want == 2 else 'NSGxUxS'}")
            out[kind].append(tuple(int(n) for n in nums))
        if not want or not geoms:
            raise SystemExit(f"--fused: {part!r} is not dense=NRxNSG,..., attn=NSGxUxS,..., head=NRxNSG,... or "
                             "tail=NRxNSG,...")
    return out


def fused_layer_once(fl: str, geometries: dict, layers: int = 4, slots: int = 512,
                     shape=(2048, 32, 4, 128, 128)) -> int:
    """--ncu --fused: the fused decoder layer's dense and attention kernels
    (mlx_moe/fused_step.py) on Qwen3-30B-A3B shapes, once per listed geometry (and
    the defaults) on `layers` layers after a warm-up, for ncu: dense_norm (input
    norm + q/k/v), dense_residual_parts (o_proj of the attention's splits) at each
    dense NRxNSG, decode_attention_parts_kv over `slots` cached slots at each attn
    NSGxUxS, dense_norm_xn (the router projection, 8-bit) at its default.  Each
    kernel's name carries its geometry (tools/ncu_summary.py reads it).  shape:
    hidden, query heads, key/value heads, head dimension, experts."""
    from mlx_moe.kernels import attention, dense
    from mlx_moe.kernels.registry import device_array, ticket_counters

    D, H, KV, HD, E = shape
    qkv = [[dense.dense_weight(random_qlinear(D, n)) for n in (H * HD, KV * HD, KV * HD)] for _ in range(layers)]
    o = [dense.dense_weight(random_qlinear(H * HD, D)) for _ in range(layers)]
    gate = [dense.dense_weight(random_qlinear(D, E, bits=8)) for _ in range(layers)]
    g_in = mx.ones((D,), mx.bfloat16)
    x = mx.random.normal((1, D)).astype(mx.bfloat16)
    y = mx.random.normal(((H + 2 * KV) * HD,)).astype(mx.bfloat16)
    caches = [[mx.random.normal((1, KV, slots, HD)).astype(mx.bfloat16) for _ in range(2)] for _ in range(layers)]
    norms = [mx.ones((HD,), mx.bfloat16)] * 2
    pos = device_array([slots - 1], mx.int32)[:1]  # a device buffer, as the step's position should be
    mx.eval(x, y, caches, pos)

    def attn(l, g):
        return attention.decode_attention_parts(y, H, KV, *norms, 1e-6, 1e6, 1.0, False, *caches[l], pos,
                                                HD ** -0.5, fl, nsg=g[0], u=g[1], splits=g[2], write_cache=True)

    parts = attn(0, (attention.PARTS_NSG, attention.PARTS_U, attention.SPLITS))
    runs = [lambda l, g=g: dense.dense_norm(x, g_in, 1e-6, qkv[l], fl, nr=g[0], nsg=g[1])
            for g in [(dense.DENSE_NR, dense.DENSE_NSG)] + geometries["dense"]]
    runs += [lambda l, g=g: dense.dense_residual(parts[:2], o[l], x, fl, nr=g[0], nsg=g[1])
             for g in [(dense.DENSE_NR, dense.DENSE_NSG)] + geometries["dense"]]
    runs += [lambda l, g=g: attn(l, g)
             for g in [(attention.PARTS_NSG, attention.PARTS_U, attention.SPLITS)] + geometries["attn"]]
    runs.append(lambda l: dense.dense_norm(x, g_in, 1e-6, [gate[l]], fl, xn=True, nr=dense.ROUTER_NR))
    # o_proj with the router tail (dense_residual_parts_router, and _split: each kind of
    # dense.ROUTER_TAILS): replaces the dense_residual_parts + dense_norm_xn pair above.
    if geometries["tail"]:
        words = max(dense.tail_counter_words(gate[0].rows, o[0].rows, nr, nsg)
                    for nr, nsg in [(dense.TAIL_NR, dense.TAIL_NSG)] + geometries["tail"])
        tails = [dense.RouterTail(g_in, 1e-6, gate[l], c)
                 for l, c in enumerate(ticket_counters(layers, words))]

        def tail(l, g, kind):
            with dense.router_tail(kind):
                return dense.dense_residual(parts[:2], o[l], x, fl, nr=g[0], nsg=g[1], router=tails[l])

        runs += [lambda l, g=g, k=k: tail(l, g, k) for k in dense.ROUTER_TAILS
                 for g in [(dense.TAIL_NR, dense.TAIL_NSG)] + geometries["tail"]]
    for run in runs:
        mx.eval(run(0))  # compile and warm up on one layer
        mx.eval([run(l) for l in range(layers)])
    if geometries["head"]:
        # The LM head (151936 x 2048, 4-bit: 175 MB with scales; two of them, past L2):
        # one dense_norm launch per listed geometry (and the default) against MLX's
        # rms_norm + quantized_matmul (qmv), as fused_step.forward runs it or not.
        heads = [random_qlinear(D, 151936) for _ in range(2)]
        hw = [dense.dense_weight(h) for h in heads]
        mx.eval(heads)
        runs = [lambda l, g=g: dense.dense_norm(x, g_in, 1e-6, [hw[l]], fl, nr=g[0], nsg=g[1])
                for g in [(dense.HEAD_NR, dense.HEAD_NSG)] + geometries["head"]]
        runs.append(lambda l: heads[l](mx.fast.rms_norm(x, g_in, 1e-6)))
        for run in runs:
            mx.eval(run(0))
            mx.eval([run(l) for l in range(2)])
    return 0


def dense_main(a) -> dict:
    """--dense: quantized_matmul vs dequantize + GEMM on the attention projections."""
    from mlx_moe.prefill import dequantized_prefill

    D, H, KV, HD = 2048, 32, 4, 128  # Qwen3-30B-A3B attention
    shapes = [(D, H * HD), (D, KV * HD), (D, KV * HD), (H * HD, D)]  # (in, out): q, k, v, o
    layers = [[random_qlinear(cin, cout) for cin, cout in shapes] for _ in range(a.layers)]
    rows = []
    for T in a.tokens:
        xs = {cin: mx.random.normal((T, cin)).astype(mx.bfloat16) for cin, _ in shapes}
        mx.eval(list(xs.values()))
        flops = 2 * T * sum(cin * cout for cin, cout in shapes)
        res = {}
        for name, min_rows in (("quantized_matmul", 0), ("dequantize + GEMM", 1)):
            for projs in layers:
                for q in projs:
                    dequantized_prefill(q, min_rows)
            t = timed(lambda: [q(xs[q.weight.shape[1] * 32 // 4]) for projs in layers for q in projs], a.reps)
            res[name] = 1e3 * t / a.layers
            print(f"dense projections {name:20s} T={T:<5d} {res[name]:8.3f} ms/layer "
                  f"{flops / (res[name] * 1e-3) / 1e12:7.2f} TFLOP/s", flush=True)
        rows.append({"tokens": T, **{k: round(v, 4) for k, v in res.items()},
                     "speedup": round(res["quantized_matmul"] / res["dequantize + GEMM"], 3)})
        print(f"  dequantize + GEMM vs quantized_matmul at T={T}: {rows[-1]['speedup']:.2f}x", flush=True)
    return {"device": str(mx.default_device()), "args": vars(a), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[1])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--float-layers", type=int, default=8, help="layers for the float16/bfloat16 runs (0: skip)")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--prefill", action="store_true", help="prefill mode: map0 + mul_mm_id vs mlx-lm (see above)")
    p.add_argument("--prefill-layers", type=int, default=16, help="layers in prefill mode")
    p.add_argument("--crossover", action="store_true", help="prefill mode: also time GEMV vs GEMM on 1..128 tokens")
    p.add_argument("--dense", action="store_true",
                   help="dense mode: attention projections, quantized_matmul vs dequantize + GEMM (see above)")
    p.add_argument("--ncu", action="store_true",
                   help="run each variant on 4 layers once, for a kernel profiler (ncu) to time the kernels")
    p.add_argument("--floor", action="store_true",
                   help="with --ncu: a read-only kernel over a one-token layer's routed weight bytes (CUDA)")
    p.add_argument("--fused", type=str, default=None,
                   help="with --ncu: the fused decoder layer's dense and attention kernels at their defaults and "
                        "at the listed geometries, e.g. 'dense=4x4,4x8 attn=8x8x8' (dense: NRxNSG of dense_norm "
                        "and dense_residual_parts; attn: NSGxUxS of decode_attention_parts_kv)")
    p.add_argument("--layer-geometries", type=str, default=None,
                   help="the routed decode MoE layer in two launches vs one (mul_mv_id_moe) at its default and "
                        "these geometries, e.g. '1x4x4x1,1x4x8x1x1' (GATE_NRxDOWN_NRxNSGxNQ[xSTAGE]; '' for the "
                        "default alone); with --ncu each runs once on 4 layers")
    p.add_argument("--route-both", action="store_true",
                   help="with --layer-geometries: each routed one-launch layer also with dispatch.SHARE_ROUTE "
                        "flipped (on: the down threadgroups read the routing their token's first gate/up one wrote; "
                        "off: they run the rule; ncu_summary tags the launches with it on +share)")
    p.add_argument("--fence-both", action="store_true",
                   help="with --layer-geometries: each routed one-launch layer also under the other CUDA fence "
                        "(registry.CUDA_FENCE: sc <-> acq_rel; ncu_summary tags acq_rel launches +acqrel)")
    p.add_argument("--geometries", type=str, default=None,
                   help="Q4_0 decode launch geometries to time besides the defaults, e.g. "
                        "'gate_up=8x2x4,2x4x1 down=2x8x4,4x8x1' (NRxNSG[xNQ]); with --ncu "
                        "each runs once for ncu (summarize with tools/ncu_summary.py)")
    cuda_cache.add_argument(p)
    a = p.parse_args(argv)
    cuda_cache.apply(a.cache_preference)
    geometries = parse_geometries(a.geometries) if a.geometries else None
    layer_geometries = None
    if a.layer_geometries is not None:
        try:
            layer_geometries = [dispatch.LayerGeometry.parse(t) for t in a.layer_geometries.replace(",", " ").split()]
        except ValueError as e:
            raise SystemExit(f"--layer-geometries: {e}")
    if a.dense:
        res = dense_main(a)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0
    fl = flavor()
    E, D, F, k, L = a.experts, a.hidden, a.ffn, a.k, a.layers
    results = {"device": str(mx.default_device()), "flavor": fl, "args": vars(a), "rows": []}

    def report(name, tokens, t, nbytes):
        us = t["pipelined"]
        gbs = nbytes / (us * 1e-6) / 1e9
        row = {"variant": name, "tokens": tokens, "us_per_layer": round(us, 2), "GB_s": round(gbs, 1),
               "us_blocking": round(t["blocking"], 2), "us_build": round(t["build"], 2)}
        results["rows"].append(row)
        print(f"{name:58s} T={tokens:<3d} {us:8.2f} us/layer {gbs:7.1f} GB/s"
              f"  (blocking {t['blocking']:.1f}, graph build {t['build']:.1f})", flush=True)

    if a.floor and not a.ncu:
        raise SystemExit("--floor is for --ncu runs (its GPU time comes from ncu)")
    if a.ncu and a.floor:
        return read_floor_once(E, D, F, k)
    if a.fused is not None:
        if not a.ncu:
            raise SystemExit("--fused is for --ncu runs (its GPU times come from ncu)")
        return fused_layer_once(fl, parse_fused(a.fused))  # "" times the defaults alone
    if a.ncu:
        return ncu_once(fl, E, D, F, k, geometries=geometries, layer_geometries=layer_geometries,
                        route_both=a.route_both, fence_both=a.fence_both)
    if a.prefill:
        res = prefill_main(a, fl)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0
    hbm = hbm_read_gbs(a.reps)
    results["hbm_read_GB_s"] = round(hbm, 1)
    print(f"HBM read (mx.sum over 1 GiB float32): {hbm:.1f} GB/s", flush=True)

    # Q4_0 (ours) and MLX affine g64 (mlx-lm) hold the same 4.5 bits per weight.
    expert_bytes_4b = 3 * F * D * 18 // 32
    q4 = [q4_0_experts(E, D, F) for _ in range(L)]
    glu = [mlx_lm_switch_glu(E, D, F) for _ in range(L)]
    for T in a.tokens:
        ids, ws = routing(L, T, k, E)
        xs = mx.random.normal((T, D)).astype(mx.bfloat16)
        # Bytes that must come from HBM: each distinct expert of the layer once.
        nbytes = expert_bytes_4b * statistics.mean(len(set(sum(r.tolist(), []))) for r in ids)
        variants = [("ours q4_0 (swiglu fused, combine fused)", KernelBackend(fl)),
                    ("ours q4_0 (gate|up separate, combine fused)", KernelBackend(fl, fuse_swiglu=False)),
                    ("ours q4_0 (swiglu fused, combine in MLX ops)", KernelBackend(fl, fuse_combine=False))]
        dispatch.MAX_DECODE_PAIRS = max(dispatch.MAX_DECODE_PAIRS, T * k)  # measure past the threshold too
        for name, be in variants:
            report(name, T, per_layer_us(lambda l, be=be: be(xs, ids[l], ws[l], q4[l]), L, a.reps), nbytes)

        def mlx_lm_layer(l):
            y = glu[l](xs, ids[l])  # [T, k, D]
            return (y * ws[l][..., None].astype(y.dtype)).sum(axis=-2)

        report("mlx-lm SwitchGLU (gather_qmm affine 4-bit g64) + combine", T,
               per_layer_us(mlx_lm_layer, L, a.reps), nbytes)

        # The framework's cost of two trivial graph nodes per layer (what our two kernels pay at least).
        report("floor: two elementwise ops per layer", T,
               per_layer_us(lambda l: (xs * ws[l][0, 0]) + 1, L, a.reps), nbytes)

        mb = MLXBackend()
        report("mlx backend q4_0 (gather_qmm affine g32, f32 scales)", T,
               per_layer_us(lambda l: mb(xs, ids[l], ws[l], q4[l]), L, a.reps), nbytes)

        if layer_geometries is not None and T == 1:
            for name, run in routed_layers(fl, q4, k, layer_geometries, a.route_both, a.fence_both):
                report(name, T, per_layer_us(run, L, a.reps), expert_bytes_4b * k)

        if geometries and T == 1:
            defaults = dict(dispatch.GATE_UP), dict(dispatch.DOWN)
            for table, kernel in ((dispatch.GATE_UP, "gate_up"), (dispatch.DOWN, "down")):
                for g in geometries[kernel]:
                    table["q4_0"] = g
                    report(f"  geometry {kernel}={g.tag}", T,
                           per_layer_us(lambda l: KernelBackend(fl)(xs, ids[l], ws[l], q4[l]), L, a.reps), nbytes)
                table.update(defaults[0] if kernel == "gate_up" else defaults[1])
    del glu
    mx.clear_cache()

    del q4
    mx.clear_cache()
    mb = MLXBackend()

    for dtype in (mx.float16, mx.bfloat16) if a.float_layers else ():
        Lf = a.float_layers
        fe = [float_experts(E, D, F, dtype) for _ in range(Lf)]
        ids, ws = routing(Lf, 1, k, E)
        xs = mx.random.normal((1, D)).astype(dtype)
        nb = 3 * F * D * 2 * k
        be = KernelBackend(fl)
        report(f"ours {dtype}", 1, per_layer_us(lambda l: be(xs, ids[l], ws[l], fe[l]), Lf, a.reps), nb)
        report(f"mlx backend {dtype} (gather_mm)", 1,
               per_layer_us(lambda l: mb(xs, ids[l], ws[l], fe[l]), Lf, a.reps), nb)
        del fe
        mx.clear_cache()

    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
