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

`compact(text)` drops `//` comments (outside string literals), leading
whitespace and blank lines; preprocessor lines keep their own line.
`prune(header, body)` splits the header into top-level items (a function, a
struct, a typedef, a #define; an #include or #if line stands alone and is
always kept) and keeps the items whose names the body uses, directly or
through other kept items.  An item whose name it cannot tell is kept.
"""

from __future__ import annotations

import re
from typing import List, Optional, Set

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
