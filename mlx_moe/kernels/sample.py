"""Greedy sampling of one token's logits in one launch (metal/sample.metal): the
log-sum-exp and the token mlx-lm's greedy generate_step picks,

    lse = logsumexp(logits);  token = argmax(logits - lse)

(the log-probabilities rounded to the logits' type before the argmax, the first
index winning a tie, as MLX's ops compute them).  The compiled decode step uses it
for greedy decoding and leaves `logits - lse` lazy (mlx_moe/compiled.py).

    count = new_counter()                                # once per call site; zero between launches
    token, lse = greedy_sample(logits, flavor, count)    # int32 [1], [1]
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from .registry import check_counter, kernel, ticket_counter

THREADS = 1024  # threads per threadgroup: two logits a thread in a slice of a Qwen3 vocabulary
GROUPS = 128  # threadgroups at most: one wave on an H100 (132 SMs)


def groups_for(vocab: int) -> int:
    """Threadgroups for `vocab` logits: at least two logits a thread, GROUPS at most."""
    return max(1, min(GROUPS, -(-vocab // (2 * THREADS))))


def counter_words(groups: int) -> int:
    """uint32 words of the count input: the ticket's 4, then each threadgroup's share (2)."""
    return 4 + 2 * groups


def new_counter() -> mx.array:
    """A zeroed count input, room for any vocabulary (GROUPS threadgroups; each launch
    leaves its ticket zero again)."""
    return ticket_counter(counter_words(GROUPS))


def greedy_sample(logits: mx.array, flavor: str, count: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """(token int32 [1], lse [1] in the logits' dtype) of one row of logits ([V] or [1, V]).

    flavor: a kernel flavor (mlx_moe/kernels/registry.py), or "mlx" for MLX's own
    ops (the reference; what runs where the kernels cannot).
    count: the kernel's scratch (new_counter()): one per call site, kept between calls
    (made here when None: one more allocation per call)."""
    if logits.ndim == 2 and logits.shape[0] == 1:
        logits = logits.reshape(-1)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"greedy_sample takes one row of logits ([V] or [1, V]); got shape {tuple(logits.shape)}")
    if logits.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        raise ValueError(f"greedy_sample: logits of dtype {logits.dtype} (float16, bfloat16 or float32 expected)")
    vocab = logits.shape[0]
    if flavor == "mlx":
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.argmax(logits - lse, axis=-1, keepdims=True).astype(mx.int32), lse
    groups = groups_for(vocab)
    if count is None:
        count = new_counter()
    else:
        check_counter(count, counter_words(groups), f"greedy_sample over {vocab} logits", "new_counter()")
    template = [("T", logits.dtype), ("V", vocab), ("NT", THREADS), ("NTG", groups)]
    token, lse = kernel(flavor, "greedy_sample")(
        inputs=[logits, count], template=template,
        grid=(groups * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(1,), (1,)], output_dtypes=[mx.int32, logits.dtype])
    return token, lse
