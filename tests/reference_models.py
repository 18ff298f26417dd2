"""Tiny random MoE checkpoints and their transformers reference outputs.

This is a helper module for the oracle tests, not a test file.  For every
model family mlx-moe supports it builds a tiny random checkpoint with
transformers (torch, CPU, fp32), saves it with ``save_pretrained`` plus the
project's byte tokenizer, and records what transformers computes on it:
logits of a fixed token sequence, a greedy continuation, and the routing
decisions of every MoE layer.  Nobody on this project wrote transformers'
modeling code, so these outputs are an independent oracle.

Margins.  A comparison between two fp32 implementations is only meaningful
when tiny rounding differences cannot flip a discrete decision.  Each
checkpoint is therefore built so that, on the reference sequence,

* every top-k routing choice (and group choice) is separated from the first
  rejected candidate by at least ``ROUTER_MARGIN`` (logit units, or
  ``PROB_MARGIN`` in probability units for LongCat, whose choice scores are
  probabilities plus a bias), and
* every greedy token beats the runner-up by at least ``TOKEN_MARGIN`` times
  the largest |logit|.

Router weights and the LM head are scaled up to make that likely, and
``build_checkpoint`` tries successive torch seeds until the margins hold; the
seed used is written to ``reference.json`` in the checkpoint directory.

Config dialects.  transformers 5 saves ``rope_parameters``,
``num_local_experts`` and (LongCat) gate/up tensors for the identity
experts.  ``write_hub_dialect`` makes a copy in the dialect hub checkpoints
use (``rope_theta``, ``num_experts``, ``zero_expert_type``, no identity-expert
tensors), which is what unmodified mlx-lm can read.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# A fixed prompt (byte tokenizer: token id == byte value) and the number of
# greedy tokens the issue asks for.
PROMPT_IDS: list[int] = list(b"MoE oracle: ")
NUM_GENERATED = 16

# Margins, see the module docstring.  Router logits are O(1..10) and agree
# between fp32 implementations to about 1e-6 relative, so a gap of 1e-3 logit
# units is a >100x safety factor.  LongCat chooses on softmax probabilities
# (O(0.01..1), agreeing to ~1e-7), hence 1e-4 there.  Greedy gaps are asked to
# be 20x the logit tolerance of the tests (1e-4 * max|logit|).
ROUTER_MARGIN = 1e-3
PROB_MARGIN = 1e-4
TOKEN_MARGIN = 2e-3

# Shared config pieces: tiny, fp32, a rope theta different from every mlx-lm
# default (1e4 is olmoe's default; 5e4 is nobody's) so a loader that ignores
# the transformers-5 ``rope_parameters`` gives visibly different numbers.
ROPE_THETA = 50000.0
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
_COMMON = dict(
    vocab_size=259,
    hidden_size=32,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    tie_word_embeddings=False,
    max_position_embeddings=256,
    # The byte tokenizer's <|endoftext|>; no BOS, no padding row in the embedding.
    bos_token_id=None,
    eos_token_id=256,
    pad_token_id=None,
    rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
)
_MLA = dict(
    num_attention_heads=2,
    num_key_value_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)


@dataclass(frozen=True)
class Variant:
    """One tiny checkpoint: a family, its transformers config, how to scale it."""

    name: str
    family: str
    config: dict
    doc: str
    router_scale: float = 3.0
    lm_head_std: float = 0.5
    # LongCat only: std of the random e_score_correction_bias (probability units).
    bias_std: float = 0.0
    base_seed: int = 1000


def _cfg(*parts: dict, **extra) -> dict:
    out: dict = {}
    for p in parts:
        out.update(copy.deepcopy(p))
    out.update(extra)
    return out


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "qwen3_moe_mixed",
            "qwen3_moe",
            _cfg(_COMMON, _ATTN, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1,
                 norm_topk_prob=True),
            "layer 0 dense through mlp_only_layers, layers 1-2 MoE, top-2 of 8 renormalized",
        ),
        Variant(
            "qwen3_moe_sparse_step",
            "qwen3_moe",
            _cfg(_COMMON, _ATTN, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=3, mlp_only_layers=[], decoder_sparse_step=2,
                 norm_topk_prob=False),
            "decoder_sparse_step=2: only layer 1 is MoE; top-3 of 8, not renormalized",
        ),
        Variant(
            "qwen2_moe_shared",
            "qwen2_moe",
            _cfg(_COMMON, _ATTN, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48,
                 norm_topk_prob=False),
            "gated shared expert (48), top-2 of 8 without renormalization",
        ),
        Variant(
            "qwen2_moe_shared_norm",
            "qwen2_moe",
            _cfg(_COMMON, _ATTN, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48,
                 norm_topk_prob=True),
            "gated shared expert (48), top-2 of 8 renormalized",
        ),
        Variant(
            "qwen2_moe_noshared",
            "qwen2_moe",
            _cfg(_COMMON, _ATTN, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=0,
                 norm_topk_prob=False),
            "shared_expert_intermediate_size=0 (transformers builds 0-wide layers: output exactly 0)",
        ),
        Variant(
            "qwen2_moe_noshared_norm",
            "qwen2_moe",
            _cfg(_COMMON, _ATTN, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=0,
                 norm_topk_prob=True),
            "no shared expert, top-2 of 8 renormalized",
        ),
        Variant(
            "mixtral",
            "mixtral",
            _cfg(_COMMON, _ATTN, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                 num_experts_per_tok=2),
            "top-2 of 8, softmax over the chosen two",
        ),
        Variant(
            "olmoe",
            "olmoe",
            _cfg(_COMMON, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                 intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
            "top-2 of 8, no renormalization (OLMoE-1B-7B's setting), q/k norm over the full width",
        ),
        Variant(
            "deepseek_v2_group",
            "deepseek_v2",
            _cfg(_COMMON, _MLA, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=32,
                 q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                 first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                 routed_scaling_factor=2.5),
            "dense layer 0, group-limited greedy (4 groups of 2, keep 2) top-3 of 8, x2.5, 2 shared experts"
            " (top-k must exceed topk_group, or the group limit can never change a choice)",
        ),
        Variant(
            "deepseek_v2_qlora_yarn",
            "deepseek_v2",
            _cfg(_COMMON, _MLA, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=32,
                 q_lora_rank=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                 first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.5,
                 rope_parameters={"rope_type": "yarn", "rope_theta": ROPE_THETA, "factor": 4.0,
                                  "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                  "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
            "q_lora_rank set, YaRN rope like DeepSeek-V2-Lite, greedy top-3 of 8, x1.5, 1 shared expert",
        ),
        Variant(
            "longcat_flash",
            "longcat_flash",
            _cfg(_COMMON, _MLA, num_layers=2, ffn_hidden_size=48, q_lora_rank=16, head_dim=4,
                 n_routed_experts=4, zero_expert_num=4, moe_topk=3, expert_ffn_hidden_size=32,
                 routed_scaling_factor=2.0),
            "4 real + 4 identity experts, top-3 on softmax + correction bias, x2.0",
            bias_std=0.05,
        ),
        # 4-bit tests: every quantized matrix needs its input width divisible by
        # the group size (32), so this one is wider.
        Variant(
            "qwen3_moe_q",
            "qwen3_moe",
            _cfg(_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64,
                 num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                 num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True),
            "width 64, expert FFN 64 (all matrices divisible by group 32) for the 4-bit test",
        ),
        Variant(
            "longcat_flash_q",
            "longcat_flash",
            _cfg(_COMMON, _MLA, hidden_size=64, num_layers=1, ffn_hidden_size=64, q_lora_rank=32,
                 kv_lora_rank=32, head_dim=4, n_routed_experts=4, zero_expert_num=4, moe_topk=3,
                 expert_ffn_hidden_size=64, routed_scaling_factor=2.0),
            "width 64 LongCat for the 4-bit test (identity experts next to quantized ones)",
            bias_std=0.05,
        ),
    ]
}


# --------------------------------------------------------------------------- #
# transformers side
# --------------------------------------------------------------------------- #

def _classes(family: str):
    import transformers as tf

    table = {
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM),
        "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
        "longcat_flash": (tf.LongcatFlashConfig, tf.LongcatFlashForCausalLM),
    }
    return table[family]


def _router_modules(model) -> list:
    """The router module of every MoE layer, in layer order."""
    out = []
    for layer in model.model.layers:
        mlp = layer.mlp
        router = getattr(mlp, "router", None) or getattr(mlp, "gate", None)
        if router is not None and hasattr(mlp, "experts"):
            out.append(router)
    return out


def _router_weight(router):
    return router.classifier.weight if hasattr(router, "classifier") else router.weight


def make_model(variant: Variant, seed: int):
    """A transformers model of `variant` with random weights drawn from `seed`."""
    import torch

    config_cls, model_cls = _classes(variant.family)
    config = config_cls(**copy.deepcopy(variant.config))
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    with torch.no_grad():
        # Sharper routing and sharper token choices: see "Margins" above.
        for router in _router_modules(model):
            _router_weight(router).mul_(variant.router_scale)
            if variant.bias_std:
                router.e_score_correction_bias.copy_(
                    torch.randn(router.e_score_correction_bias.shape) * variant.bias_std
                )
        model.lm_head.weight.normal_(0.0, variant.lm_head_std)
    return model


@dataclass
class RoutingRecord:
    """What one MoE layer's router saw and chose over a whole sequence."""

    inputs: np.ndarray  # [T, hidden] what the router was applied to
    logits: np.ndarray  # [T, n_choices] fp32 router logits
    indices: np.ndarray  # [T, k] chosen ids (transformers' order)
    weights: np.ndarray  # [T, k] combine weights


@dataclass
class Reference:
    """transformers' outputs on one checkpoint."""

    variant: Variant
    path: Path
    seed: int
    prompt: list[int]
    generated: list[int]
    logits: np.ndarray  # [T, vocab] for tokens = prompt + generated[:-1]
    routing: list[RoutingRecord] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        """The sequence the reference logits are computed on."""
        return self.prompt + self.generated[:-1]


def transformers_logits(model, ids: list[int]):
    """Logits [T, vocab] (fp32 numpy) and routing records for one sequence."""
    import torch

    records: list[RoutingRecord] = []
    hooks = []

    def hook(_module, inputs, outputs):
        logits, weights, indices = outputs
        records.append(
            RoutingRecord(
                inputs=inputs[0].detach().float().reshape(len(ids), -1).numpy().copy(),
                logits=logits.detach().float().reshape(-1, logits.shape[-1]).numpy().copy(),
                indices=indices.detach().reshape(len(ids), -1).numpy().copy(),
                weights=weights.detach().float().reshape(len(ids), -1).numpy().copy(),
            )
        )

    for router in _router_modules(model):
        hooks.append(router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return out.float().numpy(), records


def transformers_greedy(model, prompt: list[int], n: int = NUM_GENERATED) -> list[int]:
    """Greedy continuation, recomputing the whole sequence each step (no cache)."""
    import torch

    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            tok = int(torch.argmax(logits))
            out.append(tok)
            ids.append(tok)
    return out


# --------------------------------------------------------------------------- #
# Routing recomputed from the saved router weights (numpy), and its margins
# --------------------------------------------------------------------------- #

def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def choice_scores(variant: Variant, router_logits: np.ndarray, bias: np.ndarray | None = None):
    """The scores each family's top-k picks from, with disallowed ids at -inf.

    Returns (scores [T, E], margin_units) where margin_units says which margin
    applies: "logit" scores are order-equivalent to router logits, "prob"
    scores are probabilities (LongCat, plus its correction bias).
    """
    cfg = variant.config
    if variant.family == "longcat_flash":
        return _softmax(router_logits) + bias[None, :], "prob"
    scores = router_logits.astype(np.float64)
    if variant.family == "deepseek_v2" and cfg.get("topk_method") == "group_limited_greedy":
        # Softmax is monotone, so choosing groups by their best probability is
        # choosing them by their best logit.
        t, e = scores.shape
        groups = scores.reshape(t, cfg["n_group"], e // cfg["n_group"])
        best = groups.max(axis=-1)
        keep = np.argsort(-best, axis=-1)[:, : cfg["topk_group"]]
        mask = np.zeros_like(best, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        scores = np.where(np.repeat(mask, e // cfg["n_group"], axis=-1), scores, -np.inf)
    return scores, "logit"


def top_k(variant: Variant) -> int:
    cfg = variant.config
    return cfg.get("num_experts_per_tok") or cfg["moe_topk"]


def routing_margin(variant: Variant, record: RoutingRecord, bias=None) -> float:
    """Smallest gap between the k-th chosen and the best rejected score (and,
    for group-limited routing, between the last kept and first dropped group)."""
    k = top_k(variant)
    scores, _ = choice_scores(variant, record.logits, bias)
    srt = -np.sort(-scores, axis=-1)
    gaps = [srt[:, k - 1] - srt[:, k]]
    cfg = variant.config
    if variant.family == "deepseek_v2" and cfg.get("topk_method") == "group_limited_greedy":
        t, e = record.logits.shape
        best = record.logits.reshape(t, cfg["n_group"], -1).max(axis=-1)
        bs = -np.sort(-best, axis=-1)
        gaps.append(bs[:, cfg["topk_group"] - 1] - bs[:, cfg["topk_group"]])
    return float(min(np.min(g) for g in gaps))


def recompute_choice(variant: Variant, record: RoutingRecord, bias=None) -> np.ndarray:
    """Chosen ids [T, k], sorted, from the router logits alone (numpy)."""
    k = top_k(variant)
    scores, _ = choice_scores(variant, record.logits, bias)
    return np.sort(np.argsort(-scores, axis=-1)[:, :k], axis=-1)


def token_margin(logits: np.ndarray) -> float:
    """Smallest top-1 minus top-2 logit gap over the rows, relative to max|logit|."""
    srt = -np.sort(-logits, axis=-1)
    return float(np.min(srt[:, 0] - srt[:, 1]) / np.max(np.abs(logits)))


def router_biases(model) -> list:
    """LongCat's e_score_correction_bias per MoE layer (None for other families)."""
    out = []
    for r in _router_modules(model):
        b = getattr(r, "e_score_correction_bias", None)
        out.append(None if b is None else b.detach().double().numpy().copy())
    return out


# --------------------------------------------------------------------------- #
# Building a checkpoint
# --------------------------------------------------------------------------- #

def reference_outputs(variant: Variant, model, path: Path, seed: int = -1) -> Reference:
    """Greedy tokens, logits and routing of a transformers `model` on the prompt."""
    generated = transformers_greedy(model, PROMPT_IDS)
    logits, routing = transformers_logits(model, PROMPT_IDS + generated[:-1])
    return Reference(variant, Path(path), seed, list(PROMPT_IDS), generated, logits, routing)


def margins_hold(ref: Reference, biases: list) -> bool:
    """Whether every greedy and routing decision of `ref` is well separated."""
    ok = token_margin(ref.logits[len(ref.prompt) - 1:]) >= TOKEN_MARGIN
    for rec, bias in zip(ref.routing, biases):
        _, units = choice_scores(ref.variant, rec.logits, bias)
        need = PROB_MARGIN if units == "prob" else ROUTER_MARGIN
        ok = ok and routing_margin(ref.variant, rec, bias) >= need
    return ok


def features_exercised(ref: Reference, biases: list) -> bool:
    """Whether the reference sequence exercises the variant's routing features:
    group-limited routing changes some choice (DeepSeek), identity experts are
    chosen and the correction bias changes some choice (LongCat)."""
    variant = ref.variant
    k = top_k(variant)
    changed = chosen_zero = 0
    for rec, bias in zip(ref.routing, biases):
        plain = np.sort(np.argsort(-rec.logits, axis=-1)[:, :k], axis=-1)
        changed += int(np.any(plain != recompute_choice(variant, rec, bias), axis=-1).sum())
        if variant.family == "longcat_flash":
            chosen_zero += int((rec.indices >= variant.config["n_routed_experts"]).sum())
    if variant.family == "longcat_flash":
        return changed > 0 and chosen_zero > 0
    if variant.config.get("topk_method") == "group_limited_greedy":
        return changed > 0
    return True


def load_transformers(name: str, path: str | Path):
    """A saved checkpoint of variant `name`, loaded by transformers in fp32."""
    _, model_cls = _classes(VARIANTS[name].family)
    return model_cls.from_pretrained(str(path), dtype="float32").eval()


def build_checkpoint(name: str, path: str | Path, max_tries: int = 40) -> Reference:
    """Build variant `name` into directory `path` and return its reference.

    Seeds base_seed, base_seed+1, ... are tried until the routing and greedy
    margins hold on the reference sequence (see the module docstring).
    """
    from mlx_moe.tokenizer import save_byte_tokenizer

    variant = VARIANTS[name]
    path = Path(path)
    for seed in range(variant.base_seed, variant.base_seed + max_tries):
        model = make_model(variant, seed)
        ref = reference_outputs(variant, model, path, seed)
        if margins_hold(ref, router_biases(model)) and features_exercised(ref, router_biases(model)):
            break
    else:
        raise RuntimeError(f"{name}: no seed in {max_tries} tries gave well-separated decisions")

    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(str(path))
    save_byte_tokenizer(path)
    meta = {
        "variant": name,
        "family": variant.family,
        "seed": seed,
        "doc": variant.doc,
        "prompt": PROMPT_IDS,
        "generated": ref.generated,
    }
    (path / "reference.json").write_text(json.dumps(meta, indent=1))
    return ref


# --------------------------------------------------------------------------- #
# The hub dialect, for unmodified mlx-lm
# --------------------------------------------------------------------------- #

def write_hub_dialect(src: str | Path, dst: str | Path) -> Path:
    """Copy a transformers-5 checkpoint, translating the config to the hub dialect.

    - ``rope_parameters`` -> ``rope_theta`` (+ ``rope_scaling`` for non-default
      rope types, with the hub's key ``type``);
    - Qwen ``num_local_experts`` -> ``num_experts``;
    - DeepSeek-V2: mlx-lm's attention reads ``rope_scaling`` unconditionally, so
      default rope is written as YaRN with factor 1, which is the same rotation
      (every YaRN frequency blend and mscale is 1 at factor 1);
    - LongCat: ``zero_expert_type: identity``, ``attention_method``, the two MLA
      scale flags (transformers always applies them), and the identity experts'
      gate/up tensors dropped (hub checkpoints have none).
    """
    from safetensors.numpy import load_file, save_file

    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    family = cfg["model_type"]
    rope = cfg.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": ROPE_THETA}
    cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        scaling["type"] = rope["rope_type"]
        cfg["rope_scaling"] = scaling
    elif family == "deepseek_v2":
        cfg["rope_scaling"] = {
            "type": "yarn", "factor": 1.0, "original_max_position_embeddings": cfg["max_position_embeddings"],
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0,
        }
    if family in ("qwen3_moe", "qwen2_moe", "olmoe") and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    if family == "longcat_flash":
        cfg.update(zero_expert_type="identity", attention_method="MLA",
                   mla_scale_q_lora=True, mla_scale_kv_lora=True)
        n_real = cfg["n_routed_experts"]
        for f in dst.glob("*.safetensors"):
            tensors = load_file(str(f))
            keep = {}
            for k, v in tensors.items():
                parts = k.split(".")
                if "experts" in parts:
                    e = int(parts[parts.index("experts") + 1])
                    if e >= n_real:
                        continue
                keep[k] = v
            save_file(keep, str(f), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


# --------------------------------------------------------------------------- #
# 4-bit: undo mlx_lm.convert's quantization into a float transformers checkpoint
# --------------------------------------------------------------------------- #

def dequantized_hf_checkpoint(qdir: str | Path, hf_src: str | Path, dst: str | Path) -> Path:
    """Write a float transformers checkpoint holding exactly the 4-bit weights.

    Every quantized tensor of the mlx_lm.convert output `qdir` is expanded with
    ``mx.dequantize`` (per-tensor group size and bits from its config) and put
    back under its transformers name: stacked ``switch_mlp`` experts are split
    per expert, and LongCat's ``embed_q``/``unembed_out`` (mlx-lm's split of
    ``kv_b_proj``) are joined again.  Tensors mlx-lm drops (LongCat's unused
    identity-expert gate/up) come from `hf_src`.  transformers run on the result
    is the "dequantized float" reference for the 4-bit model.
    """
    import mlx.core as mx
    from safetensors.numpy import load_file, save_file

    qdir, hf_src, dst = Path(qdir), Path(hf_src), Path(dst)
    qcfg = json.loads((qdir / "config.json").read_text())["quantization"]
    src = {}
    for f in sorted(hf_src.glob("*.safetensors")):
        src.update(load_file(str(f)))
    q = {}
    for f in sorted(qdir.glob("*.safetensors")):
        q.update(mx.load(str(f)))

    floats: dict[str, np.ndarray] = {}
    for key, value in q.items():
        base, _, leaf = key.rpartition(".")
        if leaf in ("scales", "biases") and f"{base}.weight" in q:
            continue
        if leaf == "weight" and f"{base}.scales" in q:
            spec = qcfg.get(base, qcfg)
            value = mx.dequantize(value, q[f"{base}.scales"], q[f"{base}.biases"],
                                  group_size=spec["group_size"], bits=spec["bits"])
        floats[key] = np.array(value.astype(mx.float32))

    out: dict[str, np.ndarray] = {}
    for key, value in floats.items():
        if ".switch_mlp." in key:
            head, tail = key.split(".switch_mlp.")
            for e in range(value.shape[0]):
                out[f"{head}.experts.{e}.{tail}"] = value[e]
        elif key.endswith(".embed_q.weight"):
            prefix = key[: -len(".embed_q.weight")]
            wk = value.swapaxes(-1, -2)  # [heads, qk_nope, kv_lora]
            wv = floats[f"{prefix}.unembed_out.weight"]  # [heads, v_head, kv_lora]
            joined = np.concatenate([wk, wv], axis=1)
            out[f"{prefix}.kv_b_proj.weight"] = joined.reshape(-1, joined.shape[-1])
        elif key.endswith(".unembed_out.weight"):
            continue
        else:
            out[key] = value
    for key, value in src.items():
        out.setdefault(key, value)
    extra = sorted(set(out) - set(src))
    if extra:
        raise ValueError(f"dequantized tensors with no transformers name: {extra[:5]}")
    for key, value in src.items():
        if out[key].shape != value.shape:
            raise ValueError(f"{key}: shape {out[key].shape} != {value.shape}")

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(hf_src, dst, ignore=shutil.ignore_patterns("*.safetensors", "reference.json"))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
