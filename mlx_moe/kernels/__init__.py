"""The project's expert kernels (sources in metal/), their registry and dispatch rules.

Importing this package registers the `metal` and `cuda` expert backends where
the device has them (see mlx_moe/backends/kernels.py).
"""

from . import dispatch, registry  # noqa: F401
from .mul_mv_id import mul_mv_id, mul_mv_id_down_combine, mul_mv_id_swiglu  # noqa: F401
from ..backends import kernels as _backends  # noqa: F401  (registers the backends)
