"""Kernel sources -> kernel objects, each built once per process and flavor.

A kernel family is one file in `metal/` (e.g. `mul_mv_id.metal`) holding a
`helpers` section and one `kernel: <name>` section per kernel body, written in
Metal.  Three flavors build kernels from the same text:

- `metal`: `mx.fast.metal_kernel`, header = shims_metal.h + helpers;
- `cuda`: `mx.fast.cuda_kernel`, header = shims_cuda.h + helpers (the shims
  map the Metal names onto CUDA);
- `emulated`: `mlx_moe.emulation.metal_kernel` (the Metal sources compiled as
  C++ and run on the CPU), header as for `metal`.

MLX caches compiled kernels per process, keyed by name and source, but a
kernel object is cheap to keep and costly to rebuild; `get_kernel` creates
each one once.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import mlx.core as mx

FLAVORS = ("metal", "cuda", "emulated")
_SECTION = re.compile(r"^// ==== (helpers|kernel: (\w+)) ====\s*$", re.M)


def metal_dir() -> Path:
    """The kernel sources: `mlx_moe/metal` in a wheel, `<repo>/metal` in a checkout."""
    here = Path(__file__).resolve().parent.parent  # the mlx_moe package
    for cand in (here / "metal", here.parent / "metal"):
        if (cand / "mul_mv_id.metal").is_file():
            return cand
    raise FileNotFoundError(
        f"mlx-moe's kernel sources (metal/*.metal) are missing: looked in {here / 'metal'} and "
        f"{here.parent / 'metal'}; reinstall the package (pip install -e . from the repository)"
    )


@lru_cache(maxsize=None)
def read_family(family: str) -> Tuple[str, Dict[str, str]]:
    """(helpers text, {kernel name: body}) of metal/<family>.metal."""
    text = (metal_dir() / f"{family}.metal").read_text()
    marks = list(_SECTION.finditer(text))
    helpers = ""
    bodies: Dict[str, str] = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        chunk = text[m.end():end]
        if m.group(1) == "helpers":
            helpers = chunk
        else:
            bodies[m.group(2)] = chunk
    if not bodies:
        raise ValueError(f"metal/{family}.metal has no '// ==== kernel: <name> ====' sections")
    return helpers, bodies


def kernel_names() -> Dict[str, str]:
    """{kernel name: family} of every `kernel:` section in metal/*.metal, i.e. every
    kernel the flavors can build (tools/verify_metal.py checks each has verification cases)."""
    names: Dict[str, str] = {}
    for path in sorted(metal_dir().glob("*.metal")):
        for name in read_family(path.stem)[1]:
            names[name] = path.stem
    return names


@lru_cache(maxsize=None)
def _shims(flavor: str) -> str:
    name = "shims_cuda.h" if flavor == "cuda" else "shims_metal.h"
    return (metal_dir() / name).read_text()


def _maker(flavor: str) -> Callable:
    if flavor == "metal":
        return mx.fast.metal_kernel
    if flavor == "cuda":
        return mx.fast.cuda_kernel
    if flavor == "emulated":
        from ..emulation import metal_kernel  # CPU emulation of the Metal kernel environment

        return metal_kernel
    raise ValueError(f"unknown kernel flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")


_KERNELS: Dict[Tuple[str, str, str], object] = {}


def get_kernel(flavor: str, family: str, name: str, inputs: List[str], outputs: List[str]):
    """The kernel object for `name` of metal/<family>.metal, built on first use."""
    key = (flavor, family, name)
    kernel = _KERNELS.get(key)
    if kernel is None:
        helpers, bodies = read_family(family)
        if name not in bodies:
            raise KeyError(f"metal/{family}.metal has no kernel {name!r} (has: {', '.join(bodies)})")
        header = _shims(flavor) + "\n" + helpers
        kernel = _maker(flavor)(
            name=f"mlx_moe_{name}", input_names=list(inputs), output_names=list(outputs),
            source=bodies[name], header=header,
        )
        _KERNELS[key] = kernel
    return kernel
