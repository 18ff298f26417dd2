#!/usr/bin/env python3
"""The expert log's cost to decode speed, measured inside one generation.

On the H100 machine the host's own speed drifts by up to 1.7x within a minute
(BENCHMARKS.md), so two separate generations, one with the log and one
without, cannot resolve a few percent.  This tool decodes one long sequence
and switches the log on and off in blocks of --block-tokens tokens (order
ABBA: on, off, off, on, ...), all in one pipelined loop as generate runs it
(next step queued before the current token is read, routing events delivered
after each token, the CSV written by the log's writer process).  Neighbouring
blocks see the same host, so the per-pair ratios are tight; their median,
quartiles and the pooled ratio are reported, plus tok/s with and without, the
generating thread's CPU time per pair, and the time per token spent delivering
the routing to the log (HOOKS.poll: reading the records, framing, the pipe).
--join chooses how the records reach the host (HOOKS.join_flavor: auto, the
library's default, on MLX's CUDA backend: one kernel per forward appends the
records to a record chain, read once per --forwards-per-read tokens; none reads
the per-layer arrays).

    python tools/bench_log_overhead.py --shape qwen3-30b-a3b --kernels cuda --blocks 40
    python tools/bench_log_overhead.py --shape qwen3-30b-a3b --kernels cuda --compile
    python tools/bench_log_overhead.py --shape tiny --kernels mlx --blocks 8        # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import mlx.core as mx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_generate import (SHAPES, build_models, compiled_step, pair_overheads, random_q4_0_experts,  # noqa: E402
                            uncompiled_step)

from mlx_moe.backends import get_backend  # noqa: E402
from mlx_moe.compiled import decoder_for, round_capacity  # noqa: E402
from mlx_moe.expert_log import ExpertLog  # noqa: E402
from mlx_moe.hooks import HOOKS  # noqa: E402
from mlx_moe.moe import set_expert_backend  # noqa: E402


def pattern(blocks: int) -> list:
    """ABBA...: True (log on) / False per block, each pair of neighbours one of each."""
    return [(b % 4) in (0, 3) for b in range(blocks)]


class HostBreakdown:
    """--breakdown: time spent in the routing hook's and the log's host steps on the
    generating thread, accumulated while `on` (timed blocks with the log).  Each wrapped
    call adds its own timing (~1 us), so the parts are for shares, not for the overhead
    figure (run without --breakdown for that)."""

    PARTS = (  # (label, owner, attribute): what each part is
        ("record (per MoE layer)", "hooks", "record"),
        ("begin_forward", "hooks", "begin_forward"),
        ("end_forward (the join's launch)", "hooks", "end_forward"),
        ("record_joined", "hooks", "record_joined"),
        ("record_chained", "hooks", "record_chained"),
        ("read record chains", "hooks", "_read_chains"),
        ("read the records (buffers)", "arrays", "buffers"),
        ("frame", "expert_log", "pack_frame"),
        ("pipe write", "log", "_send"),
    )

    def __init__(self, log):
        import mlx_moe.expert_log as expert_log_module
        from mlx_moe import hooks as hooks_module

        self.on = False
        self.seconds = {label: 0.0 for label, _, _ in self.PARTS}
        self._owners = {"hooks": HOOKS, "arrays": hooks_module._ForwardArrays, "expert_log": expert_log_module,
                        "log": log}
        self._saved = []  # (object, name, its own attribute before, or None where it had none)
        for label, owner, name in self.PARTS:
            obj = self._owners[owner]
            self._saved.append((obj, name, vars(obj).get(name)))
            setattr(obj, name, self._timed(label, getattr(obj, name)))

    def _timed(self, label, fn):
        def wrapper(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t
        return wrapper

    def restore(self) -> None:
        for obj, name, own in self._saved:
            if own is None:
                delattr(obj, name)  # an instance: its class's method shows again
            else:
                setattr(obj, name, own)


def measure(model, prompt, log_path, blocks: int, block_tokens: int, warmup_blocks: int, compile: bool,
            breakdown: bool = False) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    capacity = round_capacity(len(prompt) + (blocks + warmup_blocks + 2) * block_tokens)
    if compile:
        decoder = decoder_for(model)
        cache = decoder.make_cache(capacity)
        step = compiled_step(decoder, cache)
    else:
        cache = make_prompt_cache(model)
        step = uncompiled_step(model, cache)
    t0 = time.perf_counter()
    model(mx.array(prompt[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    # the first forward of a process on a fresh machine compiles MLX's CUDA kernels (NVRTC, on this thread)
    print(f"[bench_log_overhead] prompt prefill {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    log = ExpertLog.for_model(log_path, model)
    parts = HostBreakdown(log) if breakdown else None
    handle = None
    times = {True: [], False: []}
    pairs = []
    poll_s = 0.0  # time in HOOKS.poll() during timed blocks with the log (delivery, joining, the pipe write)
    try:
        cur = mx.array(prompt[-1:])
        nxt = step(cur)
        mx.async_eval(nxt)
        # warm-up blocks alternate too: the first block with the log traces the compiled
        # step's recording variant, which must not land in a timed block
        order = pattern(warmup_blocks) + pattern(blocks)
        for b, on in enumerate(order):
            if on and handle is None:
                handle = log.attach(new_sequence=False)
            elif not on and handle is not None:
                log.detach(handle)
                handle = None
            if parts is not None:
                parts.on = on and b >= warmup_blocks
            t0, c0, tp = time.perf_counter(), time.thread_time(), 0.0
            for _ in range(block_tokens):
                cur, nxt = nxt, step(nxt)
                mx.async_eval(nxt)
                cur.item()
                t1 = time.perf_counter()
                HOOKS.poll()
                tp += time.perf_counter() - t1
            if on and (b + 1 == len(order) or not order[b + 1]):
                # the log goes off next: deliver what poll has kept back (records travel in
                # chains of HOOKS.forwards_per_read forwards), inside the block that owes it
                t1 = time.perf_counter()
                HOOKS.flush(keep_last=1)
                tp += time.perf_counter() - t1
            dt = (time.perf_counter() - t0) / block_tokens
            cpu = (time.thread_time() - c0) / block_tokens
            print(f"[block {b}{' warm-up' if b < warmup_blocks else ''}] log {'on ' if on else 'off'} "
                  f"{1e3 * dt:.2f} ms/token, generating thread's CPU {1e3 * cpu:.2f} ms/token, "
                  f"delivery {1e3 * tp / block_tokens:.3f} ms/token",
                  file=sys.stderr, flush=True)
            if b >= warmup_blocks:
                times[on].append(dt)
                pairs.append((on, dt, cpu))
                if on:
                    poll_s += tp
        nxt.item()
    finally:
        if parts is not None:
            parts.restore()
        if handle is not None:
            log.detach(handle)
        log.close()
    # neighbours (blocks 2i, 2i+1) form the pairs: one with the log, one without
    wall, cpu = [], []
    for i in range(0, len(pairs) - 1, 2):
        (a_on, a, ac), (_, b, bc) = pairs[i], pairs[i + 1]  # pattern(): one of the two has the log
        wall.append((a, b) if a_on else (b, a))
        cpu.append((ac, bc) if a_on else (bc, ac))
    per, per_cpu = pair_overheads(wall), pair_overheads(cpu)
    on_ms, off_ms = statistics.median(times[True]), statistics.median(times[False])
    return {
        "tok_s_with_log": 1 / on_ms, "tok_s_without": 1 / off_ms,
        "overhead_median_tok_s_pct": 100 * (1 - off_ms / on_ms),
        "overhead_per_pair_median_pct": per["median"], "per_pair_q1_pct": per["q1"],
        "per_pair_q3_pct": per["q3"], "pairs": per["n"], "overhead_pooled_pct": per["pooled"],
        "rows_logged": log.rows_written,
        "delivery_ms_per_token": 1e3 * poll_s / (len(times[True]) * block_tokens), "per_pair_pct": per["per_pair"],
        # the generating thread's CPU time per token (its host work, without waits): paired the same way
        "cpu_per_pair_median_pct": per_cpu["median"], "cpu_per_pair_pct": per_cpu["per_pair"],
        "breakdown_us_per_token": None if parts is None else {
            label: 1e6 * sec / (len(times[True]) * block_tokens) for label, sec in parts.seconds.items()},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--blocks", type=int, default=40, help="timed blocks, at least 4 (a multiple of 4 keeps ABBA whole)")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--warmup-blocks", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="decode through the compiled step (mlx_moe/compiled.py)")
    p.add_argument("--join", default="auto", choices=["auto", "none", "cuda", "emulated", "mlx"],
                   help="HOOKS.join_flavor: join each forward's routing records on the device; auto (the "
                        "library's default): on MLX's CUDA backend; none: the host reads the per-layer arrays")
    p.add_argument("--forwards-per-read", type=int, default=HOOKS.forwards_per_read,
                   help="HOOKS.forwards_per_read: decode forwards per record chain (one host read each); "
                        "default %(default)s")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the hook's and the log's host steps per token (adds its own ~1 us per call)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.blocks < 4:
        raise SystemExit("--blocks must be at least 4 (two pairs of blocks, one of each with the log)")

    t_start = time.perf_counter()
    mx.random.seed(0)
    config = dict(SHAPES[args.shape])
    _, model = build_models(config, 4, 64)
    random_q4_0_experts(model)
    backend = get_backend(args.kernels)
    set_expert_backend(model, backend)
    prompt = mx.random.randint(0, config["vocab_size"], (args.prompt_tokens,)).tolist()
    path = os.path.join(tempfile.mkdtemp(), "log.csv")
    HOOKS.join_flavor = None if args.join == "none" else args.join
    HOOKS.forwards_per_read = args.forwards_per_read
    print(f"[bench_log_overhead] model built in {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)
    r = measure(model, prompt, path, args.blocks, args.block_tokens, args.warmup_blocks, args.compile,
                args.breakdown)
    join = HOOKS.join_flavor_now()
    print(f"# bench_log_overhead: {args.shape}, kernels {backend.name}, device {mx.default_device()}, "
          f"{'compiled' if args.compile else 'uncompiled'} decode, "
          f"routing {f'record chain ({join}), {args.forwards_per_read} forwards per read' if join else 'per layer'}, "
          f"{args.blocks} blocks of {args.block_tokens} "
          f"tokens (ABBA), {r['rows_logged']} rows logged")
    print(f"decode tok/s: {r['tok_s_without']:.1f} without the log, {r['tok_s_with_log']:.1f} with it "
          f"(medians over blocks): overhead {r['overhead_median_tok_s_pct']:.2f}%")
    print(f"generating thread's CPU time per token, per pair: median {r['cpu_per_pair_median_pct']:.2f}% more "
          f"with the log; delivering the routing to the log (HOOKS.poll) {r['delivery_ms_per_token']:.3f} ms/token")
    print(f"per neighbouring pair (extra time per token): median {r['overhead_per_pair_median_pct']:.2f}%, "
          f"quartiles {r['per_pair_q1_pct']:.2f}% .. {r['per_pair_q3_pct']:.2f}% over {r['pairs']} pairs; "
          f"pooled {r['overhead_pooled_pct']:.2f}%")
    if r["breakdown_us_per_token"]:
        print("host time per token with the log, by step (--breakdown): " + ", ".join(
            f"{label} {us:.1f} us" for label, us in r["breakdown_us_per_token"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(mx.default_device()), **r}, f, indent=2)
    return r


if __name__ == "__main__":
    main()
