"""`analyze(paths)`: expert logs in, a `Report` out (statistics, cache replay, recommendations)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from . import stats
from .cache import POLICIES, lru_hist, stack_hists
from .modelinfo import model_info
from .reader import read_logs, read_sidecar
from .report import LayerStats, Report

KNEE_POINTS = 5.0
COVERAGE = (0.5, 0.9, 0.99)


def knee_capacity(capacities: Sequence[int], hits: Sequence[float], points: float = KNEE_POINTS) -> Optional[int]:
    """The recommended cache size: the smallest capacity whose hit rate is within `points`
    percentage points of the hit rate with every expert resident (the last capacity, E)."""
    hits = np.asarray(hits, dtype=float)
    if not len(hits) or np.isnan(hits[-1]):
        return None
    ok = np.flatnonzero(hits >= hits[-1] - points / 100.0 - 1e-12)
    return int(capacities[ok[0]])


def _resolve_meta(paths, n_experts, model, expert_bytes, warnings_):
    """n_experts / n_zero_experts / top_k / expert_bytes from, in order: arguments, the first
    log's sidecar, the model config.  Returns a dict with a 'source' for each."""
    side = read_sidecar(paths[0]) or {}
    info = model_info(model) if model else None
    meta = {"n_experts": None, "n_zero_experts": None, "top_k": None, "expert_bytes": None,
            "n_experts_source": None, "expert_bytes_source": None, "model": side.get("model") or model,
            "model_type": side.get("model_type") or (info.model_type if info else None)}
    if n_experts is not None:
        meta["n_experts"], meta["n_experts_source"] = int(n_experts), "--n-experts"
    elif side.get("n_experts") is not None:
        meta["n_experts"], meta["n_experts_source"] = int(side["n_experts"]), f"{paths[0]}.json"
    elif info and info.n_experts:
        meta["n_experts"], meta["n_experts_source"] = info.n_experts, f"--model {model}"
    if side.get("n_zero_experts") is not None:
        meta["n_zero_experts"] = int(side["n_zero_experts"])
    elif info is not None:
        meta["n_zero_experts"] = info.n_zero_experts
    meta["top_k"] = side.get("top_k") or (info.top_k if info else None)
    if expert_bytes is not None:
        meta["expert_bytes"], meta["expert_bytes_source"] = int(expert_bytes), "--expert-bytes"
    elif side.get("expert_bytes"):
        meta["expert_bytes"], meta["expert_bytes_source"] = int(side["expert_bytes"]), f"{paths[0]}.json"
    elif info and info.expert_bytes:
        meta["expert_bytes"], meta["expert_bytes_source"] = info.expert_bytes, info.bytes_rule
    for p in paths[1:]:
        other = read_sidecar(p) or {}
        for key in ("n_experts", "n_zero_experts", "top_k"):
            if key in other and key in side and other[key] != side[key]:
                raise ValueError(f"{p}.json says {key} = {other[key]} but {paths[0]}.json says "
                                 f"{side[key]}: analyze logs of one model together")
    return meta


def analyze(paths: Sequence[str], n_experts: Optional[int] = None, model: Optional[str] = None,
            expert_bytes: Optional[int] = None, window: int = 16, skip_bad: bool = False,
            policies: Sequence[str] = POLICIES, knee_points: float = KNEE_POINTS,
            seed: int = 0) -> Report:
    """Analyze one or more `--expert-log` CSV files.

    n_experts: real (FFN) experts per layer; by default from the log's sidecar JSON, then
      `model` (a model directory or config.json), else inferred as max id + 1 (with a warning).
    expert_bytes: bytes of one expert, to turn recommended cache sizes into memory.
    window: w for the window statistics (reuse within the last w tokens, working sets).
    skip_bad: skip malformed rows (counted in the report) instead of raising on the first.
    policies: cache policies to replay (LRU is fast; LFU and Belady cost one stack pass each).
    knee_points: the recommended size is the smallest capacity whose LRU hit rate is within
      this many percentage points of the all-resident hit rate.
    seed: seed of the shuffled-token null.
    """
    paths = [str(p) for p in ([paths] if isinstance(paths, str) else paths)]
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown cache policy {p!r}; choose from {', '.join(POLICIES)}")
    warnings_: List[str] = []
    meta = _resolve_meta(paths, n_experts, model, expert_bytes, warnings_)
    E, Z = meta["n_experts"], meta["n_zero_experts"]
    id_limit = E + Z if (E is not None and Z is not None) else None
    log = read_logs(paths, id_limit=id_limit, skip_bad=skip_bad)
    warnings_ += log.warnings
    k = log.k
    if E is None:
        E = log.max_id + 1
        Z = 0
        meta["n_experts_source"] = "inferred as max id + 1"
        warnings_.append(f"n_experts not given (no sidecar, --n-experts or --model): inferred "
                         f"E = {E} from the largest id; experts never selected are then missing, "
                         "so pass --n-experts for exact null models and capacities")
    elif Z is None:
        Z = max(0, log.max_id + 1 - E)
        if Z:
            warnings_.append(f"ids up to {log.max_id} exceed n_experts = {E}: treated as "
                             f"{Z} zero-computation experts (pass the right --n-experts if the "
                             "model has none)")
    if meta["top_k"] is not None and int(meta["top_k"]) != k:
        warnings_.append(f"the log has {k} expert columns but the metadata says top_k = {meta['top_k']}")
    if E < k:
        raise ValueError(f"n_experts = {E} is smaller than top-k = {k}; pass the right --n-experts")
    meta.update(n_experts=E, n_zero_experts=Z, top_k=k)
    n_ids = E + Z
    caps = np.arange(k, E + 1)

    lids = sorted(log.layers)
    layer_list = [log.layers[l] for l in lids]
    hists: Dict[str, List[np.ndarray]] = {}
    if "lru" in policies:
        hists["lru"] = [lru_hist(lr.experts, lr.phase, E) for lr in layer_list]
    for pol in policies:
        if pol != "lru":
            hists[pol] = stack_hists([(lr.experts, lr.phase) for lr in layer_list], E, pol)

    layers: List[LayerStats] = []
    for i, (lid, lr) in enumerate(zip(lids, layer_list)):
        ex, seq = lr.experts, lr.sequence
        rank = stats.sequence_rank(seq)
        counts = stats.frequency(ex, E)
        gaps = stats.reuse_gaps(ex, seq, rank)
        sgaps = stats.reuse_gaps(stats.shuffle_rows(ex, seed + lid), seq, rank)
        decode = lr.phase == 1 if log.has_phase else None
        pairs = int((rank >= 1).sum())
        ws = stats.working_sets(ex, seq, rank, E, window)
        ls = LayerStats(
            layer=lid, tokens=len(ex), selections=int(counts.sum()),
            zero_selections=int((ex >= E).sum()), counts=counts,
            entropy=stats.normalized_entropy(counts),
            coverage=stats.coverage(counts, COVERAGE), top=stats.top_experts(counts),
            pairs=pairs,
            overlap=stats.window_reuse(gaps, rank, 1),
            overlap_shuffled=stats.window_reuse(sgaps, rank, 1),
            overlap_decode=stats.window_reuse(gaps, rank, 1, decode) if decode is not None else None,
            reuse=stats.window_reuse(gaps, rank, window),
            reuse_shuffled=stats.window_reuse(sgaps, rank, window),
            overlap_hits=int((gaps[rank >= 1] == 1).sum()),
            overlap_hits_shuffled=int((sgaps[rank >= 1] == 1).sum()),
            working_sets=ws, real_per_token=stats.real_experts_per_token(ex, E),
            hists={p: h[i] for p, h in hists.items()})
        layers.append(ls)
    return Report.build(meta, log, layers, caps, window, knee_points, policies, warnings_, n_ids, seed)
