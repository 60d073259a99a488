"""Seconds per image and peak memory of each method, each measured in a fresh process.

A fresh process per method and device (forked from a server that only imported the libraries,
see :mod:`processes`) gives every method the same clean start: its
libraries are imported and its images read first, then the peak memory is measured around
building the method, one warm-up fusion and the timed fusions. Measuring in the benchmark's own
process would hide most of the memory behind what earlier stages left allocated.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from medfusion.report.dataset import Group
from medfusion.report.fusion import MethodSpec
from medfusion.report.processes import worker_context


def measure_method(groups: Sequence[Group], spec: MethodSpec, device: str) -> dict:
    """Fuse each group once after a warm-up; return seconds per image and peak memory (MiB).

    Meant to run in a fresh process (see :func:`speed_table`), but correct anywhere.
    """
    import torch

    from medfusion.report.fusion import build_method, fuse, load_group
    from medfusion.report.measure import PeakMemory

    torch.ones(8).add_(1)  # load torch's CPU runtime before the baseline is taken
    if spec.name == "cnn":
        try:
            importlib.import_module("medfusion.methods.cnn")
        except ImportError:
            pass  # build_method below raises the user-facing ModelError
    items = [load_group(g) for g in groups]
    seconds = []
    with PeakMemory(device) as peak:
        build_method(spec, device)
        fuse(items[0], spec, device)
        for item in items:
            start = time.perf_counter()
            fuse(item, spec, device)
            seconds.append(time.perf_counter() - start)
    return {
        "method": spec.label,
        "device": device,
        "s_per_image": float(np.median(seconds)),
        "peak_memory_mib": peak.mib,
        "process_peak_mib": peak.total_mib,
        "images": len(items),
    }


def speed_table(
    groups: Sequence[Group],
    specs: Sequence[MethodSpec],
    devices: Sequence[str],
    progress: bool = False,
) -> list[dict]:
    """One row per (method, device), each measured in its own fresh process."""
    from tqdm import tqdm

    context = worker_context()
    rows = []
    jobs = [(spec, device) for device in devices for spec in specs]
    for spec, device in tqdm(jobs, desc="speed", unit="method", disable=not progress):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            rows.append(pool.submit(measure_method, list(groups), spec, device).result())
    return rows
