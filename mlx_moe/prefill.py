"""How long prompts run: layer by layer on the device, and (optionally) dense
projections as float GEMMs.

Layer-by-layer evaluation
-------------------------
MLX is lazy: a prompt's forward first builds the whole graph on the host (every
decoder layer: ~25-30 nodes; 4.0 ms for Qwen3-30B-A3B's 48 layers and a
512-token prompt on the H100's host, BENCHMARKS.md) and only then evaluates it, so the device idles while Python
builds.  `LAYER_EVAL_MIN_ROWS` > 0 makes each decoder layer start evaluating
its output (`mx.async_eval`) as soon as it is built when the input has at least
that many rows: the device runs layer l while the host builds layer l + 1.
Results are unchanged (the same graph, evaluated in pieces); decode steps (one
row) and traced functions (`mx.compile`, where evaluation is not allowed) are
never affected.  The loader gives every decoder layer this behaviour
(`pipeline_layers`); the setting is read at call time.  On the H100 it made
prefill-512 of the Qwen3-30B-A3B shape 5.5% faster (7,537 vs 7,141 tok/s, every
repetition faster; the host built that prompt's graph in 4.0 ms): on by default
from 64 rows (`tools/bench_generate.py` engine `+nolayereval` turns it off).

Dequantized dense projections
-----------------------------

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
affected.  The loader applies it where it was measured to pay
(`DEQUANTIZED_MIN_ROWS`, per expert backend): on the H100 the Qwen3-30B-A3B
projections cross over between 256 and 384 rows (`tools/bench_kernels.py --dense`:
0.88x at 256, 1.02x at 320, 1.16x at 384, 1.39x at 512, 3.1x at 2048) and a
512-token prefill ran 15% faster (`tools/bench_generate.py` engine `+dq` vs
without; BENCHMARKS.md, 2026-12-06).  Elsewhere (Metal, the CPU) it is off until
measured there; `+nodq` turns it off in the benchmark.  Only half-precision
activations take it (`DEQUANTIZED_DTYPES`: see there why not float32).
"""

from __future__ import annotations

from typing import Dict

import mlx.core as mx
import mlx.nn as nn

# Rows from which a decoder layer evaluates its output as soon as it is built (0: never).
LAYER_EVAL_MIN_ROWS = 64
# Rows from which the loader gives quantized dense projections the dequantize + GEMM path,
# by the name of the model's expert backend (mlx_moe.backends); absent: never.
DEQUANTIZED_MIN_ROWS = {"cuda": 384}
# Activation dtypes that take that path.  Not float32: MLX runs float32 GEMMs on TF32 tensor
# cores by default (MLX_ENABLE_TF32), 3e-4 relative error on the H100 where quantized_matmul
# keeps ~1e-6; a float32 model is one whose user asked for that precision.
DEQUANTIZED_DTYPES = (mx.bfloat16, mx.float16)


def default_dequantized_rows(backend) -> int:
    """The rows from which a model whose experts run on `backend` (an ExpertBackend)
    gets the dequantize + GEMM path by default (DEQUANTIZED_MIN_ROWS; 0: never)."""
    return DEQUANTIZED_MIN_ROWS.get(backend.name, 0)


def _rows(x) -> int:
    return x.size // x.shape[-1] if isinstance(x, mx.array) and x.ndim else 0


class _LayerEval:
    """Mixin of the decoder-layer classes `pipeline_layers` makes: the layer's own
    forward, then `mx.async_eval` of its output for inputs of LAYER_EVAL_MIN_ROWS
    rows or more."""

    def __call__(self, x, *args, **kwargs):
        out = super().__call__(x, *args, **kwargs)
        if LAYER_EVAL_MIN_ROWS and _rows(x) >= LAYER_EVAL_MIN_ROWS:
            try:
                mx.async_eval(out)
            except ValueError:  # inside mx.compile / vmap / grad: nothing may be evaluated there
                pass
        return out


_LAYER_CLASSES: Dict[type, type] = {}


def pipeline_layers(model: nn.Module) -> int:
    """Give each decoder layer of `model` (`model.layers`, mlx-lm's list) the
    layer-by-layer evaluation above, by switching its class to a subclass (its
    parameters and their names stay).  Returns the number of layers."""
    for layer in model.layers:
        cls = type(layer)
        if not issubclass(cls, _LayerEval):
            sub = _LAYER_CLASSES.get(cls)
            if sub is None:
                sub = _LAYER_CLASSES[cls] = type(cls.__name__, (_LayerEval, cls), {"__module__": cls.__module__})
            layer.__class__ = sub
    return len(model.layers)


class DequantizedPrefillLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose inputs of >= `min_rows` rows and a dtype in
    DEQUANTIZED_DTYPES take a float GEMM on the weight dequantized to the
    activation dtype (same parameters, same names)."""

    min_rows = 0  # set per instance by `dequantized_prefill`; 0: never

    def __call__(self, x: mx.array) -> mx.array:
        if (not self.min_rows or _rows(x) < self.min_rows or self.mode != "affine"
                or x.dtype not in DEQUANTIZED_DTYPES):
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
