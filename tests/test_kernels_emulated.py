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
