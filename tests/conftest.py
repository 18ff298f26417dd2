"""Shared fixtures: tiny reference checkpoints, each built once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Exact float32 matmuls on NVIDIA GPUs: MLX's CUDA backend runs them in TF32
# unless this is 0 (read once, at the first matmul), and the tests compare
# against float32 references.  No effect on the CPU.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# Make `import mlx_moe` work from a plain checkout (no `pip install -e .`).
_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("mlx_moe") is None:
    sys.path.insert(0, str(_ROOT))


class ReferenceCheckpoints:
    """Builds and caches, per variant name (see tests/reference_models.py):

    - `reference(name)`: the transformers-5 checkpoint + transformers' outputs;
    - `hub(name)`: a copy in the hub config dialect (what unmodified mlx-lm reads);
    - `quantized(name)`: (mlx_lm.convert 4-bit dir, transformers' outputs on a
      float checkpoint holding exactly the dequantized 4-bit weights).
    """

    def __init__(self, root: Path):
        self.root = root
        self._refs: dict = {}
        self._hub: dict = {}
        self._quant: dict = {}

    def reference(self, name: str):
        if name not in self._refs:
            import reference_models as rm

            self._refs[name] = rm.build_checkpoint(name, self.root / "hf" / name)
        return self._refs[name]

    def hub(self, name: str) -> Path:
        if name not in self._hub:
            import reference_models as rm

            self._hub[name] = rm.write_hub_dialect(self.reference(name).path, self.root / "hub" / name)
        return self._hub[name]

    def quantized(self, name: str, group_size: int = 32, bits: int = 4):
        key = (name, group_size, bits)
        if key not in self._quant:
            import reference_models as rm
            from mlx_lm import convert

            qdir = self.root / f"q{bits}g{group_size}" / name
            # mlx_lm.convert loads through mlx-lm, which needs the hub dialect.
            convert(str(self.hub(name)), str(qdir), quantize=True, q_group_size=group_size,
                    q_bits=bits, dtype="float32")
            dq = rm.dequantized_hf_checkpoint(qdir, self.reference(name).path, self.root / "dq" / name)
            model = rm.load_transformers(name, dq)
            ref = rm.reference_outputs(rm.VARIANTS[name], model, dq)
            self._quant[key] = (qdir, ref, rm.router_biases(model))
        return self._quant[key]


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory) -> ReferenceCheckpoints:
    import torch

    # One thread: these models are tiny, and on a shared, loaded 2-core machine
    # torch's OpenMP workers spin-wait against each other (measured: a build
    # took 10 s with two threads and 0.4 s with one).
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    return ReferenceCheckpoints(tmp_path_factory.mktemp("reference_models"))
