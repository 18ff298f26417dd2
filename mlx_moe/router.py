"""Routing functions: router scores -> (expert ids, routing weights).

Each family's router is one of these few functions (DESIGN.md section 3,
checked against transformers' reference implementations):

- `softmax_topk`: softmax over all experts (fp32) -> top-k -> optional
  renormalization (qwen3_moe, qwen2_moe, olmoe).
- `topk_softmax`: top-k on the raw logits -> softmax over the k (mixtral).
- `group_limited_topk`: deepseek_v2's group-limited greedy routing.
- `biased_topk`: selection on `probs + correction_bias`, weights from the
  unbiased probabilities (longcat_flash).

All return ids as int32 [T, k] and weights as float32 [T, k].  The k ids of a
token come in no particular order (as from `argpartition`); consumers that
need an order (the routing hook) sort on the host.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx


def topk(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest scores along the last axis (unordered), int32."""
    return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)


def softmax_topk(
    logits: mx.array, k: int, normalize: bool = False
) -> Tuple[mx.array, mx.array]:
    """softmax over all experts in fp32, top-k, optional renormalization."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    ids = topk(probs, k)
    weights = mx.take_along_axis(probs, ids, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids, weights


def topk_softmax(logits: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    """Mixtral: top-k on the logits, then softmax over the k selected logits."""
    logits = logits.astype(mx.float32)
    ids = topk(logits, k)
    weights = mx.softmax(mx.take_along_axis(logits, ids, axis=-1), axis=-1)
    return ids, weights


def group_limited_topk(
    logits: mx.array,
    k: int,
    n_group: int,
    topk_group: int,
    scaling: float = 1.0,
) -> Tuple[mx.array, mx.array]:
    """DeepSeek-V2 group-limited greedy routing.

    Experts form `n_group` equal groups; a group's score is the max
    probability in it; only the `topk_group` best groups stay eligible (the
    others' probabilities are set to 0, as transformers does), then plain
    top-k; weights are the (unnormalized) probabilities x `scaling`.
    """
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    T, E = probs.shape
    grouped = probs.reshape(T, n_group, E // n_group)
    group_scores = grouped.max(axis=-1)  # [T, n_group]
    keep = topk(group_scores, topk_group)  # [T, topk_group]
    group_mask = mx.zeros((T, n_group), dtype=mx.bool_)
    group_mask = mx.put_along_axis(group_mask, keep, mx.array(True), axis=-1)
    masked = mx.where(group_mask[..., None], grouped, 0.0).reshape(T, E)
    ids = topk(masked, k)
    weights = mx.take_along_axis(masked, ids, axis=-1) * scaling
    return ids, weights


def greedy_topk(
    logits: mx.array, k: int, scaling: float = 1.0
) -> Tuple[mx.array, mx.array]:
    """DeepSeek-V2 'greedy': softmax -> top-k -> x scaling, no renormalization."""
    ids, weights = softmax_topk(logits, k)
    return ids, weights * scaling


def biased_topk(
    logits: mx.array,
    k: int,
    correction_bias: Optional[mx.array] = None,
    normalize: bool = False,
    scaling: float = 1.0,
) -> Tuple[mx.array, mx.array]:
    """LongCat-Flash: softmax over all (real + zero) experts; the correction
    bias shifts only the choice, the weights are the unbiased probabilities
    (optionally renormalized) x `scaling`."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    choice = probs if correction_bias is None else probs + correction_bias.astype(mx.float32)
    ids = topk(choice, k)
    weights = mx.take_along_axis(probs, ids, axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return ids, weights * scaling
