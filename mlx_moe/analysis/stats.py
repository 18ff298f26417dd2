"""Routing statistics of one layer: frequency, entropy, coverage, temporal overlap, working sets.

All functions take one layer's rows sorted by (sequence, token_id): `experts` [n, k] ids
(ids >= n_experts are zero-computation experts), `sequence` [n].  "Consecutive" means
adjacent rows of one sequence; nothing is computed across a sequence boundary.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

INF_GAP = np.iinfo(np.int64).max // 4


def frequency(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """Selections per real expert id: int64 [n_experts]."""
    ids = experts.ravel()
    return np.bincount(ids[ids < n_experts].astype(np.int64), minlength=n_experts)[:n_experts]


def normalized_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of the selection distribution divided by log(E): 1 = uniform, 0 = one expert."""
    total = counts.sum()
    if total == 0 or len(counts) < 2:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))


def coverage(counts: np.ndarray, fractions: Sequence[float] = (0.5, 0.9, 0.99)) -> Dict[float, int]:
    """Fewest experts whose selections add up to at least each fraction of all selections."""
    total = counts.sum()
    cum = np.cumsum(np.sort(counts)[::-1])
    out = {}
    for f in fractions:
        out[f] = int(np.searchsorted(cum, f * total - 1e-9 * max(total, 1)) + 1) if total else 0
    return out


def top_experts(counts: np.ndarray, n: int = 5) -> List[Tuple[int, float]]:
    """The n most selected experts with their share of the layer's selections."""
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")[:n]
    return [(int(e), float(counts[e] / total)) for e in order if counts[e] > 0]


def sequence_rank(sequence: np.ndarray) -> np.ndarray:
    """Index of each row within its sequence (rows sorted by sequence)."""
    n = len(sequence)
    start = np.concatenate([[True], sequence[1:] != sequence[:-1]]) if n else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    return np.arange(n) - first


def reuse_gaps(experts: np.ndarray, sequence: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For every (row, slot): rows since the same id was last selected in the same sequence.

    1 means the previous token also selected it; INF_GAP means not earlier in the sequence.
    Every window statistic follows from these gaps: a token's share of experts already used
    by the previous w tokens is the share of its slots with gap <= w.
    """
    n, k = experts.shape
    ids = experts.ravel().astype(np.int64)
    row = np.repeat(np.arange(n, dtype=np.int64), k)
    order = np.lexsort((row, ids))  # by id, then time
    sid, srow = ids[order], row[order]
    same = np.zeros(len(order), bool)
    same[1:] = (sid[1:] == sid[:-1]) & (sequence[srow[1:]] == sequence[srow[:-1]])
    gap_sorted = np.full(len(order), INF_GAP, np.int64)
    gap_sorted[1:] = np.where(same[1:], rank[srow[1:]] - rank[srow[:-1]], INF_GAP)
    gaps = np.empty(len(order), np.int64)
    gaps[order] = gap_sorted
    return gaps.reshape(n, k)


def window_reuse(gaps: np.ndarray, rank: np.ndarray, w: int, rows: np.ndarray = None) -> float:
    """Mean over tokens with at least w predecessors in their sequence of
    |S_t ∩ (S_{t-1} ∪ ... ∪ S_{t-w})| / k.  For w = 1 this is the consecutive-token overlap
    |S_t ∩ S_{t+1}| / k.  `rows` optionally restricts the tokens (e.g. decode only)."""
    sel = rank >= w
    if rows is not None:
        sel &= rows
    if not sel.any():
        return float("nan")
    return float(np.mean(gaps[sel] <= w))


def random_reuse_null(k: int, n_ids: int, w: int) -> float:
    """Window reuse under uniform random routing: an id is in a token's k picks with probability
    k/N, independently across tokens, so it was among the last w tokens' with 1 - (1 - k/N)^w."""
    return 1.0 - (1.0 - k / n_ids) ** w


def shuffle_rows(experts: np.ndarray, seed: int = 0) -> np.ndarray:
    """The layer's rows in a random order (fixed seed): same frequencies, no temporal locality."""
    return experts[np.random.default_rng(seed).permutation(len(experts))]


def working_sets(experts: np.ndarray, sequence: np.ndarray, rank: np.ndarray, n_experts: int,
                 w: int) -> np.ndarray:
    """Distinct real experts in each complete window of w consecutive tokens (non-overlapping
    windows within a sequence, in time order; a sequence's incomplete last window is left out)."""
    n = len(experts)
    if n == 0:
        return np.zeros(0, np.int64)
    wi = rank // w
    new = np.concatenate([[True], (sequence[1:] != sequence[:-1]) | (wi[1:] != wi[:-1])])
    win = np.cumsum(new) - 1
    size = np.bincount(win)
    ids = experts.astype(np.int64)
    real = ids < n_experts
    key = (np.repeat(win, experts.shape[1]) * n_experts + ids.ravel())[real.ravel()]
    distinct = np.bincount(np.unique(key) // n_experts, minlength=len(size))
    return distinct[size == w]


def random_working_set_null(k: int, n_ids: int, n_experts: int, w: int) -> float:
    """Expected distinct real experts in w tokens of uniform random routing."""
    return n_experts * (1.0 - (1.0 - k / n_ids) ** w)


def real_experts_per_token(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """How many tokens have 0..k real (non-zero-computation) experts: int64 [k + 1]."""
    k = experts.shape[1]
    return np.bincount((experts < n_experts).sum(1), minlength=k + 1)[: k + 1]
