"""The CUDA source of the project's kernels as MLX's cuda_kernel assembles it for NVRTC.

MLX 0.32 (mlx/backend/cuda/custom_kernel.cpp) writes, after its default header and the
kernel's header, `__global__ void custom_kernel_<name>(...)` in namespace mlx::core::cu:
inputs `const T*`, `<input>_shape` / `_strides` / `_ndim` where the body names them,
outputs `T*`, the template arguments as `constexpr` locals and `using` lines at the top of
the body.  translation_unit() reproduces that for a list of kernels of one family, with a
stand-in prelude for MLX's device headers (what the bodies use of them), so that nvcc
(tests/test_kernels_cuda_compile.py), NVRTC (tools/nvrtc_registers.py) and the CPU mock
of the CUDA environment (tests/cuda_mock.py) compile the same text.

A kernel here is (name, variant, inputs, outputs, template): inputs / outputs map
argument names to dtype names, template is [(name, dtype name | int | bool)].
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, run from anywhere

from mlx_moe.kernels.registry import KERNELS, family_header, kernel_source  # noqa: E402
from mlx_moe.kernels.source import prune  # noqa: E402

# Stand-in for `#include "mlx/backend/cuda/device/utils.cuh"`: what the bodies use from it.
PRELUDE = """\
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
#include <cstdint>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}  // namespace mlx::core::cu
#include <cooperative_groups.h>
"""

CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float",
              "int32": "int32_t", "uint16": "uint16_t", "uint32": "uint32_t"}


def gemm_base(name: str) -> str:
    """The registered kernel whose arguments a CUDA GEMM body (mul_mm_id.cuda_body's suffixes) takes."""
    return re.sub(r"_(async|bf16|pipe)$", "", name)


def kernel_text(name: str, variant: str, inputs: dict, outputs: dict, template: list) -> str:
    """One __global__ function as MLX's cuda_kernel writes it.

    inputs / outputs: {name: dtype name}; template: [(name, dtype name | int | bool)].
    """
    spec = KERNELS[gemm_base(name)]  # a CUDA GEMM body takes its base kernel's arguments
    _, body = kernel_source("cuda", spec.family, name)
    params = []
    for arg in spec.inputs:
        params.append(f"const {CUDA_TYPES[inputs[arg]]}* {arg}")
        if f"{arg}_shape" in body:
            params.append(f"const __grid_constant__ Shape {arg}_shape")
        if f"{arg}_strides" in body:
            params.append(f"const __grid_constant__ Strides {arg}_strides")
        if f"{arg}_ndim" in body:
            params.append(f"int {arg}_ndim")
    params += [f"{CUDA_TYPES[outputs[arg]]}* {arg}" for arg in spec.outputs]
    consts = []
    for tname, value in template:
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {tname} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {tname} = {value};")
        else:
            consts.append(f"  using {tname} = {CUDA_TYPES[value]};")
    return (f"__global__ void custom_kernel_mlx_moe_{name}_{variant}({', '.join(params)}) {{\n"
            + "\n".join(consts) + "\n" + body + "\n}\n")


def translation_unit(family: str, kernels: list) -> str:
    """The kernels' text after one header: the family's, pruned to what their bodies use
    together (each kernel's own pruned header is a subset of it)."""
    bodies = "\n".join(kernel_source("cuda", KERNELS[gemm_base(n)].family, n)[1] for n, *_ in kernels)
    header = prune(family_header("cuda", family), bodies)
    fns = "".join(kernel_text(*k) for k in kernels)
    return PRELUDE + header + "\nnamespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n" + fns + "}\n"


def moe_layer_kernel(variant, nrg, nrd, nsg, nq=1, stage=0, share_route=False, trace=False):
    """(name, variant, inputs, outputs, template) of mul_mv_id_moe (trace:
    mul_mv_id_moe_trace) at Qwen3-30B-A3B's decode shapes: Q4_0, softmax top-8 of 128,
    one token, bfloat16 activations."""
    return ("mul_mv_id_moe_trace" if trace else "mul_mv_id_moe", variant,
            {"x": "bfloat16", "logits": "bfloat16", "bias": "float32", "scale": "float32", "wg": "uint16",
             "wu": "uint16", "wd": "uint16", "res": "bfloat16", "count": "uint32"},
            {"h": "bfloat16" if stage & 16 else "float32", "ids": "int32", "weights": "float32", "y": "bfloat16",
             **({"trace": "uint32"} if trace else {})},
            [("T", "bfloat16"), ("WT", "uint16"), ("D", 2048), ("F", 768), ("NE", 128), ("NI", 0), ("KS", 8),
             ("NT", 1), ("NRG", nrg), ("NRD", nrd), ("NSG", nsg), ("NQ", nq), ("STAGE", stage), ("NEXP", 128), ("VPL", 4),
             ("SCORE", 0), ("HAS_BIAS", False), ("NGROUP", 1), ("TOPKG", 1), ("NORM", True),
             ("SHARE_ROUTE", share_route)])
