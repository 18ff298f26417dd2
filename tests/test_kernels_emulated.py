"""The Metal expert kernels (metal/mul_mv_id.metal), run under the CPU emulation
of the Metal kernel environment, against the `mlx` backend (MLX's own
gather_mm / gather_qmm on the CPU).

Cases: Q4_0, float16, bfloat16 and float32 experts; k, n_experts, rows and
cols that are not multiples of the tiles; repeated expert ids in one token;
identity (zero-computation) experts; padding ids; activations of |x| ~ 1e5.

The case builders here are shared with tests/test_kernels_cuda.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_moe.backends.mlx import MLXBackend
from mlx_moe.experts import Experts
from mlx_moe.kernels.dispatch import use_decode_kernels

# Relative tolerance on max |error| / max |reference|, by activation (= output)
# dtype.  Kernels and oracle both compute in float32 on the same inputs; the
# half types add the rounding of the output (2^-11, 2^-8 relative).
TOL = {mx.float32: 2e-4, mx.float16: 2e-3, mx.bfloat16: 1e-2}


def _float_weights(rng, e, rows, cols):
    return (rng.standard_normal((e, rows, cols)) / np.sqrt(cols)).astype(np.float32)


def make_experts(n_experts: int, hidden: int, ffn: int, fmt: str, seed: int = 0) -> Experts:
    """Random experts: fmt "q4_0" (Q4_0 words) or a float dtype name."""
    rng = np.random.default_rng(seed)
    experts = Experts(hidden, ffn, n_experts)
    shapes = {"gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    for name, (rows, cols) in shapes.items():
        w = _float_weights(rng, n_experts, rows, cols)
        if fmt == "q4_0":
            from mlx_moe.q4_0 import Q4_0SwitchLinear

            proj = Q4_0SwitchLinear.from_float(w, name=name)
        else:
            proj = SwitchLinear(cols, rows, n_experts, bias=False)
            proj.weight = mx.array(w).astype(getattr(mx, fmt))
        setattr(experts, name, proj)
    mx.eval(experts.parameters())
    return experts


def make_routing(tokens: int, k: int, n_experts: int, n_identity: int = 0, n_pad: int = 0,
                 repeats: bool = False, seed: int = 0):
    """ids [T, k] int32 and weights [T, k] float32.

    Each token gets distinct real ids unless `repeats` (then ids may repeat
    within a token); then, per token, up to n_identity slots are replaced by
    identity ids and n_pad slots by padding ids (negative or past the end).
    """
    rng = np.random.default_rng(seed + 1)
    ids = np.empty((tokens, k), dtype=np.int32)
    for t in range(tokens):
        if repeats or k > n_experts:
            ids[t] = rng.integers(0, n_experts, size=k)
        else:
            ids[t] = rng.choice(n_experts, size=k, replace=False)
        slots = rng.permutation(k)
        for s in slots[:n_identity]:
            ids[t, s] = n_experts + rng.integers(0, max(n_identity, 1))
        for j, s in enumerate(slots[n_identity:n_identity + n_pad]):
            ids[t, s] = [-1, n_experts + n_identity, 2**31 - 1, -(2**31)][j % 4]
    w = rng.random((tokens, k)).astype(np.float32) + 0.1
    return mx.array(ids), mx.array(w / w.sum(axis=1, keepdims=True))


def make_x(tokens: int, hidden: int, dtype, scale: float = 1.0, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed + 2)
    return (mx.array(rng.standard_normal((tokens, hidden)).astype(np.float32)) * scale).astype(dtype)


def _float32_copy(experts: Experts) -> Experts:
    """Float experts widened to float32 (exact): MLX's CPU gather_mm is float32 only."""
    if not isinstance(experts.gate_proj, SwitchLinear):
        return experts
    wide = Experts(experts.hidden_dims, experts.ffn_dims, experts.num_experts)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(wide, name).weight = getattr(experts, name).weight.astype(mx.float32)
    return wide


def reference(x, ids, weights, experts, n_identity):
    """The `mlx` backend on the CPU, in float32 on the same (exactly widened) inputs: the oracle."""
    with mx.stream(mx.cpu):
        wide = _float32_copy(experts)
        y = MLXBackend()(x.astype(mx.float32), ids, weights, wide, n_identity=n_identity, may_pad=True)
        return np.array(y)


def assert_close(y: mx.array, ref: np.ndarray, x_dtype) -> None:
    assert y.dtype == x_dtype, f"output dtype {y.dtype}, expected {x_dtype}"
    got = np.array(y.astype(mx.float32))
    assert got.shape == ref.shape
    assert np.isfinite(got).all(), "non-finite values in the kernel output"
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    assert err <= TOL[x_dtype] * scale, f"max |err| {err:.3g} vs max |ref| {scale:.3g}"


# (n_experts, hidden, ffn, k, tokens): tile-aligned and ragged shapes.
# Q4_0 cols must be multiples of 32; float cols may be anything.
# Q4_0 rows are multiples of 32 in a SwiGLU layer (each projection's rows are
# another's cols); ragged row tiles are tested on the plain kernel below.
Q4_SHAPES = [
    (8, 512, 256, 2, 1),
    (6, 96, 160, 3, 2),     # rows not a multiple of the tile, 3 or 5 blocks per row
    (5, 544, 224, 4, 3),    # 17 and 7 blocks per row (some lane pairs do two steps)
    (16, 64, 32, 10, 1),    # k = 10 > down's 8 simdgroups, 1-2 blocks per row
]
FLOAT_SHAPES = [
    (8, 256, 128, 2, 1),
    (5, 100, 70, 3, 2),     # cols not multiples of 4 or of 128
    (6, 130, 260, 4, 1),
]


def run_case(backend_factory, fmt, shape, x_dtype, n_identity=0, n_pad=0, repeats=False,
             x_scale=1.0, seed=0, fuse=(True, True)):
    E, D, F, k, T = shape
    experts = make_experts(E, D, F, fmt, seed=seed)
    ids, w = make_routing(T, k, E, n_identity, n_pad, repeats, seed=seed)
    x = make_x(T, D, x_dtype, x_scale, seed=seed)
    ref = reference(x, ids, w, experts, n_identity)
    assert use_decode_kernels(x, ids, experts), "the case would not run on the kernels"
    backend = backend_factory(*fuse)
    y = backend(x, ids, w, experts, n_identity=n_identity)
    mx.eval(y)
    assert_close(y, ref, x_dtype)


# ---------------------------------------------------------------------------------------------

try:
    from mlx_moe.emulation import metal_kernel as _emulated_metal_kernel  # noqa: F401

    _HAS_EMULATION = True
except ImportError:
    _HAS_EMULATION = False
pytestmark = pytest.mark.skipif(not _HAS_EMULATION, reason="mlx_moe.emulation (CPU Metal emulation) is not available")


def emulated(fuse_swiglu=True, fuse_combine=True):
    from mlx_moe.backends.kernels import KernelBackend

    return KernelBackend("emulated", fuse_swiglu=fuse_swiglu, fuse_combine=fuse_combine)


@pytest.mark.parametrize("shape", Q4_SHAPES)
def test_q4_0_matches_mlx(shape):
    run_case(emulated, "q4_0", shape, mx.float32)


@pytest.mark.parametrize("fmt,x_dtype", [("float16", mx.float16), ("bfloat16", mx.bfloat16),
                                         ("float32", mx.float32), ("float16", mx.float32)])
@pytest.mark.parametrize("shape", FLOAT_SHAPES)
def test_float_experts_match_mlx(fmt, x_dtype, shape):
    run_case(emulated, fmt, shape, x_dtype)


@pytest.mark.parametrize("x_dtype", [mx.float16, mx.bfloat16])
def test_q4_0_half_activations(x_dtype):
    run_case(emulated, "q4_0", (6, 96, 160, 3, 2), x_dtype, seed=3)


@pytest.mark.parametrize("fmt", ["q4_0", "float16"])
def test_repeated_identity_and_padding_ids(fmt):
    # 8 slots of 4 experts: repeats are certain; 2 identity and 2 padding slots per token.
    run_case(emulated, fmt, (4, 64, 96, 8, 3), mx.float32, n_identity=3, n_pad=2, repeats=True, seed=5)


def test_all_slots_identity_or_padding():
    # No real expert anywhere: the output is the identity term alone.
    run_case(emulated, "q4_0", (4, 64, 32, 4, 2), mx.float16, n_identity=2, n_pad=2, seed=7)


def test_large_activations_stay_finite():
    # |x| ~ 1e5 in float32: above fp16's range; nothing in the kernels may round to half.
    run_case(emulated, "q4_0", (6, 96, 160, 3, 2), mx.float32, x_scale=1e5, seed=9)
    run_case(emulated, "float16", (5, 100, 70, 3, 2), mx.float32, x_scale=1e5, seed=9)


@pytest.mark.parametrize("fuse", [(False, True), (True, False), (False, False)])
def test_unfused_variants(fuse):
    run_case(emulated, "q4_0", (6, 96, 160, 3, 2), mx.float32, n_identity=1, n_pad=1, seed=11, fuse=fuse)


def check_mul_mv_id_ragged_rows(flavor):
    """The plain per-slot GEMV on Q4_0 rows that are not a multiple of the row tile,
    against numpy on the dequantized weights (mlx_moe.q4_0.dequantize)."""
    from mlx_moe.kernels.dispatch import Geometry
    from mlx_moe.kernels.mul_mv_id import mul_mv_id
    from mlx_moe.q4_0 import dequantize, quantize

    rng = np.random.default_rng(13)
    E, rows, cols, k, T = 5, 37, 96, 3, 2
    wq = quantize(rng.standard_normal((E, rows, cols)).astype(np.float32))
    wf = dequantize(wq)
    ids = np.array([[4, 0, 7], [2, 2, -3]], dtype=np.int32)  # 7 and -3: not real, rows must be zero
    src = rng.standard_normal((T * k, cols)).astype(np.float32) * 100
    for bcast in (False, True):
        x = src[:T] if bcast else src
        out = np.array(mul_mv_id(mx.array(x), mx.array(ids), mx.array(wq), bcast, flavor, Geometry(4, 2)))
        for p in range(T * k):
            e = ids.flat[p]
            want = wf[e] @ x[p // k if bcast else p] if 0 <= e < E else np.zeros(rows, np.float32)
            np.testing.assert_allclose(out[p], want, rtol=1e-4, atol=1e-4 * np.abs(want).max() + 1e-6)


def test_mul_mv_id_ragged_rows():
    check_mul_mv_id_ragged_rows("emulated")


def test_whole_model_forward_matches_mlx_backend(tmp_path, monkeypatch):
    """The built-in demo model (Qwen3-MoE shape, 16 experts top-4) on the emulated kernels:
    the same logits as on the `mlx` backend, through the loader and the MoE layers."""
    import mlx_moe
    from mlx_moe.backends.kernels import KernelBackend
    from mlx_moe.demo import demo_model_path
    from mlx_moe.moe import set_expert_backend

    monkeypatch.setenv("MLX_MOE_CACHE", str(tmp_path))
    model, _ = mlx_moe.load(str(demo_model_path()), kernels="mlx")
    toks = mx.array([[5, 17, 42]])  # 3 tokens x top-4: a decode-sized batch, runs on the kernels
    ref = np.array(model(toks))
    backend = KernelBackend("emulated")

    def no_fallback(*args, **kwargs):
        raise AssertionError("a layer fell back to the mlx backend")

    backend.fallback = no_fallback
    set_expert_backend(model, backend)
    got = np.array(model(toks))
    assert backend.stats.calls == 4  # the demo model's 4 MoE layers
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
