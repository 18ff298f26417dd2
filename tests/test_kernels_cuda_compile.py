"""The CUDA kernels of the prefill path and the router compile with nvcc for
sm_90a (H100), in the source form mx.fast.cuda_kernel would hand to NVRTC.

What this checks: the CUDA text the `cuda` flavor builds (shims_cuda.h +
shared helpers + the CUDA twins in metal/mul_mm_id_cuda.h + each body) inside a
reproduction of MLX 0.32's cuda_kernel source assembly (DESIGN.md section 5,
notes/mlx-and-mlx-lm.md section 2): kernel `custom_kernel_<name>` in namespace
mlx::core::cu, inputs `const T*`, `<input>_shape` as a by-value
`cuda::std::array<int32_t, 10>` when the body names it, outputs `T*`,
template arguments as `constexpr` locals / `using` at the top of the body.
nvcc writes PTX and ptxas assembles it for sm_90a (so the inline mma.sync is
checked by the assembler too); the GEMM kernels must contain the TF32 mma and
the router its redux.sync reductions; registers and shared memory per kernel
are printed (pytest -s).

What it does not check: MLX's real device headers are not available here, so a
stand-in prelude declares only what the bodies use (fp16/bf16 headers, Shape);
nvcc is not NVRTC (MLX compiles with --device-as-default-execution-space; the
helpers carry MOE_DEVICE so nvcc accepts them too); nothing is run.
Skipped when nvcc is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_moe.kernels.registry import family_header

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed")

# The CUDA text as MLX's cuda_kernel assembles it (tools/cuda_units.py, shared with
# tools/nvrtc_registers.py and the CUDA mock)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from cuda_units import gemm_base, moe_layer_kernel as _moe_layer, translation_unit  # noqa: E402


def compile_sm90a(tmp_path: Path, family: str, kernels: list) -> tuple:
    """(PTX text, ptxas -v report): nvcc to PTX, then ptxas to sm_90a machine code."""
    src = tmp_path / f"{family}.cu"
    src.write_text(translation_unit(family, kernels))
    ptx = tmp_path / f"{family}.ptx"
    r = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", "-ptx", str(src), "-o", str(ptx)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed on {src}:\n{r.stderr[-6000:]}"
    ptxas = str(Path(NVCC).resolve().parent / "ptxas")
    if not os.path.exists(ptxas):
        ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    r2 = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / f"{family}.cubin")],
                        capture_output=True, text=True)
    assert r2.returncode == 0, f"ptxas failed on {ptx}:\n{r2.stderr[-6000:]}"
    return ptx.read_text(), r2.stderr + r2.stdout


def _thread_limit(kernel) -> int:
    """The most registers a thread of `kernel` (a compile_sm90a tuple) may use: 65536 a
    multiprocessor over its threadgroup's threads (32 x its NSG template value, where it
    has one), and never more than 255.  Beyond it the launch fails, on the GPU only."""
    nsg = dict(kernel[4]).get("NSG")
    return min(255, 65536 // (32 * nsg)) if nsg else 255


def _register_limit(entry: str, kernels: list) -> int:
    """The register limit of ptxas' entry `entry` (kernel_variant, mangled) among compile_sm90a's
    `kernels`: the kernel whose name_variant is its longest prefix."""
    names = [(f"{k[0]}_{k[1]}", k) for k in kernels]
    return _thread_limit(max(((n, k) for n, k in names if entry.startswith(n)), key=lambda nk: len(nk[0]))[1])


def _check_registers(regs: dict, kernels: list, max_registers: int = None) -> None:
    """Each entry of _report's `regs` within max_registers a thread (default: its kernel's
    _thread_limit among compile_sm90a's `kernels`)."""
    for name, (r, _) in regs.items():
        limit = max_registers or _register_limit(name, kernels)
        assert r is not None and r <= limit, f"{name}: {r} registers, over {limit}: {regs}"


def _compiles(tmp_path: Path, family: str, kernels: list, max_registers: int = None) -> dict:
    """Compile `kernels` for sm_90a: one entry each, no spills, at most max_registers a thread
    (default: each kernel's _thread_limit), static shared memory within the 48 KB a launch
    may have without opting in (ptxas does not refuse more; the launch would fail); the
    registers are printed (pytest -s: they bound how many threadgroups an SM holds)."""
    ptx, report = compile_sm90a(tmp_path, family, kernels)
    assert len(_entries(ptx)) == len(kernels)
    regs = _report(report)
    print(regs)
    _check_registers(regs, kernels, max_registers)
    over = {name: smem for name, (_, smem) in regs.items() if smem is not None and smem > 49152}
    assert not over, f"static shared memory over 48 KB: {over}"
    assert " 0 bytes spill stores" in report or "spill" not in report
    return regs


def _gemm(name, variant, x, wt, K, N, KS, extra=()):
    base = gemm_base(name)
    wname = {"mul_mm_id": ("src", "w"), "mul_mm_id_swiglu": ("x", "wg", "wu")}[base]
    inputs = {"pairs": "int32", "tiles": "int32", "offsets": "int32"}
    inputs[wname[0]] = x
    for wn in wname[1:]:
        inputs[wn] = wt
    # The async bodies write bfloat16 (mul_mm_id.mul_mm_id_swiglu, mul_mm_id.mul_mm_id).
    o = "bfloat16" if name.endswith("_async") else "float32"
    out = {"mul_mm_id": {"out": o}, "mul_mm_id_swiglu": {"h": o}}[base]
    template = [("T", x), ("WT", wt), ("K", K), ("N", N), ("KS", KS)] + list(extra)
    return (name, variant, inputs, out, template)


MM_KERNELS = [
    ("mul_mm_id_map0", "e128", {"ids": "int32"}, {n: "int32" for n in ("counts", "offsets", "pairs", "tiles")},
     [("NE", 128), ("NSG", 32), ("EPS", 4)]),
    ("mul_mm_id_map0", "e512", {"ids": "int32"}, {n: "int32" for n in ("counts", "offsets", "pairs", "tiles")},
     [("NE", 512), ("NSG", 32), ("EPS", 16)]),
    ("mul_mm_id_map0_count", "e128", {"ids": "int32"}, {"seg": "int32"}, [("NE", 128), ("EPB", 1), ("NW", 8)]),
    ("mul_mm_id_map0_lists", "e512", {"ids": "int32", "seg": "int32"},
     {n: "int32" for n in ("counts", "offsets", "pairs", "tiles")}, [("NE", 512), ("EPB", 4), ("NW", 8)]),
    _gemm("mul_mm_id_swiglu", "q4_0", "bfloat16", "uint16", 2048 // 32 * 32, 768, 8),
    _gemm("mul_mm_id_swiglu", "f16", "float16", "float16", 2048, 768, 8),
    _gemm("mul_mm_id", "down_q4_0", "float32", "uint16", 768, 2048, 8, [("BCAST", False)]),
    _gemm("mul_mm_id", "gate_bf16", "bfloat16", "bfloat16", 2048, 768, 8, [("BCAST", True)]),
    _gemm("mul_mm_id", "down_f32", "float32", "float32", 100, 70, 3, [("BCAST", False)]),
    # The pipelined twins (mul_mm_id.CUDA_GEMM = "pipe") at the same shapes.
    _gemm("mul_mm_id_swiglu_pipe", "q4_0", "bfloat16", "uint16", 2048 // 32 * 32, 768, 8),
    _gemm("mul_mm_id_swiglu_pipe", "f16", "float16", "float16", 2048, 768, 8),
    _gemm("mul_mm_id_swiglu_pipe", "bf16_f32x", "float32", "bfloat16", 2048, 768, 8),
    _gemm("mul_mm_id_pipe", "down_q4_0", "float32", "uint16", 768, 2048, 8, [("BCAST", False)]),
    _gemm("mul_mm_id_pipe", "gate_bf16", "bfloat16", "bfloat16", 2048, 768, 8, [("BCAST", True)]),
    _gemm("mul_mm_id_pipe", "down_f32", "float32", "float32", 100, 70, 3, [("BCAST", False)]),
    # The bf16 bodies (CUDA_GEMM = "bf16": bfloat16 activations, Q4_0 weights).
    _gemm("mul_mm_id_swiglu_bf16", "q4_0", "bfloat16", "uint16", 2048, 768, 8),
    _gemm("mul_mm_id_bf16", "gate_q4_0", "bfloat16", "uint16", 2048, 768, 8, [("BCAST", True)]),
    # The async bodies (CUDA_GEMM = "async": bfloat16 activations, Q4_0 weights, K % 64 == 0).
    # (template CP: mul_mm_id.ASYNC_COPIES, 0 "rows" and 1 "lanes").
    _gemm("mul_mm_id_swiglu_async", "q4_0", "bfloat16", "uint16", 2048, 768, 8, [("CP", 0)]),
    _gemm("mul_mm_id_async", "down_q4_0", "bfloat16", "uint16", 768, 2048, 8, [("BCAST", False), ("CP", 0), ("MT", 1)]),
    _gemm("mul_mm_id_swiglu_async", "lanes_q4_0", "bfloat16", "uint16", 2048, 768, 8, [("CP", 1)]),
    _gemm("mul_mm_id_async", "down_lanes_q4_0", "bfloat16", "uint16", 768, 2048, 8,
          [("BCAST", False), ("CP", 1), ("MT", 1)]),
    # 128-row tiles of the plain async GEMM (mul_mm_id.ASYNC_ROWS)
    _gemm("mul_mm_id_async", "down_lanes_r128_q4_0", "bfloat16", "uint16", 768, 2048, 8,
          [("BCAST", False), ("CP", 1), ("MT", 2)]),
    ("mul_mm_id_combine", "bf16", {"d": "float32", "ids": "int32", "wts": "float32", "x": "bfloat16"},
     {"y": "bfloat16"}, [("T", "bfloat16"), ("N", 2048), ("NE", 128), ("NI", 0), ("KS", 8), ("TG", 256)]),
    ("mul_mm_id_combine", "f16_identity", {"d": "float32", "ids": "int32", "wts": "float32", "x": "float16"},
     {"y": "float16"}, [("T", "float16"), ("N", 6144), ("NE", 512), ("NI", 256), ("KS", 12), ("TG", 256)]),
]


def _router(variant, x, nexp, k, score, bias, ngroup=1, topkg=1, norm=False):
    return ("moe_router_topk", variant, {"logits": x, "bias": "float32", "scale": "float32"},
            {"ids": "int32", "weights": "float32"},
            [("T", x), ("NEXP", nexp), ("K", k), ("VPL", -(-nexp // 32)), ("SCORE", score),
             ("HAS_BIAS", bias), ("NGROUP", ngroup), ("TOPKG", topkg), ("NORM", norm), ("TPG", 4)])


ROUTER_KERNELS = [
    _router("qwen3", "bfloat16", 128, 8, 0, False, norm=True),
    _router("mixtral", "float16", 8, 2, 2, False),
    _router("deepseek_group", "bfloat16", 64, 6, 0, False, ngroup=8, topkg=3),
    _router("longcat", "float32", 768, 12, 0, True, norm=True),
    _router("sigmoid_bias", "float32", 256, 8, 1, True, norm=True),
]


def _report(out: str) -> dict:
    """{kernel: (registers, shared bytes)} from ptxas -v."""
    res = {}
    for block in out.split("Compiling entry function ")[1:]:
        name = re.search(r"custom_kernel_mlx_moe_(\w+?)P", block) or re.search(r"'(\w+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        smem = re.search(r"(\d+) bytes smem", block)
        res[name.group(1)] = (int(regs.group(1)) if regs else None, int(smem.group(1)) if smem else 0)
    return res


def _entries(ptx: str) -> dict:
    """{entry name: its PTX text}."""
    parts = re.split(r"\.visible \.entry ", ptx)[1:]
    return {p.split("(", 1)[0]: p for p in parts}


def test_prefill_kernels_compile_for_sm90a(tmp_path):
    ptx, report = compile_sm90a(tmp_path, "mul_mm_id", MM_KERNELS)
    entries = _entries(ptx)
    assert len(entries) == len(MM_KERNELS)
    # The tiled GEMMs issue TF32 tensor-core MMAs, the bf16 and async bodies bf16 ones
    # (and no TF32); map0 and combine none.  The pipelined, bf16 and async ones load
    # their fragments with ldmatrix, the simple ones do not; only the async ones copy
    # with cp.async.
    for name, text in entries.items():
        gemm = "mul_mm_id_swiglu" in name or re.search(r"mul_mm_id_((pipe|bf16|async)_)?(down|gate)", name)
        bf16 = bool(re.search(r"_(bf16|async)_((gate|down)_)?(lanes_)?(r128_)?q4_0E", name))
        asy = "_async_" in name
        assert ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in text) == bool(gemm and not bf16), name
        assert ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text) == bf16, name
        assert ("ldmatrix.sync.aligned.m8n8.x4.shared.b16" in text) == ("pipe" in name or bf16), name
        assert ("cp.async.cg.shared.global" in text and "cp.async.wait_group" in text) == asy, name
    rep = _report(report)
    print(rep)
    # The pipelined, bf16 and async GEMMs keep 4 blocks of 128 threads per SM: <= 128
    # registers, no spills, their stages in static shared memory (< 48 KiB).
    for name, (regs, smem) in rep.items():
        if "pipe" in name or re.search(r"_(bf16|async)_((gate|down)_)?(lanes_)?(r128_)?q4_0E", name):
            assert regs is not None and regs <= 128, (name, regs)
            assert smem <= 48 * 1024, (name, smem)
    assert " 0 bytes spill stores" in report or "spill" not in report


def test_router_kernels_compile_for_sm90a(tmp_path):
    ptx, report = compile_sm90a(tmp_path, "router", ROUTER_KERNELS)
    entries = _entries(ptx)
    assert len(entries) == len(ROUTER_KERNELS)
    # top-k: each round two 32-lane integer reductions (redux.sync on sm_80+), no butterfly
    assert all("redux.sync.max.u32" in text and "redux.sync.min.u32" in text for text in entries.values())
    print(_report(report))


def _mv(name, variant, x, wt, K, N, extra):
    """A decode kernel at Qwen3-30B-A3B shapes: K and N are the real columns and rows."""
    inputs = {"mul_mv_id": {"src": x, "ids": "int32", "w": wt},
              "mul_mv_id_swiglu": {"x": x, "ids": "int32", "wg": wt, "wu": wt},
              "mul_mv_id_down_combine": {"h": "float32", "ids": "int32", "wts": "float32", "x": x, "wd": wt}}[name]
    out = {"mul_mv_id": {"out": "float32"}, "mul_mv_id_swiglu": {"h": "float32"},
           "mul_mv_id_down_combine": {"y": x}}[name]
    return (name, variant, inputs, out, [("T", x), ("WT", wt), ("K", K), ("N", N), ("NE", 128)] + list(extra))


def _q4_geoms(name, x, K, N, extra, geoms):
    """One Q4_0 entry per (NR, NSG, NQ) geometry: every lane map (NQ 1, 2, 4) compiles."""
    return [_mv(name, f"q4_0_{nr}x{nsg}x{nq}", x, "uint16", K, N,
                list(extra) + [("NR", nr), ("NSG", nsg), ("NQ", nq)]) for nr, nsg, nq in geoms]


MV_KERNELS = (
    _q4_geoms("mul_mv_id_swiglu", "bfloat16", 2048, 768, [("KS", 8)], [(8, 2, 4), (2, 4, 1), (1, 4, 2)])
    + _q4_geoms("mul_mv_id_down_combine", "bfloat16", 768, 2048, [("NI", 0), ("KS", 8)],
                [(2, 8, 4), (4, 8, 1), (2, 8, 2)])
    + [
        _mv("mul_mv_id_swiglu", "f16", "float16", "float16", 2048, 768, [("KS", 8), ("NR", 2), ("NSG", 4), ("NQ", 1)]),
        _mv("mul_mv_id_down_combine", "bf16_identity", "float16", "bfloat16", 768, 2048,
            [("NI", 4), ("KS", 12), ("NR", 2), ("NSG", 8), ("NQ", 1)]),
        _mv("mul_mv_id", "gate_q4_0", "float32", "uint16", 2048, 768,
            [("KS", 8), ("NR", 8), ("NSG", 2), ("BCAST", True), ("NQ", 1)]),
        _mv("mul_mv_id", "down_f32", "float32", "float32", 100, 70,
            [("KS", 3), ("NR", 2), ("NSG", 4), ("BCAST", False), ("NQ", 1)]),
    ]
)


def test_decode_kernels_compile_for_sm90a(tmp_path):
    ptx, report = compile_sm90a(tmp_path, "mul_mv_id", MV_KERNELS)
    assert len(_entries(ptx)) == len(MV_KERNELS)
    entries = _entries(ptx)
    for name, text in entries.items():
        if "q4_0" in name:
            # Q4_0 nibbles become floats through the 0x4B000000 magic number (or/sub), not
            # int->float conversion instructions (a quarter-rate pipe on sm_90).
            assert not re.search(r"cvt\.rn\.f32\.[us]\d+", text), f"{name}: int->float cvt in the Q4_0 path"
            assert "0x4B000000" in text.replace("1258291200", "0x4B000000"), name
    print(_report(report))


def _norm(variant, x, fmt, wt, st, K, rows, bias, xn=False, nr=2, nsg=4):
    ins = {"x": x, "gin": x, "b0": x, "b1": x, "b2": x, "cst": "float32"}
    for m in ("w0", "w1", "w2"):
        ins.update({m: wt, f"{m}_s": st, f"{m}_b": st})
    return ("dense_norm_xn" if xn else "dense_norm", variant, ins, {"y": x, "xn": x} if xn else {"y": x},
            [("T", x), ("FMT", fmt), ("GS", 64), ("K", K), ("N0", rows[0]), ("N1", rows[1]), ("N2", rows[2]),
             ("NR", nr), ("NSG", nsg), ("HAS_BIAS", bias)])


def _dense(variant, x, fmt, wt, st, K, N, nr=2, nsg=4, parts=None):
    if parts is None:
        return ("dense_residual", variant, {"x": x, "w": wt, "w_s": st, "w_b": st, "res": x}, {"out": x},
                [("T", x), ("FMT", fmt), ("GS", 64), ("K", K), ("N", N), ("NR", nr), ("NSG", nsg)])
    return ("dense_residual_parts", variant, {"parts": "float32", "ml": "float32", "w": wt, "w_s": st, "w_b": st,
                                              "res": x}, {"out": x},
            [("T", x), ("FMT", fmt), ("GS", 64), ("K", K), ("N", N), ("NR", nr), ("NSG", nsg), ("HD", parts[0]),
             ("S", parts[1])])


def _tail(name, variant, nr, nsg):
    """o_proj (4096 -> 2048, 4-bit, of the attention's 4 splits) with a router tail."""
    return (name, variant,
            {"parts": "float32", "ml": "float32", "w": "uint32", "w_s": "bfloat16", "w_b": "bfloat16",
             "res": "bfloat16", "gpost": "bfloat16", "wr": "uint32", "wr_s": "bfloat16", "wr_b": "bfloat16",
             "cst": "float32", "count": "uint32"},
            {"out": "bfloat16", "xn": "bfloat16", "logits": "bfloat16"},
            [("T", "bfloat16"), ("FMT", 4), ("GS", 64), ("K", 4096), ("N", 2048), ("NR", nr), ("NSG", nsg),
             ("HD", 128), ("S", 4), ("RFMT", 8), ("RGS", 64), ("RE", 128), ("RNR", 2)])


# The fused decoder layer's dense kernels at Qwen3-30B-A3B shapes (4-bit affine g64 as
# mlx-community checkpoints; bfloat16 weights as Hugging Face ones), Qwen2's biases, and
# the router projection (8-bit, one row a simdgroup, with the normalized input).
DECODE_LAYER_KERNELS = [
    _norm("qwen3_q4", "bfloat16", 4, "uint32", "bfloat16", 2048, (4096, 512, 512), False),
    _norm("qwen2_bf16", "bfloat16", 17, "bfloat16", "float32", 2048, (2048, 2048, 2048), True),
    _norm("router_q8", "bfloat16", 8, "uint32", "bfloat16", 2048, (128, 0, 0), False, xn=True, nr=1),
    _dense("o_q4", "bfloat16", 4, "uint32", "bfloat16", 4096, 2048),
    _dense("o_f16", "float16", 16, "float16", "float32", 4096, 2048),
    _dense("o_q4_parts", "bfloat16", 4, "uint32", "bfloat16", 4096, 2048, parts=(128, 4)),
    # o_proj with the router tail: the last threadgroup projects the 8-bit router of 128
    # experts (dense_residual_parts_router), or each threadgroup its own rows of it and
    # the last adds their shares (_split; 1 x 16: 128 threadgroups' shares)
    _tail("dense_residual_parts_router", "o_q4_router_q8", 2, 8),
    _tail("dense_residual_parts_router_split", "o_q4_router_q8_split", 2, 16),
    _tail("dense_residual_parts_router_split", "o_q4_router_q8_split_1x16", 1, 16),
    # and the MoE layer's routing rule in it (RRULE: softmax top-8 of 128, normalized)
    ("dense_residual_parts_router_split_route", "o_q4_router_q8_split_rule",
     {**_tail("x", "x", 2, 16)[2], "rbias": "float32", "rscale": "float32"},
     {**_tail("x", "x", 2, 16)[3], "ids": "int32", "weights": "float32"},
     _tail("x", "x", 2, 16)[4] + [("RKS", 8), ("RVPL", 4), ("RSCORE", 0), ("RHAS_BIAS", False), ("RNGROUP", 1),
                                  ("RTOPKG", 1), ("RNORM", True)]),
    # the token's embedding: Qwen3's 4-bit table (mlx-community), a bfloat16 one
    ("dense_embed", "embed_q4", {"token": "int32", "w": "uint32", "w_s": "bfloat16", "w_b": "bfloat16"},
     {"out": "bfloat16"}, [("T", "bfloat16"), ("FMT", 4), ("GS", 64), ("K", 2048), ("V", 151936), ("TG", 64),
                           ("FUSED", True)]),
    ("dense_embed", "embed_bf16", {"token": "int32", "w": "bfloat16", "w_s": "bfloat16", "w_b": "bfloat16"},
     {"out": "bfloat16"}, [("T", "bfloat16"), ("FMT", 17), ("GS", 32), ("K", 2048), ("V", 151936), ("TG", 64),
                           ("FUSED", False)]),
]


def test_decode_layer_kernels_compile_for_sm90a(tmp_path):
    ptx, report = compile_sm90a(tmp_path, "decode_layer", DECODE_LAYER_KERNELS)
    entries = _entries(ptx)
    assert len(entries) == len(DECODE_LAYER_KERNELS)
    for name, text in entries.items():
        # The weights are read 16 bytes at a time.
        assert re.search(r"ld\.global(\.nc)?\.v4\.(u32|b32)", text), f"{name}: no 16-byte weight loads"
    assert " 0 bytes spill stores" in report or "spill" not in report
    regs = _report(report)
    print(regs)
    # The tail kernels launch 512 threads (16 simdgroups): more than 128 registers a
    # thread and the launch fails (65536 a multiprocessor), on the GPU only.
    _check_registers(regs, DECODE_LAYER_KERNELS)


def test_decode_attention_compiles_for_sm90a(tmp_path):
    att = ("decode_attention", "qwen3", {"q": "bfloat16", "k": "bfloat16", "v": "bfloat16", "pos": "int32",
                                         "scale": "float32"}, {"out": "bfloat16"},
           [("T", "bfloat16"), ("D", 128), ("HQ", 32), ("HKV", 4), ("C", 768), ("NSG", 16), ("U", 8)])
    parts = ("decode_attention_parts", "qwen3", {"y": "bfloat16", "q_norm": "bfloat16", "k_norm": "bfloat16",
                                                "k": "bfloat16", "v": "bfloat16", "pos": "int32", "cst": "float32"},
             {"parts": "float32", "ml": "float32", "kn": "bfloat16", "vn": "bfloat16"},
             [("T", "bfloat16"), ("D", 128), ("HQ", 32), ("HKV", 4), ("C", 768), ("NSG", 8), ("U", 8), ("S", 4),
              ("QKNORM", True), ("TRAD", False)])
    parts_kv = ("decode_attention_parts_kv",) + parts[1:3] + ({"parts": "float32", "ml": "float32"}, parts[4])
    ptx, report = compile_sm90a(tmp_path, "attention", [att, parts, parts_kv])
    assert len(_entries(ptx)) == 3
    rep = _report(report)
    # 512 and 256 threads a threadgroup: at most 128 and 255 registers a thread
    assert all(r is not None and r <= (128 if "parts" not in name else 255) for name, (r, _) in rep.items()), rep
    assert " 0 bytes spill stores" in report or "spill" not in report


def test_residual_combine_compiles_for_sm90a(tmp_path):
    res = ("mul_mv_id_down_combine_res", "q4_0", {"h": "float32", "ids": "int32", "wts": "float32", "x": "bfloat16",
                                                  "wd": "uint16", "res": "bfloat16"}, {"y": "bfloat16"},
           [("T", "bfloat16"), ("WT", "uint16"), ("K", 768), ("N", 2048), ("NE", 128), ("NI", 0), ("KS", 8),
            ("NR", 4), ("NSG", 8), ("NQ", 1)])
    ptx, _ = compile_sm90a(tmp_path, "mul_mv_id", [res])
    assert len(_entries(ptx)) == 1


def _moe_layer_ids(variant, stage, trace=False):
    """mul_mv_id_moe_ids (the routing given; trace: its traced launch) at the default
    geometry's shapes."""
    name, _, ins, outs, template = _moe_layer(variant, 1, 4, 8, stage=stage)
    ins = {k: v for k, v in ins.items() if k not in ("logits", "bias", "scale")}
    ins = {"x": ins.pop("x"), "ids": "int32", "weights": "float32", **ins}
    outs = {"h": outs["h"], "y": outs["y"], **({"trace": "uint32"} if trace else {})}
    rule = ("NEXP", "VPL", "SCORE", "HAS_BIAS", "NGROUP", "TOPKG", "NORM", "SHARE_ROUTE")
    return ("mul_mv_id_moe_ids_trace" if trace else "mul_mv_id_moe_ids", variant, ins, outs,
            [t for t in template if t[0] not in rule])


@pytest.mark.parametrize("fence,ptx_op", [("sc", "membar.gl"), ("acq_rel", "fence.acq_rel.gpu")])
def test_cuda_fence_choice_reaches_the_kernels(tmp_path, monkeypatch, fence, ptx_op):
    """registry.CUDA_FENCE (engine +acqrel) decides the one fence instruction of the MoE
    layer's hand-offs (moe_device_fence), and nothing else: the same registers either way."""
    from mlx_moe.kernels import registry

    monkeypatch.setattr(registry, "CUDA_FENCE", fence)
    ptx, report = compile_sm90a(tmp_path, "mul_mv_id", [_moe_layer("q4_0_1x4x8_stage63", 1, 4, 8, stage=63)])
    assert set(re.findall(r"\b(fence\.[\w.]+|membar\.\w+)", ptx)) == {ptx_op}
    monkeypatch.setattr(registry, "CUDA_FENCE", "seq")
    with pytest.raises(ValueError, match="'seq'.*sc, acq_rel"):
        registry.family_header("cuda", "mul_mv_id")


def _qkv_attention_kernel():
    """qkv_attention at Qwen3-30B-A3B shapes and the default geometry (chain.QKV_NSG = 4)."""
    return ("qkv_attention", "qwen3",
            {"x": "bfloat16", "gin": "bfloat16", "w0": "uint32", "w0_s": "bfloat16", "w0_b": "bfloat16",
             "w1": "uint32", "w1_s": "bfloat16", "w1_b": "bfloat16", "w2": "uint32", "w2_s": "bfloat16",
             "w2_b": "bfloat16", "b0": "bfloat16", "b1": "bfloat16", "b2": "bfloat16", "cst": "float32",
             "q_norm": "bfloat16", "k_norm": "bfloat16", "k": "bfloat16", "v": "bfloat16", "pos": "int32",
             "acst": "float32", "count": "uint32"},
            {"y": "bfloat16", "parts": "float32", "ml": "float32"},
            [("T", "bfloat16"), ("FMT", 4), ("GS", 64), ("K", 2048), ("N0", 4096), ("N1", 512), ("N2", 512),
             ("NR", 2), ("NSG", 4), ("HAS_BIAS", False), ("D", 128), ("HQ", 32), ("HKV", 4), ("C", 768), ("U", 8),
             ("S", 4), ("QKNORM", True), ("TRAD", False)])


def test_cuda_handoff_choice_reaches_the_chain_kernels(tmp_path, monkeypatch):
    """registry.CUDA_HANDOFF (engine +handoff1) decides who fences at qkv_attention's hand-off
    (moe_release_ticket / moe_acquire_wait): "all" every thread, "one" the leader alone --
    the fences then sit in the leader's branches, so the kernel's code differs -- and an
    unknown value is named."""
    from mlx_moe.kernels import registry

    k = _qkv_attention_kernel()
    ptx = {}
    for handoff in ("all", "one"):
        monkeypatch.setattr(registry, "CUDA_HANDOFF", handoff)
        (tmp_path / handoff).mkdir()
        ptx[handoff], _ = compile_sm90a(tmp_path / handoff, "decode_chain", [k])
        assert "membar.gl" in ptx[handoff]
    body = [re.sub(r"//.*", "", p) for p in (ptx["all"], ptx["one"])]
    assert body[0] != body[1], "CUDA_HANDOFF did not reach the kernel"
    monkeypatch.setattr(registry, "CUDA_HANDOFF", "some")
    with pytest.raises(ValueError, match="'some'.*all, one"):
        registry.family_header("cuda", "decode_chain")


def test_moe_layer_kernel_compiles_for_sm90a(tmp_path):
    """The one-launch decode MoE layer, at its default geometry and with 8 simdgroups,
    unstaged and with the down, the gate/up and both rows staged (LayerGeometry.stage 1,
    2, 3; 5, 7: and the gate/up activations prepared; 15: and h read in pairs; 31: h in
    bfloat16, also traced; 59, 63: the gate/up tile on the tensor cores; 127: and the
    residual read before the wait; 191: 63 and the down tile on the tensor cores; 255: 191
    and the residual read first; 7, 191 and 2239 (the default: 191 and one fence a
    hand-off) with the routing shared, and 2495, 2751, 3007 (bits 256, 512: the down rows
    held, the down loop not unrolled) and 1215, 3263 (the gate/up nibbles a word at a time,
    on 191 and 2239), 6591 and 7103 (held until a quarter), and at 2x4x4x1 (128 threads)
    2239, 10431 and 14783 (x read through L1; and held until a quarter); 31 and 59
    under given routing, 31 traced): no spills, and registers few
    enough for 256-thread threadgroups (<= 255) -- its count bounds how many threadgroups
    an SM holds, so it is printed (pytest -s)."""
    kernels = [_moe_layer("q4_0_1x4x4", 1, 4, 4), _moe_layer("q4_0_1x4x8", 1, 4, 8)]
    kernels += [_moe_layer(f"q4_0_1x4x8_stage{st}", 1, 4, 8, stage=st)
                for st in (1, 2, 3, 5, 7, 15, 31, 59, 63, 127, 191, 255)]
    kernels += [_moe_layer("q4_0_2x4x8_stage3", 2, 4, 8, stage=3),
                _moe_layer("q4_0_1x4x8_stage31_trace", 1, 4, 8, stage=31, trace=True),
                _moe_layer("q4_0_1x4x8_stage7_share", 1, 4, 8, stage=7, share_route=True),
                _moe_layer("q4_0_1x4x8_stage191_share", 1, 4, 8, stage=191, share_route=True),
                *(_moe_layer(f"q4_0_1x4x8_stage{st}_share", 1, 4, 8, stage=st, share_route=True)
                  for st in (1215, 2239, 2495, 2751, 3007, 3263, 6591, 7103)),
                *(_moe_layer(f"q4_0_2x4x4_stage{st}_share", 2, 4, 4, stage=st, share_route=True)
                  for st in (2239, 10431, 14783)),
                _moe_layer_ids("q4_0_1x4x8_stage31_ids", 31), _moe_layer_ids("q4_0_1x4x8_stage59_ids", 59),
                _moe_layer_ids("q4_0_1x4x8_stage31_ids_trace", 31, trace=True)]
    _compiles(tmp_path, "mul_mv_id", kernels, max_registers=255)


def test_greedy_sample_compiles_for_sm90a(tmp_path):
    """Greedy sampling over Qwen3's vocabulary, bfloat16 and float32 logits: 1024-thread
    threadgroups, so at most 64 registers a thread (65536 a multiprocessor), no spills."""
    kernels = [("greedy_sample", dt, {"logits": dt, "count": "uint32"}, {"token": "int32", "lse": dt},
                [("T", dt), ("V", 151936), ("NT", 1024), ("NTG", 75)]) for dt in ("bfloat16", "float32")]
    _compiles(tmp_path, "sample", kernels, max_registers=64)


def test_qkv_attention_compiles_for_sm90a(tmp_path):
    """q/k/v and the attention in one launch (metal/decode_chain.metal) at Qwen3-30B-A3B
    shapes and the default geometry (chain.QKV_NSG = 4: 128-thread threadgroups), at most
    255 registers a thread, no spills."""
    k = _qkv_attention_kernel()
    _compiles(tmp_path, "decode_chain", [k])


def test_qkv_attention_oproj_compiles_for_sm90a(tmp_path):
    """The attention block in one launch (qkv_attention, then o_proj with the split router
    tail: metal/decode_chain.metal) at Qwen3-30B-A3B shapes, 16 simdgroups (chain.ATTENTION_NSG)
    and 4, o_proj at chain.OPROJ_NR: no spills, at most 255 registers (printed: the launch's one count)."""
    inputs = {"x": "bfloat16", "gin": "bfloat16", "w0": "uint32", "w0_s": "bfloat16", "w0_b": "bfloat16",
              "w1": "uint32", "w1_s": "bfloat16", "w1_b": "bfloat16", "w2": "uint32", "w2_s": "bfloat16",
              "w2_b": "bfloat16", "b0": "bfloat16", "b1": "bfloat16", "b2": "bfloat16", "cst": "float32",
              "q_norm": "bfloat16", "k_norm": "bfloat16", "k": "bfloat16", "v": "bfloat16", "pos": "int32",
              "acst": "float32", "count": "uint32", "ow": "uint32", "ow_s": "bfloat16", "ow_b": "bfloat16",
              "gpost": "bfloat16", "wr": "uint32", "wr_s": "bfloat16", "wr_b": "bfloat16", "ocst": "float32",
              "ocount": "uint32"}
    outputs = {"y": "bfloat16", "parts": "float32", "ml": "float32", "out": "bfloat16", "xn": "bfloat16",
               "logits": "bfloat16"}
    kernels = [("qkv_attention_oproj", f"qwen3_nsg{nsg}", inputs, outputs,
                [("T", "bfloat16"), ("FMT", 4), ("GS", 64), ("K", 2048), ("N0", 4096), ("N1", 512), ("N2", 512),
                 ("NR", 2), ("NSG", nsg), ("HAS_BIAS", False), ("D", 128), ("HQ", 32), ("HKV", 4), ("C", 768),
                 ("U", 8), ("S", 4), ("QKNORM", True), ("TRAD", False), ("FMTO", 4), ("GSO", 64), ("KO", 4096),
                 ("NO", 2048), ("NRO", 2), ("HD", 128), ("RFMT", 4), ("RGS", 64), ("RE", 128), ("RNR", 2)])
               for nsg in (16, 4)]
    _compiles(tmp_path, "decode_chain", kernels)




def test_oproj_moe_compiles_for_sm90a(tmp_path):
    """o_proj with the split router tail and the MoE layer in one launch (metal/decode_chain.metal)
    at Qwen3-30B-A3B shapes (o_proj 2 x 8, MoE 1x4x8x1 staged; and with the gate/up tile on the
    tensor cores, stage 59, the default's kernel): within CUDA's 48 KB of static shared memory
    beside o_proj's, no spills, at most 255 registers."""
    kernels = []
    for stage in (1, 59):
        tail = _tail("dense_residual_parts_router_split", "x", 2, 8)
        moe = _moe_layer("x", 1, 4, 8, stage=stage)
        inputs = dict(tail[2])
        inputs.update({n: moe[2][n] for n in ("bias", "scale", "wg", "wu", "wd")})
        inputs["mcount"] = inputs["ccount"] = "uint32"
        outputs = dict(tail[3])
        outputs.update(moe[3])
        names = {n for n, _ in tail[4]}
        template = list(tail[4]) + [(n, v) for n, v in moe[4] if n not in names]
        kernels.append(("oproj_moe", f"qwen3_stage{stage}", inputs, outputs, template))
    _compiles(tmp_path, "decode_chain", kernels)


def test_nvrtc_registers_reads_the_cubin_as_ptxas_reports_it(tmp_path):
    """tools/nvrtc_registers.py's cubin reader (cubin_resources: registers and stack frame
    from .nv.info) against ptxas' own report (-v) on an nvcc-built sm_90a cubin of the MoE
    layer at three stages."""
    import nvrtc_registers

    kernels = [_moe_layer(f"s{st}", 1, 4, 8, stage=st) for st in (31, 63, 191)]
    src = tmp_path / "moe.cu"
    src.write_text(translation_unit("mul_mv_id", kernels))
    cubin = tmp_path / "moe.cubin"
    r = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", str(src), "-o", str(cubin)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    want = {name: (regs, frame) for name, frame, regs in
            re.findall(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame.*?\n.*?Used (\d+) registers",
                       r.stderr + r.stdout)}
    got = nvrtc_registers.cubin_resources(cubin.read_bytes())
    entries = {n: v for n, v in got.items() if "mul_mv_id_moe" in n}
    assert len(entries) == 3 and set(entries) == set(want), (sorted(entries), sorted(want))
    for name, (regs, frame) in want.items():
        assert (entries[name]["registers"], entries[name].get("frame", 0)) == (int(regs), int(frame)), name
    assert len({v["registers"] for v in entries.values()}) > 1  # the stages differ: a reader of one number fails
