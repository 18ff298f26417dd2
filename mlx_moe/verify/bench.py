"""The benchmark part of tools/verify_metal.py: tools/bench_kernels.py (decode and
prefill) and tools/bench_generate.py (end to end against mlx-lm), called as
functions with sizes that fit the machine's memory."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Optional

GiB = 1 << 30
# Qwen3-30B-A3B: hidden 2048, expert ffn 768, 128 experts, top-8, 48 layers.
HIDDEN, FFN, EXPERTS, TOP_K, LAYERS = 2048, 768, 128, 8, 48
EXPERT_BYTES_4B = 3 * HIDDEN * FFN * 18 // 32  # Q4_0 / MLX affine g64: 4.5 bits per weight
EXPERT_BYTES_F16 = 3 * HIDDEN * FFN * 2
# Per-layer weights of the end-to-end model: mlx-lm's 4-bit experts, our Q4_0 copy, attention.
E2E_LAYER_BYTES = 2 * EXPERTS * EXPERT_BYTES_4B + 12 * (1 << 20)
E2E_FIXED_BYTES = 2 * 151936 * HIDDEN * 18 // 32 + GiB  # embeddings + lm_head (4-bit) + working room


def tools_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str):
    """tools/<name>.py as a module (the benchmarks live in the checkout, not in the wheel)."""
    path = tools_dir() / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run tools/verify_metal.py from a checkout of mlx-moe")
    spec = importlib.util.spec_from_file_location(f"_mlx_moe_tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plan(memory_bytes: int, budget_fraction: float = 0.35) -> dict:
    """Benchmark sizes for a machine with `memory_bytes` of unified memory.

    Decode: 48 layers, each with its own weights, so one timed pass reads
    48 x 8 routed experts x 2.65 MB = 1 GB, beyond any system-level cache; when
    128 experts per layer for both engines (ours and mlx-lm's) do not fit the
    budget, fewer experts per layer (the GEMV shapes stay Qwen3-30B-A3B's),
    then fewer layers.  Prefill reads every expert of a layer: 8 layers rotate
    8 x E x 2.65 MB.  End to end: as many layers as fit.
    """
    budget = memory_bytes * budget_fraction
    layers, experts = LAYERS, EXPERTS
    per_expert = 2 * EXPERT_BYTES_4B  # ours + mlx-lm's copy
    if layers * experts * per_expert > budget:
        experts = max(4 * TOP_K, int(budget // (layers * per_expert)))
    while layers > 8 and layers * experts * per_expert > budget:
        layers -= 8
    float_layers = min(8, int(budget // (experts * EXPERT_BYTES_F16)))
    e2e_layers = int((budget - E2E_FIXED_BYTES) // E2E_LAYER_BYTES)
    return {
        "budget_GiB": round(budget / GiB, 1),
        "decode": {"layers": layers, "experts": experts, "hidden": HIDDEN, "ffn": FFN, "k": TOP_K,
                   "tokens": 1, "reps": 30,
                   "float_layers": float_layers if float_layers >= 2 else 0,
                   "rotated_MB_per_pass": round(layers * TOP_K * EXPERT_BYTES_4B / 1e6)},
        "prefill": {"layers": min(8, layers), "experts": experts, "hidden": HIDDEN, "ffn": FFN, "k": TOP_K,
                    "tokens": 512, "reps": 5,
                    "rotated_MB_per_pass": round(min(8, layers) * experts * EXPERT_BYTES_4B / 1e6)},
        "generate": {"shape": "qwen3-30b-a3b", "layers": min(LAYERS, e2e_layers), "prompt_tokens": 256,
                     "gen_tokens": 64, "reps": 3},
    }


@contextmanager
def _dispatch_restored():
    """bench_kernels moves dispatch's thresholds and geometry; put them back afterwards."""
    from ..kernels import dispatch

    saved = {n: getattr(dispatch, n) for n in ("MAX_DECODE_PAIRS",)}
    tables = {n: dict(getattr(dispatch, n)) for n in ("GATE_UP", "DOWN", "MV_MAX_PAIRS") if hasattr(dispatch, n)}
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(dispatch, n, v)
        for n, t in tables.items():
            getattr(dispatch, n).clear()
            getattr(dispatch, n).update(t)


def _call(tool, argv: list, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        with _dispatch_restored(), redirect_stdout(log):
            tool.main(argv + ["--json", str(out)])
        return json.loads(out.read_text())


def kernel_bench(p: dict, bandwidth: Optional[float], log) -> dict:
    """Decode rows (us/layer, GB/s of routed expert weights, % of the published bandwidth)
    and prefill rows (us/layer, TFLOP/s) from tools/bench_kernels.py."""
    bk = load_tool("bench_kernels")
    d, pf = p["decode"], p["prefill"]

    def shape(c):
        return ["--experts", str(c["experts"]), "--hidden", str(c["hidden"]), "--ffn", str(c["ffn"]), "--k", str(c["k"])]

    dec = _call(bk, ["--layers", str(d["layers"]), *shape(d), "--tokens", str(d["tokens"]),
                     "--reps", str(d["reps"]), "--float-layers", str(d["float_layers"])], log)
    for row in dec["rows"]:
        row["pct_of_published"] = round(100 * row["GB_s"] / bandwidth, 1) if bandwidth else None
    pre = _call(bk, ["--prefill", "--layers", str(pf["layers"]), "--prefill-layers", str(pf["layers"]),
                     *shape(pf), "--tokens", str(pf["tokens"]), "--reps", str(pf["reps"]), "--float-layers", "0"], log)
    for row in pre["rows"]:
        row["us_per_layer"] = round(row["ms_per_layer"] * 1e3, 1)
    return {"decode": {"config": d, "hbm_read_GB_s": dec.get("hbm_read_GB_s"), "rows": dec["rows"]},
            "prefill": {"config": pf, "rows": pre["rows"]}}


def generate_bench(p: dict, log) -> dict:
    """tools/bench_generate.py on a Qwen3-30B-A3B-shaped random model (as many layers as
    fit): mlx-lm, mlx-moe on the custom kernels (Q4_0 experts of the same size) and
    mlx-moe on the mlx backend, medians of tok/s and the ratios to mlx-lm."""
    g = p["generate"]
    if g["layers"] < 2:
        return {"status": "not run", "reason": "not enough memory for two layers of the model", "config": g}
    bg = load_tool("bench_generate")
    res = _call(bg, ["--shape", g["shape"], "--layers", str(g["layers"]), "--experts", "q4_0",
                     "--prompt-tokens", str(g["prompt_tokens"]), "--gen-tokens", str(g["gen_tokens"]),
                     "--reps", str(g["reps"]), "--engines", "mlx-lm,mlx-moe,mlx-moe/mlx"], log)
    summary = res["summary"]
    base = summary.get("mlx-lm")
    rows = []
    for engine, s in summary.items():
        rows.append({"engine": engine, "prefill_tok_s": round(s["prefill_tps"], 1),
                     "decode_tok_s": round(s["decode_tps"], 1),
                     "prefill_vs_mlx_lm": round(s["prefill_tps"] / base["prefill_tps"], 3) if base else None,
                     "decode_vs_mlx_lm": round(s["decode_tps"] / base["decode_tps"], 3) if base else None})
    return {"status": "ok", "config": g, "rows": rows}
