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

Each family states its rule once as a `RouterParams`; `route(logits, params)`
runs it with these MLX ops, and the kernel backends run the same rule as one
fused kernel (mlx_moe/kernels/router.py: `ExpertBackend.route`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx


@dataclass(slots=True)  # built per layer per forward: slots, not frozen (3x cheaper to construct)
class RouterParams:
    """One family's routing rule, from router logits [T, n] to (ids, weights).

        family                         RouterParams
        qwen3_moe, qwen2_moe, olmoe    RouterParams(k, normalize=norm_topk_prob)
        mixtral                        RouterParams(k, score="topk_softmax")
        deepseek_v2 greedy             RouterParams(k, scaling=routed_scaling_factor)
        deepseek_v2 group_limited      RouterParams(k, n_group=..., topk_group=..., scaling=...)
        longcat_flash                  RouterParams(k, bias=e_score_correction_bias,
                                                    normalize=norm_topk_prob, scaling=...)
    """

    k: int
    score: str = "softmax"  # "softmax" | "sigmoid" | "topk_softmax" (Mixtral)
    normalize: bool = False  # divide the k weights by their sum
    scaling: float = 1.0  # multiply the final weights
    n_group: int = 1  # group-limited routing when > 1 (DeepSeek-V2)
    topk_group: int = 1
    bias: Optional[mx.array] = None  # selection-only bias per expert (LongCat)


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


def _biased_choice(scores, k, correction_bias, normalize, scaling):
    """top-k of scores (+ a selection-only bias); weights are the unbiased scores
    (optionally renormalized) x `scaling`."""
    choice = scores if correction_bias is None else scores + correction_bias.astype(mx.float32)
    ids = topk(choice, k)
    weights = mx.take_along_axis(scores, ids, axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
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
    return _biased_choice(probs, k, correction_bias, normalize, scaling)


def sigmoid_topk(
    logits: mx.array,
    k: int,
    correction_bias: Optional[mx.array] = None,
    normalize: bool = False,
    scaling: float = 1.0,
) -> Tuple[mx.array, mx.array]:
    """Sigmoid scores, otherwise as `biased_topk` (DeepSeek-V3-style scoring)."""
    return _biased_choice(mx.sigmoid(logits.astype(mx.float32)), k, correction_bias, normalize, scaling)


def route(logits: mx.array, p: RouterParams) -> Tuple[mx.array, mx.array]:
    """Run the rule `p` on router logits [T, n] with MLX ops (the reference
    the fused router kernel is tested against)."""
    if p.score == "topk_softmax":
        if p.normalize or p.scaling != 1.0 or p.bias is not None or p.n_group > 1:
            raise ValueError("topk_softmax routing takes no normalize, scaling, bias or groups")
        return topk_softmax(logits, p.k)
    if p.score == "sigmoid":
        if p.n_group > 1:
            raise ValueError("group-limited routing is defined for softmax scores only")
        return sigmoid_topk(logits, p.k, p.bias, p.normalize, p.scaling)
    if p.score != "softmax":
        raise ValueError(f"unknown router score {p.score!r}; choose softmax, sigmoid or topk_softmax")
    if p.n_group > 1:
        if p.normalize or p.bias is not None:
            raise ValueError("group-limited routing takes no normalize or bias here")
        return group_limited_topk(logits, p.k, p.n_group, p.topk_group, p.scaling)
    if p.bias is not None:
        return biased_topk(logits, p.k, p.bias, p.normalize, p.scaling)
    if p.normalize:
        ids, weights = softmax_topk(logits, p.k, normalize=True)
        return (ids, weights * p.scaling) if p.scaling != 1.0 else (ids, weights)
    return greedy_topk(logits, p.k, p.scaling) if p.scaling != 1.0 else softmax_topk(logits, p.k)
