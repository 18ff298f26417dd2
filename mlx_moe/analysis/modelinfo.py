"""Expert counts and expert size from a model's config.json (both config dialects)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

# Keys differ by family and by dialect (hub checkpoints vs transformers-5 save_pretrained).
_N_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "top_k")
_FFN = ("moe_intermediate_size", "expert_ffn_hidden_size", "intermediate_size")
_DTYPE_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0}


@dataclass
class ModelInfo:
    model_type: Optional[str]
    n_experts: Optional[int]
    n_zero_experts: int
    top_k: Optional[int]
    expert_bytes: Optional[int]
    bytes_rule: str  # how expert_bytes was derived, for the report


def _first(cfg: dict, keys):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def bytes_per_weight(cfg: dict) -> tuple:
    """(bytes per weight, description): MLX affine quantization stores `bits` per weight plus
    one scale and one bias (2 bytes each) per group; unquantized weights take their dtype's size."""
    q = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(q, dict) and "bits" in q:
        bits, gs = int(q["bits"]), int(q.get("group_size", 64))
        return bits / 8 + 4 / gs, f"{bits}-bit, group {gs} (bits/8 + 4/group bytes per weight)"
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return _DTYPE_BYTES.get(dtype, 2.0), f"{dtype}, unquantized"


def model_info(model: str) -> ModelInfo:
    """Read `model/config.json` (or a config file path) for n_experts, zero experts, top-k and
    the bytes of one expert (gate + up + down = 3 * hidden * expert_ffn weights)."""
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model {model}: cannot read {path} ({e}); pass a model directory "
                         "with a config.json, or --n-experts/--expert-bytes instead") from e
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM config inside
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k == "quantization"}}
    n = _first(cfg, _N_EXPERTS)
    zero = int(cfg.get("zero_expert_num") or 0)
    hidden, ffn = cfg.get("hidden_size"), _first(cfg, _FFN)
    eb, rule = None, "unknown"
    if hidden and ffn:
        bpw, desc = bytes_per_weight(cfg)
        eb = int(round(3 * hidden * ffn * bpw))
        rule = f"3 x hidden {hidden} x expert FFN {ffn} x {bpw:g} bytes ({desc}) from {path}"
    return ModelInfo(cfg.get("model_type"), int(n) if n else None, zero,
                     _first(cfg, _TOP_K), eb, rule)
