"""mlx_moe/prefill.py: dense projections of long prompts as dequantize + float GEMM,
against MLX's own mx.quantized_matmul, and end to end on a tiny model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_moe
from mlx_moe.prefill import DequantizedPrefillLinear, dequantized_prefill
from tiny import write_tiny_qwen3


def _quantized(cin, cout, dtype, bias=False, bits=4):
    mx.random.seed(3)
    lin = nn.Linear(cin, cout, bias=bias)
    lin.set_dtype(dtype)
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=bits)
    mx.eval(q.parameters())
    return q


@pytest.mark.parametrize("dtype,bits,bias", [(mx.bfloat16, 4, False), (mx.float16, 8, True), (mx.float32, 4, True)])
def test_long_inputs_match_the_exact_product(dtype, bits, bias):
    """Oracle: the float32 product with the weights MLX dequantizes (mx.dequantize),
    computed with MLX ops.  The dense path must be within the output dtype's
    rounding of it, and no farther from it than mx.quantized_matmul (on the CPU
    the quantized kernel of bf16/fp16 inputs is the less accurate of the two)."""
    q = _quantized(512, 192, dtype, bias, bits)
    x = (mx.random.normal((1, 96, 512)) * 2).astype(dtype)
    w32 = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=bits).astype(mx.float32)
    exact = x.astype(mx.float32) @ w32.T + (q.bias.astype(mx.float32) if bias else 0.0)
    exact = np.array(exact)
    qmm = np.array(q(x).astype(mx.float32))
    dequantized_prefill(q, 64)
    assert isinstance(q, DequantizedPrefillLinear)
    got = q(x)
    assert got.shape == (1, 96, 192) and got.dtype == dtype
    got = np.array(got.astype(mx.float32))
    eps = {mx.bfloat16: 2.0 ** -8, mx.float16: 2.0 ** -11, mx.float32: 2.0 ** -20}[dtype]
    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert err <= 2 * eps
    assert np.abs(got - exact).max() <= 4 * eps * np.abs(exact).max()
    assert err <= np.linalg.norm(qmm - exact) / np.linalg.norm(exact) + eps


def test_short_inputs_keep_the_quantized_kernel_and_switching_back_restores_the_class():
    q = _quantized(256, 64, mx.bfloat16)
    x = mx.random.normal((1, 8, 256)).astype(mx.bfloat16)
    want = q(x)
    dequantized_prefill(q, 64)
    assert mx.array_equal(q(x), want)  # 8 rows < 64: the very same quantized_matmul
    assert dequantized_prefill(q, 0) == 1 and type(q) is nn.QuantizedLinear
    with pytest.raises(ValueError, match="min_rows"):
        dequantized_prefill(q, -1)


def test_generation_with_dense_prefill(tmp_path):
    """Same greedy tokens and the same routing on a tiny model (float32: exact
    enough that the choice cannot flip), with the dense path taken by the prompt."""
    model, tok = mlx_moe.load(str(write_tiny_qwen3(tmp_path)))
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    prompt = list(range(3, 40))
    logs = []
    for rows in (0, 8):
        n = dequantized_prefill(model, rows)
        path = tmp_path / f"log{rows}.csv"
        out = [r.token for r in mlx_moe.stream_generate(model, tok, prompt, max_tokens=6, expert_log=str(path))]
        logs.append((out, path.read_text()))
    assert n > 0  # attention projections, routers, LM head
    assert logs[0] == logs[1]
    dequantized_prefill(model, 0)
