"""GGUF/llama.cpp Q4_0: codec, MLX dequantizer and a stacked-expert projection.

Block format (llama.cpp `block_q4_0`, 18 bytes for 32 weights): a little-endian
fp16 scale `d`, then 16 bytes `qs`.  Weight j < 16 is d * ((qs[j] & 0xF) - 8),
weight j + 16 is d * ((qs[j] >> 4) - 8).

Storage in this package: a Q4_0 matrix [rows, cols] (cols % 32 == 0) is held
as a uint16 array [..., rows, cols / 32 * 9]: the GGUF bytes viewed as
little-endian ushort words.  Word 0 of a block holds d's bits; quant word
k = 1..8 holds the nibbles of weights 2k-2, 2k-1 (bits 0-3, 8-11) and
2k+14, 2k+15 (bits 4-7, 12-15).  Kernels read these words directly and a GGUF
memory map can be used without a copy.  Stacked experts are [E, rows, cols/32*9].

Quantizer rounding (matched bit for bit with `gguf.quants`, which follows
ggml's `quantize_row_q4_0_ref`), all in float32:

    m  = the block's element of largest |x| (the first one on ties), signed
    d  = m / -8                 (float32)
    id = 1 / d, or 0 if d == 0  (float32)
    q  = min(15, uint8(x * id + 8.5))   (float32 multiply, then add, then
                                         truncate toward zero)
    stored scale = fp16(d), round to nearest even

So the extreme element maps to nibble 0 (value -8 * d = m) and the scale is
negative when m is positive.  Decisions at the edges:

- NaN/inf in the input: ValueError naming the tensor, row and column.
- |m| >= 524160 (d rounds to inf in fp16, the block would decode to inf/NaN):
  ValueError; gguf.quants silently writes an infinite scale there.
- All-zero blocks: d = 0 / -8 = -0.0 (bits 0x8000) and every nibble 8, as in
  gguf; a block of -0.0 values stores +0.0.
- Blocks whose |m| < 8 / FLT_MAX (~2.4e-38, float32 subnormals): 1 / d
  overflows, so x * id is +-inf or NaN and ggml's cast to an integer is
  undefined.  We take the same float32 steps and the same numpy cast as
  gguf.quants, so the nibbles equal gguf's on the same platform (x86: 0); they
  do not matter: fp16(d) is 0, so the block decodes to zeros everywhere.

MLX path (`to_mlx_affine`): Q4_0 is affine with group 32, scale d and bias -8d
on unsigned nibbles, so it maps onto MLX's affine 4-bit format without loss.
With float32 scales and biases, mx.dequantize / mx.gather_qmm see exactly the
Q4_0 weights (d * q and 8 * d are exact in float32, and so is their sum).
float16 scales hold d exactly too, but MLX evaluates s * q + b in float16 and
rounds s * q before the add, which is off by up to about 0.01 * |d|; and -8d
overflows float16 when |d| > 8188.  That is why float32 is the default.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

BLOCK = 32  # weights per block
WORDS = 9  # uint16 words per block: d, then 8 quant words
BLOCK_BYTES = 18
# Smallest block max |x| whose scale m / 8 rounds to inf in fp16
# (65520 is the midpoint between fp16 max 65504 and 2**16).
MAX_ABS_LIMIT = 8 * 65520.0

# Blocks quantized per numpy step: ~2 MB of float32 input, so temporaries
# stay small and in cache whatever the tensor size.
_CHUNK_BLOCKS = 1 << 14

ArrayLike = Union[np.ndarray, mx.array]


def q4_0_nbytes(rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] matrix in Q4_0 (18 bytes per 32 weights)."""
    _check_cols(cols)
    return rows * (cols // BLOCK) * BLOCK_BYTES


def _check_cols(cols: int, name: Optional[str] = None) -> None:
    if cols % BLOCK != 0 or cols <= 0:
        what = f"tensor {name!r}" if name else "the tensor"
        raise ValueError(
            f"Q4_0 needs a last dimension that is a positive multiple of {BLOCK}; "
            f"{what} has {cols} columns (pad the columns or keep this tensor in float)"
        )


def _to_float32(w: ArrayLike) -> np.ndarray:
    if isinstance(w, mx.array):
        # numpy has no bfloat16: widen on the MLX side (exact for f16/bf16).
        return np.array(w.astype(mx.float32))
    w = np.asarray(w)
    if w.dtype.kind in "cbOSU":
        raise TypeError(f"Q4_0 quantizes real numbers; got an array of dtype {w.dtype}")
    return w.astype(np.float32, copy=False)


def _position(shape: Tuple[int, ...], block: int, col_in_block: Optional[int]) -> str:
    """Human-readable row index and column of a flat block index."""
    nb = shape[-1] // BLOCK
    row_flat, blk = divmod(block, nb)
    row = np.unravel_index(row_flat, shape[:-1]) if len(shape) > 1 else ()
    row_txt = f"row {tuple(int(i) for i in row)}" if row else "the vector"
    if col_in_block is None:
        return f"{row_txt}, columns {blk * BLOCK}..{blk * BLOCK + BLOCK - 1}"
    return f"{row_txt}, column {blk * BLOCK + col_in_block}"


def _quantize_blocks(x: np.ndarray, out: np.ndarray, first_block: int, shape, name) -> None:
    """Quantize float32 blocks x [n, 32] into out [n, 9] (uint16 words)."""
    n = x.shape[0]
    imax = np.abs(x).argmax(axis=1)  # first maximum, as ggml's strict `<` scan
    m = x[np.arange(n), imax]
    # argmax counts NaN as the maximum and inf is the largest |x|, so a block
    # holding either has a non-finite m: one cheap test covers both.
    if not np.isfinite(m).all():
        b = int(np.flatnonzero(~np.isfinite(m))[0])
        col = int(np.flatnonzero(~np.isfinite(x[b]))[0])
        what = f"tensor {name!r}" if name else "the tensor"
        raise ValueError(
            f"Q4_0 cannot store non-finite values: {what} has {x[b, col]} at "
            f"{_position(shape, first_block + b, col)}; fix or mask the weights before quantizing"
        )
    d = m / np.float32(-8)
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    if np.isinf(d16).any():
        b = int(np.flatnonzero(np.isinf(d16))[0])
        what = f"tensor {name!r}" if name else "the tensor"
        raise ValueError(
            f"Q4_0 scale overflows fp16: {what} has |w| = {abs(float(m[b])):.7g} at "
            f"{_position(shape, first_block + b, None)}; Q4_0 needs every block's max |w| "
            f"< {MAX_ABS_LIMIT:.0f} (scale = max/8 <= 65504). Rescale the tensor or keep it in float"
        )
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    # Two float32 roundings (multiply, then add), like ggml; no fused multiply-add.
    v = x * inv[:, None]
    v += np.float32(8.5)
    # Casting truncates toward zero, as ggml's (int8_t) cast; only blocks with
    # an overflowed 1/d reach the cast with inf/NaN (see the module docstring).
    with np.errstate(invalid="ignore"):
        q = v.astype(np.uint8)
    np.minimum(q, np.uint8(15), out=q)
    qs = (q[:, :16] | (q[:, 16:] << np.uint8(4))).astype(np.uint16)  # GGUF's 16 bytes
    out[:, 0] = d16.view(np.uint16)
    # Little-endian ushort words, built arithmetically so the host's byte order
    # does not matter.
    out[:, 1:] = qs[:, 0::2] | (qs[:, 1::2] << np.uint16(8))


def quantize(w: ArrayLike, name: Optional[str] = None) -> np.ndarray:
    """Quantize float weights [..., cols] to Q4_0 words [..., cols / 32 * 9].

    Bit-exact with `gguf.quants.quantize(w, GGMLQuantizationType.Q4_0)` viewed
    as little-endian uint16 (see the module docstring for the rounding rule).
    The input is first converted to float32, as gguf does (bf16 mx.arrays are
    widened exactly).  `name` is only used in error messages.

    Raises ValueError on NaN/inf, on a block whose scale would overflow fp16,
    or when cols is not a multiple of 32.
    """
    x = _to_float32(w)
    if x.ndim == 0:
        raise ValueError("Q4_0 quantizes arrays of shape [..., cols]; got a scalar")
    _check_cols(x.shape[-1], name)
    shape = x.shape
    blocks = np.ascontiguousarray(x).reshape(-1, BLOCK)
    out = np.empty((blocks.shape[0], WORDS), dtype=np.uint16)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        e = min(s + _CHUNK_BLOCKS, blocks.shape[0])
        _quantize_blocks(blocks[s:e], out[s:e], s, shape, name)
    return out.reshape(*shape[:-1], shape[-1] // BLOCK * WORDS)


def _as_words(q: np.ndarray) -> np.ndarray:
    """Accept our uint16 words or raw GGUF bytes (uint8, 18 per block)."""
    q = np.asarray(q)
    if q.dtype == np.uint8:
        if q.ndim == 0 or q.shape[-1] % BLOCK_BYTES:
            raise ValueError(f"Q4_0 bytes need a last dimension that is a multiple of {BLOCK_BYTES}; got {q.shape}")
        q = np.ascontiguousarray(q).view("<u2").astype(np.uint16)
    if q.dtype != np.uint16:
        raise TypeError(f"Q4_0 data is uint16 words (or uint8 GGUF bytes); got dtype {q.dtype}")
    if q.ndim == 0 or q.shape[-1] % WORDS:
        raise ValueError(f"Q4_0 words need a last dimension that is a multiple of {WORDS}; got shape {q.shape}")
    return q


def dequantize(q: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Q4_0 words [..., nb * 9] -> weights [..., nb * 32] in numpy.

    Computed in float32, where d * (n - 8) is exact, then cast to `dtype`
    (float16 output rounds once and overflows to inf when |8 d| > 65504).
    """
    q = _as_words(q)
    lead, nb = q.shape[:-1], q.shape[-1] // WORDS
    blocks = q.reshape(-1, WORDS)
    out = np.empty((blocks.shape[0], BLOCK), dtype=np.float32)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b = blocks[s : s + _CHUNK_BLOCKS]
        d = b[:, :1].copy().view(np.float16).astype(np.float32)
        words = b[:, 1:]
        o = out[s : s + _CHUNK_BLOCKS]
        o[:, 0:16:2] = words & 0xF
        o[:, 1:16:2] = (words >> 8) & 0xF
        o[:, 16:32:2] = (words >> 4) & 0xF
        o[:, 17:32:2] = words >> 12
        o -= np.float32(8)
        with np.errstate(invalid="ignore"):  # an inf scale times nibble 8 is NaN, as in ggml
            o *= d
    return out.reshape(*lead, nb * BLOCK).astype(dtype, copy=False)


def _check_mx_words(q: mx.array) -> None:
    if q.dtype != mx.uint16:
        raise TypeError(f"Q4_0 data is a uint16 array of words; got {q.dtype}")
    if q.ndim == 0 or q.shape[-1] % WORDS:
        raise ValueError(f"Q4_0 words need a last dimension that is a multiple of {WORDS}; got shape {q.shape}")


def _split_mx(q: mx.array) -> Tuple[mx.array, mx.array]:
    """uint16 words [..., nb*9] -> (d float32 [..., nb], quant words uint32 [..., nb, 8])."""
    _check_mx_words(q)
    blocks = q.reshape(*q.shape[:-1], q.shape[-1] // WORDS, WORDS)
    d = mx.view(blocks[..., 0], mx.float16).astype(mx.float32)
    return d, blocks[..., 1:].astype(mx.uint32)


# For each quant word: shifts giving weights (2k, 2k+1) then (2k+16, 2k+17).
_NIBBLE_SHIFTS = [[[0, 8]], [[4, 12]]]  # [half, 1 (word axis), 2]


def dequantize_mx(q: mx.array, dtype: mx.Dtype = mx.float16) -> mx.array:
    """Q4_0 words [..., nb * 9] (uint16) -> weights [..., nb * 32] with MLX ops.

    Computed in float32 (exact), then cast once to `dtype`.
    """
    d, words = _split_mx(q)
    shifts = mx.array(_NIBBLE_SHIFTS, dtype=mx.uint32)
    # [..., nb, 1, 8, 1] >> [2, 1, 2] -> [..., nb, 2, 8, 2]: index (half, k, j)
    # is weight 16 * half + 2k + j, so a reshape puts the 32 weights in order.
    n = (words[..., None, :, None] >> shifts) & 0xF
    n = n.reshape(*n.shape[:-3], BLOCK).astype(mx.float32) - 8.0
    w = n * d[..., None]
    return w.reshape(*q.shape[:-1], -1).astype(dtype)


def to_mlx_affine(
    q: ArrayLike, dtype: mx.Dtype = mx.float32
) -> Tuple[mx.array, mx.array, mx.array]:
    """Map Q4_0 words [..., rows, nb*9] onto MLX's affine 4-bit, group 32 format.

    Returns (wq uint32 [..., rows, nb*4], scales [..., rows, nb],
    biases [..., rows, nb]) with scales = d and biases = -8 d, for
    mx.dequantize / mx.quantized_matmul / mx.gather_qmm with group_size=32,
    bits=4.  MLX packs 8 consecutive 4-bit values per uint32, lowest bits
    first, so uint32 words 0-1 of a block hold Q4_0's low nibbles (weights
    0-15) and words 2-3 its high nibbles (weights 16-31).

    dtype float32 (default) is exact.  float16 stores d and -8 d exactly
    (ValueError when |d| > 8188 would overflow -8 d) but MLX's float16
    arithmetic then rounds d * q before adding the bias; bfloat16 cannot hold
    d and is refused.
    """
    if not isinstance(q, mx.array):
        q = mx.array(_as_words(q))
    if dtype not in (mx.float32, mx.float16):
        raise ValueError(f"Q4_0 scales need float32 (exact) or float16; got {dtype}")
    d, words = _split_mx(q)
    # Per quant word, the byte of two low nibbles (weights 2k, 2k+1) and the
    # byte of two high nibbles (weights 2k+16, 2k+17), as MLX orders them.
    lo = (words & 0xF) | ((words >> 4) & 0xF0)
    hi = ((words >> 4) & 0xF) | ((words >> 8) & 0xF0)
    byte_shifts = mx.array([0, 8, 16, 24], dtype=mx.uint32)
    packed = mx.concatenate([lo, hi], axis=-1)  # [..., nb, 16] bytes in order
    packed = packed.reshape(*packed.shape[:-1], 4, 4) << byte_shifts
    # The four bytes occupy disjoint bits, so the sum is their bitwise or.
    packed = packed.sum(axis=-1).astype(mx.uint32)
    wq = packed.reshape(*q.shape[:-1], -1)
    if dtype == mx.float16:
        if mx.any(mx.abs(d) > 8188.0).item():
            raise ValueError(
                "Q4_0 scale too large for float16 biases (|d| > 8188 makes -8d overflow); use dtype=mx.float32"
            )
    scales = d.astype(dtype)
    biases = (d * -8.0).astype(dtype)
    return wq, scales, biases


class _AffineCache:
    """Plain holder, so nn.Module keeps it out of parameters() and save_weights."""

    def __init__(self, source: mx.array, triplet: Tuple[mx.array, mx.array, mx.array]):
        self.source = source
        self.triplet = triplet


class Q4_0SwitchLinear(nn.Module):
    """Stacked expert projection with Q4_0 weights.

    Holds `weight`, uint16 [num_experts, output_dims, input_dims / 32 * 9]
    (GGUF's Q4_0 bytes as words, the layout the custom kernels read), and an
    optional float `bias` [num_experts, output_dims].  Calling it has the
    semantics of mlx-lm's SwitchLinear / QuantizedSwitchLinear, so it can
    stand in for either.

    Memory: the Q4_0 weight costs 4.5 bits per weight.  The `mlx` backend
    runs on MLX's affine format, so `affine()` makes an exact copy on first
    use (uint32 nibbles plus float32 scales and biases: 6 bits per weight)
    and keeps it, alongside the Q4_0 weight, until the weight is replaced.
    Kernel backends read `weight` directly and never make that copy.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        _check_cols(input_dims)
        # Zero words decode to zero weights; real weights arrive by load_weights.
        self.weight = mx.zeros((num_experts, output_dims, input_dims // BLOCK * WORDS), dtype=mx.uint16)
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self._affine_cache: Optional[_AffineCache] = None
        self.freeze()

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def input_dims(self) -> int:
        return self.weight.shape[2] // WORDS * BLOCK

    def affine(self) -> Tuple[mx.array, mx.array, mx.array]:
        """The exact MLX affine triplet (wq, scales, biases) of `weight`; cached."""
        weight = self["weight"]
        cache = self._affine_cache
        if cache is None or cache.source is not weight:
            triplet = to_mlx_affine(weight)
            mx.eval(*triplet)
            self._affine_cache = cache = _AffineCache(weight, triplet)
        return cache.triplet

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        wq, scales, biases = self.affine()
        y = mx.gather_qmm(
            x, wq, scales, biases, rhs_indices=indices, transpose=True,
            group_size=BLOCK, bits=4, sorted_indices=sorted_indices,
        )
        # float32 scales promote the product; return x's dtype like SwitchLinear.
        y = y.astype(x.dtype)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2).astype(y.dtype)
        return y

    @classmethod
    def from_float(
        cls, weight: ArrayLike, bias: Optional[ArrayLike] = None, name: Optional[str] = None
    ) -> "Q4_0SwitchLinear":
        """Quantize float expert weights [num_experts, output_dims, input_dims]."""
        if len(weight.shape) != 3:
            raise ValueError(
                f"expert weights are [num_experts, output_dims, input_dims]; got shape {tuple(weight.shape)}"
            )
        e, out_dims, in_dims = (int(s) for s in weight.shape)
        _check_cols(in_dims, name)
        layer = cls(in_dims, out_dims, e, bias=bias is not None)
        layer.weight = mx.array(quantize(weight, name=name))
        if bias is not None:
            layer.bias = mx.array(bias) if not isinstance(bias, mx.array) else bias
        return layer

    def dequantized(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The float weights [num_experts, output_dims, input_dims]."""
        return dequantize_mx(self["weight"], dtype)


__all__ = [
    "BLOCK",
    "WORDS",
    "BLOCK_BYTES",
    "MAX_ABS_LIMIT",
    "q4_0_nbytes",
    "quantize",
    "dequantize",
    "dequantize_mx",
    "to_mlx_affine",
    "Q4_0SwitchLinear",
]
