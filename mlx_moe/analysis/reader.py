"""Streaming reader for `--expert-log` CSV files, with validation and line numbers.

The format is fixed in notes/EXPERT_LOG_FORMAT.md: a header row

    token_id,layer_id,expert_0..expert_{k-1}[,weight_0..weight_{k-1}][,phase][,sequence_id]

(optionally starting with '#'), then one row per (token, MoE layer).  An optional
sidecar `FILE.csv.json` carries n_experts, n_zero_experts, top_k and expert_bytes.

Rows are parsed in chunks by numpy's C parser (`np.loadtxt`); a chunk that fails
there, or fails validation, is re-read line by line so that the error names the
exact line (or, with `skip_bad`, so that only the bad lines are dropped).

Memory: rows are kept per layer, as compact numpy arrays:
expert ids int16 (int32 when ids exceed 32767), token_id and sequence_id int32,
phase int8, i.e. 2k + 9 bytes per row (25 bytes at k = 8: 10^7 rows = 250 MB).
Weights are validated but not kept (no statistic here needs them).  Apart from
that, reading holds one chunk of text at a time.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

PHASES = ("prefill", "decode")
NO_PHASE = -1  # phase code for logs without a phase column
CHUNK_LINES = 1 << 16


class LogFormatError(ValueError):
    """A log file that cannot be read as the expert-log format."""


@dataclass
class LogSchema:
    """Column layout of one log file, from its header."""

    columns: List[str]
    k: int
    token: int
    layer: int
    experts: List[int]
    weights: Optional[List[int]]
    phase: Optional[int]
    sequence: Optional[int]

    @property
    def int_columns(self) -> List[int]:
        cols = [self.token, self.layer] + self.experts
        if self.sequence is not None:
            cols.append(self.sequence)
        return cols


def parse_header(line: str, path: str = "<log>") -> LogSchema:
    """Parse a header row (a leading '#' is allowed) into a `LogSchema`."""
    text = line.strip()
    if text.startswith("#"):
        text = text[1:]
    columns = [c.strip() for c in text.split(",")]
    where = {name: i for i, name in enumerate(columns)}
    if len(where) != len(columns):
        raise LogFormatError(f"{path} line 1: the header repeats a column name: {line.strip()!r}")
    missing = [c for c in ("token_id", "layer_id", "expert_0") if c not in where]
    if missing:
        raise LogFormatError(
            f"{path} line 1: the header lacks {', '.join(missing)}; expected "
            "'token_id,layer_id,expert_0,...,expert_{k-1}[,weight_0,...][,phase][,sequence_id]', "
            f"found {line.strip()[:200]!r}")
    k = 0
    while f"expert_{k}" in where:
        k += 1
    experts = [where[f"expert_{i}"] for i in range(k)]
    weights = None
    if "weight_0" in where:
        nw = 0
        while f"weight_{nw}" in where:
            nw += 1
        if nw != k:
            raise LogFormatError(f"{path} line 1: the header has {k} expert columns but {nw} weight "
                                 "columns; they must match (one weight per selected expert)")
        weights = [where[f"weight_{i}"] for i in range(k)]
    known = {"token_id", "layer_id", "phase", "sequence_id"}
    known |= {f"expert_{i}" for i in range(k)} | {f"weight_{i}" for i in range(k)}
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise LogFormatError(f"{path} line 1: unknown header columns {unknown}; the expert-log format "
                             "has token_id, layer_id, expert_i, weight_i, phase, sequence_id only")
    return LogSchema(columns, k, where["token_id"], where["layer_id"], experts, weights,
                     where.get("phase"), where.get("sequence_id"))


def read_sidecar(path: str) -> Optional[dict]:
    """The `FILE.csv.json` metadata written next to a log, or None if there is none."""
    side = path + ".json"
    if not os.path.exists(side):
        return None
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LogFormatError(f"{side}: unreadable sidecar metadata ({e}); fix or delete it") from e
    if not isinstance(meta, dict):
        raise LogFormatError(f"{side}: sidecar metadata must be a JSON object")
    return meta


@dataclass
class LayerRows:
    """All rows of one MoE layer, in file order until `finish()` sorts them."""

    experts: np.ndarray  # [n, k] int16/int32
    token: np.ndarray  # [n] int32
    sequence: np.ndarray  # [n] int32 (renumbered to be unique across files)
    phase: np.ndarray  # [n] int8: 0 prefill, 1 decode, -1 unknown


@dataclass
class ExpertLog:
    """The rows of one or more log files, grouped per layer and sorted by (sequence, token)."""

    paths: List[str]
    k: int
    layers: Dict[int, LayerRows]
    rows: int
    skipped: int
    skipped_examples: List[str]
    has_phase: bool
    has_sequence: bool
    has_weights: bool
    max_id: int
    sidecars: List[Optional[dict]]
    duplicates: int = 0
    warnings: List[str] = field(default_factory=list)


class _Accumulator:
    """Collects parsed chunks per layer so that the final arrays are built once."""

    def __init__(self):
        self.parts: Dict[int, List[tuple]] = {}

    def add(self, layer, token, experts, sequence, phase):
        order = np.argsort(layer, kind="stable")
        layer = layer[order]
        cuts = np.flatnonzero(np.diff(layer)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(layer)]])
        for a, b in zip(starts, ends):
            sel = order[a:b]
            self.parts.setdefault(int(layer[a]), []).append(
                (experts[sel], token[sel], sequence[sel], phase[sel]))

    def finish(self, id_dtype) -> Dict[int, LayerRows]:
        layers = {}
        for lid in sorted(self.parts):
            parts = self.parts.pop(lid)  # release the chunks as each layer is assembled
            layers[lid] = LayerRows(
                np.concatenate([p[0] for p in parts]).astype(id_dtype, copy=False),
                np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]),
                np.concatenate([p[3] for p in parts]))
        return layers


def _bad(path, lineno, msg):
    return f"{path} line {lineno}: {msg}"


class _FileReader:
    """Parses one file; `id_limit` is the first invalid expert id (None: unknown)."""

    def __init__(self, path: str, schema: LogSchema, id_limit: Optional[int], skip_bad: bool):
        self.path = path
        self.s = schema
        self.id_limit = id_limit
        self.skip_bad = skip_bad
        self.skipped = 0
        self.examples: List[str] = []
        ncol = len(schema.columns)
        self.ncol = ncol
        self.float_cols = np.array(schema.weights or [], dtype=np.int64)
        self.int_cols = np.array(schema.int_columns, dtype=np.int64)

    # -- fast path -----------------------------------------------------------------
    def _fast(self, lines: List[str]) -> Optional[np.ndarray]:
        """Parse a chunk with numpy; None if anything is off (then `_slow` finds the line)."""
        s = self.s
        conv = {}
        if s.phase is not None:
            conv[s.phase] = lambda v: PHASES.index(v) if v in PHASES else math.nan
        n_nonblank = sum(1 for ln in lines if ln.strip())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "input contained no data"
                arr = np.loadtxt(lines, delimiter=",", dtype=np.float64, converters=conv or None,
                                 ndmin=2, comments=None)
        except (ValueError, TypeError):
            return None
        if arr.shape != (n_nonblank, self.ncol):
            return None
        ints = arr[:, self.int_cols]
        if not np.all(np.isfinite(ints)) or np.any(ints != np.floor(ints)) or np.any(ints < 0):
            return None
        if s.phase is not None and not np.all(np.isfinite(arr[:, s.phase])):
            return None
        if len(self.float_cols) and not np.all(np.isfinite(arr[:, self.float_cols])):
            return None
        ex = arr[:, s.experts]
        if ex.max(initial=0) >= 2**31 or ints.max(initial=0) >= 2**31:
            return None
        if self.id_limit is not None and ex.max(initial=0) >= self.id_limit:
            return None
        if s.k > 1:
            srt = np.sort(ex, axis=1)
            if np.any(srt[:, 1:] == srt[:, :-1]):
                return None
        return arr

    # -- slow path -----------------------------------------------------------------
    def _row(self, line: str) -> np.ndarray:
        """One row -> float64 vector, or ValueError naming the problem."""
        s = self.s
        fields = [f.strip() for f in line.rstrip("\r\n").split(",")]
        if len(fields) != self.ncol:
            raise ValueError(f"expected {self.ncol} columns ({','.join(s.columns)}), found {len(fields)}")
        out = np.empty(self.ncol)
        for i, v in enumerate(fields):
            name = s.columns[i]
            if i == s.phase:
                if v not in PHASES:
                    raise ValueError(f"phase must be 'prefill' or 'decode', found {v!r}")
                out[i] = PHASES.index(v)
            elif s.weights is not None and i in s.weights:
                try:
                    out[i] = float(v)
                except ValueError:
                    raise ValueError(f"{name} must be a number, found {v!r}") from None
                if not math.isfinite(out[i]):
                    raise ValueError(f"{name} must be finite, found {v!r}")
            else:
                try:
                    iv = int(v)
                except ValueError:
                    raise ValueError(f"{name} must be a non-negative integer, found {v!r}") from None
                if iv < 0 or iv >= 2**31:
                    raise ValueError(f"{name} must be a non-negative integer below 2^31, found {v!r}")
                out[i] = iv
        ids = out[s.experts]
        if self.id_limit is not None and ids.max() >= self.id_limit:
            raise ValueError(f"expert id {int(ids.max())} is out of range: the model has "
                             f"{self.id_limit} expert ids (pass the right --n-experts / --model)")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError(f"an expert id repeats within the row ({[int(x) for x in ids]}); "
                             "top-k selections are distinct")
        return out

    def _slow(self, lines: List[str], first_lineno: int) -> np.ndarray:
        rows = []
        for j, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(self._row(line))
            except ValueError as e:
                msg = _bad(self.path, first_lineno + j, str(e))
                if not self.skip_bad:
                    raise LogFormatError(msg + " (pass --skip-bad / skip_bad=True to skip bad rows)") from None
                self.skipped += 1
                if len(self.examples) < 5:
                    self.examples.append(msg)
        return np.array(rows, dtype=np.float64).reshape(-1, self.ncol)

    def parse(self, lines: List[str], first_lineno: int) -> np.ndarray:
        arr = self._fast(lines)
        if arr is None:
            arr = self._slow(lines, first_lineno)
        return arr


def _iter_chunks(f, first_lineno: int, chunk_lines: int):
    lines: List[str] = []
    start = first_lineno
    for line in f:
        lines.append(line)
        if len(lines) == chunk_lines:
            yield lines, start
            start += len(lines)
            lines = []
    if lines:
        yield lines, start


def read_logs(paths: Sequence[str], id_limit: Optional[int] = None, skip_bad: bool = False,
              chunk_lines: int = CHUNK_LINES) -> ExpertLog:
    """Read one or more expert logs, streamed in chunks.

    id_limit: expert ids must be below it (n_experts + n_zero_experts) when known.
    Sequences are renumbered so that the sequences of different files stay apart;
    rows of each layer end up sorted by (sequence, token_id) (a stable sort, so rows
    repeating a (sequence, layer, token) stay in file order and are counted as duplicates).
    """
    if not paths:
        raise LogFormatError("no log files given")
    acc = _Accumulator()
    k = None
    rows = skipped = 0
    examples: List[str] = []
    has_phase = has_seq = has_w = True
    max_id = -1
    seq_offset = 0
    sidecars = []
    for path in paths:
        sidecars.append(read_sidecar(path))
        try:
            f = open(path, encoding="utf-8", newline="")
        except OSError as e:
            raise LogFormatError(f"{path}: cannot open ({e})") from e
        with f:
            header = None
            lineno = 0
            for line in f:
                lineno += 1
                if line.strip():
                    header = line
                    break
            if header is None:
                raise LogFormatError(f"{path}: empty file (no header row)")
            schema = parse_header(header, path)
            if k is None:
                k = schema.k
            elif schema.k != k:
                raise LogFormatError(f"{path}: top-k {schema.k} differs from {k} in {paths[0]}; "
                                     "analyze logs of one model together")
            has_phase &= schema.phase is not None
            has_seq &= schema.sequence is not None
            has_w &= schema.weights is not None
            reader = _FileReader(path, schema, id_limit, skip_bad)
            file_max_seq = -1
            for lines, start in _iter_chunks(f, lineno + 1, chunk_lines):
                arr = reader.parse(lines, start)
                if not len(arr):
                    continue
                ex = arr[:, schema.experts].astype(np.int32)
                max_id = max(max_id, int(ex.max()))
                seq = (arr[:, schema.sequence].astype(np.int64) if schema.sequence is not None
                       else np.zeros(len(arr), np.int64))
                file_max_seq = max(file_max_seq, int(seq.max()))
                phase = (arr[:, schema.phase].astype(np.int8) if schema.phase is not None
                         else np.full(len(arr), NO_PHASE, np.int8))
                acc.add(arr[:, schema.layer].astype(np.int32), arr[:, schema.token].astype(np.int32),
                        ex, (seq + seq_offset).astype(np.int32), phase)
                rows += len(arr)
            seq_offset += file_max_seq + 1
            skipped += reader.skipped
            examples += reader.examples
    if rows == 0:
        raise LogFormatError(f"no valid rows in {', '.join(paths)}")
    id_dtype = np.int16 if max_id < 2**15 else np.int32
    layers = acc.finish(id_dtype)
    dups = 0
    for lr in layers.values():
        key_sorted = np.all((np.diff(lr.sequence) > 0) |
                            ((np.diff(lr.sequence) == 0) & (np.diff(lr.token) >= 0)))
        if not key_sorted:
            order = np.lexsort((lr.token, lr.sequence))
            lr.experts, lr.token = lr.experts[order], lr.token[order]
            lr.sequence, lr.phase = lr.sequence[order], lr.phase[order]
        dups += int(np.sum((np.diff(lr.sequence) == 0) & (np.diff(lr.token) == 0)))
    log = ExpertLog(list(paths), k, layers, rows, skipped, examples[:5], has_phase, has_seq, has_w,
                    max_id, sidecars, dups)
    if dups:
        log.warnings.append(f"{dups} rows repeat a (sequence, layer, token_id) already seen; "
                            "they are kept as separate tokens")
    return log
