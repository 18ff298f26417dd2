"""Verification of the Metal kernels on a Mac, in one command (tools/verify_metal.py).

    python tools/verify_metal.py              # Apple Silicon: correctness + benchmarks + end to end
    python tools/verify_metal.py --emulate    # anywhere: the correctness part on the CPU emulation

Correctness runs every case family of mlx_moe/verify/cases.py (and the
per-kernel cases of mlx_moe/kernels/kernel_cases.py) on the `metal` kernels against
the `mlx` backend and numpy; the benchmarks call tools/bench_kernels.py and
tools/bench_generate.py.  The report is printed and written as report.json and
report.md.  Exit codes: 0 all passed, 1 something failed, 2 no Metal (nothing run).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

NO_METAL = ("verify_metal: Metal is not available here ({why}); nothing was run.\n"
            "Run it on an Apple Silicon Mac (python tools/verify_metal.py), or pass --emulate to run the\n"
            "correctness part on the CPU emulation of Metal (no benchmarks).")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/verify_metal.py",
                                description="Prove mlx-moe's Metal kernels on this Mac: correctness against "
                                            "the mlx backend, kernel benchmarks, end to end against mlx-lm; "
                                            "writes report.json and report.md.")
    p.add_argument("--emulate", action="store_true",
                   help="run the correctness part on the CPU emulation of Metal (any machine; benchmarks skipped)")
    p.add_argument("--quick", action="store_true", help="a reduced case set (every family, fewer cases)")
    p.add_argument("--families", default=None,
                   help="comma-separated case families to run (default: all; see --list)")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmarks and the end-to-end run")
    p.add_argument("--out", default="verify_metal_report", help="directory for report.json and report.md")
    p.add_argument("--memory-fraction", type=float, default=0.35,
                   help="share of unified memory the benchmarks may fill (default 0.35)")
    p.add_argument("--list", action="store_true", help="list the case families and registered kernels, run nothing")
    return p.parse_args(argv)


def _metal_why_not() -> Optional[str]:
    import mlx.core as mx

    if not mx.metal.is_available():
        return f"this MLX build ({sys.platform}, device {mx.default_device()}) has no Metal GPU"
    return None


def main(argv=None) -> int:
    a = parse_args(argv)
    from . import cases as C
    from . import run as R

    if a.list:
        for name, f in C.FAMILIES.items():
            print(f"{name:26s} {len(f.cases):2d} cases ({len(f.quick)} quick)  {f.about}")
        kc = R.per_kernel_cases()
        if kc:
            print(f"{'kernel_cases':26s} {sum(map(len, kc.values())):2d} cases  mlx_moe/kernels/kernel_cases.py CASES")
        print("registered kernels:", ", ".join(R.registered_kernels()))
        return 0
    why = _metal_why_not()
    if why and not a.emulate:
        print(NO_METAL.format(why=why), file=sys.stderr)
        return 2
    flavor = "emulated" if a.emulate else "metal"
    if a.emulate:
        import mlx.core as mx

        mx.set_default_device(mx.cpu)  # the emulation computes on the CPU; so do its inputs

    from .report import SCHEMA, markdown
    from .system import system_info

    t0 = time.perf_counter()
    sysinfo = system_info()
    print(f"verify_metal: {sysinfo['chip']}, macOS {sysinfo['macos'] or '-'}, MLX {sysinfo['mlx']}, "
          f"kernels: {flavor}{' (quick)' if a.quick else ''}", flush=True)

    kernels = R.registered_kernels()
    gaps = R.coverage_gaps(kernels)
    families = [f for f in a.families.split(",") if f] if a.families else None
    print("correctness:", flush=True)
    results = R.run_checks(flavor, a.quick, families, progress=lambda s: print(s, flush=True))
    kstat = R.kernel_status(results, kernels)
    n_bad = sum(r.status != "pass" for r in results)
    if not families:  # a full run must check every registered kernel at least once
        for k, v in kstat.items():
            if v["status"] == "NOT RUN" and k not in gaps:
                gaps[k] = "registered, but no check targeting it ran"
    correct = n_bad == 0 and not gaps and bool(results)

    bench = {"status": "not run", "reason": "emulation" if a.emulate else "--no-bench"}
    e2e = dict(bench)
    log = io.StringIO()
    if not a.emulate and not a.no_bench:
        from . import bench as B

        mem = int(sysinfo["device_info"].get("memory_size") or 0) or 16 << 30
        p = B.plan(mem, a.memory_fraction)
        print(f"benchmarks (plan {json.dumps(p)}):", flush=True)
        for key, fn in (("bench", lambda: B.kernel_bench(p, sysinfo["published_bandwidth_GB_s"], log)),
                        ("e2e", lambda: B.generate_bench(p, log))):
            try:
                res = {"status": "ok", **fn()} if key == "bench" else fn()
            except Exception as e:  # report it; the correctness verdict stands
                res = {"status": "error", "reason": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-4000:]}
            if key == "bench":
                bench = res
            else:
                e2e = res
            print(f"  {key}: {res['status']}" + (f" ({res.get('reason')})" if res["status"] != "ok" else ""),
                  flush=True)

    ok = correct and bench["status"] != "error" and e2e["status"] != "error"
    rep = {
        "schema": SCHEMA,
        "status": "pass" if ok else "fail",
        "mode": flavor,
        "quick": a.quick,
        "families": families,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(["tools/verify_metal.py"] + list(sys.argv[1:] if argv is None else argv)),
        "system": sysinfo,
        "coverage": {"registered": kernels, "uncovered": gaps,
                     "kernel_families": {k: list(C.KERNEL_FAMILIES.get(k, ())) for k in kernels},
                     "per_kernel_cases": {k: len(v) for k, v in R.per_kernel_cases().items()}},
        "correctness": {"status": "pass" if correct else "fail", "flavor": flavor, "checks": len(results),
                        "failed": n_bad, "kernels": kstat, "summary": R.summarize(results),
                        "results": R.as_dicts(results)},
        "benchmarks": bench,
        "end_to_end": e2e,
        "bench_log": log.getvalue()[-20000:],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    md = markdown(rep)
    (out / "report.md").write_text(md + "\n")
    print("\n" + md)
    print(f"\nwrote {out / 'report.json'} and {out / 'report.md'}: paste report.md into the issue, attach report.json")
    return 0 if ok else 1
