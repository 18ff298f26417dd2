"""Expert-log analysis: routing statistics and expert-cache replay from `--expert-log` CSVs.

    from mlx_moe.analysis import analyze
    report = analyze(["run.csv"], window=16)
    print(report.to_markdown()); report.save_plots("out/")

See `cache` for the replay semantics, `stats` for the definitions and `reader` for the format
and the memory bound.
"""

from .analyze import analyze, knee_capacity
from .cache import POLICIES
from .reader import LogFormatError, read_logs
from .report import Report

__all__ = ["analyze", "knee_capacity", "POLICIES", "LogFormatError", "read_logs", "Report"]
