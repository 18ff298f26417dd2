"""Reproduce the issue-8 race: ring collectives of one process on two CPU streams at once.

    mlx.launch -n 2 --backend ring -- python tests/ep_race_repro.py MODE ROUNDS

Each round mimics what generation followed by a prompt forward did: a chain of
all_sums is queued with `async_eval` on a second CPU stream (mlx-lm's generate_step
leaves its look-ahead step queued on `generation_stream` when stream_generate
stops), then, without waiting for it, another chain runs on the default stream.
Rank r contributes (r + 1) * base, so every sum is known exactly.

MODE
  two-streams   the collectives follow the stream they are built in (the bug)
  comm-stream   every collective on one dedicated stream (the fix)
  expert-parallel  the collectives are mlx_moe.distributed.ExpertParallel.all_sum
                (what a sharded model uses; tests/test_distributed.py runs this mode)
  sync          two streams, but the second stream is synchronized first
  generate      the real sequence on a tiny sharded Qwen3 model: stream_generate, then
                a forward pass of the prompt, whose logits must equal those of a clean
                forward pass (generate-old: with the all_sum of before the fix)

Each rank prints one line: rank R: MODE rounds=N bad=M (bad: rounds where any value differs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np


def chain(x: mx.array, steps: int, rank: int, total: float, sum_fn) -> mx.array:
    # x <- all_sum(x * (rank + 1)) / total: the value stays x exactly when the sums are right.
    for _ in range(steps):
        x = sum_fn(x * (rank + 1)) / total
        x = x + 0.0  # a local op between collectives, as between MoE layers
    return x


def two_stream_rounds(group, sum_fn, rounds: int, sync: bool = False) -> int:
    """Rounds (of `rounds`) in which a chain of sums queued on a second stream and one run
    on the default stream right after it do not both come out exact.  sync: wait for the
    second stream first.  (tests/ep_worker.py runs this with ExpertParallel.all_sum.)"""
    n, rank = group.size(), group.rank()
    total = n * (n + 1) / 2
    other = mx.new_stream(mx.cpu)
    bad = 0
    rng = np.random.default_rng(0)  # same values on every rank
    for _ in range(rounds):
        a0 = mx.array(rng.standard_normal((17, 64)).astype(np.float32))
        b0 = mx.array(rng.standard_normal((17, 64)).astype(np.float32))
        with mx.stream(other):
            a = chain(a0, 4, rank, total, sum_fn)
            mx.async_eval(a)
        if sync:
            mx.synchronize(other)
        b = chain(b0, 4, rank, total, sum_fn)
        mx.eval(b)
        mx.eval(a)
        if not (np.allclose(np.array(a), np.array(a0), atol=1e-5) and np.allclose(np.array(b), np.array(b0), atol=1e-5)):
            bad += 1
    return bad


def run_generate(group, rounds: int, old: bool) -> int:
    """Rounds in which the prompt's logits after a generation differ from clean ones."""
    import shutil
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mlx_moe
    from mlx_moe import distributed as D
    from tiny import write_tiny_qwen3

    if old:  # the collective follows the current default stream, as before the fix
        D.ExpertParallel.all_sum = lambda self, x: mx.distributed.all_sum(x, group=self.group)
    path = write_tiny_qwen3(Path(tempfile.mkdtemp(prefix="ep_race_")))
    try:
        model, tok = D.load(str(path), group=group)
    finally:
        shutil.rmtree(path)
    prompt = list(b"Expert parallel: ")
    want = model(mx.array([prompt]))[0]
    mx.eval(want)
    bad = 0
    for _ in range(rounds):
        for _ in mlx_moe.stream_generate(model, tok, prompt, max_tokens=3, temp=0.0):
            pass
        got = model(mx.array([prompt]))[0]
        mx.eval(got)
        bad += not np.allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    return bad


def main(mode: str, rounds: int) -> int:
    group = mx.distributed.init(strict=True, backend="ring")
    if mode in ("generate", "generate-old"):
        bad = run_generate(group, rounds, old=mode == "generate-old")
        print(f"rank {group.rank()}: {mode} rounds={rounds} bad={bad}", flush=True)
        return 0
    comm = mx.new_stream(mx.cpu)
    if mode == "expert-parallel":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from mlx_moe.distributed import ExpertParallel, Placement

        sum_fn = ExpertParallel(group, Placement(group.size(), {})).all_sum
    elif mode == "comm-stream":
        sum_fn = lambda x: mx.distributed.all_sum(x, group=group, stream=comm)  # noqa: E731
    elif mode in ("two-streams", "sync"):
        sum_fn = lambda x: mx.distributed.all_sum(x, group=group)  # noqa: E731
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    bad = two_stream_rounds(group, sum_fn, rounds, sync=mode == "sync")
    print(f"rank {group.rank()}: {mode} rounds={rounds} bad={bad}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
