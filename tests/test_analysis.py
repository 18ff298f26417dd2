"""Tests of the expert-log analysis (mlx_moe.analysis, tools/analyze_expert_log.py).

Expected values come from closed forms (uniform random routing, fully repeated routing),
hand-worked sequences, or an independent brute-force cache simulator written here.
Synthetic logs follow notes/EXPERT_LOG_FORMAT.md.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_moe.analysis import LogFormatError, analyze, knee_capacity  # noqa: E402
from mlx_moe.analysis.cache import lru_hist, stack_hists  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def write_log(path, experts, tokens=None, layers=None, phase=None, seq=None, weights=False,
              hash_header=False, sidecar=None):
    """Write an expert log: one row per entry of `experts` [rows, k]."""
    experts = np.asarray(experts)
    rows, k = experts.shape
    tokens = np.arange(rows) if tokens is None else np.asarray(tokens)
    layers = np.zeros(rows, int) if layers is None else np.asarray(layers)
    cols = ["token_id", "layer_id"] + [f"expert_{i}" for i in range(k)]
    if weights:
        cols += [f"weight_{i}" for i in range(k)]
    if phase is not None:
        cols.append("phase")
    if seq is not None:
        cols.append("sequence_id")
    lines = [("#" if hash_header else "") + ",".join(cols)]
    w = [f"{v:.6g}" for v in np.linspace(0.9, 0.1, k)]
    for i in range(rows):
        f = [str(tokens[i]), str(layers[i])] + [str(int(e)) for e in experts[i]]
        if weights:
            f += w
        if phase is not None:
            f.append(phase[i])
        if seq is not None:
            f.append(str(seq[i]))
        lines.append(",".join(f))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if sidecar is not None:
        Path(str(path) + ".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return str(path)


def uniform_routing(rng, n, E, k):
    """n tokens, each picking k distinct experts uniformly at random."""
    return np.argsort(rng.random((n, E)), axis=1)[:, :k]


def naive_replay(experts, E, C, policy):
    """Brute-force cache simulation with the documented semantics; returns (hits, requests).

    Written independently of mlx_moe.analysis.cache: a set as the cache, victims found by
    scanning every resident expert."""
    n, k = experts.shape
    times = {}
    for t in range(n):
        for s in range(k):
            if experts[t, s] < E:
                times.setdefault(int(experts[t, s]), []).append(t * k + s)
    cache, last, count = set(), {}, {}
    hits = requests = 0
    for t in range(n):
        cur = [(s, int(e)) for s, e in enumerate(experts[t]) if e < E]
        names = {e for _, e in cur}
        requests += len(cur)
        hits += sum(e in cache for _, e in cur)
        for _, e in cur:
            if e in cache:
                continue
            if len(cache) >= C:
                others = [x for x in cache if x not in names]
                if policy == "lru":
                    victim = min(others, key=lambda x: last[x])
                elif policy == "lfu":
                    victim = min(others, key=lambda x: (count[x], last[x]))
                else:
                    def next_use(x):
                        later = [u for u in times[x] if u >= (t + 1) * k]
                        return later[0] if later else math.inf
                    victim = max(others, key=next_use)
                cache.remove(victim)
            cache.add(e)
        for s, e in cur:
            last[e] = t * k + s
            count[e] = count.get(e, 0) + 1
    return hits, requests


def hits_at(report_layer, policy, C, k, phase="all"):
    return report_layer.curves[policy][phase][C - k]


# ----------------------------------------------------------------------------- closed forms
def test_uniform_random_routing_matches_nulls(tmp_path):
    """Uniform routing: overlap ~ k/E, LRU/LFU hit ~ C/E, working set ~ E(1-(1-k/E)^w).

    Tolerances: the overlap of one pair is hypergeometric, variance
    k(k/E)(1-k/E)(E-k)/(E-1) = 0.6 in count units (E=16, k=4), i.e. 0.0375 as a share; over
    n-1 = 2999 pairs (neighbouring pairs are weakly dependent, allow 2x variance) the mean has
    std <= 0.005: 0.025 is 5 sigma.  A token's hits at capacity C are hypergeometric too
    (the cache content does not depend on the new token's picks): std of the hit rate
    sqrt(k(C/E)(1-C/E)(E-k)/(E-1)/n)/k <= 0.0041, plus a cold-miss bias <= E/(nk) = 0.0013:
    0.02 is about 5 sigma."""
    rng = np.random.default_rng(7)
    E, k, n, w = 16, 4, 3000, 8
    ex = uniform_routing(rng, n, E, k)
    rep = analyze([write_log(tmp_path / "u.csv", ex)], n_experts=E, window=w,
                  policies=("lru", "lfu", "belady"))
    ls = rep.layers[0]
    assert abs(ls.overlap - k / E) < 0.025
    assert abs(ls.overlap_shuffled - k / E) < 0.025
    assert abs(rep.overall["overlap_random_null"] - k / E) < 1e-12
    null_w = 1 - (1 - k / E) ** w
    assert abs(ls.reuse - null_w) < 0.025
    for C in (4, 8, 12):
        assert abs(hits_at(ls, "lru", C, k) - C / E) < 0.02, C
        assert abs(hits_at(ls, "lfu", C, k) - C / E) < 0.02, C
        assert hits_at(ls, "belady", C, k) >= hits_at(ls, "lru", C, k)
    # at C = k every policy holds exactly the previous token's experts, so the hits are the
    # consecutive-overlap counts (one sequence, every slot a real expert)
    for pol in ("lru", "lfu", "belady"):
        assert hits_at(ls, pol, k, k) == pytest.approx(ls.overlap_hits / (n * k))
    # every expert resident: only the E cold misses miss
    assert hits_at(ls, "lru", E, k) == pytest.approx(1 - E / (n * k))
    assert ls.working_sets.mean() == pytest.approx(E * null_w, abs=0.3)
    assert ls.entropy > 0.99


def test_fully_repeated_routing(tmp_path):
    """The same k experts every token: overlap 1, every request after the first token hits."""
    E, k, n = 32, 4, 50
    ex = np.tile([5, 9, 1, 30], (n, 1))
    rep = analyze([write_log(tmp_path / "r.csv", ex)], n_experts=E, window=4)
    ls = rep.layers[0]
    assert ls.overlap == 1.0 and ls.overlap_shuffled == 1.0 and ls.reuse == 1.0
    for pol in ("lru", "lfu", "belady"):
        hist = ls.hists[pol].sum(0)
        assert hist[E] == k  # the first token's cold misses
        curve = ls.curves[pol]["all"]
        np.testing.assert_allclose(curve, (n - 1) / n)  # = hit rate 1 after warm-up
    assert np.all(ls.working_sets == k)
    assert ls.coverage == {0.5: 2, 0.9: 4, 0.99: 4}
    assert ls.knee == k


# ----------------------------------------------------------------------------- hand-worked
def test_belady_lru_lfu_hand_worked_k1(tmp_path):
    """k = 1, E = 4, requests 0 1 2 0 1 3 0 1 (t = 0..7).

    C = 2, LRU: every request misses (each evicts the one needed two steps later): 0 hits.
    C = 2, Belady: t2 (2) evicts 1 (next t4) over 0 (next t3); t3 0 hits; t4 (1) evicts 2
      (never again); t5 (3) evicts 1 (next t7) over 0 (next t6); t6 0 hits; t7 misses: 2 hits.
    C = 2, LFU: t2 evicts 0 (count 1 = count of 1, but older); t3 evicts 1 (1,t1) over 2 (1,t2);
      t4 evicts 2 (count 1) over 0 (2); t5 evicts 0 (2,t3) over 1 (2,t4); t6 evicts 3 (count 1);
      t7 (1) hits: 1 hit.
    C = 3: all three evict 2 at t5 and hit t3, t4, t6, t7: 4 hits.  C = 4: 4 hits (4 cold misses).
    """
    ex = np.array([0, 1, 2, 0, 1, 3, 0, 1])[:, None]
    rep = analyze([write_log(tmp_path / "h.csv", ex)], n_experts=4)
    ls = rep.layers[0]
    expected = {"lru": {1: 0, 2: 0, 3: 4, 4: 4}, "belady": {1: 0, 2: 2, 3: 4, 4: 4},
                "lfu": {1: 0, 2: 1, 3: 4, 4: 4}}
    for pol, by_c in expected.items():
        for C, h in by_c.items():
            assert hits_at(ls, pol, C, 1) * 8 == pytest.approx(h), (pol, C)


def test_token_requests_are_served_together(tmp_path):
    """k = 2, E = 3, C = 2; tokens {0, 2} then {1, 0} (expert_0 = 1 first).

    When token 1 arrives the cache holds {0, 2}: 0 hits and 1 misses, evicting 2 (the only
    resident not needed by token 1).  Serving the slots one by one with plain LRU would
    evict 0 (least recent) for 1 and then miss 0 as well; the documented semantics give 1 hit
    for every policy."""
    ex = np.array([[0, 2], [1, 0]])
    rep = analyze([write_log(tmp_path / "t.csv", ex)], n_experts=3)
    for pol in ("lru", "lfu", "belady"):
        assert hits_at(rep.layers[0], pol, 2, 2) * 4 == pytest.approx(1), pol


@pytest.mark.parametrize("seed", [0, 1])
def test_replay_matches_brute_force_at_every_capacity(seed):
    """Skewed routing with zero-computation ids (>= E) and a phase split: the one-pass stack
    replay equals the brute-force simulator for every policy and every capacity."""
    rng = np.random.default_rng(seed)
    E, Z, k, n = 10, 2, 3, 160
    p = rng.dirichlet(np.full(E + Z, 0.4))
    layers = []
    for _ in range(2):
        ex = np.stack([rng.choice(E + Z, k, replace=False, p=p) for _ in range(n)])
        ph = (np.arange(n) >= 40).astype(np.int8)
        layers.append((ex, ph))
    for pol in ("lru", "lfu", "belady"):
        hists = stack_hists(layers, E, pol)
        for i, ((ex, ph), h) in enumerate(zip(layers, hists)):
            if pol == "lru":  # the vectorized LRU and the general stack replay agree for C >= k
                np.testing.assert_array_equal(np.cumsum(h, 1)[:, k - 1:], np.cumsum(lru_hist(ex, ph, E), 1)[:, k - 1:])
            for C in range(k, E + 1):
                hits, req = naive_replay(ex, E, C, pol)
                assert h.sum() == req
                assert h.sum(0)[:C].sum() == hits, (pol, C, i)
            # prefill-only replay: the decode half's history must not matter for it
            assert h[0].sum() == (ex[:40] < E).sum()


# ----------------------------------------------------------------------------- knee, stats
def test_knee_rule_on_constructed_curve():
    """hit(C) = 1 - 0.8 exp(-(C - 4) / 3) for C = 4..20: the knee is the smallest C with
    hit(C) >= hit(20) - 0.05, i.e. C - 4 >= 3 ln(0.8 / (0.8 exp(-16/3) + 0.05))."""
    caps = np.arange(4, 21)
    hits = 1 - 0.8 * np.exp(-(caps - 4) / 3)
    expected = math.ceil(4 + 3 * math.log(0.8 / (0.8 * math.exp(-16 / 3) + 0.05)))
    assert expected == 13
    assert knee_capacity(caps, hits, 5.0) == expected
    assert knee_capacity(caps, hits, 0.0) == 20
    assert knee_capacity(caps, np.linspace(0.2, 1.0, 17), 10.0) == 18  # straight line: 0.9 at 18


def test_sequences_and_row_order(tmp_path):
    """Statistics never cross a sequence boundary, and rows may come in any order."""
    # sequence 0 always picks {0, 1}, sequence 1 always {2, 3}; token_ids restart at 0
    ex = np.array([[0, 1]] * 5 + [[2, 3]] * 5)
    tok = np.r_[np.arange(5), np.arange(5)]
    seq = np.r_[np.zeros(5, int), np.ones(5, int)]
    perm = np.random.default_rng(3).permutation(10)
    path = write_log(tmp_path / "s.csv", ex[perm], tokens=tok[perm], seq=seq[perm],
                     phase=np.array(["decode"] * 10))
    rep = analyze([path], n_experts=4, window=2)
    ls = rep.layers[0]
    assert ls.pairs == 8 and ls.overlap == 1.0  # 4 pairs per sequence, none across
    assert ls.reuse == 1.0
    assert np.all(ls.working_sets == 2)  # 2 complete windows of 2 tokens per sequence
    assert len(ls.working_sets) == 4
    # the cache persists across sequences: 4 cold misses, everything else hits at C = 4
    assert ls.hists["lru"].sum(0)[4] == 4


def test_zero_computation_experts(tmp_path):
    """LongCat-style: ids >= E are identity experts, counted but never cached."""
    E, Z = 6, 2
    ex = np.array([[0, 6, 7], [1, 2, 6], [0, 1, 2], [7, 6, 3]])  # real: 1, 2, 3, 1
    path = write_log(tmp_path / "z.csv", ex, phase=["decode"] * 4,
                     sidecar={"n_experts": E, "n_zero_experts": Z, "top_k": 3})
    rep = analyze([path])
    ls = rep.layers[0]
    assert ls.zero_selections == 5 and ls.selections == 7
    assert list(ls.real_per_token) == [0, 2, 1, 1]  # tokens with 0, 1, 2, 3 real experts
    assert ls.hists["belady"].sum() == 7  # only real experts are requested
    assert rep.overall["zero_share"] == pytest.approx(5 / 12)
    assert rep.overall["overlap_random_null"] == pytest.approx(3 / 8)
    md = rep.to_markdown()
    assert "Zero-computation experts" in md


def test_frequency_entropy_coverage_against_numpy(tmp_path):
    rng = np.random.default_rng(5)
    E, k, n = 12, 2, 300
    p = np.arange(1, E + 1) / np.arange(1, E + 1).sum()
    ex = np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(n)])
    rep = analyze([write_log(tmp_path / "f.csv", ex)], n_experts=E, policies=("lru",))
    ls = rep.layers[0]
    counts = np.array([(ex == e).sum() for e in range(E)])
    np.testing.assert_array_equal(ls.counts, counts)
    q = counts / counts.sum()
    assert ls.entropy == pytest.approx(-(q * np.log(q)).sum() / math.log(E))
    srt = np.sort(counts)[::-1]
    for f, got in ls.coverage.items():
        assert srt[:got].sum() >= f * counts.sum() > srt[:got - 1].sum()
    assert ls.top[0][0] == int(np.argmax(counts))


# ----------------------------------------------------------------------------- reader
def test_header_variants_and_sidecar(tmp_path):
    ex = np.array([[3, 1], [1, 2], [2, 3]])
    a = write_log(tmp_path / "a.csv", ex, hash_header=True, weights=True)  # '#', weights, no phase/seq
    rep = analyze([a], n_experts=4, policies=("lru",))
    assert rep.layers[0].tokens == 3 and rep.phases == ["all"]
    b = write_log(tmp_path / "b.csv", ex, phase=["prefill", "decode", "decode"], seq=[0, 0, 0],
                  sidecar={"n_experts": 8, "top_k": 2, "expert_bytes": 1000, "n_zero_experts": 0})
    rep = analyze([b], policies=("lru",))
    assert rep.n_experts == 8 and rep.phases == ["all", "prefill", "decode"]
    assert rep.capacities[0] == 2 and rep.capacities[-1] == 8
    assert rep.layers[0].knee_bytes == rep.layers[0].knee * 1000
    # no E anywhere: inferred from the largest id, with a warning
    rep = analyze([a], policies=("lru",))
    assert rep.n_experts == 4 and any("inferred" in w for w in rep.warnings)


def test_two_files_are_separate_sequences(tmp_path):
    ex = np.array([[0, 1]] * 3)
    a = write_log(tmp_path / "a.csv", ex, seq=[0, 0, 0])
    b = write_log(tmp_path / "b.csv", np.array([[2, 3]] * 3), seq=[0, 0, 0])
    rep = analyze([a, b], n_experts=4, policies=("lru",))
    ls = rep.layers[0]
    assert ls.tokens == 6 and ls.pairs == 4 and ls.overlap == 1.0
    assert rep.overall["sequences"] == 2


@pytest.mark.parametrize("bad,msg", [
    ("5,0,1", "expected 4 columns"),
    ("5,0,1,x", "expert_1 must be a non-negative integer"),
    ("5,0,2,2", "repeats"),
    ("5,0,1,9", "out of range"),
    ("-1,0,1,2", "token_id must be a non-negative"),
])
def test_malformed_rows_name_the_line(tmp_path, bad, msg):
    lines = ["token_id,layer_id,expert_0,expert_1"] + [f"{t},0,0,1" for t in range(5)]
    lines.insert(4, bad)  # file line 5
    p = tmp_path / "bad.csv"
    p.write_text("\n".join(lines) + "\n")
    Path(str(p) + ".json").write_text(json.dumps({"n_experts": 4, "n_zero_experts": 0, "top_k": 2}))
    with pytest.raises(LogFormatError, match=rf"bad.csv line 5: .*{msg}"):
        analyze([str(p)])
    rep = analyze([str(p)], skip_bad=True, policies=("lru",))
    assert rep.overall["skipped_rows"] == 1 and rep.layers[0].tokens == 5
    assert any("skipped 1 malformed" in w for w in rep.warnings)


def test_bad_phase_and_header(tmp_path):
    p = write_log(tmp_path / "p.csv", np.array([[0, 1], [1, 0]]), phase=["prefill", "generate"])
    with pytest.raises(LogFormatError, match="line 3: phase must be 'prefill' or 'decode'"):
        analyze([p], n_experts=2)
    q = tmp_path / "h.csv"
    q.write_text("token,layer,e0\n1,2,3\n")
    with pytest.raises(LogFormatError, match="header lacks token_id, layer_id, expert_0"):
        analyze([str(q)])


def test_model_config_gives_experts_and_bytes(tmp_path):
    cfg = {"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 2, "hidden_size": 64,
           "moe_intermediate_size": 32, "quantization": {"bits": 4, "group_size": 64}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    p = write_log(tmp_path / "l.csv", np.array([[0, 1], [1, 2], [0, 1]]))
    rep = analyze([p], model=str(tmp_path / "m"), policies=("lru",))
    assert rep.n_experts == 16
    # 3 matrices x 64 x 32 weights at 4 bits + a 2-byte scale and bias per 64 weights
    assert rep.meta["expert_bytes"] == 3 * 64 * 32 * (4 / 8 + 4 / 64)


def test_streams_a_large_log(tmp_path):
    """10^5 rows (20 layers x 5000 tokens, more than one read chunk): counts and overlap
    against numpy computed straight from the generating arrays."""
    rng = np.random.default_rng(11)
    E, k, n, L = 24, 4, 5000, 20
    ex = np.empty((n, L, k), np.int64)
    ex[0] = uniform_routing(rng, L, E, k)
    for t in range(1, n):  # sticky routing: keep the previous set with probability 0.5
        keep = rng.random(L) < 0.5
        ex[t] = np.where(keep[:, None], ex[t - 1], uniform_routing(rng, L, E, k))
    tok = np.repeat(np.arange(n), L)
    lay = np.tile(np.arange(L), n)
    flat = ex.reshape(n * L, k)
    path = tmp_path / "big.csv"
    body = np.column_stack([tok, lay, flat])
    with open(path, "w") as f:
        f.write("token_id,layer_id," + ",".join(f"expert_{i}" for i in range(k)) + "\n")
        np.savetxt(f, body, fmt="%d", delimiter=",")
    rep = analyze([str(path)], n_experts=E, policies=("lru",))
    assert rep.overall["rows"] == n * L and len(rep.layers) == L
    for ls in rep.layers:
        e = ex[:, ls.layer]
        np.testing.assert_array_equal(ls.counts, np.bincount(e.ravel(), minlength=E))
        inter = (e[1:, :, None] == e[:-1, None, :]).any(-1).sum()
        assert ls.overlap == pytest.approx(inter / ((n - 1) * k))
    assert rep.overall["overlap"] > rep.overall["overlap_shuffled"] + 0.3


# ----------------------------------------------------------------------------- CLI + plots
def test_cli_end_to_end_writes_valid_pngs(tmp_path, capsys):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(2)
    E, k, n = 16, 2, 120
    ex = np.repeat(uniform_routing(rng, n // 4, E, k), 4, axis=0)  # each set held 4 tokens
    ph = ["prefill"] * 20 + ["decode"] * (n - 20)
    log = write_log(tmp_path / "run.csv", np.r_[ex, ex], layers=np.r_[np.zeros(n, int), np.full(n, 2)],
                    tokens=np.r_[np.arange(n), np.arange(n)], phase=ph * 2, seq=[0] * (2 * n), weights=True)
    out = tmp_path / "out"
    tool = str(ROOT / "tools" / "analyze_expert_log.py")
    r = subprocess.run([sys.executable, tool, log, "--out", str(out), "--n-experts", str(E),
                        "--expert-bytes", "2654208", "--window", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "## Cache hit rate, all layers pooled" in r.stdout and "| 2 |" in r.stdout
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["cache_hit_rates.png", "expert_frequency.png", "overlap.png",
                                      "working_set.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(str(p))
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300
        assert img[..., :3].std() > 0.01  # not a blank canvas
    # the remaining cases call the tool's main() in-process (a subprocess start costs seconds)
    import importlib.util

    spec = importlib.util.spec_from_file_location("analyze_expert_log", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([log, "--json", "--n-experts", str(E), "--policies", "lru"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["capacities"][0] == k and data["capacities"][-1] == E
    assert [ly["layer"] for ly in data["layers"]] == [0, 2]
    # inside each 4-token block the 3 pairs overlap fully; the 29 block boundaries overlap by chance
    cross = sum(len(set(ex[t]) & set(ex[t + 1])) for t in range(3, n - 1, 4)) / k
    assert data["layers"][0]["overlap"] == pytest.approx((90 + cross) / 119, abs=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("token_id,layer_id,expert_0\n0,0,1\n1,0\n")
    assert cli.main([str(bad)]) == 2
    assert "bad.csv line 3: expected 3 columns" in capsys.readouterr().err
