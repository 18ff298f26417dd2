"""The decode MoE layer's down tile on the tensor cores (moe_down_mma<true>,
metal/mul_mv_id_cuda.h: mul_mv_id_moe's stage bit 128) on the CPU, through the CUDA mock
of tests/cuda_mock.py (g++, one OS thread per CUDA thread, mma.m16n8k16 bf16 and the
nibble conversion following the PTX ISA's fragment layouts), against numpy over the
dequantized Q4_0 rows (the codec of mlx_moe.q4_0, itself checked against the gguf
package's quantizer): y[r] = sum_s w[s] * (Wd[s] row r . h[s]) + (identity weights) * x[r].

What it checks: four slots' rows in one tile (which staged row each lane converts, which
slot's h each column reads, which accumulator each lane keeps), the warps' share of the
blocks, their meeting in threadgroup memory, padding and identity slots (their rows and h
never selected, even when those hold NaN), a ragged last tile.  Speed is the H100's.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from cuda_mock import CXX, bf16_bits, build_decode_tile
from mlx_moe import q4_0

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed")

KS = 8

DRIVER = r"""
// argv: F, nvalid, NE, stage file (KS * 4 rows of F / 32 * 9 ushorts), h file (KS x F bf16 bits),
// ids file (KS int32), weights file (KS float32), x file (4 float32), out file (4 floats), the
// block loop's unrolling (UNR: 1 or 2)
template <int F, int UNR>
int run(int nvalid, int ne, const char* sp, const char* hp, const char* ip, const char* wp, const char* xp,
        const char* op) {
  constexpr int RW = F / 32 * 9;
  std::vector<char> st = mock_read(sp), hs = mock_read(hp), is = mock_read(ip), ws = mock_read(wp), xs = mock_read(xp);
  std::vector<float> y(4, -12345.0f);
  static float red[MOCK_NSG * 16];
  const ushort* stage = reinterpret_cast<const ushort*>(st.data());
  const ushort* h = reinterpret_cast<const ushort*>(hs.data());
  const int* ids = reinterpret_cast<const int*>(is.data());
  const float* wts = reinterpret_cast<const float*>(ws.data());
  const float* x = reinterpret_cast<const float*>(xs.data());
  float* yp = y.data();
  mock_launch(1, 1, 32 * MOCK_NSG, [&] {
    const uint sg = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    float v = 0.0f;
    if (ne == 8) {
      v = moe_down_mma<true>::run<F, 8, 2, MOCK_KS, MOCK_NSG, RW, UNR>(h, ids, wts, x, stage, red, nvalid, sg, lane);
    }
    if (sg == 0 && lane < 4) yp[lane] = v;
  });
  mock_write(op, y.data(), 4 * 4);
  return 0;
}

int main(int argc, char** argv) {
  const int f = std::atoi(argv[1]), nvalid = std::atoi(argv[2]), ne = std::atoi(argv[3]), unr = std::atoi(argv[10]);
  if (f == 256 && unr == 2) return run<256, 2>(nvalid, ne, argv[4], argv[5], argv[6], argv[7], argv[8], argv[9]);
  if (f == 768 && unr == 2) return run<768, 2>(nvalid, ne, argv[4], argv[5], argv[6], argv[7], argv[8], argv[9]);
  if (f == 256 && unr == 1) return run<256, 1>(nvalid, ne, argv[4], argv[5], argv[6], argv[7], argv[8], argv[9]);
  if (f == 768 && unr == 1) return run<768, 1>(nvalid, ne, argv[4], argv[5], argv[6], argv[7], argv[8], argv[9]);
  return 4;
}
"""


@pytest.fixture(scope="module", params=[8, 4], ids=["nsg8", "nsg4"])
def mock_exe(tmp_path_factory, request):
    """At 8 warps (1x4x8x1: a tile's 4 warps take 6 of its 24 blocks each at F 768) and 4
    (2x4x4x1: 2 warps a tile, 12 blocks each)."""
    return build_decode_tile(tmp_path_factory.mktemp(f"down_mma{request.param}"), "down_mma",
                             f"#define MOCK_NSG {request.param}\n#define MOCK_KS {KS}\n", DRIVER)


# (F, nvalid, ids): every slot real; padding (-1, 10 past 8 real + 2 identity) and identity
# (8, 9) slots beside real ones, in both tiles; a ragged last tile (2 rows)
CASES = [(768, 4, [3, 0, 7, 5, 1, 2, 6, 4]), (256, 4, [3, -1, 7, 8, 1, 10, 9, 4]), (768, 2, [5, 6, 8, 0, 2, 2, -1, 7])]


@pytest.mark.parametrize("unroll", [2, 1])
@pytest.mark.parametrize("F,nvalid,ids", CASES)
def test_down_tile_matches_numpy(mock_exe, tmp_path, F, nvalid, ids, unroll):
    rng = np.random.default_rng(F + nvalid)
    ne = 8
    wd = rng.standard_normal((ne, 4, F)).astype(np.float32)  # the threadgroup's 4 rows of each expert
    qd = np.stack([q4_0.quantize(wd[e]) for e in range(ne)])  # [ne, 4, F / 32 * 9]
    rw = F // 32 * 9
    stage = np.full((KS * 4, rw), 0xFFFF, np.uint16)  # unstaged rows: NaN bits, never selected
    for s, e in enumerate(ids):
        if 0 <= e < ne:
            stage[4 * s:4 * s + nvalid] = qd[e, :nvalid]
    hb, hf = bf16_bits(rng.standard_normal((KS, F)))
    for s, e in enumerate(ids):
        if not 0 <= e < ne:
            hb[s] = 0x7FC0  # a row of h nothing wrote: NaN
    w = rng.random(KS).astype(np.float32)
    x = rng.standard_normal(4).astype(np.float32)
    files = {"s": stage, "h": hb, "i": np.array(ids, np.int32), "w": w, "x": x}
    for name, a in files.items():
        (tmp_path / name).write_bytes(a.tobytes())
    subprocess.run([str(mock_exe), str(F), str(nvalid), str(ne)] + [str(tmp_path / n) for n in "shiwx"]
                   + [str(tmp_path / "y"), str(unroll)], check=True, timeout=120)
    y = np.fromfile(tmp_path / "y", dtype=np.float32)
    want = np.zeros(4)
    for s, e in enumerate(ids):
        if 0 <= e < ne:
            want += w[s] * (q4_0.dequantize(qd[e]).astype(np.float64) @ hf[s].astype(np.float64))
        elif ne <= e < ne + 2:
            want += w[s] * x.astype(np.float64)
    np.testing.assert_allclose(y[:nvalid], want[:nvalid], rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert (y[nvalid:] == 0).all(), "rows past the tile got a value"
