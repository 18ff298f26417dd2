"""mul_mv_id_swiglu_route (metal/mul_mv_id.metal, option ROUTE): the routing rule run
inside the experts' gate/up launch.  Its ids and weights against mlx_moe/router.py's
rule in MLX ops (the reference the router tests hold to transformers), its h against
a numpy oracle of silu(Wg[e] x) * (Wu[e] x) with independently dequantized Q4_0 weights
for the experts it chose; under the CPU emulation of Metal and, marked gpu, on CUDA.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import router as R
from mlx_moe.kernels.mul_mv_id import mul_mv_id_swiglu_route
from mlx_moe.kernels.router import RouterParams

from test_kernels_emulated import _close, _dequant, _q4_words, _silu
from test_router_kernel_emulated import assert_same_routing

_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()
FLAVORS = ["emulated", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")])]

# (experts scored, real experts, rule): Qwen3-MoE's softmax top-8 of 128 with
# normalization, Mixtral's top-2 then softmax, DeepSeek-V2's group-limited rule with
# scaling, and a LongCat-like rule whose scores cover two identity experts past the
# real ones (their slots must not read weights: h rows left unwritten).
RULES = [
    (128, 128, RouterParams(8, normalize=True)),
    (8, 8, RouterParams(2, score="topk_softmax")),
    (64, 64, RouterParams(6, n_group=8, topk_group=3, scaling=16.0)),
    (10, 8, RouterParams(3, normalize=True)),
]
D, F = 96, 40  # hidden (3 Q4_0 blocks), ffn rows (not a multiple of the 4-row tiles)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("nexp,ne,params", RULES, ids=["qwen3", "mixtral", "deepseek_group", "identity"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_routed_swiglu_matches_rule_and_oracle(flavor, nexp, ne, params, tokens):
    rng = np.random.default_rng(nexp + params.k + tokens)
    wg, wu = _q4_words(rng, ne, F, D), _q4_words(rng, ne, F, D)
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    lg = (rng.standard_normal((tokens, nexp)) * 2).astype(np.float32)
    lg[0, ne:] += 6.0  # past the real experts: the identity ones win a slot of token 0
    logits = mx.array(lg).astype(mx.bfloat16)
    h, ids, w = mul_mv_id_swiglu_route(mx.array(x), logits, params, mx.array(wg), mx.array(wu), flavor)
    assert_same_routing((ids, w), R.route(logits, params))
    ids = np.array(ids)
    h = np.array(h)
    assert (ids[0] >= ne).any() == (nexp > ne)
    gd, ud = _dequant(wg), _dequant(wu)
    for t in range(tokens):
        for s in range(params.k):
            e = int(ids[t, s])
            if e < ne:  # real expert: its row of h; identity experts' rows are never read
                want = _silu(gd[e] @ x[t]) * (ud[e] @ x[t])
                _close(h[t * params.k + s], want, f"token {t} slot {s} expert {e}")


def test_routed_swiglu_rejects_rules_it_cannot_run():
    x = mx.zeros((1, D))
    w = mx.array(_q4_words(np.random.default_rng(0), 4, F, D))
    with pytest.raises(ValueError, match="top-k"):
        mul_mv_id_swiglu_route(x, mx.zeros((1, 4)), RouterParams(5), w, w, "emulated")
    with pytest.raises(ValueError, match="logits must be"):
        mul_mv_id_swiglu_route(x, mx.zeros((2, 4)), RouterParams(2), w, w, "emulated")
