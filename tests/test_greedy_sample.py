"""Greedy sampling in one launch (metal/sample.metal, mlx_moe/kernels/sample.py): the
kernel under the CPU emulation of Metal and on CUDA against MLX's logsumexp and argmax
(kernel_cases), and the compiled decode step's greedy path against its sampler path."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import compiled as C
from mlx_moe.kernels.kernel_cases import CASES
from mlx_moe.kernels.sample import greedy_sample

_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


@pytest.mark.parametrize("flavor", ["emulated", "mlx"])
def test_greedy_sample_matches_mlx_ops(flavor):
    for case in CASES["greedy_sample"]:
        case.check(flavor)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one row of logits"):
        greedy_sample(mx.zeros((2, 8)), "emulated")
    with pytest.raises(ValueError, match="dtype"):
        greedy_sample(mx.zeros((8,), mx.int32), "emulated")
    with pytest.raises(ValueError, match="new_counter"):
        greedy_sample(mx.zeros((50000,)), "emulated", mx.zeros((6,), mx.uint32))


def _tokens_and_logprobs(model, sampler, n=10):
    from test_compiled_decode import PROMPT, compiled

    return compiled(model, PROMPT, n, sampler=sampler)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_compiled_greedy_path_matches_the_sampler_path(family):
    """The default sampler (and `greedy`) take the step's own pick (step_greedy, lazy
    log-probabilities); any other sampler runs on the step's log-probabilities: same tokens,
    same log-probabilities."""
    from test_compiled_decode import tiny_model

    model = tiny_model(family)
    want, want_lp = _tokens_and_logprobs(model, lambda lp: mx.argmax(lp, axis=-1))
    for sampler in (None, C.greedy):
        got, got_lp = _tokens_and_logprobs(model, sampler)
        assert got == want
        np.testing.assert_allclose(got_lp, want_lp, rtol=1e-6, atol=1e-6)
    decoder = C.decoder_for(model)
    assert any(key[4] for key in decoder._compiled), "the greedy path never ran"


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
def test_cuda():
    for case in CASES["greedy_sample"]:
        case.check("cuda")
