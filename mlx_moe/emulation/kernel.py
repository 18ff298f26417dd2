"""``metal_kernel``: a drop-in for ``mx.fast.metal_kernel`` that runs on the CPU.

The kernel source is assembled exactly as MLX assembles it (source.py),
translated to C++ (translate.py), compiled against metal_emu.h (build.py)
and run by the emulator runtime: one OS thread per Metal thread of a
threadgroup, real barriers and SIMD collectives, bounds-checked buffers.
By default the grid runs in a forked child process, so a crash or a hang in
the kernel becomes a Python exception here.

Settings (environment): MLX_MOE_EMU_TIMEOUT (seconds per launch, default
300), MLX_MOE_EMU_FORK=0 (run in this process: for debugging with gdb; an
error then aborts the process), MLX_MOE_EMU_CACHE, MLX_MOE_EMU_CXX.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import build
from .errors import MetalEmulationError, MetalEmulationTimeout, TranslationError
from .source import GeneratedKernel, InputInfo, TemplateValue, generate, type_string
from .translate import KERNEL_FUNCTION, translate

DEFAULT_TIMEOUT_S = 300.0

_STORAGE = {
    mx.bool_: np.bool_,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # raw bits: numpy has no bfloat16
    mx.float32: np.float32,
    mx.float64: np.float64,
}

_launch_lock = threading.Lock()


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("lo", ctypes.c_void_p),
        ("hi", ctypes.c_void_p),
        ("name", ctypes.c_char_p),
        ("type", ctypes.c_char_p),
        ("elem_size", ctypes.c_uint32),
        ("is_output", ctypes.c_int32),
    ]


def _storage(dtype: mx.Dtype):
    try:
        return _STORAGE[dtype]
    except KeyError:
        raise ValueError(f"[metal emulation] dtype {dtype} is not supported") from None


def _as_array(x: Any) -> mx.array:
    # Python scalars become 0-d int32 / float32 / bool arrays, as in MLX.
    return x if isinstance(x, mx.array) else mx.array(x)


def _host(a: mx.array, contiguous: bool) -> np.ndarray:
    """The array's elements as numpy sees them (bfloat16 as uint16 bits)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    _storage(a.dtype)
    n = np.asarray(a)
    if contiguous or n.ndim == 0:
        n = _aligned(np.ascontiguousarray(n))
    return n


def _memory(a: mx.array, name: str) -> np.ndarray:
    """A writable numpy view of an in-place input's own buffer (bfloat16 as uint16 bits)."""
    mx.eval(a)
    v = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    n = np.asarray(memoryview(v))
    if not n.flags.c_contiguous or not n.flags.writeable:
        raise ValueError(f"[metal emulation] in-place input '{name}' must be a row-contiguous, writable array")
    return n


# GPU buffers start at least this aligned (Metal: page-aligned buffers; CUDA: 256 bytes);
# MLX's CPU allocator only promises 8.  A contiguous input is copied to such an address
# when it is not there already, so a kernel's vector loads (uint4: 16 bytes) see the
# alignment they would see on a GPU, and the misalignment check (metal_emu.h) flags only
# accesses that would be misaligned there too.
BUFFER_ALIGN = 256


def _aligned(n: np.ndarray) -> np.ndarray:
    if n.ctypes.data % BUFFER_ALIGN == 0 or n.nbytes == 0:
        return n
    raw = np.empty(n.nbytes + BUFFER_ALIGN, np.uint8)
    start = -raw.ctypes.data % BUFFER_ALIGN
    out = raw[start:start + n.nbytes].view(n.dtype).reshape(n.shape)
    out[...] = n
    return out


def _extent(n: np.ndarray) -> tuple[int, int]:
    """Lowest and one-past-highest byte offsets (from element 0) of a view."""
    if n.size == 0:
        return 0, 0
    lo = hi = 0
    for dim, stride in zip(n.shape, n.strides):
        if stride < 0:
            lo += (dim - 1) * stride
        else:
            hi += (dim - 1) * stride
    return lo, hi + n.itemsize


def _triple(v: Sequence[int], what: str) -> tuple[int, int, int]:
    t = tuple(int(x) for x in v)
    if len(t) != 3 or any(x < 0 for x in t):
        raise ValueError(f"[metal emulation] {what} must be three non-negative ints, got {v!r}")
    return t  # type: ignore[return-value]


def _glue(gen: GeneratedKernel) -> str:
    """C++ entry point: builds each argument of the kernel from the buffers."""
    args = []
    for p in gen.params:
        if p.kind == "attr":
            src = f"a->{p.name}"
            args.append(f"uint3({src}[0], {src}[1], {src}[2])" if p.ctype == "uint3" else src)
        elif p.kind == "output":
            args.append(f"::metal_emu::arg_ptr<{p.ctype}>(b[{p.buffer}], {p.buffer})")
        elif p.by_ref:
            args.append(f"::metal_emu::arg_ref<const {p.ctype}>(b[{p.buffer}])")
        else:
            args.append(f"::metal_emu::arg_ptr<const {p.ctype}>(b[{p.buffer}], {p.buffer})")
    targs = ""
    if gen.template:
        vals = []
        for _, v in gen.template:
            if isinstance(v, bool):
                vals.append("true" if v else "false")
            elif isinstance(v, int):
                vals.append(str(v))
            else:
                vals.append(type_string(v))
        targs = "<" + ", ".join(vals) + ">"
    return (
        '\n#line 1 "emu_entry"\n'
        'extern "C" void emu_entry(const emu_buffer* b, const emu_attrs* a) {\n'
        "  (void)a;\n"
        f"  {KERNEL_FUNCTION}{targs}(\n    " + ",\n    ".join(args) + ");\n}\n"
    )


def _annotate(msg: str, metal_source: str) -> str:
    """Turn code addresses into source lines and quote the lines a report names."""

    def at(m: re.Match) -> str:
        line = build.source_line_of(m.group(1))
        return f" (line {line})" if line else m.group(0)

    msg = re.sub(r" \[at ([^\]]+)\]", at, msg)
    lines = metal_source.splitlines()
    quoted = []
    for n in sorted({int(n) for n in re.findall(r"\(line (\d+)\)", msg)}):
        if 0 < n <= len(lines):
            quoted.append(f"  line {n}: {lines[n - 1].strip()}")
    if quoted:
        msg += "\nlines of the generated Metal source (kernel.generated_source()):\n"
        msg += "\n".join(quoted)
    return msg


def _preamble(metal_source: str) -> str:
    """Configuration macros for metal_emu.h that depend on the kernel."""
    # Per-lane fragment access makes lanes' copies of a simdgroup matrix
    # differ: every matrix operation must then gather from the owners.
    if "thread_elements" in metal_source:
        return "#define METAL_EMU_SIMDGROUP_MATRIX_LOCKSTEP 1\n"
    return ""


class EmulatedMetalKernel:
    """A kernel object with the call signature of ``mx.fast.metal_kernel``'s."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options: Optional[dict] = None,
        inplace_inputs: Sequence[str] = (),
        in_order: bool = False,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        unknown = [n for n in inplace_inputs if n not in input_names]
        if unknown:
            raise ValueError(f"[metal emulation] inplace_inputs {unknown} are not inputs of {name}")
        self.name = name
        self.input_names = list(input_names)
        # Inputs the kernel writes through a cast of their const pointer (MLX's
        # kernels can, the GPU writes the array's buffer): here they run in memory
        # shared with the parent, as outputs do, and are copied back into the arrays.
        self.inplace_inputs = tuple(inplace_inputs)
        self.output_names = list(output_names)
        # Threadgroups run first-numbered first instead of last-numbered first: for
        # kernels whose later threadgroups wait for earlier ones (registry.KernelSpec.in_order).
        self.in_order = bool(in_order)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        # Accepted for compatibility; the emulator computes in IEEE precision.
        self.compile_options = compile_options
        self.timeout_s: Optional[float] = None
        self._libs: dict[str, ctypes.CDLL] = {}  # generated source -> library

    # -- source ---------------------------------------------------------------

    def _generate(self, arrays, output_dtypes, template) -> GeneratedKernel:
        if len(arrays) != len(self.input_names):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} "
                f"but got size {len(arrays)}."
            )
        if len(output_dtypes) != len(self.output_names):
            raise ValueError(
                f"[metal_kernel] Expected `output_dtypes` to have size "
                f"{len(self.output_names)} but got size {len(output_dtypes)}."
            )
        if any(a.dtype == mx.float64 for a in arrays) or mx.float64 in list(output_dtypes):
            raise TranslationError(
                "[metal emulation] float64 inputs/outputs: Metal has no double type "
                "(MLX's Metal kernel would not compile); use float32"
            )
        infos = [InputInfo(a.dtype, a.ndim, a.size) for a in arrays]
        return generate(
            self.name,
            self.input_names,
            self.output_names,
            self.source,
            self.header,
            infos,
            list(output_dtypes),
            list(template or ()),
            self.atomic_outputs,
        )

    def generated_source(self, *, inputs, output_dtypes, template=None) -> str:
        """The Metal source MLX would compile for these inputs (byte-exact)."""
        arrays = [_as_array(x) for x in inputs]
        return self._generate(arrays, output_dtypes, template).source

    def cpp_source(self, *, inputs, output_dtypes, template=None) -> str:
        """The C++ translation unit the emulator compiles."""
        arrays = [_as_array(x) for x in inputs]
        gen = self._generate(arrays, output_dtypes, template)
        return (
            _preamble(gen.source)
            + '#include "metal_emu.h"\n'
            + translate(gen.source, gen.kernel_name)
            + _glue(gen)
        )

    # -- launch ---------------------------------------------------------------

    def __call__(
        self,
        *,
        inputs: Sequence[Any],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: Sequence[int],
        threadgroup: Sequence[int],
        template: Optional[Sequence[tuple[str, TemplateValue]]] = None,
        init_value: Optional[float] = None,
        verbose: bool = False,
        stream: Any = None,
    ) -> list[mx.array]:
        arrays = [_as_array(x) for x in inputs]
        if len(output_shapes) != len(self.output_names):
            raise ValueError(
                f"[metal_kernel] Expected `output_shapes` to have size "
                f"{len(self.output_names)} but got size {len(output_shapes)}."
            )
        gen = self._generate(arrays, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.source}\n```")
        grid3 = _triple(grid, "grid")
        tg3 = _triple(threadgroup, "threadgroup")
        if any(t == 0 for t in tg3):
            raise ValueError(f"[metal emulation] threadgroup dimensions must be >= 1, got {tg3}")
        tg_eff = tuple(min(t, g) for t, g in zip(tg3, grid3))
        if tg_eff[0] * tg_eff[1] * tg_eff[2] > 1024:
            raise ValueError(
                f"[metal emulation] threadgroup {tg3} has {tg_eff[0] * tg_eff[1] * tg_eff[2]} "
                "threads; Metal allows at most 1024"
            )

        lib = self._libs.get(gen.source)
        if lib is None:
            lib = build.kernel_library(
                translate(gen.source, gen.kernel_name) + _glue(gen),
                gen.source,
                self.name,
                preamble=_preamble(gen.source),
            )
            self._libs[gen.source] = lib

        keep: list[Any] = []  # everything the C side points into
        bufs: list[tuple] = []

        def add(arr: np.ndarray, name: str, ctype: str, is_output: bool) -> None:
            lo, hi = _extent(arr)
            base = arr.ctypes.data
            nm, ty = name.encode(), ctype.encode()
            keep.extend([arr, nm, ty])
            bufs.append((base, base + lo, base + hi, nm, ty, arr.itemsize, int(is_output)))

        hosts = [_host(a, self.ensure_row_contiguous) for a in arrays]
        written = {}  # input index -> its array's own memory, for the in-place inputs
        for i, n in enumerate(self.input_names):
            if n in self.inplace_inputs:
                written[i] = _memory(arrays[i], n)
                hosts[i] = _aligned(hosts[i].copy())  # the run writes a copy, then the array
        outputs: list[np.ndarray] = []
        for p in gen.params:
            if p.kind == "input":
                add(hosts[p.index], f"input '{p.name}'", p.ctype, p.index in written)
            elif p.kind == "shape":
                add(np.array(hosts[p.index].shape, np.int32), f"'{p.name}'", "int", False)
            elif p.kind == "strides":
                h = hosts[p.index]
                add(np.array([s // h.itemsize for s in h.strides], np.int64),
                    f"'{p.name}'", "int64_t", False)
            elif p.kind == "ndim":
                add(np.array(hosts[p.index].ndim, np.int32), f"'{p.name}'", "int", False)
            elif p.kind == "output":
                dtype = output_dtypes[p.index]
                shape = tuple(int(s) for s in output_shapes[p.index])
                out = _aligned(np.empty(shape, _storage(dtype)))
                if init_value is not None:
                    fill = mx.array(init_value, dtype)
                    out[...] = _host(fill, True)
                else:
                    # Outputs are uninitialized on a GPU: 0xFF bytes (NaN for
                    # floats) make elements the kernel never writes stand out.
                    out.view(np.uint8)[...] = 0xFF
                outputs.append(out)
                add(out, f"output '{p.name}'", p.ctype, True)

        c_bufs = (_Buffer * max(len(bufs), 1))(*[_Buffer(*b) for b in bufs])
        err = ctypes.create_string_buffer(8192)
        timeout = self.timeout_s
        if timeout is None:
            timeout = float(os.environ.get("MLX_MOE_EMU_TIMEOUT", DEFAULT_TIMEOUT_S))
        fork = os.environ.get("MLX_MOE_EMU_FORK", "1") != "0"
        rt = build.runtime()
        entry = ctypes.cast(lib.emu_entry, ctypes.c_void_p)
        with _launch_lock:
            rc = rt.emu_launch(
                entry,
                c_bufs,
                ctypes.c_int(len(bufs)),
                (ctypes.c_uint32 * 3)(*grid3),
                (ctypes.c_uint32 * 3)(*tg3),
                ctypes.c_double(timeout),
                ctypes.c_int(int(fork)),
                ctypes.c_int(int(self.in_order)),
                ctypes.c_char_p(gen.kernel_name.encode()),
                err,
                ctypes.c_int(len(err)),
            )
        if rc != 0:
            msg = _annotate(err.value.decode(errors="replace"), gen.source)
            cls = MetalEmulationTimeout if rc == 2 else MetalEmulationError
            raise cls(f"[metal emulation] {msg}")

        for i, mem in written.items():
            mem[...] = hosts[i]
        results = []
        for out, dtype in zip(outputs, output_dtypes):
            arr = mx.array(out)
            results.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
        return results


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: Optional[dict] = None,
    inplace_inputs: Sequence[str] = (),
    in_order: bool = False,
) -> EmulatedMetalKernel:
    """Create an emulated kernel; same arguments as ``mx.fast.metal_kernel``, and
    `inplace_inputs`: inputs the kernel writes, `in_order`: threadgroups run
    first-numbered first (EmulatedMetalKernel says why)."""
    return EmulatedMetalKernel(
        name,
        input_names,
        output_names,
        source,
        header=header,
        ensure_row_contiguous=ensure_row_contiguous,
        atomic_outputs=atomic_outputs,
        compile_options=compile_options,
        inplace_inputs=inplace_inputs,
        in_order=in_order,
    )


def generated_source(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    *,
    inputs: Sequence[Any],
    output_dtypes: Sequence[mx.Dtype],
    header: str = "",
    template: Optional[Sequence[tuple[str, TemplateValue]]] = None,
    atomic_outputs: bool = False,
) -> str:
    """The Metal source MLX would build for this kernel and these inputs."""
    k = metal_kernel(name, input_names, output_names, source, header,
                     atomic_outputs=atomic_outputs)
    return k.generated_source(inputs=inputs, output_dtypes=output_dtypes, template=template)


__all__ = [
    "EmulatedMetalKernel",
    "MetalEmulationError",
    "MetalEmulationTimeout",
    "generated_source",
    "metal_kernel",
]
