"""Registers a thread of the one-launch decode MoE layer as NVRTC builds it for sm_90a.

Why: the registers bound how many threadgroups a multiprocessor holds (65536 of them,
allocated 8 a thread at a time: at 256 threads, 32 leave 8 threadgroups, 33-40 leave 6).
On the H100 ncu read 40 for MLX's build of stage 191, where nvcc 13.0 offline gives 32
(BENCHMARKS.md 2026-12-07, nineteenth session).  This compiles the layer's CUDA text
(tools/cuda_units.py: the source as MLX's cuda_kernel assembles it) with a given NVRTC
library and MLX's options (--device-as-default-execution-space, an sm_90a cubin), and
reads each kernel's registers and stack frame from the cubin's .nv.info attributes; run
on the GPU machine against the NVRTC that MLX loads there (--mlx-nvrtc) to see which
compiler gives the 40.

    python3 tools/nvrtc_registers.py --nvrtc PATH/libnvrtc.so.13 [--stages 191,255] [--include DIR] [--sass DIR]
    python3 tools/nvrtc_registers.py --mlx-nvrtc              (the libnvrtc MLX's CUDA backend loaded)

(pip's nvidia-cuda-nvrtc wheel holds a libnvrtc -- 13.0.88 is the GPU machine's, whose
libnvrtc-builtins must be on LD_LIBRARY_PATH; CUDA headers from --include, default
$CUDA_HOME/include or /usr/local/cuda/include, and its cccl/.)  --sass DIR writes the cubin
and, where cuobjdump and nvdisasm are on PATH (pip nvidia-cuda-cuobjdump,
nvidia-cuda-nvdisasm), the SASS; and prints, for each variant, its down threadgroups' loads
and mma after their wait, in order -- how many of a tile's h loads are in flight at once
(BENCHMARKS.md 2026-12-07, twentieth session: 191 waits on one load pair per mma).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_units import moe_layer_kernel, translation_unit  # noqa: E402
from mlx_moe.kernels import dispatch  # noqa: E402

# NVRTC has no <cstdint>: the prelude's integer types from libcu++ instead.
_CSTDINT = ("#include <cuda/std/cstdint>\n"
            "using cuda::std::int32_t; using cuda::std::int64_t; using cuda::std::uint32_t; using cuda::std::uint16_t;\n"
            "using cuda::std::uintptr_t; using cuda::std::size_t;\n")

# .nv.info attributes (format EIFMT_SVAL: symbol index, value): registers, stack frame
_EIATTR = {0x2F: "registers", 0x11: "frame"}


def cubin_resources(cubin: bytes) -> Dict[str, Dict[str, int]]:
    """{kernel symbol: {"registers": n, "frame": bytes}} from an sm_XX cubin (ELF64)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not an ELF64 cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, align, entsize)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstr(base: int, off: int) -> str:
        return cubin[base + off:cubin.index(b"\0", base + off)].decode()

    names = [cstr(secs[shstrndx][4], sh[0]) for sh in secs]
    symtab = next(sh for sh, n in zip(secs, names) if n == ".symtab")
    strtab = secs[symtab[6]][4]
    syms = [cstr(strtab, struct.unpack_from("<I", cubin, symtab[4] + i * 24)[0]) for i in range(symtab[5] // 24)]
    out: Dict[str, Dict[str, int]] = {}
    for sh, n in zip(secs, names):
        if n != ".nv.info" and not n.startswith(".nv.info."):
            continue
        off, end = sh[4], sh[4] + sh[5]
        while off < end:
            fmt, attr = cubin[off], cubin[off + 1]
            if fmt == 0x04:  # EIFMT_SVAL: a 2-byte size, then the value
                size, = struct.unpack_from("<H", cubin, off + 2)
                if attr in _EIATTR:
                    sym, val = struct.unpack_from("<II", cubin, off + 4)
                    out.setdefault(syms[sym], {})[_EIATTR[attr]] = val
                off += 4 + size
            elif fmt == 0x03:  # EIFMT_HVAL: a 2-byte value
                off += 4
            else:  # EIFMT_NVAL (no value) and anything else this reader does not need
                off += 2
    return out


def nvrtc_cubin(lib: ctypes.CDLL, source: str, options: list) -> bytes:
    """The sm cubin NVRTC makes of `source` (an error with NVRTC's log if it fails)."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"moe_layer.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        if rc != 0:
            n = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
            log = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC error {rc}:\n{log.value.decode(errors='replace')[-4000:]}")
        n = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetCUBIN(prog, buf)
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def nvrtc_version(lib: ctypes.CDLL) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def mlx_nvrtc_path() -> str:
    """The libnvrtc MLX's CUDA backend loads: run one tiny custom kernel, then read this
    process's mappings."""
    import mlx.core as mx

    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        raise SystemExit("--mlx-nvrtc needs MLX's CUDA backend and an NVIDIA GPU")
    import time

    tag = f"{os.getpid()}_{time.time_ns()}"  # a kernel no PTX cache holds: MLX must compile it
    k = mx.fast.cuda_kernel(name=f"nvrtc_probe_{tag}", input_names=["a"], output_names=["b"],
                            source=f"b[threadIdx.x] = a[threadIdx.x];  // {tag}")
    mx.eval(k(inputs=[mx.zeros((32,))], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
              output_dtypes=[mx.float32])[0])
    from mlx_moe.kernels.cuda_cache import loaded_libraries

    paths = loaded_libraries("libnvrtc.so")
    if not paths:
        raise SystemExit("no libnvrtc in this process after an MLX CUDA kernel was built")
    return paths[0]


def tail_sequence(sass: str) -> str:
    """The down threadgroups' memory and mma instructions after their wait on the gate/up
    count, in order, from one kernel's SASS: what follows the last NANOSLEEP (the wait's
    loop) up to the next barrier after the first HMMA -- e.g. 'LDG.64 LDG.64 HMMA HMMA
    LDG.64 HMMA ...' (loads waited for one pair at a time) or 'LDS.64 LDS.64 HMMA HMMA'."""
    ops = re.findall(r"\b(NANOSLEEP|HMMA|BAR\.SYNC|LDGSTS|LDG(?:\.\w+)*|LDS(?:\.\w+)*|LD\.E(?:\.\w+)*)\b", sass)
    if "NANOSLEEP" not in ops:
        return ""
    tail = ops[len(ops) - 1 - ops[::-1].index("NANOSLEEP") + 1:]
    out, seen_mma = [], False
    for op in tail:
        if op.startswith("BAR") and seen_mma:
            break
        seen_mma = seen_mma or op == "HMMA"
        out.append(re.sub(r"\.(E|U16|STRONG|SYS|CONSTANT|BYPASS)\b", "", op).replace("LDGSTS", "cp.async"))
    return " ".join(out)


def threadgroups_per_sm(registers: int, threads: int) -> int:
    """Threadgroups of `threads` one multiprocessor's 65536 registers hold, 8 a thread at a time."""
    return 65536 // (-(-registers // 8) * 8 * threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--nvrtc", help="path of the libnvrtc.so to compile with")
    src.add_argument("--mlx-nvrtc", action="store_true", help="the libnvrtc MLX's CUDA backend loads (GPU machine)")
    p.add_argument("--stages", default=str(dispatch.MOE_LAYER["q4_0"].stage),
                   help="LayerGeometry stages at --geometry, comma-separated (default: the default's)")
    p.add_argument("--geometry", default="1x4x8x1",
                   help="GATExDOWNxNSGxNQ the stages are built at (default 1x4x8x1, the default's)")
    p.add_argument("--include", default=None, help="CUDA headers (default $CUDA_HOME/include or /usr/local/cuda/include)")
    p.add_argument("--sass", default=None, metavar="DIR",
                   help="write the cubin (and with cuobjdump, the SASS) to DIR; print the down tail's loads and mma")
    a = p.parse_args(argv)
    try:
        g = dispatch.LayerGeometry.parse(a.geometry)
    except ValueError as e:
        raise SystemExit(f"--geometry: {e}")
    path = mlx_nvrtc_path() if a.mlx_nvrtc else a.nvrtc
    lib = ctypes.CDLL(path)
    inc = Path(a.include or Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include")
    options = ["--device-as-default-execution-space", "--gpu-architecture=sm_90a", "-std=c++17",
               f"--include-path={inc}", f"--include-path={inc / 'cccl'}"]
    kernels = [moe_layer_kernel(f"stage{st}{'_share' if share else ''}", g.gate_nr, g.down_nr, g.nsg, g.nq,
                                stage=int(st), share_route=share)
               for st in a.stages.split(",") for share in (False, True)]
    source = translation_unit("mul_mv_id", kernels).replace("#include <cstdint>\n", _CSTDINT)
    cubin = nvrtc_cubin(lib, source, options)
    res = cubin_resources(cubin)
    print(f"NVRTC {nvrtc_version(lib)} ({path}), sm_90a cubin")
    variants = [(k[1], next(s for s in res if f"mul_mv_id_moe_{k[1]}E" in s)) for k in kernels]  # (name, symbol)
    for variant, sym in variants:
        r = res[sym]
        print(f"  mul_mv_id_moe {variant:16s} {r.get('registers', 0):3d} registers, {r.get('frame', 0):4d} B stack frame"
              f"  -> {threadgroups_per_sm(r.get('registers', 0), 32 * g.nsg)} threadgroups of {32 * g.nsg} an SM by "
              f"registers")
    if a.sass:
        write_sass(Path(a.sass), cubin, variants)
    return 0


def write_sass(out: Path, cubin: bytes, variants) -> None:
    """The cubin to out/, and where cuobjdump is on PATH each variant's SASS beside it and its
    down tail's loads and mma printed (tail_sequence)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_layer.cubin").write_bytes(cubin)
    if shutil.which("cuobjdump") is None:
        print(f"  cubin in {out}; no cuobjdump on PATH for the SASS (pip nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm)")
        return
    for variant, sym in variants:
        sass = subprocess.run(["cuobjdump", "-sass", "-fun", sym, str(out / "moe_layer.cubin")], capture_output=True,
                              text=True, check=True).stdout
        (out / f"{variant}.sass").write_text(sass)
        print(f"  {variant:16s} down tail: {tail_sequence(sass)}")


if __name__ == "__main__":
    raise SystemExit(main())
