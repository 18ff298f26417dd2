"""What a model family tells the loader.

A family is one mlx-lm model module plus:
- `block`: our MoE block class, built in place of mlx-lm's (`block_name`)
  while mlx-lm constructs the model, so mlx-lm's own block is never built
  (qwen2_moe's crashes on shared_expert_intermediate_size = 0);
- `normalize_config`: accept both config dialects (hub checkpoints and
  transformers 5's save_pretrained) and fill what mlx-lm's ModelArgs needs;
- `is_moe_layer`: which decoder layers are MoE (the loader checks the built
  model against it and replaces what mlx-lm gets wrong with `dense_mlp`);
- `sanitize`: weight fixups before mlx-lm's own sanitize (tensors that one
  dialect has and our layers do not: identity experts' weights, a zero-sized
  shared expert).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import mlx.nn as nn


@dataclass
class Family:
    model_type: str
    block_name: str  # the MoE block class name in mlx_lm.models.<model_type>
    block: type  # our MoELayer subclass, constructed as block(args)
    moe_attr: str = "mlp"  # attribute of a decoder layer holding the MoE block
    normalize_config: Callable[[dict], dict] = lambda c: c
    is_moe_layer: Optional[Callable[[object, int], bool]] = None
    dense_mlp: Optional[Callable[[object], nn.Module]] = None
    sanitize: Callable[[dict, object], dict] = lambda w, args: w


def normalize_rope(config: dict) -> dict:
    """transformers 5 writes `rope_parameters`; mlx-lm reads `rope_theta` + `rope_scaling`."""
    rp = config.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" not in config and "rope_theta" in rp:
            config["rope_theta"] = rp["rope_theta"]
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type not in (None, "default") and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
            config["rope_scaling"].setdefault("type", rope_type)
    return config


def rename(config: dict, new: str, *old: str) -> None:
    """Set config[new] from the first present alias in `old` if `new` is missing."""
    if new in config:
        return
    for name in old:
        if name in config:
            config[new] = config[name]
            return


def drop_keys(weights: Dict, pattern: str) -> Dict:
    rx = re.compile(pattern)
    return {k: v for k, v in weights.items() if not rx.search(k)}


def arg(args, name: str, default=None):
    """A config value: mlx-lm's ModelArgs field, else the raw config (ModelArgs
    drops keys it does not know, e.g. qwen2_moe's norm_topk_prob)."""
    if hasattr(args, name):
        return getattr(args, name)
    return getattr(args, "config", {}).get(name, default)
