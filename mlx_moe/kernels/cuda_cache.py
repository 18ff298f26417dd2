"""The CUDA context's L1 / shared-memory preference (cudaDeviceSetCacheConfig).

Why: on the H100 the one-launch decode MoE layer at stage 63 (23.5 KB of threadgroup
memory, 38 registers: 6 threadgroups a multiprocessor by both) started more than a tenth
of its 768 gate/up threadgroups 7-8.6 us late, as if the GPU held 5 an SM -- what a
132 KB shared-memory carveout allows (BENCHMARKS.md 2026-12-07, sixteenth session).  MLX
launches custom kernels without a carveout preference, so the driver chooses one per
launch; this sets the context-wide preference its choice falls back on, for the tools to
measure whether it changes the layer (`--cache-preference`).  Measured (seventeenth
session): no -- under ncu the driver already gives stage 63 a 164 KB carveout (6
threadgroups an SM), and `shared` (228 KB) left it at 20.91 us against 20.51; so the
package's own paths do not use it.

The preference is the primary context's, which MLX's CUDA backend uses (cudaSetDevice);
the runtime library is the one MLX loaded (found in this process's mappings).
"""

from __future__ import annotations

import ctypes

import mlx.core as mx

# cudaFuncCache: none (the driver's choice), prefer shared memory, prefer L1, equal.
PREFERENCES = {"none": 0, "shared": 1, "l1": 2, "equal": 3}


def loaded_libraries(name: str) -> list:
    """Paths of the shared libraries this process has mapped whose path holds `name`
    (e.g. "libcudart.so": the CUDA runtime MLX loaded), from /proc/self/maps; [] where
    there is none or no such file."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if name in line})
    except OSError:
        return []


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime MLX loaded, by its path in /proc/self/maps."""
    paths = loaded_libraries("libcudart.so")
    if not paths:
        raise RuntimeError("no CUDA runtime (libcudart) is loaded in this process: the cache preference needs "
                           "MLX's CUDA backend on an NVIDIA GPU (pip install mlx[cuda])")
    return ctypes.CDLL(paths[0])


def set_cache_preference(name: str) -> int:
    """Set the current device's cache preference to `name` (PREFERENCES) and return the
    preference the runtime reports back (its cudaFuncCache value)."""
    if name not in PREFERENCES:
        raise ValueError(f"cache preference {name!r}: want one of {', '.join(PREFERENCES)}")
    if not mx.cuda.is_available():
        raise RuntimeError("the cache preference is a CUDA setting; MLX has no CUDA device here")
    mx.eval(mx.zeros((1,)))  # MLX's device (and with it the primary context) set up first
    lib = _cudart()
    err = lib.cudaDeviceSetCacheConfig(ctypes.c_int(PREFERENCES[name]))
    if err != 0:
        raise RuntimeError(f"cudaDeviceSetCacheConfig({name}) failed with CUDA error {err}")
    got = ctypes.c_int(-1)
    err = lib.cudaDeviceGetCacheConfig(ctypes.byref(got))
    if err != 0:
        raise RuntimeError(f"cudaDeviceGetCacheConfig failed with CUDA error {err}")
    return got.value


def add_argument(parser) -> None:
    """The tools' `--cache-preference` option (tools/bench_kernels.py, profile_decode.py,
    trace_moe_layer.py)."""
    parser.add_argument("--cache-preference", choices=tuple(PREFERENCES), default="none",
                        help="the CUDA context's L1 / shared-memory preference (mlx_moe.kernels.cuda_cache), set "
                             "before anything runs: whether the driver's carveout limits the threadgroups an SM "
                             "holds (none: the driver's choice, untouched)")


def apply(name: str) -> None:
    """Set the preference `name` unless it is "none", and print what the runtime reports."""
    if name != "none":
        print(f"cache preference {name}: cudaFuncCache {set_cache_preference(name)}", flush=True)
