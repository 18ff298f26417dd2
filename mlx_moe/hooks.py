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
MLX's Buffer::raw_ptr), 96 arrays per token at 48 layers.  So there, by
default (`join_flavor = "auto"`), the model wrapper ends each forward pass
with `end_forward`: one kernel packs all layers' records into one uint32
array (metal/routing_join.metal; MLX's concatenate would be one launch per
input), the model's output is made to depend on it (`mx.depends`, likewise
in the compiled step), and the host reads one array per forward pass.
Measured on the H100 (BENCHMARKS.md, twelfth to seventeenth runs): the
delivery's time on the generating thread fell from 0.6-0.67 ms to 0.23-0.37
ms per token.  On the CPU and Metal the per-layer arrays are host memory
already and are read as they are.
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

    __slots__ = ("_ids", "_weights", "_packed", "_shape", "_result", "_lock")

    def __init__(self, ids: list, weights: list, shape: tuple, packed: Optional[mx.array] = None):
        self._ids = ids  # per-layer [T, k] arrays (None when packed)
        self._weights = weights
        self._packed = packed  # routing_join's uint32 array, or None
        self._shape = shape  # (L, T, k)
        self._result = None
        self._lock = threading.Lock()

    def _raw(self):
        """(ids, weights) in the router's slot order: numpy arrays of the packed array
        (one read), or bytes of the per-layer arrays."""
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
                self._ids = self._weights = self._packed = None  # release the device arrays
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


@dataclass
class _Forward:
    forward_id: int
    positions: np.ndarray
    phase: str
    sequence_id: int
    records: list = field(default_factory=list)  # (layer, ids, weights, n_experts, n_zero)
    joined: Optional[mx.array] = None  # routing_join's packed array of all records (then ids/weights are None)
    shape: Optional[tuple] = None  # (L, T, k)


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
        self._capture: Optional[list] = None  # see capturing()
        self._capture_on = False
        # Which kernel flavor joins a forward's records on the device (end_forward):
        # "auto" (the default): "cuda" on MLX's CUDA backend, else none (Metal and the
        # CPU read the per-layer arrays at no cost); None: never; or a flavor ("cuda",
        # "emulated", "mlx" for MLX ops).
        self.join_flavor: Optional[str] = "auto"

    @property
    def active(self) -> bool:
        if self._capture is not None:
            return self._capture_on
        return bool(self._callbacks)

    @contextmanager
    def capturing(self, enabled: bool = True) -> Iterator[list]:
        """While a compiled step is traced (mlx_moe/compiled.py): the MoE layers'
        records go to the yielded list (tracer arrays, to become outputs of the
        trace), not to a pending forward; `active` says `enabled` meanwhile."""
        saved = self._capture, self._capture_on
        self._capture, self._capture_on = [], enabled
        try:
            yield self._capture
        finally:
            self._capture, self._capture_on = saved

    def add(self, fn, per_forward: bool = False) -> int:
        """Register `fn`. per_forward=False: fn(event) per layer; True: fn([events]) per forward pass."""
        handle = self._next_handle
        self._next_handle += 1
        self._callbacks.append((handle, fn, per_forward))
        return handle

    def remove(self, handle: int) -> None:
        self._callbacks = [c for c in self._callbacks if c[0] != handle]
        if not self._callbacks:
            self.discard()

    # -- called by the model wrapper and the MoE layers -------------------------------

    def begin_forward(self, batch: int, length: int, offset: int) -> None:
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
        self._pending.append(_Forward(self._forward_id, positions, phase, self.sequence_id))

    def record(self, layer: int, ids: mx.array, weights: mx.array, n_experts: int, n_zero: int) -> None:
        if self._capture is not None:
            if self._capture_on:
                self._capture.append((layer, ids, weights, n_experts, n_zero))
            return
        if not self._callbacks:
            return
        if not self._pending:  # a layer called outside a wrapped model forward
            T = ids.shape[0]
            self.begin_forward(1, T, 0)
        # Dtypes are not checked here (a nanobind attribute read per layer per token):
        # the routers give int32 / float32, anything else takes _to_bytes' slow path.
        self._pending[-1].records.append((layer, ids, weights, n_experts, n_zero))

    def join_flavor_now(self) -> Optional[str]:
        """The flavor end_forward joins with now (None: keep per-layer arrays)."""
        flavor = self.join_flavor
        if flavor == "auto":
            return "cuda" if _has_cuda() and mx.default_device().type == mx.DeviceType.gpu else None
        return flavor or None

    def end_forward(self, output):
        """Called by the model wrapper with a forward's output: on the CUDA backend,
        join the forward's records into one packed array and return `output` made to
        depend on it (the step's own evaluation computes it)."""
        if not self._callbacks or not self._pending:
            return output
        f = self._pending[-1]
        if f.joined is not None or not f.records:
            return output
        flavor = self.join_flavor_now()
        if flavor is None:
            return output
        from .kernels.routing_join import routing_join

        self.record_joined([(r[0], r[3], r[4]) for r in f.records],
                           routing_join([r[1] for r in f.records], [r[2] for r in f.records], flavor),
                           tuple(f.records[0][1].shape))
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

    # -- delivery ------------------------------------------------------------------------

    def poll(self) -> None:
        """Called by generate after each token it reads: every forward pass but the
        newest (the step mlx-lm has already queued) has been evaluated; deliver those."""
        self.flush(keep_last=1)

    def flush(self, keep_last: int = 0) -> None:
        """Deliver the records of all pending forward passes but the last `keep_last`.

        Evaluates the recorded arrays here, on the thread that built them (free once
        their step has been evaluated): a callback may read them on another thread."""
        n = len(self._pending) - keep_last
        if n <= 0:
            return
        done, self._pending = self._pending[:n], self._pending[n:]
        mx.eval([a for f in done for a in ([f.joined] if f.joined is not None else
                                           [a for r in f.records for a in r[1:3]])])
        callbacks = list(self._callbacks)
        for f in done:
            if not f.records:
                continue
            if f.joined is not None:
                arrays = _ForwardArrays(None, None, f.shape, packed=f.joined)
            else:
                arrays = _ForwardArrays([r[1] for r in f.records], [r[2] for r in f.records],
                                        (len(f.records), *f.records[0][1].shape))
            # From here only `arrays` holds the device arrays (and drops them once converted).
            if f.joined is None:
                f.records = [(layer, None, None, ne, nz) for layer, _, _, ne, nz in f.records]
            f.joined = None
            events = ForwardEvents(f, arrays)
            for _, fn, per_forward in callbacks:
                if per_forward:
                    fn(events)
                else:
                    for ev in events:
                        fn(ev)

    def discard(self) -> None:
        self._pending.clear()


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
