"""Expert-compute backends and the rule that picks one.

- `mlx`: MLX's gather_mm / gather_qmm; every device; the test oracle.
- `metal`: the project's Metal kernels (metal/), Apple GPUs.
- `cuda`: their CUDA twins, NVIDIA GPUs through MLX's CUDA backend.

`auto` picks metal on Apple GPUs, cuda on NVIDIA GPUs and mlx on the CPU,
falling back to mlx for what a kernel backend does not cover.
"""

from __future__ import annotations

from typing import Callable, Dict

import mlx.core as mx

from .base import ExpertBackend, ExpertStats
from .mlx import MLXBackend

BACKEND_NAMES = ("auto", "mlx", "metal", "cuda")

# name -> factory; kernel backends register themselves here when importable.
_FACTORIES: Dict[str, Callable[[], ExpertBackend]] = {"mlx": MLXBackend}


def register_backend(name: str, factory: Callable[[], ExpertBackend]) -> None:
    _FACTORIES[name] = factory


def _device_kind() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_backend_name(name: str = "auto") -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown kernels/backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        kind = _device_kind()
        return kind if kind in _FACTORIES and kind != "cpu" else "mlx"
    return name


def get_backend(name: str = "auto") -> ExpertBackend:
    resolved = resolve_backend_name(name)
    if resolved not in _FACTORIES:
        _try_import_kernels()
    if resolved not in _FACTORIES:
        raise RuntimeError(
            f"the {resolved!r} expert backend is not available on this machine "
            f"(device: {_device_kind()}); use --kernels mlx or --kernels auto"
        )
    return _FACTORIES[resolved]()


def _try_import_kernels() -> None:
    try:  # the kernel backends register themselves on import
        from .. import kernels  # noqa: F401
    except ImportError:
        pass


# Register the kernel backends now, so that `auto` sees them (mlx_moe/backends/kernels.py
# registers `metal` / `cuda` only where the device has them).
_try_import_kernels()


__all__ = ["ExpertBackend", "ExpertStats", "MLXBackend", "get_backend", "register_backend", "resolve_backend_name"]
