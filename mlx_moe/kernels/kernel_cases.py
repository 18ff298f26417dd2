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


def _map0_case(flavor: str) -> None:
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


def _router_case(flavor: str) -> None:
    from .. import router as R
    from .router import RouterParams, fused_topk

    rng = np.random.default_rng(7)
    lg = mx.array(rng.standard_normal((6, 64)).astype(np.float32) * 2)
    for params, ref in [(RouterParams(8, normalize=True), lambda: R.softmax_topk(lg, 8, True)),
                        (RouterParams(2, score="topk_softmax"), lambda: R.topk_softmax(lg, 2)),
                        (RouterParams(6, n_group=8, topk_group=3, scaling=2.0),
                         lambda: R.group_limited_topk(lg, 6, 8, 3, 2.0))]:
        gi, gw = (np.array(a) for a in fused_topk(lg, params, flavor))
        wi, ww = (np.array(a) for a in ref())
        og, ow = np.argsort(gi, 1), np.argsort(wi, 1)
        assert (np.take_along_axis(gi, og, 1) == np.take_along_axis(wi, ow, 1)).all(), f"router ids {params}"
        _close(np.take_along_axis(gw, og, 1), np.take_along_axis(ww, ow, 1), 1e-5, f"router weights {params}")


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


_DECODE = _layer_case("q4_0", (6, 96, 160, 3, 2), 1, mx.float32, 2e-4, "mv")

CASES: Dict[str, List[KernelCase]] = {
    "mul_mv_id": [KernelCase("plain per-slot GEMV, Q4_0 37 x 96 (ragged rows), non-real ids give zero rows, "
                             "vs numpy", lambda f: _mv_plain_case(f))],
    "mul_mv_id_swiglu": [KernelCase("decode layer, Q4_0, 2 tokens x top-3, identity + padding slot", _DECODE)],
    "mul_mv_id_down_combine": [KernelCase("decode layer, Q4_0, 2 tokens x top-3, identity + padding slot",
                                          _DECODE)],
    "mul_mm_id_map0": [KernelCase("37 tokens x top-3 over 10 experts with identity/padding ids vs numpy",
                                  _map0_case)],
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
    "routing_join_record": [KernelCase("8 / 4 / 384 / 3 slots, 2-48 layers, 1-5 tokens, stale words carried, "
                                       "slots past the end dropped, vs numpy", _routing_join_record_case)],
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


def missing_cases() -> List[str]:
    """Registered kernels without a case (must be empty)."""
    return [name for name in KERNELS if not CASES.get(name)]
