"""PNG plots of a `Report` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import List

import numpy as np

import matplotlib

matplotlib.use("Agg", force=False)  # callers that already chose a backend keep it
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_STYLE = {"lru": "C0", "lfu": "C1", "belady": "C2"}


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frequency_heatmap(report, path: str) -> str:
    """Layer x expert share of each layer's selections."""
    E = report.n_experts
    mat = np.array([ls.counts / max(1, ls.counts.sum()) for ls in report.layers]).reshape(-1, E)
    fig, ax = plt.subplots(figsize=(min(16, 4 + E / 16), min(12, 2 + 0.25 * len(report.layers))))
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert id")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(report.layers)))
    ax.set_yticklabels([str(ls.layer) for ls in report.layers], fontsize=7)
    ax.set_title(f"Share of each layer's selections (uniform = {1 / E:.3g})")
    fig.colorbar(im, ax=ax, label="share")
    return _save(fig, path)


def hit_rate_curves(report, path: str) -> str:
    """Pooled hit rate against capacity for each policy, one panel per phase."""
    caps, E = report.capacities, report.n_experts
    phases = report.phases
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 4), squeeze=False)
    for ax, ph in zip(axes[0], phases):
        for pol in report.policies:
            ax.plot(caps, report.curves[pol][ph], label=pol.upper(), color=_STYLE[pol])
        ax.plot(caps, caps / E, "k:", label="random C/E")
        rc = report.overall.get("recommended_capacity")
        if rc is not None:
            ax.axvline(rc, color="grey", lw=0.8, ls="--", label=f"knee {rc}")
        ax.set_xlabel("cache capacity (experts per layer)")
        ax.set_ylabel("hit rate")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{ph} requests, all layers")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def overlap_plot(report, path: str) -> str:
    """Per layer: consecutive overlap and reuse@w against the shuffled and random nulls."""
    x = np.array([ls.layer for ls in report.layers])
    ov = report.overall
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    series = [("overlap", "overlap_shuffled", ov["overlap_random_null"], "consecutive-token overlap"),
              ("reuse", "reuse_shuffled", ov["reuse_random_null"], f"reuse within {report.window} tokens")]
    for ax, (obs, shuf, null, title) in zip(axes, series):
        ax.plot(x, [getattr(ls, obs) for ls in report.layers], "o-", label="observed")
        ax.plot(x, [getattr(ls, shuf) for ls in report.layers], "s--", label="shuffled-token null")
        ax.axhline(null, color="k", ls=":", label="random-routing null")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("share of k experts")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def working_set_plot(report, path: str) -> str:
    """Distinct experts per window of w tokens over time: mean over layers, min-max band."""
    fig, ax = plt.subplots(figsize=(10, 4))
    series = [ls.working_sets for ls in report.layers if len(ls.working_sets)]
    if series:
        n = min(len(s) for s in series)
        mat = np.array([s[:n] for s in series], float)
        t = np.arange(n) * report.window
        ax.fill_between(t, mat.min(0), mat.max(0), alpha=0.25, label="min-max over layers")
        ax.plot(t, mat.mean(0), label="mean over layers")
    ax.axhline(report.overall["working_set_random_null"], color="k", ls=":", label="random-routing null")
    ax.axhline(report.n_experts, color="grey", lw=0.8, label=f"E = {report.n_experts}")
    ax.set_xlabel(f"token (start of each {report.window}-token window, sequences concatenated)")
    ax.set_ylabel("distinct experts")
    ax.set_title(f"Working set per {report.window} tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_plots(report, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    return [
        frequency_heatmap(report, os.path.join(out_dir, "expert_frequency.png")),
        hit_rate_curves(report, os.path.join(out_dir, "cache_hit_rates.png")),
        overlap_plot(report, os.path.join(out_dir, "overlap.png")),
        working_set_plot(report, os.path.join(out_dir, "working_set.png")),
    ]
