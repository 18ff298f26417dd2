"""`mlx-moe convert`: a Hugging Face MoE checkpoint -> an mlx-moe model directory.

    mlx-moe convert --hf-path SRC --out DST [--quant q4_0|f16|bf16]
                    [--dtype source|float16|bfloat16|float32] [--zero-shared-expert]

What is written (DST):

- config.json: the source config, dialect and all, plus
  {"mlx_moe": {"expert_format": "q4_0" | "float", "converted_from": SRC,
  "quant": ..., "dtype": ...}}.  With --zero-shared-expert (or a source that
  already says shared_expert_intermediate_size = 0) the shared expert's size
  is written as 0 (qwen2_moe: shared_expert_intermediate_size, deepseek_v2:
  n_shared_experts) and no shared-expert tensor is written.
- model.safetensors (or model-0000i-of-0000n.safetensors + index): each MoE
  layer's routed experts already stacked under mlx-lm's sanitized names,
  `model.layers.L.<mlp|block_sparse_moe>.switch_mlp.{gate,up,down}_proj.weight`,
  so loading restacks nothing:
    q4_0:     uint16 [E, rows, cols / 32 * 9], llama.cpp's block_q4_0 bytes
              (see mlx_moe/q4_0.py), bit-exact with gguf.quants;
    f16/bf16: [E, rows, cols] in that type (round to nearest even).
  Every other tensor (attention, router, norms, embeddings, dense and shared
  MLPs) keeps its source name and, by default (--dtype source), its source
  bytes unchanged: they are a few percent of a MoE model, and the router and
  norms are where low precision hurts most.  --dtype casts the floating
  ones instead.  LongCat's identity-expert tensors (transformers 5 writes
  some) are dropped: those experts have no FFN.
- the tokenizer files, generation_config.json and chat templates, copied.

Streaming: tensors are read one at a time with plain file reads (no memory
map, whose touched pages would count as resident), each expert is
quantized and written straight to its place in the stacked output tensor:
the output headers are computed up front from the source headers, so a
safetensors shard is written front to back without holding it.  Peak memory
is about one source expert matrix (plus one non-expert tensor, the largest
being the embedding), not a layer and not the model.  Output goes to
*.partial files renamed at the end, so a failed run leaves no loadable
half-model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .loader import ModelLoadError, read_raw_config, resolve_path
from .models import FAMILIES


class ConvertError(ModelLoadError):
    """A checkpoint cannot be converted; the message says why and what to do."""


# -- safetensors: a validating header reader and a streaming writer -------------------------

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> Dict[str, TensorInfo]:
    """Tensor table of a safetensors file, checked against the file size.

    Raises ConvertError naming the file for anything a truncated or corrupted
    file can produce: short header, bad JSON, unknown dtype, offsets that do
    not match the shape or run past the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path}: not a valid safetensors file"
    fix = "the file is truncated or corrupt; download or convert it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{bad} (only {size} bytes); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ConvertError(f"{bad} (header length {n} does not fit in {size} bytes); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{bad} (header is not JSON: {e}); {fix}") from e
    if not isinstance(header, dict):
        raise ConvertError(f"{bad} (header is not a JSON object); {fix}")
    data_start = 8 + n
    out: Dict[str, TensorInfo] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
            if dtype not in ITEMSIZE or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"dtype {dtype!r}, shape {list(shape)}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError(f"data offsets {begin}..{end}")
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{bad} (tensor {name!r} has a malformed entry: {e}); {fix}") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        if end - begin != nbytes or data_start + end > size:
            raise ConvertError(
                f"{bad} (tensor {name!r}: {dtype} {list(shape)} needs {nbytes} bytes, its offsets "
                f"{begin}..{end} give {end - begin} and the data section has {size - data_start}); {fix}"
            )
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
    return out


def read_raw(info: TensorInfo) -> bytearray:
    """The tensor's bytes, by a plain read (page cache, not resident memory)."""
    buf = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        got = f.readinto(buf)
    if got != info.nbytes:
        raise ConvertError(f"{info.file}: tensor {info.name!r} is cut short ({got} of {info.nbytes} bytes); "
                           "the file is truncated")
    return buf


def read_float32(info: TensorInfo) -> np.ndarray:
    """A float tensor widened to float32 (exact for f16 and bf16)."""
    raw = read_raw(info)
    if info.dtype == "F32":
        a = np.frombuffer(raw, dtype="<f4")
    elif info.dtype == "F16":
        a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif info.dtype == "BF16":
        # bf16 is the high half of a float32: shift the bits into place.
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ConvertError(
            f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; conversion reads float "
            "checkpoints (F32, F16, BF16). Convert from the original, unquantized checkpoint."
        )
    return a.reshape(info.shape)


def float32_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> F32 / F16 / BF16 bytes-ready array (round to nearest even)."""
    if dtype == "F32":
        return np.ascontiguousarray(a, dtype="<f4")
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return a.astype("<f2")
    if dtype == "BF16":
        import mlx.core as mx  # numpy has no bfloat16; MLX rounds to nearest even

        return np.array(mx.array(np.ascontiguousarray(a, dtype=np.float32)).astype(mx.bfloat16).view(mx.uint16))
    raise ValueError(dtype)


@dataclass
class OutTensor:
    """One output tensor: its name, dtype, shape and how to produce its bytes."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    produce: object  # callable() -> iterator of bytes-like chunks, in order

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


def safetensors_header(tensors: List[OutTensor], metadata: Optional[dict] = None) -> bytes:
    """The 8-byte length + JSON header for these tensors, stored in this order."""
    header: dict = {"__metadata__": metadata or {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, tensors: List[OutTensor], progress=None) -> None:
    """Write one safetensors file front to back, one chunk in memory at a time."""
    with open(path, "wb") as f:
        f.write(safetensors_header(tensors))
        for t in tensors:
            written = 0
            for chunk in t.produce():
                mv = memoryview(chunk).cast("B")
                f.write(mv)
                written += mv.nbytes
                if progress is not None:
                    progress.update(mv.nbytes)
            if written != t.nbytes:  # a bug, not bad input: never write a file that lies
                raise RuntimeError(f"{t.name}: wrote {written} bytes, header says {t.nbytes}")


# -- the conversion plan --------------------------------------------------------------------

# Per-expert tensors of every supported family (Mixtral's w1/w2/w3 are gate/down/up).
EXPERT_RE = re.compile(
    r"^(?P<prefix>model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))\.experts\."
    r"(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.(?P<leaf>weight|bias)$"
)
PROJ_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# Shared-expert tensors, per family, and the config key that sizes them.
SHARED = {
    "qwen2_moe": (re.compile(r"\.mlp\.shared_expert(_gate)?\."), "shared_expert_intermediate_size"),
    "deepseek_v2": (re.compile(r"\.mlp\.shared_experts\."), "n_shared_experts"),
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json", "chat_template.json",
    "chat_template.jinja",
)
QUANTS = {"q4_0": "U16", "f16": "F16", "bf16": "BF16"}
DTYPES = {"source": None, "float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass
class Plan:
    config: dict  # the config.json to write
    tensors: List[OutTensor] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)


def _source_files(src: Path) -> List[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ConvertError(f"{index}: not a valid safetensors index ({e})") from e
        missing = [n for n in names if not (src / n).exists()]
        if missing:
            raise ConvertError(f"{src}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{src}: no *.safetensors weight files; conversion reads safetensors checkpoints")
    return files


def read_source(src: Path) -> Tuple[dict, Dict[str, TensorInfo]]:
    config = read_raw_config(src)  # as written: the output keeps the source's dialect
    if "quantization" in config or "quantization_config" in config:
        raise ConvertError(
            f"{src}: this checkpoint is already quantized ({'quantization' if 'quantization' in config else 'quantization_config'} "
            "in config.json); convert from the original float checkpoint"
        )
    tensors: Dict[str, TensorInfo] = {}
    for f in _source_files(src):
        for name, info in read_safetensors_header(f).items():
            if name in tensors:
                raise ConvertError(f"{src}: tensor {name!r} is in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    return config, tensors


def _norm_config(config: dict) -> dict:
    return FAMILIES[config["model_type"]].normalize_config(json.loads(json.dumps(config)))


def _n_experts(family: str, cfg: dict) -> int:
    key = {"mixtral": "num_local_experts", "deepseek_v2": "n_routed_experts",
           "longcat_flash": "n_routed_experts"}.get(family, "num_experts")
    n = cfg.get(key)
    if not isinstance(n, int) or n <= 0:
        raise ConvertError(f"config.json: {key} = {n!r}; a MoE checkpoint needs a positive expert count")
    return n


def _expert_producer(infos: List[TensorInfo], quant: str):
    """Chunks of a stacked expert tensor: one expert at a time."""

    def produce() -> Iterator[np.ndarray]:
        from .q4_0 import quantize

        for info in infos:
            w = read_float32(info)
            if quant == "q4_0":
                try:
                    yield quantize(w, name=info.name)
                except ValueError as e:
                    raise ConvertError(f"{info.file.name}: {e}") from e
            else:
                yield float32_to(w, QUANTS[quant])

    return produce


def _plain_producer(info: TensorInfo, dtype: Optional[str]):
    def produce() -> Iterator:
        if dtype is None or dtype == info.dtype or info.dtype not in FLOAT_DTYPES:
            yield read_raw(info)
        else:
            yield float32_to(read_float32(info), dtype)

    return produce


def _stacked_bias_producer(infos: List[TensorInfo], dtype: str):
    def produce() -> Iterator:
        for info in infos:
            yield float32_to(read_float32(info), dtype)

    return produce


def _layer_key(name: str) -> Tuple[int, str]:
    """Output order: non-layer tensors first, then layer by layer."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def make_plan(src: str, config: dict, tensors: Dict[str, TensorInfo], quant: str = "q4_0",
              dtype: str = "source", zero_shared_expert: bool = False) -> Plan:
    """Every output tensor (name, dtype, shape, producer) and the output config.

    Checks everything that can be checked from the headers before a byte is
    written: complete expert sets, equal expert shapes, Q4_0's 32-column rule,
    float source dtypes.
    """
    if quant not in QUANTS:
        raise ConvertError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    family = config["model_type"]
    norm = _norm_config(config)
    n_experts = _n_experts(family, norm)
    out_config = json.loads(json.dumps(config))

    drop_shared = None
    if family in SHARED:
        pattern, key = SHARED[family]
        if zero_shared_expert or norm.get(key) == 0:
            drop_shared = pattern
            out_config[key] = 0
    elif zero_shared_expert:
        raise ConvertError(
            f"--zero-shared-expert: {family} has no shared expert (only "
            f"{' and '.join(SHARED)} have one)"
        )

    plan = Plan(out_config)
    groups: Dict[Tuple[str, str, str], Dict[int, TensorInfo]] = {}
    for name, info in tensors.items():
        m = EXPERT_RE.match(name)
        if m:
            e = int(m.group("expert"))
            if e >= n_experts:  # LongCat's identity experts: no FFN
                plan.dropped.append(name)
                continue
            proj = PROJ_NAMES.get(m.group("proj"), m.group("proj"))
            groups.setdefault((m.group("prefix"), proj, m.group("leaf")), {})[e] = info
            continue
        if ".experts." in name or ".switch_mlp." in name:
            raise ConvertError(
                f"{info.file.name}: tensor {name!r} is an expert tensor in a layout mlx-moe does not "
                "convert (expected per-expert '...experts.N.<gate|up|down>_proj.weight'); "
                "is this checkpoint already converted or fused?"
            )
        if drop_shared is not None and drop_shared.search(name):
            plan.dropped.append(name)
            continue
        if dtype == "source" or info.dtype not in FLOAT_DTYPES:
            out_dtype = info.dtype
        else:
            out_dtype = DTYPES[dtype]
        plan.tensors.append(OutTensor(name, out_dtype, info.shape, _plain_producer(info, DTYPES[dtype])))

    if not groups:
        raise ConvertError(f"{src}: no per-expert tensors found; is this a MoE checkpoint of {family}?")
    bias_dtype = DTYPES[dtype]
    for (prefix, proj, leaf), by_expert in groups.items():
        missing = sorted(set(range(n_experts)) - set(by_expert))
        if missing:
            raise ConvertError(
                f"{src}: {prefix}.experts.*.{proj}.{leaf} is missing experts {missing[:8]} of {n_experts}; "
                "the checkpoint is incomplete (or config.json's expert count is wrong)"
            )
        infos = [by_expert[e] for e in range(n_experts)]
        shapes = {i.shape for i in infos}
        if len(shapes) != 1:
            raise ConvertError(f"{src}: experts of {prefix}.*.{proj}.{leaf} have different shapes {sorted(shapes)}")
        for i in infos:
            if i.dtype not in FLOAT_DTYPES:
                raise ConvertError(
                    f"{i.file.name}: expert tensor {i.name!r} has dtype {i.dtype}; conversion reads float "
                    "checkpoints (F32, F16, BF16). Convert from the original, unquantized checkpoint."
                )
        shape = infos[0].shape
        name = f"{prefix}.switch_mlp.{proj}.{leaf}"
        if leaf == "bias":
            out_dtype = bias_dtype or infos[0].dtype
            plan.tensors.append(OutTensor(name, out_dtype, (n_experts, *shape), _stacked_bias_producer(infos, out_dtype)))
            continue
        if len(shape) != 2:
            raise ConvertError(f"{infos[0].file.name}: expert tensor {infos[0].name!r} has shape {list(shape)}; expected [rows, cols]")
        rows, cols = shape
        if quant == "q4_0":
            if cols % 32:
                raise ConvertError(
                    f"{infos[0].name}: {cols} columns is not a multiple of 32, which Q4_0 needs; "
                    "convert with --quant f16 or --quant bf16"
                )
            out_shape = (n_experts, rows, cols // 32 * 9)
        else:
            out_shape = (n_experts, rows, cols)
        plan.tensors.append(OutTensor(name, QUANTS[quant], out_shape, _expert_producer(infos, quant)))

    plan.tensors.sort(key=lambda t: _layer_key(t.name))
    plan.config["mlx_moe"] = {
        "expert_format": "q4_0" if quant == "q4_0" else "float",
        "converted_from": str(src),
        "quant": quant,
        "dtype": dtype,
    }
    return plan


def shard(tensors: List[OutTensor], max_bytes: int) -> List[List[OutTensor]]:
    shards: List[List[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_plan(plan: Plan, src: Path, out: Path, max_shard_bytes: int = 5 << 30, progress: bool = True) -> List[Path]:
    """Write the shards (via *.partial names), index, config and tokenizer files."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    shards = shard(plan.tensors, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(t.nbytes for t in plan.tensors)
    partials = [out / (nm + ".partial") for nm in names]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress)
    try:
        for path, tensors in zip(partials, shards):
            write_shard(path, tensors, bar)
    except BaseException:
        for p in partials:
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    written = []
    for p, nm in zip(partials, names):
        os.replace(p, out / nm)
        written.append(out / nm)
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: nm for nm, ts in zip(names, shards) for t in ts}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(plan.config, indent=2))
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    return written


def convert(hf_path: str, out: str, quant: str = "q4_0", dtype: str = "source",
            zero_shared_expert: bool = False, max_shard_gb: float = 5.0, progress: bool = True,
            revision: Optional[str] = None) -> Path:
    """Convert `hf_path` (directory or hub repo id) into the model directory `out`."""
    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.glob("model*.safetensors")):
        raise ConvertError(f"{out_dir}: already holds model weights; choose a new --out directory or delete it")
    src = resolve_path(hf_path, revision)
    config, tensors = read_source(src)
    plan = make_plan(hf_path, config, tensors, quant=quant, dtype=dtype, zero_shared_expert=zero_shared_expert)
    write_plan(plan, src, out_dir, max_shard_bytes=int(max_shard_gb * (1 << 30)), progress=progress)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-moe convert",
        description=(
            "Convert a Hugging Face MoE checkpoint (safetensors; local directory or hub repo id) into an "
            "mlx-moe model directory loadable by mlx_moe.load. Routed experts are stacked per layer "
            "[n_experts, rows, cols] in Q4_0 blocks (llama.cpp's layout, bit-exact with gguf.quants) or "
            "f16/bf16. Every other tensor keeps its name and, unless --dtype says otherwise, its source "
            "dtype and bytes. Streams tensor by tensor: peak memory is about one expert matrix."
        ),
    )
    p.add_argument("--hf-path", required=True, help="source model directory or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output directory (must not already hold weights)")
    p.add_argument("--quant", default="q4_0", choices=list(QUANTS),
                   help="expert format: q4_0 (4.5 bits/weight, default), f16 or bf16")
    p.add_argument("--dtype", default="source", choices=list(DTYPES),
                   help="float type of the non-expert tensors (default: as in the source)")
    p.add_argument("--zero-shared-expert", action="store_true",
                   help="drop the shared expert (qwen2_moe, deepseek_v2): config says size 0, no tensors written")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB", help="largest output file (default 5)")
    p.add_argument("--revision", default=None, help="hub revision, for a repo id")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert(args.hf_path, args.out, quant=args.quant, dtype=args.dtype,
                      zero_shared_expert=args.zero_shared_expert, max_shard_gb=args.max_shard_size,
                      progress=not args.quiet, revision=args.revision)
    except ModelLoadError as e:
        print(f"mlx-moe convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
