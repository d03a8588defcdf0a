"""Helpers shared by the benchmark scripts: medians and the machine's description."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def swiglu_width(hidden: int) -> int:
    """A SwiGLU width with the FLOPs of GPT-2's 4x GELU MLP: three matrices of 8/3 the width,
    rounded to 64."""
    return round(8 * hidden / 3 / 64) * 64
