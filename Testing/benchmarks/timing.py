"""Timing shared by the benchmarks: the least disturbed of repeated calls, and the FLOPs a
network's call counts.

The CPU may be shared, so a benchmark reports the minimum over ``repeat`` calls after one
warm-up, as wall clock and as this process's CPU time (``time.process_time``: what other
processes take from a shared core does not count there).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


def cpu_kernels_of(module: torch.nn.Module):  # noqa: ANN201 (a module or None)
    """The compiled CPU loops of ``module``'s network (``scripts.cpu_kernels``), or None: read
    through the class's own module namespace, which stays the network's after another bundle
    took the name ``scripts`` in ``sys.modules``."""
    forward = getattr(type(module), "forward", None)
    loader = getattr(forward, "__globals__", {}).get("_cpu_kernels")
    return loader() if callable(loader) else None


def network_flops(module: torch.nn.Module, batch: torch.Tensor) -> int:
    """The network's FLOPs on ``batch``: its convolutions and matrix products as torch runs them
    on the compiled path with torch's layers (the counter does not see oneDNN's fused calls;
    the stacked head's extra products, 1.5x the 1x1 layer's and 2x the last layer's at two
    sources, are the implementation's, not the network's, and are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    kernels = cpu_kernels_of(module)
    layers = kernels.torch_layers() if kernels is not None else contextlib.nullcontext()
    with layers, torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(batch)
    return int(counter.get_total_flops())
