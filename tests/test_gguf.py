"""GGUF MoE files: `mlx_moe.load("model.gguf")`.

The test files are written with the gguf package's GGUFWriter from the tiny
transformers reference checkpoints, following llama.cpp's converter as the
gguf package describes it: tensor names from gguf's own HF -> GGUF name map
(gguf.get_tensor_name_map), experts stacked [E, rows, cols] and quantized by
gguf.quants, llama-arch q/k rows permuted, DeepSeek-V2's kv_b split into
attn_k_b (transposed per head) and attn_v_b, metadata under gguf.constants'
keys, a gpt2-style tokenizer (the project's byte tokenizer) in the metadata.
The oracle is transformers run on the same weights dequantized by
gguf.quants.  Nothing on the test side shares code with mlx_moe/gguf.py.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import reference_models as rm
from test_convert import LOGITS_RTOL, N_GENERATE, hf_checkpoint_with, mlx_logits, transformers_reference

ARCH = {"qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "mixtral": "LLAMA", "olmoe": "OLMOE",
        "deepseek_v2": "DEEPSEEK2"}
GGUF_VARIANTS = ["qwen3_moe_mixed", "qwen2_moe_shared", "qwen2_moe_noshared", "mixtral", "olmoe",
                 "deepseek_v2_group", "deepseek_v2_qlora_yarn"]


def gguf_roundtrip(qtype):
    from gguf import quants

    def fn(w):
        if qtype.name in ("F32", "F16"):
            return w.astype(np.float16).astype(np.float32) if qtype.name == "F16" else w
        return quants.dequantize(quants.quantize(w.astype(np.float32), qtype), qtype).reshape(w.shape)

    return fn


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (rotate-half rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_tokenizer_metadata(writer) -> None:
    from gguf import TokenType

    from mlx_moe.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, _bytes_to_unicode

    table = _bytes_to_unicode()
    tokens = [table[b] for b in range(256)] + SPECIAL_TOKENS
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.NORMAL] * 256 + [TokenType.CONTROL] * len(SPECIAL_TOKENS))
    # A byte vocabulary has no merges, and GGUFWriter drops empty arrays;
    # transformers then recovers merges from the scores (there are none to find).
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_eos_token_id(256)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf(ref_path: Path, out: Path, expert_type="Q4_0", split_kv_b=True, arch_name=None,
               edit_meta=None, tensor_types=None) -> Path:
    """A GGUF of a transformers reference checkpoint, the way llama.cpp's converter lays it out."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    cfg = json.loads((ref_path / "config.json").read_text())
    family = cfg["model_type"]
    arch = getattr(gguf.MODEL_ARCH, ARCH[family])
    n_layers = cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    # llama.cpp's qwen3moe has no dense layers, the reference checkpoints do:
    # those get gguf's generic dense-FFN names (blk.N.ffn_gate/up/down).
    dense_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    state = load_file(str(ref_path / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), arch_name or gguf.MODEL_ARCH_NAMES[arch])

    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]
    meta = {
        "block_count": n_layers, "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
        "head_count": cfg["num_attention_heads"], "head_count_kv": cfg["num_key_value_heads"],
        "layer_norm_rms_eps": cfg["rms_norm_eps"], "rope_freq_base": cfg["rope_parameters"]["rope_theta"],
        "expert_count": n_experts, "expert_used_count": cfg["num_experts_per_tok"],
    }
    if family != "mixtral":
        meta["expert_feed_forward_length"] = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    if cfg.get("head_dim") and family != "deepseek_v2":
        meta["key_length"] = meta["value_length"] = cfg["head_dim"]
    if cfg.get("norm_topk_prob"):
        meta["expert_weights_norm"] = True
    if family == "qwen2_moe":
        meta["expert_shared_feed_forward_length"] = cfg["shared_expert_intermediate_size"]
    if family == "deepseek_v2":
        rope = cfg["rope_parameters"]
        meta.update(
            head_count_kv=1, leading_dense_block_count=cfg["first_k_dense_replace"],
            kv_lora_rank=cfg["kv_lora_rank"], key_length=cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"],
            value_length=cfg["kv_lora_rank"], key_length_mla=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
            value_length_mla=cfg["v_head_dim"], expert_shared_count=cfg["n_shared_experts"],
            expert_weights_scale=cfg["routed_scaling_factor"], rope_dimension_count=cfg["qk_rope_head_dim"],
            expert_gating_func=gguf.ExpertGatingFuncType.SOFTMAX,
        )
        if cfg.get("q_lora_rank"):
            meta["q_lora_rank"] = cfg["q_lora_rank"]
        if cfg.get("topk_method") == "group_limited_greedy":
            meta.update(expert_group_count=cfg["n_group"], expert_group_used_count=cfg["topk_group"])
        if rope.get("rope_type") == "yarn":
            meta.update(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=rope["factor"],
                        rope_scaling_orig_ctx_len=rope["original_max_position_embeddings"],
                        rope_scaling_yarn_log_mul=0.1 * rope["mscale_all_dim"])
    meta.update(edit_meta or {})
    for key, value in meta.items():
        getattr(writer, f"add_{key}")(value)
    byte_tokenizer_metadata(writer)

    def add(name: str, w: np.ndarray, qtype=T.F32):
        qtype = (tensor_types or {}).get(name, qtype)
        if qtype == T.F32:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == T.F16:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float16))
        else:
            writer.add_tensor(name, quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)

    experts: dict = {}
    for key, w in state.items():
        parts = key.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            stacked = ".".join(parts[: i + 1] + parts[i + 2 : -1])  # ...experts.gate_proj
            experts.setdefault(stacked, {})[int(parts[i + 1])] = w
            continue
        if w.size == 0:  # transformers' zero-width shared expert: llama.cpp writes nothing
            continue
        base = key.rsplit(".", 1)[0]
        if family == "mixtral" and base.endswith(("q_proj", "k_proj")):
            heads = cfg["num_attention_heads"] if base.endswith("q_proj") else cfg["num_key_value_heads"]
            w = llama_permute(w, heads)
        if base.endswith("kv_b_proj") and split_kv_b:
            heads, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = w.reshape(heads, nope + v, w.shape[-1])
            name = tmap.get_name(base.replace("kv_b_proj", "k_b_proj"), try_suffixes=(".weight",))
            add(name + ".weight", kv_b[:, :nope].swapaxes(1, 2))
            name = tmap.get_name(base.replace("kv_b_proj", "v_b_proj"), try_suffixes=(".weight",))
            add(name + ".weight", kv_b[:, nope:])
            continue
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None and ".mlp." in key:
            name = dense_map.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        add(name, w)
    qtype = getattr(T, expert_type)
    for stacked, by_e in experts.items():
        w = np.stack([by_e[e] for e in range(n_experts)])
        name = tmap.get_name(stacked + ".weight", try_suffixes=(".weight",))
        add(name, w, qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# --------------------------------------------------------------------------- #
# acceptance: every family GGUF supports, against transformers
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", GGUF_VARIANTS)
def test_gguf_q4_0_matches_transformers_on_dequantized_weights(name, reference_checkpoints, tmp_path):
    import mlx_moe
    from gguf import GGMLQuantizationType as T
    from mlx_moe.generation import generate_tokens
    from mlx_moe.q4_0 import Q4_0SwitchLinear

    ref = reference_checkpoints.reference(name)
    path = write_gguf(ref.path, tmp_path / f"{name}.gguf",
                      split_kv_b=name != "deepseek_v2_qlora_yarn")  # both DeepSeek layouts
    model, tok = mlx_moe.load(str(path))
    layers = mlx_moe.moe_layers(model)
    assert layers and all(isinstance(layer.switch_mlp.down_proj, Q4_0SwitchLinear) for layer in layers)

    dq = hf_checkpoint_with(ref.path, tmp_path / "dq", gguf_roundtrip(T.Q4_0))
    want_logits, want_tokens = transformers_reference(name, dq, ref.tokens, ref.prompt)
    got = mlx_logits(model, ref.tokens)
    assert np.abs(got - want_logits).max() <= LOGITS_RTOL * np.abs(want_logits).max()
    assert list(generate_tokens(model, ref.prompt, max_tokens=N_GENERATE)) == want_tokens
    # The tokenizer from the metadata is the byte tokenizer.
    assert tok.encode("MoE!") == list(b"MoE!")
    assert tok.eos_token_ids == {256}
    assert tok.decode(list(b"hello")) == "hello"


def test_qwen2_moe_without_shared_expert_allocates_and_computes_none(reference_checkpoints, tmp_path):
    import mlx.nn as nn
    import mlx_moe
    from test_convert import _count_shared_calls

    ref = reference_checkpoints.reference("qwen2_moe_noshared")
    model, _ = mlx_moe.load(str(write_gguf(ref.path, tmp_path / "m.gguf")), tokenizer=False)
    assert model.config["shared_expert_intermediate_size"] == 0
    for layer in mlx_moe.moe_layers(model):
        assert not layer.has_shared_expert
        assert not any("shared" in k for k, _ in nn.utils.tree_flatten(layer.parameters()))
    assert _count_shared_calls(model, ref.tokens) == 0


@pytest.mark.parametrize("expert_type", ["Q8_0", "F16", "F32"])
def test_other_expert_types_stay_native(expert_type, reference_checkpoints, tmp_path):
    import mlx.core as mx
    import mlx_moe
    from gguf import GGMLQuantizationType as T
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    name = "qwen3_moe_mixed"
    ref = reference_checkpoints.reference(name)
    model, _ = mlx_moe.load(str(write_gguf(ref.path, tmp_path / "m.gguf", expert_type=expert_type)), tokenizer=False)
    proj = mlx_moe.moe_layers(model)[0].switch_mlp.gate_proj
    if expert_type == "Q8_0":
        assert isinstance(proj, QuantizedSwitchLinear) and proj.bits == 8 and proj.group_size == 32
    else:
        assert isinstance(proj, SwitchLinear)
        assert proj.weight.dtype == (mx.float16 if expert_type == "F16" else mx.float32)
    dq = hf_checkpoint_with(ref.path, tmp_path / "dq", gguf_roundtrip(getattr(T, expert_type)))
    want, _ = transformers_reference(name, dq, ref.tokens, ref.prompt)
    got = mlx_logits(model, ref.tokens)
    assert np.abs(got - want).max() <= LOGITS_RTOL * np.abs(want).max()


def test_q8_0_expert_mapping_is_exact():
    """MLX's dequantize of the mapped Q8_0 experts equals gguf.quants.dequantize bit for bit."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from mlx_moe.gguf import _expert_arrays

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 4, 96)) * np.array([1e-3, 1.0, 300.0])[:, None, None]).astype(np.float32)
    raw = quants.quantize(w, T.Q8_0)

    class FakeTensor:  # what GGUFReader gives: row-major bytes, reversed ne
        data, shape, tensor_type = raw, np.array([96, 4, 3]), T.Q8_0

    class FakeFile:
        path = "x.gguf"

        def tensor(self, n):
            return FakeTensor

        def shape(self, n):
            return (3, 4, 96)

    arrs = _expert_arrays(FakeFile(), "e")
    got = mx.dequantize(arrs["weight"], arrs["scales"], arrs["biases"], group_size=32, bits=8)
    np.testing.assert_array_equal(np.array(got), quants.dequantize(raw, T.Q8_0).reshape(w.shape))


def test_quantized_attention_is_dequantized(reference_checkpoints, tmp_path):
    """Non-expert Q8_0 tensors become float16 copies of gguf's dequantization."""
    import mlx.core as mx
    import mlx_moe
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    ref = reference_checkpoints.reference("qwen3_moe_q")  # width 64: blocks of 32 fit every matrix
    name = "blk.1.attn_q.weight"
    path = write_gguf(ref.path, tmp_path / "m.gguf", tensor_types={name: T.Q8_0})
    model, _ = mlx_moe.load(str(path), tokenizer=False)
    w = load_file(str(ref.path / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    want = quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0).reshape(w.shape).astype(np.float16)
    got = model.model.layers[1].self_attn.q_proj.weight
    assert got.dtype == mx.float16
    np.testing.assert_array_equal(np.array(got), want)


# --------------------------------------------------------------------------- #
# clear errors
# --------------------------------------------------------------------------- #

def test_unsupported_expert_type_is_named(reference_checkpoints, tmp_path):
    import mlx_moe
    from mlx_moe.gguf import GGUFError

    ref = reference_checkpoints.reference("qwen3_moe_q")
    path = write_gguf(ref.path, tmp_path / "m.gguf", expert_type="Q5_0")
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_\w+_exps\.weight' has type Q5_0.*Q4_0, Q8_0"):
        mlx_moe.load(str(path))


def test_longcat_and_dense_files_are_refused(reference_checkpoints, tmp_path):
    import mlx_moe
    from mlx_moe import UnsupportedModelError

    ref = reference_checkpoints.reference("qwen3_moe_mixed")
    path = write_gguf(ref.path, tmp_path / "l.gguf", arch_name="longcat-flash")
    with pytest.raises(UnsupportedModelError, match="LongCat-Flash has no GGUF architecture"):
        mlx_moe.load(str(path))
    path = write_gguf(ref.path, tmp_path / "p.gguf", arch_name="phi3")
    with pytest.raises(UnsupportedModelError, match="'phi3' is not a supported MoE family"):
        mlx_moe.load(str(path))


@pytest.mark.parametrize("key,value,match", [
    ("expert_count", 6, r"expert_count = 6 but the tensors have 8"),
    ("embedding_length", 48, r"embedding_length = 48 but the tensors have 32"),
    ("expert_feed_forward_length", 64, r"expert_feed_forward_length = 64 but the tensors have 32"),
    ("block_count", 5, r"block_count = 5 but the tensors"),
    ("expert_shared_feed_forward_length", 0, r"expert_shared_feed_forward_length = 0 but the tensors have 48"),
])
def test_metadata_contradicting_shapes(key, value, match, reference_checkpoints, tmp_path):
    import mlx_moe
    from mlx_moe import ModelLoadError

    ref = reference_checkpoints.reference("qwen2_moe_shared")
    path = write_gguf(ref.path, tmp_path / "m.gguf", edit_meta={key: value})
    with pytest.raises(ModelLoadError, match=match):
        mlx_moe.load(str(path))


def test_head_count_contradicting_shapes(reference_checkpoints, tmp_path):
    import mlx_moe
    from mlx_moe import ModelLoadError

    ref = reference_checkpoints.reference("olmoe")
    path = write_gguf(ref.path, tmp_path / "m.gguf", edit_meta={"head_count": 2, "head_count_kv": 2,
                                                                "key_length": 32, "value_length": 32})
    with pytest.raises(ModelLoadError, match=r"head_count x head size \(2 x 32\) = 64 but the tensors have 32"):
        mlx_moe.load(str(path))


# --------------------------------------------------------------------------- #
# fuzz: truncations and byte flips of a GGUF and a safetensors file
# --------------------------------------------------------------------------- #

FUZZ = textwrap.dedent("""
    import json, sys, traceback
    import mlx_moe
    from mlx_moe import ModelLoadError
    results = []
    for path in sys.argv[1:]:
        try:
            model, tok = mlx_moe.load(path, tokenizer=path.endswith(".gguf"))
            results.append("loaded")
        except ModelLoadError as e:
            results.append("error: " + str(e).splitlines()[0][:300])
        except BaseException as e:
            results.append("UNCLEAR " + type(e).__name__ + ": " + traceback.format_exc()[-800:])
    print(json.dumps(results))
""")


def _mutations(data: bytes, rng: random.Random, n_trunc: int, n_flip: int, header_end: int):
    """Deterministic truncations (anywhere) and single-bit flips (mostly in the
    header and metadata, where they change structure; some in tensor data)."""
    out = []
    for _ in range(n_trunc):
        out.append(("trunc", data[: rng.randrange(0, len(data))]))
    for i in range(n_flip):
        pos = rng.randrange(0, header_end) if i % 4 else rng.randrange(0, len(data))
        b = bytearray(data)
        b[pos] ^= 1 << rng.randrange(8)
        out.append((f"flip@{pos}", bytes(b)))
    return out


def test_fuzz_truncated_and_corrupted_files(reference_checkpoints, tmp_path):
    """Every mutated file loads (a flip inside tensor data only changes a weight)
    or fails with one ModelLoadError; never another exception, a crash or a
    hang.  One subprocess runs them all, so a segfault fails the test."""
    import shutil

    from tiny import write_tiny_qwen3

    rng = random.Random(1234)
    ref = reference_checkpoints.reference("qwen2_moe_shared")
    gguf_data = write_gguf(ref.path, tmp_path / "src.gguf").read_bytes()
    from gguf import GGUFReader

    gguf_header_end = int(GGUFReader(str(tmp_path / "src.gguf")).data_offset)
    tiny = write_tiny_qwen3(tmp_path / "tiny")
    st_data = (tiny / "model.safetensors").read_bytes()
    st_header_end = 8 + int.from_bytes(st_data[:8], "little")

    paths, kinds = [], []
    for i, (kind, blob) in enumerate(_mutations(gguf_data, rng, 12, 28, gguf_header_end)):
        p = tmp_path / f"g{i}.gguf"
        p.write_bytes(blob)
        paths.append(str(p))
        kinds.append(kind)
    for i, (kind, blob) in enumerate(_mutations(st_data, rng, 8, 16, st_header_end)):
        d = tmp_path / f"s{i}"
        shutil.copytree(tiny, d)
        (d / "model.safetensors").write_bytes(blob)
        paths.append(str(d))
        kinds.append(kind)

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", FUZZ, *paths], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=240)
    assert res.returncode == 0, f"crashed (rc {res.returncode}): {res.stderr[-2000:]}"
    results = json.loads(res.stdout.strip().splitlines()[-1])
    unclear = [(k, p, r) for k, p, r in zip(kinds, paths, results) if r.startswith("UNCLEAR")]
    assert not unclear, unclear[:3]
    errors = [r for r in results if r.startswith("error")]
    # Every truncation must be an error; the corruption must exercise the error paths.
    assert all(r.startswith("error") for k, r in zip(kinds, results) if k == "trunc")
    assert len(errors) >= 30
    assert all("Traceback" not in r for r in errors)
