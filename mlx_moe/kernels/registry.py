"""Kernel sources -> kernel objects, each built once per process and flavor.

A kernel family is one file in `metal/` (e.g. `mul_mv_id.metal`) holding a
`helpers` section and one `kernel: <name>` section per kernel body, written in
Metal.  Three flavors build kernels from the same text:

- `metal`: `mx.fast.metal_kernel`, header = shims_metal.h + helpers;
- `cuda`: `mx.fast.cuda_kernel`, header = shims_cuda.h + helpers (the shims
  map the Metal names onto CUDA);
- `emulated`: `mlx_moe.emulation.metal_kernel` (the Metal sources compiled as
  C++ and run on the CPU), header as for `metal`.

A family's helpers may build on another family's: a line `//@uses <family>` in
its helpers section puts that family's helpers before its own in the header
(attention.metal's decode_attention_parts uses decode_layer.metal's threadgroup sum).

Where a body cannot be shared (matrix units: simdgroup_matrix on Metal,
tensor-core mma on CUDA), `metal/<family>_cuda.h` holds the CUDA twins in
the same section format: its `helpers` are appended to the shared ones and
its kernel bodies replace the shared bodies of the same name on CUDA.

A kernel with options (a `KernelSpec` whose `body` names another kernel's
section) shares that body: lines between `//@if NAME` and `//@endif` are kept
where NAME is one of the spec's options and dropped elsewhere, `//@if !NAME`
blocks the other way round (a template flag cannot hide code that names
inputs the plain kernel does not have).

`KERNELS` names every kernel the package launches (family, input and output
names); tools that check kernels (tests, tools/verify_metal.py) enumerate it,
and `mlx_moe/kernels/kernel_cases.py` holds at least one verification case per name
(`CASES[name]`, each with `.check(flavor)`).

MLX caches compiled kernels per process, keyed by name and source, but a
kernel object is cheap to keep and costly to rebuild; `get_kernel` creates
each one once.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import mlx.core as mx

from .source import as_include_files, compact, cuda_source_dir, prune

FLAVORS = ("metal", "cuda", "emulated")
_SECTION = re.compile(r"^// ==== (helpers|kernel: (\w+)) ====\s*$", re.M)


def metal_dir() -> Path:
    """The kernel sources: `mlx_moe/metal` in a wheel, `<repo>/metal` in a checkout."""
    here = Path(__file__).resolve().parent.parent  # the mlx_moe package
    for cand in (here / "metal", here.parent / "metal"):
        if (cand / "mul_mv_id.metal").is_file():
            return cand
    raise FileNotFoundError(
        f"mlx-moe's kernel sources (metal/*.metal) are missing: looked in {here / 'metal'} and "
        f"{here.parent / 'metal'}; reinstall the package (pip install -e . from the repository)"
    )


def _sections(text: str) -> Tuple[str, Dict[str, str]]:
    """(helpers, {kernel name: body}) of a text in the `// ==== ... ====` section format."""
    marks = list(_SECTION.finditer(text))
    helpers = ""
    bodies: Dict[str, str] = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        chunk = text[m.end():end]
        if m.group(1) == "helpers":
            helpers = chunk
        else:
            bodies[m.group(2)] = chunk
    return helpers, bodies


@lru_cache(maxsize=None)
def read_family(family: str) -> Tuple[str, Dict[str, str]]:
    """(helpers text, {kernel name: body}) of metal/<family>.metal."""
    helpers, bodies = _sections((metal_dir() / f"{family}.metal").read_text())
    if not bodies:
        raise ValueError(f"metal/{family}.metal has no '// ==== kernel: <name> ====' sections")
    return helpers, bodies


@lru_cache(maxsize=None)
def read_cuda_twin(family: str) -> Tuple[str, Dict[str, str]]:
    """(helpers, {kernel name: body}) of metal/<family>_cuda.h; empty when there is none."""
    path = metal_dir() / f"{family}_cuda.h"
    return _sections(path.read_text()) if path.is_file() else ("", {})


_USES = re.compile(r"^//@uses (\w+)", re.M)


def family_helpers(flavor: str, family: str) -> str:
    """The helpers `flavor` compiles for metal/<family>.metal: those of the families
    it uses (`//@uses`, each once however many of them use it), then its own, each
    family's followed by its CUDA twin's on CUDA."""
    parts = []
    for f in used_families(family):
        parts.append(read_family(f)[0])
        if flavor == "cuda":
            parts.append(read_cuda_twin(f)[0])
    return "\n".join(parts)


def used_families(family: str, _seen: Tuple[str, ...] = (), _done: Optional[list] = None) -> list:
    """`family` after the families it uses (`//@uses`, transitively), each once, every
    family after those it uses."""
    done = [] if _done is None else _done
    if family in _seen:
        raise ValueError(f"metal/{family}.metal: //@uses forms a cycle ({' -> '.join(_seen + (family,))})")
    if family not in done:
        for f in _USES.findall(read_family(family)[0]):
            used_families(f, _seen + (family,), done)
        done.append(family)
    return done


def family_header(flavor: str, family: str) -> str:
    """The shims and every helper `flavor` compiles for metal/<family>.metal, compacted
    (mlx_moe/kernels/source.py); kernel_source keeps of it what a kernel uses."""
    cuda = flavor == "cuda"
    return _family_header(flavor, family, CUDA_FENCE if cuda else "", CUDA_HANDOFF if cuda else "")


@lru_cache(maxsize=None)
def _family_header(flavor: str, family: str, fence: str, handoff: str = "") -> str:
    return compact(_shims(flavor, fence, handoff) + "\n" + family_helpers(flavor, family))


def family_bodies(flavor: str, family: str) -> Dict[str, str]:
    """{kernel section: body} `flavor` compiles for metal/<family>.metal: its own, its CUDA
    twin's in their place on CUDA."""
    _, bodies = read_family(family)
    return {**bodies, **read_cuda_twin(family)[1]} if flavor == "cuda" else bodies


def kernel_source(flavor: str, family: str, name: str) -> Tuple[str, str]:
    """(header, body) that `flavor` compiles for kernel `name` of metal/<family>.metal:
    compacted, the header pruned to the definitions the body uses (source.py says why)."""
    bodies = family_bodies(flavor, family)
    spec = KERNELS.get(name)
    section = spec.body if spec is not None and spec.body else name
    if section not in bodies:
        raise KeyError(f"metal/{family}.metal has no kernel {section!r} (has: {', '.join(bodies)})")
    body = compact(with_bodies(flavor, with_options(bodies[section], spec.options if spec else ())))
    return prune(family_header(flavor, family), body), body


# `//@body FAMILY/SECTION OPTION... NAME=NEW...` on a line of its own: that kernel
# section's body, with those options, in place of the line (a kernel that chains other
# kernels' work in one launch runs their bodies as they are: metal/decode_chain.metal).
# NAME=NEW renames an identifier of the body (a template parameter the chained bodies
# both use with different values, such as two projections' K: C++ lets no inner scope
# redeclare a template parameter).
_BODY = re.compile(r"^[ \t]*//@body (\w+)/(\w+)((?:[ \t]+\w+(?:=\w+)?)*)[ \t]*$", re.M)


def with_bodies(flavor: str, body: str) -> str:
    """`body` with its `//@body` lines replaced by the sections they name (not nested)."""
    def one(m) -> str:
        family, section, words = m.group(1), m.group(2), m.group(3).split()
        bodies = family_bodies(flavor, family)
        if section not in bodies:
            raise KeyError(f"//@body {family}/{section}: metal/{family}.metal has no such kernel section")
        text = with_options(bodies[section], tuple(w for w in words if "=" not in w))
        renames = dict(w.split("=") for w in words if "=" in w)
        if renames:
            text = re.sub(r"\b(" + "|".join(map(re.escape, renames)) + r")\b", lambda r: renames[r.group(1)], text)
        return text
    return _BODY.sub(one, body)


# an innermost block: no `//@if` line between its own and its `//@endif`
_OPTION = re.compile(r"^[ \t]*//@if (!?)(\w+)[ \t]*\n((?:(?![ \t]*//@if )[^\n]*\n)*?)^[ \t]*//@endif[ \t]*\n",
                     re.M)


def with_options(body: str, options: Tuple[str, ...]) -> str:
    """`body` with its `//@if NAME ... //@endif` blocks kept for the options given and
    dropped for the others; `//@if !NAME` blocks the other way round.  Blocks nest: the
    innermost are resolved first, then the ones around them."""
    while True:
        out = _OPTION.sub(lambda m: m.group(3) if (m.group(2) in options) != bool(m.group(1)) else "", body)
        if out == body:
            return out
        body = out


class KernelSpec(NamedTuple):
    family: str  # metal/<family>.metal
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    body: Optional[str] = None  # the kernel section it runs, when not its own name
    options: Tuple[str, ...] = ()  # the `//@if` blocks of that body it keeps
    # Inputs the kernel also writes (through moe_inplace): MLX has no such notion,
    # its kernels write through the input's pointer; the CPU emulation copies them
    # back into the arrays.  Only for buffers no other node of the graph reads
    # concurrently (the compiled decode step's KV cache).
    inplace: Tuple[str, ...] = ()
    # Later threadgroups wait for earlier ones of the same launch (moe_wait_count):
    # sound where the GPU starts a launch's threadgroups in index order, as NVIDIA's
    # do (single-pass scans' decoupled look-back leans on the same); Apple documents
    # no such order, so such kernels are off on Metal unless measured there.  The CPU
    # emulation runs their threadgroups in index order (else last-numbered first).
    in_order: bool = False


# Every kernel the package launches.  Names are stable: tools and tests key on them.
KERNELS: Dict[str, KernelSpec] = {
    "mul_mv_id": KernelSpec("mul_mv_id", ("src", "ids", "w"), ("out",)),
    "mul_mv_id_swiglu": KernelSpec("mul_mv_id", ("x", "ids", "wg", "wu"), ("h",)),
    "mul_mv_id_down_combine": KernelSpec("mul_mv_id", ("h", "ids", "wts", "x", "wd"), ("y",)),
    "mul_mm_id_map0": KernelSpec("mul_mm_id", ("ids",), ("counts", "offsets", "pairs", "tiles")),
    "mul_mm_id_map0_count": KernelSpec("mul_mm_id", ("ids",), ("seg",)),
    "mul_mm_id_map0_lists": KernelSpec("mul_mm_id", ("ids", "seg"), ("counts", "offsets", "pairs", "tiles")),
    "mul_mm_id": KernelSpec("mul_mm_id", ("src", "pairs", "tiles", "offsets", "w"), ("out",)),
    "mul_mm_id_swiglu": KernelSpec("mul_mm_id", ("x", "pairs", "tiles", "offsets", "wg", "wu"), ("h",)),
    "mul_mm_id_combine": KernelSpec("mul_mm_id", ("d", "ids", "wts", "x"), ("y",)),
    "moe_router_topk": KernelSpec("router", ("logits", "bias", "scale"), ("ids", "weights")),
    "mul_mv_id_swiglu_route": KernelSpec("mul_mv_id", ("x", "logits", "bias", "scale", "wg", "wu"),
                                         ("h", "ids", "weights"), body="mul_mv_id_swiglu", options=("ROUTE",)),
    "mul_mv_id_down_combine_res": KernelSpec("mul_mv_id", ("h", "ids", "wts", "x", "wd", "res"), ("y",),
                                             body="mul_mv_id_down_combine", options=("RESIDUAL",)),
    "mul_mv_id_moe": KernelSpec("mul_mv_id", ("x", "logits", "bias", "scale", "wg", "wu", "wd", "res", "count"),
                                ("h", "ids", "weights", "y"), inplace=("count",), in_order=True),
    "mul_mv_id_moe_trace": KernelSpec("mul_mv_id", ("x", "logits", "bias", "scale", "wg", "wu", "wd", "res", "count"),
                                      ("h", "ids", "weights", "y", "trace"), body="mul_mv_id_moe",
                                      options=("TRACE",), inplace=("count",), in_order=True),
    "mul_mv_id_moe_ids": KernelSpec("mul_mv_id", ("x", "ids", "weights", "wg", "wu", "wd", "res", "count"),
                                    ("h", "y"), body="mul_mv_id_moe", options=("IDS",), inplace=("count",),
                                    in_order=True),
    "mul_mv_id_moe_ids_trace": KernelSpec("mul_mv_id", ("x", "ids", "weights", "wg", "wu", "wd", "res", "count"),
                                          ("h", "y", "trace"), body="mul_mv_id_moe", options=("IDS", "TRACE"),
                                          inplace=("count",), in_order=True),
    "decode_attention": KernelSpec("attention", ("q", "k", "v", "pos", "scale"), ("out",)),
    # the fused one-token decoder layer (mlx_moe/fused_step.py)
    "dense_norm": KernelSpec("decode_layer", ("x", "gin", "w0", "w0_s", "w0_b", "w1", "w1_s", "w1_b", "w2", "w2_s",
                                              "w2_b", "b0", "b1", "b2", "cst"), ("y",)),
    "dense_norm_xn": KernelSpec("decode_layer", ("x", "gin", "w0", "w0_s", "w0_b", "w1", "w1_s", "w1_b", "w2",
                                                 "w2_s", "w2_b", "b0", "b1", "b2", "cst"), ("y", "xn"),
                                body="dense_norm", options=("XN",)),
    "decode_attention_parts": KernelSpec("attention", ("y", "q_norm", "k_norm", "k", "v", "pos", "cst"),
                                         ("parts", "ml", "kn", "vn")),
    "decode_attention_parts_kv": KernelSpec("attention", ("y", "q_norm", "k_norm", "k", "v", "pos", "cst"),
                                            ("parts", "ml"), body="decode_attention_parts", options=("KV",),
                                            inplace=("k", "v")),
    "dense_residual": KernelSpec("decode_layer", ("x", "w", "w_s", "w_b", "res"), ("out",)),
    "dense_embed": KernelSpec("decode_layer", ("token", "w", "w_s", "w_b"), ("out",)),
    "dense_residual_parts": KernelSpec("decode_layer", ("parts", "ml", "w", "w_s", "w_b", "res"), ("out",),
                                       body="dense_residual", options=("PARTS",)),
    "dense_residual_parts_router": KernelSpec("decode_layer", ("parts", "ml", "w", "w_s", "w_b", "res", "gpost", "wr",
                                                               "wr_s", "wr_b", "cst", "count"),
                                              ("out", "xn", "logits"), body="dense_residual",
                                              options=("PARTS", "ROUTER", "RONE"), inplace=("count",)),
    "dense_residual_parts_router_split": KernelSpec("decode_layer", ("parts", "ml", "w", "w_s", "w_b", "res", "gpost",
                                                                     "wr", "wr_s", "wr_b", "cst", "count"),
                                                    ("out", "xn", "logits"), body="dense_residual",
                                                    options=("PARTS", "ROUTER", "RSPLIT"), inplace=("count",)),
    "dense_residual_parts_router_split_route": KernelSpec("decode_layer", ("parts", "ml", "w", "w_s", "w_b", "res",
                                                                           "gpost", "wr", "wr_s", "wr_b", "cst",
                                                                           "count", "rbias", "rscale"),
                                                          ("out", "xn", "logits", "ids", "weights"),
                                                          body="dense_residual",
                                                          options=("PARTS", "ROUTER", "RSPLIT", "RRULE"),
                                                          inplace=("count",)),
    # launches of the fused decoder layer chained into one (metal/decode_chain.metal)
    "qkv_attention": KernelSpec("decode_chain", ("x", "gin", "w0", "w0_s", "w0_b", "w1", "w1_s", "w1_b", "w2",
                                                 "w2_s", "w2_b", "b0", "b1", "b2", "cst", "q_norm", "k_norm", "k",
                                                 "v", "pos", "acst", "count"),
                                ("y", "parts", "ml"), inplace=("k", "v", "count"), in_order=True),
    "qkv_attention_oproj": KernelSpec("decode_chain", ("x", "gin", "w0", "w0_s", "w0_b", "w1", "w1_s", "w1_b", "w2",
                                                       "w2_s", "w2_b", "b0", "b1", "b2", "cst", "q_norm", "k_norm",
                                                       "k", "v", "pos", "acst", "count", "ow", "ow_s", "ow_b",
                                                       "gpost", "wr", "wr_s", "wr_b", "ocst", "ocount"),
                                      ("y", "parts", "ml", "out", "xn", "logits"),
                                      inplace=("k", "v", "count", "ocount"), in_order=True),
    "oproj_moe": KernelSpec("decode_chain", ("parts", "ml", "w", "w_s", "w_b", "res", "gpost", "wr", "wr_s", "wr_b",
                                             "cst", "count", "bias", "scale", "wg", "wu", "wd", "mcount", "ccount"),
                            ("out", "xn", "logits", "h", "ids", "weights", "y"),
                            inplace=("count", "mcount", "ccount"), in_order=True),
    # greedy sampling of the compiled decode step (mlx_moe/kernels/sample.py)
    "greedy_sample": KernelSpec("sample", ("logits", "count"), ("token", "lse"), inplace=("count",)),
    # per-layer inputs: "ids*" stands for ids0, ids1, ... (see layered_kernel)
    "routing_join": KernelSpec("routing_join", ("ids*", "weights*"), ("out",)),
    "routing_join_record": KernelSpec("routing_join", ("ids*", "weights*", "record_in"), ("record_out",),
                                      body="routing_join", options=("RECORD",)),
}


_CONSTANTS: Dict[object, mx.array] = {}


def device_array(values, dtype=mx.float32) -> mx.array:
    """`values` as an evaluated array in device memory, padded with zeros to 4 elements.

    Why: MLX's CUDA allocator puts arrays made from host data, and every buffer of 8
    bytes or less, in managed (unified) memory, the small ones packed together in
    shared pages; a kernel's first read of such a page after the host touched one
    of its neighbours (the step's position, a token read back) waits for the page
    to migrate.  An operation's output of more than 8 bytes lives in device memory.
    """
    return device_arrays([values], dtype)[0]


@contextmanager
def switched(module_name: str, switches: Tuple[str, ...], **settings):
    """Module `module_name`'s switches (module-level settings that pick kernels and their
    variants, each one of `switches`) set to `settings` inside the block, restored after:
    checks and benchmarks of one variant (mul_mm_id.switched, dense.router_tail)."""
    module = sys.modules[module_name]
    unknown = [name for name in settings if name not in switches]
    if unknown:
        raise AttributeError(f"{module_name.rsplit('.', 1)[-1]} has no switch {', '.join(unknown)}; "
                             f"switches: {', '.join(switches)}")
    saved = {name: getattr(module, name) for name in settings}
    for name, value in settings.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def device_arrays(values_list, dtype=mx.float32) -> list:
    """device_array of each of `values_list`, all evaluated at once (one wait, not one each)."""
    out = []
    for values in values_list:
        vals = list(values) + [0] * max(0, 4 - len(values))
        a = mx.array(vals, dtype=dtype)
        out.append(a + mx.zeros_like(a))  # made on the device: the output is a device buffer
    mx.eval(out)
    return out


def ticket_counter(words: int = 4) -> mx.array:
    """A fresh uint32 counter of `words` words in device memory, zeroed: the input a
    kernel's threadgroups count themselves on (moe_ticket: dense_residual's router
    tail, mul_mv_id_moe); each launch leaves it zero again.  One per call site."""
    return ticket_counters(1, words)[0]


def ticket_counters(n: int, words: int = 4) -> list:
    """n fresh counters, made with one evaluation (a model's layers take one each)."""
    return device_arrays([[0] * words] * n, mx.uint32)


def check_counter(count: mx.array, words: int, owner: str, make: str = "registry.ticket_counter()") -> None:
    """Raise ValueError unless `count` can be `owner`'s counter: uint32, `words` words at least."""
    if count.dtype != mx.uint32 or count.size < words:
        raise ValueError(f"{owner}: the counter is {count.size} {count.dtype} values; it needs {words} uint32 "
                         f"words, zero (make it with {make})")


def constant(value: float) -> mx.array:
    """A float32 kernel input holding `value` first (device_array: padded to 4
    elements), made once: built per call, it would be one more allocation and copy
    (or, as mx.zeros, one more launch) per layer and token, and decode is bound by those."""
    a = _CONSTANTS.get(value)
    if a is None:
        a = _CONSTANTS[value] = device_array([value])
    return a


def constants(values: Tuple[float, ...]) -> mx.array:
    """A float32 kernel input holding `values` (device_array), made once (as `constant`)."""
    a = _CONSTANTS.get(values)
    if a is None:
        a = _CONSTANTS[values] = device_array(values)
    return a


_STAND_INS: Dict[object, mx.array] = {}


def stand_in(dtype) -> mx.array:
    """A 1-element input of `dtype` for a kernel input an option leaves unread (made once)."""
    a = _STAND_INS.get(dtype)
    if a is None:
        a = _STAND_INS[dtype] = mx.array([0], dtype=dtype)
    return a


def kernel(flavor: str, name: str):
    """The kernel object for a name of KERNELS, built on first use."""
    spec = KERNELS[name]
    return get_kernel(flavor, spec.family, name, list(spec.inputs), list(spec.outputs))


# The CUDA shims' device-scope fence (MOE_FENCE, metal/shims_cuda.h): "sc" (fence.sc.gpu,
# __threadfence) or "acq_rel" (fence.acq_rel.gpu, a lighter barrier that the hand-offs'
# message passing allows).  "sc" until the H100 measures the other (engine +acqrel,
# MLX_MOE_CUDA_FENCE=acq_rel); read as kernels are built (their cache keys carry it).
CUDA_FENCES = {"sc": "__threadfence()", "acq_rel": 'asm volatile("fence.acq_rel.gpu;" ::: "memory")'}
CUDA_FENCE = os.environ.get("MLX_MOE_CUDA_FENCE", "sc")

# How many threads of a threadgroup fence at the decode step's hand-offs outside the MoE
# layer (metal/decode_chain.metal's chained launches, decode_layer.metal's router tail):
# "all" (each thread before the barrier) or "one" (the leader after it on the releasing
# side, before it on the acquiring one: moe_handoff_one, as the MoE layer's stage bit 2048,
# which took 0.5-1.1 us off that layer on the H100).  "all" until the H100 measures "one"
# in the decode step (engine +handoff1, MLX_MOE_CUDA_HANDOFF=one); read as kernels are
# built (their cache keys and names carry it).
CUDA_HANDOFFS = {"all": 0, "one": 1}
CUDA_HANDOFF = os.environ.get("MLX_MOE_CUDA_HANDOFF", "all")


def fence_tag(flavor: str) -> str:
    """What a kernel's name carries of its fence: nothing for the defaults ("sc", hand-offs
    "all") or off CUDA, "_acqrel" for "acq_rel", then "_h1" for CUDA_HANDOFF "one" -- so a
    process can build a kernel under both and a profiler tell their launches apart
    (tools/ncu_summary.py tags them +acqrel).  MLX's CUDA backend
    keeps a process's compiled custom kernels by name and template arguments alone
    (mlx/backend/cuda/custom_kernel.cpp, get_jit_module): under one name the second fence's
    source would run the first's kernel."""
    if flavor != "cuda":
        return ""
    return ("" if CUDA_FENCE == "sc" else "_" + CUDA_FENCE.replace("_", "")) + ("_h1" if CUDA_HANDOFF == "one" else "")


@lru_cache(maxsize=None)
def _shims(flavor: str, fence: str = "", handoff: str = "") -> str:
    if flavor != "cuda":
        return (metal_dir() / "shims_metal.h").read_text()
    if fence not in CUDA_FENCES:
        raise ValueError(f"CUDA fence {fence!r} (registry.CUDA_FENCE, MLX_MOE_CUDA_FENCE): want one of "
                         f"{', '.join(CUDA_FENCES)}")
    handoff = handoff or "all"
    if handoff not in CUDA_HANDOFFS:
        raise ValueError(f"CUDA hand-off {handoff!r} (registry.CUDA_HANDOFF, MLX_MOE_CUDA_HANDOFF): want one of "
                         f"{', '.join(CUDA_HANDOFFS)}")
    return (f"#define MOE_FENCE {CUDA_FENCES[fence]}\n#define MOE_HANDOFF_ONE {CUDA_HANDOFFS[handoff]}\n"
            + (metal_dir() / "shims_cuda.h").read_text())


def _maker(flavor: str) -> Callable:
    if flavor == "metal":
        return mx.fast.metal_kernel
    if flavor == "cuda":
        return mx.fast.cuda_kernel
    if flavor == "emulated":
        from ..emulation import metal_kernel  # CPU emulation of the Metal kernel environment

        return metal_kernel
    raise ValueError(f"unknown kernel flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")


_KERNELS: Dict[tuple, object] = {}

# CUDA: hand MLX `#include` lines of source files instead of the source text
# (source.as_include_files: MLX hashes a kernel's whole source on every
# evaluation, ~15 kB for each of a fused layer's launches).  H100, Qwen3-30B-A3B,
# one machine (BENCHMARKS.md 2026-12-06, sixth session): the compiled step's host
# time 2.614 ms a token against 2.922, decode 374.6 tok/s against 313.4 (7 of 7
# paired repetitions faster), so on by default; MLX_MOE_CUDA_SOURCE_FILES=0 (or
# engine +srctext) passes the text.  Read when a kernel object is first built.
CUDA_SOURCE_FILES = os.environ.get("MLX_MOE_CUDA_SOURCE_FILES", "1") == "1"
_FILES_FAILED: list = []  # why the files could not be written (then the text is inlined)


def _cuda_source(header: str, body: str) -> Tuple[str, str]:
    """(header, body) as MLX receives them on CUDA: include lines where
    CUDA_SOURCE_FILES is on and the files can be written, else the text."""
    if not CUDA_SOURCE_FILES or _FILES_FAILED:
        return header, body
    try:
        return as_include_files(header, body, cuda_source_dir())
    except OSError as e:  # read-only home and temp: the kernels still work, inlined
        import warnings

        _FILES_FAILED.append(str(e))
        warnings.warn(f"mlx-moe: cannot write CUDA kernel source files ({e}); passing the source text "
                      f"to MLX instead (set MLX_MOE_CUDA_SOURCE_DIR to a writable directory)", RuntimeWarning)
        return header, body


_PER_LAYER = re.compile(r"^(\s*)PER_LAYER\((.*)\)\s*$", re.M)


def layered_kernel(flavor: str, name: str, n_layers: int):
    """The kernel object of a KERNELS name with per-layer inputs ("ids*" -> ids0 ..
    ids{n_layers-1}), built once per layer count (see get_kernel's n_layers)."""
    spec = KERNELS[name]
    return get_kernel(flavor, spec.family, name, _layer_inputs(spec.inputs, n_layers), spec.outputs, n_layers)


@lru_cache(maxsize=None)
def _layer_inputs(patterns: Tuple[str, ...], n_layers: int) -> Tuple[str, ...]:
    return tuple(name for p in patterns
                 for name in ([f"{p[:-1]}{l}" for l in range(n_layers)] if p.endswith("*") else [p]))


def get_kernel(flavor: str, family: str, name: str, inputs, outputs, n_layers: Optional[int] = None):
    """The kernel object for `name` of metal/<family>.metal, built on first use.

    n_layers: the body's PER_LAYER(text) lines become one copy per layer with @ ->
    the layer index, and the kernel is named and kept per layer count."""
    files = flavor == "cuda" and CUDA_SOURCE_FILES
    key = ((flavor, family) + (() if n_layers is None else (n_layers,)) + (("files",) if files else ())
           + ((CUDA_FENCE, CUDA_HANDOFF) if flavor == "cuda" else ()) + (name,))
    kernel = _KERNELS.get(key)  # name last: verify/run.py reads it
    if kernel is None:
        header, body = kernel_source(flavor, family, name)
        if n_layers is not None:
            body = _PER_LAYER.sub(lambda m: "\n".join(m.group(1) + m.group(2).replace("@", str(l))
                                                       for l in range(n_layers)), body)
        if files:
            header, body = _cuda_source(header, body)
        spec = KERNELS.get(name)
        extra = {}
        if flavor == "emulated" and spec is not None:
            extra = {k: v for k, v in (("inplace_inputs", spec.inplace), ("in_order", spec.in_order)) if v}
        kernel = _maker(flavor)(
            name=f"mlx_moe_{name}" + fence_tag(flavor) + ("" if n_layers is None else f"_{n_layers}"),
            input_names=list(inputs), output_names=list(outputs), source=body, header=header, **extra,
        )
        _KERNELS[key] = kernel
    return kernel
