"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): softmax -> top-k, renormalized only
if norm_topk_prob; a shared expert MLP scaled by sigmoid(shared_expert_gate(x)).

shared_expert_intermediate_size == 0 means no shared expert at all: no
module, no weights, no compute (mlx-lm 0.32.2 crashes on it; transformers
builds zero-sized tensors whose contribution is exactly zero).
mlx-lm builds every layer as MoE; transformers honours decoder_sparse_step
and mlp_only_layers, and so do we.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.qwen2_moe import MLP

from ..experts import Experts
from ..moe import MoELayer
from ..router import RouterParams
from .base import Family, arg, drop_keys, normalize_rope, rename
from .qwen3_moe import is_moe_layer


class Qwen2MoeBlock(MoELayer):
    def __init__(self, args):
        super().__init__(args.num_experts, args.num_experts_per_tok)
        self.norm_topk_prob = bool(arg(args, "norm_topk_prob", False))
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = Experts(args.hidden_size, args.moe_intermediate_size, args.num_experts)
        if args.shared_expert_intermediate_size > 0:
            self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    @property
    def has_shared_expert(self) -> bool:
        return "shared_expert" in self

    def router_logits(self, x):
        return self.gate(x)

    def router_params(self):
        return RouterParams(self.top_k, normalize=self.norm_topk_prob)

    def shared_output(self, x):
        if "shared_expert" not in self:
            return None
        return mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def normalize_config(config: dict) -> dict:
    normalize_rope(config)
    rename(config, "num_experts", "num_local_experts")
    config.setdefault("shared_expert_intermediate_size", 0)
    return config


def sanitize(weights: dict, args) -> dict:
    if args.shared_expert_intermediate_size == 0:
        # transformers saves zero-sized shared-expert tensors (and a gate whose
        # output multiplies nothing): drop them, there is no shared expert.
        weights = drop_keys(weights, r"\.mlp\.shared_expert(_gate)?\.")
    return weights


FAMILY = Family(
    model_type="qwen2_moe",
    block_name="Qwen2MoeSparseMoeBlock",
    block=Qwen2MoeBlock,
    normalize_config=normalize_config,
    is_moe_layer=is_moe_layer,
    dense_mlp=lambda args: MLP(args.hidden_size, args.intermediate_size),
    sanitize=sanitize,
)
