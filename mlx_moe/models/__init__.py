"""Supported model families: one small module each."""

from . import deepseek_v2, longcat_flash, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Family

FAMILIES = {
    m.FAMILY.model_type: m.FAMILY
    for m in (qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v2, longcat_flash)
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

__all__ = ["FAMILIES", "Family", "SUPPORTED_MODEL_TYPES"]
