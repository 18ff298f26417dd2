"""The routing hook: every MoE layer's expert choice, observable at almost no cost.

Register a callback; it is called once per (MoE layer, forward pass) with a
`RoutingEvent`:

    import mlx_moe
    def show(ev):
        print(ev.layer, ev.positions, ev.expert_ids, ev.weights, ev.phase)
    with mlx_moe.routing_hook(show):
        mlx_moe.generate(model, tokenizer, "Hello")

How it stays cheap: MoE layers only *record* their lazy (ids, weights)
arrays, which the step computes anyway (the expert kernels read them):
the hook adds no graph node, no launch and no evaluation to a forward pass.
Events are delivered after the step's own evaluation: `generate` calls
`poll()` after each token it reads (mlx-lm has then already queued the next
step, so every forward pass but the newest is done and its pipelining is
untouched), and `flush()` delivers at once (after a direct `model(...)`
call).  Host-side work (copies to numpy, ordering by weight) happens lazily
when an event's fields are read; the expert log takes the raw buffers
(`ForwardEvents.arrays.buffers()`) and leaves the rest to its writer process.

On MLX's CUDA backend the host reading a device array moves it to newly
allocated unified memory (cudaMallocManaged + a synchronous copy, per array:
MLX's Buffer::raw_ptr): 96 arrays per token at 48 layers, and even one array
per token cost the generating thread 0.2-0.3 ms on the H100 (BENCHMARKS.md).
So there, by default (`join_flavor = "auto"`), the model wrapper ends each
forward pass with `end_forward`: one kernel appends all layers' records to a
*record chain*, a small uint32 array spanning `forwards_per_read` decode
forwards (8; metal/routing_join.metal, routing_join_record), the model's
output is made to depend on it (`mx.depends`, likewise in the compiled step,
which takes and returns the chain), and the host reads one array per 8 tokens.
(Extending the chain in each layer's router launch instead cost the
uncompiled step more host time than the one join launch: measured, not kept.)
On the CPU and Metal the per-layer arrays are host memory already and are read
as they are.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .log_writer import by_weight

PREFILL = "prefill"
DECODE = "decode"


def _to_bytes(arrays: list, mx_dtype, np_dtype) -> bytes:
    """Per-layer [T, k] arrays' values, joined, as bytes of `np_dtype`.

    Joining the arrays' buffers (memoryview) takes a third of the Python time of
    np.asarray per array and np.concatenate: at 48 layers it is 96 arrays per token,
    on the generating thread.  All are [T, k] from the same kind of router, so one
    array's dtype and shape are read and the joined length stands for the rest (a
    bfloat16 array among float32 ones would make it short)."""
    if arrays[0].dtype == mx_dtype:
        try:
            joined = b"".join([memoryview(a) for a in arrays])
            if len(joined) == len(arrays) * arrays[0].size * np.dtype(np_dtype).itemsize:
                return joined
        except (BufferError, ValueError, TypeError):  # a buffer that is not contiguous
            pass
    return np.concatenate([np.asarray(a.astype(mx_dtype)).ravel() for a in arrays]).astype(
        np_dtype, copy=False).tobytes()


@lru_cache(maxsize=None)
def _has_cuda() -> bool:
    """Whether MLX runs on its CUDA backend here (asked once: it is called every forward)."""
    return mx.cuda.is_available()


class _ForwardArrays:
    """The (ids, weights) of all MoE layers of one forward pass: the per-layer
    arrays the step itself computed, or one packed array of all of them (joined on
    the device, mlx_moe/kernels/routing_join.py), converted to numpy and ordered by
    weight in one batch the first time any event asks, on the thread that asks."""

    __slots__ = ("_ids", "_weights", "_packed", "_host", "_shape", "_result", "_lock")

    def __init__(self, ids: Optional[list], weights: Optional[list], shape: tuple,
                 packed: Optional[mx.array] = None, host: Optional[tuple] = None):
        self._ids = ids  # per-layer [T, k] arrays (None when packed or host)
        self._weights = weights
        self._packed = packed  # routing_join's uint32 array, or None
        self._host = host  # (ids, weights) numpy [L, T, k], already read (a record chain's slots)
        self._shape = shape  # (L, T, k)
        self._result = None
        self._lock = threading.Lock()

    def _raw(self):
        """(ids, weights) in the router's slot order: numpy arrays of the packed array
        (one read) or of a read record chain, or bytes of the per-layer arrays."""
        if self._host is not None:
            return self._host
        if self._packed is not None:
            from .kernels.routing_join import unpack

            return unpack(memoryview(self._packed), self._shape)
        return _to_bytes(self._ids, mx.int32, np.int32), _to_bytes(self._weights, mx.float32, np.float32)

    def all(self):
        """ids int32 [L, T, k] and weights float32 [L, T, k], by descending weight
        (a stable sort: equal weights keep the router's slot order)."""
        with self._lock:
            if self._result is None:
                ids, w = self._raw()
                ids = np.frombuffer(ids, np.int32).reshape(self._shape)
                w = np.frombuffer(w, np.float32).reshape(self._shape)
                self._result = by_weight(ids, w)
                self._ids = self._weights = self._packed = self._host = None  # release the device arrays
        return self._result

    def buffers(self):
        """The raw bytes of ids (int32) and weights (float32), [L, T, k] layer-major, in
        the router's slot order (or by weight if `all()` ran first: sorting is idempotent).

        For a consumer in another process (the expert log's writer): this is the only
        host work, on the calling thread; one read of the packed array, or ~1 us per
        layer array."""
        with self._lock:
            if self._result is not None:
                return self._result[0].tobytes(), self._result[1].tobytes()
            ids, w = self._raw()
            return bytes(ids), bytes(w)

    def get(self, i: int):
        ids, w = self.all()
        return ids[i], w[i]


class RoutingEvent:
    """One MoE layer's routing for the tokens of one forward pass.

    Attributes (numpy, computed on first access, off the device):
      layer        index of the decoder layer among *all* decoder layers
      positions    int64 [T]: absolute position of each token in its sequence
      expert_ids   int32 [T, k]: selected experts, by descending routing weight
                   (ties keep the router's slot order)
      weights      float32 [T, k]: the routing weight of each selected expert
      is_zero      bool [T, k]: True where the expert is a zero-computation
                   (identity) expert, id >= n_experts (LongCat); None for
                   families without them
      phase        "prefill" (prompt tokens) or "decode" (generated tokens)
      n_experts    number of real (FFN) experts of the layer
      sequence_id  which sequence (generate call) the tokens belong to
    With a batch of B sequences, T = B * L and `positions` repeats per row.
    """

    __slots__ = ("layer", "phase", "n_experts", "n_zero_experts", "sequence_id",
                 "forward_id", "positions", "_arrays", "_index")

    def __init__(self, layer, arrays: _ForwardArrays, index, positions, phase, n_experts,
                 n_zero_experts, sequence_id, forward_id):
        self.layer = layer
        self.phase = phase
        self.n_experts = n_experts
        self.n_zero_experts = n_zero_experts
        self.sequence_id = sequence_id
        self.forward_id = forward_id
        self.positions = positions
        self._arrays = arrays
        self._index = index

    @property
    def expert_ids(self) -> np.ndarray:
        return self._arrays.get(self._index)[0]

    @property
    def weights(self) -> np.ndarray:
        return self._arrays.get(self._index)[1]

    @property
    def is_zero(self) -> Optional[np.ndarray]:
        if not self.n_zero_experts:
            return None
        return self.expert_ids >= self.n_experts

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[-1]

    @staticmethod
    def stacked(events: Sequence["RoutingEvent"]):
        """ids and weights of a forward pass's events as [L, T, k] arrays (one
        conversion for all layers when the events came from one flush)."""
        if isinstance(events, ForwardEvents):
            return events.arrays.all()
        return np.stack([ev.expert_ids for ev in events]), np.stack([ev.weights for ev in events])

    def __repr__(self) -> str:
        return (f"RoutingEvent(layer={self.layer}, phase={self.phase!r}, tokens={len(self.positions)}, "
                f"sequence_id={self.sequence_id})")


class ForwardEvents(Sequence):
    """The RoutingEvents of one forward pass, one per MoE layer in call order,
    created only when indexed: a per-forward callback such as the expert log
    reads `layers`, `positions`, `phase`, `sequence_id` and the batched
    `arrays` directly, so delivery costs the generating thread almost nothing."""

    __slots__ = ("_forward", "arrays", "_events")

    def __init__(self, forward: "_Forward", arrays: _ForwardArrays):
        self._forward = forward
        self.arrays = arrays
        self._events: Optional[list] = None

    def _all(self) -> list:
        if self._events is None:
            f = self._forward
            self._events = [RoutingEvent(layer, self.arrays, i, f.positions, f.phase, ne, nz,
                                         f.sequence_id, f.forward_id)
                            for i, (layer, _, _, ne, nz) in enumerate(f.records)]
        return self._events

    def __len__(self) -> int:
        return len(self._forward.records)

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self) -> Iterator[RoutingEvent]:
        return iter(self._all())

    @property
    def layers(self) -> List[int]:
        return [r[0] for r in self._forward.records]

    @property
    def positions(self) -> np.ndarray:
        return self._forward.positions

    @property
    def phase(self) -> str:
        return self._forward.phase

    @property
    def sequence_id(self) -> int:
        return self._forward.sequence_id


class _Chain:
    """An open record chain (metal/routing_join.metal, routing_join_record): `array` is its latest
    version, uint32 [2 * slots * tokens * k + 1]; `used` layer slots are written."""

    __slots__ = ("array", "slots", "used", "tokens", "k")

    def __init__(self, array: mx.array, slots: int, tokens: int, k: int):
        self.array, self.slots, self.used, self.tokens, self.k = array, slots, 0, tokens, k


@dataclass
class _Forward:
    forward_id: int
    positions: np.ndarray
    phase: str
    sequence_id: int
    records: list = field(default_factory=list)  # (layer, ids, weights, n_experts, n_zero)
    # the device array holding all records: routing_join's packed array, or the record
    # chain as this forward left it (then ids/weights are None once delivered)
    joined: Optional[mx.array] = None
    shape: Optional[tuple] = None  # (L, T, k)
    layers: Optional[int] = None  # MoE layers announced by the model: chaining is on
    top_k: Optional[int] = None  # every record's k as its layer said (0: not said or not all alike)
    chain: Optional[_Chain] = None  # the record chain this forward writes, from slot `slot0`
    slot0: int = 0


class _Capture:
    """What the MoE layers record while a compiled step is traced (see capturing)."""

    __slots__ = ("enabled", "records")

    def __init__(self, enabled: bool):
        self.enabled, self.records = enabled, []


Callback = Callable[[RoutingEvent], None]
BatchCallback = Callable[[Sequence[RoutingEvent]], None]  # a ForwardEvents


class RoutingHooks:
    """Registry of callbacks plus the pending records of unflushed forward passes."""

    def __init__(self) -> None:
        self._callbacks: list = []  # (handle, fn, per_forward)
        self._next_handle = 0
        self._pending: List[_Forward] = []
        self._forward_id = 0
        self.sequence_id = 0
        self.prompt_end: Optional[int] = None  # positions >= this are decode
        self._capture: Optional[_Capture] = None  # see capturing()
        self._chain: Optional[_Chain] = None  # the record chain forwards extend, if open
        # Decode forwards per record chain: the host reads one array per this many tokens.
        self.forwards_per_read = 8
        # Which kernel flavor joins a forward's records on the device (end_forward):
        # "auto" (the default): "cuda" on MLX's CUDA backend, else none (Metal and the
        # CPU read the per-layer arrays at no cost); None: never; or a flavor ("cuda",
        # "emulated", "mlx" for MLX ops).
        self.join_flavor: Optional[str] = "auto"

    @property
    def active(self) -> bool:
        if self._capture is not None:
            return self._capture.enabled
        return bool(self._callbacks)

    @contextmanager
    def capturing(self, enabled: bool = True) -> Iterator[_Capture]:
        """While a compiled step is traced (mlx_moe/compiled.py): the MoE layers'
        records go to the yielded capture's `records` (tracer arrays, to become
        outputs of the trace), not to a pending forward; `active` says `enabled`
        meanwhile."""
        saved = self._capture
        self._capture = _Capture(enabled)
        try:
            yield self._capture
        finally:
            self._capture = saved

    def add(self, fn, per_forward: bool = False) -> int:
        """Register `fn`. per_forward=False: fn(event) per layer; True: fn([events]) per forward pass."""
        handle = self._next_handle
        self._next_handle += 1
        self._callbacks.append((handle, fn, per_forward))
        return handle

    def remove(self, handle: int) -> None:
        """Unregister.  The forward passes poll has kept back (see forwards_per_read) are
        delivered first, all but the newest (mid-generation that one may still be running
        or, after an error, incomplete); `flush()` before this delivers it too.  The
        callback is unregistered even when that delivery fails."""
        try:
            if any(c[0] == handle for c in self._callbacks):
                self.flush(keep_last=1)
        finally:
            self._callbacks = [c for c in self._callbacks if c[0] != handle]
            if not self._callbacks:
                self.discard()

    # -- called by the model wrapper and the MoE layers -------------------------------

    def begin_forward(self, batch: int, length: int, offset: int, moe_layers: Optional[int] = None) -> None:
        """A forward pass of `batch` x `length` tokens from position `offset` begins.
        moe_layers: how many MoE layers it runs, where the caller knows (the model
        wrappers): that lets its records travel in a record chain (see the module's doc)."""
        if not self._callbacks:
            return
        positions = np.arange(offset, offset + length, dtype=np.int64)
        if batch > 1:
            positions = np.tile(positions, batch)
        if self.prompt_end is not None:
            phase = PREFILL if offset < self.prompt_end else DECODE
        else:
            phase = PREFILL if length > 1 else DECODE
        self._forward_id += 1
        f = _Forward(self._forward_id, positions, phase, self.sequence_id)
        if moe_layers and self.join_flavor_now() is not None:
            f.layers = moe_layers
        self._pending.append(f)

    def forward_chain(self, tokens: int, k: int) -> Optional[mx.array]:
        """The record chain the current forward writes its records into, opened on the first
        call (continuing the open chain where it has room, else a new one), or None where
        the forward does not chain."""
        if not self._pending or not self._callbacks:
            return None
        f = self._pending[-1]
        if not f.layers:
            return None
        c = f.chain
        if c is None:
            c = self._chain
            if c is None or c.tokens != tokens or c.k != k or c.used + f.layers > c.slots:
                c = self._chain = self._new_chain(f.layers, tokens, k)
                if c is None:  # too large for a chain: this forward is joined on its own
                    f.layers = None
                    return None
            f.chain, f.slot0 = c, c.used
        return c.array

    MAX_RECORD_WORDS = 1 << 20  # 4 MB: every forward's join copies the chain forward

    def _new_chain(self, layers: int, tokens: int, k: int) -> Optional[_Chain]:
        from .kernels.routing_join import new_record

        per_forward = 2 * layers * tokens * k
        if per_forward + 1 > self.MAX_RECORD_WORDS:
            return None
        forwards = max(1, min(self.forwards_per_read, (self.MAX_RECORD_WORDS - 1) // per_forward))
        return _Chain(new_record(forwards * layers, tokens, k), forwards * layers, tokens, k)

    def record(self, layer: int, ids: mx.array, weights: mx.array, n_experts: int, n_zero: int,
               top_k: int = 0) -> None:
        """A MoE layer's routing: ids and weights [tokens, top_k] (top_k: the layer's, where
        it says it; then end_forward need not ask the arrays their shapes)."""
        if self._capture is not None:
            if self._capture.enabled:
                self._capture.records.append((layer, ids, weights, n_experts, n_zero))
            return
        if not self._callbacks:
            return
        if not self._pending:  # a layer called outside a wrapped model forward
            T = ids.shape[0]
            self.begin_forward(1, T, 0)
        # Dtypes are not checked here (a nanobind attribute read per layer per token):
        # the routers give int32 / float32, anything else takes _to_bytes' slow path.
        f = self._pending[-1]
        f.records.append((layer, ids, weights, n_experts, n_zero))
        if f.top_k != top_k:
            f.top_k = top_k if f.top_k is None else 0

    def join_flavor_now(self) -> Optional[str]:
        """The flavor end_forward joins with now (None: keep per-layer arrays)."""
        flavor = self.join_flavor
        if flavor == "auto":
            return "cuda" if _has_cuda() and mx.default_device().type == mx.DeviceType.gpu else None
        return flavor or None

    def end_forward(self, output):
        """Called by the model wrapper with a forward's output: on the CUDA backend,
        append the forward's records to the record chain with one kernel (or, where no
        chain fits, join them into one packed array), and return `output` made to depend
        on the result (the step's own evaluation computes it)."""
        if not self._callbacks or not self._pending:
            return output
        f = self._pending[-1]
        if f.joined is not None or not f.records:
            return output
        flavor = self.join_flavor_now()
        if flavor is None:
            return output
        from .kernels.routing_join import routing_join

        meta = [(r[0], r[3], r[4]) for r in f.records]
        ids, weights = [r[1] for r in f.records], [r[2] for r in f.records]
        # the routers' outputs are [tokens, top_k]: known without a nanobind call per array
        known = (len(f.positions), f.top_k) if f.top_k else None
        shape = known or tuple(ids[0].shape)
        chain = self.forward_chain(*shape) if f.layers == len(f.records) else None
        if chain is not None:
            self.record_chained(meta, routing_join(ids, weights, flavor, record=chain, shape=known), shape)
        else:
            self.record_joined(meta, routing_join(ids, weights, flavor, shape=known), shape)
        return mx.depends(output, [f.joined])

    def record_joined(self, meta: list, packed: mx.array, shape: tuple) -> None:
        """The current forward's records as routing_join's packed array; meta: per
        layer (layer, n_experts, n_zero), in the packed order; shape: one layer's [T, k]."""
        if not self._callbacks or not self._pending:
            return
        f = self._pending[-1]
        f.records = [(layer, None, None, ne, nz) for layer, ne, nz in meta]
        f.joined = packed
        f.shape = (len(meta), *shape)

    def record_chained(self, meta: list, chain: mx.array, shape: tuple) -> None:
        """The current forward's records as the record chain from `forward_chain`, extended
        by routing_join_record; meta as for record_joined, in slot order."""
        if not self._callbacks or not self._pending:
            return
        f = self._pending[-1]
        if f.chain is None or len(meta) != f.layers:
            raise RuntimeError(f"routing records: {len(meta)} layers appended to a record chain, but the "
                               f"forward {'announced ' + str(f.layers) if f.layers else 'has no chain'}")
        self.record_joined(meta, chain, shape)
        f.chain.array = chain
        f.chain.used += len(meta)

    # -- delivery ------------------------------------------------------------------------

    def poll(self) -> None:
        """Called by generate after each token it reads: every forward pass but the
        newest (the step mlx-lm has already queued) has been evaluated; deliver those,
        once `forwards_per_read` of them wait where they travel in record chains."""
        ready = len(self._pending) - 1
        if ready <= 0:
            return
        if ready >= self.forwards_per_read or any(f.chain is None for f in self._pending[:ready]):
            self.flush(keep_last=1)

    def flush(self, keep_last: int = 0) -> None:
        """Deliver the records of all pending forward passes but the last `keep_last`.

        Evaluates the recorded arrays here, on the thread that built them (free once
        their step has been evaluated): a callback may read them on another thread."""
        n = len(self._pending) - keep_last
        if n <= 0:
            return
        done, self._pending = self._pending[:n], self._pending[n:]
        if self._chain is not None and not self._pending:
            self._chain = None  # nothing left to extend it: the next forward starts a new one
        mx.eval([a for f in done for a in ([f.joined] if f.joined is not None else
                                           [a for r in f.records for a in r[1:3]])])
        chains = self._read_chains(done)
        callbacks = list(self._callbacks)
        for i, f in enumerate(done):
            try:
                self._deliver(f, chains, callbacks)
            except BaseException:  # Ctrl-C in a callback: the rest wait for the next flush
                self._pending[:0] = done[i + 1:]
                raise

    @staticmethod
    def _deliver(f: "_Forward", chains: dict, callbacks: list) -> None:
        """Hand forward `f`'s events to the callbacks (chains: `_read_chains`' words)."""
        if not f.records:
            return
        if f.chain is not None and f.joined is not None:
            arrays = _ForwardArrays(None, None, f.shape, host=_chain_slots(chains[id(f.chain)], f))
        elif f.joined is not None:
            arrays = _ForwardArrays(None, None, f.shape, packed=f.joined)
        else:
            arrays = _ForwardArrays([r[1] for r in f.records], [r[2] for r in f.records],
                                    (len(f.records), *f.records[0][1].shape))
        # From here only `arrays` holds the device arrays (and drops them once converted).
        f.records = [(layer, None, None, ne, nz) for layer, _, _, ne, nz in f.records]
        f.joined = f.chain = None
        events = ForwardEvents(f, arrays)
        for _, fn, per_forward in callbacks:
            if per_forward:
                fn(events)
            else:
                for ev in events:
                    fn(ev)

    @staticmethod
    def _read_chains(done: List[_Forward]) -> dict:
        """{id(chain): its words as numpy uint32}: one host read per record chain, of the
        version the last of `done` to extend it left (it holds every earlier slot)."""
        words = {}
        for f in reversed(done):
            if f.chain is not None and f.joined is not None and id(f.chain) not in words:
                words[id(f.chain)] = np.array(memoryview(f.joined), copy=True).view(np.uint32)
        return words

    def discard(self) -> None:
        self._pending.clear()
        self._chain = None


def _chain_slots(words: np.ndarray, f: _Forward) -> tuple:
    """Forward `f`'s (ids int32, weights float32) [L, T, k] out of its record chain's words."""
    c = f.chain
    L = f.shape[0]
    n = c.slots * c.tokens * c.k
    if words.size != 2 * n + 1 or words[-1] < f.slot0 + L:
        raise RuntimeError(
            f"routing records: the record chain holds {int(words[-1])} layer slots of {c.slots} "
            f"({words.size} words), but forward {f.forward_id} wrote slots {f.slot0}..{f.slot0 + L - 1}; "
            f"the join kernel did not extend it (set mlx_moe.hooks.HOOKS.join_flavor = None to read the "
            f"per-layer arrays instead, and report this)")
    from .kernels.routing_join import unpack  # a chain of S slots is the packed layout of S layers

    ids, weights = unpack(words, (c.slots, c.tokens, c.k))
    return ids[f.slot0:f.slot0 + L], weights[f.slot0:f.slot0 + L]


# The process-wide registry the MoE layers report to.
HOOKS = RoutingHooks()


def add_routing_hook(fn: Callback, per_forward: bool = False) -> int:
    """Register a routing callback; returns a handle for `remove_routing_hook`."""
    return HOOKS.add(fn, per_forward=per_forward)


def remove_routing_hook(handle: int) -> None:
    HOOKS.remove(handle)


def flush() -> None:
    """Deliver all recorded routing events now (after a direct `model(...)` call)."""
    HOOKS.flush()


@contextmanager
def routing_hook(fn: Callback, per_forward: bool = False) -> Iterator[int]:
    """Context manager: `fn` receives routing events inside the block; flushed on exit."""
    handle = HOOKS.add(fn, per_forward=per_forward)
    try:
        yield handle
        HOOKS.flush()
    finally:
        HOOKS.remove(handle)
