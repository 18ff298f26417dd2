"""The built-in demo model: a small random-weight Qwen3-MoE made on first use.

It lets `mlx-moe generate` run on a fresh machine with no network.  Its
weights are random (deterministic from a fixed seed), so its text is
meaningless; it exercises the whole path: loading, routing, expert kernels,
the routing hook and the expert log.  About 7 MB, cached under
$MLX_MOE_CACHE (default ~/.cache/mlx_moe).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .tokenizer import byte_vocab_size, save_byte_tokenizer

DEMO_NAME = "demo-qwen3-moe-v2"

DEMO_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": byte_vocab_size(),
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 256,
    "torch_dtype": "float32",
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_MOE_CACHE", Path.home() / ".cache" / "mlx_moe"))


def demo_weights(config: dict = DEMO_CONFIG, seed: int = 0) -> dict:
    """Random weights in the Hugging Face layout, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    D, I = config["hidden_size"], config["moe_intermediate_size"]
    H, KV, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    E, V = config["num_experts"], config["vocab_size"]

    def w(*shape, fan_in=None):
        std = 1.0 / np.sqrt(fan_in or shape[-1])
        return (rng.standard_normal(shape) * std).astype(np.float32)

    lm_head = w(V, D)
    # Byte tokenizer: only printable ASCII and newlines get non-zero logit rows, so
    # the (meaningless) demo text never writes control bytes to a terminal.
    printable = np.zeros(V, bool)
    printable[32:127] = True
    printable[10] = True
    lm_head[~printable] = 0.0
    out = {"model.embed_tokens.weight": w(V, D, fan_in=1) * 0.5,
           "model.norm.weight": np.ones(D, np.float32),
           "lm_head.weight": lm_head}
    for l in range(config["num_hidden_layers"]):
        p = f"model.layers.{l}"
        out[f"{p}.input_layernorm.weight"] = np.ones(D, np.float32)
        out[f"{p}.post_attention_layernorm.weight"] = np.ones(D, np.float32)
        out[f"{p}.self_attn.q_proj.weight"] = w(H * hd, D)
        out[f"{p}.self_attn.k_proj.weight"] = w(KV * hd, D)
        out[f"{p}.self_attn.v_proj.weight"] = w(KV * hd, D)
        out[f"{p}.self_attn.o_proj.weight"] = w(D, H * hd)
        out[f"{p}.self_attn.q_norm.weight"] = np.ones(hd, np.float32)
        out[f"{p}.self_attn.k_norm.weight"] = np.ones(hd, np.float32)
        out[f"{p}.mlp.gate.weight"] = w(E, D) * 4.0  # a decisive router
        for e in range(E):
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = w(I, D)
            out[f"{p}.mlp.experts.{e}.up_proj.weight"] = w(I, D)
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = w(D, I)
    return out


def demo_model_path() -> Path:
    """The demo model's directory, built on first use (atomically)."""
    path = cache_dir() / DEMO_NAME
    if (path / "model.safetensors").exists():
        return path
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2))
        save_file(demo_weights(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_byte_tokenizer(tmp)
        (tmp / "README.md").write_text(
            "mlx-moe demo model: random weights, meaningless text. "
            "Run a real model with `mlx-moe generate --model <repo or dir>`.\n"
        )
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
