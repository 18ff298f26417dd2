"""`mlx-moe convert`: Hugging Face checkpoint -> mlx-moe directory -> load -> generate.

Oracles: the gguf package's own Q4_0 quantizer (gguf.quants) for the bytes of
every stacked expert tensor, and transformers (tests/reference_models.py) run
on a float checkpoint holding exactly the weights the converted model holds
(each expert replaced by gguf.quants.dequantize(gguf.quants.quantize(w))).
Both sides then compute in fp32 on the same weights, so logits agree to the
1e-4 * max|logit| of test_reference_models.py and greedy tokens match.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import reference_models as rm

LOGITS_RTOL = 1e-4
N_GENERATE = 8
FAMILY_VARIANTS = ["qwen3_moe_mixed", "qwen2_moe_shared", "mixtral", "olmoe", "deepseek_v2_group", "longcat_flash"]
EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def gguf_q4_0_roundtrip(w: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    return quants.dequantize(quants.quantize(w.astype(np.float32), T.Q4_0), T.Q4_0).reshape(w.shape)


def gguf_q4_0_words(w: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    b = quants.quantize(w.astype(np.float32), T.Q4_0)
    return np.ascontiguousarray(b).view("<u2")


def bf16_round(w: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16).float().numpy()


def hf_checkpoint_with(src: Path, dst: Path, expert_fn, config_update=None, drop=None) -> Path:
    """A copy of a transformers checkpoint with every routed expert matrix
    replaced by expert_fn(w) (and optional config edits / dropped tensors)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in tensors.items():
        if drop and re.search(drop, k):
            continue
        out[k] = np.ascontiguousarray(expert_fn(v), dtype=np.float32) if EXPERT.search(k) else v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def transformers_reference(name: str, path: Path, tokens, prompt):
    model = rm.load_transformers(name, path)
    logits, _ = rm.transformers_logits(model, tokens)
    return logits, rm.transformers_greedy(model, prompt, N_GENERATE)


def mlx_logits(model, tokens) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def run_convert(*args) -> int:
    from mlx_moe.cli import main

    return main(["convert", *map(str, args), "--quiet"])


def all_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(str(f), "numpy") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


# --------------------------------------------------------------------------- #
# round trip, every family
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", FAMILY_VARIANTS)
def test_convert_load_generate_every_family(name, reference_checkpoints, tmp_path):
    import mlx_moe
    from mlx_moe.generation import generate_tokens
    from mlx_moe.q4_0 import Q4_0SwitchLinear

    ref = reference_checkpoints.reference(name)
    out = tmp_path / "q4_0"
    assert run_convert("--hf-path", ref.path, "--out", out) == 0

    # Files: experts stacked under mlx-lm's names, bytes equal to gguf's Q4_0.
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((ref.path / "config.json").read_text())
    assert cfg["mlx_moe"]["expert_format"] == "q4_0"
    assert {k: v for k, v in cfg.items() if k != "mlx_moe"} == src_cfg  # dialect preserved
    src = load_file(str(ref.path / "model.safetensors"))
    got = all_tensors(out)
    stacked = {k: v for k, v in got.items() if ".switch_mlp." in k}
    assert stacked and not any(".experts." in k for k in got)
    n_real = src_cfg.get("n_routed_experts") or src_cfg.get("num_local_experts") or src_cfg.get("num_experts")
    for key, words in stacked.items():
        prefix, proj = key.split(".switch_mlp.")
        proj = proj.split(".")[0]
        hf_proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj] if name == "mixtral" else proj
        assert words.dtype == np.uint16 and words.shape[0] == n_real
        for e in (0, n_real - 1):
            expect = gguf_q4_0_words(src[f"{prefix}.experts.{e}.{hf_proj}.weight"])
            np.testing.assert_array_equal(words[e], expect)
    for k, v in got.items():  # everything else: the source bytes, unchanged
        if ".switch_mlp." not in k:
            np.testing.assert_array_equal(v, src[k])

    model, tok = mlx_moe.load(str(out))
    assert all(isinstance(layer.switch_mlp.gate_proj, Q4_0SwitchLinear) for layer in mlx_moe.moe_layers(model))

    dq = hf_checkpoint_with(ref.path, tmp_path / "dq", gguf_q4_0_roundtrip)
    want_logits, want_tokens = transformers_reference(name, dq, ref.tokens, ref.prompt)
    got_logits = mlx_logits(model, ref.tokens)
    scale = np.abs(want_logits).max()
    assert np.abs(got_logits - want_logits).max() <= LOGITS_RTOL * scale
    # Generation through the KV cache, and the tokenizer that came along.
    assert list(generate_tokens(model, ref.prompt, max_tokens=N_GENERATE)) == want_tokens
    text = mlx_moe.generate(model, tok, bytes(ref.prompt).decode(), max_tokens=2)
    assert isinstance(text, str)


def test_bf16_experts_and_f16_rest(reference_checkpoints, tmp_path):
    import mlx.core as mx
    import mlx_moe

    ref = reference_checkpoints.reference("qwen3_moe_mixed")
    out = tmp_path / "bf16"
    assert run_convert("--hf-path", ref.path, "--out", out, "--quant", "bf16", "--dtype", "float16") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlx_moe"]["expert_format"] == "float"
    src = load_file(str(ref.path / "model.safetensors"))
    w = mx.load(str(out / "model.safetensors"))
    gate = w["model.layers.1.mlp.switch_mlp.gate_proj.weight"]
    assert gate.dtype == mx.bfloat16 and gate.shape == (8, 32, 32)
    expect = np.stack([bf16_round(src[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]) for e in range(8)])
    np.testing.assert_array_equal(np.array(gate.astype(mx.float32)), expect)
    q = w["model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == mx.float16
    np.testing.assert_array_equal(np.array(q), src["model.layers.1.self_attn.q_proj.weight"].astype(np.float16))
    model, _ = mlx_moe.load(str(out), tokenizer=False)
    assert mlx_logits(model, ref.tokens).shape == ref.logits.shape


def test_sharded_output_with_index(reference_checkpoints, tmp_path):
    import mlx_moe

    ref = reference_checkpoints.reference("mixtral")
    one, many = tmp_path / "one", tmp_path / "many"
    assert run_convert("--hf-path", ref.path, "--out", one) == 0
    assert run_convert("--hf-path", ref.path, "--out", many, "--max-shard-size", "0.00002") == 0
    shards = sorted(many.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    a, b = all_tensors(one), all_tensors(many)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    model, _ = mlx_moe.load(str(many), tokenizer=False)
    assert len(mlx_moe.moe_layers(model)) == 2


# --------------------------------------------------------------------------- #
# shared experts
# --------------------------------------------------------------------------- #

def _count_shared_calls(model, tokens) -> int:
    """Calls of the shared-expert MLP class during one forward pass."""
    from mlx_lm.models import qwen2_moe

    calls = []
    original = qwen2_moe.MLP.__call__

    def spy(self, x):
        calls.append(x.shape)
        return original(self, x)

    qwen2_moe.MLP.__call__ = spy
    try:
        mlx_logits(model, tokens)
    finally:
        qwen2_moe.MLP.__call__ = original
    return len(calls)


def test_zero_shared_expert_writes_and_computes_none(reference_checkpoints, tmp_path):
    import mlx.nn as nn
    import mlx_moe

    ref = reference_checkpoints.reference("qwen2_moe_shared")
    keep, zero = tmp_path / "keep", tmp_path / "zero"
    assert run_convert("--hf-path", ref.path, "--out", keep) == 0
    assert run_convert("--hf-path", ref.path, "--out", zero, "--zero-shared-expert") == 0

    assert json.loads((zero / "config.json").read_text())["shared_expert_intermediate_size"] == 0
    assert not any("shared" in k for k in all_tensors(zero))
    assert any("shared_expert." in k for k in all_tensors(keep))

    with_shared, _ = mlx_moe.load(str(keep), tokenizer=False)
    without, _ = mlx_moe.load(str(zero), tokenizer=False)
    for layer in mlx_moe.moe_layers(without):
        assert not layer.has_shared_expert
        assert not any("shared" in k for k, _ in nn.utils.tree_flatten(layer.parameters()))
    # The spy sees the shared expert run once per layer in the control, never without it.
    assert _count_shared_calls(with_shared, ref.tokens) == len(mlx_moe.moe_layers(with_shared))
    assert _count_shared_calls(without, ref.tokens) == 0

    # And the numbers: transformers with shared_expert_intermediate_size = 0
    # (zero-width shared expert) on the same weights.
    dq = hf_checkpoint_with(ref.path, tmp_path / "dq", gguf_q4_0_roundtrip,
                            config_update={"shared_expert_intermediate_size": 0}, drop=r"\.shared_expert(_gate)?\.")
    want, _ = transformers_reference("qwen2_moe_noshared", dq, ref.tokens, ref.prompt)
    got = mlx_logits(without, ref.tokens)
    assert np.abs(got - want).max() <= LOGITS_RTOL * np.abs(want).max()


def test_source_without_shared_expert_writes_no_shared_tensors(reference_checkpoints, tmp_path):
    ref = reference_checkpoints.reference("qwen2_moe_noshared")
    # transformers 5 saves zero-sized shared-expert tensors for size 0.
    assert any("shared_expert" in k for k in load_file(str(ref.path / "model.safetensors")))
    out = tmp_path / "out"
    assert run_convert("--hf-path", ref.path, "--out", out) == 0
    assert not any("shared" in k for k in all_tensors(out))


def test_zero_shared_expert_deepseek(reference_checkpoints, tmp_path):
    import mlx_moe

    ref = reference_checkpoints.reference("deepseek_v2_group")
    out = tmp_path / "out"
    assert run_convert("--hf-path", ref.path, "--out", out, "--zero-shared-expert") == 0
    assert json.loads((out / "config.json").read_text())["n_shared_experts"] == 0
    assert not any("shared" in k for k in all_tensors(out))
    model, _ = mlx_moe.load(str(out), tokenizer=False)
    assert all("shared_experts" not in layer for layer in mlx_moe.moe_layers(model))


# --------------------------------------------------------------------------- #
# memory: streaming, measured on a checkpoint of real per-expert shape
# --------------------------------------------------------------------------- #

def _write_real_shape_checkpoint(path: Path, n_layers=2, n_experts=16, hidden=2048, ffn=768) -> int:
    """Random bf16 Qwen3-30B-A3B-shaped layers (hidden 2048, expert FFN 768,
    32 q / 4 kv heads of 128), fewer experts and a small vocabulary.
    One safetensors shard per layer, as hub checkpoints come.  Returns the
    total bytes of weights."""
    rng = np.random.default_rng(0)

    def bf16(*shape):
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
        return (x >> 16).astype(np.uint16)

    config = {"model_type": "qwen3_moe", "hidden_size": hidden, "intermediate_size": 6144,
              "moe_intermediate_size": ffn, "num_hidden_layers": n_layers, "num_attention_heads": 32,
              "num_key_value_heads": 4, "head_dim": 128, "num_experts": n_experts, "num_experts_per_tok": 8,
              "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "norm_topk_prob": True,
              "tie_word_embeddings": False, "max_position_embeddings": 4096}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    import mlx.core as mx  # numpy has no bfloat16: MLX writes the bf16 files

    total, weight_map = 0, {}
    for layer in range(-1, n_layers):
        tensors = {}
        if layer < 0:
            tensors["model.embed_tokens.weight"] = bf16(512, hidden)
            tensors["lm_head.weight"] = bf16(512, hidden)
            tensors["model.norm.weight"] = bf16(hidden)
        else:
            p = f"model.layers.{layer}"
            tensors[f"{p}.self_attn.q_proj.weight"] = bf16(4096, hidden)
            tensors[f"{p}.self_attn.k_proj.weight"] = bf16(512, hidden)
            tensors[f"{p}.self_attn.v_proj.weight"] = bf16(512, hidden)
            tensors[f"{p}.self_attn.o_proj.weight"] = bf16(hidden, 4096)
            tensors[f"{p}.self_attn.q_norm.weight"] = bf16(128)
            tensors[f"{p}.self_attn.k_norm.weight"] = bf16(128)
            tensors[f"{p}.input_layernorm.weight"] = bf16(hidden)
            tensors[f"{p}.post_attention_layernorm.weight"] = bf16(hidden)
            tensors[f"{p}.mlp.gate.weight"] = bf16(n_experts, hidden)
            for e in range(n_experts):
                tensors[f"{p}.mlp.experts.{e}.gate_proj.weight"] = bf16(ffn, hidden)
                tensors[f"{p}.mlp.experts.{e}.up_proj.weight"] = bf16(ffn, hidden)
                tensors[f"{p}.mlp.experts.{e}.down_proj.weight"] = bf16(hidden, ffn)
        name = f"model-{layer + 2:05d}-of-{n_layers + 1:05d}.safetensors"
        mx.save_safetensors(str(path / name), {k: mx.array(v).view(mx.bfloat16) for k, v in tensors.items()},
                            metadata={"format": "pt"})
        total += sum(v.nbytes for v in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


MEASURE = textwrap.dedent("""
    import json, sys
    import mlx.core, mlx_moe.q4_0, mlx_moe.convert, tqdm  # imports are not the conversion's memory
    def status(key):  # kB -> bytes; VmHWM is this process image's peak (getrusage's
        # ru_maxrss would also count the parent's resident size at fork time)
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    before = status("VmRSS")
    mlx_moe.convert.convert(sys.argv[1], sys.argv[2], progress=False)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def test_conversion_streams_peak_memory_well_below_model(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    n_experts, hidden, ffn = 16, 2048, 768
    total = _write_real_shape_checkpoint(src, n_layers=2, n_experts=n_experts, hidden=hidden, ffn=ffn)
    layer_experts = n_experts * 3 * hidden * ffn * 2  # one layer's experts, bf16
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out)], capture_output=True, text=True,
                         cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    extra = m["peak"] - m["before"]
    print(f"model {total / 2**20:.0f} MiB, one layer's experts {layer_experts / 2**20:.0f} MiB, "
          f"conversion peak RSS above the imports {extra / 2**20:.1f} MiB")
    # Streaming holds about one expert (6 MiB as float32) and one attention
    # matrix (measured: 29 MiB in all), not a layer (144 MiB of experts here)
    # and certainly not the model.
    assert extra < layer_experts / 2
    assert extra < total / 8
    # The output is complete: every expert of every layer, Q4_0-sized.
    with safe_open(str(out / "model.safetensors"), "numpy") as st:
        shape = st.get_slice("model.layers.1.mlp.switch_mlp.down_proj.weight").get_shape()
    assert shape == [n_experts, hidden, ffn // 32 * 9]


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #

def test_errors_name_the_problem(reference_checkpoints, tmp_path):
    from mlx_moe.convert import ConvertError, convert

    ref = reference_checkpoints.reference("mixtral")

    with pytest.raises(ConvertError, match="mixtral has no shared expert"):
        convert(str(ref.path), str(tmp_path / "a"), zero_shared_expert=True, progress=False)

    convert(str(ref.path), str(tmp_path / "b"), progress=False)
    with pytest.raises(ConvertError, match="already holds model weights"):
        convert(str(ref.path), str(tmp_path / "b"), progress=False)
    with pytest.raises(ConvertError, match="already converted or fused"):
        convert(str(tmp_path / "b"), str(tmp_path / "c"), progress=False)

    # A missing expert.
    d = tmp_path / "missing"
    hf_checkpoint_with(ref.path, d, lambda w: w, drop=r"layers\.1\.block_sparse_moe\.experts\.5\.w2")
    with pytest.raises(ConvertError, match=r"missing experts \[5\] of 8"):
        convert(str(d), str(tmp_path / "d"), progress=False)

    # Columns Q4_0 cannot block (a config with an expert FFN of 48).
    import torch
    v = rm.VARIANTS["mixtral"]
    cfg = dict(v.config, intermediate_size=48)
    model = rm._classes("mixtral")[1](rm._classes("mixtral")[0](**cfg))
    odd = tmp_path / "odd"
    model.save_pretrained(str(odd))
    with pytest.raises(ConvertError, match="48 columns is not a multiple of 32.*--quant f16"):
        convert(str(odd), str(tmp_path / "e"), progress=False)
    convert(str(odd), str(tmp_path / "f16"), quant="f16", progress=False)
    assert not list((tmp_path / "e").glob("*"))  # nothing half-written

    # A source that is already quantized.
    q = tmp_path / "quantized"
    shutil.copytree(ref.path, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="already quantized"):
        convert(str(q), str(tmp_path / "g"), progress=False)
    del torch


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_source_is_a_clear_error(reference_checkpoints, tmp_path, cut):
    from mlx_moe.convert import ConvertError, convert

    ref = reference_checkpoints.reference("olmoe")
    d = tmp_path / "src"
    shutil.copytree(ref.path, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:40] if cut == "header" else data[:-100])
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        convert(str(d), str(tmp_path / "out"), progress=False)
    # The CLI reports it in one line and exits 1.
    assert run_convert("--hf-path", d, "--out", tmp_path / "out2") == 1
