"""Metal kernel source -> C++ that compiles against metal_emu.h.

The rewrite is textual and keeps every line where it was (so compiler
errors and runtime reports name the line of the Metal source):

1. comments are blanked (so the checks below never trip over prose) and
   ``#include <metal_...>`` lines are dropped (metal_emu.h stands in);
2. Metal attributes (``[[kernel]]``, ``[[buffer(0)]]``, ``[[host_name(..)]]``,
   ``[[thread_position_in_grid]]`` ...) are removed;
3. the kernel's host name becomes ``emu_kernel_main`` (MLX's names can
   contain characters C++ rejects, e.g. a negative template value);
4. every address-space pointer type (``const device T*``,
   ``threadgroup T*``, ``constant T*``) becomes ``::metal_emu::ptr<const T>``
   / ``::metal_emu::ptr<T>``, the bounds-checked pointer;
5. each ``threadgroup T name[dims];`` / ``threadgroup T name;`` declaration
   becomes a reference to storage shared by the threads of the current
   threadgroup (one allocation per declaration site, see tg_array);
   any other use of ``threadgroup`` than these and references is refused
   rather than silently turned into per-thread storage;
6. the remaining address-space words (references, program-scope constants)
   are dropped;
7. swizzles ``.xy``, ``.zw``, ``.xyz`` ... become ``.template sw<0, 1>()``;
8. half literals ``1.5h`` become ``half(1.5f)``.
"""

from __future__ import annotations

import re

from .errors import TranslationError
from .source import METAL_ATTRIBUTES

KERNEL_FUNCTION = "emu_kernel_main"


_ID = r"[A-Za-z_]\w*"
# Template arguments with up to three levels of nesting.
_TARGS = r"<(?:[^<>;{}]|<(?:[^<>;{}]|<[^<>;{}]*>)*>)*>"
_TYPE = (
    r"(?:unsigned\s+(?:char|short|int|long)|signed\s+char|long\s+long|"
    rf"(?:::\s*)?{_ID}(?:\s*::\s*{_ID})*(?:\s*{_TARGS})?)"
)
_CV = r"(?:(?:const|volatile)\s+)"
_START = r"(?<![\w:.])"

_TOKENS = re.compile(
    r'"(?:\\.|[^"\\\n])*"|' r"'(?:\\.|[^'\\\n])*'|" r"//[^\n]*|/\*.*?\*/", re.DOTALL
)
_METAL_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w*>[ \t]*$", re.MULTILINE)
_ATTR_NAMES = "|".join(
    ["kernel", "vertex", "fragment", r"host_name\s*\([^)\]]*\)", r"buffer\s*\(\s*\d+\s*\)",
     r"threadgroup\s*\(\s*\d+\s*\)", r"max_total_threads_per_threadgroup\s*\(\s*\d+\s*\)"]
    + [name for name, _ in METAL_ATTRIBUTES]
)
_ATTRIBUTE = re.compile(rf"\[\[\s*(?:{_ATTR_NAMES})\s*\]\]")
_POINTER = re.compile(
    rf"{_START}(?:(const|volatile)\s+)?(device|constant|threadgroup)\s+"
    rf"(?:(const|volatile)\s+)?({_TYPE})\s*\*"
)
_TG_DECL = re.compile(
    rf"{_START}threadgroup\s+({_CV}?{_TYPE})\s+({_ID})\s*((?:\[[^\[\];]+\]\s*)*);"
)
_TG_REF = re.compile(rf"{_START}threadgroup(?=\s+{_CV}?{_TYPE}\s*(?:const\s*)?&)")
_ADDRESS_SPACE = re.compile(rf"{_START}(?:device|constant|thread|threadgroup)(?!\w)")
_SWIZZLE = re.compile(r"(?<=[\w)\]])\.([xyzw]{2,4})\b(?!\s*\()")
_HALF_LITERAL = re.compile(
    r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)[hH](?!\w)"
)
_REINTERPRET = re.compile(r"reinterpret_cast\s*<(\s*::metal_emu::ptr<)")


def _blank_comments(text: str) -> str:
    def repl(m: re.Match) -> str:
        s = m.group(0)
        if s.startswith("//"):
            return ""
        if s.startswith("/*"):
            return " " + "\n" * s.count("\n")
        return s  # string / char literal

    return _TOKENS.sub(repl, text)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _pointer(m: re.Match) -> str:
    const = "const " if "const" in (m.group(1), m.group(3)) else ""
    volatile = "volatile " if "volatile" in (m.group(1), m.group(3)) else ""
    return f"::metal_emu::ptr<{const}{volatile}{m.group(4).strip()}>"


def translate(mlx_source: str, kernel_name: str) -> str:
    """Translate the generated Metal source into C++ (line numbers kept)."""
    text = _blank_comments(mlx_source)
    text = _METAL_INCLUDE.sub("", text)
    text = _ATTRIBUTE.sub("", text)
    text = re.sub(rf"\b{re.escape(kernel_name)}\b", KERNEL_FUNCTION, text)
    text = _POINTER.sub(_pointer, text)

    site = iter(range(1, 1 << 30))

    def tg_decl(m: re.Match) -> str:
        ctype, name, dims = m.group(1).strip(), m.group(2), re.sub(r"\s+", "", m.group(3))
        if dims:
            return f'auto {name} = ::metal_emu::tg_array<{ctype}{dims}>({next(site)}, "{name}");'
        return f'auto& {name} = ::metal_emu::tg_scalar<{ctype}>({next(site)}, "{name}");'

    text = _TG_DECL.sub(tg_decl, text)
    text = _TG_REF.sub("", text)
    left = re.search(rf"{_START}threadgroup(?!\w)", text)
    if left:
        line_no = _line_of(text, left.start())
        line = mlx_source.splitlines()[line_no - 1].strip()
        raise TranslationError(
            f"line {line_no}: unsupported use of `threadgroup`: {line!r}. The emulator "
            "handles `threadgroup T name[N]...;` (one variable per declaration), "
            "`threadgroup T* p` and `threadgroup T& r`."
        )
    text = _ADDRESS_SPACE.sub("", text)
    text = _SWIZZLE.sub(
        lambda m: ".template sw<" + ", ".join(str("xyzw".index(c)) for c in m.group(1)) + ">()",
        text,
    )
    text = _REINTERPRET.sub(r"static_cast<\1", text)
    text = _HALF_LITERAL.sub(r"half(\1f)", text)
    return text
