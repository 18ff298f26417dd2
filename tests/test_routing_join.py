"""The routing join kernel (metal/routing_join.metal) under the CPU emulation of
Metal and on CUDA, against numpy stacking of the per-layer arrays."""

import mlx.core as mx
import pytest

from mlx_moe.kernels.kernel_cases import CASES
from mlx_moe.kernels.routing_join import routing_join

_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


@pytest.mark.parametrize("name", ["routing_join", "routing_join_record"])
def test_emulated(name):
    for case in CASES[name]:
        case.check("emulated")


@pytest.mark.parametrize("name", ["routing_join", "routing_join_record"])
def test_mlx_stand_in(name):
    for case in CASES[name]:
        case.check("mlx")


def test_mismatched_layers_are_refused():
    a, b = mx.zeros((2, 4), mx.int32), mx.zeros((3, 4), mx.float32)
    with pytest.raises(ValueError, match="same \\[T, k\\] shape"):
        routing_join([a, a], [a.astype(mx.float32), b], "emulated")
    with pytest.raises(ValueError, match="one ids and one weights array per layer"):
        routing_join([a, a], [a], "emulated")


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("name", ["routing_join", "routing_join_record"])
def test_cuda(name):
    for case in CASES[name]:
        case.check("cuda")
