"""LongCat-Flash: softmax over n_routed_experts + zero_expert_num; the
e_score_correction_bias only shifts the choice; weights are the unbiased
probabilities (renormalized if norm_topk_prob) x routed_scaling_factor.

Ids >= n_routed_experts are identity ("zero-computation") experts: no FFN
work at all, the backend adds weight * x.  (mlx-lm remaps them to expert 0
with weight 0 and still computes expert 0.)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..experts import Experts
from ..moe import MoELayer
from ..router import RouterParams
from .base import Family, normalize_rope, rename


class LongcatRouter(nn.Module):
    """Checkpoint names `mlp.router.classifier`, `mlp.router.e_score_correction_bias`."""

    def __init__(self, args):
        super().__init__()
        n = args.n_routed_experts + args.zero_expert_num
        self.classifier = nn.Linear(args.hidden_size, n, bias=args.router_bias)
        self.e_score_correction_bias = mx.zeros((n,))


class LongcatFlashBlock(MoELayer):
    def __init__(self, args):
        if args.zero_expert_num and args.zero_expert_type != "identity":
            raise ValueError(
                f"longcat_flash zero_expert_type {args.zero_expert_type!r} is not supported (only 'identity')"
            )
        super().__init__(args.n_routed_experts, args.moe_topk, n_identity=args.zero_expert_num)
        self.norm_topk_prob = args.norm_topk_prob
        self.scaling = args.routed_scaling_factor
        self.router = LongcatRouter(args)
        self.switch_mlp = Experts(args.hidden_size, args.expert_ffn_hidden_size, args.n_routed_experts)

    def router_logits(self, x):
        return self.router.classifier(x)

    def router_params(self):
        return RouterParams(self.top_k, bias=self.router.e_score_correction_bias,
                            normalize=self.norm_topk_prob, scaling=self.scaling)


def normalize_config(config: dict) -> dict:
    normalize_rope(config)
    rename(config, "num_layers", "num_hidden_layers")
    rename(config, "moe_topk", "num_experts_per_tok")
    # transformers 5 leaves out what its implementation fixes: MLA attention,
    # identity zero experts, and both MLA LoRA scalings on.
    config.setdefault("attention_method", "MLA")
    config.setdefault("zero_expert_type", "identity")
    config.setdefault("zero_expert_num", 0)
    config.setdefault("mla_scale_q_lora", True)
    config.setdefault("mla_scale_kv_lora", True)
    config.setdefault("attention_bias", False)
    return config


def sanitize(weights: dict, args) -> dict:
    # transformers 5 saves gate/up tensors for the identity experts; they have no FFN.
    n = args.n_routed_experts
    return {
        k: v for k, v in weights.items()
        if not (".mlp.experts." in k and int(k.split(".mlp.experts.")[1].split(".")[0]) >= n)
    }


FAMILY = Family(
    model_type="longcat_flash",
    block_name="LongcatFlashMoE",
    block=LongcatFlashBlock,
    normalize_config=normalize_config,
    sanitize=sanitize,
)
