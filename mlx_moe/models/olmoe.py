"""OLMoE: softmax -> top-k -> renormalize if norm_topk_prob."""

from __future__ import annotations

import mlx.nn as nn

from ..experts import Experts
from ..moe import MoELayer
from ..router import RouterParams
from .base import Family, normalize_rope, rename


class OlmoeBlock(MoELayer):
    def __init__(self, args):
        super().__init__(args.num_experts, args.num_experts_per_tok)
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = Experts(args.hidden_size, args.intermediate_size, args.num_experts, bias=args.mlp_bias)

    def router_logits(self, x):
        return self.gate(x)

    def router_params(self):
        return RouterParams(self.top_k, normalize=self.norm_topk_prob)


def normalize_config(config: dict) -> dict:
    normalize_rope(config)
    rename(config, "num_experts", "num_local_experts")
    return config


FAMILY = Family(
    model_type="olmoe",
    block_name="OlmoeSparseMoeBlock",
    block=OlmoeBlock,
    normalize_config=normalize_config,
)
