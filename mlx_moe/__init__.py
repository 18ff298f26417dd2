"""mlx-moe: Mixture-of-Experts language models on MLX, with custom expert kernels
and observable routing."""

from .hooks import RoutingEvent, add_routing_hook, flush, remove_routing_hook, routing_hook
from .loader import ModelLoadError, UnsupportedModelError, load
from .models import SUPPORTED_MODEL_TYPES
from .moe import MoELayer, moe_layers, set_expert_backend

__version__ = "0.1.0"


from .generation import generate, stream_generate  # noqa: E402


__all__ = [
    "load", "generate", "stream_generate", "ModelLoadError", "UnsupportedModelError", "SUPPORTED_MODEL_TYPES",
    "RoutingEvent", "add_routing_hook", "remove_routing_hook", "routing_hook", "flush",
    "MoELayer", "moe_layers", "set_expert_backend",
]
