"""The project's MoE layer: router -> top-k -> expert compute -> weighted combine
-> shared expert -> routing hook.

Each family (mlx_moe/models/) subclasses `MoELayer` with its own parameter
names (those of mlx-lm's sanitized checkpoints) and implements
`router_logits` and `router_params` (its routing rule), and `shared_output`
where it has a shared expert.  Everything else is here:

- expert compute goes through the layer's `ExpertBackend` (one object shared
  by all layers of a model, set by `set_expert_backend`);
- identity ("zero-computation") experts, ids in [E, E + n_identity), get no
  FFN work: the backend adds weight * x for them;
- the routing hook gets the layer's lazy (ids, weights); nothing is
  evaluated here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .backends import ExpertBackend, MLXBackend
from .experts import Experts
from .hooks import HOOKS
from .router import RouterParams

_DEFAULT_BACKEND = MLXBackend()


class MoELayer(nn.Module):
    """Base class of the per-family MoE blocks.  Subclasses must set
    `self.switch_mlp` (an `Experts`) and implement `router_logits` and
    `router_params`."""

    def __init__(self, num_experts: int, top_k: int, n_identity: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.n_identity = n_identity
        self.layer_idx = -1  # index among all decoder layers; set by the loader
        self.backend: ExpertBackend = _DEFAULT_BACKEND

    # -- per family ----------------------------------------------------------------------

    def router_logits(self, x: mx.array) -> mx.array:
        """x [T, D] -> router logits [T, n] (n counts identity experts too)."""
        raise NotImplementedError

    def router_params(self) -> RouterParams:
        """The family's routing rule (mlx_moe.router.RouterParams)."""
        raise NotImplementedError

    def route(self, x: mx.array) -> Tuple[mx.array, mx.array]:
        """x [T, D] -> (ids int32 [T, k], weights float32 [T, k]): the rule run by
        the backend (MLX ops, or the fused router kernel on the kernel backends)."""
        return self.backend.route(self.router_logits(x), self.router_params())

    def shared_output(self, x: mx.array) -> Optional[mx.array]:
        """The shared expert's contribution [T, D], or None where there is none."""
        return None

    @property
    def has_shared_expert(self) -> bool:
        """Whether shared_output adds anything (a kernel that runs the routed experts right
        after the router, in one launch, has no place for it)."""
        return False

    # -- common --------------------------------------------------------------------------

    @property
    def experts(self) -> Experts:
        return self.switch_mlp

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        y = self.backend(x, ids, weights, self.switch_mlp, n_identity=self.n_identity)
        shared = self.shared_output(x)
        if shared is not None:
            y = y + shared
        if HOOKS.active:
            HOOKS.record(self.layer_idx, ids, weights, self.num_experts, self.n_identity, self.top_k)
        return y.reshape(shape)


def moe_layers(model: nn.Module):
    """The model's MoE layers, in decoder-layer order."""
    layers = [m for _, m in model.named_modules() if isinstance(m, MoELayer)]
    return sorted(layers, key=lambda m: m.layer_idx)


def set_expert_backend(model: nn.Module, backend: ExpertBackend) -> None:
    """Route every MoE layer of `model` through `backend` (shared, so its stats add up)."""
    for layer in moe_layers(model):
        layer.backend = backend
