"""Randomized verification cases for the expert kernels: one definition shared by
the tests (tests/test_kernels_emulated.py, and through it the CUDA and prefill
tests) and by tools/verify_metal.py.

A *family* is a named list of cases of one kind (tile-aligned and ragged
shapes, repeated ids, zero experts, huge activations, ...) with a `quick`
subset for CI.  A case runs *checks*; a check's target is a kernel name (that
kernel called alone, against numpy in float64 on the same inputs) or "layer"
(the whole `KernelBackend` layer against the `mlx` backend, MLX's own
gather_mm / gather_qmm on the CPU in float32).  A check returns a `Measure`
and never asserts: the tests assert on it, the tool reports it.

Coverage: KERNEL_FAMILIES maps registered kernels (registry.KERNELS) to the
families whose cases target them; mlx_moe/kernels/kernel_cases.py's per-kernel
CASES count too.  mlx_moe/verify/run.py `coverage_gaps()` lists kernels with neither.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

from ..backends.mlx import MLXBackend
from ..experts import Experts
from ..kernels import dispatch
from ..kernels.dispatch import Geometry

# Relative tolerance on max |error| / max |reference|, by output dtype.
# Kernels and oracle both compute in float32 (or wider) on the same inputs;
# the half types add the rounding of the output (2^-11, 2^-8 relative).
TOL = {mx.float32: 2e-4, mx.float16: 2e-3, mx.bfloat16: 1e-2}

LAYER = "layer"  # check target: the whole KernelBackend layer against the mlx backend


# -- inputs ----------------------------------------------------------------------------------

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
            from ..q4_0 import Q4_0SwitchLinear

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


def dense_weights(proj, experts: Optional[Sequence[int]] = None) -> np.ndarray:
    """A projection's expert weights as float64 [len(experts) or E, rows, cols] (Q4_0
    dequantized by mlx_moe.q4_0.dequantize); only the listed experts when given."""
    w = proj["weight"]
    if experts is not None:
        w = w[mx.array(np.asarray(experts, dtype=np.int32))]
    if w.dtype == mx.uint16:
        from ..q4_0 import dequantize

        return dequantize(np.array(w)).astype(np.float64)
    return np.array(w.astype(mx.float32)).astype(np.float64)


def per_pair(proj, ids: np.ndarray, src: np.ndarray, real: np.ndarray) -> np.ndarray:
    """float64 W[ids[p]] @ src[p] for real pairs p, zero rows for the others; one expert's
    weights at a time (a model-sized layer's experts in float64 would be gigabytes)."""
    out = np.zeros((ids.size, proj["weight"].shape[1]), np.float64)
    for e in sorted(set(ids[real].tolist())):
        rows = np.flatnonzero(real & (ids == e))
        out[rows] = src[rows].astype(np.float64) @ dense_weights(proj, [e])[0].T
    return out


# -- measuring -------------------------------------------------------------------------------

@dataclass
class Measure:
    """How far a kernel's output is from its oracle.

    worst = max over compared elements of |got - ref| / bound (pass: <= 1);
    rel_err = max |got - ref| / max |ref|, for the report.
    """

    max_err: float = 0.0
    ref_max: float = 0.0
    worst: float = 0.0
    tol: float = 0.0
    compared: int = 0
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.worst <= 1.0

    @property
    def rel_err(self) -> float:
        return self.max_err / self.ref_max if self.ref_max > 0 else self.max_err

    def merge(self, other: "Measure") -> "Measure":
        return Measure(max(self.max_err, other.max_err), max(self.ref_max, other.ref_max),
                       max(self.worst, other.worst), max(self.tol, other.tol),
                       self.compared + other.compared, self.problems + other.problems)

    def describe(self) -> str:
        s = (f"max |err| {self.max_err:.3g} vs max |ref| {self.ref_max:.3g} "
             f"(rel {self.rel_err:.3g}, tol {self.tol:.3g}, err/bound {self.worst:.3g}, {self.compared} values)")
        return "; ".join(self.problems + [s])


def compare(got, ref: np.ndarray, tol: float, dtype=None, rows: Optional[np.ndarray] = None,
            atol=None, rtol: float = 0.0) -> Measure:
    """got (mx.array or numpy) against ref: pass when |got - ref| <= atol + rtol * |ref|
    everywhere, atol defaulting to tol * max |ref| (a bound relative to the output's scale).

    dtype: the dtype got must have; rows: boolean mask of the rows to compare.
    """
    m = Measure(tol=tol)
    if dtype is not None and isinstance(got, mx.array) and got.dtype != dtype:
        m.problems.append(f"output dtype {got.dtype}, expected {dtype}")
    g = np.array(got.astype(mx.float32)) if isinstance(got, mx.array) else np.asarray(got)
    if g.shape != ref.shape:
        m.problems.append(f"output shape {g.shape}, expected {ref.shape}")
        return m
    if rows is not None:
        g, ref = g[rows], ref[rows]
        if atol is not None and np.ndim(atol):
            atol = atol[rows]
    m.compared = int(g.size)
    if not g.size:
        return m
    g = g.astype(np.float64)
    ref = ref.astype(np.float64)
    if not np.isfinite(g).all():
        m.problems.append(f"{int((~np.isfinite(g)).sum())} non-finite values in the kernel output")
        g = np.where(np.isfinite(g), g, np.inf)
    err = np.abs(g - ref)
    m.max_err = float(err.max())
    m.ref_max = float(np.abs(ref).max())
    bound = (tol * m.ref_max if atol is None else atol) + rtol * np.abs(ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)
    m.worst = float(np.nan_to_num(ratio, nan=np.inf).max())
    return m


# -- cases -----------------------------------------------------------------------------------

# The kernels each path launches, checked alone on a fused layer case.
KERNEL_TARGETS = {
    "mv": ("mul_mv_id_swiglu", "mul_mv_id_down_combine", "mul_mv_id"),
    "mm": ("mul_mm_id_map0", "mul_mm_id_map0_count", "mul_mm_id_map0_lists", "mul_mm_id_swiglu", "mul_mm_id",
           "mul_mm_id_combine"),
}


@contextmanager
def forced_path(path: str):
    """Make dispatch.kernel_path pick `path` ("mv": GEMV, "mm": map0 + GEMM) for every
    covered batch, whatever the measured crossover: a case tests the kernels it names."""
    table = dispatch.MV_MAX_PAIRS
    saved = dict(table)
    for kind in table:
        table[kind] = 2**62 if path == "mv" else 0
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


@dataclass(frozen=True)
class LayerCase:
    """One MoE layer: experts (n_experts, hidden, ffn), top-k, tokens, on one kernel path.

    Checks: the whole KernelBackend layer (with `fuse`) against the mlx backend
    and, for a fused layer, each kernel of its path alone against numpy.
    """

    fmt: str  # "q4_0" or a float dtype name
    shape: Tuple[int, int, int, int, int]  # (n_experts, hidden, ffn, k, tokens)
    x_dtype: str = "float32"
    n_identity: int = 0
    n_pad: int = 0
    repeats: bool = False
    x_scale: float = 1.0
    seed: int = 0
    fuse: Tuple[bool, bool] = (True, True)  # (fuse_swiglu, fuse_combine; prefill has no unfused combine)
    path: str = "mv"  # "mv": decode GEMVs (mul_mv_id); "mm": prefill map0 + GEMMs (mul_mm_id)
    alone: bool = True  # also check each kernel of the path alone (when fused)
    family: str = ""

    @property
    def id(self) -> str:
        E, D, F, k, T = self.shape
        s = f"{self.path} {self.fmt} x{self.x_dtype} E{E} D{D} F{F} k{k} T{T}"
        if self.n_identity or self.n_pad:
            s += f" id{self.n_identity} pad{self.n_pad}"
        if self.repeats:
            s += " repeats"
        if self.x_scale != 1.0:
            s += f" |x|~{self.x_scale:g}"
        if self.fuse != (True, True):
            s += f" swiglu_{'fused' if self.fuse[0] else 'split'} combine_{'fused' if self.fuse[1] else 'mlx'}"
        return s

    def targets(self) -> Tuple[str, ...]:
        return (LAYER,) + (KERNEL_TARGETS[self.path] if self.alone and self.fuse == (True, True) else ())

    def inputs(self):
        """(experts, ids, weights, x): the same arrays for every check of the case."""
        E, D, F, k, T = self.shape
        experts = make_experts(E, D, F, self.fmt, seed=self.seed)
        ids, w = make_routing(T, k, E, self.n_identity, self.n_pad, self.repeats, seed=self.seed)
        x = make_x(T, D, getattr(mx, self.x_dtype), self.x_scale, seed=self.seed)
        return experts, ids, w, x

    def checks(self, flavor: str, targets: Sequence[str]) -> Iterator[Tuple[str, Callable[[], Measure]]]:
        """(target, thunk) pairs; the inputs are built once, on the first thunk."""
        cache: dict = {}

        def get():
            if not cache:
                cache["in"] = self.inputs()
            return cache["in"]

        for t in targets:
            if t == LAYER:
                yield t, lambda: layer_measure(self, kernel_backend(flavor, self.fuse), get())
            else:
                yield t, lambda t=t: KERNEL_CHECKS[t](self, flavor, get())


@dataclass(frozen=True)
class RaggedRowsCase:
    """mul_mv_id on Q4_0 rows that are not a multiple of the row tile (37 rows,
    tile 4 x 2), both src layouts, ids with padding values that must give zero rows."""

    family: str = "ragged_rows"
    id: str = "mv q4_0 E5 rows37 cols96 k3 T2 nr4 nsg2"

    def targets(self) -> Tuple[str, ...]:
        return ("mul_mv_id",)

    def checks(self, flavor: str, targets: Sequence[str]):
        for t in targets:
            yield t, lambda: ragged_rows_measure(flavor)


def kernel_backend(flavor: str, fuse: Tuple[bool, bool] = (True, True)):
    from ..backends.kernels import KernelBackend

    return KernelBackend(flavor, fuse_swiglu=fuse[0], fuse_combine=fuse[1])


def layer_measure(case: LayerCase, backend, inputs=None) -> Measure:
    """The backend's layer output against the mlx backend (the emulated tests' assertion)."""
    experts, ids, w, x = inputs if inputs is not None else case.inputs()
    ref = reference(x, ids, w, experts, case.n_identity)
    with forced_path(case.path):
        kind = dispatch.weight_kind(experts["gate_proj"]) if dispatch.kernels_cover(experts) else None
        if dispatch.kernel_path(x, ids, kind) != case.path:
            m = Measure(tol=TOL[x.dtype])
            m.problems.append(f"the case would not run on the {case.path} kernels (dispatch sends it elsewhere)")
            return m
        y = backend(x, ids, w, experts, n_identity=case.n_identity)
        mx.eval(y)
    return compare(y, ref, TOL[x.dtype], dtype=x.dtype)


# -- each kernel alone, against numpy in float64 -----------------------------------------------

def _oracle(case: LayerCase, inputs):
    """float64 gate (per pair), SwiGLU h, the real-pair mask, and h_in: h rounded to float32
    with NaN in the rows of identity/padding pairs (a kernel must never read them)."""
    experts, ids, w, x = inputs
    E = experts.num_experts
    k = ids.shape[1]
    idn = np.array(ids).reshape(-1)
    real = (idn >= 0) & (idn < E)
    xt = np.array(x.astype(mx.float32))[np.arange(idn.size) // k]
    gate = per_pair(experts["gate_proj"], idn, xt, real)
    up = per_pair(experts["up_proj"], idn, xt, real)
    with np.errstate(over="ignore"):  # exp(-gate) = inf for gate << 0: silu -> -0, as it should
        h = gate / (1.0 + np.exp(-gate)) * up
    h_in = np.where(real[:, None], h, np.nan).astype(np.float32)
    return gate, h, real, h_in


def swiglu_measure(case: LayerCase, flavor: str, inputs) -> Measure:
    from ..kernels.mul_mv_id import mul_mv_id_swiglu

    experts, ids, w, x = inputs
    _, h, real, _ = _oracle(case, inputs)
    got = mul_mv_id_swiglu(x, ids, experts["gate_proj"]["weight"], experts["up_proj"]["weight"], flavor)
    return compare(got, h, TOL[mx.float32], dtype=mx.float32, rows=real)  # other rows: unwritten


def mul_mv_id_measure(case: LayerCase, flavor: str, inputs) -> Measure:
    """Both src layouts: gate rows from x (broadcast per token) and down rows from h_in (per
    pair); rows of identity/padding pairs must be zero."""
    from ..kernels.mul_mv_id import mul_mv_id

    experts, ids, w, x = inputs
    gate, _, real, h_in = _oracle(case, inputs)
    got = mul_mv_id(x, ids, experts["gate_proj"]["weight"], True, flavor)
    m = compare(got, gate, TOL[mx.float32], dtype=mx.float32)
    down = per_pair(experts["down_proj"], np.array(ids).reshape(-1), h_in, real)
    got = mul_mv_id(mx.array(h_in), ids, experts["down_proj"]["weight"], False, flavor)
    return m.merge(compare(got, down, TOL[mx.float32], dtype=mx.float32))


def _combine_oracle(case: LayerCase, inputs, d: np.ndarray, real: np.ndarray) -> np.ndarray:
    """sum_s w * d[pair] over real slots + sum_s w * x over identity slots, float64."""
    experts, ids, w, x = inputs
    T, k = ids.shape
    E = experts.num_experts
    idn = np.array(ids)
    wn = np.array(w).astype(np.float64)
    dr = np.where(real[:, None], d, 0).astype(np.float64).reshape(T, k, -1)
    y = (dr * (wn * real.reshape(T, k))[..., None]).sum(axis=1)
    ident = (idn >= E) & (idn < E + case.n_identity)
    return y + (wn * ident).sum(axis=1, keepdims=True) * np.array(x.astype(mx.float32)).astype(np.float64)


def down_combine_measure(case: LayerCase, flavor: str, inputs) -> Measure:
    from ..kernels.mul_mv_id import mul_mv_id_down_combine

    experts, ids, w, x = inputs
    _, _, real, h_in = _oracle(case, inputs)
    down = per_pair(experts["down_proj"], np.array(ids).reshape(-1), h_in, real)
    got = mul_mv_id_down_combine(mx.array(h_in), ids, w, x, experts["down_proj"]["weight"],
                                 case.n_identity, flavor)
    return compare(got, _combine_oracle(case, inputs, down, real), TOL[x.dtype], dtype=x.dtype)


def ragged_rows_measure(flavor: str) -> Measure:
    """The plain per-slot GEMV on Q4_0 rows that are not a multiple of the row tile,
    against numpy on the dequantized weights (mlx_moe.q4_0.dequantize), per pair with
    rtol 1e-4 and atol 1e-4 * max |pair's reference| + 1e-6; other rows must be zero."""
    from ..kernels.mul_mv_id import mul_mv_id
    from ..q4_0 import dequantize, quantize

    rng = np.random.default_rng(13)
    E, rows, cols, k, T = 5, 37, 96, 3, 2
    wq = quantize(rng.standard_normal((E, rows, cols)).astype(np.float32))
    wf = dequantize(wq).astype(np.float64)
    ids = np.array([[4, 0, 7], [2, 2, -3]], dtype=np.int32)  # 7 and -3: not real, rows must be zero
    src = rng.standard_normal((T * k, cols)).astype(np.float32) * 100
    m = Measure(tol=1e-4)
    for bcast in (False, True):
        x = src[:T] if bcast else src
        out = mul_mv_id(mx.array(x), mx.array(ids), mx.array(wq), bcast, flavor, Geometry(4, 2))
        want = np.zeros((T * k, rows), np.float64)
        for p in range(T * k):
            e = ids.flat[p]
            if 0 <= e < E:
                want[p] = wf[e] @ x[p // k if bcast else p]
        atol = 1e-4 * np.abs(want).max(axis=1, keepdims=True) + 1e-6
        m = m.merge(compare(out, want, 1e-4, dtype=mx.float32, atol=atol, rtol=1e-4))
    return m


def route_oracle(ids: np.ndarray, n_experts: int):
    """map0's outputs computed in numpy from its contract (metal/mul_mm_id.metal):
    counts [E], offsets [E + 1], pairs [P] (grouped by expert, ascending pair id within
    an expert, -1 after), tiles [G, 2] ((expert, first position) per BN pairs, (-1, 0) after)."""
    from ..kernels.mul_mm_id import BN, tile_table_size

    flat = ids.reshape(-1)
    P = flat.size
    real = (flat >= 0) & (flat < n_experts)
    counts = np.bincount(flat[real], minlength=n_experts).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    pairs = np.full(P, -1, np.int32)
    tiles = np.tile(np.array([[-1, 0]], np.int32), (tile_table_size(P, n_experts), 1))
    t = 0
    for e in range(n_experts):
        mine = np.flatnonzero(flat == e)
        pairs[offsets[e]:offsets[e] + mine.size] = mine
        for first in range(0, mine.size, BN):
            tiles[t] = (e, offsets[e] + first)
            t += 1
    return counts, offsets, pairs, tiles


def _route(inputs):
    """A Route built by the oracle (not by map0): the GEMM checks do not depend on map0."""
    from ..kernels.mul_mm_id import Route

    experts, ids, _, _ = inputs
    counts, offsets, pairs, tiles = route_oracle(np.array(ids), experts.num_experts)
    return Route(ids, mx.array(counts), mx.array(offsets), mx.array(pairs), mx.array(tiles))


def map0_measure(kind: str) -> Callable[[LayerCase, str, tuple], Measure]:
    """Exact equality of counts, offsets, pairs and tiles with the numpy counting sort,
    the route built by the map0 kernels of `kind` (mul_mm_id.MAP0_KINDS)."""

    def measure(case: LayerCase, flavor: str, inputs) -> Measure:
        from ..kernels import mul_mm_id

        experts, ids, _, _ = inputs
        with mul_mm_id.switched(MAP0=kind):
            got = mul_mm_id.map0(ids, experts.num_experts, flavor)
            mx.eval(got)
        return _same_route(got, route_oracle(np.array(ids), experts.num_experts))

    return measure


def _same_route(got, want) -> Measure:
    m = Measure(tol=0.0)
    for name, g, w in zip(("counts", "offsets", "pairs", "tiles"), got[1:], want):
        g = np.array(g)
        m.compared += int(w.size)
        if g.shape != w.shape:
            m.problems.append(f"{name}: shape {g.shape}, expected {w.shape}")
        elif (g != w).any():
            bad = tuple(np.argwhere(g != w)[0].tolist())
            m.problems.append(f"{name}: {int((g != w).sum())} wrong entries, first at {bad}: "
                              f"{g[bad]} instead of {w[bad]}")
    return m


def mm_swiglu_measure(case: LayerCase, flavor: str, inputs) -> Measure:
    from ..kernels.mul_mm_id import mul_mm_id_swiglu

    experts, ids, w, x = inputs
    _, h, real, _ = _oracle(case, inputs)
    got = mul_mm_id_swiglu(x, _route(inputs), experts["gate_proj"]["weight"], experts["up_proj"]["weight"],
                           flavor)
    return compare(got, h, TOL[mx.float32], dtype=mx.float32, rows=real)  # other rows: unwritten


def mul_mm_id_measure(case: LayerCase, flavor: str, inputs) -> Measure:
    """Both src layouts, as mul_mv_id_measure; only rows of real pairs are written."""
    from ..kernels.mul_mm_id import mul_mm_id

    experts, ids, w, x = inputs
    gate, _, real, h_in = _oracle(case, inputs)
    route = _route(inputs)
    got = mul_mm_id(x, route, experts["gate_proj"]["weight"], True, flavor)
    m = compare(got, gate, TOL[mx.float32], dtype=mx.float32, rows=real)
    down = per_pair(experts["down_proj"], np.array(ids).reshape(-1), h_in, real)
    got = mul_mm_id(mx.array(h_in), route, experts["down_proj"]["weight"], False, flavor)
    return m.merge(compare(got, down, TOL[mx.float32], dtype=mx.float32, rows=real))


def mm_combine_measure(case: LayerCase, flavor: str, inputs) -> Measure:
    """d rows of real pairs from numpy (NaN in the others: never read) -> weighted sum + identity term."""
    from ..kernels.mul_mm_id import mul_mm_id_combine

    experts, ids, w, x = inputs
    _, _, real, h_in = _oracle(case, inputs)
    d = per_pair(experts["down_proj"], np.array(ids).reshape(-1), h_in, real)
    d_in = np.where(real[:, None], d, np.nan).astype(np.float32)
    got = mul_mm_id_combine(mx.array(d_in), ids, w, x, experts.num_experts, case.n_identity, flavor)
    return compare(got, _combine_oracle(case, inputs, d_in, real), TOL[x.dtype], dtype=x.dtype)


# Kernel name -> its check on a LayerCase (the kernel called alone, against numpy).
KERNEL_CHECKS: Dict[str, Callable[[LayerCase, str, tuple], Measure]] = {
    "mul_mv_id_swiglu": swiglu_measure,
    "mul_mv_id_down_combine": down_combine_measure,
    "mul_mv_id": mul_mv_id_measure,
    "mul_mm_id_map0": map0_measure("block"),
    "mul_mm_id_map0_count": map0_measure("grid"),  # with mul_mm_id_map0_lists
    "mul_mm_id_map0_lists": map0_measure("grid"),
    "mul_mm_id_swiglu": mm_swiglu_measure,
    "mul_mm_id": mul_mm_id_measure,
    "mul_mm_id_combine": mm_combine_measure,
}


# -- families --------------------------------------------------------------------------------

# (n_experts, hidden, ffn, k, tokens): tile-aligned and ragged shapes.
# Q4_0 cols must be multiples of 32; float cols may be anything.
# Q4_0 rows are multiples of 32 in a SwiGLU layer (each projection's rows are
# another's cols); ragged row tiles are tested on the plain kernel (ragged_rows).
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
# (weight format, activation dtype) pairs of the float families.
FLOAT_PAIRS = [("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32"), ("float16", "float32")]
QWEN3_30B_A3B = (128, 2048, 768, 8, 1)  # decode: 128 experts, top-8, one token


@dataclass(frozen=True)
class Family:
    name: str
    about: str
    cases: tuple  # the full set (what the tests and a Mac run)
    quick: tuple  # a subset for CI (`verify_metal.py --quick`)


def _family(name: str, about: str, cases: Sequence, quick: Sequence[int]) -> Family:
    cases = tuple(replace(c, family=name) for c in cases)
    return Family(name, about, cases, tuple(cases[i] for i in quick))


FAMILIES: Dict[str, Family] = {f.name: f for f in [
    _family("shapes_q4_0", "Q4_0 experts, tile-aligned and ragged shapes",
            [LayerCase("q4_0", s) for s in Q4_SHAPES], quick=[1, 3]),
    _family("shapes_float", "float16/bfloat16/float32 experts, cols not multiples of 4 or 128",
            [LayerCase(fmt, s, xd) for s in FLOAT_SHAPES for fmt, xd in FLOAT_PAIRS], quick=[5, 7]),
    _family("half_activations", "Q4_0 experts, float16 and bfloat16 activations",
            [LayerCase("q4_0", (6, 96, 160, 3, 2), xd, seed=3) for xd in ("float16", "bfloat16")], quick=[1]),
    _family("repeated_ids", "8 slots over 4 experts (repeats certain), 3 identity and 2 padding slots",
            [LayerCase(fmt, (4, 64, 96, 8, 3), "float32", n_identity=3, n_pad=2, repeats=True, seed=5)
             for fmt in ("q4_0", "float16")], quick=[0]),
    _family("zero_experts", "no real expert anywhere: identity (zero-computation) and padding slots only",
            [LayerCase("q4_0", (4, 64, 32, 4, 2), "float16", n_identity=2, n_pad=2, seed=7)], quick=[0]),
    _family("huge_activations", "|x| ~ 1e5 in float32, above float16's range",
            [LayerCase("q4_0", (6, 96, 160, 3, 2), x_scale=1e5, seed=9),
             LayerCase("float16", (5, 100, 70, 3, 2), x_scale=1e5, seed=9)], quick=[0, 1]),
    _family("unfused_variants", "separate gate/up dispatches and/or the combine in MLX ops",
            [LayerCase("q4_0", (6, 96, 160, 3, 2), n_identity=1, n_pad=1, seed=11, fuse=f)
             for f in ((False, True), (True, False), (False, False))], quick=[0, 1, 2]),
    _family("ragged_rows", "plain GEMV, rows not a multiple of the row tile, padding ids",
            [RaggedRowsCase()], quick=[0]),
    _family("model_shapes", "Qwen3-30B-A3B layer shapes (hidden 2048, expert ffn 768, top-8)",
            [LayerCase("q4_0", QWEN3_30B_A3B), LayerCase("q4_0", (128, 2048, 768, 8, 4), "bfloat16", seed=1),
             LayerCase("bfloat16", (32, 2048, 768, 8, 1), "bfloat16", seed=2),
             # quick: the model's GEMV sizes on a few experts, the layer only (the emulation is slow)
             LayerCase("q4_0", (4, 2048, 768, 4, 1), "float16", seed=3, alone=False)], quick=[3]),
    # The prefill path (map0 + tiled GEMMs), forced whatever the GEMV/GEMM crossover.
    _family("prefill_shapes_q4_0", "prefill, Q4_0 experts: rows vs the 64-row tile, several 32-pair tiles "
            "per expert, 40 and 160 experts (map0's multi-expert simdgroups and prefix steps)",
            [LayerCase("q4_0", s, path="mm") for s in
             [(8, 64, 96, 4, 20), (6, 96, 160, 3, 30), (5, 544, 224, 4, 17), (4, 64, 96, 4, 40),
              (40, 64, 32, 8, 12), (160, 64, 32, 4, 24)]], quick=[3, 5]),
    _family("prefill_shapes_float", "prefill, float16/bfloat16/float32 experts, cols not multiples of the tile",
            [LayerCase(fmt, (6, 100, 70, 3, 30), xd, path="mm") for fmt, xd in FLOAT_PAIRS]
            + [LayerCase("bfloat16", (5, 130, 260, 4, 20), "bfloat16", seed=1, path="mm")], quick=[0, 3]),
    _family("prefill_half_activations", "prefill, Q4_0 experts, float16 and bfloat16 activations",
            [LayerCase("q4_0", (6, 96, 160, 3, 30), xd, seed=3, path="mm") for xd in ("float16", "bfloat16")],
            quick=[1]),
    _family("prefill_repeated_ids", "prefill, 8 slots over 4 experts, 3 identity and 2 padding slots",
            [LayerCase(fmt, (4, 64, 96, 8, 12), "float32", n_identity=3, n_pad=2, repeats=True, seed=5, path="mm")
             for fmt in ("q4_0", "float16")], quick=[0]),
    _family("prefill_zero_experts", "prefill, identity and padding slots only (map0 lists nothing)",
            [LayerCase("q4_0", (4, 64, 32, 4, 20), "float16", n_identity=2, n_pad=2, seed=7, path="mm")],
            quick=[0]),
    _family("prefill_huge_activations", "prefill, |x| ~ 1e5 in float32 (never rounded to half)",
            [LayerCase("q4_0", (6, 96, 160, 3, 30), x_scale=1e5, seed=9, path="mm"),
             LayerCase("float16", (5, 100, 70, 3, 30), x_scale=1e5, seed=9, path="mm")], quick=[0]),
    _family("prefill_unfused", "prefill with separate gate and up GEMMs (mul_mm_id, src per token)",
            [LayerCase("q4_0", (6, 96, 160, 3, 30), n_identity=1, n_pad=1, seed=11, fuse=(False, True),
                       path="mm")], quick=[0]),
    _family("prefill_model_shapes", "prefill on Qwen3-30B-A3B layer shapes",
            [LayerCase("q4_0", (128, 2048, 768, 8, 64), "bfloat16", path="mm"),
             LayerCase("q4_0", (128, 2048, 768, 8, 256), "bfloat16", seed=1, path="mm"),
             LayerCase("bfloat16", (32, 2048, 768, 8, 32), "bfloat16", seed=2, path="mm"),
             LayerCase("q4_0", (2, 2048, 768, 2, 4), "float32", seed=3, path="mm", alone=False)], quick=[3]),
]}

_DECODE_FAMILIES = ("shapes_q4_0", "shapes_float", "half_activations", "repeated_ids", "zero_experts",
                    "huge_activations", "model_shapes")
_PREFILL_FAMILIES = ("prefill_shapes_q4_0", "prefill_shapes_float", "prefill_half_activations",
                     "prefill_repeated_ids", "prefill_zero_experts", "prefill_huge_activations",
                     "prefill_model_shapes")

# Kernel name (registry.KERNELS) -> the families whose cases check it alone.  The
# unfused families run whole layers only (their kernels are launched there too).
KERNEL_FAMILIES: Dict[str, Tuple[str, ...]] = {
    "mul_mv_id_swiglu": _DECODE_FAMILIES,
    "mul_mv_id_down_combine": _DECODE_FAMILIES,
    "mul_mv_id": _DECODE_FAMILIES + ("ragged_rows",),
    "mul_mm_id_map0": _PREFILL_FAMILIES,
    "mul_mm_id_map0_count": _PREFILL_FAMILIES,
    "mul_mm_id_map0_lists": _PREFILL_FAMILIES,
    "mul_mm_id_swiglu": _PREFILL_FAMILIES,
    "mul_mm_id": _PREFILL_FAMILIES,
    "mul_mm_id_combine": _PREFILL_FAMILIES,
}


def family_cases(name: str, quick: bool = False) -> tuple:
    if name not in FAMILIES:
        raise KeyError(f"unknown case family {name!r}; families: {', '.join(FAMILIES)}")
    f = FAMILIES[name]
    return f.quick if quick else f.cases
