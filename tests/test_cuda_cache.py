"""mlx_moe.kernels.cuda_cache: the CUDA context's L1 / shared-memory preference, the
tools' `--cache-preference`.  Its errors everywhere; on the GPU (marked gpu) the
runtime MLX loaded reports back what was set."""

from __future__ import annotations

import argparse

import mlx.core as mx
import pytest

from mlx_moe.kernels import cuda_cache

_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


def test_unknown_preference_is_named():
    with pytest.raises(ValueError, match="'big'.*none, shared, l1, equal"):
        cuda_cache.set_cache_preference("big")


@pytest.mark.skipif(_HAS_CUDA, reason="the error of a machine without CUDA")
def test_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        cuda_cache.set_cache_preference("shared")


def test_tool_option_defaults_to_untouched(capsys):
    p = argparse.ArgumentParser()
    cuda_cache.add_argument(p)
    assert p.parse_args([]).cache_preference == "none"
    cuda_cache.apply("none")  # sets nothing, needs no GPU
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit):
        p.parse_args(["--cache-preference", "big"])


def test_loaded_libraries_reads_this_process_mappings():
    """The libraries this process has mapped (how the runtime and NVRTC MLX loaded are
    found): MLX's own core library is among them, a name nothing has is not."""
    import os

    core = cuda_cache.loaded_libraries("mlx")
    assert any(os.path.basename(p).startswith("libmlx") or "/mlx/" in p for p in core), core
    assert all(os.path.isabs(p) for p in core)
    assert cuda_cache.loaded_libraries("no_such_library_xyz.so") == []


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
def test_preference_is_set_on_mlx_context():
    """Each preference as the runtime reads it back (cudaDeviceGetCacheConfig), and MLX's
    kernels still run after it; none restores the driver's choice."""
    for name, value in cuda_cache.PREFERENCES.items():
        assert cuda_cache.set_cache_preference(name) == value
        x = mx.arange(1024, dtype=mx.float32)
        assert mx.sum(x * 2).item() == 1023 * 1024
    assert cuda_cache.set_cache_preference("none") == 0
