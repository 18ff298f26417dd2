"""The decode MoE layer's tiles on the tensor cores (metal/mul_mv_id_cuda.h:
moe_gate_up_mma<true>, mul_mv_id_moe's stage bit 32, and moe_down_mma<true>, bit 64) on
the CPU, through the CUDA mock
of tests/cuda_mock.py (g++, one OS thread per CUDA thread, mma.m16n8k16 bf16 and the
nibble conversion as warp-collective C++ following the PTX ISA's fragment layouts),
against numpy over the dequantized Q4_0 rows (the codec of mlx_moe.q4_0, itself checked
against the gguf package's quantizer): h = silu(Wg x) * (Wu x) for gate/up, and for down
sum_s w_s (W_e(s) h_s) over the real slots plus the identity slots' weights times x.

What it checks: the fragment index math (which bytes of which staged row, which x pairs,
which accumulator holds which row), the padded row pitch, the warps' meeting in threadgroup
memory, a ragged last tile (fewer rows stored), slots that are identity or padding
experts (their rows never read) and 16-row down tiles.  Speed is the H100's business.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from cuda_mock import CUDA_MOCK, CXX
from mlx_moe import q4_0
from mlx_moe.kernels.registry import read_cuda_twin

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed")

NSG = 8

DRIVER = r"""
// argv: "gu", D, nrows, stage file (16 rows of RW + 8 ushorts), x file (D bf16 bits), out file (8 floats)
template <int D>
int run(int nrows, const char* sp, const char* xp, const char* op) {
  constexpr int RW = D / 32 * 9 + 8;  // a staged row and its 16 bytes of padding, in ushorts
  std::vector<char> st = mock_read(sp), xs = mock_read(xp);
  std::vector<float> h(8, -12345.0f);
  static float red[MOCK_NSG * 16];
  const ushort* stage = reinterpret_cast<const ushort*>(st.data());
  const ushort* x = reinterpret_cast<const ushort*>(xs.data());
  float* hp = h.data();
  mock_launch(1, 1, 32 * MOCK_NSG, [&] {
    moe_gate_up_mma<true>::run<D, MOCK_NSG, RW>(x, stage, hp, red, nrows, threadIdx.x >> 5, threadIdx.x & 31u,
                                           threadIdx.x);
  });
  FILE* fp = std::fopen(op, "wb");
  std::fwrite(h.data(), 4, 8, fp);
  std::fclose(fp);
  return 0;
}

// argv: "dn", F, NR, nvalid, stage (KS * NR rows of F / 32 * 9 ushorts), h (KS * F bf16 bits),
// ids (KS int32), wts (KS float32), x (NR float32), out (32 floats: sg 0's lanes)
template <int F, int NR>
int run_down(int nvalid, char** p) {
  constexpr int KS = 8, NE = 4, NI = 2;
  std::vector<char> st = mock_read(p[0]), hs = mock_read(p[1]), is = mock_read(p[2]), ws = mock_read(p[3]),
                    xs = mock_read(p[4]);
  std::vector<float> out(32, -12345.0f);
  static float part[MOCK_NSG * 16];
  const ushort* stage = reinterpret_cast<const ushort*>(st.data());
  const ushort* h = reinterpret_cast<const ushort*>(hs.data());
  const int* ids = reinterpret_cast<const int*>(is.data());
  const float* wts = reinterpret_cast<const float*>(ws.data());
  const float* x = reinterpret_cast<const float*>(xs.data());
  float* op = out.data();
  mock_launch(1, 1, 32 * MOCK_NSG, [&] {
    const float v = moe_down_mma<true>::run<F, NE, NI, KS, NR, MOCK_NSG, F / 32 * 9>(
        h, ids, wts, x, stage, part, nvalid, threadIdx.x >> 5, threadIdx.x & 31u);
    if (threadIdx.x < 32) op[threadIdx.x] = v;
  });
  FILE* fp = std::fopen(p[5], "wb");
  std::fwrite(out.data(), 4, 32, fp);
  std::fclose(fp);
  return 0;
}

int main(int argc, char** argv) {
  if (std::string(argv[1]) == "dn") {
    const int f = std::atoi(argv[2]), nr = std::atoi(argv[3]), nvalid = std::atoi(argv[4]);
    if (f == 768 && nr == 8) return run_down<768, 8>(nvalid, argv + 5);
    if (f == 256 && nr == 16) return run_down<256, 16>(nvalid, argv + 5);
    return 4;
  }
  const int d = std::atoi(argv[2]), nrows = std::atoi(argv[3]);
  if (d == 512) return run<512>(nrows, argv[4], argv[5], argv[6]);
  if (d == 2048) return run<2048>(nrows, argv[4], argv[5], argv[6]);
  return 4;
}
"""


@pytest.fixture(scope="module")
def mock_exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate_up_mma")
    src = d / "gate_up_mma.cpp"
    # the shared helpers' primary templates
    primary = "template <bool MMA> struct moe_gate_up_mma;\ntemplate <bool MMA> struct moe_down_mma;\n"
    src.write_text(CUDA_MOCK + "#include <string>\n" + f"#define MOCK_NSG {NSG}\n" + primary
                   + read_cuda_twin("mul_mv_id")[0] + DRIVER)
    exe = d / "gate_up_mma"
    r = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-w", str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even) and their float32 values."""
    u = a.astype(np.float32).view(np.uint32)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return b, (b.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("D,nrows,scale", [(512, 8, 1.0), (2048, 8, 1.0), (2048, 5, 1.0), (512, 8, 3.0e4)])
def test_gate_up_tile_matches_numpy(mock_exe, tmp_path, D, nrows, scale):
    rng = np.random.default_rng(D + nrows)
    wg = rng.standard_normal((8, D)).astype(np.float32)
    wu = rng.standard_normal((8, D)).astype(np.float32)
    qg, qu = q4_0.quantize(wg), q4_0.quantize(wu)  # [8, D / 32 * 9] uint16 words
    rw = D // 32 * 9
    stage = np.full((16, rw + 8), 0xFFFF, np.uint16)  # padding: NaN bits, never read
    stage[:8, :rw], stage[8:, :rw] = qg, qu
    if nrows < 8:
        stage[nrows:8], stage[8 + nrows:] = 0xFFFF, 0xFFFF  # rows past the tile: not staged
    xb, xf = _bf16(rng.standard_normal(D) * scale)
    (tmp_path / "s").write_bytes(stage.tobytes())
    (tmp_path / "x").write_bytes(xb.tobytes())
    subprocess.run([str(mock_exe), "gu", str(D), str(nrows), str(tmp_path / "s"), str(tmp_path / "x"),
                    str(tmp_path / "h")], check=True, timeout=120)
    h = np.fromfile(tmp_path / "h", dtype=np.float32)
    g = q4_0.dequantize(qg).astype(np.float64) @ xf.astype(np.float64)
    u = q4_0.dequantize(qu).astype(np.float64) @ xf.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-g) for very negative g: inf, silu 0
        want = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(h[:nrows], want[:nrows], rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert (h[nrows:] == -12345.0).all(), "rows past the tile were stored"


@pytest.mark.parametrize("F,NR,nvalid", [(768, 8, 8), (768, 8, 5), (256, 16, 16), (256, 16, 11)])
def test_down_tile_matches_numpy(mock_exe, tmp_path, F, NR, nvalid):
    KS, NE, NI = 8, 4, 2
    rng = np.random.default_rng(F + NR + nvalid)
    ids = np.array([2, 0, 5, 3, 9, 1, 2, 4], np.int32)  # 5, 4: identity (NE <= id < NE + NI); 9: padding
    wts = rng.uniform(0.05, 1.0, KS).astype(np.float32)
    rw = F // 32 * 9
    stage = np.full((KS, NR, rw), 0xFFFF, np.uint16)  # NaN bits where nothing is staged
    rows = {}
    for s_, e in enumerate(ids):
        if e < NE:
            q = q4_0.quantize(rng.standard_normal((nvalid, F)).astype(np.float32))
            stage[s_, :nvalid] = q
            rows[s_] = q4_0.dequantize(q).astype(np.float64)
    hb, hf = _bf16(rng.standard_normal((KS, F)) * 2.0)
    x = rng.standard_normal(NR).astype(np.float32)
    files = {"s": stage, "h": hb, "i": ids, "w": wts, "x": x}
    for name, arr in files.items():
        (tmp_path / name).write_bytes(np.ascontiguousarray(arr).tobytes())
    subprocess.run([str(mock_exe), "dn", str(F), str(NR), str(nvalid)] + [str(tmp_path / n) for n in "shiwx"]
                   + [str(tmp_path / "o")], check=True, timeout=120)
    v = np.fromfile(tmp_path / "o", dtype=np.float32)
    want = sum(wts[s_] * (rows[s_] @ hf[s_].astype(np.float64)) for s_ in rows)
    want = want + sum(wts[s_] for s_, e in enumerate(ids) if NE <= e < NE + NI) * x[:nvalid].astype(np.float64)
    np.testing.assert_allclose(v[:nvalid], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert (v[nvalid:] == 0).all(), "lanes past the tile's rows must return 0"
