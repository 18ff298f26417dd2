"""The Metal expert kernels (metal/mul_mv_id.metal), run under the CPU emulation
of the Metal kernel environment, against the `mlx` backend (MLX's own
gather_mm / gather_qmm on the CPU).

Cases: Q4_0, float16, bfloat16 and float32 experts; k, n_experts, rows and
cols that are not multiples of the tiles; repeated expert ids in one token;
identity (zero-computation) experts; padding ids; activations of |x| ~ 1e5.

The cases are the families of mlx_moe/verify/cases.py, the one definition
tools/verify_metal.py runs on a Mac too.  The builders re-exported here are
shared with tests/test_kernels_cuda.py and tests/test_kernels_prefill_emulated.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe.verify.cases import (  # noqa: F401  (re-exported for the CUDA and prefill tests)
    FAMILIES,
    FLOAT_SHAPES,
    Q4_SHAPES,
    TOL,
    LayerCase,
    layer_measure,
    make_experts,
    make_routing,
    make_x,
    ragged_rows_measure,
    reference,
)


def _dtype_name(d) -> str:
    return d if isinstance(d, str) else str(d).split(".")[-1]


def check_layer(backend_factory, case: LayerCase) -> None:
    """The case's layer on backend_factory(fuse_swiglu, fuse_combine) against the mlx backend:
    output dtype and shape, all finite, max |err| <= TOL[dtype] * max |ref|."""
    m = layer_measure(case, backend_factory(*case.fuse))
    assert m.ok, f"{case.id}: {m.describe()}"


def run_case(backend_factory, fmt, shape, x_dtype, n_identity=0, n_pad=0, repeats=False,
             x_scale=1.0, seed=0, fuse=(True, True)):
    check_layer(backend_factory, LayerCase(fmt, tuple(shape), _dtype_name(x_dtype), n_identity, n_pad, repeats,
                                           x_scale, seed, tuple(fuse)))


def check_mul_mv_id_ragged_rows(flavor):
    """The plain per-slot GEMV on Q4_0 rows that are not a multiple of the row tile,
    against numpy on the dequantized weights (mlx_moe.q4_0.dequantize)."""
    m = ragged_rows_measure(flavor)
    assert m.ok, m.describe()


def _ids(case):
    return case.id


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


@pytest.mark.parametrize("case", FAMILIES["shapes_q4_0"].cases, ids=_ids)
def test_q4_0_matches_mlx(case):
    check_layer(emulated, case)


@pytest.mark.parametrize("case", FAMILIES["shapes_float"].cases, ids=_ids)
def test_float_experts_match_mlx(case):
    check_layer(emulated, case)


@pytest.mark.parametrize("case", FAMILIES["half_activations"].cases, ids=_ids)
def test_q4_0_half_activations(case):
    check_layer(emulated, case)


@pytest.mark.parametrize("case", FAMILIES["repeated_ids"].cases, ids=_ids)
def test_repeated_identity_and_padding_ids(case):
    # 8 slots of 4 experts: repeats are certain; 3 identity and 2 padding slots per token.
    check_layer(emulated, case)


@pytest.mark.parametrize("case", FAMILIES["zero_experts"].cases, ids=_ids)
def test_all_slots_identity_or_padding(case):
    # No real expert anywhere: the output is the identity term alone.
    check_layer(emulated, case)


@pytest.mark.parametrize("case", FAMILIES["huge_activations"].cases, ids=_ids)
def test_large_activations_stay_finite(case):
    # |x| ~ 1e5 in float32: above fp16's range; nothing in the kernels may round to half.
    check_layer(emulated, case)


@pytest.mark.parametrize("case", FAMILIES["unfused_variants"].cases, ids=_ids)
def test_unfused_variants(case):
    check_layer(emulated, case)


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


# -- launch geometries (rows per simdgroup x simdgroups x Q4_0 words per lane) -----------------
# Each Q4_0 lane map (nq = 1, 2, 4: 4, 8, 16 blocks per step) on rows of 17 and 3 blocks
# (ragged last steps), row counts that no row tile divides, repeated ids, identity and
# padding ids, |x| ~ 1e4; oracle: numpy on weights dequantized from the Q4_0 block layout
# (DESIGN.md section 4), written here independently of the kernels and of mlx_moe.q4_0.

# Row tiles of 1, 6, 15 and 32 rows against 96 and 544 rows; nr=5 / nr=3 leave partial tiles.
GEOMETRIES = [(1, 1, 1), (3, 2, 2), (5, 3, 4), (4, 8, 1)]
NE, NI, D, F = 5, 1, 544, 96
IDS = np.array([[3, 3, 5, -1], [0, 2**31 - 1, 4, 6]], np.int32)  # 5: identity; -1, 2^31-1, 6: padding


def _q4_words(rng, e, rows, cols):
    """Random Q4_0 words [e, rows, cols/32*9]: an fp16 scale word, then 8 random quant words."""
    nb = cols // 32
    d = rng.uniform(0.002, 0.05, (e, rows, nb, 1)).astype(np.float16).view(np.uint16)
    q = rng.integers(0, 1 << 16, (e, rows, nb, 8)).astype(np.uint16)
    return np.concatenate([d, q], axis=-1).reshape(e, rows, nb * 9)


def _dequant(words):
    """float64 [e, rows, cols] from Q4_0 words: byte j of a block's quants holds weight j
    (low nibble) and j+16 (high nibble), each d * (nibble - 8)."""
    e, rows, nw = words.shape
    blk = words.reshape(e, rows, nw // 9, 9)
    d = blk[..., 0].view(np.float16).astype(np.float64)
    qs = blk[..., 1:].astype("<u2").view(np.uint8)  # 16 bytes, little-endian words
    lo = (qs & 0xF).astype(np.float64) - 8
    hi = (qs >> 4).astype(np.float64) - 8
    return (np.concatenate([lo, hi], axis=-1) * d[..., None]).reshape(e, rows, -1)


@pytest.fixture(scope="module")
def q4_layer():
    return make_q4_layer()


def make_q4_layer():
    rng = np.random.default_rng(21)
    wg, wu, wd = _q4_words(rng, NE, F, D), _q4_words(rng, NE, F, D), _q4_words(rng, NE, D, F)
    x = rng.standard_normal((2, D)).astype(np.float32) * 1e4
    h = rng.standard_normal((IDS.size, F)).astype(np.float32)
    wts = rng.uniform(0.1, 1.0, IDS.shape).astype(np.float32)
    return wg, wu, wd, x, h, wts


def _silu(a):
    with np.errstate(over="ignore"):  # exp(-a) -> inf for a << 0: silu -> -0, as in the kernel
        return a / (1 + np.exp(-a))


def _close(got, want, what):
    got = np.array(got).astype(np.float64)
    scale = np.abs(want).max()
    assert np.all(np.isfinite(got)), what
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("nr,nsg,nq", GEOMETRIES, ids=[f"{a}x{b}x{c}" for a, b, c in GEOMETRIES])
def test_q4_0_geometries(q4_layer, nr, nsg, nq):
    check_q4_0_geometry("emulated", q4_layer, nr, nsg, nq)


def check_q4_0_geometry(flavor, q4_layer, nr, nsg, nq):
    """swiglu, plain (per-pair src) and down_combine at one geometry against the numpy oracle."""
    from mlx_moe.kernels.dispatch import Geometry
    from mlx_moe.kernels.mul_mv_id import mul_mv_id, mul_mv_id_down_combine, mul_mv_id_swiglu

    wg, wu, wd, x, h, wts = q4_layer
    g = Geometry(nr, nsg, nq)
    G, U, Dn = _dequant(wg), _dequant(wu), _dequant(wd)
    ids = IDS.reshape(-1)
    real = (ids >= 0) & (ids < NE)
    tok = np.arange(ids.size) // IDS.shape[1]

    got = np.array(mul_mv_id_swiglu(mx.array(x), mx.array(IDS), mx.array(wg), mx.array(wu), flavor, g))
    for p in np.flatnonzero(real):  # other rows are unwritten by contract
        a, b = G[ids[p]] @ x[tok[p]], U[ids[p]] @ x[tok[p]]
        _close(got[p], _silu(a) * b, f"swiglu pair {p}")

    got = mul_mv_id(mx.array(h), mx.array(IDS), mx.array(wd), False, flavor, g)
    want = np.zeros((ids.size, D))
    for p in np.flatnonzero(real):
        want[p] = Dn[ids[p]] @ h[p]
    assert not np.array(got)[~real].any(), "identity/padding rows must be zero"
    _close(got, want, "mul_mv_id down rows")

    y = mul_mv_id_down_combine(mx.array(h), mx.array(IDS), mx.array(wts), mx.array(x), mx.array(wd), NI,
                               flavor, g)
    w = wts.reshape(-1)
    ref = np.zeros((2, D))
    for p in range(ids.size):
        if real[p]:
            ref[tok[p]] += w[p] * want[p]
        elif NE <= ids[p] < NE + NI:
            ref[tok[p]] += w[p] * x[tok[p]]
    _close(y, ref, "down_combine")


def test_q4_0_geometry_bfloat16_activations(q4_layer):
    """The default geometries with bfloat16 activations in and out (x rounded first)."""
    from mlx_moe.kernels.mul_mv_id import mul_mv_id_down_combine, mul_mv_id_swiglu

    wg, wu, wd, x, h, wts = q4_layer
    xb = mx.array(x / 1e4).astype(mx.bfloat16)
    xf = np.array(xb.astype(mx.float32)).astype(np.float64)
    G, U, Dn = _dequant(wg), _dequant(wu), _dequant(wd)
    got = np.array(mul_mv_id_swiglu(xb, mx.array(IDS), mx.array(wg), mx.array(wu), "emulated"))
    ids = IDS.reshape(-1)
    for p in np.flatnonzero((ids >= 0) & (ids < NE)):
        t = p // IDS.shape[1]
        a, b = G[ids[p]] @ xf[t], U[ids[p]] @ xf[t]
        _close(got[p], _silu(a) * b, f"swiglu pair {p}")
    y = mul_mv_id_down_combine(mx.array(h), mx.array(IDS), mx.array(wts), xb, mx.array(wd), NI, "emulated")
    assert y.dtype == mx.bfloat16
    ref = np.zeros((2, D))
    for p in range(ids.size):
        t, e, w = p // IDS.shape[1], ids[p], wts.reshape(-1)[p]
        if 0 <= e < NE:
            ref[t] += w * (Dn[e] @ h[p])
        elif NE <= e < NE + NI:
            ref[t] += w * xf[t]
    got = np.array(y.astype(mx.float32)).astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_geometry_rejects_bad_lane_map():
    from mlx_moe.kernels.dispatch import Geometry

    with pytest.raises(ValueError, match="nq"):
        Geometry(2, 4, 3)
    with pytest.raises(ValueError, match="nsg"):
        Geometry(2, 33)
