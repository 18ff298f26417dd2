"""Compiling and caching the emulator's shared libraries.

Two kinds of library: the runtime (metal_emu_runtime.h, built once) and one
per distinct kernel translation unit.  Each is built with the system C++
compiler into a cache directory, named by a hash of everything that goes
into it (source, headers, compiler, flags), so a CI run compiles each kernel
once and later runs reuse the file.  Writes go to a temporary name first and
are renamed into place, so concurrent processes never load a half-written
library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .errors import CompileError

HEADER_DIR = Path(__file__).resolve().parent
HEADERS = ("metal_emu_abi.h", "metal_emu.h", "metal_emu_runtime.h")

# -O1 keeps compile time low (CI has two cores); -fsingle-precision-constant
# makes unsuffixed literals float, as Metal (which has no double) treats them.
CXXFLAGS = (
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fsingle-precision-constant",
    "-fno-strict-aliasing",
    "-w",
    "-fno-finite-loops",
    "-g1",  # line tables: failures inside a kernel are mapped to a source line
) + (("-Wl,-z,now",) if sys.platform.startswith("linux") else ())



def _cpu_flags() -> tuple[str, ...]:
    """-mf16c / -mfma where the CPU has them: half<->float conversions and
    fma() become single instructions instead of library calls (a large
    speed-up for fp16 kernels).  The flags are part of every cache key."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return ()
    return tuple(f"-m{name}" for name in ("f16c", "fma") if f" {name}" in flags)


CXXFLAGS = CXXFLAGS + _cpu_flags()

_lock = threading.RLock()
_loaded: dict[str, ctypes.CDLL] = {}
_runtime: ctypes.CDLL | None = None


def cache_dir() -> Path:
    """Where compiled libraries live (MLX_MOE_EMU_CACHE overrides)."""
    env = os.environ.get("MLX_MOE_EMU_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "mlx_moe" / "emu"
    base.mkdir(parents=True, exist_ok=True)
    return base


def compiler() -> str:
    """The C++ compiler (MLX_MOE_EMU_CXX overrides, else g++ or c++)."""
    env = os.environ.get("MLX_MOE_EMU_CXX")
    if env:
        return env
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return name
    raise CompileError(
        "the Metal emulator needs a C++17 compiler (g++ >= 12 or clang++ >= 15): "
        "install one or set MLX_MOE_EMU_CXX"
    )


@functools.lru_cache(maxsize=1)
def _headers_digest() -> str:
    h = hashlib.sha256()
    for name in HEADERS:
        h.update((HEADER_DIR / name).read_bytes())
    return h.hexdigest()


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _write(path: Path, text: str) -> None:
    """Write via a temporary file and a rename (other processes may read it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _compile(cpp: Path, out: Path, extra: tuple[str, ...] = ()) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [compiler(), *CXXFLAGS, f"-I{HEADER_DIR}", str(cpp), "-o", tmp, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise CompileError(proc.stderr or proc.stdout or "compiler failed without output")
    os.replace(tmp, out)


def runtime() -> ctypes.CDLL:
    """The runtime library, loaded with global symbols for the kernels."""
    global _runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        key = _digest(compiler(), " ".join(CXXFLAGS), _headers_digest())
        so = cache_dir() / f"metal_emu_rt_{key}.so"
        if not so.exists():
            cpp = cache_dir() / f"metal_emu_rt_{key}.cpp"
            _write(cpp, '#include "metal_emu_runtime.h"\n')
            _compile(cpp, so, ("-ldl",))
        lib = ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)
        lib.emu_launch.restype = ctypes.c_int
        _runtime = lib
        return lib


def _excerpt(stderr: str, metal_file: Path, metal_source: str, limit: int = 40) -> str:
    """Compiler diagnostics, trimmed, with the Metal source line of the first error."""
    lines = stderr.splitlines()
    text = "\n".join(lines[:limit])
    if len(lines) > limit:
        text += f"\n... ({len(lines) - limit} more lines)"
    m = re.search(re.escape(str(metal_file)) + r":(\d+):(?:\d+:)? (?:fatal )?error", stderr)
    if m:
        n = int(m.group(1))
        src = metal_source.splitlines()
        if 0 < n <= len(src):
            text = f"first error at line {n} of the kernel source: {src[n - 1].strip()}\n" + text
    return text


def kernel_library(
    cpp_source: str, metal_source: str, label: str, preamble: str = ""
) -> ctypes.CDLL:
    """Compile (or reuse) the library for one translated kernel.

    cpp_source is the translated text (its line numbers match metal_source);
    the generated file starts with a #line directive pointing at a copy of
    the Metal source, so diagnostics quote the Metal lines.  preamble goes
    before the header (configuration macros).
    """
    runtime()
    with _lock:
        key = _digest(compiler(), " ".join(CXXFLAGS), _headers_digest(), preamble, cpp_source)
        if key in _loaded:
            return _loaded[key]
        base = cache_dir()
        so = base / f"{key}.so"
        if not so.exists():
            metal_file = base / f"{key}.metal"
            _write(metal_file, metal_source)
            cpp = base / f"{key}.cpp"
            _write(cpp, preamble + '#include "metal_emu.h"\n'
                   f'#line 1 "{metal_file}"\n' + cpp_source)
            try:
                _compile(cpp, so)
            except CompileError as e:
                raise CompileError(
                    f"[metal emulation] kernel '{label}' does not compile "
                    f"(translated source: {cpp}):\n" + _excerpt(str(e), metal_file, metal_source)
                ) from None
        lib = ctypes.CDLL(str(so))
        _loaded[key] = lib
        return lib


def source_line_of(code_ref: str) -> int | None:
    """Line of the Metal source for "lib.so+0x1f3" (None if unknown).

    Uses binutils' addr2line on the kernel library's line tables; the
    innermost frame that lies in the kernel source wins (the others are
    metal_emu.h functions inlined into it).
    """
    path, _, offset = code_ref.rpartition("+")
    tool = shutil.which("addr2line")
    if not tool or not path:
        return None
    try:
        proc = subprocess.run([tool, "-i", "-e", path, offset], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in proc.stdout.splitlines():
        file, _, num = line.rpartition(":")
        num = num.split()[0] if num else ""
        if file.endswith(".metal") and num.isdigit():
            return int(num)
    return None
