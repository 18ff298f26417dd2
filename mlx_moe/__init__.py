"""mlx-moe: Mixture-of-Experts language models on MLX, with custom expert kernels
and observable routing.

The public names are imported on first use, so that tools that only read
expert logs (`mlx_moe.analysis`) do not pay for importing MLX and mlx-lm."""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "loader", "ModelLoadError": "loader", "UnsupportedModelError": "loader",
    "generate": "generation", "stream_generate": "generation",
    "SUPPORTED_MODEL_TYPES": "models",
    "RoutingEvent": "hooks", "add_routing_hook": "hooks", "remove_routing_hook": "hooks",
    "routing_hook": "hooks", "flush": "hooks",
    "MoELayer": "moe", "moe_layers": "moe", "set_expert_backend": "moe",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
