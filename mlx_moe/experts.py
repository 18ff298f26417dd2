"""Stacked expert weights of one MoE layer.

`Experts` holds the three SwiGLU projections of all routed experts of a layer,
each stacked as [n_experts, rows, cols] (rows = output features):

    gate_proj, up_proj: [E, ffn, hidden]     down_proj: [E, hidden, ffn]

A projection is one of
- `SwitchLinear` (mlx-lm): float weights;
- `QuantizedSwitchLinear` (mlx-lm): MLX-quantized weights (affine, mxfp4, ...),
  which `nn.quantize` makes from a `SwitchLinear` when a checkpoint says so;
- `Q4_0SwitchLinear` (mlx_moe.q4_0): GGUF/llama.cpp Q4_0 blocks.

The parameter names match mlx-lm's sanitized checkpoints
(`...switch_mlp.gate_proj.weight` etc.), so mlx-lm and mlx-community weights
load unchanged.  The compute lives in the expert backends, not here.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear


class Experts(nn.Module):
    def __init__(self, hidden_dims: int, ffn_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_dims, ffn_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(hidden_dims, ffn_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(ffn_dims, hidden_dims, num_experts, bias=bias)

    @property
    def num_experts(self) -> int:
        return self.down_proj.num_experts

    @property
    def hidden_dims(self) -> int:
        return self.down_proj.output_dims

    @property
    def ffn_dims(self) -> int:
        return self.gate_proj.output_dims

    def nbytes_per_expert(self) -> int:
        """Bytes of one expert's gate+up+down weights in their loaded format."""
        total = 0
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            for _, v in nn.utils.tree_flatten(proj.parameters()):
                total += v.nbytes
        return total // self.num_experts


def gather_project(
    x: mx.array,
    proj: nn.Module,
    rhs: mx.array,
    lhs: Optional[mx.array] = None,
    sorted_indices: bool = False,
) -> mx.array:
    """x @ W[rhs].T with MLX's gather matmuls, for any projection format.

    x: [B, 1, in] with lhs [P] picking its rows, or [P, 1, in] with lhs None;
    rhs: [P] expert ids.  Returns [P, 1, out].
    """
    if isinstance(proj, SwitchLinear):
        y = mx.gather_mm(
            x, proj.weight.swapaxes(-1, -2), lhs_indices=lhs, rhs_indices=rhs,
            sorted_indices=sorted_indices,
        )
    elif isinstance(proj, QuantizedSwitchLinear):
        y = mx.gather_qmm(
            x, proj.weight, proj.scales, proj.get("biases"),
            lhs_indices=lhs, rhs_indices=rhs, transpose=True,
            group_size=proj.group_size, bits=proj.bits, mode=proj.mode,
            sorted_indices=sorted_indices,
        )
    elif hasattr(proj, "affine"):
        # Q4_0 is affine with group 32 (scale d, bias -8d): the exact MLX form.
        # The exact form has float32 scales, which promote the result: cast back.
        w, scales, biases = proj.affine()
        y = mx.gather_qmm(
            x, w, scales, biases, lhs_indices=lhs, rhs_indices=rhs,
            transpose=True, group_size=32, bits=4, sorted_indices=sorted_indices,
        ).astype(x.dtype)
    else:
        raise TypeError(f"unknown expert projection type {type(proj).__name__}")
    if "bias" in proj:
        y = y + proj["bias"][rhs][:, None, :]
    return y
