"""DeepSeek-V2: softmax -> (group-limited) greedy top-k -> x routed_scaling_factor
(no renormalization), plus n_shared_experts x moe_intermediate_size shared MLP.
Dense layers before first_k_dense_replace (and off moe_layer_freq)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.deepseek_v2 import DeepseekV2MLP

from ..experts import Experts
from ..moe import MoELayer
from ..router import RouterParams
from .base import Family, normalize_rope, rename


class DeepseekV2Gate(nn.Module):
    """Router weights only (checkpoint name `mlp.gate.weight`)."""

    def __init__(self, args):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))


class DeepseekV2Block(MoELayer):
    def __init__(self, args):
        super().__init__(args.n_routed_experts, args.num_experts_per_tok)
        self.topk_method = args.topk_method
        self.n_group = args.n_group
        self.topk_group = args.topk_group
        self.scaling = args.routed_scaling_factor
        self.gate = DeepseekV2Gate(args)
        self.switch_mlp = Experts(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = DeepseekV2MLP(
                config=args, intermediate_size=args.moe_intermediate_size * args.n_shared_experts
            )

    def router_logits(self, x):
        return x @ self.gate.weight.T

    def router_params(self):
        if self.topk_method == "group_limited_greedy":
            return RouterParams(self.top_k, n_group=self.n_group, topk_group=self.topk_group, scaling=self.scaling)
        return RouterParams(self.top_k, scaling=self.scaling)

    def shared_output(self, x):
        return self.shared_experts(x) if "shared_experts" in self else None

    @property
    def has_shared_expert(self) -> bool:
        return "shared_experts" in self


def normalize_config(config: dict) -> dict:
    normalize_rope(config)
    rename(config, "n_routed_experts", "num_local_experts", "num_experts")
    # mlx-lm's DeepSeek-V2 attention always builds a YaRN rope; factor 1 with
    # the default betas is exactly the plain rope.
    if not config.get("rope_scaling"):
        config["rope_scaling"] = {"type": "yarn", "factor": 1.0}
    return config


def is_moe_layer(args, i: int) -> bool:
    return (
        args.n_routed_experts is not None
        and i >= args.first_k_dense_replace
        and i % (args.moe_layer_freq or 1) == 0
    )


FAMILY = Family(
    model_type="deepseek_v2",
    block_name="DeepseekV2MoE",
    block=DeepseekV2Block,
    normalize_config=normalize_config,
    is_moe_layer=is_moe_layer,
)
