"""The one-token decoder forward on fused kernels: three graph nodes per layer on CUDA (six
on Metal), each launch spread over the whole GPU.

Why: decode on MLX is bound by launches.  Each graph node costs the host 4-9 us
on MLX's backends whatever its GPU work (BENCHMARKS.md), and mlx-lm's decoder
layer is 30-40 nodes (norms, projections, reshapes, transposes, ropes, the
cache update, attention, residual adds, the router's ops, the experts); and a
launch of few threadgroups (one per head, or one) leaves most SMs idle for
11-17 us where the same reads spread over every SM take 2-4.  Here a layer is:

  dense_norm              input RMSNorm, q/k/v projections (+ biases), stacked
                          (metal/decode_layer.metal)
  decode_attention_parts  per-head q/k RMSNorm, RoPE at the cache position, the
                          new key and value (stored in the static cache's slot
                          pos, in place: KV_IN_PLACE), attention over the first
                          pos + 1 slots in SPLITS parts per head
                          (metal/attention.metal)
  dense_residual_parts    the parts combined, o_proj, the residual add; its last
                          threadgroup then the post-attention RMSNorm (its output
                          feeds the experts) and the router projection
                          (ROUTER_IN_RESIDUAL, CUDA; else a dense_norm_xn launch)
  mul_mv_id_swiglu_route  the family's top-k rule (metal/router.metal) and the
                          routed experts' gate/up with the SwiGLU (ROUTE_IN_EXPERTS;
                          off: a moe_router_topk launch, then mul_mv_id_swiglu)
  mul_mv_id_down_combine_res
                          the experts' down, the weighted combine and the residual
                          add after the MoE block (metal/mul_mv_id.metal)
  (mul_mv_id_moe          the last two as one launch, its down threadgroups waiting
                          inside it for its gate/up ones: MOE_ONE_LAUNCH, CUDA)
  (qkv_attention           the first two as one launch, chained the same way:
                          QKV_ATTENTION_ONE_LAUNCH, CUDA; metal/decode_chain.metal)
  (oproj_moe              o_proj with the MoE layer chained so: OPROJ_MOE_ONE_LAUNCH,
                          off: slower on the H100)
  (qkv_attention_oproj    q/k/v, the attention and o_proj with the router tail chained
                          so: ATTENTION_ONE_LAUNCH, CUDA)

with MLX ops where a family needs more (Qwen2-MoE's shared expert) and the
expert backend's own call where the experts are not the kernels' formats
(MLX-affine experts of mlx-community checkpoints).  After the last layer, one
dense_norm launch runs the final norm and the LM head (where the head is a
projection of its own the kernels read).  The routing hook sees the
same records as in the MoE layer's own forward.

It runs inside the compiled decode step (mlx_moe/compiled.py), which owns the
static KV cache with an array write position: `plan(model)` decides once per
model whether every decoder layer can take this path (`unsupported` says why
not), `forward` is the step's forward.  Numerics follow mlx-lm's ops (the
same rounding points in the activation dtype); the float32 reductions run in
another order, so float32 logits agree to ~1e-6 and greedy tokens are checked
against the uncompiled path (tests/test_fused_step.py, the GPU tests).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from .hooks import HOOKS
from .kernels import chain, dense, dispatch, registry
from .kernels.attention import decode_attention_parts
from .kernels.chain import qkv_attention, qkv_attention_oproj
from .kernels.dense import (DenseWeight, dense_norm, dense_residual, dense_unsupported, dense_weight, max_staged,
                            stack_unsupported)
from .kernels.router import fused_topk
from .kernels.router import unsupported as rule_unsupported
from .moe import MoELayer

FUSED_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")

# The new token's key and value: written into the static cache by the attention
# kernel itself, in place (True), or by two put_along_axis scatters after it (False:
# two nodes more per layer).  In place is safe here because the compiled step
# owns the cache and no other node of a step reads it (each layer's attention reads
# its own cache, before writing the one slot no other threadgroup reads).
KV_IN_PLACE = True

# The routing rule: inside the experts' gate/up launch (True, the default: a node less
# per layer, metal/mul_mv_id.metal's ROUTE option) or a moe_router_topk launch of its
# own (False; bench_generate's engine suffix +topk).  On the H100, with the router's
# scale and bias in device memory (registry.device_array): 387.4 tok/s against 376.4
# (medians of 3 in one run; BENCHMARKS.md, 2026-12-05, third session).  Measured while
# those constants still sat in managed memory (all 1536 threadgroups read them), the
# routed launch had cost 28.5 us where the two took 18 (second session).
ROUTE_IN_EXPERTS = True


# The post-attention norm and the router projection: run by the last threadgroup of
# the o_proj launch (True: five nodes per layer with ROUTE_IN_EXPERTS; dense_residual's
# RouterTail) or a dense_norm_xn launch of their own (False;
# bench_generate's engine suffix +notail).  The trade, on the H100 (BENCHMARKS.md,
# 2026-12-05, third session): the GPU spends ~5 us more a layer (the tail launch 18.6
# us against 8.5 + 4.9 for the two), the host ~8 us less (one node): 347.1 against
# 316.6 tok/s and 294.3 against 266.1 on two hosts that bound the step.  On a host
# fast enough that the GPU bounds the step, the two-launch path may be the faster.
# A tuple of kernel flavors turns it on for those: by default CUDA only, because the
# last-threadgroup handoff leans on MSL 3.2's device-scope fence, which no Apple GPU
# here has run (the Metal source is checked under the CPU emulation only).
ROUTER_IN_RESIDUAL = ("cuda",)

# The MoE layer (routing, gate/up, down, combine, residual add) in one launch,
# mul_mv_id_moe, for these kernel flavors (a tuple; bench_generate's engine suffixes
# +moe1 / +moe2 turn it on / off), else two (mul_mv_id_swiglu_route,
# mul_mv_id_down_combine_res).
# Its down threadgroups wait for its gate/up ones inside the launch, which leans on
# threadgroups starting in index order: NVIDIA's do; Apple documents no such order,
# so never on Metal unless measured there.  H100 (BENCHMARKS.md, 2026-12-06, third
# session): 23.3 us of GPU time a layer against 14.8 + 8.8 for the two launches (ncu),
# 0.10-0.12 ms less host time a token, and end to end with the split router tail 374.5
# tok/s against 355.8 for the tail alone (5 of 5 paired repetitions faster).
MOE_ONE_LAUNCH: tuple = ("cuda",)

# The kernel flavors on which dense_norm (q/k/v) and the attention run as one launch
# (qkv_attention, metal/decode_chain.metal: the attention's threadgroups wait inside the
# launch for the projections, as mul_mv_id_moe's down ones for its gate/up ones), with the
# cache written in place (KV_IN_PLACE).  One graph node fewer per layer.  H100, Qwen3-30B-A3B
# (ncu over two compiled steps, BENCHMARKS.md 2026-12-06, fifth session): 13.6-13.9 us a
# layer against 8.0 + 7.0 for the two launches (655-668 against 723 us a step), at
# chain.QKV_NSG simdgroups a threadgroup for both parts.  The attention part then reduces
# in another order than the separate launch at attention.PARTS_NSG: greedy tokens of the
# random-weight benchmark model in bfloat16 part from the two launches' after a few
# tokens (near-ties), identical on the tests' models (GPU tests).  Never on Metal
# unless measured there (it leans on threadgroups starting in index order, as
# MOE_ONE_LAUNCH); bench_generate's engine suffix +noqkvatt turns it off.
QKV_ATTENTION_ONE_LAUNCH: tuple = ("cuda",)

# The kernel flavors on which o_proj with the split router tail and the MoE layer run as
# one launch (oproj_moe, metal/decode_chain.metal: the experts' threadgroups wait inside
# the launch for the router's outputs), where the MoE layer is one launch too
# (MOE_ONE_LAUNCH) and has no shared expert.  Another graph node fewer per layer; its
# threadgroups are the MoE layer's size, so o_proj runs at TAIL_NR x the MoE's NSG.
# Off: on the H100 (ncu, BENCHMARKS.md 2026-12-06, fifth session) it took 81.4 us a layer
# against 14.3 + 22.4 for the two launches.  A launch has one register count, the
# o_proj tail's (128 a thread), which leaves the experts' part 2 threadgroups an SM
# instead of 6 (40 registers alone); the host saved ~0.1 ms a token does not pay for
# 2.1 ms of GPU time.  bench_generate's engine suffix +oprojmoe turns it on.
OPROJ_MOE_ONE_LAUNCH: tuple = ()

# The kernel flavors on which the whole attention block runs as one launch
# (qkv_attention_oproj, metal/decode_chain.metal, at chain.ATTENTION_NSG simdgroups a
# threadgroup): qkv_attention's two parts, then o_proj with the split router tail, its
# threadgroups issuing their weight rows before they wait inside the launch for the
# attention's.  Where QKV_ATTENTION_ONE_LAUNCH and the router tail (ROUTER_IN_RESIDUAL,
# dense.ROUTER_TAIL "split") are on too: a layer is then two graph nodes with
# MOE_ONE_LAUNCH.  The trade, on the H100 (BENCHMARKS.md 2026-12-06, sixth session): 5.1
# us a layer more GPU time (33.0 against 13.6 + 14.3: the chain recovers none of
# o_proj's own latency, and its q/k/v part runs at 16 simdgroups), one node a layer
# less for the host.  Where the host bounds decode (a medium host: 364.2 tok/s against
# 341.5, 3 of 3 paired repetitions faster) it wins; where the GPU does (a fast host, the
# only one that reaches 400) it loses ~0.25 ms a token.  Off by default; bench_generate's
# engine suffix +attn1 turns it on.  Never on Metal unless measured there (index order).
ATTENTION_ONE_LAUNCH: tuple = ()

# The kernel flavors on which the split router tail also runs the MoE layer's routing rule
# (dense_residual_parts_router_split's RRULE option: once per token, in the launch's last
# threadgroup; not in qkv_attention_oproj, ATTENTION_ONE_LAUNCH, whose 16-simdgroup
# threadgroups have no register left for it) and the MoE layer then runs under given
# routing (mul_mv_id_moe_ids), where the rule ran at the start of each of its 1,280
# threadgroups (1.5-1.8 us of each one's time on the H100: BENCHMARKS.md 2026-12-06,
# eleventh session).  Where the tail, MOE_ONE_LAUNCH and the experts' kernels are on.
# Off: on the H100 (2026-12-07, thirteenth session) the MoE launches took 1.5 us a layer
# less and the router tails 1.5-1.7 us more (step 2358.5 against 2351.2 us): the rule's
# chain is on the step's path either way.  bench_generate's engine suffix +tailrule turns it on.
ROUTE_IN_TAIL: tuple = ()

# The final norm and the LM head as one dense_norm launch where the plan has the head
# (True), or MLX's rms_norm and projection (False; bench_generate's engine suffix
# +mlxhead).
HEAD_LAUNCH = True

# The kernel flavors on which the token's embedding is one dense_embed launch where the
# plan has the table, else MLX's gathers and dequantize (four graph nodes for an affine
# table).  H100 (ncu, BENCHMARKS.md 2026-12-06, fourth and fifth sessions): 6.8 us against
# 17.5 for MLX's launches, and the 4-bit benchmark model's 128 greedy tokens identical to
# MLX's path.  Its rows equal MLX's dequantize on each backend exactly: MLX's CUDA
# dequantize rounds scale * q + bias once (ptxas fuses its bfloat16 multiply and add), its
# CPU one twice, and the kernel follows (dense.EMBED_FUSED).  Not on Metal until measured
# there (whether Metal's dequantize contracts is unknown here); bench_generate's engine
# suffixes +embed / +mlxembed turn it on / off.
EMBED_LAUNCH: tuple = ("cuda",)


class LayerPlan(NamedTuple):
    in_norm: nn.RMSNorm
    q: DenseWeight
    k: DenseWeight
    v: DenseWeight
    o: DenseWeight
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float  # attention's softmax scale
    q_norm: Optional[nn.RMSNorm]
    k_norm: Optional[nn.RMSNorm]
    rope: nn.RoPE
    post_norm: nn.RMSNorm
    moe: MoELayer
    gate: DenseWeight  # the router projection
    tail: Optional[dense.RouterTail] = None  # post_norm + gate as the o_proj launch's tail, where it can
    moe_count: Optional[mx.array] = None  # mul_mv_id_moe's counter (registry.ticket_counter), one a layer
    chain_count: Optional[mx.array] = None  # qkv_attention's counter, one a layer
    oproj_count: Optional[mx.array] = None  # oproj_moe's counter, one a layer


class Plan(NamedTuple):
    flavor: str
    layers: List[LayerPlan]
    # The LM head as one dense_norm launch (the final RMSNorm and the vocabulary
    # projection), or None: MLX's ops (tied embeddings, a format the kernels do not read).
    head: Optional[DenseWeight] = None
    # The embedding table for one dense_embed launch, or None: MLX's ops.
    embed: Optional[DenseWeight] = None


def _moe_of(layer) -> Optional[MoELayer]:
    for _, child in layer.children().items():
        if isinstance(child, MoELayer):
            return child
    return None


def _layer_plan(i: int, layer, flavor: str):
    """(LayerPlan, None) or (None, why layer i cannot take the fused path)."""
    attn = getattr(layer, "self_attn", None)
    moe = _moe_of(layer)
    if attn is None or moe is None:
        return None, f"layer {i} is not an attention + MoE layer (a dense MLP layer, or another block)"
    for name in ("input_layernorm", "post_attention_layernorm"):
        if type(getattr(layer, name, None)) is not nn.RMSNorm:
            return None, f"layer {i}: {name} is not an RMSNorm"
    rope = getattr(attn, "rope", None)
    if type(rope) is not nn.RoPE:
        return None, f"layer {i}: rope {type(rope).__name__} (the kernel does nn.RoPE's rotation)"
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    for name, p in zip(("q_proj", "k_proj", "v_proj", "o_proj"), projs):
        problem = dense_unsupported(p)
        if problem is not None:
            return None, f"layer {i}: {name}: {problem}"
    gate = getattr(moe, "gate", None)
    problem = dense_unsupported(gate) if gate is not None else f"{type(moe).__name__} has no `gate` projection"
    if problem is not None:
        return None, f"layer {i}: router: {problem}"
    q, k, v, o = (dense_weight(p) for p in projs)
    gate_w = dense_weight(gate)
    n_heads = getattr(attn, "n_heads", getattr(attn, "num_heads", None))  # mixtral: num_heads
    n_kv_heads = getattr(attn, "n_kv_heads", getattr(attn, "num_key_value_heads", None))
    if not n_heads or not n_kv_heads:
        return None, f"layer {i}: attention without head counts"
    head_dim = q.rows // n_heads
    if rope.dims != head_dim:
        return None, f"layer {i}: rope over {rope.dims} of {head_dim} head dimensions"
    problem = _attention_unsupported(q, k, v, o, head_dim, n_heads, n_kv_heads, flavor)
    if problem is None and gate_w.bias is not None:
        problem = "the router projection has a bias"
    if problem is None:
        problem = (stack_unsupported([gate_w], flavor, dense.ROUTER_NR)
                   or rule_unsupported(gate_w.rows, moe.router_params()))
    if problem is not None:
        return None, f"layer {i}: {problem}"
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if (q_norm is None) != (k_norm is None):
        return None, f"layer {i}: only one of q_norm, k_norm"
    if q_norm is not None:
        if type(q_norm) is not nn.RMSNorm or type(k_norm) is not nn.RMSNorm:
            return None, f"layer {i}: q/k norms are not RMSNorms"
        if q_norm.weight.shape != (head_dim,) or k_norm.weight.shape != (head_dim,) or q_norm.eps != k_norm.eps:
            return None, f"layer {i}: q/k norms are not per-head RMSNorms of one eps (OLMoE's span all heads)"
    post = layer.post_attention_layernorm
    tail = None
    if dense.router_tail_unsupported(gate_w, o.rows, flavor) is None:
        tail = dense.RouterTail(post.weight, post.eps, gate_w, None)  # its counter: plan_or_reason
    return LayerPlan(layer.input_layernorm, q, k, v, o, n_heads, n_kv_heads, head_dim, float(attn.scale),
                     q_norm, k_norm, rope, post, moe, gate_w, tail), None


def _attention_unsupported(q: DenseWeight, k: DenseWeight, v: DenseWeight, o: DenseWeight, head_dim: int,
                           n_heads: int, n_kv_heads: int, flavor: str) -> Optional[str]:
    """Why the attention kernels cannot take these projections and heads, or None."""
    if head_dim % 32:  # decode_attention_parts' lanes hold head_dim / 32 dimensions each
        return f"head dimension {head_dim} is not a multiple of 32"
    if q.rows != n_heads * head_dim or k.rows != n_kv_heads * head_dim or v.rows != k.rows:
        return f"projection rows {q.rows}/{k.rows}/{v.rows} do not match {n_heads}/{n_kv_heads} heads of {head_dim}"
    if n_heads % n_kv_heads:
        return f"{n_heads} query heads are not a multiple of {n_kv_heads} key/value heads"
    if o.bias is not None:
        return "o_proj has a bias"
    if o.cols > max_staged(flavor):
        return f"o_proj input of {o.cols} features > {max_staged(flavor)} (the {flavor} kernels' staging limit)"
    return stack_unsupported([q, k, v], flavor)


def unsupported(model: nn.Module, flavor: Optional[str]) -> Optional[str]:
    """Why `model` cannot decode through the fused layers on kernel flavor `flavor`, or None."""
    return plan_or_reason(model, flavor)[1]


def plan_or_reason(model: nn.Module, flavor: Optional[str]):
    """(Plan, None), or (None, the reason the fused path does not apply)."""
    if flavor not in ("metal", "cuda", "emulated"):
        return None, f"expert backend {flavor!r}: the fused layers run on the metal and cuda kernels"
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    if model_type not in FUSED_FAMILIES:
        return None, f"{model_type}: the fused layers cover {', '.join(FUSED_FAMILIES)}"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        return None, "the model has no embed_tokens / layers / norm"
    if getattr(inner, "pipeline_size", 1) != 1:
        return None, "pipeline parallelism"
    layers = []
    for i, layer in enumerate(inner.layers):
        lp, why = _layer_plan(i, layer, flavor)
        if lp is None:
            return None, why
        layers.append(lp)
    # Every router tail's ticket counter, made in one evaluation, with room for the split
    # tail's shares at the geometry forward() launches it with.
    tails = [lp for lp in layers if lp.tail is not None]
    # (oproj_moe launches o_proj at TAIL_NR x the MoE layer's NSG: room for that too)
    nsg = min(g.nsg for g in dispatch.MOE_LAYER.values())
    # (and qkv_attention_oproj at chain.OPROJ_NR x chain.ATTENTION_NSG)
    words = max((max(dense.tail_counter_words(lp.tail.gate.rows, lp.o.rows),
                     dense.tail_counter_words(lp.tail.gate.rows, lp.o.rows, dense.TAIL_NR, nsg),
                     dense.tail_counter_words(lp.tail.gate.rows, lp.o.rows, chain.OPROJ_NR, chain.ATTENTION_NSG))
                 for lp in tails),
                default=4)
    counters = iter(registry.ticket_counters(len(tails), words))
    layers = [lp._replace(tail=lp.tail._replace(count=next(counters))) if lp.tail is not None else lp
              for lp in layers]
    # and one for each layer's one-launch MoE (MOE_ONE_LAUNCH), q/k/v + attention
    # (QKV_ATTENTION_ONE_LAUNCH) and o_proj + MoE (OPROJ_MOE_ONE_LAUNCH), in another evaluation
    counts = registry.ticket_counters(3 * len(layers))
    layers = [lp._replace(moe_count=counts[3 * i], chain_count=counts[3 * i + 1], oproj_count=counts[3 * i + 2])
              for i, lp in enumerate(layers)]
    return Plan(flavor, layers, _head_plan(model, flavor), _embed_plan(model)), None


def _embed_plan(model: nn.Module) -> Optional[DenseWeight]:
    """The token embedding for dense_embed, or None where MLX's ops keep it (a table
    the kernels do not read)."""
    table = model.model.embed_tokens
    if dense_unsupported(table) is not None or not isinstance(table, (nn.Embedding, nn.QuantizedEmbedding)):
        return None
    return dense_weight(table)


def _head_plan(model: nn.Module, flavor: str) -> Optional[DenseWeight]:
    """The LM head for dense_norm, or None where MLX's ops keep it: tied embeddings (an
    embedding's as_linear), a head or final norm the kernels do not read.  Why a
    launch of its own: MLX's rms_norm and quantized_matmul are two nodes, and its qmv
    read Qwen3's 155 MB head at 0.9 TB/s (176 us a token on the H100)."""
    if getattr(model.args, "tie_word_embeddings", False) or type(model.model.norm) is not nn.RMSNorm:
        return None
    head = getattr(model, "lm_head", None)
    if head is None or dense_unsupported(head) is not None:
        return None
    w = dense_weight(head)
    if w.bias is not None or stack_unsupported([w], flavor, dense.HEAD_NR) is not None:
        return None
    return w


def _tail_routes(lp: LayerPlan, flavor: str) -> bool:
    """Whether the router tail runs this layer's routing rule (ROUTE_IN_TAIL): the MoE layer
    is then one launch of the experts' kernels under given routing."""
    moe = lp.moe
    return (flavor in ROUTE_IN_TAIL and flavor in MOE_ONE_LAUNCH and dense.ROUTER_TAIL == "split"
            and lp.tail is not None and lp.moe_count is not None and getattr(moe.backend, "flavor", None) == flavor
            and rule_unsupported(lp.tail.gate.rows, moe.router_params()) is None)


def _experts_and_residual(lp: LayerPlan, h: mx.array, xn: mx.array, logits: mx.array, flavor: str,
                          routing=None):
    """(h + MoE(xn) (+ the shared expert), ids, weights) for one token [1, D] from its
    router outputs.  On the kernels: two launches, the routing rule inside the gate/up
    one (ROUTE_IN_EXPERTS), one (MOE_ONE_LAUNCH, with ROUTE_IN_EXPERTS), or three with
    moe_router_topk first; experts in another format: moe_router_topk, the backend's
    own call, then the residual add.  routing: (ids, weights) made by the router tail
    (ROUTE_IN_TAIL): one launch under them."""
    moe = lp.moe
    params = moe.router_params()
    shared = moe.shared_output(xn)
    res = h if shared is None else h + shared
    backend = moe.backend
    kernels = getattr(backend, "flavor", None) == flavor
    if routing is not None:
        out = backend.decode_residual(xn, *routing, moe.switch_mlp, moe.n_identity, res, lp.moe_count)
        if out is not None:
            return (out, *routing)
    if kernels and ROUTE_IN_EXPERTS:
        count = lp.moe_count if flavor in MOE_ONE_LAUNCH else None
        routed = backend.decode_residual_routed(xn, logits, params, moe.switch_mlp, moe.n_identity, res, count)
        if routed is not None:
            return routed
    ids, weights = fused_topk(logits, params, flavor)
    out = backend.decode_residual(xn, ids, weights, moe.switch_mlp, moe.n_identity, res) if kernels else None
    if out is None:
        out = res + backend(xn, ids, weights, moe.switch_mlp, n_identity=moe.n_identity)
    return out, ids, weights


def _oproj_and_experts(lp: LayerPlan, h: mx.array, parts_ml, flavor: str):
    """(out, ids, weights) of o_proj with the router tail and the MoE layer in one launch
    (OPROJ_MOE_ONE_LAUNCH), or None where they keep their own launches."""
    moe = lp.moe
    backend = moe.backend
    if (flavor not in OPROJ_MOE_ONE_LAUNCH or flavor not in MOE_ONE_LAUNCH or not ROUTE_IN_EXPERTS
            or dense.ROUTER_TAIL != "split" or moe.has_shared_expert or lp.oproj_count is None
            or getattr(backend, "flavor", None) != flavor):
        return None
    return backend.oproj_routed(parts_ml, lp.o, h, lp.tail, moe.router_params(), moe.switch_mlp, moe.n_identity,
                                lp.moe_count, lp.oproj_count)


def cache_index(pos: mx.array, n_kv_heads: int, head_dim: int) -> mx.array:
    """The KV cache's write index for `put_along_axis`: pos broadcast to one token's
    [1, HK, 1, D] keys, made once per step and shared by the layers.

    Why not mx.slice_update: with an array start, MLX's CUDA backend launches its
    dynamic-offset copy over the whole cache (one thread per cached element, for
    one token's worth of work): 22 us per update on an H200, 2.2 ms per token for
    48 layers (this session's ncu of the step).  ScatterAxis launches one thread
    per written element, into the donated cache buffer as slice_update does."""
    return mx.broadcast_to(pos.reshape(1, 1, 1, 1), (1, n_kv_heads, 1, head_dim))


def layer_step(lp: LayerPlan, h: mx.array, cache, pos: mx.array, flavor: str,
               index: Optional[mx.array] = None) -> mx.array:
    """One decoder layer for one token h [1, D] (the residual stream stays [1, D]
    through the layers: no reshape nodes); `cache` has keys/values [1, HK, C, D]
    and is updated at int32 position pos [1] (`index`: cache_index(pos, ...), shared
    by the layers of a step)."""
    qn, kn = lp.q_norm, lp.k_norm
    heads = (lp.n_heads, lp.n_kv_heads, qn.weight if qn is not None else None, kn.weight if kn is not None else None,
             qn.eps if qn is not None else 0.0, lp.rope.base, lp.rope.scale, lp.rope.traditional)
    tail_on = (ROUTER_IN_RESIDUAL is True or (bool(ROUTER_IN_RESIDUAL) and flavor in ROUTER_IN_RESIDUAL)) \
        and lp.tail is not None
    qkv_chain = KV_IN_PLACE and flavor in QKV_ATTENTION_ONE_LAUNCH and lp.chain_count is not None
    routed = None  # (out, ids, weights) where o_proj's launch also ran the MoE layer
    routing = None  # (ids, weights) where the router tail ran the rule (dense_residual's own launch)
    if qkv_chain and tail_on and flavor in ATTENTION_ONE_LAUNCH and dense.ROUTER_TAIL == "split":
        h, xn, logits = qkv_attention_oproj(h, lp.in_norm.weight, lp.in_norm.eps, [lp.q, lp.k, lp.v], *heads,
                                            cache.keys, cache.values, pos, lp.scale, lp.o, lp.tail, flavor,
                                            lp.chain_count)
    else:
        if qkv_chain:
            parts_ml = qkv_attention(h, lp.in_norm.weight, lp.in_norm.eps, [lp.q, lp.k, lp.v], *heads, cache.keys,
                                     cache.values, pos, lp.scale, flavor, lp.chain_count)
        else:
            parts_ml = _attention_parts(lp, h, cache, pos, heads, flavor, index)
        routed = _oproj_and_experts(lp, h, parts_ml, flavor) if tail_on else None
        if routed is None and tail_on:
            tail = lp.tail._replace(rule=lp.moe.router_params()) if _tail_routes(lp, flavor) else lp.tail
            h, xn, logits, *routing = dense_residual(parts_ml, lp.o, h, flavor, nr=dense.TAIL_NR,
                                                     nsg=dense.TAIL_NSG, router=tail)
        elif routed is None:
            h = dense_residual(parts_ml, lp.o, h, flavor)
            logits, xn = dense_norm(h, lp.post_norm.weight, lp.post_norm.eps, [lp.gate], flavor, xn=True,
                                    nr=dense.ROUTER_NR)
    out, ids, weights = routed if routed is not None else _experts_and_residual(lp, h, xn, logits, flavor,
                                                                                 routing or None)
    if HOOKS.active:
        moe = lp.moe
        HOOKS.record(moe.layer_idx, ids, weights, moe.num_experts, moe.n_identity, moe.top_k)
    return out


def _attention_parts(lp: LayerPlan, h: mx.array, cache, pos: mx.array, heads, flavor: str,
                     index: Optional[mx.array]):
    """(parts, ml) of the attention in two launches (dense_norm, decode_attention_parts),
    the new key and value stored in the cache in place (KV_IN_PLACE) or by two scatters."""
    y = dense_norm(h, lp.in_norm.weight, lp.in_norm.eps, [lp.q, lp.k, lp.v], flavor)
    out = decode_attention_parts(y, *heads, cache.keys, cache.values, pos, lp.scale, flavor,
                                 write_cache=KV_IN_PLACE)
    if not KV_IN_PLACE:
        k, v = out[2:]
        if index is None:
            index = cache_index(pos, lp.n_kv_heads, lp.head_dim)
        # After the attention, which read the new token's key and value from its own
        # registers: the scatters then write into the cache buffers in place (MLX
        # donates them once the attention, their other reader, has run).
        cache.keys = mx.put_along_axis(cache.keys, index, k, axis=2)
        cache.values = mx.put_along_axis(cache.values, index, v, axis=2)
    return out[0], out[1]


def forward(model: nn.Module, plan: Plan, token: mx.array, caches, pos: mx.array) -> mx.array:
    """Logits [1, 1, vocab] of one token [1, 1] at position pos (int32 [1]); caches: one
    object per layer with keys / values [1, HK, C, D] (updated in place of the attributes)."""
    inner = model.model
    if plan.flavor in EMBED_LAUNCH and plan.embed is not None:
        h = dense.dense_embed(token, plan.embed, plan.flavor)
    else:
        h = inner.embed_tokens(token).reshape(1, -1)
    index = {}
    for lp, c in zip(plan.layers, caches):
        key = (lp.n_kv_heads, lp.head_dim)
        if key not in index and not KV_IN_PLACE:
            index[key] = cache_index(pos, *key)
        h = layer_step(lp, h, c, pos, plan.flavor, index.get(key))
    if HEAD_LAUNCH and plan.head is not None:
        logits = dense_norm(h, inner.norm.weight, inner.norm.eps, [plan.head], plan.flavor, nr=dense.HEAD_NR,
                            nsg=dense.HEAD_NSG)
        return logits.reshape(1, 1, -1)
    h = inner.norm(h)
    if getattr(model.args, "tie_word_embeddings", False):
        logits = inner.embed_tokens.as_linear(h)
    else:
        logits = model.lm_head(h)
    return logits.reshape(1, 1, -1)
