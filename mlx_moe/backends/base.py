"""The expert-compute interface every backend implements.

One call computes a whole MoE layer's routed part for a batch of tokens:

    y[t] = sum_j  w[t, j] * FFN_{ids[t, j]}(x[t])     for real experts (0 <= id < E)
         + sum_j  w[t, j] * x[t]                        for identity experts (E <= id < E + n_identity)

Ids outside [0, E + n_identity) are padding: they contribute nothing and are
never read (expert-parallel ranks use them for experts held elsewhere).
FFN is SwiGLU: down(silu(gate(x)) * up(x)).

Inputs: x [T, D] (the layer's activation dtype), ids [T, k] int32,
weights [T, k] float32, `experts` an `mlx_moe.experts.Experts`.
Output: [T, D] in x's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..experts import Experts
from ..router import RouterParams
from ..router import route as reference_route


@dataclass
class ExpertStats:
    """Counts of FFN work a backend dispatched: (token, expert) pairs."""

    calls: int = 0
    rows: int = 0  # (token, real expert) FFN evaluations dispatched

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0


class ExpertBackend:
    name = "base"

    def __init__(self) -> None:
        self.stats = ExpertStats()

    def supports(self, experts: Experts) -> bool:
        return True

    def route(self, logits: mx.array, params: RouterParams):
        """Router logits [T, n] -> (ids int32 [T, k], weights float32 [T, k]) by the
        family's rule; kernel backends override this with the fused kernel."""
        return reference_route(logits, params)

    def __call__(
        self,
        x: mx.array,
        ids: mx.array,
        weights: mx.array,
        experts: Experts,
        n_identity: int = 0,
    ) -> mx.array:
        raise NotImplementedError


def identity_term(x: mx.array, ids: mx.array, weights: mx.array, n_real: int, n_identity: int) -> mx.array:
    """sum over identity slots of w * x, as [T, D] float32 (LongCat's zero experts)."""
    is_identity = (ids >= n_real) & (ids < n_real + n_identity)
    w = mx.where(is_identity, weights, 0.0).sum(axis=-1, keepdims=True)
    return x.astype(mx.float32) * w
