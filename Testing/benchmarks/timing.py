"""Timing shared by the benchmarks: the least disturbed of repeated calls.

The CPU may be shared, so a benchmark reports the minimum over ``repeat`` calls after one
warm-up, as wall clock and as this process's CPU time (``time.process_time``: what other
processes take from a shared core does not count there).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(func: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Minimum wall and minimum CPU seconds of ``repeat`` calls of ``func`` (after a warm-up)."""
    func()
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        func()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)
