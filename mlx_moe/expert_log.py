"""`--expert-log FILE.csv`: every routing decision, streamed to disk.

Format (also in the README): a header row
    token_id,layer_id,expert_0,...,expert_{k-1}[,weight_0,...,weight_{k-1}],phase,sequence_id
then one row per (token, MoE layer), token-major: for each token, its MoE
layers in increasing layer_id.  token_id is the absolute position in the
sequence; expert ids are ordered by descending routing weight; identity
(zero-computation) experts keep their ids (>= n_experts); phase is
"prefill" or "decode"; sequence_id counts the sequences written into the
file (a generate call continuing a KV cache keeps its sequence).  A sidecar
FILE.csv.json holds the model's metadata (n_experts, n_zero_experts, top_k,
MoE layers, bytes per expert) for the analyzer.

The writing happens on a background thread, so decoding never waits on the
disk: the routing hook hands over each forward pass's events, the thread
formats and appends whole rows.  Every write ends on a row boundary and the
offset after it is remembered; on any write error (disk full, file too
large) the file is truncated back to that offset, logging stops and the
error is raised in the generating thread at its next token.  Ctrl-C or an
exception in generation closes the log after writing every forward pass
that completed: the CSV never holds a partial line.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .hooks import HOOKS, ForwardEvents, RoutingEvent

FORMAT = "mlx-moe-expert-log/1"


class ExpertLogError(RuntimeError):
    pass


def header(top_k: int, weights: bool) -> List[str]:
    cols = ["token_id", "layer_id"] + [f"expert_{i}" for i in range(top_k)]
    if weights:
        cols += [f"weight_{i}" for i in range(top_k)]
    return cols + ["phase", "sequence_id"]


def format_rows(events: Sequence[RoutingEvent], weights: bool) -> str:
    """The CSV rows of one forward pass: token-major, then layer.

    This runs for every token on the writer thread, but holding the GIL the
    generating thread needs, so it is one `%` over the whole chunk (ints stay
    ints: the fast case of %d) rather than per-value Python formatting."""
    if not len(events):
        return ""
    ids, w = RoutingEvent.stacked(events)  # [L, T, k]
    L, T, k = ids.shape
    if isinstance(events, ForwardEvents):
        layers, positions, phase, seq = events.layers, events.positions, events.phase, events.sequence_id
    else:
        first = events[0]
        layers, positions, phase, seq = [ev.layer for ev in events], first.positions, first.phase, first.sequence_id
    # With weights the table is float64, which holds every id and position exactly.
    table = np.empty((T * L, 2 + k + (k if weights else 0)), dtype=np.float64 if weights else np.int64)
    table[:, 0] = np.repeat(positions, L)
    table[:, 1] = np.tile(np.asarray(layers, dtype=np.int64), T)
    table[:, 2:2 + k] = ids.transpose(1, 0, 2).reshape(T * L, k)
    row = "%d,%d" + ",%d" * k
    if weights:
        table[:, 2 + k:] = w.transpose(1, 0, 2).reshape(T * L, k)
        row += ",%.6g" * k
    row += f",{phase},{seq}\n"
    return (row * (T * L)) % tuple(table.ravel().tolist())


class ExpertLog:
    """An open expert log; attach it to generation with `attach()` / `detach()`."""

    def __init__(self, path, top_k: int, weights: bool = False, metadata: Optional[dict] = None):
        self.path = Path(path)
        self.top_k = top_k
        self.weights = weights
        self.rows_written = 0
        self.error: Optional[BaseException] = None
        self._next_sequence = 0
        self._sequence = 0
        self._queue: "queue.Queue" = queue.Queue()
        self.check_writable(self.path)
        self._file = open(self.path, "w", encoding="utf-8", newline="")
        self.columns = header(top_k, weights)
        self._write_chunk(",".join(self.columns) + "\n", 0)
        self._good_offset = self._file.tell()
        meta = {"format": FORMAT, "top_k": top_k, "columns": self.columns, **(metadata or {})}
        Path(str(self.path) + ".json").write_text(json.dumps(meta, indent=2))
        self._thread = threading.Thread(target=self._run, name="mlx-moe-expert-log", daemon=True)
        self._thread.start()

    @classmethod
    def for_model(cls, path, model, weights: bool = False, model_name: Optional[str] = None) -> "ExpertLog":
        from .moe import moe_layers

        layers = moe_layers(model)
        if not layers:
            raise ExpertLogError("this model has no MoE layers to log")
        first = layers[0]
        meta = {
            "model": model_name,
            "model_type": getattr(getattr(model, "family", None), "model_type", None),
            "n_experts": first.num_experts,
            "n_zero_experts": first.n_identity,
            "moe_layers": [l.layer_idx for l in layers],
            "expert_bytes": first.switch_mlp.nbytes_per_expert(),
        }
        return cls(path, first.top_k, weights=weights, metadata=meta)

    @staticmethod
    def check_writable(path) -> None:
        """Fail early (before a model loads) when `path` cannot be written."""
        path = Path(path)
        if path.is_dir():
            raise ExpertLogError(f"expert log {path} is a directory; give a file name such as {path / 'experts.csv'}")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.exists():
            raise ExpertLogError(f"cannot write expert log {path}: directory {parent} does not exist")
        existed = path.exists()
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            raise ExpertLogError(f"cannot write expert log {path}: {e.strerror or e}") from e
        if not existed:
            path.unlink()

    # -- generation side -------------------------------------------------------------------

    def attach(self, new_sequence: bool = True) -> int:
        """Start receiving routing events; a new sequence gets the next sequence_id."""
        self.raise_error()
        if new_sequence:
            self._sequence = self._next_sequence
            self._next_sequence += 1
        HOOKS.sequence_id = self._sequence
        return HOOKS.add(self._on_forward, per_forward=True)

    def detach(self, handle: int) -> None:
        HOOKS.remove(handle)

    def _on_forward(self, events: Sequence[RoutingEvent]) -> None:
        self.raise_error()
        self._queue.put(events)

    def raise_error(self) -> None:
        if self.error is not None:
            raise ExpertLogError(
                f"expert log {self.path}: writing failed ({self.error}); logging stopped. "
                f"The file holds the {self.rows_written} complete rows written before it."
            ) from self.error

    def close(self) -> None:
        """Write everything handed over so far, then close the file. Idempotent."""
        if self._file is None:
            return
        self._queue.put(None)
        self._thread.join()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            pass
        self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close()
        if exc_type is None:
            self.raise_error()

    # -- writer thread ---------------------------------------------------------------------

    def _write_chunk(self, text: str, rows: int) -> None:
        self._file.write(text)
        self._file.flush()
        self.rows_written += rows

    def _run(self) -> None:
        while True:
            events = self._queue.get()
            if events is None:
                return
            if self.error is not None:
                continue
            try:
                text = format_rows(events, self.weights)
                rows = len(events) * len(events[0].positions) if len(events) else 0
                self._write_chunk(text, rows)
                self._good_offset = self._file.tell()
            except BaseException as e:  # disk full, file too large, I/O error
                self.error = e
                self._truncate_to_good()

    def _truncate_to_good(self) -> None:
        """Drop a partly written chunk: the file ends on the last complete row."""
        try:
            self._file = _reopen_truncated(self._file, self.path, self._good_offset)
        except OSError:
            pass


def _reopen_truncated(f, path: Path, offset: int):
    """Discard Python's buffer (it may hold a partial row), truncate, reopen for append."""
    try:
        f.close()
    except OSError:
        pass  # closing flushes the buffer: that may fail again on a full disk
    os.truncate(path, offset)
    return open(path, "a", encoding="utf-8", newline="")
