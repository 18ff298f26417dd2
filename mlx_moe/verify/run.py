"""The correctness part of tools/verify_metal.py: every case family on one kernel
flavor, each check's result, which kernels each check launched, and coverage of
the registered kernels."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from . import cases as C


@dataclass
class CheckResult:
    family: str
    case: str
    target: str  # a kernel name, or "layer"
    status: str  # "pass", "fail" or "error"
    rel_err: Optional[float] = None  # max |err| / max |ref|; None where the check reports no numbers
    max_err: float = 0.0
    ref_max: float = 0.0
    tol: float = 0.0
    err_over_bound: Optional[float] = None  # max |err| / allowed error (pass: <= 1); None as rel_err
    compared: int = 0
    launched: Optional[List[str]] = None  # kernels the check asked the registry for (None: not tracked)
    detail: str = ""
    seconds: float = 0.0


@contextmanager
def launch_log() -> Iterator[Optional[set]]:
    """The names of the kernels fetched from the registry meanwhile (each launch fetches
    its kernel object from registry._KERNELS); None where the registry has no such cache."""
    from ..kernels import registry

    orig = getattr(registry, "_KERNELS", None)
    if not isinstance(orig, dict):
        yield None
        return
    names: set = set()

    class _Log(dict):
        def get(self, key, default=None):
            names.add(key[-1])
            return super().get(key, default)

    log = _Log(orig)
    registry._KERNELS = log
    try:
        yield names
    finally:
        orig.update(log)  # kernels built meanwhile stay built
        registry._KERNELS = orig


# -- the per-kernel cases of mlx_moe/kernels/kernel_cases.py (one small case per kernel name) --------

@dataclass(frozen=True)
class PerKernelCase:
    """An entry of mlx_moe.kernels.kernel_cases.CASES: check(flavor) raises AssertionError on a mismatch."""

    kernel: str
    id: str
    check: Callable[[str], None]
    family: str = "kernel_cases"

    def targets(self):
        return (self.kernel,)

    def checks(self, flavor: str, targets: Sequence[str]):
        def run() -> C.Measure:
            m = C.Measure()
            try:
                self.check(flavor)
            except AssertionError as e:
                m.problems.append(f"AssertionError: {e}")
            return m

        for t in targets:
            yield t, run


def per_kernel_cases() -> Dict[str, list]:
    """{kernel: [PerKernelCase]} from mlx_moe.kernels.kernel_cases.CASES (empty if that module is absent)."""
    try:
        from ..kernels import kernel_cases as K
    except ImportError:
        return {}
    table = getattr(K, "CASES", {}) or {}
    return {name: [PerKernelCase(name, f"{name}: {c.description}", c.check) for c in lst]
            for name, lst in table.items()}


def all_families(quick: bool) -> Dict[str, tuple]:
    """{family name: cases}: the randomized families, then the per-kernel cases as one family."""
    fams = {name: C.family_cases(name, quick) for name in C.FAMILIES}
    extra = tuple(c for lst in per_kernel_cases().values() for c in lst)
    if extra:
        fams["kernel_cases"] = extra
    return fams


def registered_kernels() -> List[str]:
    """Every kernel the package can launch: the names of registry.KERNELS, plus any
    `kernel:` section of metal/*.metal that the table does not name."""
    from ..kernels import registry

    names = list(getattr(registry, "KERNELS", {}))
    for path in sorted(registry.metal_dir().glob("*.metal")):
        names += [n for n in registry.read_family(path.stem)[1] if n not in names]
    return names


def coverage_gaps(kernels: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """{kernel: why} for registered kernels with no verification case: neither a valid
    KERNEL_FAMILIES entry (families that exist, each with cases targeting the kernel,
    and a quick case targeting it in one of them) nor an entry in
    mlx_moe/kernels/kernel_cases.py's CASES."""
    per_kernel = per_kernel_cases()
    gaps: Dict[str, str] = {}
    for k in kernels if kernels is not None else registered_kernels():
        if per_kernel.get(k):
            continue
        fams = C.KERNEL_FAMILIES.get(k)
        if not fams:
            gaps[k] = ("no verification case: add an entry to KERNEL_FAMILIES in mlx_moe/verify/cases.py "
                       "or to CASES in mlx_moe/kernels/kernel_cases.py")
            continue
        for f in fams:
            if f not in C.FAMILIES:
                gaps[k] = f"KERNEL_FAMILIES names unknown family {f!r}"
            elif not any(k in c.targets() for c in C.family_cases(f)):
                gaps[k] = f"family {f!r} has no case targeting it"
            if k in gaps:
                break
        else:
            if not any(k in c.targets() for f in fams for c in C.family_cases(f, quick=True)):
                gaps[k] = "no quick case targets it (--quick would not check it)"
    return gaps


def run_checks(flavor: str, quick: bool, families: Optional[Sequence[str]] = None,
               progress: Callable[[str], None] = print) -> List[CheckResult]:
    """Every check of every case of the chosen families on `flavor`."""
    fams = all_families(quick)
    if families:
        unknown = [f for f in families if f not in fams]
        if unknown:
            raise SystemExit(f"unknown case families {unknown}; choose from: {', '.join(fams)}")
        fams = {f: fams[f] for f in families}
    results = []
    for fam, cases in fams.items():
        for case in cases:
            for target, thunk in case.checks(flavor, case.targets()):
                t0 = time.perf_counter()
                with launch_log() as launched:
                    try:
                        m = thunk()
                        err = None
                    except Exception as e:  # a crash is a result too: report it, go on
                        m, err = None, f"{type(e).__name__}: {e}"
                r = CheckResult(fam, case.id, target, "error", launched=sorted(launched) if launched is not None
                                else None, seconds=round(time.perf_counter() - t0, 3))
                if m is not None:
                    r.status = "pass" if m.ok else "fail"
                    r.rel_err = m.rel_err if m.tol or m.compared else None
                    r.max_err, r.ref_max = m.max_err, m.ref_max
                    r.tol, r.compared = m.tol, m.compared
                    r.err_over_bound = m.worst if r.rel_err is not None else None
                    r.detail = "" if m.ok else m.describe()
                    if target != C.LAYER and r.launched is not None and target not in r.launched:
                        r.status = "fail"
                        r.detail = (r.detail + "; " if r.detail else "") + f"{target} was not launched by its check"
                else:
                    r.detail = " | ".join(err.splitlines()[:8])[:2000] if err else "error"
                results.append(r)
                progress(f"  {r.status.upper():5s} {fam:24s} {target:24s} {case.id}"
                         + (f"  -- {r.detail}" if r.status != "pass" else ""))
    return results


def summarize(results: List[CheckResult]) -> List[dict]:
    """One row per (target, family): checks, failures, worst relative error."""
    rows: Dict[tuple, dict] = {}
    for r in results:
        row = rows.setdefault((r.target, r.family), {"target": r.target, "family": r.family, "checks": 0,
                                                     "failed": 0, "max_rel_err": None, "status": "pass"})
        row["checks"] += 1
        if r.rel_err is not None:
            row["max_rel_err"] = max(row["max_rel_err"] or 0.0, r.rel_err)
        if r.status != "pass":
            row["failed"] += 1
            row["status"] = "FAIL"
    for row in rows.values():
        row["status"] = row["status"].upper()
    return sorted(rows.values(), key=lambda r: (r["target"] == C.LAYER, r["target"], r["family"]))


def kernel_status(results: List[CheckResult], kernels: Sequence[str]) -> Dict[str, dict]:
    """Per registered kernel: its own checks (run and failed), and the checks that launched it."""
    out = {}
    for k in kernels:
        own = [r for r in results if r.target == k]
        launched_in = [r for r in results if r.launched and k in r.launched]
        bad = [r for r in own if r.status != "pass"]
        out[k] = {"checks": len(own), "failed": len(bad), "launched_in_checks": len(launched_in),
                  "max_rel_err": max((r.rel_err for r in own if r.rel_err is not None), default=None),
                  "max_err_over_bound": max((r.err_over_bound for r in own if r.err_over_bound is not None),
                                            default=None),
                  "status": "NOT RUN" if not own else ("FAIL" if bad else "PASS")}
    return out


def as_dicts(results: List[CheckResult]) -> List[dict]:
    return [asdict(r) for r in results]
