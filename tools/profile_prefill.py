#!/usr/bin/env python3
"""Where a prefill's time goes, per component, on a random model of a real shape.

Prefill of a few hundred tokens is bound by GPU work, not by the host (unlike
decode, tools/profile_decode.py), so timing each component with an evaluation
after it costs little accuracy: the tool wraps, in every decoder layer, the
attention block, its q/k/v/o projections, the MoE block, its router and its
expert computation, evaluates after each and adds up the wall time per kind.
Everything else (embedding, norms, residual adds, the final norm and lm_head)
is the whole forward's time minus those.  The whole forward is also timed
without the wrappers (one evaluation at the end), as the reference; the ratio
of the two says how much the per-component evaluations themselves cost.

    python tools/profile_prefill.py --shape qwen3-30b-a3b --kernels cuda --tokens 512
    python tools/profile_prefill.py --shape tiny --kernels mlx --tokens 64     # CPU smoke test

--dense-dequantized switches the dense projections to dequantize + GEMM for
prompts of at least that many rows (mlx_moe/prefill.py); 0: never; unset: the
loader's default for the kernels' backend (prefill.DEQUANTIZED_MIN_ROWS).

--build-only times the host's building of the prompt's graph alone (nothing runs
on the device while Python builds it: mlx_moe/prefill.py's layer-by-layer
evaluation is about that time).

--once runs one plain prefill after the warm-up, for a kernel profiler to time
every kernel (a few layers are enough: each layer launches the same kernels):

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file prefill.csv \
        python tools/profile_prefill.py --kernels cuda --once

The plain prefill runs inside the CUDA profiler range (cuProfilerStart/Stop), so
with --profile-from-start off the profiler times only its kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_generate import SHAPES, build_models, random_q4_0_experts  # noqa: E402

from mlx_moe.backends import get_backend  # noqa: E402
from mlx_moe.moe import MoELayer, set_expert_backend  # noqa: E402
from mlx_moe.prefill import default_dequantized_rows, dequantized_prefill  # noqa: E402


def _timed(fn, kind: str, totals: dict, args, kwargs):
    """fn(*args, **kwargs), evaluated, its wall time added to totals[kind]."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    mx.eval(out)
    totals[kind] += time.perf_counter() - t0
    return out


class Timed(nn.Module):
    """A module in place of `inner` that times each call (`_timed`)."""

    def __init__(self, inner, kind: str, totals: dict):
        super().__init__()
        self.inner = inner
        self._kind = kind
        self._totals = totals

    def __call__(self, *args, **kwargs):
        return _timed(self.inner, self._kind, self._totals, args, kwargs)


class TimedCall:
    """`Timed` for a plain callable (a bound method, an expert backend): other
    attributes pass through to it (the backend's `route` is the router's)."""

    def __init__(self, fn, kind: str, totals: dict):
        self._fn, self._kind, self._totals = fn, kind, totals

    def __call__(self, *args, **kwargs):
        return _timed(self._fn, self._kind, self._totals, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._fn, name)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
               "kv_b_proj", "embed_q", "unembed_out")


@contextlib.contextmanager
def instrumented(model, totals: dict):
    """Wrap the components of every decoder layer (see the module docstring); restore on exit.

    Nested components are timed inside their block, so a block's own time is its
    total minus its parts (computed by `report`)."""
    undo = []
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            for name in PROJECTIONS:
                if name in attn and isinstance(attn[name], nn.Module):
                    undo.append((attn, name, attn[name]))
                    setattr(attn, name, Timed(attn[name], "attention projections", totals))
            undo.append((layer, "self_attn", attn))
            layer.self_attn = Timed(attn, "attention block", totals)
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoELayer):
            route, backend = mlp.route, mlp.backend
            mlp.route = TimedCall(route, "router", totals)
            mlp.backend = TimedCall(backend, "experts", totals)
            undo.append((mlp, "backend", backend))
            undo.append((mlp, "route", None))  # back to the class's method
            undo.append((layer, "mlp", mlp))
            layer.mlp = Timed(mlp, "moe block", totals)
        elif mlp is not None:
            undo.append((layer, "mlp", mlp))
            layer.mlp = Timed(mlp, "dense mlp", totals)
    try:
        yield
    finally:
        for obj, name, value in reversed(undo):
            if value is None:
                del obj.__dict__[name]
            else:
                setattr(obj, name, value)


def prefill(model, tokens: mx.array) -> float:
    """Seconds to the first token's logits, as generation gets there (mlx-lm's
    generate_step, mlx_moe.generate): the prompt but its last token fills the cache
    (its logits are never evaluated: no lm_head over the prompt), then the last
    token runs alone."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    if tokens.size > 1:
        model(tokens[None, :-1], cache=cache)
        mx.eval([c.state for c in cache])
    mx.eval(model(tokens[None, -1:], cache=cache))
    return time.perf_counter() - t0


def build_graph(model, tokens: mx.array) -> float:
    """Seconds the host takes to build the prefill's lazy graph (evaluated afterwards, untimed)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.synchronize()
    t0 = time.perf_counter()
    model(tokens[None], cache=cache)
    t = time.perf_counter() - t0
    mx.eval([c.state for c in cache])  # the layers' work; the untimed logits are not needed
    return t


def report(whole: float, instrumented_total: float, parts: dict, tokens: int, layers: int) -> dict:
    own = dict(parts)
    own["attention block"] = parts.get("attention block", 0) - parts.get("attention projections", 0)
    own["moe block"] = parts.get("moe block", 0) - parts.get("router", 0) - parts.get("experts", 0)
    own["rest (embedding, norms, adds, lm_head)"] = instrumented_total - parts.get("attention block", 0) \
        - parts.get("moe block", 0) - parts.get("dense mlp", 0)
    names = {"attention block": "attention (scores, rope, norms; without projections)",
             "moe block": "moe block glue (shared expert, combine)"}
    print(f"\n## prefill of {tokens} tokens: {1e3 * whole:.1f} ms uninstrumented ({tokens / whole:,.0f} tok/s), "
          f"{1e3 * instrumented_total:.1f} ms with an evaluation after each component")
    print("| component | ms | ms per layer | share |")
    print("|---|---|---|---|")
    rows = {}
    for key, v in sorted(own.items(), key=lambda kv: -kv[1]):
        rows[names.get(key, key)] = v
        print(f"| {names.get(key, key)} | {1e3 * v:.2f} | {1e3 * v / layers:.3f} | {100 * v / instrumented_total:.1f}% |")
    return {"tokens": tokens, "whole_ms": 1e3 * whole, "instrumented_ms": 1e3 * instrumented_total,
            "components_ms": {k: 1e3 * v for k, v in rows.items()}}


@contextlib.contextmanager
def profiler_range():
    """The CUDA driver's profiler range (cuProfilerStart/Stop) around the block, so
    `ncu --profile-from-start off` (or nsys --capture-range=cudaProfilerApi) times
    only its kernels, not the random weights' generation or the warm-up.  A no-op
    without a CUDA driver; says so when the driver refuses."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        cuda = None
    started = cuda is not None and cuda.cuProfilerStart() == 0
    if cuda is not None and not started:
        print("# cuProfilerStart failed (no current CUDA context?): the profiler sees the whole run")
    try:
        yield
    finally:
        if started:
            cuda.cuProfilerStop()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--experts", choices=["q4_0", "mlx"], default="q4_0",
                   help="q4_0: our Q4_0 experts (the kernels' format); mlx: MLX affine 4-bit")
    p.add_argument("--tokens", type=int, nargs="+", default=[512])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dense-dequantized", type=int, default=None, metavar="MIN_ROWS")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--once", action="store_true",
                   help="one warm-up and one plain prefill per token count, nothing instrumented: "
                        "the workload for a kernel profiler (ncu) to time every kernel")
    p.add_argument("--build-only", action="store_true",
                   help="time only the host's building of the prompt's graph (the forward call, nothing "
                        "evaluated: kernels that run when called, e.g. the CPU emulation's, are timed too)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    mx.random.seed(0)
    config = dict(SHAPES[args.shape])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    _, model = build_models(config, 4, 64)
    if args.experts == "q4_0":
        random_q4_0_experts(model)
    backend = get_backend(args.kernels)
    set_expert_backend(model, backend)
    if args.dense_dequantized is None:  # as the loader would
        args.dense_dequantized = default_dequantized_rows(backend)
    if args.dense_dequantized:
        dequantized_prefill(model, args.dense_dequantized)
    n_layers = config["num_hidden_layers"]
    print(f"# profile_prefill: {args.shape}, experts {args.experts}, kernels {backend.name}, "
          f"device {mx.default_device()}, dense dequantized from {args.dense_dequantized or 'never'}")
    results = []
    for T in args.tokens:
        tokens = mx.random.randint(0, config["vocab_size"], (T,))
        prefill(model, tokens)  # warm-up: kernel compiles
        if args.build_only:
            ms = sorted(1e3 * build_graph(model, tokens) for _ in range(args.reps))
            print(f"T={T}: building the graph {statistics.median(ms):.2f} ms (median of {args.reps}: "
                  f"{', '.join(f'{m:.2f}' for m in ms)}), {statistics.median(ms) / n_layers:.3f} ms per layer")
            results.append({"tokens": T, "build_ms": ms})
            continue
        if args.once:
            with profiler_range():
                ms = 1e3 * prefill(model, tokens)
            print(f"T={T}: {ms:.1f} ms (one plain prefill, for a profiler)")
            continue
        whole = statistics.median(prefill(model, tokens) for _ in range(args.reps))
        runs = []
        for rep in range(args.reps + 1):  # the first round warms the instrumented path up
            totals = defaultdict(float)
            with instrumented(model, totals):
                total = prefill(model, tokens)
            if rep:
                runs.append((total, dict(totals)))
        total, parts = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run, whole
        results.append(report(whole, total, parts, T, n_layers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(mx.default_device()), "results": results}, f, indent=2)
    return {"results": results}


if __name__ == "__main__":
    main()
