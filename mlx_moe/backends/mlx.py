"""The `mlx` expert backend: MLX's gather_mm / gather_qmm.

The reference path and the test oracle for the custom kernels; it runs on
every MLX device.  Pairs are sorted by expert for batches of 64 or more
(token, expert) pairs, as MLX's segmented gather kernels want.

When a layer can route to identity experts or padding ids, only the real
(token, expert) pairs are computed: that needs their count on the host, one
sync per such layer.  This is the reference backend's price for doing no
wasted FFN work; the custom kernels skip such slots on the device instead.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..experts import Experts, gather_project
from .base import ExpertBackend, identity_term

SORT_THRESHOLD = 64  # pairs; below this the unsorted gather is as fast


def swiglu_experts(
    x: mx.array, pair_token: mx.array, pair_expert: mx.array, experts: Experts, sorted_pairs: bool
) -> mx.array:
    """FFN of each (token, expert) pair: [P, D] in x's dtype."""
    xg = x[:, None, :]
    gate = gather_project(xg, experts.gate_proj, pair_expert, lhs=pair_token, sorted_indices=sorted_pairs)
    up = gather_project(xg, experts.up_proj, pair_expert, lhs=pair_token, sorted_indices=sorted_pairs)
    h = nn.silu(gate) * up
    down = gather_project(h, experts.down_proj, pair_expert, sorted_indices=sorted_pairs)
    return down.squeeze(1)


class MLXBackend(ExpertBackend):
    name = "mlx"

    def __call__(self, x, ids, weights, experts, n_identity=0, may_pad=False):
        T, D = x.shape
        k = ids.shape[1]
        E = experts.num_experts
        flat_ids = ids.reshape(-1)
        flat_w = weights.reshape(-1)
        self.stats.calls += 1

        if n_identity or may_pad:
            real = (flat_ids >= 0) & (flat_ids < E)
            n_real = int(real.sum().item())  # host sync: see the module docstring
            y = mx.zeros((T, D), dtype=mx.float32)
            if n_real:
                # Real pairs first, sorted by expert; the rest are dropped.
                order = mx.argsort(mx.where(real, flat_ids, E))[:n_real]
                pair_token = order // k
                pair_expert = flat_ids[order]
                out = swiglu_experts(x, pair_token, pair_expert, experts, sorted_pairs=True)
                y = y.at[pair_token].add(out.astype(mx.float32) * flat_w[order][:, None])
            self.stats.rows += n_real
            if n_identity:
                y = y + identity_term(x, ids, weights, E, n_identity)
            return y.astype(x.dtype)

        P = T * k
        self.stats.rows += P
        if P >= SORT_THRESHOLD:
            order = mx.argsort(flat_ids)
            out = swiglu_experts(x, order // k, flat_ids[order], experts, sorted_pairs=True)
            out = out[mx.argsort(order)]
        else:
            pair_token = mx.arange(P, dtype=mx.int32) // k
            out = swiglu_experts(x, pair_token, flat_ids, experts, sorted_pairs=False)
        y = (out.reshape(T, k, D).astype(mx.float32) * weights[..., None]).sum(axis=1)
        return y.astype(x.dtype)
