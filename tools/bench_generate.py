#!/usr/bin/env python3
"""End-to-end prefill and decode speed: mlx-moe against mlx-lm, one process, one run.

Builds a random-weight model of a real shape (no download), quantized the way
mlx-community checkpoints are (MLX affine 4-bit, group 64; routers 8-bit),
and runs every engine on the same weights (the arrays are shared, not copied):

  mlx-lm        mlx-lm's own model (gather_qmm SwitchGLU)
  mlx-moe       our model, expert backend --kernels (auto: the custom kernels on GPUs)
  mlx-moe+log   the same with --expert-log writing a CSV (the logging overhead)
  mlx-moe/mlx   our model on the `mlx` backend (when --kernels is not mlx)
  mlx-moe+compile  our model, decode steps through one mx.compile'd step
                (mlx_moe/compiled.py); its greedy tokens are checked against mlx-moe's
  mlx-moe+compile+log  the compiled step with the expert log
  mlx-moe+compile  (on the metal / cuda kernels) through the fused decoder layers
                (mlx_moe/fused_step.py) where the model allows
  mlx-moe+compile+scatter  the fused layers with the new key and value written by two
                scatters per layer (fused_step.KV_IN_PLACE off) instead of in place
  mlx-moe+compile+hostpos  the compiled step with its write position a scalar made from
                the host each step (compiled.DEVICE_POSITION off; on by default: +devpos)
  mlx-moe+compile+topk  the fused layers with the routing rule in a moe_router_topk
                launch of its own (fused_step.ROUTE_IN_EXPERTS off) instead of inside the
                experts' gate/up launch (the default: +route)
  mlx-moe+compile+mlxhead  the fused layers with the final norm and LM head on MLX's
                ops (fused_step.HEAD_LAUNCH off) instead of one dense_norm launch
  mlx-moe+compile+split8  the fused layers' attention in 8 splits a head (kernels.attention.SPLITS;
                default 4): 7.6 against 9.9 us for the attention alone (ncu), but in the step
                o_proj's combine of twice the parts cost more (2026-12-06: 2631.6 against
                2608.2 us a step)
  mlx-moe+compile+pnsg4, +pnsg16  the separate attention launch's simdgroups per
                threadgroup at 4 / 16 (kernels.attention.PARTS_NSG; default 8)
  mlx-moe+compile+qkvnsg8, +qkvnsg16  qkv_attention at 8 / 16 simdgroups a threadgroup
                (kernels.chain.QKV_NSG; default 4)
  mlx-moe+compile+noqkvatt  the q/k/v projections and the attention in two launches
                (fused_step.QKV_ATTENTION_ONE_LAUNCH off; on by default on CUDA: one
                qkv_attention launch; +qkvatt turns it on for the emulated flavor too)
  mlx-moe+compile+oprojmoe  o_proj with the router tail and the MoE layer in one launch
                (oproj_moe: fused_step.OPROJ_MOE_ONE_LAUNCH, off by default: slower on
                the H100); a layer is then two launches
  mlx-moe+compile+attn1  q/k/v, the attention and o_proj with the router tail in one
                launch (qkv_attention_oproj at kernels.chain.ATTENTION_NSG simdgroups:
                fused_step.ATTENTION_ONE_LAUNCH, off by default: 5.1 us a layer more GPU
                time, one graph node a layer less host time); a layer is then two launches
  mlx-moe+compile+mlxembed  the token's embedding from MLX's gathers and dequantize
                (fused_step.EMBED_LAUNCH off; on by default on CUDA: one dense_embed
                launch; +embed turns it on for the emulated flavor too)
  mlx-moe+compile+mlxsample  greedy tokens from MLX's logsumexp, subtraction and argmax
                of the step's log-probabilities (compiled.GREEDY_KERNEL off) instead of
                the step's greedy_sample launch (lazy log-probabilities)
  mlx-moe+compile+tail  the fused layers with the post-attention norm and the router
                projection run by the o_proj launch's last threadgroup
                (fused_step.ROUTER_IN_RESIDUAL, on by default on CUDA; +notail: their
                own launch)
  mlx-moe+compile+moe1  the MoE layer in one launch (mul_mv_id_moe: its down threadgroups
                wait inside the launch for its gate/up ones; fused_step.MOE_ONE_LAUNCH,
                on CUDA and the emulation); +moe2: the two launches;
                +mstage: its down threadgroups staging their weights in threadgroup memory
                before they wait (dispatch.MOE_LAYER, Q4_0 1x4x8x1 with stage 1, the
                default until 2026-12-06's seventh session); +munstaged: 1x4x8x1
                without; +gustage: its gate/up threadgroups staging theirs too (stage
                3); +gustage7: and their activations prepared in threadgroup memory
                (stage 7, the default until 2026-12-06's eighth session); +mstage5: the
                down rows staged and the gate/up activations prepared, the gate/up rows
                read in place (stage 5); +hpairs: stage 7 with the down threadgroups
                reading h two floats a load (stage 15, the default until 2026-12-06's
                tenth session); +hbf16: h kept in bfloat16, the down threadgroups
                reading it two values a 32-bit load (stage 31: half the bytes of h from
                L2; the default until 2026-12-07; the default's gate/up dot products
                on the tensor cores off);
                +gumma: the gate/up dot products alone on the tensor cores (stage
                63, the default until 2026-12-07's seventeenth session; the default's
                down dot products on the tensor cores off); +resfirst: 191 with the
                residual read before the down threadgroups wait (stage 255);
                +fenceall: every thread of a threadgroup fencing at each hand-off
                (stage 191, the default until 2026-12-07's twenty-first session;
                the default's one fence a hand-off off); +guw32: the default with
                the gate/up tile's nibbles converted a 32-bit word at a time (3263);
                +hold: the default with its down threadgroups' rows held until half
                the gate/up threadgroups are done (2495); +dnloop1: the default with
                the down tile's loop not unrolled (2751: 32 registers, 8 threadgroups
                an SM); +holdloop1: both (3007); +holdq, +holdloop1q: those two
                held until a quarter of the gate/up threadgroups are done (6591, 7103);
                +moe=GATExDOWNxNSG[xNQ[xSTAGE]]: the MoE layer's Q4_0 geometry itself
                (dispatch.MOE_LAYER), e.g. +moe=2x4x4x1x14783;
                +eachroute: its down threadgroups running the routing rule
                themselves instead of reading what the token's first threadgroup
                wrote (dispatch.SHARE_ROUTE off; on by default);
                +tailrule: the router tail running the rule once per token and the MoE
                layer under given routing (mul_mv_id_moe_ids; fused_step.ROUTE_IN_TAIL);
                +notailrule: the rule in each MoE threadgroup
  mlx-moe+compile+tailsplit  that tail shared by every threadgroup of the launch, the
                last one adding the shares (kernels.dense.ROUTER_TAIL = "split");
                +tailone: the last threadgroup projects the whole router (the default)
  mlx-moe+compile+nofuse  the compiled step over mlx-lm's forward (compiled.FUSED_LAYERS off)
  mlx-moe+compile+nofuse+attn  that, with its attention on the decode attention
                kernel (metal/attention.metal; compiled.ATTENTION_KERNEL)
  mlx-moe+dq    our model with dense projections of >= --dq-min-rows rows run as
                dequantize + float GEMM (mlx_moe/prefill.py): prompt processing.
                Without +dq the engines take the loader's default
                (prefill.DEQUANTIZED_MIN_ROWS for the kernels' backend: 384 rows on
                CUDA); +nodq: the quantized kernel for every prompt
  mlx-moe+layereval  our model evaluating each decoder layer of a prompt as soon as it
                is built (prefill.LAYER_EVAL_MIN_ROWS = 64, the default): the device
                runs a layer while the host builds the next; +nolayereval: one
                evaluation of the whole prompt
  mlx-moe+tf32  our model with the prefill GEMMs on the TF32 bodies
                (mul_mm_id.CUDA_GEMM = "pipe") instead of the default async ones
  mlx-moe+bf16  the same on the bf16 bodies (CUDA_GEMM = "bf16")
  mlx-moe+srcfiles  CUDA kernels handed to MLX as #include lines of source files
                (kernels.registry.CUDA_SOURCE_FILES; MLX hashes a kernel's source on
                every evaluation; the default since the H100 measured it); +srctext:
                the source text itself
  mlx-moe+acqrel  the CUDA kernels' hand-offs between threadgroups fenced with
                fence.acq_rel.gpu instead of fence.sc.gpu (kernels.registry.CUDA_FENCE)
  mlx-moe+handoff1  the decode step's hand-offs outside the MoE layer (the chained
                launches, the router tail) fenced by one thread a threadgroup, not all
                (kernels.registry.CUDA_HANDOFF = "one"; the MoE layer's own: stage bit 2048)
  mlx-moe+lanes  the async prefill GEMMs with their weight copies coalesced per row
                (mul_mm_id.ASYNC_COPY = "lanes", the default); +rows: a row a thread
  mlx-moe+dbf16  the async down GEMM writes its output in bfloat16
                (mul_mm_id.ASYNC_D_BF16, the default); +dfloat: in float32
  mlx-moe+r128  the async down GEMM in 128-row tiles (mul_mm_id.ASYNC_ROWS, the default);
                +r64: in 64-row tiles
  mlx-moe+map0grid  the prefill route built by two kernels over the whole GPU
                (mul_mm_id.MAP0 = "grid", the default); +map0block: by one threadgroup

Decode tok/s counts from the first to the last token (prefill tok/s: prompt
tokens over the time to the first token); the CPU time of the generating
thread per decoded token is recorded too (less sensitive to a noisy host).  The log's overhead is reported
three ways: ratio of the median tok/s, ratio of the best runs, and per pair of
back-to-back runs (repetitions alternate the engine order, ABBA).

--breakdown adds where a decode step's time goes, on our model (kernels as
for mlx-moe) after a prefill of P tokens, each variant decoding G tokens the
way generate does (next step queued before the current token is read), ms
per token, medians over --breakdown-reps rounds:

  full          the whole step (uncompiled)
  no-experts    routing kept, the expert backend returns zeros (no expert compute)
  no-moe        every MoE block returns zeros (no router, experts, combine)
  skeleton      no MoE block and no attention: embedding, norms, residual adds,
                final norm, LM head and the Python loop over layers
  build         building the full step's graph in Python, no evaluation
  compiled      the compiled step (mlx_moe/compiled.py)
  compiled build  calling the compiled step, no evaluation

and the differences (experts = full - no-experts, router + combine =
no-experts - no-moe, attention = no-moe - skeleton), plus the number of MLX
graph nodes per step (mx.export_to_dot) with the most frequent primitives.

Each repetition runs the engines in turn (prefill P random tokens, decode G
tokens, greedy, no EOS); the report gives medians over repetitions and
ratios against mlx-lm.

  python tools/bench_generate.py --shape qwen3-30b-a3b --prompt-tokens 512 --gen-tokens 128
  python tools/bench_generate.py --shape tiny --reps 2            # CPU smoke test
  python tools/bench_generate.py --engines mlx-lm,mlx-moe,mlx-moe+compile --breakdown --reps 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import re
import statistics
import sys
import tempfile
import time

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mlx_moe import compiled as compiled_module  # noqa: E402
from mlx_moe import fused_step as fused_step_module  # noqa: E402
from mlx_moe import prefill as prefill_module  # noqa: E402
from mlx_moe.kernels import attention as attention_module  # noqa: E402
from mlx_moe.kernels import chain as chain_module  # noqa: E402
from mlx_moe.kernels import dense as dense_module  # noqa: E402
from mlx_moe.kernels import dispatch as dispatch_module  # noqa: E402
from mlx_moe.kernels import mul_mm_id as mul_mm_id_module  # noqa: E402
from mlx_moe.kernels import registry as registry_module  # noqa: E402
from mlx_moe.backends import ExpertBackend, get_backend  # noqa: E402
from mlx_moe.compiled import decoder_for, round_capacity, unsupported_reason  # noqa: E402
from mlx_moe.generation import generate_tokens  # noqa: E402
from mlx_moe.loader import model_classes  # noqa: E402
from mlx_moe.moe import MoELayer, set_expert_backend  # noqa: E402
from mlx_moe.prefill import dequantized_prefill  # noqa: E402

QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    max_position_embeddings=40960, decoder_sparse_step=1, mlp_only_layers=[],
)
DEEPSEEK_V2_LITE = dict(
    model_type="deepseek_v2", hidden_size=2048, num_hidden_layers=27, n_routed_experts=64,
    num_experts_per_tok=6, moe_intermediate_size=1408, intermediate_size=10944, n_shared_experts=2,
    first_k_dense_replace=1, moe_layer_freq=1, num_attention_heads=16, num_key_value_heads=16,
    kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    vocab_size=102400, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
)
TINY = dict(QWEN3_30B_A3B, hidden_size=256, num_hidden_layers=4, num_experts=16, num_experts_per_tok=4,
            moe_intermediate_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, vocab_size=1024)
SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "tiny": TINY}


def build_models(config: dict, bits: int, group_size: int, dtype: mx.Dtype = mx.bfloat16):
    """mlx-lm's model with random quantized weights, and ours sharing them; `dtype`:
    the float parameters (scales, norms, embeddings) and so the activations."""
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    baseline = arch.Model(arch.ModelArgs.from_dict(config))
    predicate = getattr(baseline, "quant_predicate", None)

    def class_predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if path.endswith("mlp.gate") or path.endswith("classifier"):
            return {"group_size": 64, "bits": 8}
        return predicate(path, module) if predicate else True

    # bfloat16 by default, as the checkpoints are (mlx-community's 4-bit ones too: bf16
    # scales, norms and embeddings): the activations are then bf16, not float32
    baseline.set_dtype(dtype)
    if bits < 16:
        nn.quantize(baseline, group_size=group_size, bits=bits, class_predicate=class_predicate)
        random_quantized(baseline)
    for layer in baseline.layers:  # layer by layer: the float weights never all exist at once
        mx.eval(layer.parameters())
    mx.eval(baseline.parameters())
    Model, Args = model_classes(dict(config))
    ours = Model(Args.from_dict(dict(config)))
    if bits < 16:
        nn.quantize(ours, group_size=group_size, bits=bits, class_predicate=class_predicate)
    weights = nn.utils.tree_flatten(baseline.parameters())
    ours.load_weights(weights, strict=True)  # same arrays, no copy
    mx.eval(ours.parameters())
    return baseline, ours


def random_quantized(model) -> None:
    """Give every quantized module random packed weights, scales and biases
    directly, replacing the lazy `mx.quantize` of random float weights before it
    is ever evaluated: building a 30B-parameter model this way costs seconds, not
    the minute or more of generating and quantizing float weights on the GPU.
    Weights are zero-mean uniform on 2^bits levels with the spread of the
    layers' own initialisation (uniform +-1/sqrt(fan_in)), so activations stay
    in the range real checkpoints give."""
    for _, m in model.named_modules():
        if not (hasattr(m, "scales") and hasattr(m, "bits") and "weight" in m):
            continue
        levels = (1 << m.bits) - 1
        fan_in = m.weight.shape[-1] * 32 // m.bits
        step = 2.0 / (levels * fan_in ** 0.5)  # levels * step spans +-1/sqrt(fan_in)
        *lead, last = m.weight.shape  # uint32 words: two random 16-bit halves each
        m.weight = mx.random.randint(0, 1 << 16, (*lead, 2 * last)).astype(mx.uint16).view(mx.uint32)
        m.scales = mx.full(m.scales.shape, step, dtype=m.scales.dtype)
        if getattr(m, "biases", None) is not None:
            m.biases = mx.full(m.biases.shape, -step * levels / 2, dtype=m.biases.dtype)


def random_q4_0_experts(model, scale: float = 0.02) -> None:
    """Replace our experts by random Q4_0 blocks of the same shapes (4.5 bits per
    weight, as MLX affine 4-bit g64): same bytes to read, for the kernels' path."""
    from mlx_moe.moe import moe_layers
    from mlx_moe.q4_0 import Q4_0SwitchLinear

    for layer in moe_layers(model):
        ex = layer.switch_mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(ex, name)
            E, rows, cols = p.num_experts, p.output_dims, p.input_dims
            nb = cols // 32
            d = (mx.random.normal((E, rows, nb, 1)) * scale).astype(mx.float16).view(mx.uint16)
            qs = mx.random.randint(0, 1 << 16, (E, rows, nb, 8)).astype(mx.uint16)
            q = Q4_0SwitchLinear(cols, rows, E)
            q.weight = mx.concatenate([d, qs], axis=-1).reshape(E, rows, nb * 9)
            mx.eval(q.weight)
            setattr(ex, name, q)


def run_once(model, prompt, gen_tokens, ours: bool, log_path=None, prefill_step_size=2048, compile=False):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    mx.synchronize()
    t0 = time.perf_counter()
    if ours:
        steps = generate_tokens(model, prompt, max_tokens=gen_tokens, expert_log=log_path,
                                prefill_step_size=prefill_step_size, compile=compile)
    else:
        steps = (t for t, _ in generate_step(mx.array(prompt), model, max_tokens=gen_tokens,
                                             prompt_cache=make_prompt_cache(model),
                                             prefill_step_size=prefill_step_size))
    tokens = []
    for t in steps:
        tokens.append(t)
        t2 = time.perf_counter()  # decode ends at the last token; closing a log file is not decoding
        c2 = time.thread_time()
        if len(tokens) == 1:
            t1, c1 = t2, c2
    n = len(tokens)
    return {"prefill_tps": len(prompt) / (t1 - t0), "decode_tps": (n - 1) / (t2 - t1), "tokens": tokens,
            "decode_cpu_ms": 1e3 * (c2 - c1) / (n - 1)}


def pair_overheads(pairs: list):
    """Overhead in percent from (time with, time without) pairs, each pair measured back
    to back so that host drift (10-20% between single runs on the H100 machine)
    cancels: the median and quartiles of the per-pair extra time, and the pooled one
    (total time with over total time without).  None for fewer than two pairs."""
    if len(pairs) < 2:
        return None
    per = sorted(100 * (w / o - 1) for w, o in pairs)
    q = statistics.quantiles(per, n=4) if len(per) >= 4 else [per[0], statistics.median(per), per[-1]]
    pooled = 100 * (sum(w for w, _ in pairs) / sum(o for _, o in pairs) - 1)
    return {"median": statistics.median(per), "q1": q[0], "q3": q[2], "n": len(per), "pooled": pooled,
            "per_pair": per}


def paired_overhead(plain: list, logged: list):
    """The expert log's decode-time overhead (pair_overheads) from the repetitions of
    the two engines taken in pairs (each pair ran back to back)."""
    return pair_overheads([(1 / b["decode_tps"], 1 / a["decode_tps"]) for a, b in zip(plain, logged)])


# -- per-component breakdown of a decode step ----------------------------------------------------


class ZeroExperts(ExpertBackend):
    """No expert compute: zeros of the layer's output shape.  They depend on the
    routing (mx.depends), or lazy evaluation would skip the router too."""

    name = "zero"

    def __call__(self, x, ids, weights, experts, n_identity=0, may_pad=False):
        return mx.depends(mx.zeros_like(x), [ids, weights])


class Zeros(nn.Module):
    """Stands in for a removed block (MoE block or attention): returns zeros like its input."""

    def __call__(self, x, *args, **kwargs):
        return mx.zeros_like(x)


@contextlib.contextmanager
def swapped_blocks(model, moe: bool, attention: bool):
    """Temporarily replace every MoE block and/or every attention block by `Zeros`."""
    saved = []
    zeros = Zeros()
    for layer in model.layers:
        for name in list(layer.keys()):
            block = layer[name]
            if (moe and isinstance(block, MoELayer)) or (attention and name in ("self_attn", "attention")):
                saved.append((layer, name, block))
                setattr(layer, name, zeros)
    try:
        yield
    finally:
        for layer, name, block in saved:
            setattr(layer, name, block)


def uncompiled_step(model, cache):
    def step(y):
        logits = model(y.reshape(1, 1), cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.argmax(logprobs, axis=-1)
    return step


def compiled_step(decoder, cache):
    def step(y):  # as compiled_generate_step decodes greedily
        if compiled_module.GREEDY_KERNEL:
            return decoder.step_greedy(y, cache)[0]
        return mx.argmax(decoder.step(y, cache), axis=-1)
    return step


def time_decode(step, y, n: int) -> float:
    """ms per token of n pipelined steps, as generate runs them."""
    y = step(y)
    mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = step(y)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    return 1e3 * (time.perf_counter() - t0) / (n + 1)


def time_build(step, y, n: int) -> float:
    """ms per token spent building the step's graph (no evaluation inside the timing)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        nxt = step(y)
        times.append(time.perf_counter() - t)
        mx.eval(nxt)
        y = nxt
    return 1e3 * statistics.median(times)


def graph_nodes(step, y) -> tuple:
    """(number of primitive nodes, most frequent primitives) of one unevaluated step."""
    path = os.path.join(tempfile.mkdtemp(), "step.dot")
    out = step(y)
    mx.export_to_dot(path, out)
    mx.eval(out)
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', open(path).read())
    return len(labels), collections.Counter(labels).most_common(8)


def breakdown(model, backend, prompt, gen_tokens: int, reps: int, prefill_step_size: int = 2048) -> dict:
    """ms per decode token of each variant (module docstring), medians over reps."""
    from mlx_lm.models.cache import make_prompt_cache

    set_expert_backend(model, backend)
    P = len(prompt)
    first = mx.array(prompt[-1:])
    cache = make_prompt_cache(model)
    for i in range(0, P - 1, prefill_step_size):
        model(mx.array(prompt[i:min(i + prefill_step_size, P - 1)])[None], cache=cache)
        mx.eval([c.state for c in cache])

    def rewind():  # back to the prefilled prompt (a variant without attention writes nothing)
        for c in cache:
            c.trim(c.offset - (P - 1))

    decoder = None if unsupported_reason(model) else decoder_for(model)
    static = decoder.make_cache(round_capacity(P + gen_tokens + 2)) if decoder else []
    for i in range(0, (P - 1) if decoder else 0, prefill_step_size):
        model(mx.array(prompt[i:min(i + prefill_step_size, P - 1)])[None], cache=static)
        mx.eval([c.state for c in static])

    def rewind_static():
        for c in static:
            c.trim(c.offset - (P - 1))

    zero = ZeroExperts()
    variants = {
        "full": (contextlib.nullcontext, lambda: uncompiled_step(model, cache), time_decode, rewind),
        "no-experts": (lambda: _backend(model, zero, backend), lambda: uncompiled_step(model, cache), time_decode, rewind),
        "no-moe": (lambda: swapped_blocks(model, True, False), lambda: uncompiled_step(model, cache), time_decode, rewind),
        "skeleton": (lambda: swapped_blocks(model, True, True), lambda: uncompiled_step(model, cache), time_decode, rewind),
        "build": (contextlib.nullcontext, lambda: uncompiled_step(model, cache), time_build, rewind),
        "compiled": (contextlib.nullcontext, lambda: compiled_step(decoder, static), time_decode, rewind_static),
        "compiled build": (contextlib.nullcontext, lambda: compiled_step(decoder, static), time_build, rewind_static),
    }
    if decoder is None:  # e.g. MLA attention: no compiled step to time
        variants = {k: v for k, v in variants.items() if not k.startswith("compiled")}
    times = {name: [] for name in variants}
    for rep in range(reps + 1):  # the first round warms up (kernel compiles, the compiled trace)
        for name, (ctx, make, timer, reset) in variants.items():
            if times[name] is None:
                continue
            try:
                with ctx():
                    ms = timer(make(), first, gen_tokens)
            except Exception as e:  # noqa: BLE001 -- reported, the other variants still count
                print(f"[bench_generate] breakdown variant {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                times[name] = None
                continue
            finally:
                reset()
            if rep:
                times[name].append(ms)
    result = {name: (statistics.median(v) if v else float("nan")) for name, v in times.items()}
    result["nodes"] = graph_nodes(uncompiled_step(model, cache), first)
    rewind()
    for name in ("compiled", "compiled build"):
        result.setdefault(name, float("nan"))
    try:
        result["compiled nodes"] = graph_nodes(compiled_step(decoder, static), first) if decoder else (0, [])
    except Exception as e:  # noqa: BLE001
        result["compiled nodes"] = (0, [(f"FAILED: {type(e).__name__}", 0)])
    rewind_static()
    return result


@contextlib.contextmanager
def _backend(model, backend, restore):
    set_expert_backend(model, backend)
    try:
        yield
    finally:
        set_expert_backend(model, restore)


def print_breakdown(b: dict, n_layers: int) -> None:
    print(f"\n## decode step breakdown (ms per token, {n_layers} layers)")
    print("| variant | ms/token | tok/s |")
    print("|---|---|---|")
    for name in ("full", "no-experts", "no-moe", "skeleton", "build", "compiled", "compiled build"):
        print(f"| {name} | {b[name]:.3f} | {1e3 / b[name]:.1f} |")
    parts = {
        "experts (full - no-experts)": b["full"] - b["no-experts"],
        "router + combine + MoE glue (no-experts - no-moe)": b["no-experts"] - b["no-moe"],
        "attention (no-moe - skeleton)": b["no-moe"] - b["skeleton"],
        "skeleton (embed, norms, residuals, LM head, loop)": b["skeleton"],
        "Python graph building of the full step (overlaps the device)": b["build"],
        "compiled step saves (full - compiled)": b["full"] - b["compiled"],
    }
    print("\n| component | ms/token | share of full |")
    print("|---|---|---|")
    for name, ms in parts.items():
        print(f"| {name} | {ms:.3f} | {100 * ms / b['full']:.0f}% |")
    for key in ("nodes", "compiled nodes"):
        n, top = b[key]
        print(f"\nMLX graph nodes per step, {'uncompiled' if key == 'nodes' else 'compiled'}: {n} "
              f"({n / n_layers:.1f} per layer); most frequent: " + ", ".join(f"{l} {c}" for l, c in top))


def _moe_layer_stage(stage: int):
    """The switch to dispatch.MOE_LAYER with Q4_0 at 1x4x8x1 and this LayerGeometry.stage."""
    return (dispatch_module, "MOE_LAYER", {**dispatch_module.MOE_LAYER,
                                           "q4_0": dispatch_module.LayerGeometry(1, 4, 8, 1, stage=stage)})


# Engine suffixes that switch a module setting for one run: suffix -> (module, name, value).
SWITCHES = {
    "+attn": (compiled_module, "ATTENTION_KERNEL", True),
    "+nofuse": (compiled_module, "FUSED_LAYERS", False),
    "+devpos": (compiled_module, "DEVICE_POSITION", True),
    "+hostpos": (compiled_module, "DEVICE_POSITION", False),
    "+scatter": (fused_step_module, "KV_IN_PLACE", False),
    "+route": (fused_step_module, "ROUTE_IN_EXPERTS", True),
    "+topk": (fused_step_module, "ROUTE_IN_EXPERTS", False),
    "+mlxhead": (fused_step_module, "HEAD_LAUNCH", False),
    "+mlxsample": (compiled_module, "GREEDY_KERNEL", False),
    "+embed": (fused_step_module, "EMBED_LAUNCH", ("cuda", "emulated")),
    "+split8": (attention_module, "SPLITS", 8),
    "+pnsg4": (attention_module, "PARTS_NSG", 4),
    "+pnsg16": (attention_module, "PARTS_NSG", 16),
    "+qkvnsg8": (chain_module, "QKV_NSG", 8),
    "+qkvnsg16": (chain_module, "QKV_NSG", 16),
    "+qkvatt": (fused_step_module, "QKV_ATTENTION_ONE_LAUNCH", ("cuda", "emulated")),
    "+noqkvatt": (fused_step_module, "QKV_ATTENTION_ONE_LAUNCH", ()),
    "+oprojmoe": (fused_step_module, "OPROJ_MOE_ONE_LAUNCH", ("cuda",)),
    "+attn1": (fused_step_module, "ATTENTION_ONE_LAUNCH", ("cuda",)),
    "+mlxembed": (fused_step_module, "EMBED_LAUNCH", ()),
    "+tail": (fused_step_module, "ROUTER_IN_RESIDUAL", True),
    "+notail": (fused_step_module, "ROUTER_IN_RESIDUAL", False),
    "+mstage": _moe_layer_stage(1),
    "+munstaged": _moe_layer_stage(0),
    "+gustage": _moe_layer_stage(3),
    "+gustage7": _moe_layer_stage(7),
    "+mstage5": _moe_layer_stage(5),
    "+hpairs": _moe_layer_stage(15),
    "+hbf16": _moe_layer_stage(31),
    "+gumma": _moe_layer_stage(63),
    "+resfirst": _moe_layer_stage(255),
    "+fenceall": _moe_layer_stage(191),
    "+guw32": _moe_layer_stage(3263),
    "+hold": _moe_layer_stage(2495),
    "+dnloop1": _moe_layer_stage(2751),
    "+holdloop1": _moe_layer_stage(3007),
    "+holdq": _moe_layer_stage(6591),
    "+holdloop1q": _moe_layer_stage(7103),
    "+eachroute": (dispatch_module, "SHARE_ROUTE", False),
    "+tailrule": (fused_step_module, "ROUTE_IN_TAIL", ("cuda", "emulated")),
    "+notailrule": (fused_step_module, "ROUTE_IN_TAIL", ()),
    "+moe1": (fused_step_module, "MOE_ONE_LAUNCH", ("cuda", "emulated")),
    "+moe2": (fused_step_module, "MOE_ONE_LAUNCH", ()),
    "+tailsplit": (dense_module, "ROUTER_TAIL", "split"),
    "+tailone": (dense_module, "ROUTER_TAIL", "one"),
    "+layereval": (prefill_module, "LAYER_EVAL_MIN_ROWS", 64),
    "+nolayereval": (prefill_module, "LAYER_EVAL_MIN_ROWS", 0),
    "+tf32": (mul_mm_id_module, "CUDA_GEMM", "pipe"),
    "+bf16": (mul_mm_id_module, "CUDA_GEMM", "bf16"),
    "+lanes": (mul_mm_id_module, "ASYNC_COPY", "lanes"),
    "+rows": (mul_mm_id_module, "ASYNC_COPY", "rows"),
    "+dbf16": (mul_mm_id_module, "ASYNC_D_BF16", True),
    "+dfloat": (mul_mm_id_module, "ASYNC_D_BF16", False),
    "+r128": (mul_mm_id_module, "ASYNC_ROWS", 128),
    "+r64": (mul_mm_id_module, "ASYNC_ROWS", 64),
    "+map0grid": (mul_mm_id_module, "MAP0", "grid"),
    "+map0block": (mul_mm_id_module, "MAP0", "block"),
    "+srcfiles": (registry_module, "CUDA_SOURCE_FILES", True),
    "+srctext": (registry_module, "CUDA_SOURCE_FILES", False),
    "+acqrel": (registry_module, "CUDA_FENCE", "acq_rel"),
    "+handoff1": (registry_module, "CUDA_HANDOFF", "one"),
}
OTHER_SUFFIXES = ("+compile", "+log", "+dq", "+nodq")  # handled where the run is set up


def engine_suffixes(engine: str) -> list:
    """The "+..." parts of an engine name (mlx-moe+compile+topk -> [+compile, +topk]);
    an unknown one is an error naming the known ones."""
    suffixes = ["+" + part for part in engine.split("+")[1:]]
    unknown = [x for x in suffixes if x not in SWITCHES and x not in OTHER_SUFFIXES and not x.startswith("+moe=")]
    if unknown:
        raise SystemExit(f"engine {engine!r}: unknown suffix {', '.join(unknown)} (known: "
                         f"{', '.join(OTHER_SUFFIXES + tuple(SWITCHES))}, +moe=GATExDOWNxNSG[xNQ[xSTAGE]])")
    for x in suffixes:
        if x.startswith("+moe="):
            moe_layer_geometry(x)
    return suffixes


def moe_layer_geometry(suffix: str):
    """The LayerGeometry an engine's "+moe=GATExDOWNxNSG[xNQ[xSTAGE]]" names (dispatch.MOE_LAYER's
    Q4_0 entry for that run: a candidate's decode step without a switch of its own)."""
    try:
        return dispatch_module.LayerGeometry.parse(suffix[len("+moe="):])
    except ValueError as e:
        raise SystemExit(f"engine suffix {suffix!r}: {e}")


@contextlib.contextmanager
def engine_settings(engine: str):
    """The module settings `engine`'s suffixes name, for the body of the with; every
    setting of SWITCHES is back to its value afterwards."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in SWITCHES.values()]
    try:
        for suffix in engine_suffixes(engine):
            if suffix in SWITCHES:
                module, name, value = SWITCHES[suffix]
                setattr(module, name, value)
            elif suffix.startswith("+moe="):
                dispatch_module.MOE_LAYER = {**dispatch_module.MOE_LAYER, "q4_0": moe_layer_geometry(suffix)}
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--bits", type=int, default=4, help="4 or 8: MLX affine; 16: unquantized (--dtype)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="float parameters and activations: bfloat16 as checkpoints are; float32 makes "
                        "the greedy-token comparison of the engines exact (random weights leave the top "
                        "logits within bf16 rounding of each other)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--experts", choices=["shared", "q4_0"], default="shared",
                   help="shared: our experts are mlx-lm's arrays (MLX affine); q4_0: random Q4_0 experts "
                        "of equal size for our engines (the custom kernels' format)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--engines", default="mlx-lm,mlx-moe,mlx-moe+log,mlx-moe/mlx")
    p.add_argument("--dq-min-rows", type=int, default=64,
                   help="mlx-moe+dq: rows from which dense projections dequantize and run a float GEMM")
    p.add_argument("--breakdown", action="store_true", help="per-component time of our decode step (docstring)")
    p.add_argument("--breakdown-reps", type=int, default=1,
                   help="timed rounds of every breakdown variant (after one warm-up round); each round "
                        "decodes --gen-tokens tokens")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up round (one full run of every engine, not counted)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    config = dict(SHAPES[args.shape])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    mx.random.seed(0)
    baseline, ours = build_models(config, args.bits, args.group_size, getattr(mx, args.dtype))
    if args.experts == "q4_0":
        random_q4_0_experts(ours)
    kernels = get_backend(args.kernels)
    reference = get_backend("mlx")
    engines = [e for e in args.engines.split(",") if e]
    if kernels.name == "mlx":
        engines = [e for e in engines if e != "mlx-moe/mlx"]
    prompt = mx.random.randint(0, config["vocab_size"], (args.prompt_tokens,)).tolist()
    tmp = tempfile.mkdtemp()

    for e in engines:  # a typo must not cost a GPU run its last engine
        engine_suffixes(e)

    def run(engine):
        if engine == "mlx-lm":
            return run_once(baseline, prompt, args.gen_tokens, ours=False)
        backend = reference if engine == "mlx-moe/mlx" else kernels
        set_expert_backend(ours, backend)
        log = os.path.join(tmp, "log.csv") if engine.endswith("+log") else None
        # the loader's dense-prefill default for this backend, unless +dq / +nodq say otherwise
        suffixes = engine_suffixes(engine)
        dequantized_prefill(ours, args.dq_min_rows if "+dq" in suffixes else 0 if "+nodq" in suffixes
                            else prefill_module.default_dequantized_rows(backend))
        with engine_settings(engine):
            return run_once(ours, prompt, args.gen_tokens, ours=True, log_path=log,
                            compile=engine.startswith("mlx-moe+compile"))

    failed = {}

    def run_safely(engine):
        """A failing engine is reported and dropped, not the whole run lost (one GPU run is precious)."""
        if engine in failed:
            return None
        try:
            return run(engine)
        except Exception as e:  # noqa: BLE001 -- reported below, with its type
            import traceback

            traceback.print_exc()
            failed[engine] = f"{type(e).__name__}: {e}"
            return None

    if not args.no_warmup:  # compile kernels and the decode step's trace, fill allocator caches
        for e in engines:
            run_safely(e)
    results = {e: [] for e in engines}
    for rep in range(args.reps):
        # ABBA order: slow drifts of the host (clocks, other tenants) hit every engine alike
        for e in (engines if rep % 2 == 0 else engines[::-1]):
            r = run_safely(e)
            if r is not None:
                results[e].append(r)
                # as it goes: a run cut short by a time limit still leaves its numbers
                print(f"[rep {rep}] {e}: prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.1f} tok/s",
                      flush=True)
    for e in failed:
        results.pop(e, None)
        print(f"[bench_generate] engine {e} FAILED: {failed[e]}", file=sys.stderr)
    summary = {}
    for e, rs in results.items():
        summary[e] = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tps", "decode_tps")}
    # Greedy tokens of every variant of our engine against the plain one (None: identical).
    differ_at = {}
    if "mlx-moe" in results:
        a = results["mlx-moe"][-1]["tokens"]
        for e in results:
            if e.startswith("mlx-moe+") and results[e]:
                b = results[e][-1]["tokens"]
                differ_at[e] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                    None if len(a) == len(b) else min(len(a), len(b)))
    base = summary.get("mlx-lm")
    device = str(mx.default_device())
    print(f"# bench_generate: {args.shape} ({config['num_hidden_layers']} layers), "
          f"{'unquantized' if args.bits == 16 else f'{args.bits}-bit g{args.group_size}'}, {args.dtype}, "
          f"prefill {args.prompt_tokens}, decode {args.gen_tokens}, {args.reps} reps, device {device}, "
          f"kernels {kernels.name}, our experts {args.experts}")
    print("| engine | prefill tok/s | decode tok/s | prefill vs mlx-lm | decode vs mlx-lm |")
    print("|---|---|---|---|---|")
    for e, s in summary.items():
        rp = f"{s['prefill_tps'] / base['prefill_tps']:.2f}x" if base else "-"
        rd = f"{s['decode_tps'] / base['decode_tps']:.2f}x" if base else "-"
        print(f"| {e} | {s['prefill_tps']:.1f} | {s['decode_tps']:.1f} | {rp} | {rd} |")
    paired = {}
    for plain in ("mlx-moe", "mlx-moe+compile"):
        logged = plain + "+log"
        if logged not in summary or plain not in summary:
            continue
        ov = 1 - summary[logged]["decode_tps"] / summary[plain]["decode_tps"]
        best = 1 - max(r["decode_tps"] for r in results[logged]) / max(r["decode_tps"] for r in results[plain])
        print(f"\nexpert-log decode overhead, {logged} vs {plain}: {100 * ov:.2f}% (median tok/s), "
              f"{100 * best:.2f}% (best run of each), same run")
        cpu = [statistics.median(r["decode_cpu_ms"] for r in results[e]) for e in (plain, logged)]
        print(f"  CPU time of the generating thread per decoded token (median): {cpu[0]:.3f} ms without, "
              f"{cpu[1]:.3f} ms with the log ({100 * (cpu[1] / cpu[0] - 1):+.2f}%)")
        paired[plain] = paired_overhead(results[plain], results[logged])
        if paired[plain]:
            q = paired[plain]
            print(f"  paired by repetition (extra time per token): median {q['median']:.2f}%, quartiles "
                  f"{q['q1']:.2f}% .. {q['q3']:.2f}% over {q['n']} pairs; all pairs' decode time {q['pooled']:.2f}%")
    if differ_at:
        print()
    for e, at in differ_at.items():
        print(f"greedy tokens, {e} vs mlx-moe: " + (
            f"identical ({len(results['mlx-moe'][-1]['tokens'])} tokens)" if at is None else f"DIFFER from token {at}"))
    details = None
    for e, why in failed.items():
        print(f"\nengine {e} FAILED: {why}")
    if "mlx-moe+compile" in engines and unsupported_reason(ours):
        print(f"\nmlx-moe+compile decoded UNCOMPILED: {unsupported_reason(ours)}")
    elif any(e.startswith("mlx-moe+compile") for e in engines):
        set_expert_backend(ours, kernels)
        d = decoder_for(ours)
        print(f"\nfused decoder layers in mlx-moe+compile: {'on' if d.fused else 'off (' + d.fused_reason + ')'}")
    if args.breakdown:
        details = breakdown(ours, kernels, prompt, args.gen_tokens, args.breakdown_reps)
        print_breakdown(details, config["num_hidden_layers"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": results, "summary": summary,
                       "tokens_differ_at": differ_at, "breakdown": details,
                       "log_overhead_paired": paired}, f, indent=2)


if __name__ == "__main__":
    main()
