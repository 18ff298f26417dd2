"""tools/verify_metal.py: the one-command Metal verification, tested where no Metal
exists (its correctness part runs on the CPU emulation with --emulate).

- without Metal and without --emulate it exits 2 and writes nothing;
- `--emulate --quick` runs every case family and every registered kernel and
  writes report.json (schema checked here) and report.md;
- every registered kernel has verification cases, and a kernel registered
  without any makes the tool fail;
- a deliberately broken kernel source is reported as failing, on the broken
  kernel and not on the kernels next to it, with a non-zero exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_moe.kernels import registry
from mlx_moe.verify import bench, cases, main, run
from mlx_moe.verify.system import published_bandwidth

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "verify_metal.py"

try:
    from mlx_moe.emulation import metal_kernel as _emulated_metal_kernel  # noqa: F401

    _HAS_EMULATION = True
except ImportError:
    _HAS_EMULATION = False
needs_emulation = pytest.mark.skipif(not _HAS_EMULATION, reason="mlx_moe.emulation is not available")

STATUSES = {"pass", "fail", "error"}


def _check_report_schema(rep: dict) -> None:
    """The report's documented shape (mlx_moe/verify/report.py SCHEMA)."""
    assert rep["schema"] == "mlx-moe/verify-metal/1"
    assert rep["status"] in ("pass", "fail") and rep["mode"] in ("metal", "emulated")
    assert isinstance(rep["quick"], bool) and isinstance(rep["seconds"], (int, float))
    sysinfo = rep["system"]
    for key in ("chip", "macos", "mlx", "mlx_lm", "python", "device_info", "published_bandwidth_GB_s",
                "bandwidth_source", "metal_available"):
        assert key in sysinfo, key
    assert sysinfo["mlx"] == mx.__version__
    cov = rep["coverage"]
    assert set(cov) >= {"registered", "uncovered", "kernel_families", "per_kernel_cases"}
    assert isinstance(cov["uncovered"], dict)
    c = rep["correctness"]
    assert c["status"] in ("pass", "fail") and c["checks"] == len(c["results"]) > 0
    assert c["failed"] == sum(r["status"] != "pass" for r in c["results"])
    for r in c["results"]:
        assert set(r) >= {"family", "case", "target", "status", "rel_err", "max_err", "tol", "launched", "detail"}
        assert r["status"] in STATUSES
        assert r["rel_err"] is None or r["rel_err"] >= 0
    for k, v in c["kernels"].items():
        assert k in cov["registered"]
        assert v["status"] in ("PASS", "FAIL", "NOT RUN")
        assert set(v) >= {"checks", "failed", "launched_in_checks", "max_rel_err"}
    for row in c["summary"]:
        assert row["status"] in ("PASS", "FAIL") and row["checks"] >= 1
    for part in ("benchmarks", "end_to_end"):
        assert rep[part]["status"] in ("ok", "not run", "error")


def test_without_metal_exits_2_and_runs_nothing(tmp_path):
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, str(TOOL), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Metal is not available" in p.stderr and "--emulate" in p.stderr
    assert "correctness" not in p.stdout  # nothing ran
    assert not out.exists()


@needs_emulation
def test_emulate_quick_runs_every_family_and_writes_both_reports(tmp_path):
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, str(TOOL), "--emulate", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-5000:]
    rep = json.loads((out / "report.json").read_text())
    _check_report_schema(rep)
    assert rep["status"] == "pass" and rep["mode"] == "emulated" and rep["quick"] is True
    assert rep["system"]["metal_available"] is mx.metal.is_available()

    # Every case family ran (the randomized ones and the per-kernel cases), each at least once.
    ran = {r["family"] for r in rep["correctness"]["results"]}
    assert ran == set(cases.FAMILIES) | {"kernel_cases"}
    # Every registered kernel was checked on its own and launched by its checks.
    assert set(rep["coverage"]["registered"]) >= set(registry.KERNELS)
    assert rep["coverage"]["uncovered"] == {}
    for k in registry.KERNELS:
        v = rep["correctness"]["kernels"][k]
        assert v["status"] == "PASS" and v["checks"] >= 1 and v["launched_in_checks"] >= 1, (k, v)
    for r in rep["correctness"]["results"]:
        if r["target"] != "layer":
            assert r["target"] in r["launched"], r  # a kernel's own check really launched it
    layer_fused = [r for r in rep["correctness"]["results"]
                   if r["target"] == "layer" and r["case"].startswith("mv ") and "split" not in r["case"]
                   and "combine_mlx" not in r["case"]]
    assert layer_fused and all(set(r["launched"]) == {"mul_mv_id_swiglu", "mul_mv_id_down_combine"}
                               for r in layer_fused)
    assert rep["benchmarks"] == {"status": "not run", "reason": "emulation"}
    assert rep["end_to_end"]["status"] == "not run"

    md = (out / "report.md").read_text()
    assert "**PASS**" in md and md.count("not run: emulation") == 2
    for k in registry.KERNELS:
        assert f"`{k}`" in md
    assert "report.md" in p.stdout  # the printed report ends by naming the files


def test_every_registered_kernel_has_verification_cases():
    assert run.coverage_gaps() == {}
    # The randomized families back every kernel they claim, and every family they name exists.
    for kernel, fams in cases.KERNEL_FAMILIES.items():
        for f in fams:
            assert any(kernel in c.targets() for c in cases.family_cases(f)), (kernel, f)


def test_a_kernel_registered_without_cases_is_a_gap(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.KERNELS, "dummy_kernel", registry.KernelSpec("mul_mv_id", ("x",), ("y",)))
    gaps = run.coverage_gaps()
    assert list(gaps) == ["dummy_kernel"] and "no verification case" in gaps["dummy_kernel"]
    if not _HAS_EMULATION:
        return
    rc = main(["--emulate", "--quick", "--families", "ragged_rows", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "report.json").read_text())
    _check_report_schema(rep)
    assert rc == 1 and rep["status"] == "fail"
    assert list(rep["coverage"]["uncovered"]) == ["dummy_kernel"]
    assert rep["correctness"]["kernels"]["dummy_kernel"]["status"] == "NOT RUN"
    assert "dummy_kernel" in (tmp_path / "report.md").read_text()


def _patched_family(family: str, kernel: str, old: str, new: str):
    """registry.read_family with one kernel body's text replaced (the source is checked to change)."""
    original = registry.read_family

    def read_family(name):
        helpers, bodies = original(name)
        if name != family:
            return helpers, bodies
        assert old in bodies[kernel], f"{old!r} not in {kernel}: the test's patch is stale"
        return helpers, {**bodies, kernel: bodies[kernel].replace(old, new)}

    return read_family


@needs_emulation
def test_a_broken_kernel_is_reported_failing(tmp_path, monkeypatch):
    # down_combine forgets its identity (zero-computation) experts: their weight * x is
    # never added (the rows, shared with mul_mv_id_moe, are computed in a helper).
    monkeypatch.setattr(registry, "read_family", _patched_family(
        "mul_mv_id", "mul_mv_id_down_combine", "moe_down_rows<WT, K, N, NE, NI, KS", "moe_down_rows<WT, K, N, NE, 0, KS"))
    monkeypatch.setattr(registry, "_KERNELS", {})  # rebuild every kernel from the patched source
    rc = main(["--emulate", "--quick", "--families", "zero_experts,repeated_ids", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "report.json").read_text())
    _check_report_schema(rep)
    assert rc == 1 and rep["status"] == "fail" and rep["correctness"]["status"] == "fail"
    k = rep["correctness"]["kernels"]
    assert k["mul_mv_id_down_combine"]["status"] == "FAIL"
    # The kernels next to it are not blamed: their own checks pass on the same cases.
    assert k["mul_mv_id_swiglu"]["status"] == "PASS" and k["mul_mv_id"]["status"] == "PASS"
    failing = {(r["family"], r["target"]) for r in rep["correctness"]["results"] if r["status"] != "pass"}
    assert ("zero_experts", "mul_mv_id_down_combine") in failing and ("zero_experts", "layer") in failing
    md = (tmp_path / "report.md").read_text()
    assert "**FAIL**" in md and "Failing checks" in md and "mul_mv_id_down_combine" in md


@needs_emulation
def test_a_kernel_that_does_not_compile_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "read_family", _patched_family(
        "mul_mv_id", "mul_mv_id", "const uint pair = threadgroup_position_in_grid.z;",
        "const uint pair = threadgroup_position_in_grid.z +;"))
    monkeypatch.setattr(registry, "_KERNELS", {})
    rc = main(["--emulate", "--quick", "--families", "ragged_rows", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rc == 1
    (r,) = rep["correctness"]["results"]
    assert r["target"] == "mul_mv_id" and r["status"] == "error" and r["detail"]
    assert rep["correctness"]["kernels"]["mul_mv_id"]["status"] == "FAIL"


@pytest.mark.parametrize("chip,perf,want", [
    ("Apple M2", 4, 100.0), ("Apple M1 Max", 8, 400.0), ("Apple M3 Pro", 6, 150.0),
    ("Apple M3 Max", 10, 300.0), ("Apple M3 Max", 12, 400.0), ("Apple M4 Max", 10, 410.0),
    ("Apple M4 Max", 12, 546.0), ("Apple M2 Ultra", 16, 800.0), ("Intel(R) Core(TM) i9", None, None),
])
def test_published_bandwidth(chip, perf, want):
    # Apple's published figures (apple.com newsroom / Mac tech specs).
    got, note = published_bandwidth(chip, perf)
    assert got == want and note


@pytest.mark.parametrize("gib", [8, 16, 24, 36, 64, 128, 192])
def test_benchmark_plan_fits_memory_and_rotates_beyond_the_cache(gib):
    p = bench.plan(gib << 30, 0.35)
    budget = 0.35 * (gib << 30)
    d = p["decode"]
    # Weights resident for the decode run: ours + mlx-lm's copy of every layer's experts.
    assert d["layers"] * d["experts"] * 2 * bench.EXPERT_BYTES_4B <= budget
    assert d["experts"] >= 16  # at least twice top-8: routing still picks among experts
    # Routed weights read per timed pass: well beyond the largest system-level cache (96 MB).
    assert d["layers"] * 8 * 3 * 2048 * 768 * 4.5 / 8 >= 3 * 96e6
    assert p["prefill"]["layers"] * d["experts"] * bench.EXPERT_BYTES_4B >= 3 * 96e6
    g = p["generate"]["layers"]
    assert g >= 2 and (g == 48 or bench.E2E_FIXED_BYTES + (g + 1) * bench.E2E_LAYER_BYTES > budget)


@needs_emulation
def test_benchmark_part_runs_through_the_bench_tools(monkeypatch):
    """The benchmark plumbing (tools/bench_kernels.py decode and prefill, tools/bench_generate.py)
    on a tiny plan, with bench_kernels' kernels on the emulation (no GPU here): the rows come
    back with the derived columns, and dispatch's thresholds are as before."""
    from mlx_moe.kernels import dispatch

    load = bench.load_tool

    def load_tool(name):
        mod = load(name)
        if name == "bench_kernels":
            monkeypatch.setattr(mod, "flavor", lambda: "emulated")
            monkeypatch.setattr(mod, "hbm_read_gbs", lambda reps: 1.0)  # not a 1 GiB sum on the CPU
        return mod

    monkeypatch.setattr(bench, "load_tool", load_tool)
    before = (dispatch.MAX_DECODE_PAIRS, dict(dispatch.MV_MAX_PAIRS), dict(dispatch.GATE_UP), dict(dispatch.DOWN))
    small = dict(layers=1, experts=8, hidden=128, ffn=64, k=2, reps=1)
    p = {"decode": {**small, "tokens": 1, "float_layers": 0, "rotated_MB_per_pass": 0},
         "prefill": {**small, "tokens": 40, "rotated_MB_per_pass": 0},
         "generate": {"shape": "tiny", "layers": 2, "prompt_tokens": 8, "gen_tokens": 3, "reps": 1}}
    import io

    log = io.StringIO()
    kb = bench.kernel_bench(p, 100.0, log)
    dec = {r["variant"]: r for r in kb["decode"]["rows"]}
    ours = dec["ours q4_0 (swiglu fused, combine fused)"]
    assert ours["us_per_layer"] > 0 and ours["pct_of_published"] == pytest.approx(ours["GB_s"], rel=0.01)
    assert any(v.startswith("mlx-lm") for v in dec)
    pre = kb["prefill"]["rows"]
    assert pre and all(r["tokens"] == 40 and r["us_per_layer"] > 0 for r in pre)
    assert any(r["variant"].startswith("ours") for r in pre) and any(r["variant"].startswith("mlx-lm") for r in pre)
    assert (dispatch.MAX_DECODE_PAIRS, dispatch.MV_MAX_PAIRS, dispatch.GATE_UP, dispatch.DOWN) == before

    g = bench.generate_bench(p, log)
    assert g["status"] == "ok"
    rows = {r["engine"]: r for r in g["rows"]}
    assert {"mlx-lm", "mlx-moe"} <= set(rows)  # (+ "mlx-moe/mlx" where the kernels are not the mlx backend)
    assert rows["mlx-lm"]["decode_vs_mlx_lm"] == 1.0 and rows["mlx-moe"]["decode_tok_s"] > 0
