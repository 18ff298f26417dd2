"""Q4_0 codec and Q4_0SwitchLinear against independent oracles.

Oracles: gguf.quants (the reference quantizer/dequantizer of the gguf
package, following ggml), a per-byte pure-Python decoder written from the
block spec, MLX's own mx.dequantize / quantized_matmul / gather_qmm /
gather_mm, and mlx-lm's SwitchGLU.
"""

from __future__ import annotations

import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_moe import q4_0
from mlx_moe.q4_0 import Q4_0SwitchLinear

Q4_0 = GGMLQuantizationType.Q4_0
F32_BELOW_LIMIT = np.nextafter(np.float32(524160.0), np.float32(0))


# ---------------------------------------------------------------- oracles


def gguf_words(x: np.ndarray) -> np.ndarray:
    """gguf's Q4_0 bytes, read as little-endian uint16 words."""
    with np.errstate(all="ignore"):  # gguf warns on 1/d overflow for tiny blocks
        return gq.quantize(np.asarray(x), Q4_0).view("<u2")


def gguf_dequant(words: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # inf * 0 for infinite d
        return gq.dequantize(np.ascontiguousarray(words.astype("<u2")).view(np.uint8), Q4_0)


def decode_block_bytes(raw: bytes) -> list:
    """One 18-byte block -> 32 floats, straight from the llama.cpp spec."""
    (d,) = struct.unpack("<e", raw[:2])
    qs = raw[2:]
    lo = [d * ((qs[j] & 0x0F) - 8) for j in range(16)]
    hi = [d * ((qs[j] >> 4) - 8) for j in range(16)]
    return lo + hi


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    """Bitwise equality of float32 arrays, NaN payloads aside."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert a.shape == b.shape
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(nan_a, nan_b)
    ok = (a.view(np.uint32) == b.view(np.uint32)) | nan_a
    assert ok.all(), f"{(~ok).sum()} values differ, first at {np.argwhere(~ok)[0]}"


def assert_words_equal(ours: np.ndarray, ref: np.ndarray, x: np.ndarray) -> None:
    assert ours.dtype == np.uint16 and ours.shape == ref.shape
    bad = np.flatnonzero((ours.reshape(-1, 9) != ref.reshape(-1, 9)).any(axis=1))
    if bad.size:
        b = int(bad[0])
        pytest.fail(
            f"{bad.size} blocks differ; first block {b}: input {x.reshape(-1, 32)[b].tolist()} "
            f"ours {ours.reshape(-1, 9)[b].tolist()} gguf {ref.reshape(-1, 9)[b].tolist()}"
        )


def f16_bits(v: float) -> int:
    return int(np.array([v], np.float16).view(np.uint16)[0])


def random_words(rng, blocks_shape, d_values=None) -> np.ndarray:
    """Random Q4_0 words [..., nb*9] for blocks_shape [..., nb]; d from d_values or any finite fp16."""
    *lead, nb = blocks_shape
    w = rng.integers(0, 1 << 16, size=(*lead, nb, 9), dtype=np.uint16)
    if d_values is None:
        d = w[..., 0]
        d[(d & 0x7C00) == 0x7C00] &= 0x83FF  # inf/NaN exponent -> finite
    else:
        w[..., 0] = rng.choice(np.asarray(d_values, np.float16), size=(*lead, nb)).view(np.uint16)
    return w.reshape(*lead, nb * 9)


def mixed_blocks(rng, n: int) -> np.ndarray:
    """n float32 blocks mixing scales and the quantizer's edge cases."""
    kinds = rng.integers(0, 12, size=n)
    x = rng.standard_normal((n, 32)).astype(np.float32)
    # log-uniform magnitude, 2^-40 .. 2^15 (max |x| stays under the fp16 limit)
    scale = np.exp2(rng.uniform(-40, 15, size=(n, 1))).astype(np.float32)
    out = x * scale

    def pick(k):
        return np.flatnonzero(kinds == k)

    # 1: uniform values
    i = pick(1)
    out[i] = rng.uniform(-1, 1, (i.size, 32)).astype(np.float32) * scale[i]
    # 2: exact rounding ties: d = +-2^e, extreme -8d, others (n - 8.5) d or (n - 8) d
    i = pick(2)
    d = (np.exp2(rng.integers(-20, 12, (i.size, 1))) * rng.choice([-1, 1], (i.size, 1))).astype(np.float32)
    steps = rng.integers(1, 17, (i.size, 32)) - rng.choice([8.5, 8.0], (i.size, 32))
    blk = (steps * d).astype(np.float32)
    blk[np.arange(i.size), rng.integers(0, 32, i.size)] = -8 * d[:, 0]
    out[i] = blk
    # 3: the same ties, nudged one float32 ulp either way
    i = pick(3)
    d = np.exp2(rng.integers(-20, 12, (i.size, 1))).astype(np.float32)
    blk = ((rng.integers(1, 17, (i.size, 32)) - 8.5) * d).astype(np.float32)
    direction = rng.choice([-np.inf, np.inf], (i.size, 32)).astype(np.float32)
    blk = np.nextafter(blk, direction)
    blk[np.arange(i.size), rng.integers(0, 32, i.size)] = 8 * d[:, 0]
    out[i] = blk
    # 4: all zero, with both signs of zero
    i = pick(4)
    out[i] = np.where(rng.random((i.size, 32)) < 0.5, np.float32(0.0), np.float32(-0.0))
    i = i[: i.size // 4]
    out[i] = np.float32(-0.0)  # a block of only -0.0
    # 5: a single nonzero value
    i = pick(5)
    out[i] = 0.0
    out[i, rng.integers(0, 32, i.size)] = (rng.standard_normal(i.size) * scale[i, 0]).astype(np.float32)
    # 6: the largest |x| with both signs, in random order (first occurrence wins)
    i = pick(6)
    pos = np.argsort(rng.random((i.size, 32)), axis=1)[:, :2]
    m = (np.abs(out[i]).max(axis=1) * 1.5).astype(np.float32)
    out[i, pos[:, 0]] = m
    out[i, pos[:, 1]] = -m
    # 7: near and at the largest accepted magnitude, and +-65504
    i = pick(7)
    top = rng.choice(np.array([F32_BELOW_LIMIT, 524032.0, 65504.0, 5.2e5, 5.24e5], np.float32), i.size)
    out[i] = np.clip(out[i] / scale[i] * top[:, None] / 4, -top[:, None], top[:, None])
    out[i, rng.integers(0, 32, i.size)] = top * rng.choice([-1, 1], i.size)
    # 8: fp16-subnormal d (|max| / 8 in 2^-24 .. 2^-14)
    i = pick(8)
    out[i] = x[i] / np.abs(x[i]).max(axis=1, keepdims=True) * np.exp2(rng.uniform(-21, -11, (i.size, 1)))
    # 9: d below the fp16 subnormals (stores 0 or the smallest subnormal)
    i = pick(9)
    out[i] = x[i] / np.abs(x[i]).max(axis=1, keepdims=True) * np.exp2(rng.uniform(-32, -21, (i.size, 1)))
    # 10: float32 subnormal inputs, where 1/d overflows
    i = pick(10)
    out[i] = (x[i] * np.float32(1e-39)).astype(np.float32)
    # 11: integer-valued blocks on the Q4_0 grid
    i = pick(11)
    out[i] = (rng.integers(-8, 8, (i.size, 32)) * scale[i]).astype(np.float32)
    return out.astype(np.float32)


# ---------------------------------------------------------------- quantize


def test_quantize_bit_exact_with_gguf_on_a_million_mixed_blocks():
    rng = np.random.default_rng(20240604)
    n = 1 << 20  # 1,048,576 blocks
    x = mixed_blocks(rng, n).reshape(1024, 1024 * 32)
    assert_words_equal(q4_0.quantize(x), gguf_words(x), x)


@pytest.mark.parametrize("shape", [(32,), (3, 64), (2, 3, 4, 96)])
def test_quantize_shapes_and_input_dtypes(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    for arr in (x, x.astype(np.float16), x.astype(np.float64) * 1.0000001):
        ours = q4_0.quantize(arr)
        assert ours.shape == (*shape[:-1], shape[-1] // 32 * 9)
        assert_words_equal(ours, gguf_words(arr), arr)


def test_quantize_accepts_bfloat16_mx_arrays():
    w = mx.random.normal((4, 128), key=mx.random.key(0)).astype(mx.bfloat16)
    widened = np.array(w.astype(mx.float32))
    assert_words_equal(q4_0.quantize(w), gguf_words(widened), widened)


def test_quantize_hand_derived_blocks():
    zero = q4_0.quantize(np.zeros(32, np.float32))
    # d = 0 / -8 = -0.0 (fp16 bits 0x8000); every nibble 8
    assert zero.tolist() == [0x8000] + [0x8888] * 8
    negzero = q4_0.quantize(np.full(32, -0.0, np.float32))
    assert negzero.tolist() == [0x0000] + [0x8888] * 8
    x = np.zeros(32, np.float32)
    x[5] = 3.0  # d = -0.375; the 3.0 maps to nibble 0, zeros to 8
    words = q4_0.quantize(x)
    expect = [f16_bits(-0.375)] + [0x8888] * 8
    expect[1 + 5 // 2] = 0x8088  # byte 5 = high byte of quant word 2; its low nibble is 0
    assert words.tolist() == expect
    # max-abs ties: the first occurrence gives the sign of d
    y = np.zeros(32, np.float32)
    y[[3, 20]] = [-2.0, 2.0]
    assert q4_0.quantize(y)[0] == f16_bits(0.25)
    y[[3, 20]] = [2.0, -2.0]
    assert q4_0.quantize(y)[0] == f16_bits(-0.25)


def test_quantize_largest_accepted_magnitude_matches_gguf():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32) * 1000
    x[0, 7] = F32_BELOW_LIMIT
    x[1, 30] = -F32_BELOW_LIMIT
    ours = q4_0.quantize(x)
    assert_words_equal(ours, gguf_words(x), x)
    assert np.isfinite(q4_0.dequantize(ours)).all()
    # d = 65519.99... rounds down to fp16 65504, so the extreme decodes to 8 * 65504
    assert q4_0.dequantize(ours)[0, 7] == 524032.0
    assert q4_0.dequantize(ours)[1, 30] == -524032.0


@pytest.mark.parametrize("big", [524160.0, 6e5, 3.0e38])
def test_quantize_rejects_fp16_scale_overflow(big):
    x = np.zeros((2, 64), np.float32)
    x[1, 40] = -big
    # gguf writes an infinite scale here: the block would decode to inf/NaN
    ref_d = gguf_words(x).reshape(-1, 9)[3, 0]
    assert ref_d & 0x7FFF == 0x7C00
    with pytest.raises(ValueError, match=r"'blk\.0\.w'.*row \(1,\), columns 32\.\.63.*Rescale"):
        q4_0.quantize(x, name="blk.0.w")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite(bad):
    x = np.ones((2, 3, 64), np.float32)
    x[1, 2, 45] = bad
    with pytest.raises(ValueError, match=r"non-finite.*'experts\.up'.*row \(1, 2\), column 45"):
        q4_0.quantize(x, name="experts.up")
    with pytest.raises(ValueError, match="non-finite"):
        q4_0.quantize(x)


def test_quantize_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="multiple of 32.*'t'.*40 columns"):
        q4_0.quantize(np.zeros((2, 40), np.float32), name="t")
    with pytest.raises(ValueError, match="scalar"):
        q4_0.quantize(np.float32(1.0))
    with pytest.raises(TypeError, match="complex"):
        q4_0.quantize(np.zeros(32, np.complex64))


def test_q4_0_nbytes():
    for rows, cols in [(1, 32), (768, 2048), (2048, 768), (7, 4096)]:
        expect = int(np.prod(gq.quant_shape_to_byte_shape((rows, cols), Q4_0)))
        assert q4_0.q4_0_nbytes(rows, cols) == expect
        assert q4_0.quantize(np.zeros((rows, cols), np.float32)).nbytes == expect
    with pytest.raises(ValueError, match="multiple of 32"):
        q4_0.q4_0_nbytes(4, 48)


# ---------------------------------------------------------------- dequantize


def test_dequantize_matches_gguf_on_every_bit_pattern():
    rng = np.random.default_rng(2)
    words = rng.integers(0, 1 << 16, size=(64, 512 * 9), dtype=np.uint16)  # incl. inf/NaN d
    assert_same_bits(q4_0.dequantize(words), gguf_dequant(words))
    # uint8 GGUF bytes are accepted as they are
    raw = np.ascontiguousarray(words.astype("<u2")).view(np.uint8)
    assert_same_bits(q4_0.dequantize(raw), gguf_dequant(words))


def test_dequantize_matches_per_byte_spec_decoder():
    rng = np.random.default_rng(3)
    words = random_words(rng, (5, 4))
    raw = np.ascontiguousarray(words.astype("<u2")).tobytes()
    spec = [v for b in range(20) for v in decode_block_bytes(raw[18 * b : 18 * b + 18])]
    assert_same_bits(q4_0.dequantize(words).ravel(), np.array(spec, np.float32))


def test_quantize_dequantize_round_trip_error_bound():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    back = q4_0.dequantize(q4_0.quantize(x)).reshape(-1, 32)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    # step is amax/8; nearest rounding, plus fp16 scale rounding and the clip at +8
    assert (np.abs(back - x.reshape(-1, 32)) <= amax / 8 * 0.5 * 1.01 + 1e-6).mean() > 0.99
    assert (np.abs(back - x.reshape(-1, 32)) <= amax / 8 * 1.01).all()


# ---------------------------------------------------------------- MLX


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_dequantize_mx_matches_numpy(dtype):
    rng = np.random.default_rng(5)
    words = rng.integers(0, 1 << 16, size=(3, 7, 6 * 9), dtype=np.uint16)
    ref32 = q4_0.dequantize(words)
    got = q4_0.dequantize_mx(mx.array(words), dtype)
    assert got.dtype == dtype and got.shape == (3, 7, 6 * 32)
    if dtype == mx.float32:
        assert_same_bits(np.array(got), ref32)
    else:  # one rounding of the exact value
        expect = mx.array(ref32).astype(dtype)
        assert_same_bits(np.array(got.astype(mx.float32)), np.array(expect.astype(mx.float32)))
    if dtype == mx.float16:
        with np.errstate(over="ignore"):
            assert_same_bits(np.array(got.astype(mx.float32)), ref32.astype(np.float16).astype(np.float32))


def test_dequantize_mx_rejects_wrong_input():
    with pytest.raises(TypeError, match="uint16"):
        q4_0.dequantize_mx(mx.zeros((2, 9), dtype=mx.uint32))
    with pytest.raises(ValueError, match="multiple of 9"):
        q4_0.dequantize_mx(mx.zeros((2, 10), dtype=mx.uint16))


EXTREME_D = [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 6.1e-5, 0.0123, -7.5, 8188.0]


def test_to_mlx_affine_is_exact_under_mx_dequantize():
    rng = np.random.default_rng(6)
    for words in (random_words(rng, (4, 16, 8)), random_words(rng, (16, 8), EXTREME_D)):
        wq, scales, biases = q4_0.to_mlx_affine(mx.array(words))
        nb = words.shape[-1] // 9
        assert wq.dtype == mx.uint32 and wq.shape == (*words.shape[:-1], nb * 4)
        assert scales.dtype == mx.float32 and scales.shape == (*words.shape[:-1], nb)
        got = np.array(mx.dequantize(wq, scales, biases, group_size=32, bits=4))
        # equal as values: MLX's d*q + (-8d) gives +0 where d*(q-8) is -0 for d < 0
        np.testing.assert_array_equal(got, q4_0.dequantize(words))


def test_to_mlx_affine_matches_mx_quantize_on_grid_weights():
    # Weights already on an affine grid: MLX's own quantizer must find the same nibbles.
    rng = np.random.default_rng(7)
    n = rng.integers(0, 16, size=(8, 64))
    d = np.float32(0.5)
    w = (d * (n - 8)).astype(np.float32)
    w[:, ::32] = -8 * d  # pin each group's min at -8d and max at +7d
    w[:, 1::32] = 7 * d
    n[:, ::32], n[:, 1::32] = 0, 15
    wq_mlx, s_mlx, b_mlx = mx.quantize(mx.array(w), group_size=32, bits=4)
    np.testing.assert_array_equal(np.array(s_mlx), 0.5)
    np.testing.assert_array_equal(np.array(b_mlx), -4.0)
    words = q4_0.quantize(w)
    wq, _, _ = q4_0.to_mlx_affine(words)
    np.testing.assert_array_equal(np.array(wq), np.array(wq_mlx))


def test_to_mlx_affine_float16_option():
    rng = np.random.default_rng(8)
    words = random_words(rng, (6, 4), [0.25, -3.5, 1e-3, 8188.0])
    _, scales, biases = q4_0.to_mlx_affine(words, dtype=mx.float16)
    d16 = words.reshape(6, 4, 9)[..., 0].view(np.float16)
    np.testing.assert_array_equal(np.array(scales), d16)  # the mapping itself is lossless
    np.testing.assert_array_equal(np.array(biases), -8 * d16.astype(np.float32))
    big = random_words(rng, (2, 1), [8192.0])
    with pytest.raises(ValueError, match="float32"):
        q4_0.to_mlx_affine(big, dtype=mx.float16)
    with pytest.raises(ValueError, match="float32"):
        q4_0.to_mlx_affine(words, dtype=mx.bfloat16)


def grid_friendly_words(rng, blocks_shape) -> np.ndarray:
    """Words with power-of-two d, so small-integer activations give exact sums."""
    return random_words(rng, blocks_shape, [0.125, -0.25, 0.5, 1.0, -2.0, 4.0])


def test_quantized_matmul_on_affine_equals_float_matmul_exactly():
    rng = np.random.default_rng(9)
    words = grid_friendly_words(rng, (48, 8))
    x = mx.array(rng.integers(-3, 4, size=(5, 256)).astype(np.float32))
    wq, s, b = q4_0.to_mlx_affine(words)
    got = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=4)
    ref = x @ mx.array(q4_0.dequantize(words)).T
    np.testing.assert_array_equal(np.array(got), np.array(ref))


# ---------------------------------------------------------------- Q4_0SwitchLinear


def test_switch_linear_properties_parameters_and_cache():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((4, 48, 96)).astype(np.float32)
    layer = Q4_0SwitchLinear.from_float(w)
    assert (layer.num_experts, layer.output_dims, layer.input_dims) == (4, 48, 96)
    assert layer.weight.dtype == mx.uint16 and layer.weight.shape == (4, 48, 27)
    np.testing.assert_array_equal(np.array(layer.weight), q4_0.quantize(w))
    # only the Q4_0 words are parameters: the affine copy is not saved or counted
    names = [k for k, _ in nn.utils.tree_flatten(layer.parameters())]
    assert names == ["weight"]
    assert layer.trainable_parameters() == {}
    first = layer.affine()
    assert layer.affine() is first
    layer.load_weights([("weight", mx.array(q4_0.quantize(w * 2)))])
    second = layer.affine()
    assert second is not first
    np.testing.assert_array_equal(
        np.array(mx.dequantize(*second, group_size=32, bits=4)), q4_0.dequantize(q4_0.quantize(w * 2))
    )
    with pytest.raises(ValueError, match="multiple of 32"):
        Q4_0SwitchLinear(40, 8, 2)


def test_switch_linear_exact_against_gather_mm():
    rng = np.random.default_rng(11)
    layer = Q4_0SwitchLinear(128, 40, 6)
    words = grid_friendly_words(rng, (6, 40, 4))
    layer.weight = mx.array(words)
    w_float = mx.array(q4_0.dequantize(words))
    x = mx.array(rng.integers(-3, 4, size=(7, 1, 1, 128)).astype(np.float32))
    idx = mx.array(rng.integers(0, 6, size=(7, 3)).astype(np.uint32))
    got = layer(x, idx)
    ref = mx.gather_mm(x, w_float.swapaxes(-1, -2), rhs_indices=idx)
    assert got.shape == (7, 3, 1, 40)
    np.testing.assert_array_equal(np.array(got), np.array(ref))
    # sorted path: one row per (token, slot) pair, ids ascending
    order = np.argsort(np.array(idx).ravel(), kind="stable")
    xs = x.reshape(7, 1, 128)[mx.array(order // 3)]
    ids = mx.array(np.array(idx).ravel()[order])
    got_s = layer(xs, ids, sorted_indices=True)
    ref_s = mx.gather_mm(xs, w_float.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True)
    np.testing.assert_array_equal(np.array(got_s), np.array(ref_s))
    # a prefill-sized batch (MLX's tiled GEMM paths); the data stay exact even in TF32
    xb = mx.array(rng.integers(-3, 4, size=(64, 1, 1, 128)).astype(np.float32))
    idb = mx.array(rng.integers(0, 6, size=(64, 4)).astype(np.uint32))
    ref_b = mx.gather_mm(xb, w_float.swapaxes(-1, -2), rhs_indices=idb)
    np.testing.assert_array_equal(np.array(layer(xb, idb)), np.array(ref_b))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_switch_linear_random_weights_and_bias(dtype):
    rng = np.random.default_rng(12)
    w = rng.standard_normal((5, 24, 64)).astype(np.float32) * 0.1
    bias = rng.standard_normal((5, 24)).astype(np.float32)
    layer = Q4_0SwitchLinear.from_float(mx.array(w), bias=mx.array(bias))
    x = mx.array(rng.standard_normal((9, 1, 1, 64)).astype(np.float32)).astype(dtype)
    idx = mx.array(rng.integers(0, 5, size=(9, 2)).astype(np.uint32))
    got = layer(x, idx)
    assert got.dtype == dtype and got.shape == (9, 2, 1, 24)
    w_float = mx.array(q4_0.dequantize(q4_0.quantize(w)))
    ref = mx.gather_mm(x.astype(mx.float32), w_float.swapaxes(-1, -2), rhs_indices=idx)
    ref = ref + mx.expand_dims(mx.array(bias)[idx], -2)
    tol = 1e-5 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref), rtol=tol, atol=tol)


def test_switch_linear_stands_in_for_mlx_lm_switch_layers():
    # On the CPU: fp32 matmuls on a GPU may run in TF32 on one side only.
    with mx.stream(mx.cpu):
        _check_switch_glu_stand_in()


def _check_switch_glu_stand_in():
    rng = np.random.default_rng(13)
    hidden, ffn, n_exp = 64, 96, 8
    ref = SwitchGLU(hidden, ffn, n_exp)
    q = SwitchGLU(hidden, ffn, n_exp)
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = getattr(ref, name)
        w = rng.standard_normal(proj.weight.shape).astype(np.float32) * 0.2
        qproj = Q4_0SwitchLinear.from_float(w, name=name)
        setattr(q, name, qproj)
        proj.weight = qproj.dequantized(mx.float32)  # float model with exactly the Q4_0 weights
    x = mx.array(rng.standard_normal((3, 12, hidden)).astype(np.float32))
    idx = mx.array(rng.integers(0, n_exp, size=(3, 12, 4)).astype(np.uint32))  # 144 pairs: sorted path
    np.testing.assert_allclose(np.array(q(x, idx)), np.array(ref(x, idx)), rtol=1e-4, atol=1e-5)
    idx1 = idx[:1, :1]  # decode-sized: unsorted path
    np.testing.assert_allclose(np.array(q(x[:1, :1], idx1)), np.array(ref(x[:1, :1], idx1)), rtol=1e-4, atol=1e-5)


def test_from_float_rejects_bad_input():
    with pytest.raises(ValueError, match="num_experts, output_dims, input_dims"):
        Q4_0SwitchLinear.from_float(np.zeros((4, 64), np.float32))
    w = np.zeros((2, 4, 64), np.float32)
    w[1, 3, 10] = np.nan
    with pytest.raises(ValueError, match=r"'mlp\.up'.*row \(1, 3\), column 10"):
        Q4_0SwitchLinear.from_float(w, name="mlp.up")
