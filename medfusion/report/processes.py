"""Worker processes of the benchmark: one ``forkserver`` that has the heavy imports done.

Metric workers and the fresh per-method speed processes are forked from a server process that
imported torch, the engine and the metrics once, so each starts in well under a second instead
of re-importing torch, and none inherits the benchmark's threads or allocated memory.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

PRELOAD = ["torch", "medfusion.engine", "medfusion.metrics", "medfusion.report.fusion"]


def worker_context() -> BaseContext:
    """The multiprocessing context for benchmark workers (forkserver where available)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context
