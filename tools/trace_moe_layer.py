"""Where a one-token decode MoE layer's time goes, threadgroup by threadgroup.

Runs mul_mv_id_moe through its TRACE option (metal/mul_mv_id.metal): every threadgroup
writes the GPU's global nanosecond clock as it starts, when its router outputs have
arrived (loaded), after the routing rule (ruled), after the barrier that follows it
(routed: a gate/up threadgroup's activations are prepared by then), after its weight rows
are staged, when h is ready (down threadgroups: the wait for the gate/up ones is over;
gate/up: thread 0's simdgroup's rows of h stored, before the fence that releases them --
ready to end is that fence and the ticket) and as it ends.  CUDA only (Metal kernels read no global
clock).  Qwen3-30B-A3B layer shapes by default (hidden 2048, expert ffn 768,
128 experts, top-8), random Q4_0 experts, `--layers` layers in turn so that each launch
reads its weights from HBM (8 layers: 170 MB of routed weights, the L2 is 50 MB), `--reps`
passes over them queued back to back (the GPU busy, as in a decode step).  Each launch's
router outputs come from its input through a router projection launched just before it,
as in a decode step (in L2 when the layer starts); --stale-logits reads fixed ones instead
(last touched a pass earlier: from HBM, as in bench_kernels' launches).  --given-routing
also traces each geometry under given routing (mul_mv_id_moe_ids, option IDS: stamps 1
and 2 equal the start), its ids and weights made by the router kernel just before it.

    python tools/trace_moe_layer.py [--geometries 1x4x8x1x15,1x8x8x1x31] [--layers 8] [--json out.json]

Printed per geometry (medians over all launches; times in us from the launch's
first threadgroup start): the span (first start to last end), and for the gate/up and the
down threadgroups the 0/50/90/100th percentiles of each event; how many down threadgroups
had started when the first gate/up one ended; and the down tail (the last gate/up ticket
to the last end).  The clock's resolution is the GPU's (32 ns on recent NVIDIA parts, 1 us
on some): read the percentiles, not single stamps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_moe.kernels import cuda_cache, dispatch  # noqa: E402
from mlx_moe.kernels.dispatch import LayerGeometry  # noqa: E402
from mlx_moe.kernels.mul_mv_id import moe_layer_trace, mul_mv_id_moe_ids  # noqa: E402
from mlx_moe.kernels.registry import ticket_counters  # noqa: E402
from mlx_moe.kernels.router import RouterParams, fused_topk  # noqa: E402

EVENTS = ("start", "loaded", "ruled", "routed", "staged", "ready", "end")
PCTS = (0, 50, 90, 100)


def relative_us(trace: np.ndarray) -> np.ndarray:
    """[threadgroups, stamps] uint32 nanosecond stamps (low 32 bits) -> float us from the
    earliest, wrap-safe (a launch is far shorter than the 4.3 s the low bits span)."""
    t = trace.astype(np.int64)
    d = (t - t[0, 0] + 2 ** 31) % 2 ** 32 - 2 ** 31
    return (d - d.min()) / 1000.0


def launch_summary(trace: np.ndarray, n_down: int) -> dict:
    """One launch's timeline (the last n_down threadgroups the down ones): span, per-kind
    percentiles of each event, overlap, tail."""
    t = relative_us(trace)
    down = np.zeros(len(t), bool)
    down[len(t) - n_down:] = True
    gu, dn = t[~down], t[down]
    out = {"span": float(t[:, -1].max()), "threadgroups": [int((~down).sum()), int(down.sum())]}
    for kind, rows in (("gate_up", gu), ("down", dn)):
        out[kind] = {ev: [float(np.percentile(rows[:, i], p)) for p in PCTS] for i, ev in enumerate(EVENTS)}
    first_gu_end = gu[:, -1].min()
    out["down_started_before_first_gate_up_end"] = int((dn[:, 0] < first_gu_end).sum())
    last_ticket = gu[:, -1].max()
    out["last_gate_up_ticket"] = float(last_ticket)
    out["down_tail"] = float(dn[:, -1].max() - last_ticket)
    return out


def median_summary(runs: list) -> dict:
    """Element-wise medians of launch_summary dicts."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_summary([r[k] for r in runs]) for k in first}
    if isinstance(first, list):
        return [median_summary([r[i] for r in runs]) for i in range(len(first))]
    return statistics.median(runs)


def print_summary(tag: str, s: dict) -> None:
    print(f"\n== mul_mv_id_moe {tag}: span {s['span']:.2f} us; threadgroups gate/up {s['threadgroups'][0]:.0f}, "
          f"down {s['threadgroups'][1]:.0f}")
    print(f"   {'us from the first start':<24}" + "".join(f"{ev:>26}" for ev in EVENTS))
    print(f"   {'(p0 / p50 / p90 / p100)':<24}")
    for kind in ("gate_up", "down"):
        cells = ["/".join(f"{v:.1f}" for v in s[kind][ev]) for ev in EVENTS]
        print(f"   {kind:<24}" + "".join(f"{c:>26}" for c in cells))
    print(f"   down threadgroups started before the first gate/up one ended: "
          f"{s['down_started_before_first_gate_up_end']:.0f}; last gate/up ticket {s['last_gate_up_ticket']:.2f} us; "
          f"down tail after it {s['down_tail']:.2f} us")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometries", default="",
                   help="comma-separated LayerGeometry tags (GATE_NRxDOWN_NRxNSGxNQ[xSTAGE]) besides the default")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="passes over the layers (all launches summarized)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--stale-logits", action="store_true",
                   help="fixed router outputs per layer instead of a router projection of each launch's input")
    p.add_argument("--given-routing", action="store_true",
                   help="also trace each geometry under given routing (mul_mv_id_moe_ids), the ids and weights made "
                        "just before each launch by the router kernel (moe_router_topk)")
    p.add_argument("--each-route", action="store_true",
                   help="dispatch.SHARE_ROUTE off: the down threadgroups run the routing rule instead of reading "
                        "what their token's first gate/up threadgroup wrote (the default)")
    cuda_cache.add_argument(p)
    a = p.parse_args(argv)
    dispatch.SHARE_ROUTE = dispatch.SHARE_ROUTE and not a.each_route

    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        raise SystemExit("trace_moe_layer needs MLX's CUDA backend (Metal kernels read no global clock)")
    cuda_cache.apply(a.cache_preference)
    from bench_kernels import q4_0_experts  # noqa: E402 (tools/ is on sys.path when run as a script)

    geoms = [dispatch.MOE_LAYER["q4_0"]] + [LayerGeometry.parse(t) for t in a.geometries.split(",") if t.strip()]
    layers = [q4_0_experts(a.experts, a.hidden, a.ffn) for _ in range(a.layers)]
    w = [(ex["gate_proj"]["weight"], ex["up_proj"]["weight"], ex["down_proj"]["weight"]) for ex in layers]
    logits = [mx.random.normal((1, a.experts)).astype(mx.bfloat16) for _ in range(a.layers)]
    routers = [(mx.random.normal((a.hidden, a.experts)) * a.hidden ** -0.5).astype(mx.bfloat16)
               for _ in range(a.layers)]
    x = mx.random.normal((1, a.hidden)).astype(mx.bfloat16)
    counts = ticket_counters(a.layers)
    mx.eval(logits, routers, x)
    params = RouterParams(a.k, normalize=True)
    results = {}
    variants = [(g, False) for g in geoms] + [(g, True) for g in geoms if a.given_routing]
    for g, given in variants:
        def passes(n):
            """n passes over the layers, queued back to back and evaluated at once: the
            GPU stays busy (clocks up) as in a decode step; launches evaluated one at a
            time leave it idle between them, and its clocks low (3-4x longer launches).
            Each launch's input is the last one's output, normalized (as in a decode step:
            independent launches would run side by side on the GPU)."""
            xl, traces = x, []
            for _ in range(n):
                for l in range(a.layers):
                    lg = logits[l] if a.stale_logits else xl @ routers[l]
                    if given:
                        ids, wts = fused_topk(lg, params, "cuda")
                        y, _, tr = mul_mv_id_moe_ids(xl, ids, wts, *w[l], 0, xl, counts[l], "cuda", g, trace=True)
                    else:
                        y, _, _, _, tr = moe_layer_trace(xl, lg, params, *w[l], 0, xl, counts[l], "cuda", g)
                    xl = mx.fast.rms_norm(y, None, 1e-6)
                    traces.append(tr)
            mx.eval(traces, xl)
            return [np.array(t) for t in traces]
        passes(2)  # compile, warm up
        n_down = -(-a.hidden // g.down_nr)
        runs = [launch_summary(tr, n_down) for tr in passes(a.reps)]
        tag = g.tag + (" given routing" if given else "")
        results[tag] = median_summary(runs)
        print_summary(tag, results[tag])
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
