"""Qwen3-MoE: softmax (fp32) -> top-k -> renormalize if norm_topk_prob.
Dense layers where decoder_sparse_step / mlp_only_layers say so."""

from __future__ import annotations

import mlx.nn as nn

from ..experts import Experts
from ..moe import MoELayer
from ..router import RouterParams
from .base import Family, arg, normalize_rope, rename


class Qwen3MoeBlock(MoELayer):
    def __init__(self, args):
        super().__init__(args.num_experts, args.num_experts_per_tok)
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = Experts(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def router_logits(self, x):
        return self.gate(x)

    def router_params(self):
        return RouterParams(self.top_k, normalize=self.norm_topk_prob)


def normalize_config(config: dict) -> dict:
    normalize_rope(config)
    rename(config, "num_experts", "num_local_experts")
    return config


def is_moe_layer(args, i: int) -> bool:
    sparse_step = arg(args, "decoder_sparse_step", 1) or 1
    dense = arg(args, "mlp_only_layers", []) or []
    return i not in dense and args.num_experts > 0 and (i + 1) % sparse_step == 0


FAMILY = Family(
    model_type="qwen3_moe",
    block_name="Qwen3MoeSparseMoeBlock",
    block=Qwen3MoeBlock,
    normalize_config=normalize_config,
    is_moe_layer=is_moe_layer,
)
