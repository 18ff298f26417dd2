"""Dispatch rules for the custom expert kernels, in one place.

- which projection formats and activation dtypes the kernels cover;
- the decode threshold: up to MAX_DECODE_PAIRS (token, slot) pairs per call the
  GEMV kernels (mul_mv_id) run; above it the batch is prefill-like, every
  expert is read for several tokens, and the `mlx` backend's gather GEMMs win
  (a prefill GEMM kernel is a later issue);
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

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


@dataclass(frozen=True)
class Geometry:
    nr: int  # output rows per simdgroup
    nsg: int  # simdgroups per threadgroup (down_combine: slots in flight)


# Gate+up (SwiGLU fused) and the plain per-slot GEMV: a threadgroup owns nr * nsg rows.
GATE_UP = {"q4_0": Geometry(nr=8, nsg=2), "float": Geometry(nr=2, nsg=4)}
# Down + combine: a threadgroup owns nr rows of one token, its simdgroups take the slots.
DOWN = {"q4_0": Geometry(nr=2, nsg=8), "float": Geometry(nr=2, nsg=8)}


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
    """The rule: custom GEMV kernels for decode-sized batches the kernels cover."""
    return decode_sized(x, ids) and kernels_cover(experts)
