"""The fused router kernel (metal/router.metal): one dispatch from router logits
to (expert ids, routing weights), one simdgroup (CUDA: warp) per token.

It runs the rule of a `mlx_moe.router.RouterParams` (every family's, and
sigmoid scoring), the same as `mlx_moe.router.route` computes with MLX ops.

Differences from mlx_moe/router.py, by design: the k ids of a token come in
selection order (highest score first) instead of argpartition's order, and
equal scores go to the lower expert id (argpartition leaves ties unspecified).

The kernel backends route through it (`KernelBackend.route`): one launch per
MoE layer instead of the five to eight MLX ops of the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from ..router import RouterParams
from .registry import constant, kernel

SCORES = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2}
TOKENS_PER_GROUP = 4  # simdgroups (tokens) per threadgroup


def unsupported(n_experts: int, p: RouterParams) -> Optional[str]:
    """Why the kernel cannot run rule `p` over `n_experts` router outputs, or None
    when it can (one rule for `covers` and for `fused_topk`'s errors)."""
    n = n_experts
    if p.score not in SCORES:
        return f"unknown router score {p.score!r}; choose one of {', '.join(SCORES)}"
    if not 1 <= p.k <= min(n, 32):
        return f"top-k must be in 1..min(experts, 32) = {min(n, 32)}; got k={p.k}"
    if p.n_group > 1 and (n % p.n_group or not 1 <= p.topk_group <= p.n_group):
        return (f"group-limited routing needs experts ({n}) divisible by n_group ({p.n_group}) "
                f"and 1 <= topk_group ({p.topk_group}) <= n_group")
    if p.n_group > 1 and p.k > p.topk_group * (n // p.n_group):
        return f"k={p.k} exceeds the experts of the {p.topk_group} kept groups"
    if p.bias is not None and p.bias.shape != (n,):
        return f"router bias must have shape ({n},); got {tuple(p.bias.shape)}"
    return None


def covers(n_experts: int, p: RouterParams) -> bool:
    """Whether the kernel runs rule `p` over `n_experts` router outputs (else
    the caller uses mlx_moe.router.route)."""
    return unsupported(n_experts, p) is None


def check_logits(logits: mx.array, p: RouterParams) -> None:
    """Raise ValueError unless the kernels can run rule `p` on router logits [T, experts]."""
    if logits.ndim != 2:
        raise ValueError(f"router logits must be [tokens, experts]; got shape {tuple(logits.shape)}")
    problem = unsupported(logits.shape[1], p)
    if problem is not None:
        raise ValueError(problem)


def rule_arguments(n_experts: int, params: RouterParams):
    """(inputs [bias, scale], template) of routing rule `params` over `n_experts` router
    outputs, as moe_router_topk and mul_mv_id_swiglu_route (its ROUTE option) take them."""
    has_bias = params.bias is not None
    bias = params.bias.astype(mx.float32) if has_bias else constant(0.0)
    n_group = max(1, params.n_group)
    template = [("NEXP", n_experts), ("VPL", -(-n_experts // 32)), ("SCORE", SCORES[params.score]),
                ("HAS_BIAS", has_bias), ("NGROUP", n_group), ("TOPKG", params.topk_group if n_group > 1 else 1),
                ("NORM", bool(params.normalize))]
    return [bias, constant(params.scaling)], template


def fused_topk(logits: mx.array, params: RouterParams, flavor: str) -> Tuple[mx.array, mx.array]:
    """(ids [T, k] int32, weights [T, k] float32) of the family's routing rule, in one kernel.

    Same result as the mlx_moe/router.py function of the family up to the
    order of the k ids (here: highest score first) and float32 rounding.
    """
    check_logits(logits, params)
    T, n = logits.shape
    inputs, template = rule_arguments(n, params)
    tpg = TOKENS_PER_GROUP
    return tuple(kernel(flavor, "moe_router_topk")(
        inputs=[logits, *inputs],
        template=[("T", logits.dtype), ("K", params.k), *template, ("TPG", tpg)],
        grid=(max(1, -(-T // tpg)) * 32 * tpg, 1, 1), threadgroup=(32 * tpg, 1, 1),
        output_shapes=[(T, params.k), (T, params.k)], output_dtypes=[mx.int32, mx.float32],
    ))
