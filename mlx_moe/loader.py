"""`load(path_or_repo)` -> (model, tokenizer), for the supported MoE families.

mlx-lm does the heavy lifting (config parsing into its ModelArgs, weight
sanitizing and stacking, quantization, attention, KV caches, tokenizer).
We hand it model classes of our own making: mlx-lm's model for the family,
built with our MoE block in place of mlx-lm's (see models/base.py), and a
forward that tells the routing hook where each token sits.  On top of that,
the loader accepts both config dialects and turns every way a checkpoint can
be wrong into one clear error.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .backends import get_backend
from .hooks import HOOKS
from .models import FAMILIES, SUPPORTED_MODEL_TYPES, Family
from .moe import MoELayer, moe_layers, set_expert_backend
from . import prefill
from .prefill import pipeline_layers


class ModelLoadError(Exception):
    """A model could not be loaded; the message says why and what to do."""


class UnsupportedModelError(ModelLoadError):
    pass


# -- model classes ---------------------------------------------------------------------------


def _cache_offset(cache) -> int:
    """Tokens already in the KV cache (the position of the first new token)."""
    if not cache:
        return 0
    c = cache[0]
    while not hasattr(c, "offset") and hasattr(c, "__getitem__"):
        c = c[0]  # CacheList (LongCat: two attention blocks per layer)
    return int(getattr(c, "offset", 0) or 0)


@contextlib.contextmanager
def _block_swapped(module, name: str, block: type):
    """While mlx-lm builds the model, its MoE block class name resolves to ours."""
    original = getattr(module, name)
    setattr(module, name, block)
    try:
        yield
    finally:
        setattr(module, name, original)


def _install_layers(model: nn.Module, family: Family, args) -> None:
    """Number the MoE layers and make the dense/MoE pattern match the config."""
    for i, layer in enumerate(model.layers):
        block = getattr(layer, family.moe_attr, None)
        is_moe = isinstance(block, MoELayer)
        want_moe = family.is_moe_layer(args, i) if family.is_moe_layer else is_moe
        if is_moe and not want_moe:
            if family.dense_mlp is None:
                raise ModelLoadError(f"{family.model_type}: layer {i} should be dense but the family has no dense MLP")
            setattr(layer, family.moe_attr, family.dense_mlp(args))
        elif want_moe and not is_moe:
            raise ModelLoadError(f"{family.model_type}: layer {i} should be a MoE layer but mlx-lm built {type(block).__name__}")
        elif is_moe:
            block.layer_idx = i


def _apply_expert_format(model: nn.Module, config: dict) -> None:
    """Checkpoints written by `mlx-moe convert` may store experts as Q4_0 blocks."""
    fmt = (config.get("mlx_moe") or {}).get("expert_format")
    if fmt in (None, "float"):
        return
    if fmt != "q4_0":
        raise ModelLoadError(f"unknown mlx_moe.expert_format {fmt!r} in config.json (expected 'q4_0')")
    from .q4_0 import Q4_0SwitchLinear

    for layer in [m for _, m in model.named_modules() if isinstance(m, MoELayer)]:
        ex = layer.switch_mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            proj = getattr(ex, name)
            setattr(ex, name, Q4_0SwitchLinear(proj.input_dims, proj.output_dims, proj.num_experts))


def model_classes(config: dict):
    """The (Model, ModelArgs) classes for a config: mlx-lm's, with our MoE layer."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family; "
            f"mlx-moe supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    arch = importlib.import_module(f"mlx_lm.models.{model_type}")

    class Args(arch.ModelArgs):
        @classmethod
        def from_dict(cls, params):
            args = super().from_dict(params)
            args.config = dict(params)  # keys mlx-lm's ModelArgs does not know
            return args

    class Model(arch.Model):
        def __init__(self, args):
            with _block_swapped(arch, family.block_name, family.block):
                super().__init__(args)
            _install_layers(self, family, args)
            _apply_expert_format(self, args.config)
            pipeline_layers(self)  # long prompts may evaluate layer by layer (mlx_moe/prefill.py)
            self.family = family

        def sanitize(self, weights):
            weights = family.sanitize(weights, self.args)
            return super().sanitize(weights)

        def __call__(self, inputs, cache=None, **kwargs):
            if not HOOKS.active:
                return super().__call__(inputs, cache=cache, **kwargs)
            HOOKS.begin_forward(inputs.shape[0], inputs.shape[1], _cache_offset(cache), self.moe_layer_count())
            return HOOKS.end_forward(super().__call__(inputs, cache=cache, **kwargs))

        def moe_layer_count(self) -> int:
            """How many MoE layers a forward runs (counted once: it walks the modules)."""
            n = getattr(self, "_moe_layer_count", None)
            if n is None:
                n = self._moe_layer_count = len(moe_layers(self))
            return n

    Model.__name__ = Model.__qualname__ = f"MoE{arch.Model.__name__}_{model_type}"
    Args.__name__ = Args.__qualname__ = f"{arch.ModelArgs.__name__}_{model_type}"
    return Model, Args


# -- paths, configs, weights -----------------------------------------------------------------


def resolve_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory as is; anything else is a Hugging Face repo id to download."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    looks_local = str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1
    if looks_local:
        raise ModelLoadError(f"{path_or_repo}: no such file or directory (and not a Hugging Face repo id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            str(path_or_repo), revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"],
        ))
    except Exception as e:  # network down, unknown repo, gated repo...
        raise ModelLoadError(
            f"could not download {path_or_repo!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Check the repo id and your network connection, or pass a local model directory."
        ) from e


def read_raw_config(path: Path) -> dict:
    """config.json as written (either dialect), checked to be a supported family."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{path}: no config.json; a model directory needs config.json and *.safetensors weights")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from e
    if "model_type" not in config and "text_config" in config:
        config = {**config["text_config"], **{k: v for k, v in config.items() if k != "text_config"}}
    if "model_type" not in config:
        raise ModelLoadError(f"{cfg_file}: no model_type; mlx-moe supports: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if config["model_type"] not in FAMILIES:
        raise UnsupportedModelError(
            f"{path}: model_type {config['model_type']!r} is not a supported MoE family; "
            f"mlx-moe supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def read_config(path: Path) -> dict:
    """config.json normalized for mlx-lm's ModelArgs (both dialects accepted)."""
    config = read_raw_config(path)
    return FAMILIES[config["model_type"]].normalize_config(config)


def check_weight_files(path: Path) -> None:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{path}: no weight files (model*.safetensors). Download the complete checkpoint, "
            "or convert it with `mlx-moe convert`."
        )
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{index}: not valid JSON ({e})") from e
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            raise ModelLoadError(f"{path}: weight shards listed in {index.name} are missing: {', '.join(missing)}")
    for f in files:
        try:
            mx.load(str(f))
        except Exception as e:
            raise ModelLoadError(f"{f}: cannot read safetensors file ({e}); the file is truncated or corrupt") from e


# -- public ---------------------------------------------------------------------------------


def _weights_error(source, e: ValueError, config_name: str = "config.json") -> ModelLoadError:
    """mlx-lm's / MLX's ValueError on loading weights, as one clear ModelLoadError."""
    msg = str(e)
    if "shape" in msg or "parameters" in msg or "Missing" in msg or "Received" in msg:
        return ModelLoadError(
            f"{source}: the weights do not match {config_name}: {msg}. "
            f"Check that {config_name} belongs to these weights (hidden_size, number of experts, layer count)."
        )
    return ModelLoadError(f"{source}: {msg}")


def _finish(model: nn.Module, config: dict, kernels: str) -> nn.Module:
    backend = get_backend(kernels)
    set_expert_backend(model, backend)
    rows = prefill.default_dequantized_rows(backend)
    if rows:  # long prompts' dense projections as float GEMMs where that was measured to pay
        prefill.dequantized_prefill(model, rows)
    model.config = config
    return model


def load_model(path: Path, config: dict, lazy: bool = False, kernels: str = "auto") -> nn.Module:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    check_weight_files(path)
    try:
        model, _ = mlx_lm_load_model(path, lazy=lazy, model_config=config, get_model_classes=model_classes)
    except ModelLoadError:
        raise
    except ValueError as e:
        raise _weights_error(path, e) from e
    return _finish(model, config, kernels)


def build_model(
    config: dict,
    weights: dict,
    kernels: str = "auto",
    source: str = "<weights>",
    prepare: Optional[Callable[[nn.Module], None]] = None,
) -> nn.Module:
    """A model from a normalized config and a {name: mx.array} dict, no files.

    For formats that are not a model directory (GGUF): the same model classes,
    sanitize and strict weight check as `load_model`, without mlx-lm's file
    reading or MLX-quantization handling.  `prepare(model)` runs before the
    weights are loaded, to swap modules whose type the config cannot say
    (e.g. per-tensor expert formats); `source` names the weights in errors.
    """
    model_cls, args_cls = model_classes(config)
    try:
        model = model_cls(args_cls.from_dict(config))
        if prepare is not None:
            prepare(model)
        weights = model.sanitize(dict(weights))
        model.load_weights(list(weights.items()), strict=True)
    except ModelLoadError:
        raise
    except ValueError as e:
        raise _weights_error(source, e, "its metadata") from e
    mx.eval(model.parameters())
    model.eval()
    return _finish(model, config, kernels)


def load(
    path_or_repo: str,
    kernels: str = "auto",
    lazy: bool = False,
    tokenizer: bool = True,
    revision: Optional[str] = None,
    tokenizer_config: Optional[dict] = None,
) -> Tuple[nn.Module, object]:
    """Load a MoE model and its tokenizer.

    path_or_repo: a local Hugging Face-layout directory (config.json,
      *.safetensors, tokenizer files; mlx-community quantized checkpoints too),
      a .gguf file, or a Hugging Face repo id (downloaded when the network allows).
    kernels: expert backend, "auto" | "mlx" | "metal" | "cuda".
    tokenizer: False returns (model, None) for checkpoints without tokenizer files.
    """
    if str(path_or_repo).endswith(".gguf"):
        from .gguf import load_gguf

        return load_gguf(path_or_repo, kernels=kernels, tokenizer=tokenizer)
    path = resolve_path(path_or_repo, revision)
    config = read_config(path)
    model = load_model(path, config, lazy=lazy, kernels=kernels)
    tok = None
    if tokenizer:
        from mlx_lm.utils import load_tokenizer

        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json / tokenizer.model); pass tokenizer=False to load the model alone")
        tok = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    return model, tok
