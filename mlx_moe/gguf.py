"""`mlx_moe.load("model.gguf")`: llama.cpp GGUF MoE files.

Supported architectures (GGUF `general.architecture` -> family):
qwen3moe -> qwen3_moe, qwen2moe -> qwen2_moe, llama with experts -> mixtral,
olmoe -> olmoe, deepseek2 -> deepseek_v2.  LongCat-Flash has no architecture
in the gguf package (0.19) and so no GGUF form to read: a clear error.

How a file becomes a model:

- The file is read with gguf.GGUFReader (a numpy memory map) and checked:
  parse errors of a truncated or corrupt file, metadata that contradicts the
  tensor shapes, unknown tensors -> GGUFError (a ModelLoadError) naming them.
- A Hugging Face-style config is built from the metadata keys of
  gguf.constants.Keys (block_count, embedding_length, expert_count,
  expert_used_count, expert_feed_forward_length,
  expert_shared_feed_forward_length, ...), with the expert FFN size taken
  from the expert tensors themselves.  Dense layers are found from the
  tensors (a layer without ffn_gate_inp is dense).  Routing settings GGUF
  does not store fall back to each family's llama.cpp behaviour:
  norm_topk_prob is expert_weights_norm when present, else True for
  qwen3moe and False otherwise.  {arch}.expert_shared_feed_forward_length = 0
  (or no shared-expert tensors) means no shared expert: nothing allocated,
  nothing computed.
- Tensor names are llama.cpp's (blk.N.ffn_gate_exps.weight, ...).  GGUF
  lists dims fastest first; GGUFReader's arrays are already in row-major
  [.., rows, cols] order, the order of the Hugging Face tensors.  llama-arch
  attention q/k rows are permuted by llama.cpp's converter (to its
  interleaved rope); that is undone here.  DeepSeek-V2's kv_b_proj is read
  whole (older files) or rebuilt from attn_k_b (stored transposed per head)
  and attn_v_b (newer files).
- Expert tensors keep their native type, never re-quantized:
    Q4_0 -> Q4_0SwitchLinear holding the GGUF blocks as uint16 words;
    Q8_0 -> MLX affine 8-bit, group 32 (QuantizedSwitchLinear): the same
            integers offset by 128, scale d, bias -128 d, exact in float32;
    F16/BF16/F32 -> float SwitchLinear.
  Anything else (Q4_K, IQ*...) is refused with its name.  mx.array copies
  the memory-mapped bytes into MLX memory once (MLX cannot adopt a numpy
  memory map); the map itself is file-backed page cache.
- Other tensors: F32/F16/BF16 as stored; quantized ones (any type
  gguf.quants can dequantize) are dequantized to float16.  This rounds each
  weight once (relative error <= 2^-11) and is the one lossy step; it keeps
  attention and embeddings at 2 bytes per weight.
- The tokenizer comes from the GGUF metadata through transformers' GGUF
  tokenizer support (PreTrainedTokenizerFast(gguf_file=...)), wrapped in
  mlx-lm's TokenizerWrapper.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .loader import ModelLoadError, UnsupportedModelError, build_model
from .models import FAMILIES


class GGUFError(ModelLoadError):
    """A GGUF file cannot be loaded; the message names the file and the problem."""


ARCH_FAMILY = {
    "qwen3moe": "qwen3_moe",
    "qwen2moe": "qwen2_moe",
    "llama": "mixtral",
    "olmoe": "olmoe",
    "deepseek2": "deepseek_v2",
}
EXPERT_TYPES = ("Q4_0", "Q8_0", "F16", "BF16", "F32")

_MISSING = object()


# -- reading -----------------------------------------------------------------------------------


class GGUFFile:
    """A parsed GGUF: metadata values and tensors by name, with clear errors."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        try:
            self.reader = GGUFReader(str(self.path), "r")
            self.tensors = {t.name: t for t in self.reader.tensors}
        except Exception as e:  # the reader raises whatever numpy/struct raise on bad bytes
            raise GGUFError(
                f"{self.path}: cannot read this GGUF file ({type(e).__name__}: {e}); "
                "the file is truncated, corrupt or not GGUF. Download it again."
            ) from e
        self.arch = self.get("general.architecture", None)
        if not isinstance(self.arch, str):
            raise GGUFError(f"{self.path}: no general.architecture in the metadata; the file is not a model GGUF")

    def get(self, key: str, default=_MISSING):
        """A metadata value; `{arch}` in the key is this file's architecture."""
        key = key.replace("{arch}", getattr(self, "arch", "") or "")
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing; the file is incomplete")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: metadata key {key!r} cannot be read ({e}); the file is corrupt") from e
        return value

    def int(self, key: str, default=_MISSING) -> Optional[int]:
        v = self.get(key, default)
        if v is None or v is default:
            return v
        if isinstance(v, list):
            if not v or len(set(v)) != 1:
                raise GGUFError(f"{self.path}: {key.replace('{arch}', self.arch)} varies per layer ({v}); "
                                "mlx-moe needs one value")
            v = v[0]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise GGUFError(f"{self.path}: {key.replace('{arch}', self.arch)} = {v!r} is not an integer")
        return int(v)

    def float(self, key: str, default=_MISSING) -> Optional[float]:
        v = self.get(key, default)
        if v is None or v is default:
            return v
        if not isinstance(v, (int, float, np.number)) or isinstance(v, bool):
            raise GGUFError(f"{self.path}: {key.replace('{arch}', self.arch)} = {v!r} is not a number")
        return float(v)

    def tensor(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        return t

    def shape(self, name: str) -> Tuple[int, ...]:
        """Row-major shape ([.., rows, cols], the reverse of GGUF's ne)."""
        return tuple(int(n) for n in reversed(self.tensor(name).shape))

    def type_name(self, name: str) -> str:
        return self.tensor(name).tensor_type.name


# -- config ------------------------------------------------------------------------------------


def _layers(g: GGUFFile, n_layers: int, what: str) -> List[int]:
    return [i for i in range(n_layers) if f"blk.{i}.{what}" in g.tensors]


def _check(g: GGUFFile, what: str, meta, actual) -> None:
    if meta is not None and meta != actual:
        raise GGUFError(f"{g.path}: metadata says {what} = {meta} but the tensors have {actual}; "
                        "the metadata contradicts the tensor shapes (a corrupt or mis-converted file)")


def build_config(g: GGUFFile) -> dict:
    """A Hugging Face-style config of the file's family, from its metadata and tensor shapes."""
    arch = g.arch
    family = ARCH_FAMILY.get(arch)
    if family is None:
        if "longcat" in arch:
            raise UnsupportedModelError(
                f"{g.path}: architecture {arch!r}: LongCat-Flash has no GGUF architecture in the gguf package "
                "mlx-moe reads; load the Hugging Face checkpoint instead"
            )
        raise UnsupportedModelError(
            f"{g.path}: GGUF architecture {arch!r} is not a supported MoE family; "
            f"mlx-moe reads GGUF architectures {', '.join(ARCH_FAMILY)}"
        )
    n_layers = g.int("{arch}.block_count")
    hidden = g.int("{arch}.embedding_length")
    n_experts = g.int("{arch}.expert_count", None)
    if not n_experts:
        raise UnsupportedModelError(f"{g.path}: {arch} file without experts ({arch}.expert_count): a dense model; "
                                    "mlx-moe runs MoE models")
    moe_layers = _layers(g, n_layers, "ffn_gate_inp.weight")
    if not moe_layers:
        raise GGUFError(f"{g.path}: no layer has a router tensor (blk.N.ffn_gate_inp.weight)")
    first = moe_layers[0]
    e_shape = g.shape(f"blk.{first}.ffn_gate_exps.weight")
    _check(g, f"{arch}.expert_count", n_experts, e_shape[0])
    _check(g, f"{arch}.embedding_length", hidden, e_shape[2])
    moe_ffn = e_shape[1]
    _check(g, f"{arch}.expert_feed_forward_length", g.int("{arch}.expert_feed_forward_length", None), moe_ffn)
    emb = g.shape("token_embd.weight")
    _check(g, "embedding width (embedding_length)", hidden, emb[-1])
    n_heads = g.int("{arch}.attention.head_count")
    if max(int(m.group(1)) for m in map(re.compile(r"blk\.(\d+)\.").match, g.tensors) if m) != n_layers - 1:
        raise GGUFError(f"{g.path}: {arch}.block_count = {n_layers} but the tensors are of a different number of blocks")

    config = {
        "model_type": family,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": g.int("{arch}.attention.head_count_kv", n_heads),
        "rms_norm_eps": g.float("{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g.float("{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": g.int("{arch}.context_length", 4096),
        "vocab_size": emb[0],
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "num_experts_per_tok": g.int("{arch}.expert_used_count"),
        "hidden_act": "silu",
    }
    eos = g.get("tokenizer.ggml.eos_token_id", None)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    bos = g.get("tokenizer.ggml.bos_token_id", None)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if not 0 < config["num_experts_per_tok"] <= n_experts:
        raise GGUFError(f"{g.path}: {arch}.expert_used_count = {config['num_experts_per_tok']} with {n_experts} experts")
    dense = [i for i in range(n_layers) if i not in moe_layers]
    dense_ffn = g.shape(f"blk.{dense[0]}.ffn_up.weight")[0] if dense else None
    ffn_len = g.int("{arch}.feed_forward_length", None)
    norm_default = family == "qwen3_moe"
    norm = g.get("{arch}.expert_weights_norm", None)
    norm_topk = bool(norm) if norm is not None else norm_default
    key_len = g.int("{arch}.attention.key_length", None)

    if family in ("qwen3_moe", "qwen2_moe"):
        config.update(num_experts=n_experts, moe_intermediate_size=moe_ffn, norm_topk_prob=norm_topk,
                      decoder_sparse_step=1, mlp_only_layers=dense,
                      intermediate_size=dense_ffn or ffn_len or moe_ffn)
        if key_len:
            config["head_dim"] = key_len
    if family == "qwen3_moe":
        config["attention_bias"] = f"blk.{first}.attn_q.bias" in g.tensors
    if family == "qwen2_moe":
        shexp = f"blk.{first}.ffn_up_shexp.weight"
        size = g.shape(shexp)[0] if shexp in g.tensors else 0
        _check(g, f"{arch}.expert_shared_feed_forward_length",
               g.int("{arch}.expert_shared_feed_forward_length", None), size)
        config["shared_expert_intermediate_size"] = size
    if family == "mixtral":
        config.update(num_local_experts=n_experts, intermediate_size=moe_ffn)
        if key_len:
            config["head_dim"] = key_len
        if dense:
            raise GGUFError(f"{g.path}: llama MoE file with dense layers {dense}; Mixtral has experts in every layer")
    if family == "olmoe":
        config.update(num_experts=n_experts, intermediate_size=moe_ffn, norm_topk_prob=norm_topk)
        if dense:
            raise GGUFError(f"{g.path}: olmoe file with dense layers {dense}; OLMoE has experts in every layer")
    if family != "deepseek_v2":
        _check_attention(g, config, first, key_len)
    if family == "deepseek_v2":
        config.update(_deepseek_config(g, n_experts, moe_ffn, dense, dense_ffn or ffn_len, norm_topk, n_heads))
    return config


def _check_attention(g: GGUFFile, config: dict, layer: int, key_len: Optional[int]) -> None:
    """Head counts and head size against the q/k projections (a wrong head
    count with the right total width would otherwise load and compute nonsense)."""
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    if heads <= 0 or kv <= 0 or heads % kv:
        raise GGUFError(f"{g.path}: attention.head_count = {heads}, head_count_kv = {kv} is not a valid grouping")
    head_dim = key_len or hidden // heads
    if config["model_type"] in ("mixtral", "qwen2_moe") and head_dim * heads != hidden:
        raise UnsupportedModelError(f"{g.path}: head size {head_dim} x {heads} heads != embedding_length {hidden}; "
                                    f"mlx-lm's {config['model_type']} needs head size = hidden / heads")
    if config["model_type"] == "olmoe":
        config["head_dim"] = head_dim
    _check(g, f"attention.head_count x head size ({heads} x {head_dim})", heads * head_dim,
           g.shape(f"blk.{layer}.attn_q.weight")[0])
    _check(g, f"attention.head_count_kv x head size ({kv} x {head_dim})", kv * head_dim,
           g.shape(f"blk.{layer}.attn_k.weight")[0])


def _deepseek_config(g: GGUFFile, n_experts, moe_ffn, dense, dense_ffn, norm_topk, n_heads) -> dict:
    gating = g.int("{arch}.expert_gating_func", None)
    if gating not in (None, 1) or any(".exp_probs_b." in n for n in g.tensors):
        raise UnsupportedModelError(f"{g.path}: sigmoid / biased expert routing (DeepSeek-V3 style) is not DeepSeek-V2; "
                                    "mlx-moe's deepseek_v2 routes with softmax")
    lead = g.int("{arch}.leading_dense_block_count", 0)
    if dense != list(range(lead)):
        raise GGUFError(f"{g.path}: leading_dense_block_count = {lead} but the dense layers are {dense}")
    rope = g.int("{arch}.rope.dimension_count")
    key_mla, val_mla = g.int("{arch}.attention.key_length_mla", None), g.int("{arch}.attention.value_length_mla", None)
    key_len, val_len = g.int("{arch}.attention.key_length"), g.int("{arch}.attention.value_length")
    # Newer converters store MLA's absorbed sizes in key/value_length and the
    # per-head ones in *_mla; older files have only the per-head ones.
    qk_head = key_mla if key_mla is not None else key_len
    v_head = val_mla if val_mla is not None else val_len
    q_lora = g.int("{arch}.attention.q_lora_rank", 0) or None
    n_group = g.int("{arch}.expert_group_count", 0) or 1
    cfg = {
        "n_routed_experts": n_experts,
        "n_shared_experts": g.int("{arch}.expert_shared_count", 0),
        "moe_intermediate_size": moe_ffn,
        "intermediate_size": dense_ffn or moe_ffn,
        "first_k_dense_replace": lead,
        "moe_layer_freq": 1,
        "routed_scaling_factor": g.float("{arch}.expert_weights_scale", 1.0),
        "norm_topk_prob": norm_topk,
        "topk_method": "group_limited_greedy" if n_group > 1 else "greedy",
        "n_group": n_group,
        "topk_group": g.int("{arch}.expert_group_used_count", n_group),
        "q_lora_rank": q_lora,
        "kv_lora_rank": g.int("{arch}.attention.kv_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": qk_head - rope,
        "v_head_dim": v_head,
        "num_key_value_heads": n_heads,  # MLA: GGUF's head_count_kv = 1 describes llama.cpp's absorbed form
        "attention_bias": False,
    }
    if cfg["qk_nope_head_dim"] <= 0:
        raise GGUFError(f"{g.path}: attention key length {qk_head} is not larger than the rope dimension {rope}")
    scaling = g.get("{arch}.rope.scaling.type", None)
    if scaling == "yarn":
        mscale = g.float("{arch}.rope.scaling.yarn_log_multiplier", 0.0) / 0.1  # converter writes 0.1 * mscale_all_dim
        cfg["rope_scaling"] = {
            "type": "yarn",
            "factor": g.float("{arch}.rope.scaling.factor"),
            "original_max_position_embeddings": g.int("{arch}.rope.scaling.original_context_length"),
            "beta_fast": g.float("{arch}.rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": g.float("{arch}.rope.scaling.yarn_beta_slow", 1.0),
            "mscale": mscale,
            "mscale_all_dim": mscale,
        }
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"{g.path}: rope scaling {scaling!r} is not supported for deepseek2 (only yarn)")
    return cfg


# -- tensors -----------------------------------------------------------------------------------

_COMMON = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
}
_SHARED = {"qwen2_moe": "mlp.shared_expert", "deepseek_v2": "mlp.shared_experts"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+?)(?:_(exps|shexp))?\.(weight|bias)$")


def hf_name(family: str, name: str) -> Optional[str]:
    """The mlx-lm (sanitized Hugging Face) name of a GGUF tensor, or None if unknown."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLK.match(name)
    if not m:
        return None
    layer, base, kind, leaf = m.groups()
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    p = f"model.layers.{layer}"
    if kind == "exps" and base in ("ffn_gate", "ffn_up", "ffn_down"):
        return f"{p}.{moe}.switch_mlp.{base[4:]}_proj.{leaf}"
    if kind == "shexp" and base in ("ffn_gate", "ffn_up", "ffn_down") and family in _SHARED:
        return f"{p}.{_SHARED[family]}.{base[4:]}_proj.{leaf}"
    if base == "ffn_gate_inp" and kind is None:
        return f"{p}.{moe}.gate.{leaf}"
    if base == "ffn_gate_inp" and kind == "shexp" and family == "qwen2_moe":
        return f"{p}.mlp.shared_expert_gate.{leaf}"
    if kind is None and base in _COMMON:
        return f"{p}.{_COMMON[base]}.{leaf}"
    return None


def _float_array(g: GGUFFile, name: str):
    """A non-expert tensor as an mx.array: floats as stored, quantized ones dequantized to float16."""
    import mlx.core as mx
    from gguf import quants

    t = g.tensor(name)
    kind = t.tensor_type.name
    shape = g.shape(name)
    if kind == "F32":
        return mx.array(np.asarray(t.data, dtype=np.float32).reshape(shape))
    if kind == "F16":
        return mx.array(np.asarray(t.data, dtype=np.float16).reshape(shape))
    if kind == "BF16":
        return mx.array(np.asarray(t.data).view(np.uint16).reshape(shape)).view(mx.bfloat16)
    try:
        w = quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"{g.path}: tensor {name!r} has type {kind}, which the gguf package cannot dequantize") from e
    return mx.array(w.reshape(shape).astype(np.float16))


def _expert_arrays(g: GGUFFile, name: str) -> Dict[str, object]:
    """{leaf: mx.array} for one stacked expert tensor in its native format."""
    import mlx.core as mx

    t = g.tensor(name)
    kind = t.tensor_type.name
    e, rows, cols = g.shape(name)
    data = np.asarray(t.data)
    if kind == "Q4_0":
        # 18-byte blocks viewed as 9 little-endian uint16 words: Q4_0SwitchLinear's layout.
        return {"weight": mx.array(data.reshape(e, rows, -1).view("<u2"))}
    if kind == "Q8_0":
        blocks = data.reshape(e, rows, cols // 32, 34)
        d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # unsigned, as MLX stores it
        wq = np.ascontiguousarray(q).reshape(e, rows, cols).view("<u4")  # 4 values per word, lowest first
        return {"weight": mx.array(wq), "scales": mx.array(d), "biases": mx.array(d * np.float32(-128.0))}
    if kind in ("F32", "F16", "BF16"):
        return {"weight": _float_array(g, name)}
    raise GGUFError(
        f"{g.path}: expert tensor {name!r} has type {kind}; mlx-moe keeps experts in their GGUF type and reads "
        f"{', '.join(EXPERT_TYPES)}. Re-quantize the file to Q4_0 or Q8_0 with llama-quantize, or convert "
        "the Hugging Face checkpoint with `mlx-moe convert`."
    )


def _unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (rotate-half -> interleaved pairs) per head."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_weights(g: GGUFFile, family: str, config: dict) -> Tuple[Dict[str, object], Dict[str, str]]:
    """All weights under mlx-lm names, and the expert tensors' GGUF types by mlx-lm module path."""
    import mlx.core as mx

    weights: Dict[str, object] = {}
    expert_types: Dict[str, str] = {}
    unknown = []
    kb_vb: Dict[str, Dict[str, str]] = {}
    for name in g.tensors:
        m = re.match(r"^blk\.(\d+)\.attn_([kv])_b\.weight$", name)
        if family == "deepseek_v2" and m:
            kb_vb.setdefault(m.group(1), {})[m.group(2)] = name
            continue
        target = hf_name(family, name)
        if target is None:
            unknown.append(name)
            continue
        if ".switch_mlp." in target:
            for leaf, arr in _expert_arrays(g, name).items():
                weights[target.rsplit(".", 1)[0] + "." + leaf] = arr
            expert_types[target.rsplit(".", 1)[0]] = g.type_name(name)
            continue
        w = _float_array(g, name)
        if family == "mixtral" and (name.endswith("attn_q.weight") or name.endswith("attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"]
            w = _unpermute(w, heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(1, -1)  # [hidden] in llama.cpp, a [1, hidden] linear in the model
        weights[target] = w
    if unknown:
        raise GGUFError(f"{g.path}: tensors mlx-moe's {family} does not use: {', '.join(sorted(unknown)[:6])}"
                        f"{' ...' if len(unknown) > 6 else ''}; an unsupported variant of the {g.arch} architecture")
    for layer, parts in kb_vb.items():
        if set(parts) != {"k", "v"}:
            raise GGUFError(f"{g.path}: blk.{layer} has attn_{''.join(parts)}_b but not both attn_k_b and attn_v_b")
        k_b = _float_array(g, parts["k"])  # [heads, kv_lora, nope]
        v_b = _float_array(g, parts["v"])  # [heads, v_head, kv_lora]
        if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[1] != v_b.shape[2]:
            raise GGUFError(f"{g.path}: blk.{layer} attn_k_b {k_b.shape} / attn_v_b {v_b.shape} do not fit together")
        kv_b = mx.concatenate([k_b.swapaxes(1, 2), v_b.astype(k_b.dtype)], axis=1)
        weights[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
    return weights, expert_types


def _expert_modules(family_name: str, expert_types: Dict[str, str]) -> Callable:
    """`prepare` for build_model: each expert projection gets its GGUF type's module."""

    def prepare(model) -> None:
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear

        from .q4_0 import Q4_0SwitchLinear

        for path, kind in expert_types.items():
            parent_path, attr = path.rsplit(".", 1)
            parent = model
            for part in parent_path.split("."):
                parent = parent[int(part)] if part.isdigit() else getattr(parent, part, None)
                if parent is None:
                    raise GGUFError(f"{family_name}: the model has no module {parent_path} for GGUF experts")
            proj = getattr(parent, attr)
            e, out_dims, in_dims = proj.num_experts, proj.output_dims, proj.input_dims
            if kind == "Q4_0":
                setattr(parent, attr, Q4_0SwitchLinear(in_dims, out_dims, e))
            elif kind == "Q8_0":
                setattr(parent, attr, QuantizedSwitchLinear(in_dims, out_dims, e, bias=False, group_size=32, bits=8))

    return prepare


def load_tokenizer(path: Path, eos_token_id=None):
    """The tokenizer described by the GGUF metadata (transformers), in mlx-lm's wrapper."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GGUFError(
            f"{path}: cannot build the tokenizer from the GGUF metadata ({type(e).__name__}: {e}); "
            "pass tokenizer=False to load the model alone"
        ) from e
    eos = [eos_token_id] if eos_token_id is not None else None
    return TokenizerWrapper(tok, eos_token_ids=eos)


def load_gguf(path, kernels: str = "auto", tokenizer: bool = True):
    """Load a GGUF MoE file -> (model, tokenizer or None).  See the module docstring."""
    path = Path(path).expanduser()
    g = GGUFFile(path)
    config = build_config(g)
    family = config["model_type"]
    config = FAMILIES[family].normalize_config(config)
    weights, expert_types = read_weights(g, family, config)
    # No mlx_moe.expert_format in the config: expert modules follow each tensor's GGUF type.
    model = build_model(config, weights, kernels=kernels, source=str(path), prepare=_expert_modules(family, expert_types))
    model.config = {**config, "mlx_moe": {"source": "gguf", "path": str(path)}}
    tok = load_tokenizer(path, config.get("eos_token_id")) if tokenizer else None
    return model, tok
