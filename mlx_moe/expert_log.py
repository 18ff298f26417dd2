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

The writing happens in a separate process (mlx_moe/log_writer.py), so
decoding never waits on the disk and never shares the GIL with the
formatting: the routing hook hands over each forward pass's events, this
side joins their evaluated (ids, weights) buffers and writes them to a pipe,
the writer process orders them by weight, formats and appends whole rows.
Every write ends on a row boundary; on any write error (disk full, file too
large) the file is truncated back to the last complete row, logging stops
and the error is raised in the generating thread at its next token.  Ctrl-C
or an exception in generation closes the log after writing every forward
pass that completed; even if the generating process is killed, the writer
keeps every forward pass it received: the CSV never holds a partial line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from .hooks import HOOKS, RoutingEvent
from .log_writer import pack_frame


class _SigintGuard:
    """A SIGINT handler that acts as the one it replaces (normally: KeyboardInterrupt at
    once), except while `writing`: then the signal is only noted, and the writer raises
    KeyboardInterrupt once its frame is out (a second Ctrl-C meanwhile is raised at once:
    the writer drops a torn frame).  Installed once per log (signal.signal took ~10 us
    in an ad-hoc timing on the developers' CPU: too much per frame); Python runs signal
    handlers in the main thread only, so from another thread it installs nothing."""

    def __init__(self) -> None:
        self.writing = False
        self.noted = False
        self._previous = None
        self._installed = False

    def install(self) -> None:
        if not self._installed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def uninstall(self) -> None:
        # only if still the handler: one installed on top of it keeps delegating to it
        if self._installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) == self._handle:
                signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum, frame):
        if self.writing and not self.noted:  # a second Ctrl-C (a writer that hangs) goes through
            self.noted = True
            return None
        previous = self._previous
        if previous == signal.SIG_IGN:
            return None
        if callable(previous):
            return previous(signum, frame)
        raise KeyboardInterrupt


FORMAT = "mlx-moe-expert-log/1"


class ExpertLogError(RuntimeError):
    pass


def header(top_k: int, weights: bool) -> List[str]:
    cols = ["token_id", "layer_id"] + [f"expert_{i}" for i in range(top_k)]
    if weights:
        cols += [f"weight_{i}" for i in range(top_k)]
    return cols + ["phase", "sequence_id"]


def _writer_env() -> dict:
    """The writer runs `-m mlx_moe.log_writer`: make this package importable there
    even when it was put on sys.path by hand (a source checkout)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class ExpertLog:
    """An open expert log; attach it to generation with `attach()` / `detach()`."""

    def __init__(self, path, top_k: int, weights: bool = False, metadata: Optional[dict] = None):
        self.path = Path(path)
        self.top_k = top_k
        self.weights = weights
        self.rows_written = 0  # rows in the file: known once the log is closed
        self.error: Optional[str] = None
        self._next_sequence = 0
        self._sequence = 0
        self.check_writable(self.path)
        self.columns = header(top_k, weights)
        with open(self.path, "w", encoding="utf-8", newline="") as f:
            f.write(",".join(self.columns) + "\n")
        meta = {"format": FORMAT, "top_k": top_k, "columns": self.columns, **(metadata or {})}
        Path(str(self.path) + ".json").write_text(json.dumps(meta, indent=2))
        # Its own session: a terminal's Ctrl-C goes to the generating process only,
        # which then closes the pipe; the writer finishes what it received.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_moe.log_writer", str(self.path)] + (["--weights"] if weights else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_writer_env(),
            start_new_session=True)
        self._fd = self._proc.stdin.fileno()
        self._status_read = False
        self._sigint = _SigintGuard()  # a Ctrl-C never cuts a frame in two or sends it twice
        self._sigint.install()

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
        """Per forward pass, on the generating thread: join the buffers, write one frame.
        A writer that stopped (a write error) is noticed by the write (a broken pipe),
        not by polling its process every token."""
        if self.error is not None:
            self.raise_error()
        if self._proc.stdin is None or self._proc.stdin.closed:
            raise ExpertLogError(f"expert log {self.path} is closed; open a new ExpertLog")
        if not len(events):
            return
        ids, weights = events.arrays.buffers()
        layers = events.layers
        L, T = len(layers), len(events.positions)
        if len(ids) != L * T * self.top_k * 4:
            raise ExpertLogError(f"expert log {self.path}: a MoE layer selected {len(ids) // (4 * L * T)} "
                                 f"experts per token, the log was opened for top_k={self.top_k}")
        frame = b"".join(pack_frame(events.positions, layers, ids, weights, self.top_k,
                                    events.phase, events.sequence_id))
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        """Write one whole frame to the writer, exactly once.  Ctrl-C during the write is
        held back until the frame is out, then raised: the writer must never see half a
        frame followed by the next one, nor a frame twice (a KeyboardInterrupt raised
        just after os.write returned, before its count was taken, would make a retry
        write the same bytes again)."""
        view = memoryview(frame)
        guard = self._sigint
        guard.writing = True
        broken = False
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except BrokenPipeError:  # the writer stopped: a write error, said in its status
            broken = True
        finally:
            guard.writing = False
        if guard.noted:
            guard.noted = False
            raise KeyboardInterrupt
        if broken:
            self._proc.wait()
            self._read_status()
            self.raise_error()
            raise ExpertLogError(f"expert log {self.path}: the writer process stopped unexpectedly")

    def raise_error(self) -> None:
        if self.error is None and not self._status_read and self._proc.poll() is not None:
            self._read_status()  # the writer stopped (a write error) while generation went on
        if self.error is not None:
            raise ExpertLogError(
                f"expert log {self.path}: writing failed ({self.error}); logging stopped. "
                f"The file holds the {self.rows_written} complete rows written before it.")

    def _read_status(self) -> None:
        if self._status_read:
            return
        self._status_read = True
        out = self._proc.stdout.read().decode(errors="replace").strip().splitlines()
        err = self._proc.stderr.read().decode(errors="replace").strip()
        words = out[-1].split(" ", 2) if out else []
        if len(words) >= 2 and words[0] in ("ok", "error") and words[1].isdigit():
            self.rows_written = int(words[1])
            if words[0] == "error":
                self.error = words[2] if len(words) > 2 else "unknown error"
        else:  # it died without a word (killed, or failed to start)
            self.error = f"the writer process exited with code {self._proc.returncode}" + (
                f": {err.splitlines()[-1]}" if err else "")

    def close(self) -> None:
        """Write everything handed over so far, then close the file. Idempotent;
        an interrupted close may be called again."""
        self._sigint.uninstall()
        if not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()  # end of input: the writer writes what it has and exits
            except BrokenPipeError:
                pass
        if not self._status_read:
            self._proc.wait()
            self._read_status()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close()
        if exc_type is None:
            self.raise_error()
