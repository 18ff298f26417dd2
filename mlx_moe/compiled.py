"""A compiled decode step: one `mx.compile` trace serves every decode step.

Why: decode is host-bound (Python graph building plus MLX's per-op host cost,
~35 ops per decoder layer).  Compiling the one-token forward replaces the
Python side of every step by a replay of a recorded tape and fuses the
elementwise ops (norms' tails, residual adds, SwiGLU, router glue).

The obstacle is mlx-lm's `KVCache`: it writes at Python-int offsets and
returns slices whose length grows every step, and a compiled function
freezes both into its trace.  Here the cache has a fixed capacity and the
write position is an array:

- `StaticKVCache` holds keys/values of shape [B, H, capacity, D].  Prefill
  runs uncompiled through it (int offset, mlx-lm's usual slices and causal
  mask), so mlx-lm's attention code is used unchanged.
- Inside the compiled step each layer sees a `_TracedCache`: `offset` is an
  int32 array (mx.fast.rope takes array offsets), the new key/value go in
  with `mx.slice_update` at that array index, and attention runs over the
  whole capacity with a mask hiding positions > offset.  Shapes never
  change, so the trace is reused until the cache has to grow.
- The cache arrays are inputs and outputs of the compiled function (not
  captured state), and the position is an input: nothing in the trace
  depends on the step number.

Routing hooks work under compile: while tracing, `HOOKS.capturing()` collects
the MoE layers' records (tracer arrays); the captured (ids, weights) become
extra outputs of the compiled function, and after each call they are handed
to `HOOKS` (begin_forward, record per layer) as lazy arrays, the
calls our model wrapper makes around an uncompiled forward.  Where the
records travel in a record chain (mlx_moe/hooks.py), the chain is one more
input and output of the step instead.  A trace with and
one without these outputs exist side by side (a hook may be added between two
generate calls).

Supported: the standard-attention families (qwen3_moe, qwen2_moe, mixtral,
olmoe) and deepseek_v2 (whose MLA caches keys and values per head) with a rope
that accepts array offsets.  `unsupported_reason(model)` says why anything else
(longcat_flash's MLA attention, expert parallelism) decodes uncompiled.

On the metal and cuda expert backends the traced forward is the fused one of
mlx_moe/fused_step.py (four graph nodes per layer on CUDA) where the model
allows it (`CompiledDecoder.fused_reason` says why not; FUSED_LAYERS turns it
off), else mlx-lm's forward over the static cache.

The trace captures the model's weights and expert backends as constants: a
decoder notices replaced parameters or backends (`fingerprint`) and
re-traces on the next generate call.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import moe as _moe
from .hooks import HOOKS
from .kernels.attention import decode_attention
from .kernels.attention import unsupported as attention_unsupported
from .kernels import registry as _registry
from .kernels.registry import device_array

# DeepSeek-V2's MLA attention in mlx-lm 0.32 caches full per-head keys (nope + rope
# dims) and values, as standard attention does, so the static cache serves it as is.
# LongCat-Flash's does not: two attentions per layer, each caching the latent.
COMPILED_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2")

# Attention of the compiled step through the decode attention kernel
# (metal/attention.metal) instead of mx.fast.scaled_dot_product_attention with a
# mask over the static cache, which MLX's fused CUDA kernels do not take (the
# unfused fallback is ~10 graph nodes per layer, BENCHMARKS.md).  False: off (the
# default until the H100 measures it: bench_generate's mlx-moe+compile+attn);
# True: on for models whose expert backend is the metal or cuda kernels; a flavor
# name forces that flavor (tests).
ATTENTION_KERNEL = False

# The step's forward through the fused decoder layers (mlx_moe/fused_step.py: four
# to six graph nodes per layer instead of 30-40) where the model's family, weights and
# expert backend allow it (`fused_step.unsupported` says why not); False: mlx-lm's
# forward over the static cache, as before.
FUSED_LAYERS = True

# The step's write position: an int32 scalar made from the host every step (False),
# or a 16-byte device array the step advances itself (True).  On MLX's CUDA backend a
# host-made scalar lands in managed memory, in pages shared with other small arrays,
# and a kernel's first read of it waits for the page to migrate
# (kernels.registry.device_array).  On the H100: 394.2 tok/s against 376.4 with the
# host-made scalar (medians of 3 in one run; BENCHMARKS.md, 2026-12-05, third session);
# bench_generate's engine suffix +hostpos turns it off.
DEVICE_POSITION = True

# Greedy decoding (the default sampler, or temp 0) takes its token from the step
# itself: one greedy_sample launch (metal/sample.metal: the log-sum-exp and the argmax
# of the rounded log-probabilities, as mlx-lm's greedy generate_step computes them)
# in place of MLX's logsumexp, subtraction and argmax (three one-row launches, 51 us
# of an H100 decode step), the log-probabilities left lazy for whoever reads them.
# On the metal and cuda kernel flavors; elsewhere the same values from MLX's ops.
# False: the sampler runs on the step's log-probabilities, as for any other sampler.
GREEDY_KERNEL = True

CAPACITY_STEP = 256  # capacities are rounded up to this: fewer distinct traces


def greedy(logprobs: mx.array) -> mx.array:
    """The greedy sampler (mlx-lm's at temperature 0).  Passed as `sampler` (or no sampler
    at all), it lets the compiled step pick the token itself (GREEDY_KERNEL)."""
    return mx.argmax(logprobs, axis=-1)


class CapacityError(ValueError):
    """A compiled decode step would write past the static cache's capacity."""


def round_capacity(n: int, step: int = CAPACITY_STEP) -> int:
    return max(step, -(-n // step) * step)


# -- caches -------------------------------------------------------------------------------


class StaticKVCache:
    """A KV cache of fixed capacity, usable by mlx-lm's attention code as is.

    Eager (uncompiled) calls, e.g. prefill, see mlx-lm's KVCache interface with
    an int `offset`; `CompiledDecoder.step` passes the arrays through the
    compiled function and advances `offset` on the host.
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"StaticKVCache capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def check_room(self, n: int) -> None:
        if self.offset + n > self.capacity:
            raise CapacityError(
                f"static KV cache full: {self.offset} tokens + {n} new > capacity {self.capacity}; "
                "make the cache larger (capacity=...), or grow it with StaticKVCache.grow"
            )

    def _allocate(self, keys: mx.array, values: mx.array) -> None:
        B, H, _, Dk = keys.shape
        self.keys = mx.zeros((B, H, self.capacity, Dk), keys.dtype)
        self.values = mx.zeros((B, values.shape[1], self.capacity, values.shape[3]), values.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        n = keys.shape[2]
        self.check_room(n)
        if self.keys is None:
            self._allocate(keys, values)
        prev = self.offset
        self.offset += n
        self.keys[..., prev:self.offset, :] = keys
        self.values[..., prev:self.offset, :] = values
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    def make_mask(self, n: int, return_array: bool = False, window_size: Optional[int] = None):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(n, offset=self.offset, return_array=return_array, window_size=window_size)

    def grow(self, capacity: int) -> None:
        """Enlarge to `capacity` (the compiled step re-traces once for the new shape)."""
        if capacity < self.capacity:
            raise ValueError(f"cannot shrink a StaticKVCache from {self.capacity} to {capacity}")
        if self.keys is not None and capacity > self.capacity:
            pad = capacity - self.capacity

            def padded(a):
                return mx.concatenate([a, mx.zeros((*a.shape[:2], pad, a.shape[3]), a.dtype)], axis=2)

            self.keys, self.values = padded(self.keys), padded(self.values)
        self.capacity = capacity

    @property
    def state(self):
        return [a for a in (self.keys, self.values) if a is not None]

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last n tokens (their slots are overwritten later, masked till then)."""
        n = min(self.offset, n)
        self.offset -= n
        return n


class _TracedCache:
    """One layer's cache inside the compiled step: the write position is an array."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys = keys
        self.values = values
        self.offset = offset  # int32 [], read by the attention's rope

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        start = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size: Optional[int] = None):
        if window_size is not None:
            raise NotImplementedError("sliding-window attention is not supported by the compiled step")
        # Query i (at position offset + i) sees keys 0..offset+i; for n == 1 that is
        # every slot below offset + 1.  Empty slots hold zeros and must stay hidden.
        capacity = self.keys.shape[2]
        k_pos = mx.arange(capacity)[None]
        q_pos = self.offset + mx.arange(n)[:, None]
        return k_pos <= q_pos  # [n, capacity], broadcast over batch and heads


# -- the decoder --------------------------------------------------------------------------


def _mlx_lm_model_class(model: nn.Module):
    """mlx-lm's Model class our model class derives from (its forward, without our
    wrapper's hook bookkeeping, which needs the cache offset as a Python int)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("mlx_lm.models.") and cls.__name__ == "Model":
            return cls
    return None


_ARRAY_OFFSET_ROPES = None


def _array_offset_ropes() -> tuple:
    """Rope modules whose forward hands `offset` straight to mx.fast.rope (arrays work)."""
    global _ARRAY_OFFSET_ROPES
    if _ARRAY_OFFSET_ROPES is None:
        ru = importlib.import_module("mlx_lm.models.rope_utils")
        ds = importlib.import_module("mlx_lm.models.deepseek_v2")
        _ARRAY_OFFSET_ROPES = (nn.RoPE,) + tuple(
            getattr(ru, n) for n in ("SuScaledRoPE", "Llama3RoPE", "YarnRoPE") if hasattr(ru, n)) + tuple(
            getattr(ds, n) for n in ("DeepseekV2YarnRotaryEmbedding",) if hasattr(ds, n))
    return _ARRAY_OFFSET_ROPES


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why `model` cannot use the compiled decode step, or None if it can."""
    model_type = getattr(getattr(model, "args", None), "model_type", None) or getattr(model, "model_type", None)
    if model_type not in COMPILED_FAMILIES:
        return (f"the compiled decode step covers {', '.join(COMPILED_FAMILIES)}, not {model_type} "
                "(longcat_flash: two MLA attentions a layer caching the latent, not written for a static "
                "cache yet)")
    if getattr(model, "expert_parallel", None) is not None:
        return "expert parallelism (mx.distributed) is not compiled"
    if _mlx_lm_model_class(model) is None:
        return f"{type(model).__name__} does not derive from an mlx-lm Model class"
    ropes = _array_offset_ropes()
    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "self_attn", None)
        rope = getattr(attn, "rope", None)
        if rope is None or not isinstance(rope, ropes):
            return f"layer {i}: attention rope {type(rope).__name__} is not known to accept an array offset"
    return None


def fingerprint(model: nn.Module) -> tuple:
    """Identity of what a trace captures as constants: parameter arrays and expert backends."""
    params = tuple(id(a) for _, a in tree_flatten(model.parameters()))
    backends = tuple(id(layer.backend) for layer in _moe.moe_layers(model))
    return params, backends


class CompiledDecoder:
    """The model's one-token forward, compiled once per (capacity, hooks on/off).

        decoder = CompiledDecoder(model)
        cache = decoder.make_cache(capacity)
        model(prompt[None, :-1], cache=cache)          # prefill, uncompiled
        logprobs = decoder.step(prompt[-1:], cache)   # lazy [1, vocab]
    """

    def __init__(self, model: nn.Module):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot compile the decode step: {reason}")
        self.model = model
        self.base_call = _mlx_lm_model_class(model).__call__
        self.fingerprint = fingerprint(model)
        self.traces = 0  # times the step function body ran (tracing), for tests and reports
        self._compiled = {}
        self._routing_meta = None  # [(layer, n_experts, n_zero)] in record order, set while tracing
        self._routing_shape = None  # one layer's [T, k] records, set while tracing
        self._position, self._position_at = None, -1  # DEVICE_POSITION: the next step's, and its value
        layers = _moe.moe_layers(model)
        flavors = {getattr(layer.backend, "flavor", getattr(layer.backend, "name", None)) for layer in layers}
        flavor = flavors.pop() if len(flavors) == 1 else None  # the experts' kernels, if one for all
        self.fused, self.fused_reason = None, "compiled.FUSED_LAYERS is off"
        self.fused_setting = FUSED_LAYERS  # decoder_for rebuilds the decoder when it changes
        if FUSED_LAYERS:
            from . import fused_step

            self.fused, self.fused_reason = fused_step.plan_or_reason(model, flavor)
        self._moe_count = len(layers)
        self._top_k = layers[0].top_k if layers else 0  # the record chain's size depends on it
        # greedy_sample's kernel flavor; its counter is made on first use
        self.sample_flavor = flavor if flavor in ("metal", "cuda") else "mlx"
        self._sample_count = None
        mx.eval(model.parameters())  # the trace must capture evaluated weights, not their graphs

    def make_cache(self, capacity: int) -> List[StaticKVCache]:
        return [StaticKVCache(capacity) for _ in self.model.layers]

    def _function(self, record: bool, chained: bool, greedy: bool = False):
        attention = "fused" if self.fused is not None else attention_flavor(self.model)
        args = (record, attention, HOOKS.join_flavor_now() if record else None, chained, greedy)
        # The trace follows the settings (a setting, a trace); the kernel objects it
        # captured depend on how their source reaches MLX.
        key = args + (DEVICE_POSITION, _registry.CUDA_SOURCE_FILES)
        if attention == "fused":
            from . import fused_step
            from .kernels import attention as attention_kernels
            from .kernels import chain, dense, dispatch, registry

            key = key + (fused_step.KV_IN_PLACE, fused_step.ROUTE_IN_EXPERTS, fused_step.HEAD_LAUNCH,
                         fused_step.EMBED_LAUNCH, fused_step.ROUTER_IN_RESIDUAL, fused_step.MOE_ONE_LAUNCH,
                         fused_step.QKV_ATTENTION_ONE_LAUNCH, fused_step.OPROJ_MOE_ONE_LAUNCH,
                         fused_step.ATTENTION_ONE_LAUNCH, chain.OPROJ_NR, chain.ATTENTION_NSG,
                         dense.ROUTER_TAIL, tuple(sorted(dispatch.MOE_LAYER.items())),
                         attention_kernels.SPLITS, attention_kernels.PARTS_NSG, attention_kernels.PARTS_U,
                         chain.QKV_NSG, dispatch.SHARE_ROUTE, fused_step.ROUTE_IN_TAIL, registry.CUDA_FENCE,
                         registry.CUDA_HANDOFF)
        fn = self._compiled.get(key)
        if fn is None:
            fn = mx.compile(self._traced_step(*args, DEVICE_POSITION))
            self._compiled[key] = fn
        return fn

    def _traced_step(self, record: bool, attention: Optional[str], join: Optional[str], chained: bool,
                     greedy: bool, device_position: bool = False):
        model, base_call = self.model, self.base_call
        one = device_array([1], mx.int32) if device_position else None  # [1, 0, 0, 0]

        def step(token, position, keys, values, *chain):
            self.traces += 1
            # position: int32 [] (host-made), or int32 [4] on the device (DEVICE_POSITION)
            offset = position[0] if device_position else position
            pos1 = position[:1] if device_position else position.reshape(1)
            cache = [_TracedCache(k, v, offset) for k, v in zip(keys, values)]
            with HOOKS.capturing(record) as cap:
                if attention == "fused":
                    from .fused_step import forward

                    logits = forward(model, self.fused, token, cache, pos1)
                else:
                    with _static_cache_attention(model, attention):
                        logits = base_call(model, token, cache=cache)
            logits = logits[:, -1, :]
            if greedy:  # [token int32 [1], logits [1, V], lse [1, 1]]: step_greedy's
                from .kernels.sample import greedy_sample

                token_out, lse = greedy_sample(logits, self.sample_flavor, self._sample_count)
                head = [token_out, logits, lse.reshape(1, 1)]
            else:
                head = [logits - mx.logsumexp(logits, axis=-1, keepdims=True)]
            out = [head, [c.keys for c in cache], [c.values for c in cache]]
            if device_position:  # the next step's position, advanced on the device
                out.append(position + one)
            records = cap.records
            if record:
                self._routing_meta = [(r[0], r[3], r[4]) for r in records]
                self._routing_shape = tuple(records[0][1].shape)  # one layer's [T, k]
                ids, weights = [r[1] for r in records], [r[2] for r in records]
                if join:
                    # one packed array instead of 2L outputs (mlx_moe/hooks.py), or the record
                    # chain (a step input) extended by this step's records
                    from .kernels.routing_join import routing_join

                    packed = routing_join(ids, weights, join, record=chain[0] if chained else None)
                    # Evaluated with the step: nothing else the step computes reads the packed
                    # array, so without this the join would run only when the host reads it,
                    # behind the next queued step (a wait per token).  Per-layer arrays need no
                    # such edge: the expert kernels read them.
                    head[0] = mx.depends(head[0], [packed])
                    out.append(packed)
                else:
                    out += [ids, weights]
            return out

        return step

    def step(self, token: mx.array, cache: List[StaticKVCache]) -> mx.array:
        """Run one token (ids of shape [1] or [1, 1]) at the cache's position; returns
        lazy log-probabilities [1, vocab] and advances the cache by one."""
        return self._run(token, cache, False)[0]

    def step_greedy(self, token: mx.array, cache: List[StaticKVCache]) -> Tuple[mx.array, mx.array]:
        """As `step`, and the greedy pick too: (next token int32 [1], log-probabilities
        [1, vocab]), both lazy; the log-probabilities are computed only if read (on the
        metal and cuda flavors the token comes from greedy_sample, GREEDY_KERNEL)."""
        if self._sample_count is None and self.sample_flavor != "mlx":  # made outside the trace
            from .kernels.sample import new_counter

            self._sample_count = new_counter()
        token_out, logits, lse = self._run(token, cache, True)
        return token_out, logits - lse

    def _run(self, token: mx.array, cache: List[StaticKVCache], greedy: bool) -> list:
        first = cache[0]
        if first.keys is None:
            raise ValueError("the compiled decode step needs a prefilled cache (run the prompt through it first)")
        first.check_room(1)
        offset = first.offset
        record = HOOKS.active
        token = token.reshape(1, 1)
        if token.dtype != mx.int32:  # argmax gives uint32, prompts int32: one dtype, one trace
            token = token.astype(mx.int32)
        keys = [c.keys for c in cache]
        values = [c.values for c in cache]
        for c in cache:  # drop our references: the step's slice_update may then reuse the buffers
            c.keys = c.values = None
        chain = None
        if record:  # what our model wrapper does around an uncompiled forward (mlx_moe/loader.py)
            HOOKS.begin_forward(1, 1, offset, self._moe_count)
            chain = HOOKS.forward_chain(1, self._top_k)  # None unless records travel in a chain
        fn = self._function(record, chain is not None, greedy)
        if DEVICE_POSITION:
            if self._position is None or self._position_at != offset:  # a new sequence: one sync
                self._position = device_array([offset], mx.int32)
            position = self._position
        else:
            position = mx.array(offset, mx.int32)
        try:
            out = fn(token, position, keys, values, *([chain] if chain is not None else []))
        except Exception:
            for c, k, v in zip(cache, keys, values):
                c.keys, c.values = k, v
            raise
        del keys, values
        if DEVICE_POSITION:
            self._position, self._position_at = out[3], offset + 1
            out = out[:3] + out[4:]
        head, new_keys, new_values = out[:3]
        for c, k, v in zip(cache, new_keys, new_values):
            c.keys, c.values = k, v
            c.offset += 1
        if record:
            if chain is not None:
                HOOKS.record_chained(self._routing_meta, out[3], self._routing_shape)
            elif len(out) == 4:  # joined on the device
                HOOKS.record_joined(self._routing_meta, out[3], self._routing_shape)
            else:
                for (layer, n_experts, n_zero), ids, weights in zip(self._routing_meta, out[3], out[4]):
                    HOOKS.record(layer, ids, weights, n_experts, n_zero)
        return head


def attention_flavor(model: nn.Module) -> Optional[str]:
    """The kernel flavor the compiled step's attention runs on (ATTENTION_KERNEL), or None."""
    if not ATTENTION_KERNEL:
        return None
    if isinstance(ATTENTION_KERNEL, str):
        return ATTENTION_KERNEL
    flavors = {getattr(layer.backend, "flavor", None) for layer in _moe.moe_layers(model)}
    return flavors.pop() if len(flavors) == 1 and flavors <= {"metal", "cuda"} else None


@contextmanager
def _static_cache_attention(model: nn.Module, flavor: Optional[str]):
    """While a step is traced: the family module's scaled_dot_product_attention (mlx-lm's
    attention calls it through its module globals) sends attention over our traced
    static cache to the decode attention kernel; anything else to mlx-lm's function."""
    module = sys.modules[_mlx_lm_model_class(model).__module__] if flavor else None
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None:
        yield
        return

    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if (isinstance(cache, _TracedCache) and sinks is None
                and attention_unsupported(queries.shape, keys.shape, values.shape) is None):
            return decode_attention(queries, keys, values, cache.offset, scale, flavor)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    module.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        module.scaled_dot_product_attention = original


def decoder_for(model: nn.Module) -> CompiledDecoder:
    """The model's CompiledDecoder, kept on the model and rebuilt when its weights or
    expert backends were replaced (the old trace holds the old ones)."""
    decoder = getattr(model, "_mlx_moe_compiled_decoder", None)
    if decoder is None or decoder.fingerprint != fingerprint(model) or decoder.fused_setting != FUSED_LAYERS:
        decoder = CompiledDecoder(model)
        object.__setattr__(model, "_mlx_moe_compiled_decoder", decoder)
    return decoder


def compiled_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler=None,
    prompt_cache: Optional[List[StaticKVCache]] = None,
    prefill_step_size: int = 2048,
    capacity: Optional[int] = None,
    capacity_step: int = CAPACITY_STEP,
    prompt_progress_callback=None,
) -> Iterator[Tuple[int, mx.array]]:
    """mlx-lm's `generate_step` contract (yields (token, logprobs)) with the decode
    steps compiled.  The prompt but its last token is prefilled uncompiled, in
    chunks; the last prompt token and every generated token go through the
    compiled step, as mlx-lm runs them one by one.

    capacity: KV slots (default: prompt + max_tokens rounded up to CAPACITY_STEP;
    with max_tokens < 0 the cache grows by capacity_step when full, one re-trace each).
    prompt_cache: a list of StaticKVCache to continue (multi-turn); None: a new one.
    """
    from mlx_lm.generate import generation_stream

    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    decoder = decoder_for(model)
    take_greedy = GREEDY_KERNEL and (sampler is None or sampler is greedy)
    sampler = sampler or greedy
    progress = prompt_progress_callback or (lambda *_: None)
    total = prompt.size
    if prompt_cache is None:
        want = total + (max_tokens if max_tokens >= 0 else 0)
        prompt_cache = decoder.make_cache(capacity or round_capacity(want, capacity_step))
    elif not all(isinstance(c, StaticKVCache) for c in prompt_cache):
        raise ValueError("compiled decoding needs a prompt_cache of StaticKVCache (mlx_moe.compiled); "
                         "make one with CompiledDecoder.make_cache or pass prompt_cache=None")
    grow = max_tokens < 0

    def step(y: mx.array):
        c0 = prompt_cache[0]
        if grow and c0.offset + 1 > c0.capacity:
            bigger = c0.capacity + capacity_step
            for c in prompt_cache:
                c.grow(bigger)
        if take_greedy:
            token, logprobs = decoder.step_greedy(y, prompt_cache)
            return token, logprobs.squeeze(0)
        logprobs = decoder.step(y, prompt_cache)
        return sampler(logprobs), logprobs.squeeze(0)

    def schedule(y: mx.array, logprobs: mx.array) -> None:
        # greedy: the log-probabilities stay lazy (computed only if the caller reads them)
        if take_greedy:
            mx.async_eval(y)
        else:
            mx.async_eval(y, logprobs)

    with mx.stream(generation_stream):
        done = 0
        progress(0, total)
        if not grow:  # fail before any work: the prompt and every step need a slot
            prompt_cache[0].check_room(total + max_tokens)
        while total - done > 1:
            n = min(prefill_step_size, total - done - 1)
            model(prompt[done:done + n][None], cache=prompt_cache)
            mx.eval([c.state for c in prompt_cache])
            done += n
            progress(done, total)
            mx.clear_cache()
        y, logprobs = step(prompt[done:])
        schedule(y, logprobs)
        n = 0
        while True:
            if n != max_tokens:
                next_y, next_logprobs = step(y)
                schedule(next_y, next_logprobs)
            if n == 0:
                mx.eval(y)
                progress(total, total)
            if n == max_tokens:
                break
            yield y.item(), logprobs
            if n % 256 == 0:
                mx.clear_cache()
            y, logprobs = next_y, next_logprobs
            n += 1
