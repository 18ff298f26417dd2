"""mul_mv_id_moe (metal/mul_mv_id.metal): the decode MoE layer in one launch, its down
threadgroups waiting inside the launch for its gate/up ones.

Held to two references: the two launches it replaces (mul_mv_id_swiglu_route, then
mul_mv_id_down_combine with the residual add), whose ids and weights it must give
exactly and whose output it must match to rounding; and a float64 numpy oracle of the
layer (Q4_0 weights dequantized independently, the rule's ids and weights from
mlx_moe/router.py's MLX ops).  Under the CPU emulation of Metal (threadgroups in index
order, as the kernel requires: registry.KernelSpec.in_order) and, marked gpu, on CUDA,
where the waits are real.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import router as R
from mlx_moe.kernels.dispatch import LayerGeometry
from mlx_moe.kernels.kernel_cases import CASES as KERNEL_CASES, moe_layer_reference
from mlx_moe.kernels.mul_mv_id import mul_mv_id_down_combine, mul_mv_id_moe, mul_mv_id_swiglu_route
from mlx_moe.kernels.registry import KERNELS, ticket_counter
from mlx_moe.kernels.router import RouterParams

from test_kernels_emulated import _dequant, _q4_words
from test_router_kernel_emulated import assert_same_routing
# the flavors, and the routing rules of the routed gate/up kernel's tests: (experts
# scored, real experts, rule) for Qwen3-MoE, Mixtral, DeepSeek-V2's group-limited rule
# and two identity experts past the real ones (LongCat-like: weight * x in the combine)
from test_swiglu_route import FLAVORS, RULES

D, F = 96, 64  # hidden, ffn (Q4_0: both multiples of 32)
# the default; ragged down tiles (96 rows in 5s); more simdgroups than some rules'
# slots, several gate/up rows a simdgroup and two quant words a lane.  (Staging needs
# 16-byte rows, 256 Q4_0 columns: test_staged_rows_match_unstaged has its own shape.)
GEOMETRIES = [None, LayerGeometry(1, 5, 2, 1), LayerGeometry(2, 4, 8, 2)]


def _layer(rng, ne, nexp, tokens, dtype=mx.float32, d=D, f=F):
    wg, wu = _q4_words(rng, ne, f, d), _q4_words(rng, ne, f, d)
    wd = _q4_words(rng, ne, d, f)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    res = rng.standard_normal((tokens, d)).astype(np.float32)
    lg = (rng.standard_normal((tokens, nexp)) * 2).astype(np.float32)
    lg[0, ne:] += 6.0  # past the real experts: the identity ones win a slot of token 0
    return wg, wu, wd, mx.array(x).astype(dtype), mx.array(lg).astype(mx.bfloat16), mx.array(res).astype(dtype)


def _oracle(wg, wu, wd, x, res, ids, w):
    """kernel_cases' float64 layer oracle over the Q4_0 words dequantized independently
    of mlx_moe (test_kernels_emulated._dequant)."""
    return moe_layer_reference(_dequant(wg), _dequant(wu), _dequant(wd), np.array(x.astype(mx.float32)),
                               np.array(res.astype(mx.float32)), ids, w)


# every rule at the default geometry on 1 and 3 tokens; the other geometries on the
# Qwen3 and identity rules (3 tokens)
CASES = ([(r, t, None) for r in range(len(RULES)) for t in (1, 3)]
         + [(r, 3, g) for r in (0, 3) for g in GEOMETRIES[1:]])


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("rule,tokens,geometry", CASES,
                         ids=[f"{('qwen3', 'mixtral', 'deepseek_group', 'identity')[r]}-{t}tok-"
                              f"{g.tag if g else 'default'}" for r, t, g in CASES])
def test_one_launch_matches_two_launches_and_oracle(flavor, rule, tokens, geometry):
    nexp, ne, params = RULES[rule]
    rng = np.random.default_rng(nexp + params.k + tokens)
    wg, wu, wd, x, logits, res = _layer(rng, ne, nexp, tokens)
    count = ticket_counter()
    args = (x, logits, params, mx.array(wg), mx.array(wu), mx.array(wd), nexp - ne, res, count, flavor, geometry)
    y, ids, w = mul_mv_id_moe(*args)
    assert_same_routing((ids, w), R.route(logits, params))
    h2, ids2, w2 = mul_mv_id_swiglu_route(x, logits, params, mx.array(wg), mx.array(wu), flavor)
    y2 = mul_mv_id_down_combine(h2, ids2, w2, x, mx.array(wd), nexp - ne, flavor, residual=res)
    np.testing.assert_array_equal(np.array(ids), np.array(ids2))
    np.testing.assert_array_equal(np.array(w), np.array(w2))
    y, y2 = np.array(y), np.array(y2)
    # the same sums in the same order under the emulation; on GPUs each kernel's own
    # contraction into FMAs may move the last bit
    np.testing.assert_allclose(y, y2, rtol=0 if flavor == "emulated" else 1e-5, atol=1e-6 * np.abs(y2).max())
    want = _oracle(wg, wu, wd, x, res, np.array(ids), np.array(w))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert (np.array(ids)[0] >= ne).any() == (nexp > ne)
    # the launch leaves its counter zero: the next one on it gives the same output
    assert not np.array(count).any()
    again, _, _ = mul_mv_id_moe(*args)
    np.testing.assert_array_equal(np.array(again), y)


# The rows staged in threadgroup memory (LayerGeometry.stage: 1 down, 2 gate/up, 3
# both, + 4 the gate/up activations prepared, + 8 h read in pairs): 6 gate/up rows a
# threadgroup and 5 down rows, neither dividing 256 (the last tiles ragged); two quant
# words a lane at 2 gate/up rows a simdgroup; one simdgroup (it prepares the activations
# after the routing rule).
STAGED = ([LayerGeometry(1, 5, 6, 1, stage=s) for s in (1, 2, 3, 4, 5, 7, 8, 15)]
          + [LayerGeometry(2, 5, 3, 2, stage=7), LayerGeometry(2, 5, 1, 1, stage=6)])


@pytest.mark.parametrize("flavor", FLAVORS)
def test_staged_rows_match_unstaged(flavor):
    """Staged launches on 256-column rows (16 bytes a row's multiple: the rows stage)
    against the same geometry unstaged -- the same dot products over the same words and
    activations, read from threadgroup memory instead: bit for bit under the emulation --
    and the oracle; an identity slot (its rows must not be read) on token 0."""
    nexp, ne, params = RULES[3]
    rng = np.random.default_rng(256)
    wg, wu, wd, x, logits, res = _layer(rng, ne, nexp, 2, d=256, f=256)
    wg, wu, wd = mx.array(wg), mx.array(wu), mx.array(wd)
    for g in STAGED:
        plain = dataclasses.replace(g, stage=0)
        want, ids, w = mul_mv_id_moe(x, logits, params, wg, wu, wd, nexp - ne, res, ticket_counter(), flavor, plain)
        y, ids2, w2 = mul_mv_id_moe(x, logits, params, wg, wu, wd, nexp - ne, res, ticket_counter(), flavor, g)
        np.testing.assert_array_equal(np.array(ids2), np.array(ids))
        y, want = np.array(y), np.array(want)
        tol = 0 if flavor == "emulated" else 1e-5
        np.testing.assert_allclose(y, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=g.tag)
    assert (np.array(ids)[0] >= ne).any()
    oracle = _oracle(np.array(wg), np.array(wu), np.array(wd), x, res, np.array(ids), np.array(w))
    np.testing.assert_allclose(y, oracle, rtol=1e-4, atol=1e-5 * np.abs(oracle).max())


@pytest.mark.parametrize("flavor", FLAVORS)
def test_bfloat16_h_is_the_float32_h_rounded(flavor):
    """Stage bit 16 (h kept in bfloat16 and read two values a load, staged geometry): h is
    the two launches' float32 h rounded to bfloat16 (exactly under the emulation; on GPUs
    within the last bit of either), and y their down combine over that rounded h; the
    rounding shows in y against stage 15's (float32 h).  With float32 activations the bit
    is dropped: h stays float32 and y is stage 15's bit for bit."""
    from mlx_moe.kernels.mul_mv_id import moe_layer_launch

    nexp, ne, params = RULES[3]  # an identity slot on token 0: its rows of h stay unwritten
    rng = np.random.default_rng(16)
    wg, wu, wd, x, logits, res = _layer(rng, ne, nexp, 2, dtype=mx.bfloat16, d=256, f=256)
    wg, wu, wd = mx.array(wg), mx.array(wu), mx.array(wd)
    g = LayerGeometry(1, 5, 6, 1, stage=31)
    y, ids, w, h = moe_layer_launch(x, logits, params, wg, wu, wd, nexp - ne, res, ticket_counter(), flavor, g)
    assert h.dtype == mx.bfloat16
    h2, ids2, w2 = mul_mv_id_swiglu_route(x, logits, params, wg, wu, flavor)
    np.testing.assert_array_equal(np.array(ids), np.array(ids2))
    real = (np.array(ids).reshape(-1) < ne)  # the rows the kernel writes
    assert real.sum() < real.size
    want_h = np.array(h2.astype(mx.bfloat16).astype(mx.float32))[real]
    got_h = np.array(h.astype(mx.float32))[real]
    if flavor == "emulated":
        np.testing.assert_array_equal(got_h, want_h)
    else:
        np.testing.assert_allclose(got_h, want_h, rtol=2 ** -7, atol=0)
    hr = h2.astype(mx.bfloat16).astype(mx.float32)
    want = np.array(mul_mv_id_down_combine(hr, ids2, w2, x, wd, nexp - ne, flavor, residual=res).astype(mx.float32))
    got = np.array(y.astype(mx.float32))
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6 * np.abs(want).max())
    y15 = mul_mv_id_moe(x, logits, params, wg, wu, wd, nexp - ne, res, ticket_counter(), flavor,
                        dataclasses.replace(g, stage=15))[0]
    assert (np.array(y15.astype(mx.float32)) != got).any()
    xf, resf = x.astype(mx.float32), res.astype(mx.float32)
    y32, _, _, h32 = moe_layer_launch(xf, logits, params, wg, wu, wd, nexp - ne, resf, ticket_counter(), flavor, g)
    assert h32.dtype == mx.float32
    want32 = mul_mv_id_moe(xf, logits, params, wg, wu, wd, nexp - ne, resf, ticket_counter(), flavor,
                           dataclasses.replace(g, stage=15))[0]
    np.testing.assert_array_equal(np.array(y32), np.array(want32))


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("rule,tokens", [(0, 3), (2, 1), (3, 3)], ids=["qwen3-3tok", "deepseek_group-1tok",
                                                                       "identity-3tok"])
def test_shared_routing_matches_each_threadgroup_routing(flavor, rule, tokens, monkeypatch):
    """dispatch.SHARE_ROUTE (down threadgroups read the routing each token's first
    threadgroup wrote, after count[2] says every token's is out) against every threadgroup
    running the rule: the same ids and weights, y bit for bit (the same sums), the
    counter zero after each launch, twice on one counter."""
    from mlx_moe.kernels import dispatch

    nexp, ne, params = RULES[rule]
    rng = np.random.default_rng(nexp + params.k + tokens + 1)
    wg, wu, wd, x, logits, res = _layer(rng, ne, nexp, tokens)
    args = (x, logits, params, mx.array(wg), mx.array(wu), mx.array(wd), nexp - ne, res)
    monkeypatch.setattr(dispatch, "SHARE_ROUTE", False)
    want, ids, w = mul_mv_id_moe(*args, ticket_counter(), flavor)
    monkeypatch.setattr(dispatch, "SHARE_ROUTE", True)
    count = ticket_counter()
    for _ in range(2):
        y, ids2, w2 = mul_mv_id_moe(*args, count, flavor)
        np.testing.assert_array_equal(np.array(ids2), np.array(ids))
        np.testing.assert_array_equal(np.array(w2), np.array(w))
        np.testing.assert_array_equal(np.array(y), np.array(want))
        assert not np.array(count).any()
    with pytest.raises(ValueError, match="3 uint32 words"):
        mul_mv_id_moe(*args, mx.zeros((2,), mx.uint32), flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_one_launch_bfloat16_activations(flavor):
    """bfloat16 x and residual (the models' dtype), the default geometry: y rounded as the
    two launches round it, over h rounded to bfloat16 where the default keeps h in
    bfloat16 (stage bit 16, as mlx-lm's SwitchGLU)."""
    from mlx_moe.kernels import dispatch

    rng = np.random.default_rng(5)
    params = RouterParams(8, normalize=True)
    wg, wu, wd, x, logits, res = _layer(rng, 128, 128, 1, mx.bfloat16)
    y, ids, w = mul_mv_id_moe(x, logits, params, mx.array(wg), mx.array(wu), mx.array(wd), 0, res,
                              ticket_counter(), flavor)
    assert y.dtype == mx.bfloat16
    h2, ids2, w2 = mul_mv_id_swiglu_route(x, logits, params, mx.array(wg), mx.array(wu), flavor)
    if dispatch.MOE_LAYER["q4_0"].stage & 16:
        h2 = h2.astype(mx.bfloat16).astype(mx.float32)
    y2 = mul_mv_id_down_combine(h2, ids2, w2, x, mx.array(wd), 0, flavor, residual=res)
    diff = np.abs(np.array(y.astype(mx.float32)) - np.array(y2.astype(mx.float32)))
    assert diff.max() <= (0 if flavor == "emulated" else 1e-2 * np.abs(np.array(y2.astype(mx.float32))).max())
    want = _oracle(wg, wu, wd, x, res, np.array(ids), np.array(w))
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("flavor", FLAVORS)
def test_gate_up_on_tensor_cores(flavor):
    """Stage bit 32 (the gate/up tile on CUDA's tensor cores, moe_gate_up_mma; Metal has
    none and ignores the bit): against the same geometry without it (stages 63 and 59, with
    and without the prepared activations, against 31 and 27), bfloat16 activations, 8 gate
    rows a threadgroup.  Under the emulation every output bit for bit; on CUDA the same ids
    and weights, h within a bfloat16 rounding (the float32 sums are added in another order)
    and y to rounding, and y against the float64 oracle; float32 activations drop the bit
    (the same launch, bit for bit)."""
    from mlx_moe.kernels.mul_mv_id import moe_layer_launch

    nexp, ne, params = RULES[3]  # an identity slot on token 0: its rows of h stay unwritten
    rng = np.random.default_rng(32)
    wg, wu, wd, x, logits, res = _layer(rng, ne, nexp, 2, dtype=mx.bfloat16, d=256, f=256)
    wgm, wum, wdm = mx.array(wg), mx.array(wu), mx.array(wd)
    real = None
    for down_nr, mma, plain in ((5, 63, 31), (5, 59, 27)):
        got = moe_layer_launch(x, logits, params, wgm, wum, wdm, nexp - ne, res, ticket_counter(), flavor,
                               LayerGeometry(1, down_nr, 8, 1, stage=mma))
        want = moe_layer_launch(x, logits, params, wgm, wum, wdm, nexp - ne, res, ticket_counter(), flavor,
                                LayerGeometry(1, down_nr, 8, 1, stage=plain))
        (y, ids, w, h), (y0, ids0, w0, h0) = ([np.array(a.astype(mx.float32)) for a in o] for o in (got, want))
        np.testing.assert_array_equal(ids, ids0)
        np.testing.assert_array_equal(w, w0)
        real = ids.reshape(-1) < ne  # the rows of h the kernel writes
        assert real.sum() < real.size
        if flavor == "emulated":
            np.testing.assert_array_equal(h[real], h0[real])
            np.testing.assert_array_equal(y, y0)
        else:
            np.testing.assert_allclose(h[real], h0[real], rtol=2 ** -7, atol=2 ** -7 * np.abs(h0[real]).max())
            np.testing.assert_allclose(y, y0, rtol=2 ** -7, atol=1e-2 * np.abs(y0).max())
        want_y = _oracle(wg, wu, wd, x, res, ids.astype(np.int32), w)
        np.testing.assert_allclose(y, want_y, rtol=2e-2, atol=2e-2 * np.abs(want_y).max())
    xf, resf = x.astype(mx.float32), res.astype(mx.float32)
    y32 = moe_layer_launch(xf, logits, params, wgm, wum, wdm, nexp - ne, resf, ticket_counter(), flavor,
                           LayerGeometry(1, 5, 8, 1, stage=63))[0]
    y15 = moe_layer_launch(xf, logits, params, wgm, wum, wdm, nexp - ne, resf, ticket_counter(), flavor,
                           LayerGeometry(1, 5, 8, 1, stage=15))[0]
    np.testing.assert_array_equal(np.array(y32), np.array(y15))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_down_on_tensor_cores(flavor):
    """Stage bit 128 (the down tile on CUDA's tensor cores, moe_down_mma: 4 slots' 4 rows
    a tile; Metal has none and ignores the bit): against the same geometry without it
    (191 against 63), bfloat16 activations, an identity slot on token 0, two tokens.  Under
    the emulation every output bit for bit; on CUDA the same ids, weights and h, y to
    rounding (the float32 sums in another order) and against the float64 oracle; float32
    activations drop the bit (the same launch, bit for bit)."""
    from mlx_moe.kernels.mul_mv_id import moe_layer_launch

    nexp, ne, params = RULES[3]
    rng = np.random.default_rng(128)
    wg, wu, wd, x, logits, res = _layer(rng, ne, nexp, 2, dtype=mx.bfloat16, d=256, f=256)
    wgm, wum, wdm = mx.array(wg), mx.array(wu), mx.array(wd)
    got, want = (moe_layer_launch(x, logits, params, wgm, wum, wdm, nexp - ne, res, ticket_counter(), flavor,
                                  LayerGeometry(1, 4, 8, 1, stage=st)) for st in (191, 63))
    (y, ids, w, h), (y0, ids0, w0, h0) = ([np.array(a.astype(mx.float32)) for a in o] for o in (got, want))
    np.testing.assert_array_equal(ids, ids0)
    np.testing.assert_array_equal(w, w0)
    real = ids.reshape(-1) < ne
    assert real.sum() < real.size
    np.testing.assert_array_equal(h[real], h0[real])
    if flavor == "emulated":
        np.testing.assert_array_equal(y, y0)
    else:
        np.testing.assert_allclose(y, y0, rtol=2 ** -7, atol=1e-2 * np.abs(y0).max())
    want_y = _oracle(wg, wu, wd, x, res, ids.astype(np.int32), w)
    np.testing.assert_allclose(y, want_y, rtol=2e-2, atol=2e-2 * np.abs(want_y).max())
    xf, resf = x.astype(mx.float32), res.astype(mx.float32)
    y32, y15 = (moe_layer_launch(xf, logits, params, wgm, wum, wdm, nexp - ne, resf, ticket_counter(), flavor,
                                 LayerGeometry(1, 4, 8, 1, stage=st))[0] for st in (191, 15))
    np.testing.assert_array_equal(np.array(y32), np.array(y15))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_gate_up_words_is_the_tile(flavor):
    """Stage bit 1024 (the gate/up tile's nibbles converted a 32-bit word at a time, x
    reordered and each block's sum taken off after the mma; CUDA's tensor cores only, Metal
    ignores it): against 191, bfloat16 activations, an identity slot on token 0, two tokens.
    Under the emulation every output bit for bit; on CUDA the same ids and weights, h and y
    to rounding (the float32 sums in another order and 30 times larger before the offset
    comes off) and against the float64 oracle."""
    from mlx_moe.kernels.mul_mv_id import moe_layer_launch

    nexp, ne, params = RULES[3]
    rng = np.random.default_rng(1024)
    wg, wu, wd, x, logits, res = _layer(rng, ne, nexp, 2, dtype=mx.bfloat16, d=256, f=256)
    wgm, wum, wdm = mx.array(wg), mx.array(wu), mx.array(wd)
    got, want = (moe_layer_launch(x, logits, params, wgm, wum, wdm, nexp - ne, res, ticket_counter(), flavor,
                                  LayerGeometry(1, 4, 8, 1, stage=st)) for st in (191 | 1024, 191))
    (y, ids, w, h), (y0, ids0, w0, h0) = ([np.array(a.astype(mx.float32)) for a in o] for o in (got, want))
    np.testing.assert_array_equal(ids, ids0)
    np.testing.assert_array_equal(w, w0)
    real = ids.reshape(-1) < ne
    assert real.sum() < real.size
    if flavor == "emulated":
        np.testing.assert_array_equal(h[real], h0[real])
        np.testing.assert_array_equal(y, y0)
    else:
        np.testing.assert_allclose(h[real], h0[real], rtol=2 ** -7, atol=1e-2 * np.abs(h0[real]).max())
        np.testing.assert_allclose(y, y0, rtol=2 ** -7, atol=1e-2 * np.abs(y0).max())
    want_y = _oracle(wg, wu, wd, x, res, ids.astype(np.int32), w)
    np.testing.assert_allclose(y, want_y, rtol=2e-2, atol=2e-2 * np.abs(want_y).max())


def test_one_launch_needs_in_order_threadgroups():
    """The registry marks the kernel (the emulation then runs its threadgroups in index
    order); the two-launch kernels keep the emulation's last-first order."""
    assert KERNELS["mul_mv_id_moe"].in_order and "count" in KERNELS["mul_mv_id_moe"].inplace
    assert not KERNELS["mul_mv_id_swiglu_route"].in_order


def test_one_launch_rejects_what_it_cannot_run():
    rng = np.random.default_rng(0)
    wg, wu, wd, x, logits, res = _layer(rng, 8, 8, 1)
    p = RouterParams(2)
    wg, wu, wd = mx.array(wg), mx.array(wu), mx.array(wd)
    with pytest.raises(ValueError, match="3 uint32 words"):  # the routing shared (dispatch.SHARE_ROUTE): 3 words
        mul_mv_id_moe(x, logits, p, wg, wu, wd, 0, res, mx.zeros((2,), mx.uint32), "emulated")
    with pytest.raises(ValueError, match="down weights"):
        mul_mv_id_moe(x, logits, p, wg, wu, wg, 0, res, ticket_counter(), "emulated")
    with pytest.raises(ValueError, match="residual must be"):
        mul_mv_id_moe(x, logits, p, wg, wu, wd, 0, res.astype(mx.float16), ticket_counter(), "emulated")
    with pytest.raises(ValueError, match="GATE_NRxDOWN_NRxNSG"):
        LayerGeometry.parse("1x4")
    with pytest.raises(ValueError, match="stage is 0 to 16383.*got 16384"):
        LayerGeometry(1, 4, 8, 1, stage=16384)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("fence", ["sc", "acq_rel"])
@pytest.mark.parametrize("tag", [None, "2x4x4x1x14783"], ids=["default", "2x4x4x1x14783"])
def test_default_at_qwen3_shapes(flavor, fence, tag, monkeypatch):
    """The default geometry -- and 2x4x4x1x14783 (a candidate: every threadgroup resident,
    the down rows held, x read through L1) -- at Qwen3-30B-A3B's layer shapes (hidden 2048,
    ffn 768, top-8, bfloat16 activations), where its threadgroup memory is largest: against the two
    launches it replaces (bit for bit under the emulation, which refuses a launch past
    Metal's 32 KB; to rounding on CUDA, whose dot products run on the tensor cores), and on
    CUDA 16 launches on one counter over 128 experts (a down threadgroup reading h before
    the gate/up writes reach it would change y; the counter must end at zero), with either
    CUDA fence of the hand-off (registry.CUDA_FENCE; the emulation runs Metal's)."""
    from mlx_moe.kernels import dispatch, registry
    from mlx_moe.q4_0 import quantize

    if flavor == "emulated" and fence != "sc":
        pytest.skip("the CUDA fence choice: Metal's shims have their own")
    monkeypatch.setattr(registry, "CUDA_FENCE", fence)
    geometry = LayerGeometry.parse(tag) if tag else None

    rng = np.random.default_rng(31)
    E, reps = (128, 16) if flavor == "cuda" else (8, 1)
    d, f, k = 2048, 768, 8
    wg, wu = (mx.array(quantize(rng.standard_normal((E, f, d)).astype(np.float32))) for _ in range(2))
    wd = mx.array(quantize(rng.standard_normal((E, d, f)).astype(np.float32)))
    params, count = RouterParams(k, normalize=True), ticket_counter()
    for rep in range(reps):
        x, res = (mx.array(rng.standard_normal((1, d)).astype(np.float32)).astype(mx.bfloat16) for _ in range(2))
        logits = mx.array(rng.standard_normal((1, E)).astype(np.float32))
        y, ids, w = mul_mv_id_moe(x, logits, params, wg, wu, wd, 0, res, count, flavor, geometry)
        h2, ids2, w2 = mul_mv_id_swiglu_route(x, logits, params, wg, wu, flavor)
        np.testing.assert_array_equal(np.array(ids), np.array(ids2), err_msg=f"ids, launch {rep}")
        np.testing.assert_array_equal(np.array(w), np.array(w2), err_msg=f"weights, launch {rep}")
        if (geometry or dispatch.MOE_LAYER["q4_0"]).stage & 16:
            h2 = h2.astype(mx.bfloat16).astype(mx.float32)
        y2 = np.array(mul_mv_id_down_combine(h2, ids2, w2, x, wd, 0, flavor, residual=res).astype(mx.float32))
        diff = np.abs(np.array(y.astype(mx.float32)) - y2).max()
        assert diff <= (0 if flavor == "emulated" else 2e-2 * np.abs(y2).max()), f"y, launch {rep}: {diff}"
    assert not np.array(count).any(), "the counter is not zero after the launches"


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("bits", [64, 256, 512, 768, 2048, 4352, 8192])
def test_order_bits_are_the_launch(flavor, bits):
    """Stage bits that move work without changing a sum -- 64 (the residual read before the
    down threadgroups wait), 256 (their rows held until half the gate/up threadgroups are
    done; with 4096 a quarter), 512 (the down tile's loop not unrolled; needs the tile on the tensor cores, so
    CUDA's Qwen3 shapes alone check it), 2048 (one fence a hand-off; CUDA only, so there
    alone a check of the hand-offs), 8192 (the gate/up tile's x read through L1, not copied;
    CUDA only) -- y, ids, weights and h bit for bit against the same geometry without them,
    on 256 x 256 rows (2 tokens, ragged down tiles; 3 slots) and on CUDA at Qwen3-30B-A3B's
    shapes (on top of 63 for bit 64, of 191 for the others; the held rows and x through L1
    also at 128 threads a threadgroup, 2x4x4x1, on top of 2239), 8 launches on one counter."""
    from mlx_moe.kernels.mul_mv_id import moe_layer_launch
    from mlx_moe.q4_0 import quantize

    rng = np.random.default_rng(bits)
    shapes = [(8, 256, 256, 2, 3, 2, (1, 5, 8, 63)), (8, 256, 256, 1, 3, 1, (1, 4, 8, 15))]
    if flavor == "cuda":
        shapes.append((128, 2048, 768, 1, 8, 8, (1, 4, 8, 63 if bits == 64 else 191)))
        if bits & (256 | 8192):
            shapes.append((128, 2048, 768, 1, 8, 4, (2, 4, 4, 2239)))
    for E, d, f, T, k, reps, (nrg, nrd, nsg, base) in shapes:
        wg, wu = (mx.array(quantize(rng.standard_normal((E, f, d)).astype(np.float32))) for _ in range(2))
        wd = mx.array(quantize(rng.standard_normal((E, d, f)).astype(np.float32)))
        params, count = RouterParams(k, normalize=True), ticket_counter()
        base_g = LayerGeometry(nrg, nrd, nsg, 1, stage=base)
        for rep in range(reps):
            x, res = (mx.array(rng.standard_normal((T, d)).astype(np.float32)).astype(mx.bfloat16) for _ in range(2))
            logits = mx.array(rng.standard_normal((T, E)).astype(np.float32))
            want = moe_layer_launch(x, logits, params, wg, wu, wd, 0, res, count, flavor, base_g)
            got = moe_layer_launch(x, logits, params, wg, wu, wd, 0, res, count, flavor,
                                   dataclasses.replace(base_g, stage=base | bits))
            for name, a, b in zip(("y", "ids", "weights"), got[:3], want[:3]):
                np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)),
                                              err_msg=f"{name}, stage {base | bits}, {E} experts, launch {rep}")
            real = np.array(want[1]).reshape(-1) < E
            np.testing.assert_array_equal(np.array(got[3].astype(mx.float32))[real],
                                          np.array(want[3].astype(mx.float32))[real], err_msg=f"h, launch {rep}")
        assert not np.array(count).any(), "the counter is not zero after the launches"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_traced_launch_is_the_launch(flavor):
    """mul_mv_id_moe_trace (option TRACE, tools/trace_moe_layer.py), its verification case
    (kernel_cases): the plain launch's outputs bit for bit, unstaged and staged, and one
    row of 7 stamps a threadgroup -- zeros under the emulation (Metal reads no clock); on
    CUDA, nanoseconds in event order within each threadgroup."""
    for case in KERNEL_CASES["mul_mv_id_moe_trace"]:
        case.check(flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["mul_mv_id_moe_ids", "mul_mv_id_moe_ids_trace"])
def test_given_routing_layer(flavor, name):
    """mul_mv_id_moe_ids (option IDS: the routing made upstream) and its traced launch,
    their verification cases (kernel_cases): y against the float64 numpy oracle with a
    repeated expert, an identity expert and padding ids (-1, past every expert), and
    mul_mv_id_moe's y and h bit for bit under the routing it chose; unstaged and staged."""
    for case in KERNEL_CASES[name]:
        case.check(flavor)


def test_given_routing_rejects_what_it_cannot_run():
    from mlx_moe.kernels.mul_mv_id import mul_mv_id_moe_ids

    rng = np.random.default_rng(0)
    wg, wu, wd, x, _, res = _layer(rng, 8, 8, 2)
    wg, wu, wd = mx.array(wg), mx.array(wu), mx.array(wd)
    ids, w = mx.zeros((2, 3), mx.int32), mx.zeros((2, 3), mx.float32)
    with pytest.raises(ValueError, match="ids must be int32"):
        mul_mv_id_moe_ids(x, ids.astype(mx.int64), w, wg, wu, wd, 0, res, ticket_counter(), "emulated")
    with pytest.raises(ValueError, match="weights must be float32"):
        mul_mv_id_moe_ids(x, ids, w[:, :2], wg, wu, wd, 0, res, ticket_counter(), "emulated")
    with pytest.raises(ValueError, match="residual must be"):
        mul_mv_id_moe_ids(x, ids, w, wg, wu, wd, 0, res[:1], ticket_counter(), "emulated")
    with pytest.raises(ValueError, match="2 uint32 words"):
        mul_mv_id_moe_ids(x, ids, w, wg, wu, wd, 0, res, mx.zeros((1,), mx.uint32), "emulated")
