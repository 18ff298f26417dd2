"""Per-kernel GPU time and DRAM bandwidth from an Nsight Compute CSV log.

Reads what `ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv
--log-file X ...` writes (tools/bench_kernels.py --ncu is the intended
workload), groups the launches by kernel name (MLX names a custom kernel
`custom_kernel_<name>_<template args>`, so each launch geometry is its own
row), and prints the median GPU microseconds, MB read and GB/s per kernel,
the total GPU time of all launches and its largest kernels (for a whole workload,
e.g. tools/profile_prefill.py --once: where a prefill's GPU time goes), then the
fastest variant of each kernel:

    python tools/ncu_summary.py ncu.csv [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

TIME = "gpu__time_duration.sum"
BYTES = "dram__bytes_read.sum"
_TIME_UNIT = {"ns": 1e-9, "nsecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3,
              "s": 1.0, "second": 1.0}
_BYTE_UNIT = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
# Where the launch geometry sits among a kernel's integer template arguments, and how
# many it takes (metal/mul_mv_id.metal: swiglu K N NE KS NR NSG NQ, down_combine K N NE
# NI KS NR NSG NQ; metal/decode_layer.metal: dense_norm FMT GS K N0 N1 N2 NR NSG,
# dense_residual(_parts, _parts_router(_split)) FMT GS K N NR NSG; metal/attention.metal: attention parts
# D HQ HKV C NSG U S; mul_mv_id_moe(_ids) below).
_GEOMETRY_AT = {"mul_mv_id_swiglu": (4, 3), "mul_mv_id_down_combine": (5, 3), "mul_mv_id": (4, 3),
                "dense_norm": (6, 2), "dense_norm_xn": (6, 2), "dense_residual": (4, 2),
                "dense_residual_parts": (4, 2), "dense_residual_parts_router": (4, 2),
                "dense_residual_parts_router_split": (4, 2), "decode_attention_parts": (4, 3),
                "decode_attention_parts_kv": (4, 3),
                # the one-launch decode MoE layer (D F NE NI KS NT NRG NRD NSG NQ STAGE ..): its
                # LayerGeometry tag, GATE_NRxDOWN_NRxNSGxNQxSTAGE
                "mul_mv_id_moe": (6, 5), "mul_mv_id_moe_ids": (6, 5), "mul_mv_id_moe_trace": (6, 5)}


@dataclass
class KernelStats:
    kernel: str  # base name, e.g. mul_mv_id_swiglu or qmm_naive_kernel
    variant: str  # template arguments (custom kernels) or the rest of the name
    geometry: Optional[str] = None  # 'NRxNSG[xNQ]' for the mul_mv_id kernels
    grid: str = ""  # ncu's "Grid Size" (blocks)
    seconds: List[float] = field(default_factory=list)
    nbytes: List[float] = field(default_factory=list)

    @property
    def us(self) -> float:
        return statistics.median(self.seconds) * 1e6

    @property
    def total_us(self) -> float:
        return sum(self.seconds) * 1e6

    @property
    def mb(self) -> float:
        return statistics.median(self.nbytes) / 1e6 if self.nbytes else float("nan")

    @property
    def gbs(self) -> float:
        return self.mb * 1e6 / (self.us * 1e-6) / 1e9 if self.nbytes else float("nan")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def split_name(name: str):
    """(base, variant, geometry) of a kernel name as ncu prints it."""
    name = name.split("(", 1)[0].strip()
    m = re.match(r"custom_kernel_(?:mlx_moe_)?(.*)$", name)
    if not m:
        base = re.split(r"[<(]", name, 1)[0].replace("void ", "").strip()
        return base, name[len(name.split("<", 1)[0]):], None
    rest = m.group(1)
    # The longest known base that prefixes the name (mul_mv_id_swiglu before mul_mv_id).
    for base in sorted(_GEOMETRY_AT, key=len, reverse=True):
        if rest.startswith(base + "_"):
            args = rest[len(base) + 1:]
            # a fence other than the default, named after the base (registry.fence_tag)
            fence = re.match(r"(acqrel)_", args)
            ints = re.findall(r"(?:^|_)(-?\d+)(?=_|$)", args)
            at, n = _GEOMETRY_AT[base]
            geo = "x".join(ints[at:at + n]) if len(ints) > at + 1 else None
            # the routed layer's last template argument: SHARE_ROUTE (dispatch.SHARE_ROUTE)
            if geo and base in ("mul_mv_id_moe", "mul_mv_id_moe_trace") and args.endswith("_t"):
                geo += "+share"
            if geo and fence:
                geo += "+" + fence.group(1)
            return base, args, geo
    head = re.match(r"(.*?)_(?:float|bfloat|half|uint|int|bool|true|false|\d)", rest)
    base = head.group(1) if head else rest
    return base, rest[len(base) + 1:], None


def parse(path: str) -> Dict[str, KernelStats]:
    """{full kernel name: stats} from an ncu --csv log (lines before the header are skipped)."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no ncu CSV header (a line starting with \"ID\"); was ncu run with --csv?")
    out: Dict[str, KernelStats] = {}
    for row in csv.DictReader(lines[start:]):
        name, metric, unit, value = row.get("Kernel Name"), row.get("Metric Name"), row.get("Metric Unit"), \
            row.get("Metric Value")
        if not name or metric not in (TIME, BYTES) or not value:
            continue
        # One row per kernel and grid: library kernels (qmm_naive_kernel) keep one name for all shapes.
        grid = row.get("Grid Size", "")
        key = name.split("(", 1)[0].strip() + " grid" + grid
        st = out.get(key)
        if st is None:
            base, variant, geo = split_name(name)
            st = out[key] = KernelStats(base, variant, geo, grid=grid)
        if metric == TIME:
            if unit not in _TIME_UNIT:
                raise ValueError(f"{path}: unknown time unit {unit!r} for {TIME}")
            st.seconds.append(_number(value) * _TIME_UNIT[unit])
        else:
            if unit not in _BYTE_UNIT:
                raise ValueError(f"{path}: unknown byte unit {unit!r} for {BYTES}")
            st.nbytes.append(_number(value) * _BYTE_UNIT[unit])
    return {k: v for k, v in out.items() if v.seconds}


def best(stats: Dict[str, KernelStats]) -> Dict[str, KernelStats]:
    """The fastest variant (median GPU time) of each base kernel."""
    res: Dict[str, KernelStats] = {}
    for st in stats.values():
        if st.kernel not in res or st.us < res[st.kernel].us:
            res[st.kernel] = st
    return res


def table(stats: Dict[str, KernelStats]) -> str:
    lines = [f"{'kernel':26s} {'geometry':9s} {'grid':13s} {'n':>4s} {'median us':>10s} {'total us':>10s} "
             f"{'MB read':>8s} {'GB/s':>7s}  variant"]
    for st in sorted(stats.values(), key=lambda s: (s.kernel, s.us)):
        lines.append(f"{st.kernel[:26]:26s} {st.geometry or '-':9s} {st.grid:13s} {len(st.seconds):4d} {st.us:10.2f} "
                     f"{st.total_us:10.1f} {st.mb:8.2f} {st.gbs:7.1f}  {st.variant[:70]}")
    total = sum(st.total_us for st in stats.values())
    lines.append("")
    lines.append(f"all launches: {total / 1e3:.3f} ms of GPU time; by kernel, largest first:")
    by_kernel: Dict[str, float] = {}
    for st in stats.values():
        by_kernel[st.kernel] = by_kernel.get(st.kernel, 0.0) + st.total_us
    for name, us in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {name[:40]:40s} {us / 1e3:9.3f} ms {100 * us / total:5.1f}%")
    lines.append("")
    lines.append("best per kernel:")
    for name, st in sorted(best(stats).items()):
        lines.append(f"  {name:26s} {st.geometry or st.variant[:40]:12s} {st.us:8.2f} us {st.gbs:7.1f} GB/s")
    return "\n".join(lines)


def candidate_tag(candidate: str) -> str:
    """A candidate of --fastest-stage as a LayerGeometry tag: GATExDOWNxNSGxNQxSTAGE as given,
    a bare stage at 1x4x8x1 (the default's geometry)."""
    return candidate if "x" in candidate else f"1x4x8x1x{int(candidate)}"


def fastest_stage(stats: Dict[str, KernelStats], candidates, share: bool, default_tag: str) -> Optional[str]:
    """Of the routed one-launch layer at these candidates (stages at 1x4x8x1, or whole tags
    such as 2x4x4x1x14783), the fastest one faster than the default geometry default_tag (all
    with the routing shared or not, as `share` says: the tag ncu's names give them), as given,
    else None -- tools/gpu_decode_layer.sh's step A/B pick."""
    suffix = "+share" if share else ""
    by_tag = {s.geometry: s.us for s in stats.values() if s.kernel == "mul_mv_id_moe"}
    default = by_tag.get(default_tag + suffix)
    cands = {c: by_tag[candidate_tag(c) + suffix] for c in candidates if candidate_tag(c) + suffix in by_tag}
    if default is None or not cands:
        return None
    best_c = min(cands, key=cands.get)
    return best_c if cands[best_c] < default else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --csv --log-file output")
    p.add_argument("--json", default=None, help="also write the rows and the best variants as JSON")
    p.add_argument("--fastest-stage", default=None, metavar="CANDIDATES",
                   help="print only the candidate (of these: stages at 1x4x8x1 or whole geometry tags, e.g. "
                        "'255 2x4x4x1x14783') whose routed one-launch layer beat the package's default "
                        "(dispatch.MOE_LAYER, SHARE_ROUTE), or nothing")
    a = p.parse_args(argv)
    stats = parse(a.csv)
    if not stats:
        print(f"{a.csv}: no launches with {TIME}", file=sys.stderr)
        return 1
    if a.fastest_stage is not None:
        from mlx_moe.kernels import dispatch

        st = fastest_stage(stats, a.fastest_stage.split(), dispatch.SHARE_ROUTE, dispatch.MOE_LAYER["q4_0"].tag)
        print("" if st is None else st)
        return 0
    print(table(stats))
    if a.json:
        rows = [{"kernel": s.kernel, "geometry": s.geometry, "grid": s.grid, "variant": s.variant, "n": len(s.seconds),
                 "median_us": round(s.us, 3), "total_us": round(s.total_us, 3), "MB": round(s.mb, 3),
                 "GB_s": round(s.gbs, 1)}
                for s in stats.values()]
        bst = {k: {"geometry": s.geometry, "variant": s.variant, "median_us": round(s.us, 3)}
               for k, s in best(stats).items()}
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "best": bst}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
