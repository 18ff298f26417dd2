"""The analysis result: per-layer and overall numbers, as Markdown, JSON and plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .cache import hit_curve
from .stats import random_reuse_null, random_working_set_null

SEMANTICS = (
    "Cache replay: one cache of C expert slots per layer, starting empty and kept across "
    "sequences and files. A token's k experts are requested together; a request hits if the "
    "expert is resident when the token arrives; misses are loaded, evicting per policy, and never "
    "evict an expert of the same token. Hit rate = hits / all requests (cold misses included); "
    "zero-computation experts are not requested. LRU: evict the least recently requested "
    "(within a token, expert_0 counts as requested first). LFU: evict the fewest requests so far "
    "(whole history), ties to the least recently requested. Belady: evict the expert whose next "
    "request is farthest away (optimal).")
OVERLAP_DEF = (
    "Overlap: mean |S_t ∩ S_t+1| / k over consecutive tokens of one sequence and layer "
    "(all k slots, zero experts included). Reuse@w: mean share of a token's k experts already "
    "selected by one of the previous w tokens (tokens with fewer than w predecessors are left "
    "out). Random null: k/N and 1-(1-k/N)^w with N = all expert ids. Shuffled null: the same "
    "statistic after randomly permuting the layer's token order (fixed seed): same frequencies, "
    "no temporal locality.")


def _f(x, nd=6):
    """JSON-friendly float (NaN -> None)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else round(x, nd)


def _pct(x, nd=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{nd}f}%"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:,.1f} MiB"


@dataclass
class LayerStats:
    layer: int
    tokens: int
    selections: int
    zero_selections: int
    counts: np.ndarray
    entropy: float
    coverage: Dict[float, int]
    top: list
    pairs: int
    overlap: float
    overlap_shuffled: float
    overlap_decode: Optional[float]
    reuse: float
    reuse_shuffled: float
    overlap_hits: int
    overlap_hits_shuffled: int
    working_sets: np.ndarray
    real_per_token: np.ndarray
    hists: Dict[str, np.ndarray]
    curves: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)
    knee: Optional[int] = None
    knee_bytes: Optional[int] = None

    def to_dict(self, report: "Report") -> dict:
        ws = self.working_sets
        return {
            "layer": self.layer, "tokens": self.tokens, "selections": self.selections,
            "zero_selections": self.zero_selections,
            "zero_share": _f(self.zero_selections / max(1, self.selections + self.zero_selections)),
            "entropy": _f(self.entropy),
            "coverage": {f"{int(round(100 * f))}%": n for f, n in self.coverage.items()},
            "top_experts": [{"expert": e, "share": _f(s)} for e, s in self.top],
            "overlap": _f(self.overlap), "overlap_shuffled": _f(self.overlap_shuffled),
            "overlap_decode": _f(self.overlap_decode),
            f"reuse_w{report.window}": _f(self.reuse),
            f"reuse_w{report.window}_shuffled": _f(self.reuse_shuffled),
            "working_set": {"mean": _f(ws.mean()) if len(ws) else None,
                            "max": int(ws.max()) if len(ws) else None,
                            "windows": [int(v) for v in ws]},
            "real_experts_per_token": [int(v) for v in self.real_per_token],
            "frequency": [int(v) for v in self.counts],
            "hit_rates": {p: {ph: [_f(v) for v in c] for ph, c in cs.items()}
                          for p, cs in self.curves.items()},
            "cold_misses": {p: int(h[:, -1].sum()) for p, h in self.hists.items()},
            "recommended_capacity": self.knee, "recommended_bytes": self.knee_bytes,
        }


@dataclass
class Report:
    """Everything `analyze` computed.  `to_markdown()`, `to_dict()`/`to_json()`, `save_plots(dir)`."""

    meta: dict
    layers: List[LayerStats]
    capacities: np.ndarray
    window: int
    knee_points: float
    policies: List[str]
    phases: List[str]
    overall: dict
    curves: Dict[str, Dict[str, np.ndarray]]
    warnings: List[str]

    @property
    def k(self) -> int:
        return self.meta["top_k"]

    @property
    def n_experts(self) -> int:
        return self.meta["n_experts"]

    @property
    def knee_rule(self) -> str:
        return (f"smallest capacity C >= k whose LRU hit rate is within {self.knee_points:g} "
                "percentage points of the hit rate with all E experts resident; on decode "
                "requests when the log has decode tokens, else on all requests")

    @classmethod
    def build(cls, meta, log, layers, caps, window, knee_points, policies, warnings_, n_ids, seed):
        from .analyze import knee_capacity  # one rule, one place

        phases = ["all"]
        if log.has_phase:
            for code, name in enumerate(("prefill", "decode")):
                if any(ls.hists[next(iter(ls.hists))][code].sum() for ls in layers if ls.hists):
                    phases.append(name)
        rows = {"all": None, "prefill": 0, "decode": 1}

        def curves_of(hists):
            out = {}
            for pol, h in hists.items():
                out[pol] = {ph: hit_curve(h.sum(0) if rows[ph] is None else h[rows[ph]], caps)
                            for ph in phases}
            return out

        def knee_of(curves):
            if "lru" not in curves:
                return None
            c = curves["lru"].get("decode")
            if c is None or np.isnan(c).all():
                c = curves["lru"]["all"]
            return knee_capacity(caps, c, knee_points)

        eb = meta.get("expert_bytes")
        for ls in layers:
            ls.curves = curves_of(ls.hists)
            ls.knee = knee_of(ls.curves)
            ls.knee_bytes = ls.knee * eb if (eb and ls.knee is not None) else None
        pooled = {p: sum(ls.hists[p] for ls in layers) for p in policies}
        curves = curves_of(pooled)
        k, E = log.k, meta["n_experts"]
        sel = sum(ls.selections for ls in layers)
        zsel = sum(ls.zero_selections for ls in layers)
        pairs = sum(ls.pairs for ls in layers) * k
        ws_all = np.concatenate([ls.working_sets for ls in layers]) if layers else np.zeros(0)
        ent = np.array([ls.entropy for ls in layers], float)
        overall = {
            "layers": len(layers), "rows": log.rows, "skipped_rows": log.skipped,
            "tokens": max((ls.tokens for ls in layers), default=0),
            "sequences": int(len(np.unique(np.concatenate([log.layers[l].sequence for l in log.layers])))),
            "selections": sel, "zero_selections": zsel,
            "zero_share": zsel / max(1, sel + zsel),
            "real_experts_per_token": sum(ls.real_per_token for ls in layers),
            "entropy_mean": float(np.nanmean(ent)) if len(ent) else None,
            "entropy_min": float(np.nanmin(ent)) if len(ent) else None,
            "entropy_max": float(np.nanmax(ent)) if len(ent) else None,
            "coverage_mean": {f: float(np.mean([ls.coverage[f] for ls in layers])) for f in
                              (layers[0].coverage if layers else {})},
            "overlap": sum(ls.overlap_hits for ls in layers) / pairs if pairs else float("nan"),
            "overlap_shuffled": sum(ls.overlap_hits_shuffled for ls in layers) / pairs if pairs else float("nan"),
            "overlap_random_null": k / n_ids,
            "reuse_random_null": random_reuse_null(k, n_ids, window),
            "working_set_mean": float(ws_all.mean()) if len(ws_all) else None,
            "working_set_random_null": random_working_set_null(k, n_ids, E, window),
            "recommended_capacity": knee_of(curves),
            "recommended_bytes_all_layers": (sum(ls.knee_bytes for ls in layers)
                                             if eb and all(ls.knee_bytes is not None for ls in layers)
                                             else None),
            "seed": seed,
        }
        return cls(meta, layers, caps, window, knee_points, list(policies), phases, overall, curves,
                   warnings_ + [f"skipped {log.skipped} malformed rows"] * bool(log.skipped)
                   + log.skipped_examples)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        ov = {key: (val.tolist() if isinstance(val, np.ndarray) else
                    {f"{int(round(100 * f))}%": _f(v, 3) for f, v in val.items()} if key == "coverage_mean"
                    else _f(val) if isinstance(val, float) else val)
              for key, val in self.overall.items()}
        return {
            "format": "mlx-moe-expert-analysis/1",
            "meta": self.meta, "window": self.window, "policies": self.policies,
            "phases": self.phases, "capacities": [int(c) for c in self.capacities],
            "knee_rule": self.knee_rule, "cache_semantics": SEMANTICS, "overlap_definition": OVERLAP_DEF,
            "overall": ov,
            "hit_rates": {p: {ph: [_f(v) for v in c] for ph, c in cs.items()} for p, cs in self.curves.items()},
            "layers": [ls.to_dict(self) for ls in self.layers],
            "warnings": self.warnings,
        }

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table_capacities(self) -> List[int]:
        """A few capacities for tables: k, 2k, 4k and 1/8, 1/4, 1/2, 3/4 and all of E."""
        k, E = self.k, self.n_experts
        cands = {k, 2 * k, 4 * k, E // 8, E // 4, E // 2, (3 * E) // 4, E}
        return sorted(c for c in cands if k <= c <= E)

    def hit_at(self, curves, policy, phase, cap) -> Optional[float]:
        c = curves.get(policy, {}).get(phase)
        return None if c is None else float(c[cap - self.k])

    def to_markdown(self) -> str:
        m, ov, k, E, w = self.meta, self.overall, self.k, self.n_experts, self.window
        out = ["# Expert routing analysis", ""]
        src = m.get("model") or "unknown model"
        out.append(f"Model: {src}" + (f" ({m['model_type']})" if m.get("model_type") else "") +
                   f"; E = {E} experts ({m.get('n_experts_source')}), top-k = {k}"
                   + (f", {m['n_zero_experts']} zero-computation experts" if m.get("n_zero_experts") else "")
                   + ".")
        out.append(f"Input: {ov['rows']:,} rows, {ov['layers']} MoE layers, up to {ov['tokens']:,} "
                   f"tokens per layer, {ov['sequences']} sequence(s); phases: "
                   f"{', '.join(p for p in self.phases if p != 'all') or 'not logged'}"
                   + (f"; {ov['skipped_rows']} malformed rows skipped" if ov["skipped_rows"] else "") + ".")
        out.append("")
        out += ["## Summary", "", "| metric | value | random-routing null |", "|---|---|---|"]
        out.append(f"| normalized entropy (mean, min-max over layers) | {ov['entropy_mean']:.3f} "
                   f"({ov['entropy_min']:.3f}-{ov['entropy_max']:.3f}) | 1 |")
        for f, v in ov["coverage_mean"].items():
            out.append(f"| experts covering {int(round(100 * f))}% of selections (mean per layer) | "
                       f"{v:.1f} of {E} | {math.ceil(f * E - 1e-9)} |")
        out.append(f"| consecutive-token overlap | {_pct(ov['overlap'])} (shuffled {_pct(ov['overlap_shuffled'])}) "
                   f"| {_pct(ov['overlap_random_null'])} |")
        if ov["working_set_mean"] is not None:
            out.append(f"| working set per {w} tokens (mean) | {ov['working_set_mean']:.1f} of {E} | "
                       f"{ov['working_set_random_null']:.1f} |")
        rc = ov["recommended_capacity"]
        if rc is not None:
            by = ov["recommended_bytes_all_layers"]
            out.append(f"| recommended cache (pooled LRU knee) | {rc} experts per layer ({rc / E:.0%} of E)"
                       + (f"; per-layer knees total {_mib(by)}" if by else "") + " | - |")
        if ov["zero_selections"]:
            out.append(f"| zero-computation share of slots | {_pct(ov['zero_share'])} | - |")
        out.append("")

        caps = self.table_capacities()
        out += ["## Cache hit rate, all layers pooled", ""]
        head = "| capacity | % of E | random C/E |"
        cols = [(p, ph) for ph in self.phases for p in self.policies]
        head += "".join(f" {p.upper()} {ph} |" for p, ph in cols)
        out += [head, "|" + "---|" * (3 + len(cols))]
        for c in caps:
            out.append(f"| {c} | {c / E:.0%} | {_pct(c / E)} |" +
                       "".join(f" {_pct(self.hit_at(self.curves, p, ph, c))} |" for p, ph in cols))
        out.append("")

        out += ["## Per layer", ""]
        show = [p for p in ("lru", "belady") if p in self.policies]
        cap2 = min(2 * k, E)
        hp = "decode" if "decode" in self.phases else "all"
        out.append("| layer | tokens | entropy | cover 50/90/99% | top experts (share) | overlap | shuffled "
                   f"| reuse@{w} | WS@{w} |" + "".join(f" {p.upper()}@{cap2} {hp} |" for p in show)
                   + " knee | knee bytes |")
        out.append("|" + "---|" * (11 + len(show)))
        for ls in self.layers:
            cov = "/".join(str(v) for v in ls.coverage.values())
            top = ", ".join(f"{e} ({s:.0%})" for e, s in ls.top[:3])
            wsm = f"{ls.working_sets.mean():.1f}" if len(ls.working_sets) else "-"
            out.append(f"| {ls.layer} | {ls.tokens} | {ls.entropy:.3f} | {cov} | {top} | {_pct(ls.overlap)} | "
                       f"{_pct(ls.overlap_shuffled)} | {_pct(ls.reuse)} | {wsm} |"
                       + "".join(f" {_pct(self.hit_at(ls.curves, p, hp, cap2))} |" for p in show)
                       + f" {ls.knee if ls.knee is not None else '-'} | {_mib(ls.knee_bytes)} |")
        out.append("")

        if ov["zero_selections"]:
            rpt = ov["real_experts_per_token"]
            out += ["## Zero-computation experts", "",
                    f"{_pct(ov['zero_share'])} of all selected slots are zero-computation (identity) experts. "
                    "Tokens (summed over layers) by number of real experts:", "",
                    "| real experts | " + " | ".join(str(i) for i in range(len(rpt))) + " |",
                    "|---|" + "---|" * len(rpt),
                    "| tokens | " + " | ".join(str(int(v)) for v in rpt) + " |", ""]

        eb = m.get("expert_bytes")
        out += ["## Definitions", "",
                f"- {SEMANTICS}", f"- {OVERLAP_DEF}",
                f"- Working set: distinct real experts in each complete window of {w} consecutive tokens.",
                "- Coverage: fewest experts whose selections add up to the given share of the layer's selections.",
                f"- Recommended cache size (knee): the {self.knee_rule}."
                + (f" Bytes: capacity x {eb:,} bytes per expert ({m.get('expert_bytes_source')})." if eb
                   else " Pass --expert-bytes or --model to see bytes."), ""]
        if self.warnings:
            out += ["## Warnings", ""] + [f"- {x}" for x in self.warnings] + [""]
        return "\n".join(out)

    def save_plots(self, out_dir: str) -> List[str]:
        """Write the PNG plots into out_dir; returns their paths."""
        from .plots import save_plots

        return save_plots(self, out_dir)
