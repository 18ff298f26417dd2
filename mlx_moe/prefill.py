"""Quantized dense projections for long prompts: dequantize once, then one float GEMM.

A model loaded from an mlx-community checkpoint keeps its dense projections
(attention q/k/v/o, routers, shared experts) as MLX affine-quantized
`nn.QuantizedLinear` layers, which run `mx.quantized_matmul` for every batch
size.  For one token that is the right kernel (it reads 4-bit weights); for a
prompt of hundreds of tokens the same weights are multiplied by hundreds of
rows, and a float GEMM on the dequantized weight (tensor cores / cuBLAS on
CUDA) may be much faster than the quantized kernel, for the price of writing
and reading the float weight once (a few tens of microseconds per projection
at Qwen3-30B-A3B shapes on an H100's bandwidth).

`dequantized_prefill(model, min_rows)` switches every such layer to
`DequantizedPrefillLinear`, which takes that path for inputs of at least
`min_rows` rows and the quantized kernel below.  Decode (one row) is never
affected.  It is off by default: whether and from how many rows it pays is
measured by `tools/bench_kernels.py --dense` and
`tools/bench_generate.py --engines ...,mlx-moe+dq` (BENCHMARKS.md), not guessed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class DequantizedPrefillLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose inputs of >= `min_rows` rows take a float GEMM on
    the weight dequantized to the activation dtype (same parameters, same names)."""

    min_rows = 0  # set per instance by `dequantized_prefill`; 0: never

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1] if x.ndim else 0
        if not self.min_rows or rows < self.min_rows or self.mode != "affine":
            return super().__call__(x)
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                          bits=self.bits, mode=self.mode, dtype=x.dtype)
        y = mx.matmul(x, w.T)
        if "bias" in self:
            y = y + self["bias"]
        return y


def dequantized_prefill(model: nn.Module, min_rows: int) -> int:
    """Give the model's `nn.QuantizedLinear` layers the dequantize-then-GEMM path for
    inputs of at least `min_rows` rows (0: back to the quantized kernel everywhere).
    Returns the number of layers switched.  Expert layers (stacked per-expert
    weights, other classes) are not touched."""
    if min_rows < 0:
        raise ValueError(f"min_rows must be >= 0 (0 turns the dense prefill path off), got {min_rows}")
    n = 0
    for _, m in model.named_modules():
        if type(m) in (nn.QuantizedLinear, DequantizedPrefillLinear):
            if min_rows:
                m.__class__ = DequantizedPrefillLinear
                m.min_rows = min_rows
            else:
                m.__class__ = nn.QuantizedLinear
            n += 1
    return n
