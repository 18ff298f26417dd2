"""The CUDA twins of the expert kernels (metal/mul_mv_id.metal through
shims_cuda.h and mx.fast.cuda_kernel) against the `mlx` backend on the CPU.

Marked `gpu`; skipped unless MLX's CUDA backend has a GPU.  Run as a script
(`python tests/test_kernels_cuda.py`) it runs a few cases once, small enough
for `compute-sanitizer --tool memcheck`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kernels_emulated import (  # noqa: E402
    FLOAT_SHAPES,
    GEOMETRIES,
    Q4_SHAPES,
    check_mul_mv_id_ragged_rows,
    check_q4_0_geometry,
    make_q4_layer,
    run_case,
)

_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")]

QWEN3 = (128, 2048, 768, 8, 1)  # Qwen3-30B-A3B decode: 128 experts, top-8, one token


def cuda_backend(fuse_swiglu=True, fuse_combine=True):
    from mlx_moe.backends.kernels import KernelBackend

    return KernelBackend("cuda", fuse_swiglu=fuse_swiglu, fuse_combine=fuse_combine)


@pytest.mark.parametrize("shape", Q4_SHAPES + [QWEN3, (128, 2048, 768, 8, 4)])
def test_q4_0_matches_mlx(shape):
    run_case(cuda_backend, "q4_0", shape, mx.float32)


@pytest.mark.parametrize("fmt,x_dtype", [("float16", mx.float16), ("bfloat16", mx.bfloat16),
                                         ("float32", mx.float32), ("bfloat16", mx.float32)])
@pytest.mark.parametrize("shape", FLOAT_SHAPES + [(32, 2048, 768, 8, 1)])
def test_float_experts_match_mlx(fmt, x_dtype, shape):
    run_case(cuda_backend, fmt, shape, x_dtype)


@pytest.mark.parametrize("x_dtype", [mx.float16, mx.bfloat16])
def test_q4_0_half_activations(x_dtype):
    run_case(cuda_backend, "q4_0", (16, 2048, 768, 8, 2), x_dtype, seed=3)


@pytest.mark.parametrize("fmt", ["q4_0", "bfloat16"])
def test_repeated_identity_and_padding_ids(fmt):
    run_case(cuda_backend, fmt, (4, 64, 96, 8, 3), mx.float32, n_identity=3, n_pad=2, repeats=True, seed=5)
    run_case(cuda_backend, fmt, (12, 256, 96, 12, 2), mx.float16, n_identity=4, n_pad=3, seed=6)


def test_all_slots_identity_or_padding():
    run_case(cuda_backend, "q4_0", (4, 64, 32, 4, 2), mx.float16, n_identity=2, n_pad=2, seed=7)


def test_large_activations_stay_finite():
    run_case(cuda_backend, "q4_0", (16, 2048, 768, 8, 1), mx.float32, x_scale=1e5, seed=9)
    run_case(cuda_backend, "float16", (5, 100, 70, 3, 2), mx.float32, x_scale=1e5, seed=9)


@pytest.mark.parametrize("fuse", [(False, True), (True, False), (False, False)])
def test_unfused_variants(fuse):
    run_case(cuda_backend, "q4_0", (6, 96, 160, 3, 2), mx.float32, n_identity=1, n_pad=1, seed=11, fuse=fuse)


def test_mul_mv_id_ragged_rows():
    check_mul_mv_id_ragged_rows("cuda")


@pytest.mark.parametrize("nr,nsg,nq", GEOMETRIES, ids=[f"{a}x{b}x{c}" for a, b, c in GEOMETRIES])
def test_q4_0_geometries(nr, nsg, nq):
    """Every Q4_0 lane map on ragged rows and tiles, ids of every kind, |x| ~ 1e4 (numpy oracle)."""
    check_q4_0_geometry("cuda", make_q4_layer(), nr, nsg, nq)


# Geometries the H100 sweep (tools/bench_kernels.py --ncu --geometries) tries, at model shapes.
SWEEP = [((8, 2, 4), (2, 8, 4)), ((1, 4, 1), (4, 8, 1)), ((2, 4, 1), (8, 8, 1)), ((2, 8, 2), (2, 8, 2))]


@pytest.mark.parametrize("gu,dn", SWEEP, ids=["x".join(map(str, a)) + "-" + "x".join(map(str, b)) for a, b in SWEEP])
def test_q4_0_sweep_geometries_qwen3(gu, dn, monkeypatch):
    from mlx_moe.kernels import dispatch

    monkeypatch.setitem(dispatch.GATE_UP, "q4_0", dispatch.Geometry(*gu))
    monkeypatch.setitem(dispatch.DOWN, "q4_0", dispatch.Geometry(*dn))
    run_case(cuda_backend, "q4_0", QWEN3, mx.bfloat16, seed=4)


if __name__ == "__main__":  # a few cases once, for compute-sanitizer
    run_case(cuda_backend, "q4_0", (6, 96, 160, 3, 2), mx.float32, n_identity=1, n_pad=2, seed=1)
    run_case(cuda_backend, "q4_0", (16, 64, 32, 10, 1), mx.float16, seed=2)
    run_case(cuda_backend, "bfloat16", (5, 100, 70, 3, 2), mx.bfloat16, n_identity=1, n_pad=1, seed=3)
    run_case(cuda_backend, "float16", (6, 130, 260, 4, 1), mx.float32, seed=4, fuse=(False, False))
    check_mul_mv_id_ragged_rows("cuda")
    check_q4_0_geometry("cuda", make_q4_layer(), 5, 3, 4)
    check_q4_0_geometry("cuda", make_q4_layer(), 1, 1, 1)
    print("sanitizer cases ran")
