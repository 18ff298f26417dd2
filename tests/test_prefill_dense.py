"""mlx_moe/prefill.py: dense projections of long prompts as dequantize + float GEMM,
against MLX's own mx.quantized_matmul, and end to end on a tiny model."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_moe
from mlx_moe import prefill
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
def test_long_inputs_match_the_exact_product(dtype, bits, bias, monkeypatch):
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
    monkeypatch.setattr(prefill, "DEQUANTIZED_DTYPES", (mx.bfloat16, mx.float16, mx.float32))  # float32: opt-in
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


def test_float32_inputs_keep_the_quantized_kernel():
    # MLX's float32 GEMM is a TF32 one by default on CUDA: float32 prompts stay on quantized_matmul.
    q = _quantized(256, 64, mx.float32)
    x = mx.random.normal((1, 96, 256))
    want = q(x)
    dequantized_prefill(q, 64)
    assert mx.array_equal(q(x), want)


def _quantized_checkpoint(path):
    """The tiny Qwen3-MoE as an mlx-community style 8-bit checkpoint (config "quantization")."""
    model, _ = mlx_moe.load(str(write_tiny_qwen3(path)))
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    mx.save_safetensors(str(path / "model.safetensors"), dict(nn.utils.tree_flatten(model.parameters())))
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 8}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_loader_applies_the_backend_default(tmp_path, monkeypatch):
    # prefill.DEQUANTIZED_MIN_ROWS, by the expert backend's name: the loader switches every
    # quantized dense projection; a backend it does not name keeps them all quantized.
    path = _quantized_checkpoint(tmp_path)
    monkeypatch.setattr(prefill, "DEQUANTIZED_MIN_ROWS", {"mlx": 24})
    model, _ = mlx_moe.load(str(path), kernels="mlx")
    dense = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert dense and all(type(m) is DequantizedPrefillLinear and m.min_rows == 24 for m in dense)
    monkeypatch.setattr(prefill, "DEQUANTIZED_MIN_ROWS", {"cuda": 24})
    model, _ = mlx_moe.load(str(path), kernels="mlx")
    assert all(type(m) is nn.QuantizedLinear for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear))


def test_generation_with_dense_prefill(tmp_path, monkeypatch):
    """Same greedy tokens and the same routing on a tiny model (float32, opted in: exact
    enough that the choice cannot flip), with the dense path taken by the prompt."""
    monkeypatch.setattr(prefill, "DEQUANTIZED_DTYPES", (mx.float32,))
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
