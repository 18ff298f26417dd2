"""The routing hook: every MoE layer's expert choice, observable at almost no cost.

Register a callback; it is called once per (MoE layer, forward pass) with a
`RoutingEvent`:

    import mlx_moe
    def show(ev):
        print(ev.layer, ev.positions, ev.expert_ids, ev.weights, ev.phase)
    with mlx_moe.routing_hook(show):
        mlx_moe.generate(model, tokenizer, "Hello")

How it stays cheap: MoE layers only *record* their lazy (ids, weights)
arrays; nothing is evaluated inside the forward pass.  At the end of a model
forward (`end_forward`) the records are joined into one ids and one weights
array for all layers, and the model's output is made to depend on them
(`mx.depends`): they are computed by the step's own evaluation.  Copying them
to the host is what costs (on CUDA each copy is a synchronous cudaMemcpy made
with the GIL held: 96 per-layer copies per token cost 14% of decode speed on
the H100), so while generating, the forward passes of `transfer_every`
tokens (default 16) share one copy: `generate` calls `poll()` after each
token it reads, which launches the join of the waiting, already evaluated
forward passes behind the step in flight and delivers it at the next poll.
Events therefore arrive in order, up to `transfer_every` + 1 tokens late;
every one is delivered when generation ends or fails, and `flush()` delivers
at once (after a direct `model(...)` call).  Host-side work (conversion to
numpy, ordering by weight) happens lazily when an event's fields are read,
so a logger does it on its own thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

PREFILL = "prefill"
DECODE = "decode"


class _Transfer:
    """The records of several forward passes, joined on the device into one ids
    and one weights array: one device->host copy for all of them.

    On MLX's CUDA backend every copy of a device array to the host is a
    synchronous cudaMemcpy into newly mapped unified memory, made with the GIL
    held (tenths of a millisecond); per token and per array that cost several
    percent of decode speed.  `RoutingHooks.transfer_every` forward passes share
    one.  Converted to numpy and ordered by weight in one batch, on first use, by
    whichever thread asks first (the expert log's writer thread)."""

    __slots__ = ("_arrays", "_host", "_lock")

    def __init__(self, ids: mx.array, weights: mx.array):
        self._arrays = (ids, weights)
        self._host = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Queue the join on the device now (asynchronously)."""
        mx.async_eval(self.device_arrays())

    def device_arrays(self) -> list:
        """The arrays still to be copied ([] once converted)."""
        with self._lock:
            return list(self._arrays) if self._arrays is not None else []

    def host(self):
        """ids int32 [R, k] and weights float32 [R, k], each row by descending weight
        (a stable sort: equal weights keep the router's slot order)."""
        with self._lock:
            if self._host is None:
                ids, w = self._arrays
                ids = np.asarray(ids).astype(np.int32, copy=False)
                w = np.asarray(w).astype(np.float32, copy=False)
                n, k = ids.shape
                # Gather through flat indices: 3x faster than take_along_axis.
                flat = (np.argsort(-w, axis=-1, kind="stable") + np.arange(0, n * k, k)[:, None]).ravel()
                self._host = (ids.ravel()[flat].reshape(n, k), w.ravel()[flat].reshape(n, k))
                self._arrays = None  # release the device arrays
        return self._host


class _ForwardArrays:
    """One forward pass's rows [start, stop) of a `_Transfer`, as [L, T, k]."""

    __slots__ = ("_transfer", "_start", "_stop", "_layers", "_result")

    def __init__(self, transfer: _Transfer, start: int, stop: int, layers: int):
        self._transfer = transfer
        self._start, self._stop = start, stop
        self._layers = layers
        self._result = None

    def all(self):
        """ids int32 [L, T, k] and weights float32 [L, T, k], by descending weight."""
        if self._result is None:
            ids, w = self._transfer.host()
            n = self._stop - self._start
            shape = (self._layers, n // self._layers, ids.shape[1])
            self._result = (ids[self._start:self._stop].reshape(shape), w[self._start:self._stop].reshape(shape))
        return self._result

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
    stacked: Optional[tuple] = None  # (ids [L * T, k], weights [L * T, k]) once end_forward ran


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
        # Forward passes per device->host transfer while generating (see `poll`):
        # 1 delivers every token's events one token after it is read; more make
        # the transfers rarer (each costs ~0.3 ms of host time on CUDA) and
        # deliver up to that many tokens later.  `flush()` always delivers all.
        self.transfer_every = 16
        self.transfers = 0  # device->host transfers made (tests and benchmarks read it)
        self._launched: List[tuple] = []  # (forwards, _Transfer), queued on the device, not delivered
        self._capture: Optional[list] = None  # see capturing()
        self._capture_on = False

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
        positions = np.tile(np.arange(offset, offset + length, dtype=np.int64), batch)
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
        self._pending[-1].records.append((layer, ids, weights, n_experts, n_zero))

    def end_forward(self, output: mx.array) -> mx.array:
        """Called by the model wrapper with the forward's output: join this
        forward's records into one [L * T, k] ids and one weights array, and
        return `output` made to depend on them, so the step's own evaluation
        computes them (no extra evaluation, no per-layer transfers later)."""
        if not self._callbacks or not self._pending:
            return output
        f = self._pending[-1]
        if f.stacked is not None or not f.records:
            return output
        f.stacked = self._join(f)
        # The per-layer arrays are no longer needed: only the joined ones are kept.
        f.records = [(layer, None, None, ne, nz) for layer, _, _, ne, nz in f.records]
        return mx.depends(output, list(f.stacked))

    @staticmethod
    def _join(f: _Forward) -> tuple:
        # concatenate, not stack: one graph node each ([L * T, k]), no per-layer reshape nodes
        ids = mx.concatenate([r[1] for r in f.records])
        weights = mx.concatenate([r[2] for r in f.records]).astype(mx.float32)
        return ids, weights

    # -- delivery ------------------------------------------------------------------------

    def poll(self) -> None:
        """Called by generate after each token it reads, when every forward pass
        but the newest has been evaluated (mlx-lm has already queued the next
        step).  Delivers the transfers launched at earlier polls, then, once
        `transfer_every` evaluated forward passes wait, launches one transfer for
        them: queued behind the step in flight, so it is done by the next poll
        and never delays a step."""
        self._deliver(self._launched)
        self._launched = []
        if len(self._pending) - 1 >= self.transfer_every:
            transfer = self._launch(len(self._pending) - 1)
            if transfer is not None:
                transfer.start()

    def flush(self, keep_last: int = 0) -> None:
        """Deliver the records of all pending forward passes but the last
        `keep_last`, now (evaluating them if their step has not been)."""
        if len(self._pending) > keep_last:
            self._launch(len(self._pending) - keep_last)
        launched, self._launched = self._launched, []
        # Evaluate here: a callback may read the arrays on another thread, and
        # MLX graphs must be evaluated by the thread that builds them.
        mx.eval([a for _, t in launched for a in t.device_arrays()])
        self._deliver(launched)

    def _launch(self, n: int) -> Optional[_Transfer]:
        """Join the records of the first n pending forward passes into one transfer
        (None when they recorded nothing)."""
        done, self._pending = self._pending[:n], self._pending[n:]
        done = [f for f in done if f.records]
        if not done:
            return None
        for f in done:
            if f.stacked is None:  # layers called outside a wrapped model forward
                f.stacked = self._join(f)
        if len(done) == 1:
            ids, weights = done[0].stacked
        else:
            ids = mx.concatenate([f.stacked[0] for f in done])
            weights = mx.concatenate([f.stacked[1] for f in done])
        self.transfers += 1
        transfer = _Transfer(ids, weights)
        self._launched.append((done, transfer))
        return transfer

    def _deliver(self, launched: List[tuple]) -> None:
        callbacks = list(self._callbacks)
        for forwards, transfer in launched:
            row = 0
            for f in forwards:
                rows = len(f.positions) * len(f.records)
                events = ForwardEvents(f, _ForwardArrays(transfer, row, row + rows, len(f.records)))
                row += rows
                f.stacked = None
                for _, fn, per_forward in callbacks:
                    if per_forward:
                        fn(events)
                    else:
                        for ev in events:
                            fn(ev)

    def discard(self) -> None:
        self._pending.clear()
        self._launched.clear()


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
