"""Expert-parallel inference over several processes or machines (mx.distributed).

When a model's experts do not fit one machine, each rank holds a disjoint
subset of every MoE layer's experts; attention, dense layers, routers and
shared experts are replicated.  Every rank routes every token, computes only
its own experts, and the partial outputs are added with one `all_sum` per
MoE layer.  Networking is MLX's: the ring (TCP), jaccl (Thunderbolt RDMA) or
nccl (NVIDIA) backend, started by `mlx.launch`:

    mlx.launch -n 2 --backend ring -- mlx-moe generate --expert-parallel --model DIR -p "Hi"

or from Python, in a script started the same way:

    from mlx_moe import distributed, generate
    model, tok = distributed.load("DIR")            # init + lazy load + shard
    print(generate(model, tok, "Hi"))               # the same on every rank

Pieces:
- `plan_placement`: which rank holds which experts.  Every rank holds the
  same number of experts of a layer (up to one), so bytes are balanced; the
  odd ones rotate to the ranks holding the fewest bytes so far.  With an
  expert log (CSV of earlier routing), experts are also spread by expected
  load: the hottest expert first, each to the least loaded rank with room,
  per layer, because every layer is a synchronization point.
- `shard_experts`: slices each layer's stacked [E, ...] expert tensors down to
  the local experts (float, MLX-quantized and Q4_0 alike) and evaluates the
  slices one projection at a time, so a lazily loaded model never holds more
  than one full projection stack at once, and wraps the layer's expert
  backend in `ExpertParallelBackend`.
- `ExpertParallelBackend`: maps global expert ids to local ones (experts held
  elsewhere become padding, -1), lets the wrapped backend compute the local
  part, adds the identity ("zero-computation") experts on rank 0 only, and
  all_sums.
- Agreement: the sampled token of every step is rank 0's (one tiny all_sum),
  so ranks can never drift apart, whatever the sampler or seed.
- One communication stream: every collective of every sharded model in the
  process runs on one dedicated stream, so collectives execute one at a time,
  in the order they were queued, which is the same on every rank (see
  `ExpertParallel` for the race this prevents).
- `Watchdog`: the ring backend raises when a peer's socket closes, but waits
  forever for a peer that hangs, cannot be reached, or never starts.  While a
  rank waits on its peers (connecting, the start-up check, each generation
  step) a guard process watches for progress; after `timeout` seconds without
  any it prints why and kills the rank (SIGKILL: a rank blocked inside MLX,
  the GIL held, cannot run any exit code of its own).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import inspect
import json
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .backends import ExpertBackend
from .moe import moe_layers

DEFAULT_TIMEOUT = 120.0  # seconds a rank waits on its peers before giving up
SHUTDOWN_GRACE = 10.0  # seconds a rank that lost a peer has to report it and exit
EXPERT_PARAMS = ("weight", "scales", "biases", "bias")  # stacked [E, ...] tensors of a projection


class ExpertParallelError(RuntimeError):
    """Expert-parallel set-up or communication failed; the message says why and what to do."""


# -- placement -------------------------------------------------------------------------------


@dataclass
class Placement:
    """Which global expert ids each rank holds, per MoE layer (by decoder layer index)."""

    size: int
    layers: Dict[int, List[List[int]]]  # layer_idx -> [rank] -> sorted global ids
    method: str = "bytes"  # "bytes" or "load"
    load: Dict[int, np.ndarray] = field(default_factory=dict)  # layer_idx -> expected load [E]
    expert_bytes: Dict[int, int] = field(default_factory=dict)  # layer_idx -> bytes of one expert

    def local(self, layer_idx: int, rank: int) -> List[int]:
        return self.layers[layer_idx][rank]

    def fingerprint(self) -> int:
        """A 31-bit checksum of the whole placement, to check that all ranks agree."""
        text = json.dumps([self.size, sorted((k, v) for k, v in self.layers.items())])
        return zlib.crc32(text.encode()) & 0x7FFFFFFF

    def rank_bytes(self, rank: int) -> int:
        """Bytes of the expert weights `rank` holds."""
        return sum(len(owned[rank]) * self.expert_bytes.get(l, 0) for l, owned in self.layers.items())

    def load_share(self, rank: int) -> Optional[float]:
        """Fraction of the logged routing mass that lands on `rank`'s experts (None without a log)."""
        if not self.load:
            return None
        mine = sum(float(self.load[l][self.layers[l][rank]].sum()) for l in self.load)
        total = sum(float(v.sum()) for v in self.load.values())
        return mine / total if total else None


def balanced_counts(n_experts: int, size: int, rank_bytes: Sequence[int]) -> List[int]:
    """Experts per rank for one layer: n // size each, the n % size odd ones going to the
    ranks that hold the fewest bytes so far (lower rank on ties)."""
    counts = [n_experts // size] * size
    for r in sorted(range(size), key=lambda r: (rank_bytes[r], r))[: n_experts % size]:
        counts[r] += 1
    return counts


def spread_by_load(load: np.ndarray, counts: Sequence[int]) -> List[List[int]]:
    """Greedy longest-first: experts by descending load, each to the least loaded rank that
    still has room (rank r takes counts[r] experts).  Returns sorted ids per rank."""
    size = len(counts)
    owned: List[List[int]] = [[] for _ in range(size)]
    rank_load = [0.0] * size
    for e in sorted(range(len(load)), key=lambda e: (-float(load[e]), e)):
        r = min((r for r in range(size) if len(owned[r]) < counts[r]), key=lambda r: (rank_load[r], r))
        owned[r].append(e)
        rank_load[r] += float(load[e])
    return [sorted(o) for o in owned]


def read_expert_load(path, n_experts: Dict[int, int], n_identity: Dict[int, int]) -> Dict[int, np.ndarray]:
    """Per-layer routing counts [E] of the real experts from an `--expert-log` CSV.

    Identity experts (ids >= E) carry no FFN work and are not counted.  Layers the
    log does not cover are left out (they are placed by bytes)."""
    path = Path(path)
    if not path.is_file():
        raise ExpertParallelError(f"placement log {path} does not exist; pass a CSV written by --expert-log")
    counts = {l: np.zeros(E, dtype=np.float64) for l, E in n_experts.items()}
    seen = set()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        head = next(reader, None)
        if not head:
            raise ExpertParallelError(f"placement log {path} is empty")
        head = [h.strip().lstrip("#").strip() for h in head]
        cols = [i for i, h in enumerate(head) if h.startswith("expert_")]
        if "layer_id" not in head or not cols:
            raise ExpertParallelError(
                f"placement log {path}: header {head[:4]}... has no layer_id / expert_0.. columns; "
                "pass a CSV written by mlx-moe --expert-log")
        li = head.index("layer_id")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            layer = int(row[li])
            if layer not in counts:
                raise ExpertParallelError(
                    f"placement log {path} line {line_no}: layer {layer} is not a MoE layer of this model "
                    f"(MoE layers: {sorted(counts)}); the log comes from a different model")
            E = n_experts[layer]
            for c in cols:
                e = int(row[c])
                if e < 0 or e >= E + n_identity[layer]:
                    raise ExpertParallelError(
                        f"placement log {path} line {line_no}: expert id {e} is out of range for layer "
                        f"{layer} ({E} experts); the log comes from a different model")
                if e < E:
                    counts[layer][e] += 1
            seen.add(layer)
    if not seen:
        raise ExpertParallelError(f"placement log {path} has no routing rows")
    return {l: c for l, c in counts.items() if l in seen}


def plan_placement(model: nn.Module, size: int, expert_log=None) -> Placement:
    """Place every MoE layer's experts on `size` ranks (see the module docstring).

    expert_log: None (balance bytes) or the path of an `--expert-log` CSV of this model
    (balance bytes and spread the experts' expected load)."""
    layers = moe_layers(model)
    if not layers:
        raise ExpertParallelError("this model has no MoE layers: expert parallelism has nothing to split")
    for layer in layers:
        if layer.num_experts < size:
            raise ExpertParallelError(
                f"layer {layer.layer_idx} has {layer.num_experts} experts, fewer than the {size} ranks; "
                f"run with at most {layer.num_experts} processes")
    load: Dict[int, np.ndarray] = {}
    if expert_log is not None:
        load = read_expert_load(expert_log, {l.layer_idx: l.num_experts for l in layers},
                                {l.layer_idx: l.n_identity for l in layers})
    rank_bytes = [0] * size
    placed: Dict[int, List[List[int]]] = {}
    for layer in layers:
        E = layer.num_experts
        per_expert = layer.switch_mlp.nbytes_per_expert()
        counts = balanced_counts(E, size, rank_bytes)
        if layer.layer_idx in load:
            owned = spread_by_load(load[layer.layer_idx], counts)
        else:  # contiguous blocks, rank order
            starts = np.cumsum([0] + counts)
            owned = [list(range(starts[r], starts[r + 1])) for r in range(size)]
        for r in range(size):
            rank_bytes[r] += len(owned[r]) * per_expert
        placed[layer.layer_idx] = owned
    return Placement(size, placed, "load" if load else "bytes", load,
                     {l.layer_idx: l.switch_mlp.nbytes_per_expert() for l in layers})


# -- watchdog --------------------------------------------------------------------------------


# The watchdog's guard process.  It must not be a thread of the rank: mx.distributed.init
# (ring) blocks while holding the GIL, so no Python thread of the rank runs while it waits.
# Protocol on its stdin: "arm SECONDS WHAT" (start watching with that limit), "off" (stop),
# an empty line (progress).  EOF (the rank closed the pipe or died) ends it.
_GUARD = r"""
import os, select, signal, sys, time
pid, template = int(sys.argv[1]), sys.argv[2]
fd, buf, what, timeout, last = sys.stdin.fileno(), b"", None, 0.0, time.monotonic()
while True:
    wait = None if what is None else max(0.0, last + timeout - time.monotonic())
    if select.select([fd], [], [], wait)[0]:
        data = os.read(fd, 65536)
        if not data:
            sys.exit(0)
        *lines, buf = (buf + data).split(b"\n")
        for line in lines:
            if line.startswith(b"arm "):
                limit, what = line[4:].decode().split(" ", 1)
                timeout = float(limit)
            elif line == b"off":
                what = None
        last = time.monotonic()
    elif what is not None:
        os.write(2, template.format(what=what, idle=time.monotonic() - last, limit=timeout).encode())
        os.kill(pid, signal.SIGKILL)
        sys.exit(0)
"""


class Watchdog:
    """Kills this process (SIGKILL, after printing why) when it waits on its peers for more
    than `timeout` seconds with no progress.  Armed only inside `watch()`; `beat()` marks
    progress.  The watching is done by a small guard process (see `_GUARD`), started on the
    first `watch()` and ended by `close()` or this process's exit."""

    def __init__(self, timeout: float, rank: int, size: Optional[int]):
        if timeout <= 0:
            raise ValueError(f"expert-parallel timeout must be positive, got {timeout}")
        self.timeout = float(timeout)
        self.rank = rank
        self.size = size
        self._stack: List[str] = []
        self._last_beat = 0.0
        self._doomed = False
        self._guard: Optional[subprocess.Popen] = None

    def _message(self) -> str:
        return (
            f"\n[mlx-moe] error: expert-parallel rank {self.rank} of {self.size or '?'} waited {{idle:.0f}} s "
            f"on its peers while {{what}} (limit {{limit:g}} s). Another rank has died, hangs, "
            "was never started, or cannot be reached over the network. Stopping this rank; check the "
            "other ranks' output, then restart all of them (raise the limit with --ep-timeout).\n"
        )

    def _send(self, line: str) -> None:
        if self._guard is None:
            self._guard = subprocess.Popen(
                [sys.executable, "-c", _GUARD, str(os.getpid()), self._message()],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)
        try:
            os.write(self._guard.stdin.fileno(), (line + "\n").encode())
        except OSError:  # the guard is gone: nothing left to tell
            pass

    def beat(self) -> None:
        """Progress.  Cheap: at most a few pipe writes per second reach the guard."""
        if self._stack and not self._doomed:
            now = time.monotonic()
            if now - self._last_beat > min(0.5, self.timeout / 20):
                self._last_beat = now
                self._send("")

    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Inside this block, `timeout` seconds without a `beat()` end the process."""
        self._stack.append(what.replace("\n", " "))
        self._arm()
        try:
            yield
        finally:
            self._stack.pop()
            self._arm()

    def _arm(self) -> None:
        if not self._doomed:
            self._send(f"arm {self.timeout!r} {self._stack[-1]}" if self._stack else "off")

    def doom(self, grace: float) -> None:
        """A peer is lost and the group is unusable: this process gets `grace` seconds to
        report and exit.  (Its exit can hang: MLX's communication thread may still wait on
        a live peer that waits on it.)"""
        if not self._doomed:
            self._send(f"arm {float(grace)!r} shutting down after losing a peer rank")
            self._doomed = True

    def close(self) -> None:
        """Stop the guard process."""
        if self._guard is not None:
            self._guard.stdin.close()
            self._guard.wait()
            self._guard = None


# -- group -----------------------------------------------------------------------------------


_init_backend = ["any"]  # the backend name the last init_group call asked for


def init_group(backend: str = "any", timeout: float = DEFAULT_TIMEOUT):
    """`mx.distributed.init` with a bound on how long it may wait for the other ranks.

    Started outside `mlx.launch` (no MLX_RANK etc.), this is a group of size 1."""
    _init_backend[0] = backend
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)) or 0)
    dog = Watchdog(timeout, rank, _expected_size())
    try:
        with dog.watch("connecting to the other ranks (mx.distributed.init)"):
            return mx.distributed.init(strict=False, backend=backend)
    except RuntimeError as e:
        raise ExpertParallelError(f"rank {rank}: mx.distributed.init(backend={backend!r}) failed: {e}") from e
    finally:
        dog.close()


def comm_device(backend: Optional[str] = None) -> mx.Device:
    """The device whose streams the group's collectives run on: the GPU for nccl, the CPU
    for ring, jaccl and mpi (MLX's choice for each backend).

    backend: the name given to `mx.distributed.init` (default: the last `init_group`'s).
    "any" picks nccl as MLX does: on CUDA, when mlx.launch set NCCL_HOST_IP and NCCL_PORT."""
    backend = backend or _init_backend[0]
    if backend == "nccl":
        return mx.gpu
    if backend == "any" and mx.cuda.is_available() and os.environ.get("NCCL_HOST_IP") and os.environ.get("NCCL_PORT"):
        return mx.gpu
    return mx.cpu


_comm_streams: Dict[str, mx.Stream] = {}


def communication_stream(device: Optional[mx.Device] = None) -> mx.Stream:
    """The one stream of this process that all expert-parallel collectives run on
    (created on first use; device: default `comm_device()`)."""
    device = device or comm_device()
    key = str(device)
    if key not in _comm_streams:
        _comm_streams[key] = mx.new_stream(device)
    return _comm_streams[key]


def _expected_size() -> Optional[int]:
    """The number of ranks the launcher set up, for messages (None if unknown)."""
    try:
        hosts = os.environ.get("MLX_HOSTFILE", "")
        if hosts.strip().startswith("["):
            return len(json.loads(hosts))
        if hosts and Path(hosts).is_file():
            return len(json.loads(Path(hosts).read_text()))
        return int(os.environ.get("MLX_WORLD_SIZE", "")) or None
    except (ValueError, OSError):
        return None


# -- the expert-compute wrapper --------------------------------------------------------------


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class ExpertParallelBackend(ExpertBackend):
    """One MoE layer's expert compute on one rank: the local experts through the wrapped
    backend, then the sum over ranks."""

    def __init__(self, inner: ExpertBackend, ep: "ExpertParallel", local_map: mx.array):
        super().__init__()
        self.inner = inner
        self.ep = ep
        self.local_map = local_map  # int32 [E + n_identity]: global id -> local id, -1 elsewhere
        self.stats = inner.stats  # shared: the numbers count this rank's own FFN work
        self.name = f"expert-parallel({inner.name})"
        self._pad_kw = {"may_pad": True} if _accepts(inner.__call__, "may_pad") else {}

    def supports(self, experts) -> bool:
        return self.inner.supports(experts)

    def route(self, logits, params):
        # Every rank routes every token itself, through the wrapped backend's router
        # (the fused kernel on GPUs): the same rule and code on all ranks, so the
        # same ids everywhere.
        return self.inner.route(logits, params)

    def __call__(self, x, ids, weights, experts, n_identity=0, may_pad=False):
        self.ep.beat()
        local_ids = self.local_map[ids]
        # Identity experts add w * x: once in total, so on rank 0 only.
        n_id = n_identity if self.ep.rank == 0 else 0
        y = self.inner(x, local_ids, weights, experts, n_identity=n_id, **self._pad_kw)
        return self.ep.all_sum(y)


# -- sharding --------------------------------------------------------------------------------


def _slice_experts(proj: nn.Module, index: mx.array, n_experts: int) -> None:
    """Keep only the experts `index` of one stacked projection, evaluated at once."""
    new = {}
    for name in EXPERT_PARAMS:
        if name in proj and isinstance(proj[name], mx.array) and proj[name].ndim and proj[name].shape[0] == n_experts:
            new[name] = mx.take(proj[name], index, axis=0)
    if "weight" not in new:
        raise ExpertParallelError(f"cannot shard expert projection {type(proj).__name__}: no stacked weight")
    mx.eval(list(new.values()))
    for name, value in new.items():
        setattr(proj, name, value)  # replaces the [E, ...] array; a Q4_0 affine cache follows the new weight


def expert_nbytes(model: nn.Module) -> int:
    """Bytes of the routed experts' weights this process holds (all MoE layers)."""
    return sum(v.nbytes for layer in moe_layers(model)
               for _, v in nn.utils.tree_flatten(layer.switch_mlp.parameters()))


class ExpertParallel:
    """The expert-parallel state of one sharded model on one rank (`model.expert_parallel`).

    All its collectives run on `self.stream`, by default `communication_stream()`, one
    stream shared by every sharded model of the process.  Why (issue 8): MLX
    runs a collective on the stream it is built in (by default the current default stream
    of the backend's device), each CPU stream has its own thread, and the ring backend
    gives every collective the same sockets and scratch buffers with no lock.  Two
    collectives on two streams at once therefore mix their bytes, and a sum comes out
    wrong (one ring segment, e.g. rows 8 on of 17) or a rank hangs.  That happened after
    every generation: mlx-lm's generate_step queues its look-ahead step (with one all_sum
    per MoE layer) on its `generation_stream` with async_eval, and stream_generate stops
    without waiting for it, so the next forward pass on the default stream raced it;
    tests/ep_race_repro.py shows it (two streams: 299 of 300 rounds wrong, one stream: 0).
    One stream for every collective serializes them in the order they were queued, which is
    the program order and the same on every rank; MLX adds the waits between streams."""

    def __init__(self, group, placement: Placement, timeout: float = DEFAULT_TIMEOUT, stream=None):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.placement = placement
        self.watchdog = Watchdog(timeout, self.rank, self.size)
        self.stream = stream if stream is not None else communication_stream()

    def beat(self) -> None:
        self.watchdog.beat()

    def all_sum(self, x: mx.array) -> mx.array:
        """The sum of `x` over the ranks (lazy, like every MLX op), on the communication stream."""
        return mx.distributed.all_sum(x, group=self.group, stream=self.stream)

    def watch(self, what: str):
        """Context manager: a hang of the peers inside it ends the process (see `Watchdog`)."""
        return self.watchdog.watch(what)

    def agree_sampler(self, sampler: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
        """The sampler, with every rank taking rank 0's token: ranks can never diverge."""
        rank = self.rank

        def sample(logprobs: mx.array) -> mx.array:
            self.beat()
            token = sampler(logprobs)
            return self.all_sum(token if rank == 0 else mx.zeros_like(token))

        return sample

    def guard(self, responses: Iterable, what: str = "generating") -> Iterator:
        """Iterate a generation with the watchdog armed while waiting for each step, turning a
        lost peer into a clear `ExpertParallelError`.  Ends with a barrier, so no rank
        leaves while a peer still needs it for a step that was already queued."""
        it = iter(responses)
        while True:
            with self.watch(what), self._clear_errors():
                try:
                    response = next(it)
                except StopIteration:
                    self.barrier()
                    return
            yield response

    def barrier(self) -> None:
        with self.watch("waiting at a barrier"), self._clear_errors():
            mx.eval(self.all_sum(mx.zeros((1,), dtype=mx.int32)))

    @contextlib.contextmanager
    def _clear_errors(self):
        try:
            yield
        except RuntimeError as e:
            if isinstance(e, ExpertParallelError) or not _is_peer_error(e):
                raise
            self.watchdog.doom(min(SHUTDOWN_GRACE, self.watchdog.timeout))
            raise ExpertParallelError(
                f"expert-parallel rank {self.rank} of {self.size} lost its connection to a peer rank ({e}). "
                "Another rank has died or the network failed; check the other ranks' output. "
                f"This process ends within {min(SHUTDOWN_GRACE, self.watchdog.timeout):g} s.") from e

    def check_agreement(self, model: nn.Module) -> None:
        """All ranks must run the same model with the same placement: compare checksums."""
        layers = moe_layers(model)
        desc = json.dumps([[l.layer_idx, l.num_experts, l.n_identity, l.top_k] for l in layers])
        mine = (zlib.crc32(desc.encode()) ^ self.placement.fingerprint()) & 0x7FFFFFFF
        with self.watch("checking that all ranks loaded the same model"), self._clear_errors():
            v = mx.array([mine, -mine], dtype=mx.int32)
            hi = mx.distributed.all_max(v, group=self.group, stream=self.stream)
            mx.eval(hi)
        if int(hi[0]) != mine or int(hi[1]) != -mine:
            raise ExpertParallelError(
                f"rank {self.rank}: the ranks disagree on the model or the expert placement. Every rank must "
                "load the same model and the same placement log (copy both to every machine).")

    def describe(self) -> str:
        """One line per rank: experts held, their bytes, the share of the logged load."""
        p = self.placement
        lines = [f"expert-parallel: {self.size} ranks, placement by {p.method}"]
        for r in range(self.size):
            n = sum(len(owned[r]) for owned in p.layers.values())
            total = sum(len(x) for owned in p.layers.values() for x in owned)
            line = f"  rank {r}: {n} of {total} experts, {p.rank_bytes(r) / 2**20:.1f} MiB"
            share = p.load_share(r)
            if share is not None:
                line += f", {100 * share:.1f}% of the logged expert load"
            lines.append(line)
        return "\n".join(lines)


def _is_peer_error(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("[ring]", "[nccl]", "[jaccl]", "[mpi]", "peer", "connection"))


def shard_experts(
    model: nn.Module, group, placement: Placement, timeout: float = DEFAULT_TIMEOUT, check: bool = True
) -> ExpertParallel:
    """Keep only this rank's experts in every MoE layer and route the layers' expert compute
    through `ExpertParallelBackend`.  Sets and returns `model.expert_parallel`.

    Load the model with `lazy=True` first: each projection's slice is evaluated on its own,
    so the full expert stacks are never all in memory.  check=True (collective) makes all
    ranks confirm that they loaded the same model and placement."""
    if getattr(model, "expert_parallel", None) is not None:
        raise ExpertParallelError("this model is already sharded for expert parallelism")
    if placement.size != group.size():
        raise ExpertParallelError(f"placement is for {placement.size} ranks but the group has {group.size()}")
    ep = ExpertParallel(group, placement, timeout)
    rank = group.rank()
    for layer in moe_layers(model):
        E, n_id = layer.num_experts, layer.n_identity
        if layer.layer_idx not in placement.layers:
            raise ExpertParallelError(f"placement has no entry for MoE layer {layer.layer_idx}")
        local = placement.local(layer.layer_idx, rank)
        if not local:
            raise ExpertParallelError(f"rank {rank} holds no expert of layer {layer.layer_idx}")
        experts = layer.switch_mlp
        if experts.num_experts != E:
            raise ExpertParallelError(f"layer {layer.layer_idx}: experts already sliced ({experts.num_experts} of {E})")
        index = mx.array(local, dtype=mx.int32)
        for name in ("gate_proj", "up_proj", "down_proj"):
            _slice_experts(getattr(experts, name), index, E)
        table = np.full(E + n_id, -1, dtype=np.int32)
        table[np.array(local)] = np.arange(len(local), dtype=np.int32)
        if rank == 0 and n_id:
            table[E:] = len(local) + np.arange(n_id, dtype=np.int32)
        layer.backend = ExpertParallelBackend(layer.backend, ep, mx.array(table))
    model.expert_parallel = ep
    gc.collect()
    mx.clear_cache()
    if check:
        ep.check_agreement(model)
    return ep


def load(
    path_or_repo: str,
    group=None,
    placement_log=None,
    kernels: str = "auto",
    timeout: float = DEFAULT_TIMEOUT,
    tokenizer: bool = True,
    backend: str = "any",
):
    """Load a model for expert-parallel inference on this rank: (model, tokenizer).

    group: an `mx.distributed` group (default: `init_group(backend, timeout)`).
    placement_log: an `--expert-log` CSV of this model, to spread hot experts across ranks.
    Run the same call on every rank (e.g. a script started by `mlx.launch -n N`)."""
    from .loader import load as load_model

    if group is None:
        group = init_group(backend, timeout)
    model, tok = load_model(path_or_repo, kernels=kernels, lazy=True, tokenizer=tokenizer)
    placement = plan_placement(model, group.size(), placement_log)
    shard_experts(model, group, placement, timeout)
    mx.eval(model.parameters())  # the replicated rest
    return model, tok
