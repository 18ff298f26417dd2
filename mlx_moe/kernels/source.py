"""The kernel source text MLX receives: comments and indentation stripped, and
only the header definitions the body uses.

Why: MLX's CUDA backend hashes a custom kernel's whole source (header + body)
every time the kernel is evaluated (mlx/backend/cuda/custom_kernel.cpp:
`std::hash<std::string>{}(source_)` in CustomKernel::eval_gpu), and a decode
step evaluates seven of ours per layer.  The headers (shims + a family's
helpers, with the comments that explain them) are 8-14 kB; what a kernel needs
of them is a fraction.  The files in metal/ stay the readable source; this is
what is compiled, on every flavor (the CPU emulation and the CUDA compile tests
see the same text as the GPU).

On CUDA the text can leave the string altogether: `as_include_files(header,
body)` writes both to files named by their content's hash and returns two
`#include "<file>"` lines in their place.  NVRTC reads an absolute include path
from the file system like any C preprocessor, so what compiles is the same text;
what MLX hashes on every evaluation is then the short function MLX writes around
the includes (~1 kB instead of 5-13 kB; a custom-kernel node's host cost was
measured to grow by ~0.7 us per kB of source, and the fused decode layer's five
kernels carry ~41 kB: up to ~1 ms a token for 48 layers).  The file names
carry the content hash, so MLX's kernel and PTX caches (keyed by name and source
hash) cannot confuse two versions of a kernel.

`compact(text)` drops `//` comments (outside string literals), leading
whitespace and blank lines; preprocessor lines keep their own line.
`prune(header, body)` splits the header into top-level items (a function, a
struct, a typedef, a #define; an #include or #if line stands alone and is
always kept) and keeps the items whose names the body uses, directly or
through other kept items.  An item whose name it cannot tell is kept.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import List, Optional, Set, Tuple

_IDENT = re.compile(r"[A-Za-z_]\w*")


def _strip_comment(line: str) -> str:
    """`line` without a `//` comment outside a string literal."""
    quoted = False
    i = 0
    while i < len(line) - 1:
        c = line[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "/" and line[i + 1] == "/":
            return line[:i]
        i += 1
    return line


def compact(text: str) -> str:
    lines = []
    for raw in text.split("\n"):
        line = _strip_comment(raw).strip()
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _items(header: str) -> List[str]:
    """Top-level items of a compacted header, in order."""
    items, cur, depth = [], [], 0
    for line in header.split("\n"):
        if not line:
            continue
        if depth == 0 and not cur and line.startswith("#"):
            items.append(line)  # a directive at top level: its own item
            continue
        cur.append(line)
        if line.startswith("#"):  # a directive inside an item (#pragma unroll)
            continue
        depth += line.count("{") - line.count("}")
        if depth == 0 and (line.endswith("}") or line.endswith(";")) and not line.startswith("template"):
            items.append("\n".join(cur))
            cur = []
    if cur:
        items.append("\n".join(cur))
    return items


def _name(item: str) -> Optional[str]:
    """The name an item defines, or None (kept unconditionally)."""
    if item.startswith("#define"):
        m = re.match(r"#define\s+(\w+)", item)
        return m.group(1) if m else None
    if item.startswith("#"):
        return None
    head = item
    if head.startswith("template"):  # drop the template parameter list
        depth, i = 0, head.index("<")
        for i in range(head.index("<"), len(head)):
            depth += {"<": 1, ">": -1}.get(head[i], 0)
            if depth == 0:
                break
        head = head[i + 1:]
    head = head.split("{", 1)[0]
    m = re.search(r"\b(?:struct|class)\s+(\w+)", head)
    if m:
        return m.group(1)
    if head.lstrip().startswith("using namespace"):
        return None
    if head.lstrip().startswith("typedef") or head.lstrip().startswith("using"):
        ids = _IDENT.findall(head.split("=", 1)[0] if "=" in head else head)
        return ids[-1] if ids else None
    if "(" in head:
        ids = _IDENT.findall(head.split("(", 1)[0])
        return ids[-1] if ids else None
    return None


def prune(header: str, body: str) -> str:
    """The items of `header` (compacted) that `body` needs, in their order."""
    items = _items(header)
    names = [_name(it) for it in items]
    by_name = {}
    for i, n in enumerate(names):
        if n is not None:
            by_name.setdefault(n, []).append(i)
    keep: Set[int] = {i for i, n in enumerate(names) if n is None}
    todo = [body] + [items[i] for i in keep]
    while todo:
        for ident in set(_IDENT.findall(todo.pop())):
            for i in by_name.get(ident, ()):
                if i not in keep:
                    keep.add(i)
                    todo.append(items[i])
    return "\n".join(items[i] for i in sorted(keep)) + "\n"


# MLX passes an input's shape, strides or ndim to a CUDA kernel only where its
# source names them (cuda_kernel: source.find(name + "_shape")).
_SHAPE_ARG = re.compile(r"\b\w+_(?:shape|strides|ndim)\b")


def cuda_source_dir() -> Path:
    """Where the kernel source files go: $MLX_MOE_CUDA_SOURCE_DIR, else
    ~/.cache/mlx_moe/cuda (the same path in every process on a machine, so MLX's
    on-disk PTX cache keeps working), else a directory in the system's temp dir."""
    env = os.environ.get("MLX_MOE_CUDA_SOURCE_DIR")
    if env:
        return Path(env)
    home = Path(os.path.expanduser("~"))
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".cache" / "mlx_moe" / "cuda"
    return Path(tempfile.gettempdir()) / f"mlx_moe_cuda_{os.getuid() if hasattr(os, 'getuid') else 0}"


def _write_once(directory: Path, text: str, suffix: str) -> Path:
    """`text` in directory/<sha256 prefix><suffix>, written atomically unless a file
    of that name (the same content) is already there."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    path = directory / f"mlx_moe_{digest}{suffix}"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=suffix)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return path


def as_include_files(header: str, body: str, directory: Path) -> Tuple[str, str]:
    """(header, body) as `#include` lines of files holding them (see the module
    docstring); raises OSError where the files cannot be written.  The body's
    `<input>_shape` / `_strides` / `_ndim` names stay visible to MLX in a comment."""
    if '"' in str(directory) or "\n" in str(directory):
        raise OSError(f"cannot #include from {directory!s}: the path holds a quote or a newline")
    directory = directory.resolve()
    h = _write_once(directory, header, ".cuh")
    b = _write_once(directory, body, ".inc")
    mentions = sorted(set(_SHAPE_ARG.findall(body)))
    note = f"// uses {' '.join(mentions)}\n" if mentions else ""
    return f'#include "{h}"\n', f'#include "{b}"\n' + note
