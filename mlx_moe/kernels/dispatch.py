"""Dispatch rules for the custom expert kernels, in one place.

- which projection formats and activation dtypes the kernels cover;
- the GEMV/GEMM switch (`kernel_path`): up to MV_MAX_PAIRS[kind] (token, slot)
  pairs per call the GEMV kernels (mul_mv_id) run; above it the tiled routed
  GEMMs (map0 + mul_mm_id), which read each expert's weights once per tile of
  32 pairs instead of once per pair.  The crossover is measured on the H100
  per weight kind (MV_MAX_PAIRS below);
- launch geometry per kernel and weight format: NR rows per simdgroup, NSG
  simdgroups per threadgroup (measured on the H100 with tools/bench_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

from mlx_lm.models.switch_layers import SwitchLinear

from ..experts import Experts

# (token, slot) pairs per call up to which the GEMV kernels run.
MAX_DECODE_PAIRS = 64

# The GEMV -> GEMM crossover per weight kind, in (token, slot) pairs: the
# largest batch on which mul_mv_id still beats map0 + mul_mm_id.  Measured on
# the H100 (BENCHMARKS.md, "GEMV -> GEMM crossover"; top-8, Qwen3-30B-A3B
# layer shapes): Q4_0 mv is faster up to 32 tokens (256 pairs: 0.78 vs
# 1.00 ms), mm from 64 (1.14 vs 1.53 ms); bfloat16 mv up to 64 tokens (512
# pairs: 1.60 vs 1.87 ms), mm from 128.  `None` means MAX_DECODE_PAIRS.
MV_MAX_PAIRS = {"q4_0": 256, "float": 512}

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


@dataclass(frozen=True)
class Geometry:
    nr: int  # output rows per simdgroup
    nsg: int  # simdgroups per threadgroup (down_combine: slots in flight)
    nq: int = 1  # Q4_0: quant words (of 8 per block) per lane: 1, 2 or 4; float weights ignore it

    def __post_init__(self):
        if self.nr < 1 or self.nsg < 1 or self.nsg > 32:
            raise ValueError(f"launch geometry needs nr >= 1 and 1 <= nsg <= 32; got nr={self.nr} nsg={self.nsg}")
        if self.nq not in (1, 2, 4):
            raise ValueError(f"Geometry.nq (Q4_0 quant words per lane) must be 1, 2 or 4; got {self.nq}")

    @property
    def tag(self) -> str:
        """'NRxNSGxNQ', the form tools/bench_kernels.py --geometries takes."""
        return f"{self.nr}x{self.nsg}x{self.nq}"


# Q4_0 geometries measured on the H100 (BENCHMARKS.md, "decode geometry sweep":
# ncu GPU time at Qwen3-30B-A3B decode shapes, T = 1): gate/up 1x4x1 13.6 us
# (2x4x1 14.3, 2x8x2 14.3, 8x2x4 20.5); down 4x8x1 8.8 us (8x8x1 8.9, 2x8x2
# 12.2, 2x8x4 18.2).  Many small simdgroups keep enough loads in flight to
# cover HBM latency; nq=1 keeps each load instruction within a few cache lines.
# The float entries are not measured.
# Gate+up (SwiGLU fused) and the plain per-slot GEMV: a threadgroup owns nr * nsg rows.
GATE_UP = {"q4_0": Geometry(nr=1, nsg=4, nq=1), "float": Geometry(nr=2, nsg=4)}
# Down + combine: a threadgroup owns nr rows of one token, its simdgroups take the slots.
DOWN = {"q4_0": Geometry(nr=4, nsg=8, nq=1), "float": Geometry(nr=2, nsg=8)}



@dataclass(frozen=True)
class LayerGeometry:
    """mul_mv_id_moe (the decode MoE layer in one launch): its threadgroups all have
    nsg simdgroups; gate/up ones own gate_nr rows a simdgroup, down ones down_nr rows;
    stage (bits): 1 = down threadgroups copy their weight rows into threadgroup memory
    before waiting for h (where 16 KB hold them), 2 = gate/up threadgroups copy theirs
    before the dot products (where 24 KB do), 4 = the gate/up threadgroups' activations
    prepared in threadgroup memory (Q4_0, up to 2048 columns), 8 = the down threadgroups
    read h two floats a load (Q4_0), 16 = h kept in bfloat16 (as mlx-lm's SwitchGLU keeps
    it) and read two values a load (bfloat16 activations and Q4_0 only, else ignored),
    32 = the gate/up dot products on the tensor cores (CUDA; with bit 2, gate_nr * nsg = 8,
    bfloat16 activations and Q4_0 only, else ignored), 64 = the residual read before the
    down threadgroups wait, not after their dot products, 128 = the down dot products on
    the tensor cores (CUDA; with bits 1 and 16, down_nr 4, bfloat16 activations and Q4_0
    only, else ignored), 256 = the down threadgroups' rows staged only once half the gate/up
    threadgroups are done, 512 = with 128, the down tile's block loop not unrolled (fewer
    registers: 8 threadgroups an SM), 1024 = with 32, the gate/up tile's nibbles converted a
    32-bit word at a time (fewer instructions), 2048 = each hand-off between threadgroups
    fenced by one thread, not all (CUDA only), 4096 = with 256, the rows held until a
    quarter of the gate/up threadgroups are done, not half, 8192 = with 32 (not 1024), the
    gate/up tile's activations read through L1, not copied into threadgroup memory (4 KB
    less a threadgroup; CUDA); rows stage only at a multiple of 16 bytes (Q4_0: 256
    columns)."""
    gate_nr: int
    down_nr: int
    nsg: int
    nq: int = 1
    stage: int = 0

    def __post_init__(self):
        Geometry(self.gate_nr, self.nsg, self.nq)  # the same bounds
        Geometry(self.down_nr, self.nsg, self.nq)
        if not 0 <= self.stage <= 16383:
            raise ValueError(f"LayerGeometry.stage is 0 to 16383, bits (1: down rows staged, 2: gate/up rows, 4: gate/up "
                             f"activations prepared, 8: h read in pairs, 16: h in bfloat16, 32: gate/up on the tensor "
                             f"cores, 64: the residual read before the wait, 128: down on the tensor cores, 256: the "
                             f"down rows held until half the gate/up threadgroups are done, 512: the down tile's "
                             f"loop not unrolled, 1024: the gate/up tile's nibbles a word at a time, 2048: one fence "
                             f"a hand-off, 4096: with 256, held until a quarter are done, 8192: with 32, the gate/up x read "
                             f"through L1); got {self.stage}")

    @property
    def tag(self) -> str:
        """'GATExDOWNxNSGxNQ[xSTAGE]', the form tools/bench_kernels.py --layer-geometries takes."""
        return f"{self.gate_nr}x{self.down_nr}x{self.nsg}x{self.nq}" + (f"x{self.stage}" if self.stage else "")

    @staticmethod
    def parse(tag: str) -> "LayerGeometry":
        try:
            nums = [int(v) for v in tag.split("x")]
            if not 3 <= len(nums) <= 5:
                raise ValueError("3 to 5 numbers")
            return LayerGeometry(*nums)
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer geometry {tag!r}: want GATE_NRxDOWN_NRxNSG[xNQ[xSTAGE]], e.g. 1x4x8x1 ({e})") \
                from None


# The one-launch layer's geometry.  Q4_0, ncu GPU time on the H100 (Qwen3-30B-A3B decode
# shapes; BENCHMARKS.md 2026-12-06, third session; two runs): 1x4x8x1 23.0 / 23.3 us,
# 1x8x8x1 25.0 / 25.8, 2x4x8x1 25.5, 1x2x4x1 29.7, 1x4x4x1 31.3 / 32.5, 2x4x4x1 35.0
# (the two launches: 14.8 + 8.8).  With the down weights staged (a third run):
# 1x4x8x1x1 22.27 against 22.88 unstaged, 1x4x4x1x1 27.5, 1x8x8x1x1 25.3; memcheck clean
# and end to end 308.1 against 269.5 tok/s (medians of 5, a host-bound, drifting
# machine; BENCHMARKS.md 2026-12-06, fourth session), so staged became the default.  The
# gate/up rows staged too, and their activations prepared (one run, 2026-12-06 seventh
# session): 1x4x8x1x7 22.11 against 22.50 (x1), 23.90 (unstaged), 24.00 (x3: the gate/up
# rows staged without the activations: slower), 22.91 (x6), 1x4x4x1x7 24.13, 2x4x4x1x7
# 23.97, 1x4x8x2x7 25.02 (a second machine: x7 22.08, x1 22.56, x5 24.19, x4 24.67: the
# activations prepared pay only with the rows staged); in the decode step 1064.8 against
# 1095.2 us (48 layers) and end to end 389.6 against 382.5 tok/s (medians of 6 ABBA
# pairs), the same greedy tokens: the default until h was read in pairs by the down
# threadgroups (bit 8; whole 32-byte sectors where a warp's scalar loads touched twice
# the sectors they used): one H100 (2026-12-06, eighth session), 1x4x8x1x15 20.70 us
# against 21.63 (x7) and 22.59 (x1) in one process; in the decode step 1011.4 against
# 1052.7 us; its staged GPU test (stage 15 at 1x5x6x1 among others) clean under
# compute-sanitizer memcheck.  Then h kept in bfloat16 (bit 16; bfloat16 activations
# only, as mlx-lm's SwitchGLU keeps it): 1x4x8x1x31 20.32, 20.42 and 20.69 us against
# 20.66, 20.67 and 20.93 (x15) on three H100 machines (ncu, one process each;
# BENCHMARKS.md 2026-12-06, tenth session), memcheck clean.  The down threadgroups'
# copy of h in threadgroup memory (a bit 32 then) measured slower there: 21.15 us.  Then
# the gate/up dot products on the tensor cores (bit 32; stage 63, where bit 4 gives way to
# the tile's own copy of x, so 63 is 59's kernel): the decode step's MoE launches (GPU
# time, 48 a step, one H100, 2026-12-07 sixteenth session, ABAB) 970.0 and 972.6 us against
# 998.8 and 1004.2 at stage 31 (and 974.8 and 976.1 with the one-fence release and the
# down threadgroups' copy of h added, the fifteenth session's 255: those two removed as no
# gain); ncu 19.94 against 20.40 us (fifteenth session), memcheck clean.  Then the down
# dot products on the tensor cores too (bit 128, 4 slots' rows a tile; stage 191): the
# decode step's MoE launches 952.5 and 955.3 us against 977.2 and 979.1 at 63 (one H100,
# 2026-12-07 seventeenth session, ABAB), ncu 19.94 against 20.51 us routed and 17.28
# against 18.08 under given routing (one process), memcheck clean, the greedy and
# compiled GPU tests passed with it.  On Metal and for float32 activations bits 32 and
# 128 change nothing (191 runs as 31 and 15 there).  Tried on 191 and not kept (ncu, one
# H100, 2026-12-07 nineteenth session): the gate/up tile copied and computed warp by warp
# 21.18 us against 19.87, the gate/up rule stopped at the slot 19.90, h prefetched into L1
# for the down tile 21.44; 8 threadgroups an SM (a 32-register cap: MLX's NVRTC build takes
# 40 registers, 6 an SM) 22.46 against 20.48, though the squeeze may have cost the code
# itself (BENCHMARKS.md says why).  Then each hand-off between threadgroups fenced by one
# thread (bit 2048, CUDA only; stage 2239): ncu 18.69 and 18.82 us against 19.81 and 19.36
# routed, 16.93 and 16.96 against 17.12 and 17.38 under given routing (two processes, one
# H100, 2026-12-07 twenty-first session), the trace's span 16.2-16.4 against 17.3 us; the
# decode step's MoE launches 910.6 and 908.8 us against 931.7 and 931.2 (48 a step, ABAB);
# the GPU tests and memcheck clean with it the default.  Measured there and removed: bit 256
# (the down threadgroups' h copied into threadgroup memory, 447: 21.79 us against 19.81,
# 42 registers with the routing shared, 5 threadgroups an SM) and bit 512 (the down tile's
# loop not unrolled, 703: 21.86; 32 registers, 8 an SM, whose down threadgroups then start
# beside the gate/up ones and take their bandwidth: last gate/up ticket 13.9 us against
# 11.0).  The float entry is not measured.
MOE_LAYER = {"q4_0": LayerGeometry(gate_nr=1, down_nr=4, nsg=8, nq=1, stage=2239), "float": LayerGeometry(2, 2, 8)}

# mul_mv_id_moe's down threadgroups take their token's routing from its first gate/up
# threadgroup (which writes ids and weights, then bumps the counter's third word) instead
# of running the rule themselves (template SHARE_ROUTE; the counter needs 3 words).  Why:
# a down threadgroup starts as gate/up ones retire, and its rule (1.5 us at its start,
# the trace) stood before its weight reads on the launch's last path.  On the H100 (one
# machine, BENCHMARKS.md 2026-12-07, nineteenth session): ncu 19.38 against 19.89 us a
# layer, 19.74 against 20.54 (cache preference shared) and 18.94 against 20.48 in three
# processes; the decode step's MoE launches 928.4 and 926.4 us against 955.2 and 955.2
# (48 a step, ABAB), so on (engine +eachroute: off).  Measured before the down rows were
# staged and the tiles ran on the tensor cores (eighth session, engine +droute), no gain.
SHARE_ROUTE = True


def weight_kind(proj) -> Optional[str]:
    """'q4_0' or 'float' for projections the kernels read directly, else None.

    Runs once per layer call: it reads the module's dict directly (nn.Module
    attribute access costs microseconds, a noticeable part of a decode layer).
    """
    if "bias" in proj:
        return None  # biased experts: not in the kernels; the mlx backend handles them
    w = proj.get("weight")
    if w is None or w.ndim != 3:
        return None
    if isinstance(proj, SwitchLinear):
        return "float" if w.dtype in FLOAT_DTYPES else None
    if hasattr(proj, "affine") and w.dtype == mx.uint16:  # mlx_moe.q4_0.Q4_0SwitchLinear
        return "q4_0"
    return None  # MLX-quantized (QuantizedSwitchLinear) and anything else


def expert_weights(experts: Experts) -> Tuple[mx.array, mx.array, mx.array]:
    """(gate, up, down) weight arrays, by dict access."""
    return experts["gate_proj"]["weight"], experts["up_proj"]["weight"], experts["down_proj"]["weight"]


def kernels_cover(experts: Experts) -> bool:
    """Whether the GEMV kernels can run this layer's experts at all."""
    g, u, d = (weight_kind(experts[n]) for n in ("gate_proj", "up_proj", "down_proj"))
    if g is None or u is None or d is None or g != u:
        return False
    return experts["gate_proj"]["weight"].dtype == experts["up_proj"]["weight"].dtype


def decode_sized(x: mx.array, ids: mx.array) -> bool:
    """Whether a batch is small enough for the GEMV kernels (and has a float activation)."""
    if x.ndim != 2 or ids.ndim != 2 or x.dtype not in FLOAT_DTYPES:
        return False
    pairs = ids.shape[0] * ids.shape[1]
    return 0 < pairs <= MAX_DECODE_PAIRS


def use_decode_kernels(x: mx.array, ids: mx.array, experts: Experts) -> bool:
    """Whether a batch runs on the GEMV kernels (kernel_path == "mv")."""
    return kernels_cover(experts) and kernel_path(x, ids, weight_kind(experts["gate_proj"])) == "mv"


def use_prefill_kernels(x: mx.array, ids: mx.array, experts: Experts) -> bool:
    """Whether a batch runs on map0 + mul_mm_id (kernel_path == "mm")."""
    return kernels_cover(experts) and kernel_path(x, ids, weight_kind(experts["gate_proj"])) == "mm"


def mv_max_pairs(kind: str) -> int:
    v = MV_MAX_PAIRS.get(kind)
    return MAX_DECODE_PAIRS if v is None else v


def kernel_path(x: mx.array, ids: mx.array, kind: Optional[str]) -> Optional[str]:
    """The rule, in one place: "mv" (mul_mv_id GEMVs) up to mv_max_pairs(kind)
    (token, slot) pairs, "mm" (map0 + mul_mm_id GEMMs) above; None when the
    kernels do not take the batch (not [T, D] x [T, k], not a float activation,
    no pairs, or weights the kernels do not read)."""
    if ids.ndim != 2:
        return None
    return pairs_path(x, ids.shape[0] * ids.shape[1], kind)


def pairs_path(x: mx.array, pairs: int, kind: Optional[str]) -> Optional[str]:
    """kernel_path for `pairs` (token, slot) pairs of x, before any ids exist (the
    routed decode kernel makes them)."""
    if kind is None or x.ndim != 2 or x.dtype not in FLOAT_DTYPES or pairs <= 0:
        return None
    return "mv" if pairs <= mv_max_pairs(kind) else "mm"
