"""The compacted, pruned kernel sources (mlx_moe/kernels/source.py)."""

import re

from mlx_moe.kernels.registry import KERNELS, family_header, kernel_source, read_family
from mlx_moe.kernels.source import compact, prune

HEADER = compact('''
#include <x.h>
#define USED_MACRO 3   // a comment
#define UNUSED_MACRO 4
#ifndef MOCK
__device__ inline float helper_a(float v) {   // "quoted // not a string"
#pragma unroll
  for (int i = 0; i < USED_MACRO; ++i) { v += 1; }
  return v;
}
#endif
template <int K>
struct only_b_uses {
  enum { value = K };
};
MOE_DEVICE inline float helper_b(float v) {
  return v * only_b_uses<2>::value;
}
inline float unused(float v) {
  asm("mov // %0;" : "=f"(v));
  return v;
}
using namespace metal;
typedef unsigned int uint;
''')


def test_compact_strips_comments_outside_strings_and_indentation():
    assert "a comment" not in HEADER and "quoted" not in HEADER
    assert 'asm("mov // %0;" : "=f"(v));' in HEADER  # a // inside a string literal stays
    assert all(line == line.strip() and line for line in HEADER.splitlines())


def test_prune_keeps_what_the_body_uses_transitively():
    out = prune(HEADER, "float y = helper_a(x) + helper_b(x);")
    for kept in ("helper_a", "helper_b", "only_b_uses", "#define USED_MACRO", "#include <x.h>", "#ifndef MOCK",
                 "#endif", "using namespace metal;", "#pragma unroll"):
        assert kept in out, kept
    for dropped in ("UNUSED_MACRO", "unused(", "typedef unsigned int uint"):
        assert dropped not in out, dropped
    out = prune(HEADER, "uint y = helper_a(x);")
    assert "typedef unsigned int uint;" in out and "helper_b" not in out and "only_b_uses" not in out


def test_every_kernel_source_is_smaller_and_keeps_its_body():
    for name, spec in KERNELS.items():
        for flavor in ("metal", "cuda"):
            header, body = kernel_source(flavor, spec.family, name)
            assert len(header) <= len(family_header(flavor, spec.family))
            assert "//" not in body.replace("://", "")
            # every moe_* helper the body calls is defined in the pruned header
            for ident in set(re.findall(r"\b(moe_\w+)\s*[<(]", body)):
                assert re.search(rf"\b{ident}\b", header), (name, flavor, ident)
    assert read_family("decode_layer")[1]  # the readable files are untouched


# -- CUDA: the source as include files (source.as_include_files, registry.CUDA_SOURCE_FILES) --

import os  # noqa: E402
from pathlib import Path  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

from mlx_moe.kernels import registry  # noqa: E402
from mlx_moe.kernels.source import as_include_files  # noqa: E402


def test_include_files_hold_the_text_and_are_named_by_it(tmp_path):
    header, body = kernel_source("cuda", "router", "moe_router_topk")
    inc_h, inc_b = as_include_files(header, body, tmp_path)
    paths = [re.match(r'#include "(.+)"\n', s).group(1) for s in (inc_h, inc_b.splitlines(True)[0])]
    assert [Path(p).read_text() for p in paths] == [header, body]
    assert len(inc_h) + len(inc_b) < 300 < len(header) + len(body)
    # MLX passes <input>_shape only where the source it sees names it: the body's names stay visible.
    assert "logits_shape" in body and "logits_shape" in inc_b
    # The same text: the same files (nothing rewritten); other text: other files.
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    assert as_include_files(header, body, tmp_path) == (inc_h, inc_b)
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
    other_h, _ = as_include_files(header + "// v2\n", body, tmp_path)
    assert other_h != inc_h
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


def test_unwritable_directory_falls_back_to_the_text(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("MLX_MOE_CUDA_SOURCE_DIR", str(blocked / "sub"))
    monkeypatch.setattr(registry, "CUDA_SOURCE_FILES", True)
    monkeypatch.setattr(registry, "_FILES_FAILED", [])
    header, body = kernel_source("cuda", "mul_mv_id", "mul_mv_id")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry._cuda_source(header, body) == (header, body)
    assert any("MLX_MOE_CUDA_SOURCE_DIR" in str(w.message) for w in caught)
    monkeypatch.setenv("MLX_MOE_CUDA_SOURCE_DIR", str(tmp_path / "ok"))
    assert registry._cuda_source(header, body) == (header, body)  # one failure: text from then on
    monkeypatch.setattr(registry, "_FILES_FAILED", [])
    assert registry._cuda_source(header, body)[0].startswith("#include")
    monkeypatch.setattr(registry, "CUDA_SOURCE_FILES", False)
    assert registry._cuda_source(header, body) == (header, body)


def test_include_form_compiles_to_the_same_ptx(tmp_path, monkeypatch):
    """nvcc on MLX's kernel text (tools/cuda_units.py's reproduction of cuda_kernel's
    source assembly) with the source inline and as include files: the
    same PTX, for every family's compile-test kernels (the router's and map0's bodies
    read an input's shape: MLX must still see the name)."""
    import subprocess

    import test_kernels_cuda_compile as cc  # (puts tools/ on the path: cuda_units)

    import cuda_units

    if cc.NVCC is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    units = [("decode_layer", cc.DECODE_LAYER_KERNELS), ("router", cc.ROUTER_KERNELS),
             ("attention", _ATTENTION_KERNELS),
             ("mul_mv_id", cc.MV_KERNELS), ("mul_mm_id", cc.MM_KERNELS)]
    inline = [cuda_units.translation_unit(f, ks) for f, ks in units]
    real_source = kernel_source
    src_dir = tmp_path / "src"

    def files_source(flavor, family, name):
        header, body = real_source(flavor, family, name)
        return header, as_include_files(header, body, src_dir)[1]

    files = []
    for family, ks in units:
        bodies = "\n".join(real_source("cuda", KERNELS[cuda_units.gemm_base(n)].family, n)[1] for n, *_ in ks)
        header = prune(family_header("cuda", family), bodies)
        inc_h = as_include_files(header, "", src_dir)[0]
        monkeypatch.setattr(cuda_units, "kernel_source", files_source)
        fns = "".join(cuda_units.kernel_text(*k) for k in ks)
        monkeypatch.setattr(cuda_units, "kernel_source", real_source)
        files.append(cuda_units.PRELUDE + inc_h + "\nnamespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
                     + fns + "}\n")
        assert len(files[-1]) < len(inline[len(files) - 1]) / 2
    for i, (a, b) in enumerate(zip(inline, files)):
        ptx = []
        for form, text in (("inline", a), ("files", b)):
            cu = tmp_path / f"{i}_{form}" / "k.cu"
            cu.parent.mkdir()
            cu.write_text(text)
            r = subprocess.run([cc.NVCC, "-std=c++17", "-arch=sm_90a", "-ptx", str(cu), "-o", str(cu) + ".ptx"],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-4000:]
            # File-local symbols carry a hash of the file's path: the only difference allowed.
            ptx.append(re.sub(r"_INTERNAL_[0-9a-f]+_", "_INTERNAL_", Path(str(cu) + ".ptx").read_text()))
        assert ptx[0] == ptx[1], units[i][0]
        assert ptx[0].count(".entry") == len(units[i][1])


# The attention kernel's compile-test entry (tests/test_kernels_cuda_compile.py builds
# its own inside its test).
_ATTENTION_KERNELS = [
    ("decode_attention_parts_kv", "qwen3",
     {"y": "bfloat16", "q_norm": "bfloat16", "k_norm": "bfloat16", "k": "bfloat16", "v": "bfloat16",
      "pos": "int32", "cst": "float32"}, {"parts": "float32", "ml": "float32"},
     [("T", "bfloat16"), ("D", 128), ("HQ", 32), ("HKV", 4), ("C", 768), ("NSG", 8), ("U", 8), ("S", 4),
      ("QKNORM", True), ("TRAD", False)])]


def test_kernel_names_carry_a_fence_other_than_the_default(monkeypatch):
    """registry.fence_tag: a CUDA kernel built under acq_rel is named apart from the default
    (sc) one, so one process can hold both (MLX keeps compiled kernels by name) and ncu
    tell them apart; Metal and the emulation have no fence and no tag."""
    from mlx_moe.kernels import registry

    monkeypatch.setattr(registry, "CUDA_FENCE", "sc")
    assert registry.fence_tag("cuda") == ""
    monkeypatch.setattr(registry, "CUDA_FENCE", "acq_rel")
    assert registry.fence_tag("cuda") == "_acqrel"
    assert registry.fence_tag("metal") == registry.fence_tag("emulated") == ""
    # the hand-offs fenced by one thread (registry.CUDA_HANDOFF) are named apart too
    monkeypatch.setattr(registry, "CUDA_HANDOFF", "one")
    assert registry.fence_tag("cuda") == "_acqrel_h1"
    monkeypatch.setattr(registry, "CUDA_FENCE", "sc")
    assert registry.fence_tag("cuda") == "_h1"
    assert registry.fence_tag("metal") == registry.fence_tag("emulated") == ""
