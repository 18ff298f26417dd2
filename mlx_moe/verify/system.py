"""What machine a verification report comes from: chip, OS, versions, and the
chip's published memory bandwidth (the yardstick for the benchmarks' GB/s)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx

# Unified-memory bandwidth in GB/s, from Apple's product pages and press releases
# (apple.com/newsroom chip announcements; Mac tech-specs pages).  M3 Max and M4
# Max come in two memory configurations, told apart by their performance-core
# count (10 on the binned chip, 12 on the full one).  The base M1's figure is
# not published by Apple: 68.25 GB/s is LPDDR4X-4266 on a 128-bit bus (approximate).
BANDWIDTH_GB_S = {
    "M1": 68.25, "M1 Pro": 200.0, "M1 Max": 400.0, "M1 Ultra": 800.0,
    "M2": 100.0, "M2 Pro": 200.0, "M2 Max": 400.0, "M2 Ultra": 800.0,
    "M3": 100.0, "M3 Pro": 150.0, "M3 Max": {10: 300.0, 12: 400.0}, "M3 Ultra": 819.0,
    "M4": 120.0, "M4 Pro": 273.0, "M4 Max": {10: 410.0, 12: 546.0},
    "M5": 153.0,
}
APPROXIMATE = {"M1": "approximate: LPDDR4X-4266 on a 128-bit bus (Apple publishes no figure for the M1)"}
SOURCE = "Apple's published unified-memory bandwidth (apple.com newsroom / Mac tech specs)"


def _run(*cmd: str) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def chip_name() -> str:
    """'Apple M3 Max' on a Mac (sysctl), else the CPU model."""
    if sys.platform == "darwin":
        name = _run("sysctl", "-n", "machdep.cpu.brand_string")
        if name:
            return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def published_bandwidth(chip: str, perf_cores: Optional[int] = None) -> Tuple[Optional[float], str]:
    """(GB/s or None, note) for an Apple chip name such as 'Apple M4 Max'."""
    m = re.search(r"\bM(\d+)(?: (Pro|Max|Ultra))?\b", chip or "")
    if not m or "Apple" not in chip:
        return None, f"no published figure for {chip!r} (not a known Apple Silicon chip)"
    key = f"M{m.group(1)}" + (f" {m.group(2)}" if m.group(2) else "")
    bw = BANDWIDTH_GB_S.get(key)
    if bw is None:
        return None, f"no published figure for {key} in mlx_moe/verify/system.py; add it"
    note = APPROXIMATE.get(key, SOURCE)
    if isinstance(bw, dict):
        if perf_cores not in bw:
            lo, hi = min(bw.values()), max(bw.values())
            return hi, (f"{key} is {lo:g} or {hi:g} GB/s by configuration; performance cores unknown "
                        f"({perf_cores}), assuming {hi:g}")
        bw = bw[perf_cores]
        note += f"; {key} with {perf_cores} performance cores"
    return float(bw), note


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    commit = _run("git", "-C", str(root), "rev-parse", "--short=12", "HEAD")
    dirty = _run("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def device_info() -> dict:
    try:
        info = mx.device_info()
    except Exception:
        try:
            info = mx.metal.device_info()
        except Exception:
            info = {}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dict(info).items()}


def system_info() -> dict:
    """Everything the report's header needs; only cheap commands."""
    chip = chip_name()
    perf = _run("sysctl", "-n", "hw.perflevel0.physicalcpu") if sys.platform == "darwin" else None
    perf_cores = int(perf) if perf and perf.isdigit() else None
    bw, note = published_bandwidth(chip, perf_cores)
    return {
        "chip": chip,
        "macos": (platform.mac_ver()[0] or _run("sw_vers", "-productVersion")) if sys.platform == "darwin" else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", None) or _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "mlx_moe": _version("mlx-moe"),
        "git_commit": _git_commit(),
        "metal_available": bool(mx.metal.is_available()),
        "performance_cores": perf_cores,
        "device_info": device_info(),
        "published_bandwidth_GB_s": bw,
        "bandwidth_source": note,
    }
