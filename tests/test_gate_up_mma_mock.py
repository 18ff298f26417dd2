"""The decode MoE layer's gate/up tile on the tensor cores (moe_gate_up_mma<true>,
metal/mul_mv_id_cuda.h: mul_mv_id_moe's stage bit 32) on the CPU, through the CUDA mock
of tests/cuda_mock.py (g++, one OS thread per CUDA thread, mma.m16n8k16 bf16 and the
nibble conversion as warp-collective C++ following the PTX ISA's fragment layouts),
against numpy over the dequantized Q4_0 rows (the codec of mlx_moe.q4_0, itself checked
against the gguf package's quantizer): h = silu(Wg x) * (Wu x).

What it checks: the fragment index math (which bytes of which staged row, which x pairs,
which accumulator holds which row), x's copy into threadgroup memory (copy_x), the padded
row pitch, the warps' meeting in threadgroup memory and a ragged last tile (fewer rows
stored).  Speed is the H100's business.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from cuda_mock import CXX, bf16_bits, build_decode_tile
from mlx_moe import q4_0

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed")


DRIVER = r"""
// argv: D, nrows, stage file (16 rows of RW + 8 ushorts), x file (D bf16 bits), out file (8 floats),
// W32 (0 or 1: stage bit 1024, the word-at-a-time conversion and finish_x's copy of x),
// XDEV (0 or 1: stage bit 8192, x read where it lies, no copy)
template <int D, bool W32>
int run(int nrows, const char* sp, const char* xp, const char* op, bool xdev) {
  constexpr int RW = D / 32 * 9 + 8;  // a staged row and its 16 bytes of padding, in ushorts
  std::vector<char> st = mock_read(sp), xs = mock_read(xp);
  std::vector<float> h(8, -12345.0f);
  static float red[MOCK_NSG * 16];
  alignas(16) static uint4 xcopy[D / 8 + D / 128];  // the copy of x (copy_x, as the kernel makes it), its block sums
  const ushort* stage = reinterpret_cast<const ushort*>(st.data());
  const ushort* x = reinterpret_cast<const ushort*>(xs.data());
  float* hp = h.data();
  mock_launch(1, 1, 32 * MOCK_NSG, [&] {
    if (xdev) {
      moe_gate_up_mma<true>::run<D, MOCK_NSG, RW, false>(x, stage, hp, red, nrows, threadIdx.x >> 5, threadIdx.x & 31u,
                                                         threadIdx.x);
      return;
    }
    moe_gate_up_mma<true>::copy_x<D, 32 * MOCK_NSG>(xcopy, x, threadIdx.x);
    moe_gate_up_mma<true>::wait_x();
    moe_gate_up_mma<true>::finish_x<D, 32 * MOCK_NSG, W32>(xcopy, threadIdx.x);
    __syncthreads();
    moe_gate_up_mma<true>::run<D, MOCK_NSG, RW, W32>(reinterpret_cast<const ushort*>(xcopy), stage, hp, red, nrows,
                                                     threadIdx.x >> 5, threadIdx.x & 31u, threadIdx.x);
  });
  mock_write(op, h.data(), 4 * 8);
  return 0;
}

int main(int argc, char** argv) {
  const int d = std::atoi(argv[1]), nrows = std::atoi(argv[2]), w32 = std::atoi(argv[6]);
  const bool xdev = std::atoi(argv[7]) != 0;
  if (d == 512) return w32 ? run<512, true>(nrows, argv[3], argv[4], argv[5], xdev) : run<512, false>(nrows, argv[3], argv[4], argv[5], xdev);
  if (d == 2048) return w32 ? run<2048, true>(nrows, argv[3], argv[4], argv[5], xdev) : run<2048, false>(nrows, argv[3], argv[4], argv[5], xdev);
  return 4;
}
"""


@pytest.fixture(scope="module", params=[8, 4], ids=["nsg8", "nsg4"])
def mock_exe(tmp_path_factory, request):
    return build_decode_tile(tmp_path_factory.mktemp(f"gate_up_mma{request.param}"), "gate_up_mma",
                             f"#define MOCK_NSG {request.param}\n", DRIVER)


@pytest.mark.parametrize("mode", ["default", "w32", "xdev"])
@pytest.mark.parametrize("D,nrows,scale", [(512, 8, 1.0), (2048, 8, 1.0), (2048, 5, 1.0), (512, 8, 3.0e4)])
def test_gate_up_tile_matches_numpy(mock_exe, tmp_path, D, nrows, scale, mode):
    """w32 (stage bit 1024): the mma sums (128 + q) * x and each block's 136 * sum(x) comes off
    after (finish_x's order of x, its block sums): the same tolerance as the default's.  xdev
    (bit 8192): x read where it lies, not copied.  At 8 and 4 warps (1x4x8x1, 2x4x4x1)."""
    w32, xdev = mode == "w32", mode == "xdev"
    rng = np.random.default_rng(D + nrows)
    wg = rng.standard_normal((8, D)).astype(np.float32)
    wu = rng.standard_normal((8, D)).astype(np.float32)
    qg, qu = q4_0.quantize(wg), q4_0.quantize(wu)  # [8, D / 32 * 9] uint16 words
    rw = D // 32 * 9
    stage = np.full((16, rw + 8), 0xFFFF, np.uint16)  # padding: NaN bits, never read
    stage[:8, :rw], stage[8:, :rw] = qg, qu
    if nrows < 8:
        stage[nrows:8], stage[8 + nrows:] = 0xFFFF, 0xFFFF  # rows past the tile: not staged
    xb, xf = bf16_bits(rng.standard_normal(D) * scale)
    (tmp_path / "s").write_bytes(stage.tobytes())
    (tmp_path / "x").write_bytes(xb.tobytes())
    subprocess.run([str(mock_exe), str(D), str(nrows), str(tmp_path / "s"), str(tmp_path / "x"),
                    str(tmp_path / "h"), str(int(w32)), str(int(xdev))], check=True, timeout=120)
    h = np.fromfile(tmp_path / "h", dtype=np.float32)
    g = q4_0.dequantize(qg).astype(np.float64) @ xf.astype(np.float64)
    u = q4_0.dequantize(qu).astype(np.float64) @ xf.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-g) for very negative g: inf, silu 0
        want = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(h[:nrows], want[:nrows], rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert (h[nrows:] == -12345.0).all(), "rows past the tile were stored"

