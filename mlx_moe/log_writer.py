"""The expert log's writer process: routing records in on stdin, CSV rows out to disk.

Why a process and not a thread: decode on MLX's CUDA backend is bound by the
generating thread (building ~1,500 graph nodes per token), and a writer thread
in the same interpreter has to take the GIL from it for every conversion,
sort and `%` format (measured on the H100: 7-8% of decode speed).  Here the
generating thread only joins the step's already evaluated (ids, weights)
buffers and writes them to a pipe; ordering by weight, formatting and the
disk happen in this process, on another core.

Started by `mlx_moe.expert_log.ExpertLog` as `python -m mlx_moe.log_writer
PATH [--weights]` after it wrote the header row.  Imports numpy only.

Input, repeated until end of file: one frame per forward pass,
    FRAME header (magic, T tokens, L MoE layers, k, phase, sequence_id)
    positions int64 [T] | layer ids int32 [L] | expert ids int32 [L, T, k]
    | routing weights float32 [L, T, k]
A frame cut short (the generating process died mid-write) is dropped.

Output: the rows, appended to PATH, each write ending on a row boundary; on
a write error (disk full, file too large) the file is truncated back to the
last complete row and the process stops.  On exit one status line goes to
stdout: `ok ROWS` or `error ROWS MESSAGE`.  SIGINT is ignored (it is also
started in its own session): Ctrl-C stops generation in the parent, which
then closes the pipe, and this process writes every frame it received.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import struct
import sys
import threading

import numpy as np

MAGIC = b"MXEL"
FRAME = struct.Struct("<4sIIIIq")  # magic, T, L, k, phase, sequence_id
PHASES = ("prefill", "decode")


def pack_frame(positions: np.ndarray, layers, ids: bytes, weights: bytes, k: int, phase: str,
               sequence_id: int) -> list:
    """One forward pass as the buffers to write (ids/weights: [L, T, k] int32/float32 bytes)."""
    T, L = len(positions), len(layers)
    head = FRAME.pack(MAGIC, T, L, k, PHASES.index(phase), sequence_id)
    return [head, np.ascontiguousarray(positions, np.int64).tobytes(), np.asarray(layers, np.int32).tobytes(),
            ids, weights]


def by_weight(ids: np.ndarray, w: np.ndarray):
    """ids and weights [..., k] reordered by descending weight (stable: ties keep slot order)."""
    k = ids.shape[-1]
    n = ids.size // k
    # gather through flat indices: 3x faster than take_along_axis
    flat = (np.argsort(-w.reshape(n, k), axis=-1, kind="stable") + np.arange(0, n * k, k)[:, None]).ravel()
    return ids.ravel()[flat].reshape(ids.shape), w.ravel()[flat].reshape(w.shape)


def format_rows(positions, layers, ids: np.ndarray, w: np.ndarray, phase: str, sequence_id: int,
                weights: bool) -> str:
    """The CSV rows of one forward pass ([L, T, k] ids and weights, already ordered):
    token-major, then layer.  One `%` over the whole chunk, ints kept ints (the fast
    case of %d), rather than per-value Python formatting."""
    L, T, k = ids.shape
    if not L * T:
        return ""
    # With weights the table is float64, which holds every id and position exactly.
    table = np.empty((T * L, 2 + k + (k if weights else 0)), dtype=np.float64 if weights else np.int64)
    table[:, 0] = np.repeat(np.asarray(positions, np.int64), L)
    table[:, 1] = np.tile(np.asarray(layers, dtype=np.int64), T)
    table[:, 2:2 + k] = ids.transpose(1, 0, 2).reshape(T * L, k)
    row = "%d,%d" + ",%d" * k
    if weights:
        table[:, 2 + k:] = w.transpose(1, 0, 2).reshape(T * L, k)
        row += ",%.6g" * k
    row += f",{phase},{sequence_id}\n"
    return (row * (T * L)) % tuple(table.ravel().tolist())


def read_frames(stream, out: "queue.Queue") -> None:
    """Reader thread: whole frames from `stream` into `out`, then None at end of input
    (or the exception that stopped it).

    Reading on its own thread keeps the pipe drained while the disk is slow, so
    the generating process never blocks on a full pipe."""
    end = None
    try:
        while True:
            head = stream.read(FRAME.size)
            if len(head) < FRAME.size:
                return
            magic, T, L, k, phase, seq = FRAME.unpack(head)
            if magic != MAGIC:
                raise ValueError("expert log stream out of step (bad frame header)")
            n = L * T * k * 4
            body = stream.read(T * 8 + L * 4 + 2 * n)
            if len(body) < T * 8 + L * 4 + 2 * n:
                return  # cut short: the generating process died mid-frame
            out.put((T, L, k, PHASES[phase], seq, body))
    except BaseException as e:
        end = e
    finally:
        out.put(end)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run(path: str, weights: bool, stream, status) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    frames: "queue.Queue" = queue.Queue()
    threading.Thread(target=read_frames, args=(stream, frames), daemon=True).start()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    good = os.fstat(fd).st_size  # the header row is there already
    rows = 0
    try:
        while True:
            frame = frames.get()
            if frame is None:
                break
            if isinstance(frame, BaseException):
                raise frame
            T, L, k, phase, seq, body = frame
            n = L * T * k
            positions = np.frombuffer(body, np.int64, T)
            layers = np.frombuffer(body, np.int32, L, T * 8)
            at = T * 8 + L * 4
            ids = np.frombuffer(body, np.int32, n, at).reshape(L, T, k)
            w = np.frombuffer(body, np.float32, n, at + n * 4).reshape(L, T, k)
            ids, w = by_weight(ids, w)
            text = format_rows(positions, layers, ids, w, phase, seq, weights)
            try:
                write_all(fd, text.encode("ascii"))
            except OSError as e:  # disk full, file too large, I/O error
                os.ftruncate(fd, good)  # drop the partly written chunk: end on a complete row
                status.write(f"error {rows} {e.strerror or e}\n")
                return 1
            good += len(text)
            rows += L * T
    except BaseException as e:  # a bug or a corrupt stream: keep the complete rows, say why
        os.ftruncate(fd, good)
        status.write(f"error {rows} {type(e).__name__}: {e}\n")
        return 1
    finally:
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.close(fd)
    status.write(f"ok {rows}\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="expert log writer process (started by mlx_moe.expert_log)")
    p.add_argument("path")
    p.add_argument("--weights", action="store_true")
    args = p.parse_args(argv)
    code = run(args.path, args.weights, sys.stdin.buffer, sys.stdout)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
