"""The compacted, pruned kernel sources (mlx_moe/kernels/source.py)."""

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
            import re
            for ident in set(re.findall(r"\b(moe_\w+)\s*[<(]", body)):
                assert re.search(rf"\b{ident}\b", header), (name, flavor, ident)
    assert read_family("decode_layer")[1]  # the readable files are untouched
