"""CPU emulation of the Metal kernel environment (for tests and CI).

``metal_kernel`` has the signature of ``mx.fast.metal_kernel``: it takes the
same kernel body, assembles the same Metal source MLX would, compiles it as
C++ against ``metal_emu.h`` and runs the grid with one OS thread per Metal
thread, real threadgroup barriers and SIMD collectives, and bounds-checked
buffers.  See kernel.py for settings and translate.py for the rewrite rules.

    from mlx_moe.emulation import metal_kernel as emu_metal_kernel
"""

from .errors import CompileError, MetalEmulationError, MetalEmulationTimeout, TranslationError
from .kernel import EmulatedMetalKernel, generated_source, metal_kernel

__all__ = [
    "CompileError",
    "EmulatedMetalKernel",
    "MetalEmulationError",
    "MetalEmulationTimeout",
    "TranslationError",
    "generated_source",
    "metal_kernel",
]
