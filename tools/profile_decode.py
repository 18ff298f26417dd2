#!/usr/bin/env python3
"""Where the host time of a decode step goes: per-op launch cost and a Python profile.

Decode of a 48-layer MoE model is host-bound on MLX's CUDA backend (BENCHMARKS.md):
the GPU finishes a step's kernels long before the host has built and launched
them.  This tool measures the two things that decide the host time:

1. ops: the host cost of one graph node, by kind, as a chain of N dependent ops
   built and evaluated (us per op, evaluation included) and built only (us per
   op, Python and graph construction): an elementwise add, rms_norm,
   quantized_matmul, custom kernels (a trivial one with a short or a long
   source, with one or ten template arguments, the long one as include files;
   the fused router), and the
   copy of a small evaluated array to the host.  Times the node count of a
   step (bench_generate --breakdown) gives the floor of a step.
2. profile: cProfile of decoding --gen-tokens tokens through mlx_moe's generate
   on a random model of --shape (Q4_0 experts, kernels --kernels), without and
   with the expert log, top functions by own time.  Time inside MLX's C++
   (graph building, evaluation) shows up under the Python call that entered it.

3. --gpu-step: the GPU side of the compiled decode step.  Decodes --gen-tokens
   tokens through the compiled step (warm), reports wall ms per token, then runs
   --steps more steps between cudaProfilerStart/Stop (through torch), so that

     ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
         --csv --log-file step.csv python tools/profile_decode.py --gpu-step --kernels cuda
     python tools/profile_decode.py --summarize step.csv --steps 2

   gives every kernel of a step and the GPU time a token needs (ncu serializes the
   kernels: their sum is the step's GPU work without overlap).  --engine NAME profiles
   the settings of a tools/bench_generate.py engine name instead of the defaults (e.g.
   mlx-moe+compile+qkvatt+oprojmoe), here and in --host-split.

4. --host-split: whether the compiled step is host- or GPU-bound.  Decodes as
   generate does (the next step queued before the current token is read) and
   times, per token, the three parts of the loop: calling the compiled step
   (the graph replayed: build), mx.async_eval (MLX encodes and launches every
   node: encode), and reading the previous token (wait: the host idles for the
   GPU).  wait near 0: host-bound, build + encode is the time per token.

  python tools/profile_decode.py --shape qwen3-30b-a3b --kernels cuda
  python tools/profile_decode.py --shape tiny --kernels mlx --gen-tokens 16   # CPU smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time

import mlx.core as mx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_generate import SHAPES, build_models, engine_settings, engine_suffixes, random_q4_0_experts  # noqa: E402

from mlx_moe.backends import get_backend  # noqa: E402
from mlx_moe.generation import generate_tokens  # noqa: E402
from mlx_moe.kernels import cuda_cache  # noqa: E402
from mlx_moe.moe import set_expert_backend  # noqa: E402
from mlx_moe.router import RouterParams  # noqa: E402


def op_costs(flavor: str, n: int = 400, reps: int = 5) -> dict:
    """us per op (built and evaluated; built only) for chains of n dependent ops."""
    x = mx.random.normal((1, 2048)).astype(mx.bfloat16)
    w = mx.random.normal((2048, 2048)).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    norm_w = mx.ones((2048,), dtype=mx.bfloat16)
    logits = mx.random.normal((1, 128)).astype(mx.bfloat16)
    mx.eval(x, wq, scales, biases, norm_w, logits)
    params = RouterParams(k=8, normalize=True)
    chains = {
        "add": lambda y: y + 1,
        "rms_norm": lambda y: mx.fast.rms_norm(y, norm_w, 1e-6),
        "quantized_matmul": lambda y: mx.quantized_matmul(y, wq, scales, biases, transpose=True,
                                                          group_size=64, bits=4),
    }
    if flavor == "cuda":
        # what a custom kernel's host cost depends on: the source's length, the template arguments
        from mlx_moe.kernels.registry import kernel_source

        body = "unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < 2048) y[i] = x[i] + T(1);"
        header = kernel_source("cuda", "mul_mv_id", "mul_mv_id_swiglu")[0]
        small = mx.fast.cuda_kernel(name="probe_small", input_names=["x"], output_names=["y"], source=body)
        big = mx.fast.cuda_kernel(name="probe_header", input_names=["x"], output_names=["y"], source=body,
                                  header=header)
        many = [("T", mx.bfloat16)] + [(f"P{i}", i + 1) for i in range(9)]

        def probe(kern, template):
            return lambda y: kern(inputs=[y], template=template, grid=(2048, 1, 1), threadgroup=(256, 1, 1),
                                  output_shapes=[y.shape], output_dtypes=[y.dtype])[0]
        chains["custom kernel, 100 B source, 1 template arg"] = probe(small, [("T", mx.bfloat16)])
        chains[f"custom kernel, {len(header) // 1000} kB header, 1 template arg"] = probe(big, [("T", mx.bfloat16)])
        chains["custom kernel, 100 B source, 10 template args"] = probe(small, many)
        # the same header and body handed to MLX as #include lines (registry.CUDA_SOURCE_FILES)
        from mlx_moe.kernels.source import as_include_files, cuda_source_dir

        inc_h, inc_b = as_include_files(header, body, cuda_source_dir())
        inc = mx.fast.cuda_kernel(name="probe_include", input_names=["x"], output_names=["y"], source=inc_b,
                                  header=inc_h)
        chains[f"custom kernel, {len(header) // 1000} kB header as an include file"] = probe(inc, [("T", mx.bfloat16)])
    if flavor in ("cuda", "metal"):
        from mlx_moe.kernels.router import fused_topk

        # weights back into the activations so the chain is dependent: 5 nodes per link
        # (slice, router kernel, astype, sum, add), reported per link
        chains["router kernel + 4 glue ops"] = lambda y: (
            fused_topk(y[:, :128], params, flavor)[1].astype(mx.bfloat16).sum() + y)
    out = {}
    for name, f in chains.items():
        run, build = [], []
        for _ in range(reps):
            y = x
            t0 = time.perf_counter()
            for _ in range(n):
                y = f(y)
            t1 = time.perf_counter()
            mx.eval(y)
            t2 = time.perf_counter()
            build.append((t1 - t0) / n * 1e6)
            run.append((t2 - t0) / n * 1e6)
        out[name] = {"us_per_op": statistics.median(run[1:]), "build_us_per_op": statistics.median(build[1:])}
        print(f"{name:34s} {out[name]['us_per_op']:8.2f} us/op   build only {out[name]['build_us_per_op']:7.2f} us/op",
              flush=True)
    return out


def transfer_cost(reps: int = 50) -> float:
    """us per device->host copy (np.asarray) of a fresh, evaluated [48, 8] int32 array:
    what the routing hook pays per transfer (mlx_moe/hooks.py)."""
    import numpy as np

    base = mx.arange(384, dtype=mx.int32)
    times = []
    for i in range(reps):
        a = (base + i).reshape(48, 8)
        mx.eval(a)
        t0 = time.perf_counter()
        np.asarray(a)
        times.append(time.perf_counter() - t0)
    us = 1e6 * statistics.median(times)
    print(f"{'device->host copy, [48, 8] int32':34s} {us:8.2f} us", flush=True)
    return us


def profile_generate(model, prompt, gen_tokens: int, log_path=None, top: int = 30) -> str:
    list(generate_tokens(model, prompt, max_tokens=4, expert_log=log_path))  # warm up
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    n = len(list(generate_tokens(model, prompt, max_tokens=gen_tokens, expert_log=log_path)))
    pr.disable()
    dt = time.perf_counter() - t0
    s = io.StringIO()
    s.write(f"{n} tokens in {dt:.3f} s under the profiler ({1e3 * dt / n:.2f} ms per token)\n")
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def gpu_step(model, prompt, gen_tokens: int, steps: int) -> None:
    """Mode --gpu-step (module docstring)."""
    from mlx_moe.compiled import compiled_generate_step, decoder_for

    decoder = decoder_for(model)
    print(f"fused decoder layers: {'on' if decoder.fused else 'off (' + str(decoder.fused_reason) + ')'}")
    gen = compiled_generate_step(mx.array(prompt), model, max_tokens=gen_tokens + 8 + steps)
    for _ in range(8):  # trace, compile, warm
        next(gen)
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        next(gen)
    dt = (time.perf_counter() - t0) / gen_tokens
    print(f"compiled decode: {1e3 * dt:.3f} ms per token ({1 / dt:.1f} tok/s)", flush=True)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device for torch: nothing profiled")
        return
    torch.cuda.init()
    mx.synchronize()
    torch.cuda.profiler.start()
    for _ in range(steps):
        next(gen)
    mx.synchronize()
    torch.cuda.profiler.stop()
    print(f"{steps} steps profiled", flush=True)


def host_split(model, prompt, gen_tokens: int) -> dict:
    """Mode --host-split (module docstring): medians in ms per token."""
    from mlx_moe import compiled
    from mlx_moe.compiled import decoder_for, round_capacity

    decoder = decoder_for(model)
    print(f"fused decoder layers: {'on' if decoder.fused else 'off (' + str(decoder.fused_reason) + ')'}")
    cache = decoder.make_cache(round_capacity(len(prompt) + gen_tokens + 16))
    model(mx.array(prompt[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])

    def step(y):  # as compiled_generate_step decodes greedily
        if compiled.GREEDY_KERNEL:
            return decoder.step_greedy(y, cache)[0]
        return mx.argmax(decoder.step(y, cache), axis=-1)

    y = step(mx.array(prompt[-1:]))
    mx.async_eval(y)
    parts = {"build": [], "encode": [], "wait": [], "total": []}
    for i in range(gen_tokens + 8):
        t0 = time.perf_counter()
        nxt = step(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        y.item()
        t3 = time.perf_counter()
        y = nxt
        if i >= 8:  # after the trace and the warm-up
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(1e3 * v)
    mx.eval(y)
    med = {k: statistics.median(v) for k, v in parts.items()}
    print("compiled step, ms per token (medians over %d tokens): " % gen_tokens
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)
    return med


def summarize(path: str, steps: int) -> None:
    """GPU time per decode step by kernel, from an ncu CSV of --gpu-step (gpu__time_duration)."""
    import collections
    import csv

    rows = list(csv.DictReader(line for line in open(path) if line.startswith('"')))
    per = collections.defaultdict(lambda: [0, 0.0])
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", "")) * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(
            r.get("Metric Unit", "nsecond"), 1)
        name = r["Kernel Name"].split("(")[0].split("<")[0][:60]
        per[name][0] += 1
        per[name][1] += ns
    total = sum(v[1] for v in per.values())
    print(f"GPU time per step: {total / steps / 1e3:.1f} us over {sum(v[0] for v in per.values()) / steps:.0f} kernels")
    for name, (n, ns) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:60s} {n / steps:6.0f} per step {ns / steps / 1e3:9.1f} us")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--skip-ops", action="store_true")
    p.add_argument("--ops-only", action="store_true", help="only the per-node host costs (no model, no profile)")
    p.add_argument("--gpu-step", action="store_true", help="the compiled step's kernels, for ncu (docstring)")
    p.add_argument("--steps", type=int, default=2, help="--gpu-step / --summarize: decode steps profiled")
    p.add_argument("--host-split", action="store_true", help="build / encode / wait per token (docstring)")
    p.add_argument("--summarize", default=None, help="an ncu CSV of --gpu-step: GPU time per step by kernel")
    p.add_argument("--engine", default="mlx-moe+compile",
                   help="the settings to profile, as tools/bench_generate.py's engine names give them "
                        "(e.g. mlx-moe+compile+qkvatt+oprojmoe): --gpu-step and --host-split of a variant")
    cuda_cache.add_argument(p)
    args = p.parse_args(argv)
    engine_suffixes(args.engine)  # an unknown suffix: an error now, not after building the model
    if args.summarize:
        summarize(args.summarize, args.steps)
        return
    cuda_cache.apply(args.cache_preference)

    backend = get_backend(args.kernels)
    print(f"# profile_decode: {args.shape}, kernels {backend.name}, device {mx.default_device()}", flush=True)
    if not args.skip_ops:
        print("\n## host cost per graph node (chains of dependent ops)")
        op_costs(backend.name, n=400 if mx.default_device() == mx.gpu else 10)
        transfer_cost()
    if args.ops_only:
        return
    mx.random.seed(0)
    config = dict(SHAPES[args.shape])
    _, ours = build_models(config, 4, 64)
    random_q4_0_experts(ours)
    set_expert_backend(ours, backend)
    prompt = mx.random.randint(0, config["vocab_size"], (args.prompt_tokens,)).tolist()
    if args.gpu_step or args.host_split:
        with engine_settings(args.engine):
            print(f"settings: {args.engine}", flush=True)
            if args.gpu_step:
                gpu_step(ours, prompt, args.gen_tokens, args.steps)
            else:
                host_split(ours, prompt, args.gen_tokens)
        return
    print("\n## cProfile, decode without the expert log")
    print(profile_generate(ours, prompt, args.gen_tokens, top=args.top), flush=True)
    print("\n## cProfile, decode with the expert log")
    path = os.path.join(tempfile.mkdtemp(), "log.csv")
    print(profile_generate(ours, prompt, args.gen_tokens, log_path=path, top=args.top), flush=True)


if __name__ == "__main__":
    main()
