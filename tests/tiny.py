"""Tiny checkpoints written directly in the Hugging Face layout (no torch), for
tests that need a real model directory but not the transformers oracle."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import save_file

from mlx_moe.demo import DEMO_CONFIG, demo_weights
from mlx_moe.tokenizer import save_byte_tokenizer

TINY_QWEN3 = {**DEMO_CONFIG, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
              "num_experts": 8, "num_experts_per_tok": 2}


def write_tiny_qwen3(path: Path, config: dict = TINY_QWEN3, seed: int = 0, tokenizer: bool = True) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(demo_weights(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        save_byte_tokenizer(path)
    return path
