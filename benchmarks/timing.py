"""Shared by the model benchmarks: summaries of timed runs and the machine's load (recorded with every result,
because this 2-core machine is often shared)."""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np


def summary_s(xs: list[float]) -> dict[str, Any]:
    """Median, p99, min and the runs, in seconds."""
    return {"median_s": statistics.median(xs), "p99_s": float(np.percentile(xs, 99)), "min_s": min(xs),
            "runs_s": [round(x, 4) for x in xs]}


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, or ``None`` where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
