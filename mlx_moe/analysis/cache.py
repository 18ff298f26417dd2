"""Expert-cache replay: LRU, LFU and Belady (optimal) hit rates at every capacity.

Semantics (the same for every policy):
- One cache per MoE layer holding C experts; only real experts are cached: ids >= n_experts
  (LongCat's zero-computation experts) have no weights and are never requested.
- A token's selected experts are requested together.  A request is a hit if the expert is
  resident when the token arrives; the token's misses are then loaded, each evicting a resident
  expert chosen by the policy, and an expert the current token needs is never evicted by that
  token's own loads (capacities start at k, so they always fit).
- The cache starts empty and persists across sequences and files (one long session);
  the first request of each expert is a cold miss and counts as a miss.
- LRU evicts the expert whose last request is oldest; requests are ordered by token, then by
  slot (expert_0 first), so of two experts of one token expert_{k-1} is the more recent.
- LFU evicts the expert with the fewest requests so far (counted over the whole log up to now,
  not only while resident), ties going to the least recently used.
- Belady evicts the expert whose next request lies farthest in the future (never again counts
  as farthest): the optimal policy, the lower bound on misses for demand loading.

Method: all three are stack algorithms (Mattson et al., 1970): with a capacity-independent
eviction priority, the cache of size C is always a subset of the cache of size C + 1, so one
pass that keeps the caches of all sizes as one ordered "stack" yields, for every request,
the smallest capacity at which it hits.  Its histogram gives the hit rate at every C from k to
E at once.  LRU uses a vectorized form (a request's depth is the number of experts used since
its previous use); LFU and Belady run the general stack update, vectorized across layers.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

POLICIES = ("lru", "lfu", "belady")
N_PHASE_ROWS = 3  # histogram rows: prefill, decode, unknown phase
_TOP = 1 << 62  # priority of the current token's experts while it is being served
_MIN = np.iinfo(np.int64).min


def _phase_rows(phase: np.ndarray) -> np.ndarray:
    return np.where(phase < 0, 2, phase).astype(np.int64)


def lru_hist(experts: np.ndarray, phase: np.ndarray, n_experts: int) -> np.ndarray:
    """LRU depth histogram of one layer: int64 [3, E + 1].

    hist[p, d] counts requests of phase row p (prefill, decode, unknown) that hit in every
    cache of capacity > d; hist[p, E] counts cold misses.  A request's depth is the number of
    distinct experts requested after its previous request and before its token: exactly its
    position in the LRU order when the token arrives.
    """
    E = n_experts
    n, k = experts.shape
    hist = np.zeros((N_PHASE_ROWS, E + 1), np.int64)
    last = np.full(E, -1, np.int64)  # time of each expert's latest request so far
    block = max(16, (1 << 22) // max(1, k * E))
    prow = _phase_rows(phase)
    for b0 in range(0, n, block):
        ex = experts[b0:b0 + block].astype(np.int64)
        nb = len(ex)
        valid = ex < E
        touch = np.full((nb, E), -1, np.int64)
        r, s = np.nonzero(valid)
        touch[r, ex[r, s]] = (b0 + r) * k + s
        acc = np.maximum.accumulate(np.concatenate([last[None], touch]), axis=0)
        prev, last = acc[:-1], acc[-1]  # prev[i]: last requests before token b0 + i
        lp = np.take_along_axis(prev, np.where(valid, ex, 0), axis=1)
        depth = (prev[:, None, :] > lp[:, :, None]).sum(-1)
        depth = np.where(lp < 0, E, depth)
        key = (np.broadcast_to(prow[b0:b0 + nb, None], (nb, k)) * (E + 1) + depth)[valid]
        hist += np.bincount(key, minlength=N_PHASE_ROWS * (E + 1)).reshape(N_PHASE_ROWS, E + 1)
    return hist


def _next_use(ids: np.ndarray, n_experts: int) -> np.ndarray:
    """For each request (token, slot) of one layer: the time (token * k + slot) of the next
    request of the same expert, or -1 if there is none.  Invalid slots (id >= E) get -1."""
    n, k = ids.shape
    flat = ids.ravel().astype(np.int64)
    t = np.arange(n * k, dtype=np.int64)
    order = np.lexsort((t, flat))
    sid, st = flat[order], t[order]
    nxt = np.full(n * k, -1, np.int64)
    same = sid[1:] == sid[:-1]
    nxt[:-1] = np.where(same, st[1:], -1)
    out = np.empty(n * k, np.int64)
    out[order] = nxt
    out[flat >= n_experts] = -1
    return out.reshape(n, k)


def _replay_group(layers: Sequence[Tuple[np.ndarray, np.ndarray]], E: int, policy: str) -> np.ndarray:
    """Stack replay of several layers at once (each with its own cache); [L, 3, E + 1]."""
    L = len(layers)
    k = layers[0][0].shape[1]
    n_max = max(len(ex) for ex, _ in layers)
    ids = np.full((L, n_max, k), E, np.int32)  # E marks "no request" (zero expert or padding)
    prow = np.full((L, n_max), 2, np.int64)
    nu = np.full((L, n_max, k), -1, np.int64) if policy == "belady" else None
    for l, (ex, ph) in enumerate(layers):
        ids[l, :len(ex)] = np.where(ex < E, ex, E)
        prow[l, :len(ex)] = _phase_rows(ph)
        if nu is not None:
            nu[l, :len(ex)] = _next_use(ex, E)
    rows = np.arange(L)
    stack = np.tile(np.arange(E, dtype=np.int64), (L, 1))  # stack[l, i]: expert at depth i
    pos = stack.copy()  # pos[l, e]: depth of expert e
    # Never-requested experts sit in the stack as placeholders with the lowest priorities:
    # holding one is the same as an empty slot, and its first request counts as a cold miss.
    prio = np.tile(-1 - np.arange(E, dtype=np.int64), (L, 1))
    seen = np.zeros((L, E), bool)
    count = np.zeros((L, E), np.int64)
    depth = np.full((L, n_max, k), -1, np.int64)
    T = n_max * k + 1
    for j in range(n_max):
        x_all = ids[:, j].astype(np.int64)
        valid = x_all < E
        r, s = np.nonzero(valid)
        if not len(r):
            continue
        xe = x_all[r, s]
        prio[r, xe] = _TOP + s  # the token's own experts are never evicted while it is served
        for sl in range(k):
            v = valid[:, sl]
            if not v.any():
                continue
            x = np.where(v, x_all[:, sl], stack[:, 0])  # rows without a request: no-op
            d = pos[rows, x]
            depth[:, j, sl] = np.where(v, np.where(seen[rows, x], d, E), -1)
            seen[rows[v], x[v]] = True
            c = int(d.max()) + 1
            if c == 1:
                continue
            # Mattson's update: x moves to the top; walking down to x's old depth, each cache
            # size evicts the lowest-priority expert of its old content (the running minimum),
            # which moves one level down; the others keep their depth.
            sc = stack[:, :c]
            p = prio[rows[:, None], sc]
            p[rows, d] = _MIN
            cm = np.minimum.accumulate(p, axis=1)
            col = np.arange(c)
            carry = np.take_along_axis(sc, np.maximum.accumulate(np.where(p == cm, col, 0), axis=1), axis=1)
            moved = np.where(p[:, 1:] > cm[:, :-1], sc[:, 1:], carry[:, :-1])
            new = sc.copy()
            new[:, 1:] = np.where(col[1:] <= d[:, None], moved, sc[:, 1:])
            new[:, 0] = x
            stack[:, :c] = new
            pos[rows[:, None], new] = col
        t = j * k + s
        if policy == "lru":
            prio[r, xe] = t
        elif policy == "lfu":
            count[r, xe] += 1
            prio[r, xe] = count[r, xe] * T + t
        else:  # belady: sooner next use = higher priority; never again = lowest
            nxt = nu[r, j, s]
            prio[r, xe] = np.where(nxt >= 0, T - nxt, -E - 1 - xe)
    hist = np.zeros((L, N_PHASE_ROWS, E + 1), np.int64)
    for l in range(L):
        m = depth[l] >= 0
        key = (np.broadcast_to(prow[l][:, None], m.shape) * (E + 1) + depth[l])[m]
        hist[l] = np.bincount(key, minlength=N_PHASE_ROWS * (E + 1)).reshape(N_PHASE_ROWS, E + 1)
    return hist


def stack_hists(layers: Sequence[Tuple[np.ndarray, np.ndarray]], n_experts: int, policy: str,
                budget: int = 1 << 23) -> List[np.ndarray]:
    """Depth histograms ([3, E + 1] each, as `lru_hist`) of `policy` for each (experts, phase) layer.

    Layers are replayed in groups whose padded request count stays under `budget` (bounding
    the extra memory to about 24 bytes per request of a group)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose from {POLICIES}")
    out: List[np.ndarray] = [None] * len(layers)
    k = layers[0][0].shape[1] if layers else 1
    group: List[int] = []
    for i in range(len(layers) + 1):
        if i < len(layers):
            n_max = max([len(layers[g][0]) for g in group] + [len(layers[i][0])])
            if not group or (len(group) + 1) * n_max * k <= budget:
                group.append(i)
                continue
        if group:
            h = _replay_group([layers[g] for g in group], n_experts, policy)
            for g, hh in zip(group, h):
                out[g] = hh
        group = [i]
    return out


def hit_curve(hist: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Hit rate at each capacity from a depth histogram row [E + 1] (cold misses included)."""
    total = hist.sum()
    if total == 0:
        return np.full(len(capacities), np.nan)
    cum = np.cumsum(hist[:-1])
    return cum[np.asarray(capacities) - 1] / total
