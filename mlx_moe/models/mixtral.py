"""Mixtral: top-k on the router logits, softmax over the k."""

from __future__ import annotations

import mlx.nn as nn

from ..experts import Experts
from ..moe import MoELayer
from ..router import RouterParams
from .base import Family, normalize_rope, rename


class MixtralBlock(MoELayer):
    def __init__(self, args):
        super().__init__(args.num_local_experts, args.num_experts_per_tok)
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = Experts(args.hidden_size, args.intermediate_size, args.num_local_experts)

    def router_logits(self, x):
        return self.gate(x)

    def router_params(self):
        return RouterParams(self.top_k, score="topk_softmax")


def normalize_config(config: dict) -> dict:
    normalize_rope(config)
    rename(config, "num_local_experts", "num_experts")
    return config


FAMILY = Family(
    model_type="mixtral",
    block_name="MixtralSparseMoeBlock",
    block=MixtralBlock,
    moe_attr="block_sparse_moe",
    normalize_config=normalize_config,
)
