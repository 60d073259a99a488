"""Benchmark of the classical fusion methods alone: milliseconds per fused pair (not a test).

Times ``method(batch)`` on random (B, 2, S, S) float32 batches, median of repeated calls after
one warm-up, on CPU (and CUDA when present, synchronised). Reading and writing are excluded;
``bench_engine.py`` times the whole engine.

    python Testing/benchmarks/bench_classical.py                       # 256 and 512, batch 1
    python Testing/benchmarks/bench_classical.py --methods gff --sizes 256 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medfusion.methods import CLASSICAL_METHODS, get_method


def time_method(name: str, device: str, size: int, batch: int, repeats: int) -> float:
    """Median milliseconds per pair for ``name`` on ``device``."""
    method = get_method(name, device=device)
    images = torch.rand(batch, 2, size, size, device=device)
    method(images)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        method(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0 / batch)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(CLASSICAL_METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}")
    print(f"{'method':<10} {'device':<6} {'size':>5} {'ms/pair':>9}")
    for name in args.methods:
        for device in devices:
            for size in args.sizes:
                ms = time_method(name, device, size, args.batch, args.repeats)
                print(f"{name:<10} {device:<6} {size:>5} {ms:>9.2f}")


if __name__ == "__main__":
    main()
