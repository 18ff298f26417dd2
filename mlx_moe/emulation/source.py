"""The kernel source exactly as ``mx.fast.metal_kernel`` assembles it.

MLX (0.32.x) writes the Metal translation unit from the kernel body: the
user's header, a ``template <...>`` line when template arguments are given,
the ``[[kernel]]`` signature (inputs, their ``_shape``/``_strides``/``_ndim``
when named in the body, outputs, then the Metal attributes whose names occur
in the body), the body, and an explicit instantiation for templates.  This
module reproduces that text byte for byte (a test checks it against MLX's own
``verbose`` output), and records each parameter so the emulator can pass
the right argument to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import mlx.core as mx

# Inputs with fewer elements than this are passed in the `constant` space.
MAX_CONSTANT_ARRAY_SIZE = 8

# MLX's list of Metal attributes, in its order: (name, type).
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

_TYPE_NAMES = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
    mx.float64: "double",
    mx.complex64: "complex64_t",
}

TemplateValue = Union[mx.Dtype, int, bool]


def type_string(dtype: mx.Dtype) -> str:
    """The Metal type name MLX writes for a dtype."""
    try:
        return _TYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"[metal emulation] unsupported dtype {dtype}") from None


def _template_value(value: TemplateValue) -> str:
    # bool before int: True is an int in Python, MLX writes it as 1 / 0.
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, mx.Dtype):
        return type_string(value)
    raise TypeError(
        f"[metal emulation] template values must be mx.Dtype, int or bool, got {value!r}"
    )


def _template_kind(value: TemplateValue) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


def template_def(template: Sequence[tuple[str, TemplateValue]]) -> str:
    """``<float16_t, 4, 1>`` for the given template arguments."""
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


@dataclass(frozen=True)
class InputInfo:
    """What the generated signature depends on for one input."""

    dtype: mx.Dtype
    ndim: int
    size: int


@dataclass(frozen=True)
class Param:
    """One parameter of the generated kernel signature, in order.

    kind: "input", "shape", "strides", "ndim", "output" or "attr";
    index: the input/output index (-1 for attributes); name: the parameter
    name; ctype: its element type; buffer: its [[buffer(i)]] index (-1 for
    attributes); by_ref: a 0-d input passed as a reference.
    """

    kind: str
    index: int
    name: str
    ctype: str
    buffer: int
    by_ref: bool = False


@dataclass(frozen=True)
class GeneratedKernel:
    kernel_name: str
    source: str
    params: tuple[Param, ...]
    template: tuple[tuple[str, TemplateValue], ...]


def kernel_name(
    name: str,
    inputs: Sequence[InputInfo],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[tuple[str, TemplateValue]],
) -> str:
    """The host name MLX gives a kernel instance."""
    out = "custom_kernel_" + name
    if template:
        # MLX 0.32.4 also replaces '-' (negative template values), which its
        # public source of the same era does not show; checked on 0.32.4.
        tag = re.sub(r"<|>|(, )|-", "_", template_def(template))[:-1]
        out += "_" + tag
    for info in inputs:
        out += "_" + type_string(info.dtype)
        if info.ndim == 0:
            out += "s"
        elif info.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dtype in output_dtypes:
        out += "_" + type_string(dtype)
    return out


def attributes_used(source: str) -> list[tuple[str, str]]:
    """Metal attributes MLX injects: those whose name occurs in the body."""
    return [(n, t) for n, t in METAL_ATTRIBUTES if n in source]


def generate(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str,
    inputs: Sequence[InputInfo],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[tuple[str, TemplateValue]] = (),
    atomic_outputs: bool = False,
) -> GeneratedKernel:
    """Assemble the kernel source the way mx.fast.metal_kernel does."""
    template = tuple(template or ())
    func = kernel_name(name, inputs, output_dtypes, template)
    attrs = attributes_used(source)
    params: list[Param] = []

    text = header
    if template:
        text += (
            "template <"
            + ", ".join(f"{_template_kind(v)} {n}" for n, v in template)
            + ">\n"
        )
    text += "[[kernel]] void " + func + "(\n"

    index = 0
    for i, (iname, info) in enumerate(zip(input_names, inputs)):
        dtype = type_string(info.dtype)
        location = "constant" if info.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if info.ndim == 0 else "*"
        text += f"  const {location} {dtype}{ref} {iname} [[buffer({index})]],\n"
        params.append(Param("input", i, iname, dtype, index, by_ref=info.ndim == 0))
        index += 1
        if info.ndim > 0:
            if iname + "_shape" in source:
                text += f"  const constant int* {iname}_shape [[buffer({index})]],\n"
                params.append(Param("shape", i, iname + "_shape", "int", index))
                index += 1
            if iname + "_strides" in source:
                text += f"  const constant int64_t* {iname}_strides [[buffer({index})]],\n"
                params.append(Param("strides", i, iname + "_strides", "int64_t", index))
                index += 1
            if iname + "_ndim" in source:
                text += f"  const constant int& {iname}_ndim [[buffer({index})]],\n"
                params.append(Param("ndim", i, iname + "_ndim", "int", index, by_ref=True))
                index += 1

    n_in, n_out = len(inputs), len(output_names)
    for j, (oname, dtype) in enumerate(zip(output_names, output_dtypes)):
        tname = type_string(dtype)
        if atomic_outputs:
            tname = f"atomic<{tname}>"
        text += f"  device {tname}* {oname} [[buffer({index})]]"
        # MLX's own separator rule, reproduced as is (it compares the buffer
        # index, which counts shape/strides/ndim buffers too).
        if index < n_in + n_out - 1 or attrs:
            text += ",\n"
        else:
            text += ") {\n"
        params.append(Param("output", j, oname, tname, index))
        index += 1

    for k, (aname, atype) in enumerate(attrs):
        text += f"  {atype} {aname} [[{aname}]]"
        text += ",\n" if k < len(attrs) - 1 else ") {\n"
        params.append(Param("attr", -1, aname, atype, -1))

    text += source
    text += "\n}\n"

    if template:
        tdef = func + template_def(template)
        text += (
            f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({tdef}) {tdef};\n'
        )
    return GeneratedKernel(func, text, tuple(params), template)
