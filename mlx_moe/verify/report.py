"""The verification report as Markdown (the JSON is the report dict itself)."""

from __future__ import annotations

from typing import List

SCHEMA = "mlx-moe/verify-metal/1"


def _table(head: List[str], rows: List[list]) -> List[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _g(v, fmt="{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(rep: dict) -> str:
    s = rep["system"]
    c = rep["correctness"]
    lines = [f"## mlx-moe verify_metal: **{rep['status'].upper()}** ({rep['mode']}"
             f"{', quick case set' if rep['quick'] else ''})", ""]
    lines += _table(["chip", "macOS", "MLX", "mlx-lm", "mlx-moe", "published bandwidth"],
                    [[s["chip"], s["macos"] or "-", s["mlx"], s["mlx_lm"] or "-",
                      f"{s['mlx_moe'] or '-'} ({s['git_commit'] or 'no git'})",
                      f"{_g(s['published_bandwidth_GB_s'], '{:g} GB/s')}"]])
    lines += ["", f"{rep['created']}, {rep['seconds']:.0f} s. Bandwidth: {s['bandwidth_source']}.", ""]

    cov = rep["coverage"]
    lines += [f"### Correctness: {c['status'].upper()} ({c['checks']} checks, {c['failed']} not passing, "
              f"flavor `{c['flavor']}` vs the `mlx` backend / numpy)", ""]
    if cov["uncovered"]:
        lines += ["**Kernels without verification cases:** "
                  + "; ".join(f"`{k}`: {why}" for k, why in cov["uncovered"].items()), ""]
    lines += _table(["kernel", "status", "own checks", "failed", "max rel err", "max err / bound (pass <= 1)",
                     "launched in checks"],
                    [[f"`{k}`", v["status"], v["checks"], v["failed"], _g(v["max_rel_err"]),
                      _g(v.get("max_err_over_bound")), v["launched_in_checks"]] for k, v in c["kernels"].items()])
    lines += ["", "<details><summary>per kernel and case family</summary>", ""]
    lines += _table(["check", "family", "checks", "failed", "max rel err", "status"],
                    [[f"`{r['target']}`", r["family"], r["checks"], r["failed"], _g(r["max_rel_err"]), r["status"]]
                     for r in c["summary"]])
    lines += ["", "</details>", ""]
    bad = [r for r in c["results"] if r["status"] != "pass"]
    if bad:
        lines += ["Failing checks:", ""]
        lines += [f"- {r['status'].upper()} `{r['target']}` {r['family']} / {r['case']}: {r['detail']}" for r in bad[:40]]
        if len(bad) > 40:
            lines.append(f"- ... {len(bad) - 40} more in the JSON report")
        lines.append("")

    b = rep["benchmarks"]
    lines += ["### Kernel microbenchmarks (Qwen3-30B-A3B layer shapes)", ""]
    if b.get("status") != "ok":
        lines += [f"not run: {b.get('reason')}", ""]
    else:
        d = b["decode"]
        cfg = d["config"]
        lines += [f"Decode: {cfg['layers']} layers x {cfg['experts']} experts, top-8, T=1, "
                  f"{cfg['rotated_MB_per_pass']} MB of routed weights per pass; "
                  f"measured read rate {_g(d.get('hbm_read_GB_s'), '{:.0f}')} GB/s.", ""]
        lines += _table(["variant", "T", "us/layer", "GB/s", "% of published"],
                        [[r["variant"], r["tokens"], r["us_per_layer"], r["GB_s"], _g(r.get("pct_of_published"), "{}")]
                         for r in d["rows"]])
        p = b["prefill"]
        lines += ["", f"Prefill: {p['config']['layers']} layers x {p['config']['experts']} experts, "
                  f"T={p['config']['tokens']}.", ""]
        lines += _table(["variant", "T", "us/layer", "TFLOP/s"],
                        [[r["variant"], r["tokens"], r["us_per_layer"], r["TFLOP_s"]] for r in p["rows"]])
        lines.append("")
    g = rep["end_to_end"]
    lines += ["### End to end vs mlx-lm (Qwen3-30B-A3B-shaped random model, 4-bit)", ""]
    if g.get("status") != "ok":
        lines += [f"not run: {g.get('reason')}", ""]
    else:
        cfg = g["config"]
        lines += [f"{cfg['layers']} layers, prompt {cfg['prompt_tokens']}, decode {cfg['gen_tokens']}, "
                  f"median of {cfg['reps']}.", ""]
        lines += _table(["engine", "prefill tok/s", "decode tok/s", "prefill vs mlx-lm", "decode vs mlx-lm"],
                        [[r["engine"], r["prefill_tok_s"], r["decode_tok_s"], _g(r["prefill_vs_mlx_lm"], "{:.2f}x"),
                          _g(r["decode_vs_mlx_lm"], "{:.2f}x")] for r in g["rows"]])
        lines.append("")
    return "\n".join(lines)
