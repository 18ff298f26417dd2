"""One small verification case per kernel of registry.KERNELS (kernel_cases).

`CASES[name]` is a list of `KernelCase`; `case.check(flavor)` runs the kernel
on that flavor ("metal", "cuda", "emulated") on small random inputs and
raises AssertionError when it disagrees with an independent oracle (numpy, or
the `mlx` backend computed in float32 on the CPU).  Tools that verify kernels
on a device (tools/verify_metal.py) enumerate registry.KERNELS and run these;
every registered kernel has at least one case (`missing_cases()` is empty).
The cases are small enough for the CPU emulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import mlx.core as mx
import numpy as np

from .registry import KERNELS


@dataclass(frozen=True)
class KernelCase:
    description: str
    check: Callable[[str], None]  # flavor -> None, AssertionError on a mismatch


def _close(got, want, rtol: float, what: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    err = np.abs(got - want).max() if got.size else 0.0
    scale = max(np.abs(want).max() if want.size else 0.0, 1e-30)
    assert err <= rtol * scale, f"{what}: max |err| {err:.3g} vs max |ref| {scale:.3g}"


def _experts(E, D, F, fmt, seed):
    # One builder of random test experts for every verification path.
    from ..verify.cases import make_experts

    return make_experts(E, D, F, fmt, seed=seed)


def _layer_case(fmt: str, shape, n_identity: int, x_dtype, rtol: float, path: str) -> Callable[[str], None]:
    """The kernel backend's whole layer (decode or prefill path) against the mlx backend."""

    def check(flavor: str) -> None:
        from ..backends.kernels import KernelBackend
        from ..backends.mlx import MLXBackend
        from ..experts import Experts
        from ..verify.cases import forced_path
        from . import dispatch

        E, D, F, k, T = shape
        ex = _experts(E, D, F, fmt, seed=T)
        rng = np.random.default_rng(T + 1)
        ids = np.stack([rng.choice(E + n_identity, size=k, replace=False) for _ in range(T)]).astype(np.int32)
        ids[0, 0] = -1  # a padding slot
        w = rng.random((T, k)).astype(np.float32) + 0.1
        ids_m, w_m = mx.array(ids), mx.array(w / w.sum(1, keepdims=True))
        x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(x_dtype)
        with mx.stream(mx.cpu):
            wide = ex
            if fmt != "q4_0":
                wide = Experts(D, F, E)
                for n in ("gate_proj", "up_proj", "down_proj"):
                    getattr(wide, n).weight = getattr(ex, n).weight.astype(mx.float32)
            ref = np.array(MLXBackend()(x.astype(mx.float32), ids_m, w_m, wide, n_identity=n_identity,
                                        may_pad=True))
        kind = dispatch.weight_kind(ex["gate_proj"])
        with forced_path(path):  # the case tests the kernels it names, whatever the crossover
            assert dispatch.kernel_path(x, ids_m, kind) == path, f"the case does not take the {path} path"
            y = KernelBackend(flavor)(x, ids_m, w_m, ex, n_identity=n_identity)
        _close(np.array(y.astype(mx.float32)), ref, rtol, f"{path} layer")

    return check


def _map0_case(kind: str):
    def check(flavor: str) -> None:
        from .mul_mm_id import switched

        with switched(MAP0=kind):
            _map0_check(flavor)

    return check


def _map0_check(flavor: str) -> None:
    from .mul_mm_id import BN, map0

    rng = np.random.default_rng(3)
    E, T, k = 10, 37, 3
    ids = rng.integers(-2, E + 3, size=(T, k)).astype(np.int32)
    r = map0(mx.array(ids), E, flavor)
    flat = ids.reshape(-1)
    lists = [np.nonzero(flat == e)[0] for e in range(E)]
    counts = np.array([len(lst) for lst in lists])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    assert (np.array(r.counts) == counts).all(), "map0 counts"
    assert (np.array(r.offsets) == offsets).all(), "map0 offsets"
    assert (np.array(r.pairs)[:offsets[-1]] == np.concatenate(lists)).all(), "map0 pair lists"
    tiles = [(e, offsets[e] + i * BN) for e in range(E) for i in range(-(-counts[e] // BN))]
    got = np.array(r.tiles)
    assert (got[:len(tiles)] == np.array(tiles)).all() and (got[len(tiles):, 0] == -1).all(), "map0 tiles"


def _mm_plain_case(flavor: str) -> None:
    """mul_mm_id with and without BCAST against numpy on the dequantized weights."""
    from ..q4_0 import dequantize, quantize
    from .mul_mm_id import map0, mul_mm_id

    rng = np.random.default_rng(5)
    E, rows, cols, k, T = 5, 70, 96, 3, 30
    wq = quantize(rng.standard_normal((E, rows, cols)).astype(np.float32))
    wf = dequantize(wq)
    ids = np.stack([rng.choice(E + 1, size=k, replace=False) for _ in range(T)]).astype(np.int32)
    route = map0(mx.array(ids), E, flavor)
    for bcast in (True, False):
        src = rng.standard_normal((T if bcast else T * k, cols)).astype(np.float32) * 100
        out = np.array(mul_mm_id(mx.array(src), route, mx.array(wq), bcast, flavor))
        for p in range(T * k):
            e = ids.flat[p]
            if e < E:
                want = wf[e] @ src[p // k if bcast else p]
                _close(out[p], want, 2e-3, f"mul_mm_id row {p} (bcast={bcast})")


def _combine_case(flavor: str) -> None:
    from .mul_mm_id import mul_mm_id_combine

    rng = np.random.default_rng(6)
    T, k, N, E, NI = 9, 4, 70, 6, 2
    ids = rng.integers(-1, E + NI + 1, size=(T, k)).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    d = rng.standard_normal((T * k, N)).astype(np.float32)
    x = rng.standard_normal((T, N)).astype(np.float32)
    y = np.array(mul_mm_id_combine(mx.array(d), mx.array(ids), mx.array(w), mx.array(x), E, NI, flavor))
    real = (ids >= 0) & (ids < E)
    ident = (ids >= E) & (ids < E + NI)
    want = (d.reshape(T, k, N) * (w * real)[..., None]).sum(1) + x * (w * ident).sum(1, keepdims=True)
    _close(y, want, 1e-5, "mul_mm_id_combine")


def _same_bits(pairs, what: str, other: str) -> None:
    """Each (name, got, want) of `pairs` equal bit for bit (as float32)."""
    for name, a, b in pairs:
        assert (np.array(a.astype(mx.float32)) == np.array(b.astype(mx.float32))).all(), \
            f"{what}: {name} differs from {other}"


def _same_routing(got, want, what: str) -> None:
    """The same ids per token (in any order) with the same weights."""
    gi, gw = (np.array(a) for a in got)
    wi, ww = (np.array(a) for a in want)
    og, ow = np.argsort(gi, 1), np.argsort(wi, 1)
    assert (np.take_along_axis(gi, og, 1) == np.take_along_axis(wi, ow, 1)).all(), f"{what}: ids"
    _close(np.take_along_axis(gw, og, 1), np.take_along_axis(ww, ow, 1), 1e-5, f"{what}: weights")


def _router_case(flavor: str) -> None:
    from .. import router as R
    from .router import RouterParams, fused_topk

    rng = np.random.default_rng(7)
    lg = mx.array(rng.standard_normal((6, 64)).astype(np.float32) * 2)
    for params, ref in [(RouterParams(8, normalize=True), lambda: R.softmax_topk(lg, 8, True)),
                        (RouterParams(2, score="topk_softmax"), lambda: R.topk_softmax(lg, 2)),
                        (RouterParams(6, n_group=8, topk_group=3, scaling=2.0),
                         lambda: R.group_limited_topk(lg, 6, 8, 3, 2.0))]:
        _same_routing(fused_topk(lg, params, flavor), ref(), f"router {params}")


def _attention_case(flavor: str) -> None:
    from .attention import decode_attention

    rng = np.random.default_rng(8)
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in
               ((1, 8, 1, 64), (1, 2, 24, 64), (1, 2, 24, 64)))
    for pos in (0, 13, 23):
        got = decode_attention(q, k, v, mx.array([pos], mx.int32), 0.125, flavor)
        want = mx.fast.scaled_dot_product_attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1], scale=0.125)
        _close(np.array(got), np.array(want), 1e-5, f"decode_attention pos {pos}")


def _routing_join_case(flavor: str) -> None:
    from .routing_join import routing_join, unpack

    rng = np.random.default_rng(9)
    for L, T, k, idt, wdt in ((3, 5, 4, mx.int32, mx.float32), (48, 1, 8, mx.uint32, mx.bfloat16),
                              (4, 2, 3, mx.int32, mx.float16)):
        ids = [rng.integers(0, 300, (T, k)) for _ in range(L)]
        w = [rng.random((T, k)).astype(np.float32) for _ in range(L)]
        packed = routing_join([mx.array(a).astype(idt) for a in ids], [mx.array(a).astype(wdt) for a in w], flavor)
        assert packed.dtype == mx.uint32 and packed.shape == (2 * L * T * k,)
        got_i, got_w = unpack(bytes(memoryview(packed)), (L, T, k))
        want_w = np.stack([np.array(mx.array(a).astype(wdt).astype(mx.float32)) for a in w])
        assert (got_i == np.stack(ids)).all(), f"routing_join ids, {L} layers"
        assert (got_w == want_w).all(), f"routing_join weights, {L} layers"


def _routing_join_record_case(flavor: str) -> None:
    """routing_join_record: L layers into the chain's slots count .. count + L - 1 (those
    past the end dropped), stale words carried, count + L; vs numpy."""
    from .routing_join import routing_join

    rng = np.random.default_rng(11)
    for slots, L, T, k, start in ((8, 3, 5, 4, 2), (4, 3, 2, 3, 2), (384, 48, 1, 8, 48), (3, 2, 1, 2, 3)):
        n = T * k
        chain = rng.integers(0, 2**32, 2 * slots * n + 1, dtype=np.uint32)
        chain[-1] = start
        ids = [rng.integers(0, 300, (T, k)).astype(np.int32) for _ in range(L)]
        w = [rng.random((T, k)).astype(np.float32) for _ in range(L)]
        got = np.array(routing_join([mx.array(a) for a in ids], [mx.array(a) for a in w], flavor,
                                    record=mx.array(chain)))
        want = chain.copy()
        for l in range(L):
            if start + l < slots:
                want[(start + l) * n:(start + l + 1) * n] = ids[l].reshape(-1).view(np.uint32)
                want[(slots + start + l) * n:(slots + start + l + 1) * n] = w[l].reshape(-1).view(np.uint32)
        want[-1] = start + L
        bad = np.flatnonzero(got != want)
        assert got.shape == want.shape and bad.size == 0, (
            f"routing_join_record, {slots} slots, {L} layers x {T} x top-{k} from slot {start}: "
            f"{bad.size} words differ, first at {bad[:5]}")


# -- the fused decoder layer's kernels (metal/decode_layer.metal, router.metal) --------

def random_linear(rng, cols: int, rows: int, fmt: int, dtype, bias: bool = False, group_size: int = 64):
    """An nn.Linear (fmt 16/17/32: float16/bfloat16/float32 weights) or an affine
    nn.QuantizedLinear (fmt 4/8) with random weights, scales and biases in `dtype`."""
    import mlx.nn as nn

    lin = nn.Linear(cols, rows, bias=bias)
    lin.weight = mx.array(rng.standard_normal((rows, cols)).astype(np.float32) * 0.1)
    if bias:
        lin.bias = mx.array(rng.standard_normal(rows).astype(np.float32)).astype(dtype)
    if fmt in (4, 8):
        q = nn.QuantizedLinear.from_linear(lin, group_size=group_size, bits=fmt)
        q.scales, q.biases = q.scales.astype(dtype), q.biases.astype(dtype)
        return q
    lin.weight = lin.weight.astype({16: mx.float16, 17: mx.bfloat16, 32: mx.float32}[fmt])
    return lin


def qkv_reference(y, head_dim, heads, q_norm, k_norm, qk_eps, base, scale, trad, pos):
    """q, k, v [1, H, 1, D] from stacked projections y by MLX's own ops, as mlx-lm's
    attention computes them after its projections (per-head norms, rope)."""
    HQ, HK = heads
    D = head_dim
    y = y.reshape(-1)
    out = []
    for i, (lo, h) in enumerate(((0, HQ), (HQ * D, HK), ((HQ + HK) * D, HK))):
        t = y[lo:lo + h * D].reshape(1, 1, h, D)
        if i < 2 and q_norm is not None:
            t = mx.fast.rms_norm(t, (q_norm, k_norm)[i], qk_eps)
        t = t.transpose(0, 2, 1, 3)
        if i < 2:
            t = mx.fast.rope(t, D, traditional=trad, base=base, scale=scale, offset=pos)
        out.append(t)
    return out


def attention_parts_check(flavor: str, dtype, qk_norm: bool, trad: bool, pos: int, head_dim: int = 64,
                          heads=(4, 2), capacity: int = 48, splits: int = 4, rtol: float = 2e-5, seed: int = 0,
                          write_cache: bool = False) -> None:
    """decode_attention_parts: the new key and value against qkv_reference, and the
    parts, combined in numpy, against mx.fast.scaled_dot_product_attention over slots
    0..pos with the new key and value at pos (the cache's slot pos holds garbage).
    write_cache (decode_attention_parts_kv): the new key and value are read from the
    cache's slot pos after the launch, and every other slot must be unchanged."""
    from .attention import decode_attention_parts

    rng = np.random.default_rng(seed)
    HQ, HK = heads
    D = head_dim
    y = mx.array(rng.standard_normal((HQ + 2 * HK) * D).astype(np.float32) * 2).astype(dtype)
    keys, values = (mx.array(rng.standard_normal((1, HK, capacity, D)).astype(np.float32)).astype(dtype)
                    for _ in range(2))
    qn, kn = (mx.array(rng.random(D).astype(np.float32) + 0.5).astype(dtype) for _ in range(2))
    base, rscale, scale = (1e6 if pos > 100 else 1e4), 1.0, D ** -0.5
    with mx.stream(mx.cpu):
        q, k, v = qkv_reference(y, D, heads, qn if qk_norm else None, kn, 1e-6, base, rscale, trad, pos)
        kf = mx.concatenate([keys[:, :, :pos], k], axis=2)
        vf = mx.concatenate([values[:, :, :pos], v], axis=2)
        want = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), kf.astype(mx.float32),
                                                    vf.astype(mx.float32), scale=scale)
        want, k, v = (np.array(a.astype(mx.float32)) for a in (want, k, v))
    before = [np.array(a.astype(mx.float32)) for a in (keys, values)]
    out = decode_attention_parts(
        y, HQ, HK, qn if qk_norm else None, kn if qk_norm else None, 1e-6, base, rscale, trad, keys, values,
        mx.array([pos], mx.int32), scale, flavor, splits=splits, write_cache=write_cache)
    if write_cache:
        assert len(out) == 2, "decode_attention_parts_kv returns (parts, ml)"
        parts, ml = out
        mx.eval(parts, ml)
        keep = np.arange(capacity) != pos
        for a, b in zip((keys, values), before):  # every slot but pos as it was
            after = np.array(a.astype(mx.float32))
            assert np.array_equal(after[:, :, keep], b[:, :, keep]), "decode_attention_parts_kv wrote past slot pos"
        got_k, got_v = keys[:, :, pos:pos + 1], values[:, :, pos:pos + 1]
    else:
        parts, ml, got_k, got_v = out
    # A RoPE angle is pos * inv_freq in float32: one ulp of inv_freq (exp2f of one
    # backend against another's) moves it by pos * 2^-24 relative.
    tol = rtol + pos * 2.0 ** -22
    _close(np.array(got_k.astype(mx.float32)), k, tol, f"decode_attention_parts new key ({dtype}, pos {pos})")
    _close(np.array(got_v.astype(mx.float32)), v, rtol, f"decode_attention_parts new value ({dtype}, pos {pos})")
    parts, ml = np.array(parts).astype(np.float64), np.array(ml).astype(np.float64)
    n = pos + 1
    per = -(-n // splits)
    for s in range(splits):  # empty splits say so: no slots, sum 0
        if s * per >= n:
            assert (ml[:, s, 1] == 0).all() and (parts[:, s] == 0).all(), f"split {s} of {n} slots is not empty"
    live = ml[..., 1] > 0
    m = np.where(live, ml[..., 0], -np.inf).max(1, keepdims=True)
    a = np.where(live, np.exp(np.where(live, ml[..., 0], 0) - m), 0.0)
    out = (parts * a[..., None]).sum(1) / (ml[..., 1] * a).sum(1, keepdims=True)
    _close(out.reshape(1, HQ, 1, D), want, tol + (2e-5 if dtype == mx.float32 else 1e-2),
           f"decode_attention_parts output ({dtype}, pos {pos}, {splits} splits)")


def _exact_dense(proj) -> np.ndarray:
    """The weight a projection multiplies by, in float64 (affine ones dequantized by MLX)."""
    import mlx.nn as nn

    if isinstance(proj, nn.QuantizedLinear):
        w = mx.dequantize(proj.weight, proj.scales.astype(mx.float32), proj.biases.astype(mx.float32),
                          proj.group_size, proj.bits)
    else:
        w = proj.weight.astype(mx.float32)
    return np.array(w).astype(np.float64)


def dense_norm_check(flavor: str, fmt: int, dtype, hidden: int, rows, bias: bool, rtol: float, xn: bool = False,
                     nr: int = 2, seed: int = 0) -> None:
    """dense_norm (and dense_norm_xn): the stacked projections of rms_norm(x) against
    mx.fast.rms_norm and float64 numpy on the weights MLX dequantizes."""
    from .dense import dense_norm, dense_weight

    rng = np.random.default_rng(seed)
    projs = [random_linear(rng, hidden, r, fmt, dtype, bias) for r in rows]
    x = mx.array(rng.standard_normal((1, 1, hidden)).astype(np.float32) * 3).astype(dtype)
    gin = mx.array(rng.random(hidden).astype(np.float32) + 0.5).astype(dtype)
    with mx.stream(mx.cpu):
        xn_want = np.array(mx.fast.rms_norm(x.reshape(1, hidden), gin, 1e-6).astype(mx.float32))
    want = np.concatenate([_exact_dense(p) @ xn_want.reshape(-1).astype(np.float64)
                           + (np.array(p.bias.astype(mx.float32)) if bias else 0.0) for p in projs])
    got = dense_norm(x, gin, 1e-6, [dense_weight(p) for p in projs], flavor, xn=xn, nr=nr)
    if xn:
        got, got_xn = got
        _close(np.array(got_xn.astype(mx.float32)), xn_want, 1e-6 if dtype == mx.float32 else 8e-3,
               "dense_norm_xn xn")  # float32: another summation order than MLX's
    assert got.shape == (1, sum(rows)) and got.dtype == dtype
    _close(np.array(got.astype(mx.float32)).reshape(-1), want, rtol, f"dense_norm (fmt {fmt}, {dtype}, rows {rows})")


def dense_residual_check(flavor: str, fmt: int, dtype, cols: int, rows: int, rtol: float, seed: int = 1,
                         parts=None) -> None:
    """res + W x against float64 numpy on the weights MLX dequantizes; parts = (heads,
    splits): x given as decode_attention_parts' split results (one split empty), combined
    in numpy and rounded to dtype as the attention's output is."""
    from .dense import dense_residual, dense_weight

    rng = np.random.default_rng(seed)
    proj = random_linear(rng, cols, rows, fmt, dtype, group_size=128 if fmt == 8 else 64)
    res = mx.array(rng.standard_normal((1, 1, rows)).astype(np.float32)).astype(dtype)
    if parts is None:
        x = mx.array(rng.standard_normal((1, 1, cols)).astype(np.float32)).astype(dtype)
        xv = np.array(x.astype(mx.float32)).reshape(-1)
    else:
        H, S = parts
        D = cols // H
        p = rng.standard_normal((H, S, D)).astype(np.float32) * 4
        ml = np.stack([rng.standard_normal((H, S)) * 3, rng.random((H, S)) * 5 + 0.5], -1).astype(np.float32)
        ml[:, -1] = (-np.inf, 0.0)  # an empty split (fewer slots than splits)
        p[:, -1] = 0.0
        a = np.exp(ml[..., 0] - ml[:, :-1, 0].max(1, keepdims=True))
        a[:, -1] = 0.0
        comb = (p * a[..., None]).sum(1) / (ml[..., 1] * a).sum(1, keepdims=True)
        xv = np.array(mx.array(comb.astype(np.float32)).astype(dtype).astype(mx.float32)).reshape(-1)
        x = (mx.array(p), mx.array(ml))
    want = np.array(res.astype(mx.float32)).reshape(-1) + _exact_dense(proj) @ xv.astype(np.float64)
    got = dense_residual(x, dense_weight(proj), res, flavor)
    assert got.shape == res.shape and got.dtype == dtype
    _close(np.array(got.astype(mx.float32)).reshape(-1), want, rtol,
           f"dense_residual (fmt {fmt}, {dtype}{', parts' if parts else ''})")


def _dense_norm_case(flavor: str) -> None:
    dense_norm_check(flavor, 4, mx.float32, 1280, (64, 32, 32), bias=False, rtol=1e-5)
    dense_norm_check(flavor, 17, mx.float32, 256, (32, 16, 16), bias=True, rtol=1e-5)


def router_tail_check(flavor: str, fmt: int, rfmt: int, dtype, cols: int, hidden: int, experts: int, nr: int,
                      nsg: int, rtol: float, seed: int = 3, tail: str = "one") -> None:
    """dense_residual with the router tail (dense.ROUTER_TAIL = tail), twice on one
    ticket counter (the second launch finds it zeroed): out as the plain launch gives
    it, xn against mx.fast.rms_norm of that out, the logits against float64 numpy on xn."""
    from .dense import router_tail

    with router_tail(tail):
        _router_tail_check(flavor, fmt, rfmt, dtype, cols, hidden, experts, nr, nsg, rtol, seed)


def _router_tail_check(flavor, fmt, rfmt, dtype, cols, hidden, experts, nr, nsg, rtol, seed):
    from .dense import RouterTail, dense_residual, dense_weight, tail_counter_words
    from .registry import ticket_counter

    rng = np.random.default_rng(seed)
    o = dense_weight(random_linear(rng, cols, hidden, fmt, dtype))
    gate = random_linear(rng, hidden, experts, rfmt, dtype)
    gpost = mx.array(rng.random(hidden).astype(np.float32) + 0.5).astype(dtype)
    tail = RouterTail(gpost, 1e-6, dense_weight(gate), ticket_counter(tail_counter_words(experts, hidden, nr, nsg)))
    H, S = 8, 4
    for call in range(2):
        p = rng.standard_normal((H, S, cols // H)).astype(np.float32) * 4
        ml = np.stack([rng.standard_normal((H, S)) * 3, rng.random((H, S)) * 5 + 0.5], -1).astype(np.float32)
        x = (mx.array(p), mx.array(ml))
        res = mx.array(rng.standard_normal((1, hidden)).astype(np.float32)).astype(dtype)
        out, xn, logits = dense_residual(x, o, res, flavor, nr=nr, nsg=nsg, router=tail)
        plain = dense_residual(x, o, res, flavor, nr=nr, nsg=nsg)
        what = f"router tail (fmt {fmt}/{rfmt}, {dtype}, {nr}x{nsg}, launch {call + 1})"
        assert out.dtype == xn.dtype == logits.dtype == dtype and logits.shape == (1, experts), what
        # Equal up to rounding: another kernel, so nvcc may contract other products into
        # FMAs (on the H100 a float32 1x2 case differed by 1 ulp); exact under the emulation.
        _close(np.array(out.astype(mx.float32)), np.array(plain.astype(mx.float32)),
               0.0 if flavor == "emulated" else (2.4e-7 if dtype == mx.float32 else 8e-3), what + " out")
        with mx.stream(mx.cpu):
            xn_want = np.array(mx.fast.rms_norm(plain, gpost, 1e-6).astype(mx.float32))
        _close(np.array(xn.astype(mx.float32)), xn_want, 1e-6 if dtype == mx.float32 else 8e-3, what + " xn")
        want = _exact_dense(gate) @ np.array(xn.astype(mx.float32)).reshape(-1).astype(np.float64)
        _close(np.array(logits.astype(mx.float32)).reshape(-1), want, rtol, what + " logits")


def _router_tail_case(flavor: str, tail: str = "one") -> None:
    router_tail_check(flavor, 4, 8, mx.float32, 512, 128, 61, 2, 2, 1e-5, tail=tail)
    router_tail_check(flavor, 4, 8, mx.float32, 512, 256, 16, 2, 8, 1e-5, seed=4, tail=tail)


def _router_tail_split_case(flavor: str) -> None:
    _router_tail_case(flavor, "split")


def _router_tail_rule_case(flavor: str) -> None:
    """The split router tail with the routing rule (option RRULE): out, xn and logits bit
    for bit as the tail without it, ids and weights bit for bit as moe_router_topk's
    (router.fused_topk) on those logits -- and, ids in any order, as mlx_moe.router's MLX
    ops; softmax top-3 normalized over 61 experts (float32) and Mixtral's top-2 over 16
    (bfloat16), two launches on one counter.  (Ties, -0.0, -inf and NaN are the rule's own
    cases, moe_router_topk's: the tail runs the same moe_router_select.)"""
    from .. import router as R
    from .dense import RouterTail, dense_residual, dense_weight, router_tail, tail_counter_words
    from .registry import ticket_counter
    from .router import RouterParams, fused_topk

    rng = np.random.default_rng(31)
    cases = ((61, RouterParams(3, normalize=True), mx.float32, 2, 2),
             (16, RouterParams(2, score="topk_softmax"), mx.bfloat16, 2, 8))
    with router_tail("split"):
        for experts, params, dtype, nr, nsg in cases:
            hidden, cols, H, S = 128 if experts > 16 else 256, 512, 8, 4
            o = dense_weight(random_linear(rng, cols, hidden, 4, dtype))
            gate = dense_weight(random_linear(rng, hidden, experts, 8, dtype))
            gpost = mx.array(rng.random(hidden).astype(np.float32) + 0.5).astype(dtype)
            words = tail_counter_words(experts, hidden, nr, nsg)
            routed = RouterTail(gpost, 1e-6, gate, ticket_counter(words), rule=params)
            plain = RouterTail(gpost, 1e-6, gate, ticket_counter(words))
            for call in range(2):
                p = rng.standard_normal((H, S, cols // H)).astype(np.float32) * 4
                ml = np.stack([rng.standard_normal((H, S)) * 3, rng.random((H, S)) * 5 + 0.5], -1).astype(np.float32)
                x = (mx.array(p), mx.array(ml))
                res = mx.array(rng.standard_normal((1, hidden)).astype(np.float32)).astype(dtype)
                got = dense_residual(x, o, res, flavor, nr=nr, nsg=nsg, router=routed)
                want = dense_residual(x, o, res, flavor, nr=nr, nsg=nsg, router=plain)
                what = f"router tail with the rule ({experts} experts, {params.score}, launch {call + 1})"
                assert len(got) == 5, what
                for g, w, name in zip(got, want, ("out", "xn", "logits")):
                    assert np.array_equal(np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32))), \
                        f"{what}: {name} differ from the tail without the rule"
                ids, wts = fused_topk(want[2], params, flavor)
                assert np.array_equal(np.array(got[3]), np.array(ids)), f"{what}: ids differ from moe_router_topk's"
                assert np.array_equal(np.array(got[4]), np.array(wts)), f"{what}: weights differ from moe_router_topk's"
                _same_routing(got[3:], R.route(want[2], params), what + " vs mlx_moe.router")
                assert not np.array(routed.count)[:4].any(), f"{what}: the tail's ticket was left non-zero"


def _dense_norm_xn_case(flavor: str) -> None:
    dense_norm_check(flavor, 8, mx.float32, 512, (61,), bias=False, rtol=1e-5, xn=True, nr=1)


def _attention_parts_case(flavor: str) -> None:
    attention_parts_check(flavor, mx.float32, qk_norm=True, trad=False, pos=37)
    attention_parts_check(flavor, mx.float32, qk_norm=False, trad=True, pos=2, heads=(2, 1), splits=8)


def _attention_parts_kv_case(flavor: str) -> None:
    attention_parts_check(flavor, mx.float32, qk_norm=True, trad=False, pos=37, write_cache=True)
    attention_parts_check(flavor, mx.bfloat16, qk_norm=False, trad=True, pos=47, heads=(2, 1), splits=8,
                          rtol=2e-2, write_cache=True)  # the last slot


def _dense_residual_case(flavor: str) -> None:
    dense_residual_check(flavor, 4, mx.float32, 1280, 70, 1e-5)
    dense_residual_check(flavor, 8, mx.float32, 512, 33, 1e-5)


def _dense_residual_parts_case(flavor: str) -> None:
    dense_residual_check(flavor, 4, mx.float32, 512, 40, 1e-5, parts=(8, 4))


def _down_combine_res_case(flavor: str) -> None:
    """mul_mv_id_down_combine with the residual add: y - residual equals the plain kernel's y."""
    from ..q4_0 import quantize
    from .mul_mv_id import mul_mv_id_down_combine

    rng = np.random.default_rng(14)
    E, N, F, k, NI = 5, 70, 96, 3, 1
    wd = mx.array(quantize(rng.standard_normal((E, N, F)).astype(np.float32)))
    ids = mx.array(np.array([[4, 0, 5], [2, -1, 1]], np.int32))
    w = mx.array(rng.random((2, k)).astype(np.float32))
    h = mx.array(rng.standard_normal((2 * k, F)).astype(np.float32))
    x = mx.array(rng.standard_normal((2, N)).astype(np.float32))
    res = mx.array(rng.standard_normal((2, N)).astype(np.float32))
    plain = np.array(mul_mv_id_down_combine(h, ids, w, x, wd, NI, flavor))
    with_res = np.array(mul_mv_id_down_combine(h, ids, w, x, wd, NI, flavor, residual=res))
    _close(with_res, plain + np.array(res), 1e-6, "mul_mv_id_down_combine_res")


def moe_layer_reference(g, u, d, x, res, ids, w) -> np.ndarray:
    """float64 numpy oracle of a decode MoE layer with the residual add, from float expert
    weights g, u [E, ffn, hidden], d [E, hidden, ffn]: y[t] = res[t] + sum_s w[t, s] *
    (d[e] (silu(g[e] x[t]) * (u[e] x[t]))) for real ids e < E, + w[t, s] * x[t] for
    the ids past them (identity experts)."""
    x = np.asarray(x, np.float64)
    y = np.array(res, np.float64)
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e < g.shape[0]:
                a = g[e] @ x[t]
                y[t] += w[t, s] * (d[e] @ (a / (1 + np.exp(-a)) * (u[e] @ x[t])))
            else:
                y[t] += w[t, s] * x[t]
    return y


def _moe_layer_case(flavor: str) -> None:
    """The one-launch decode MoE layer against the two launches it replaces (same ids and
    weights, y to rounding) and numpy (Q4_0 dequantized by mlx_moe.q4_0, ids from
    mlx_moe.router's rule): 2 tokens, 8 real experts of 10 scored (2 identity), top-3,
    ragged down tiles; twice on one counter (the launch leaves it zero)."""
    from .. import router as R
    from ..q4_0 import dequantize, quantize
    from .dispatch import LayerGeometry
    from .mul_mv_id import mul_mv_id_down_combine, mul_mv_id_moe, mul_mv_id_swiglu_route
    from .registry import ticket_counter
    from .router import RouterParams

    rng = np.random.default_rng(19)
    E, NI, D, F, T = 8, 2, 96, 64, 2
    wg, wu = (quantize(rng.standard_normal((E, F, D)).astype(np.float32)) for _ in range(2))
    wd = quantize(rng.standard_normal((E, D, F)).astype(np.float32))
    x = rng.standard_normal((T, D)).astype(np.float32)
    res = rng.standard_normal((T, D)).astype(np.float32)
    lg = rng.standard_normal((T, E + NI)).astype(np.float32)
    lg[0, E:] += 4.0  # an identity expert wins a slot
    logits, params, count = mx.array(lg), RouterParams(3, normalize=True), ticket_counter()
    args = (mx.array(x), logits, params, mx.array(wg), mx.array(wu), mx.array(wd), NI, mx.array(res), count, flavor,
            LayerGeometry(1, 5, 4))
    y, ids, w = (np.array(a) for a in mul_mv_id_moe(*args))
    _same_routing((mx.array(ids), mx.array(w)), R.route(logits, params), "one-launch layer")
    h2, ids2, w2 = mul_mv_id_swiglu_route(mx.array(x), logits, params, mx.array(wg), mx.array(wu), flavor)
    y2 = np.array(mul_mv_id_down_combine(h2, ids2, w2, mx.array(x), mx.array(wd), NI, flavor, residual=mx.array(res)))
    assert (ids == np.array(ids2)).all() and (w == np.array(w2)).all(), "one-launch layer: routing differs"
    _close(y, y2, 1e-6, "one-launch layer vs two launches")
    want = moe_layer_reference(dequantize(wg), dequantize(wu), dequantize(wd), x, res, ids, w)
    assert (ids >= E).any(), "the case lost its identity slot"
    _close(y, want, 1e-4, "one-launch layer vs numpy")
    assert not np.array(count).any(), "one-launch layer: the counter is not zero after the launch"
    _close(np.array(mul_mv_id_moe(*args)[0]), y, 0.0, "one-launch layer, second launch on its counter")


def _moe_layer_trace_case(flavor: str) -> None:
    """mul_mv_id_moe_trace (the TRACE option, tools/trace_moe_layer.py): the plain launch's
    outputs bit for bit, and per threadgroup 7 clock stamps -- zeros on Metal and under
    its emulation (no global clock), non-decreasing within a threadgroup (and within 10 ms)
    on CUDA.  Unstaged (96 x 64, float32) and staged (256 x 256 rows, bfloat16 activations
    and h: stage 31, the stamp after the staged rows)."""
    from ..q4_0 import quantize
    from .dispatch import LayerGeometry
    from .mul_mv_id import TRACE_STAMPS, moe_layer_launch, moe_layer_trace
    from .registry import ticket_counter
    from .router import RouterParams

    rng = np.random.default_rng(23)
    E, T, params = 8, 2, RouterParams(3)
    for D, F, dtype, g in ((96, 64, mx.float32, LayerGeometry(1, 5, 4)),
                           (256, 256, mx.bfloat16, LayerGeometry(1, 5, 6, 1, stage=31))):
        wg, wu = (mx.array(quantize(rng.standard_normal((E, F, D)).astype(np.float32))) for _ in range(2))
        wd = mx.array(quantize(rng.standard_normal((E, D, F)).astype(np.float32)))
        x, res = (mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype) for _ in range(2))
        logits = mx.array(rng.standard_normal((T, E)).astype(np.float32))
        want = moe_layer_launch(x, logits, params, wg, wu, wd, 0, res, ticket_counter(), flavor, g)
        got = moe_layer_trace(x, logits, params, wg, wu, wd, 0, res, ticket_counter(), flavor, g)
        _same_bits(zip(("y", "ids", "weights", "h"), got[:4], want), f"traced launch {g.tag}", "the plain launch's")
        trace = np.array(got[4]).astype(np.int64)
        groups = -(-F // (g.gate_nr * g.nsg)) * T * params.k + -(-D // g.down_nr) * T
        assert trace.shape == (groups, TRACE_STAMPS), \
            f"traced launch {g.tag}: trace shape {trace.shape}, expected {(groups, TRACE_STAMPS)}"
        if flavor == "cuda":
            assert (np.diff(trace, axis=1) >= 0).all(), f"traced launch {g.tag}: a threadgroup's stamps go backwards"
            assert (trace[:, -1] - trace[:, 0]).max() < 10 ** 7, f"traced launch {g.tag}: a threadgroup took 10 ms"
        else:
            assert not trace.any(), f"traced launch {g.tag}: Metal reads no clock, the stamps must be zero"


def _moe_layer_ids_case(flavor: str, trace: bool = False) -> None:
    """mul_mv_id_moe_ids (the layer under given routing): y against numpy (Q4_0 dequantized
    by mlx_moe.q4_0) for ids with a repeated expert, an identity expert and padding ids
    (-1 and one past every expert: no weights read, nothing added); and under the routing
    mul_mv_id_moe chose from router outputs, its y and h bit for bit, unstaged (float32,
    96 x 64) and staged (bfloat16, 256 x 256, stage 31); twice on one counter.  trace: the
    same through mul_mv_id_moe_ids_trace, whose y, h equal the plain launch's."""
    from ..q4_0 import dequantize, quantize
    from .dispatch import LayerGeometry
    from .mul_mv_id import TRACE_STAMPS, moe_layer_launch, mul_mv_id_moe_ids
    from .registry import ticket_counter
    from .router import RouterParams

    rng = np.random.default_rng(29)
    E, NI, T, k = 8, 1, 2, 4
    for D, F, dtype, g in ((96, 64, mx.float32, LayerGeometry(1, 5, 4)),
                           (256, 256, mx.bfloat16, LayerGeometry(1, 5, 6, 1, stage=31))):
        qg, qu = (quantize(rng.standard_normal((E, F, D)).astype(np.float32)) for _ in range(2))
        qd = quantize(rng.standard_normal((E, D, F)).astype(np.float32))
        wg, wu, wd = mx.array(qg), mx.array(qu), mx.array(qd)
        x, res = (mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(dtype) for _ in range(2))
        ids = np.array([[3, E, 3, -1], [E + NI, 6, 0, 1]], np.int32)  # repeat, identity, padding
        w = rng.random((T, k)).astype(np.float32)
        count = ticket_counter()

        def run(i, ww):
            out = mul_mv_id_moe_ids(x, mx.array(i), mx.array(ww), wg, wu, wd, NI, res, count, flavor, g, trace)
            if trace:
                assert out[2].shape == (-(-F // g.nsg) * T * k + -(-D // g.down_nr) * T, TRACE_STAMPS), \
                    f"given routing {g.tag}: trace shape {out[2].shape}"
                plain = mul_mv_id_moe_ids(x, mx.array(i), mx.array(ww), wg, wu, wd, NI, res, count, flavor, g)
                rows = np.nonzero((i.reshape(-1) >= 0) & (i.reshape(-1) < E))[0]  # h's written rows
                _same_bits((("y", out[0], plain[0]), ("h", out[1][mx.array(rows)], plain[1][mx.array(rows)])),
                           f"given routing {g.tag}, traced", "the plain launch's")
            return out

        y = np.array(run(ids, w)[0].astype(mx.float32))
        pad = (ids < 0) | (ids >= E + NI)
        xf, rf = (np.array(a.astype(mx.float32)) for a in (x, res))
        want = moe_layer_reference(dequantize(qg), dequantize(qu), dequantize(qd), xf, rf,
                                   np.where(pad, E, ids), np.where(pad, 0.0, w))
        _close(y, want, 1e-4 if dtype == mx.float32 else 2e-2, f"given routing {g.tag} vs numpy")
        assert not np.array(count).any(), f"given routing {g.tag}: the counter is not zero after the launch"
        logits = mx.array(rng.standard_normal((T, E + NI)).astype(np.float32))
        yr, ir, wr, hr = moe_layer_launch(x, logits, RouterParams(k, normalize=True), wg, wu, wd, NI, res,
                                          ticket_counter(), flavor, g)
        yi, hi = run(np.array(ir), np.array(wr))[:2]
        rows = mx.array(np.nonzero(np.array(ir).reshape(-1) < E)[0])  # h's rows of identity slots are unwritten
        _same_bits((("y", yi, yr), ("h", hi[rows], hr[rows])), f"given routing {g.tag}",
                   "mul_mv_id_moe's under the same routing")


def _token_and_caches(rng, hidden: int, cache_shape, dtype, pos: int):
    """One token's input x [1, hidden], two copies of one random KV cache (keys, values of
    [1, *cache_shape]: separate buffers, since both paths a case compares write in place)
    and the position array."""
    x = mx.array(rng.standard_normal(hidden).astype(np.float32)).astype(dtype).reshape(1, hidden)
    start = [rng.standard_normal((1, *cache_shape)).astype(np.float32) for _ in range(2)]
    cache = [mx.array(a).astype(dtype) for a in start]
    ref = [mx.array(a).astype(dtype) for a in start]
    return x, cache, ref, mx.array([pos], mx.int32)


def _qkv_attention_case(flavor: str) -> None:
    """qkv_attention (dense_norm then decode_attention_parts_kv in one launch) against the
    two launches at the same geometry: the same parts, ml and cache, bit for bit (the
    bodies are the same; the two launches are checked against MLX's ops in their own
    cases); a 4-bit bfloat16 layer with q/k norms and a float32 one without, two
    positions each on one counter (it must be left zero)."""
    from .attention import decode_attention_parts
    from .chain import qkv_attention
    from .dense import dense_norm, dense_weight
    from .registry import ticket_counter

    rng = np.random.default_rng(5)
    HQ, HK, D, hidden, C = 4, 2, 64, 256, 48
    for fmt, dtype, qk_norm, nsg in ((4, mx.bfloat16, True, 4), (32, mx.float32, False, 2)):
        ws = [dense_weight(random_linear(rng, hidden, rows, fmt, dtype)) for rows in (HQ * D, HK * D, HK * D)]
        gin = mx.array(rng.random(hidden).astype(np.float32) + 0.5).astype(dtype)
        qn, kn = (mx.array(rng.random(D).astype(np.float32) + 0.5).astype(dtype) for _ in range(2))
        norms = (qn, kn) if qk_norm else (None, None)
        count = ticket_counter()
        for pos in (37, 5):
            x, cache, ref, p = _token_and_caches(rng, hidden, (HK, C, D), dtype, pos)
            args = (HQ, HK, *norms, 1e-6, 1e4, 1.0, False)
            got = qkv_attention(x, gin, 1e-5, ws, *args, cache[0], cache[1], p, D ** -0.5, flavor, count,
                                nsg=nsg)
            y = dense_norm(x, gin, 1e-5, ws, flavor, nsg=nsg)
            want = decode_attention_parts(y, *args, ref[0], ref[1], p, D ** -0.5, flavor, nsg=nsg, write_cache=True)
            mx.eval(got, want, cache, ref)
            what = f"qkv_attention {fmt}-bit {dtype} pos {pos}"
            for g, w, name in zip(list(got) + cache, list(want) + ref, ("parts", "ml", "keys", "values")):
                assert np.array_equal(np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32))), \
                    f"{what}: {name} differ from the two launches"
        assert not np.array(count).any(), "qkv_attention left its counter non-zero"


def _qkv_attention_oproj_case(flavor: str) -> None:
    """qkv_attention_oproj (q/k/v, the attention, o_proj with the split router tail in one
    launch) against qkv_attention then dense_residual with the split tail at the same
    geometry: the same out, xn, logits and cache, bit for bit (each launch is checked
    against MLX's ops or numpy in its own case).  o_proj's width is not q/k/v's (hidden
    192, attention output 256) and, in the second layer, nor is its format (the renamed
    template names); two positions each on one set of counters (they must be left zero)."""
    from .attention import SPLITS
    from .chain import qkv_attention, qkv_attention_oproj
    from .dense import RouterTail, dense_residual, dense_weight, router_tail, tail_counter_words
    from .registry import ticket_counter

    rng = np.random.default_rng(29)
    HQ, HK, D, hidden, C, E = 4, 2, 64, 192, 48, 10
    layers = ((4, 4, mx.bfloat16, True, 16, 2), (32, 8, mx.float32, False, 2, 1))
    with router_tail("split"):
        for qfmt, ofmt, dtype, qk_norm, nsg, onr in layers:
            ws = [dense_weight(random_linear(rng, hidden, rows, qfmt, dtype)) for rows in (HQ * D, HK * D, HK * D)]
            o = dense_weight(random_linear(rng, HQ * D, hidden, ofmt, dtype, group_size=32))
            gate = dense_weight(random_linear(rng, hidden, E, 8, dtype, group_size=32))
            gin, gpost = (mx.array(rng.random(hidden).astype(np.float32) + 0.5).astype(dtype) for _ in range(2))
            qn, kn = (mx.array(rng.random(D).astype(np.float32) + 0.5).astype(dtype) for _ in range(2))
            norms = (qn, kn) if qk_norm else (None, None)
            words = tail_counter_words(E, hidden, onr, nsg)
            chained = (ticket_counter(), RouterTail(gpost, 1e-6, gate, ticket_counter(words)))
            apart = (ticket_counter(), RouterTail(gpost, 1e-6, gate, ticket_counter(words)))
            for pos in (37, 5):
                x, cache, ref, p = _token_and_caches(rng, hidden, (HK, C, D), dtype, pos)
                args = (HQ, HK, *norms, 1e-6, 1e4, 1.0, False)
                got = qkv_attention_oproj(x, gin, 1e-5, ws, *args, cache[0], cache[1], p, D ** -0.5, o, chained[1],
                                          flavor, chained[0], onr=onr, nsg=nsg)
                parts_ml = qkv_attention(x, gin, 1e-5, ws, *args, ref[0], ref[1], p, D ** -0.5, flavor, apart[0],
                                         nsg=nsg)
                want = dense_residual(parts_ml, o, x, flavor, nr=onr, nsg=nsg, router=apart[1])
                mx.eval(got, want, cache, ref)
                what = f"qkv_attention_oproj {qfmt}/{ofmt}-bit {dtype} pos {pos} ({SPLITS} splits)"
                for g, w, name in zip(list(got) + cache, list(want) + ref, ("out", "xn", "logits", "keys", "values")):
                    assert np.array_equal(np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32))), \
                        f"{what}: {name} differ from the two launches"
                assert not np.array(chained[0]).any(), f"{what}: the chain's counter was left non-zero"
                assert not np.array(chained[1].count)[:4].any(), f"{what}: the tail's ticket was left non-zero"


def _oproj_moe_case(flavor: str) -> None:
    """oproj_moe (o_proj with the split router tail, then the one-launch MoE layer on its
    outputs) against the two launches at the same geometry: the same y, ids and weights,
    bit for bit (each launch is checked against numpy in its own case); one token, Q4_0
    experts (8 real + 2 identity, top-3), an 8-bit router, three launches on one set of
    counters (each must be left zero)."""
    from ..q4_0 import quantize
    from .chain import oproj_moe
    from .dense import RouterTail, dense_residual, dense_weight, router_tail, tail_counter_words
    from .dispatch import LayerGeometry
    from .mul_mv_id import mul_mv_id_moe
    from .registry import ticket_counter
    from .router import RouterParams

    rng = np.random.default_rng(23)
    E, NI, hidden, F, cols, H, S = 8, 2, 96, 64, 128, 4, 4
    geometry, nr = LayerGeometry(1, 5, 4), 2
    o = dense_weight(random_linear(rng, cols, hidden, 4, mx.float32, group_size=32))
    gate = dense_weight(random_linear(rng, hidden, E + NI, 8, mx.float32, group_size=32))
    gpost = mx.array(rng.random(hidden).astype(np.float32) + 0.5)
    wg, wu = (mx.array(quantize(rng.standard_normal((E, F, hidden)).astype(np.float32))) for _ in range(2))
    wd = mx.array(quantize(rng.standard_normal((E, hidden, F)).astype(np.float32)))
    params = RouterParams(3, normalize=True)
    words = tail_counter_words(E + NI, hidden, nr, geometry.nsg)
    chained = (RouterTail(gpost, 1e-6, gate, ticket_counter(words)), ticket_counter(), ticket_counter())
    apart = (RouterTail(gpost, 1e-6, gate, ticket_counter(words)), ticket_counter())
    with router_tail("split"):
        for call in range(3):
            p = rng.standard_normal((H, S, cols // H)).astype(np.float32) * 4
            ml = np.stack([rng.standard_normal((H, S)) * 3, rng.random((H, S)) * 5 + 0.5], -1).astype(np.float32)
            x = (mx.array(p), mx.array(ml))
            res = mx.array(rng.standard_normal((1, hidden)).astype(np.float32))
            y, ids, w = oproj_moe(x, o, res, chained[0], params, wg, wu, wd, NI, chained[1], chained[2], flavor,
                                  nr=nr, geometry=geometry)
            out, xn, logits = dense_residual(x, o, res, flavor, nr=nr, nsg=geometry.nsg, router=apart[0])
            y2, ids2, w2 = mul_mv_id_moe(xn, logits, params, wg, wu, wd, NI, out, apart[1], flavor, geometry)
            what = f"oproj_moe launch {call + 1}"
            for g_, w_, name in ((y, y2, "y"), (ids, ids2, "ids"), (w, w2, "weights")):
                assert np.array_equal(np.array(g_), np.array(w_)), f"{what}: {name} differ from the two launches"
            assert all(not np.array(c if not isinstance(c, RouterTail) else c.count)[:2].any() for c in chained), \
                f"{what}: a counter was left non-zero"


def _dense_embed_case(flavor: str) -> None:
    """dense_embed against the module's own call (MLX's gathers and dequantize) on the device
    the flavor replaces it on: the same values exactly (float32 affine tables to a rounding of
    scale * q: one fused rounding or two); an affine table's two roundings, T(T(scale * q) +
    bias), against the module on the CPU and its one, T(scale * q + bias), against float64
    numpy, on every flavor; ids past either end clamped to the table."""
    import mlx.nn as nn

    from .dense import dense_embed, dense_weight

    for V, D, kind, dtype in ((50, 320, (4, 64), mx.bfloat16), (37, 256, (8, 32), mx.float16),
                              (41, 384, (4, 128), mx.float32), (29, 96, None, mx.bfloat16),
                              (23, 64, None, mx.float32)):
        table = nn.Embedding(V, D)
        table.weight = (mx.random.normal((V, D), key=mx.random.key(V)) * 0.5).astype(dtype)
        if kind is not None:
            table = nn.QuantizedEmbedding.from_embedding(table, group_size=kind[1], bits=kind[0])
        mx.eval(table.parameters())
        d = dense_weight(table)
        for t in (0, V - 1, V // 2, V + 5, -3):
            row = min(max(t, 0), V - 1)
            token = mx.array([t], dtype=mx.int32)
            checks = [(None, mx.cpu if flavor in ("emulated", "mlx") else mx.default_device())]
            if kind is not None:
                checks += [(False, mx.cpu), (True, None)]
            for fused, device in checks:
                got = dense_embed(token, d, flavor, fused=fused)
                if device is not None:  # the module's call (the GPU's rounding is the uncompiled path's)
                    with mx.stream(device):
                        want = table(mx.array([row]))
                else:  # one rounding of the exact scale * q + bias
                    with mx.stream(mx.cpu):
                        levels = mx.dequantize(table.weight[row:row + 1], mx.ones_like(table.scales[row:row + 1]),
                                               mx.zeros_like(table.biases[row:row + 1]), kind[1], kind[0])
                        s64 = np.repeat(np.array(table.scales[row].astype(mx.float32)), kind[1]).astype(np.float64)
                        b64 = np.repeat(np.array(table.biases[row].astype(mx.float32)), kind[1]).astype(np.float64)
                        exact = s64 * np.array(levels.astype(mx.float32)).reshape(-1) + b64
                        want = mx.array(exact.astype(np.float32)).astype(dtype).reshape(1, D)
                mx.eval(got, want)
                what = f"dense_embed {V}x{D} {kind or dtype} token {t} (fused {fused}, vs {device or 'numpy'})"
                assert got.dtype == want.dtype and got.shape == (1, D), f"{what}: {got.dtype} {got.shape}"
                g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)).reshape(1, D)
                if fused is not True and dtype == mx.float32 and kind is not None:
                    # float32 T: a compiler may fuse the two roundings into one (nothing rounds
                    # between them); half an ulp of scale * q apart, which near a cancellation
                    # is large against the sum
                    assert np.abs(g - w).max() <= 2.0 ** -20 * np.abs(w).max(), what
                else:
                    assert np.array_equal(g, w), what


def greedy_sample_reference(logits: mx.array):
    """(token, lse) as mlx-lm's greedy generate_step computes them, with MLX's ops on the CPU."""
    with mx.stream(mx.cpu):
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        token = mx.argmax(logits - lse, axis=-1)
        return int(token.item()), lse


def _greedy_sample_case(flavor: str) -> None:
    """greedy_sample against MLX's logsumexp and argmax of logits - lse: flat random logits,
    two logits that tie after the subtraction in bfloat16 (the first wins), a planted peak,
    equal maxima in two threadgroups (the first wins), a threadgroup of -inf logits, eight
    that tie in one threadgroup, two merged ones in slices 2 and 7 of 10, twice on one
    counter."""
    from .sample import greedy_sample, groups_for, new_counter

    rng = np.random.default_rng(11)
    for V, dtype, kind in ((5000, mx.bfloat16, "flat"), (5000, mx.bfloat16, "merge"), (3001, mx.float32, "peak"),
                           (4500, mx.float16, "tie"), (4100, mx.bfloat16, "neginf"), (777, mx.bfloat16, "flat"),
                           (6000, mx.bfloat16, "cluster"), (20000, mx.bfloat16, "merge")):
        x = rng.standard_normal(V).astype(np.float32) * (0.5 if kind == "flat" else 3.0)
        if kind == "peak":
            x[V // 3] = 40.0
        if kind == "merge":  # two adjacent bfloat16 logits whose log-probabilities round to one value
            x = x * 0.01
            first = 50 if V < 10000 else 4100  # 20000 logits: slices 2 and 7 of 10
            x[first], x[3000 if V < 10000 else 15000] = 1.0, 1.0078125
        if kind == "cluster":  # eight adjacent bfloat16 values in one slice, later ones larger, whose
            # log-probabilities (near -8.2: 2^-4 apart in bfloat16) all round to one value
            x = 0.4 + x * 0.003
            x[2100:2108] = 0.9375 + np.arange(8) / 256
        if kind == "tie":
            x[:] = np.minimum(x, 5.0)
            x[V - 7] = x[17] = 9.0  # threadgroups 0 and the last
        if kind == "neginf":
            x[: -(-V // groups_for(V))] = -np.inf  # the first threadgroup's whole slice
        logits = mx.array(x).astype(dtype)
        count = new_counter()
        for rep in range(2):  # the counter must be left zero for the next launch
            token, lse = greedy_sample(logits, flavor, count)
            mx.eval(token, lse)
            want_token, want_lse = greedy_sample_reference(logits)
            got_lse, ref_lse = float(lse.astype(mx.float32).item()), float(want_lse.astype(mx.float32).item())
            what = f"greedy_sample {V} {dtype} {kind} (launch {rep + 1})"
            assert token.dtype == mx.int32 and lse.dtype == dtype, f"{what}: dtypes {token.dtype}, {lse.dtype}"
            # lse: the shares add in another order than MLX's reduction, so the rounded
            # result may differ by one unit of T in the last place, never more
            ulp = abs(float(mx.array(ref_lse * (1 + 2 ** -7 if dtype == mx.bfloat16 else 1 + 2 ** -10
                                                if dtype == mx.float16 else 1 + 2 ** -23)).astype(dtype).item())
                      - ref_lse) or 1e-30
            assert abs(got_lse - ref_lse) <= 1.01 * ulp, f"{what}: lse {got_lse} vs MLX's {ref_lse}"
            if got_lse == ref_lse:
                assert int(token.item()) == want_token, f"{what}: token {int(token.item())} vs MLX's {want_token}"
            else:  # the token MLX's argmax gives with this lse
                with mx.stream(mx.cpu):
                    alt = int(mx.argmax(logits - lse.reshape(1), axis=-1).item())
                assert int(token.item()) == alt, f"{what}: token {int(token.item())} vs {alt}"
            if kind == "tie":
                assert int(token.item()) == 17, f"{what}: equal maxima must give the first index"
            if kind == "peak":
                assert int(token.item()) == V // 3, what
            if kind == "merge":  # the case's point: MLX picks the first of the merged maxima, not the larger logit
                assert want_token == first and int(token.item()) == first, \
                    f"{what}: {int(token.item())}, MLX {want_token}"
            if kind == "cluster":  # all eight tie: the first wins
                assert want_token == 2100 and int(token.item()) == 2100, \
                    f"{what}: {int(token.item())}, MLX {want_token}"


_DECODE = _layer_case("q4_0", (6, 96, 160, 3, 2), 1, mx.float32, 2e-4, "mv")

CASES: Dict[str, List[KernelCase]] = {
    "mul_mv_id": [KernelCase("plain per-slot GEMV, Q4_0 37 x 96 (ragged rows), non-real ids give zero rows, "
                             "vs numpy", lambda f: _mv_plain_case(f))],
    "mul_mv_id_swiglu": [KernelCase("decode layer, Q4_0, 2 tokens x top-3, identity + padding slot", _DECODE)],
    "mul_mv_id_swiglu_route": [KernelCase("gate/up with the routing rule in the launch: Q4_0 37 x 96, 12 experts, "
                                          "softmax top-3 and Mixtral's top-2, vs mlx_moe.router and numpy",
                                          lambda f: _swiglu_route_case(f))],
    "mul_mv_id_down_combine": [KernelCase("decode layer, Q4_0, 2 tokens x top-3, identity + padding slot",
                                          _DECODE)],
    "mul_mm_id_map0": [KernelCase("one threadgroup: 37 tokens x top-3 over 10 experts with identity/padding ids "
                                  "vs numpy", _map0_case("block"))],
    "mul_mm_id_map0_count": [KernelCase("with mul_mm_id_map0_lists: 37 tokens x top-3 over 10 experts with "
                                        "identity/padding ids vs numpy", _map0_case("grid"))],
    "mul_mm_id_map0_lists": [KernelCase("with mul_mm_id_map0_count: 37 tokens x top-3 over 10 experts with "
                                        "identity/padding ids vs numpy", _map0_case("grid"))],
    "mul_mm_id": [KernelCase("Q4_0 70 x 96, 30 tokens x top-3, with and without BCAST, vs numpy", _mm_plain_case),
                  KernelCase("prefill layer, float16, ragged tiles, identity slots",
                             _layer_case("float16", (5, 100, 70, 4, 30), 1, mx.float16, 3e-3, "mm"))],
    "mul_mm_id_swiglu": [KernelCase("prefill layer, Q4_0, 40 tokens x top-3, ragged row tiles",
                                    _layer_case("q4_0", (6, 96, 160, 3, 40), 1, mx.float32, 2e-3, "mm"))],
    "mul_mm_id_combine": [KernelCase("weighted slot sum + identity term vs numpy", _combine_case)],
    "moe_router_topk": [KernelCase("softmax/renorm, Mixtral, DeepSeek group-limited vs mlx_moe.router",
                                   _router_case)],
    "decode_attention": [KernelCase("8 query / 2 key-value heads, 24-slot cache, first, middle and last "
                                    "slot vs mx.fast.scaled_dot_product_attention", _attention_case)],
    "mul_mv_id_moe": [KernelCase("the decode MoE layer in one launch (routing, gate/up, down, combine, residual): "
                                 "2 tokens, top-3 of 8 + 2 identity experts, ragged down tiles, twice on one "
                                 "counter, vs the two launches and numpy", _moe_layer_case)],
    "mul_mv_id_moe_trace": [KernelCase("the one-launch layer with its TRACE option, unstaged and staged: the plain "
                                       "launch's outputs bit for bit, 7 clock stamps a threadgroup",
                                       _moe_layer_trace_case)],
    "mul_mv_id_moe_ids": [KernelCase("the one-launch layer under given routing (repeated, identity and padding ids, "
                                     "unstaged float32 and staged bfloat16) vs numpy, and bit for bit mul_mv_id_moe's "
                                     "y and h under the routing it chose", _moe_layer_ids_case)],
    "mul_mv_id_moe_ids_trace": [KernelCase("the given-routing layer with its TRACE option: the plain launch's y and "
                                           "h bit for bit, 7 stamps a threadgroup",
                                           lambda f: _moe_layer_ids_case(f, trace=True))],
    "mul_mv_id_down_combine_res": [KernelCase("Q4_0 down + combine with identity and padding slots, plus a "
                                              "residual: the plain kernel's output + residual", _down_combine_res_case)],
    "dense_norm": [KernelCase("norm + stacked q/k/v (4-bit affine, K 1280: a tail step; bfloat16 weights with "
                              "biases) vs MLX's rms_norm and float64 numpy", _dense_norm_case)],
    "dense_norm_xn": [KernelCase("norm + an 8-bit router of 61 experts and the normalized input vs MLX's rms_norm "
                                 "and float64 numpy", _dense_norm_xn_case)],
    "decode_attention_parts": [KernelCase("per-head q/k norms, rope at 37 (and traditional at 2, 8 splits of 3 "
                                          "slots), new key/value and split results vs MLX's rms_norm, rope and "
                                          "scaled_dot_product_attention", _attention_parts_case)],
    "decode_attention_parts_kv": [KernelCase("as decode_attention_parts, the new key/value written into the "
                                             "cache in place (float32 at 37, bfloat16 at the last slot): slot pos "
                                             "vs MLX's rope, every other slot unchanged", _attention_parts_kv_case)],
    "qkv_attention": [KernelCase("dense_norm then decode_attention_parts_kv in one launch, 4-bit bfloat16 with "
                                 "q/k norms and float32 without, two positions on one counter, vs the two "
                                 "launches (bit for bit)", _qkv_attention_case)],
    "qkv_attention_oproj": [KernelCase("q/k/v, the attention and o_proj with the split router tail in one launch: "
                                       "4-bit bfloat16 with q/k norms and float32 q/k/v with an 8-bit o_proj "
                                       "(o_proj's format and width not q/k/v's), two positions on one set of "
                                       "counters, vs qkv_attention + dense_residual (bit for bit)",
                                       _qkv_attention_oproj_case)],
    "oproj_moe": [KernelCase("the split-tail o_proj then the one-launch MoE layer in one launch: one token, Q4_0 "
                             "experts (2 identity), 8-bit router, three launches on one set of counters, vs the "
                             "two launches (bit for bit)", _oproj_moe_case)],
    "dense_embed": [KernelCase("rows of 4-bit (g64, g128 over float32 scales), 8-bit affine and bfloat16 / "
                               "float32 tables, ids past either end clamped, vs the modules' own call (exact; "
                               "float32 affine to a rounding)", _dense_embed_case)],
    "dense_residual": [KernelCase("4-bit (K 1280: a tail step) and 8-bit affine projection + residual vs float64 "
                                  "numpy", _dense_residual_case)],
    "dense_residual_parts_router": [KernelCase("o_proj of 8 heads x 4 splits + residual, then the post-attention "
                                               "norm and an 8-bit router of 61 (16) experts in the last "
                                               "threadgroup, twice on one counter: vs the plain launch, MLX's "
                                               "rms_norm and float64 numpy", _router_tail_case)],
    "dense_residual_parts_router_split": [KernelCase("as dense_residual_parts_router, every threadgroup "
                                                     "projecting its own rows of the output and the last one "
                                                     "adding the shares", _router_tail_split_case)],
    "dense_residual_parts_router_split_route": [KernelCase("the split tail with the MoE routing rule (softmax "
                                                           "top-3 of 61, Mixtral top-2 of 16): the tail's outputs "
                                                           "bit for bit, ids and weights as moe_router_topk's",
                                                           _router_tail_rule_case)],
    "dense_residual_parts": [KernelCase("8 heads x 4 splits (one empty) combined, 4-bit projection + residual vs "
                                        "float64 numpy", _dense_residual_parts_case)],
    "routing_join_record": [KernelCase("8 / 4 / 384 / 3 slots, 2-48 layers, 1-5 tokens, stale words carried, "
                                       "slots past the end dropped, vs numpy", _routing_join_record_case)],
    "greedy_sample": [KernelCase("logsumexp and argmax of the rounded log-probabilities over 777-20000 "
                                 "logits (bfloat16, float16, float32): flat, two merged by the rounding (in "
                                 "neighbouring slices and 5 slices apart), peaked, equal maxima in two "
                                 "threadgroups, a threadgroup of -inf, eight tied in one slice, twice on one "
                                 "counter, vs MLX's ops",
                                 _greedy_sample_case)],
    "routing_join": [KernelCase("3 layers x 5 tokens x top-4 int32/float32, 48 layers x top-8 uint32/bfloat16, "
                                "4 x 2 x top-3 int32/float16 vs numpy stacking", _routing_join_case)],
}


def _mv_plain_case(flavor: str) -> None:
    from ..q4_0 import dequantize, quantize
    from .dispatch import Geometry
    from .mul_mv_id import mul_mv_id

    rng = np.random.default_rng(13)
    E, rows, cols, k, T = 5, 37, 96, 3, 2
    wq = quantize(rng.standard_normal((E, rows, cols)).astype(np.float32))
    wf = dequantize(wq)
    ids = np.array([[4, 0, 7], [2, 2, -3]], dtype=np.int32)
    src = rng.standard_normal((T * k, cols)).astype(np.float32)
    out = np.array(mul_mv_id(mx.array(src), mx.array(ids), mx.array(wq), False, flavor, Geometry(4, 2)))
    for p in range(T * k):
        e = ids.flat[p]
        if 0 <= e < E:
            _close(out[p], wf[e] @ src[p], 1e-4, f"mul_mv_id row {p}")
        else:
            assert not out[p].any(), f"mul_mv_id row {p} of a non-real id is not zero"


def _swiglu_route_case(flavor: str) -> None:
    """The routed gate/up kernel: its ids and weights against mlx_moe.router's rule, its
    h against numpy with the Q4_0 weights dequantized by mlx_moe.q4_0."""
    from .. import router as R
    from ..q4_0 import dequantize, quantize
    from .mul_mv_id import mul_mv_id_swiglu_route
    from .router import RouterParams

    rng = np.random.default_rng(17)
    E, rows, cols, T = 12, 37, 96, 2
    wg = quantize(rng.standard_normal((E, rows, cols)).astype(np.float32))
    wu = quantize(rng.standard_normal((E, rows, cols)).astype(np.float32))
    x = rng.standard_normal((T, cols)).astype(np.float32)
    lg = mx.array(rng.standard_normal((T, E)).astype(np.float32) * 2)
    for params, ref in [(RouterParams(3, normalize=True), lambda: R.softmax_topk(lg, 3, True)),
                        (RouterParams(2, score="topk_softmax"), lambda: R.topk_softmax(lg, 2))]:
        h, ids, w = (np.array(a) for a in mul_mv_id_swiglu_route(mx.array(x), lg, params, mx.array(wg),
                                                                 mx.array(wu), flavor))
        _same_routing((ids, w), ref(), f"routed {params}")
        g, u = dequantize(wg), dequantize(wu)
        for t in range(T):
            for s in range(params.k):
                e = ids[t, s]
                a, b = g[e] @ x[t], u[e] @ x[t]
                _close(h[t * params.k + s], a / (1 + np.exp(-a)) * b, 1e-4, f"routed h, token {t} slot {s}")


def missing_cases() -> List[str]:
    """Registered kernels without a case (must be empty)."""
    return [name for name in KERNELS if not CASES.get(name)]
