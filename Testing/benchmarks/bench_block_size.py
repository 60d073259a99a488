"""Speed and precision of the CNN versus the paper's block size exponent ``i`` (2^i x 2^i blocks).

For each ``i``: the network's FLOPs on one 512x512 pair (``timing.network_flops``: the
convolutions and matrix products), the median seconds per 512^2 slice of the default ``cnn`` path
(``get_method("cnn", block_exponent=i)``, batch of one, runs interleaved so a busy machine
slows all alike), the FLOP/s this reaches, and the ratio to this CPU's FLOP limit, measured
here as the throughput of a 64->64 3x3 convolution (the best case for the CPU's kernels).
With ``--limit N`` it also scores N validation pairs (256^2): QAB/F, VIF and the weaker
source's share min_S Q^{S/F}. Prints a Markdown table.

    python Testing/benchmarks/bench_block_size.py --threads 2 --repeats 15 --limit 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "monai_bundle"))

from scripts.datalist import build_groups, subsample  # noqa: E402
from scripts.transforms import LoadFusionGroupd  # noqa: E402

import medfusion.metrics as fm  # noqa: E402
from medfusion.methods import get_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import network_flops  # noqa: E402


def flop_limit(repeats: int = 5) -> float:
    """FLOP/s of a 64->64 3x3 convolution on a 2 x 64 x 128 x 128 input (best of ``repeats``)."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.rand(2, 64, 128, 128)
    flops = 2 * 64 * 64 * 9 * 2 * 128 * 128
    with torch.inference_mode():
        conv(x)
        best = min(_timed(lambda: conv(x)) for _ in range(repeats))
    return flops / best


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.environ.get("MEDFUSION_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset_dir", default=os.path.join(data, "aanlib"))
    parser.add_argument("--exponents", default="0,1,2,3,4,5,6")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per i")
    parser.add_argument("--limit", type=int, default=-1,
                        help="validation pairs to score (0: all, -1: none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medfusion.allocator import keep_freed_memory

    keep_freed_memory()  # as the command line does (freed temporaries reused, no page faults)
    exponents = [int(e) for e in args.exponents.split(",")]
    groups = build_groups(args.dataset_dir, "validation")
    load = LoadFusionGroupd()
    pair = load(groups[0])["image"][None]
    slice_512 = torch.nn.functional.interpolate(pair, size=(512, 512), mode="bilinear")
    methods = {i: get_method("cnn", block_exponent=i) for i in exponents}
    flops, backends = {}, {}
    for i, method in methods.items():
        # the backend first (ONNX export, checks, timing): under the FLOP counter the export
        # would fail and its probe runs would be counted
        backends[i] = method.network.prepare(slice_512)  # for calls like the timed ones
        flops[i] = network_flops(method.module, slice_512)
    times: dict[int, list[float]] = {i: [] for i in exponents}
    for _ in range(args.repeats):  # interleaved
        for i, method in methods.items():
            times[i].append(_timed(lambda m=method: m(slice_512)))
    limit = flop_limit()
    scored = [] if args.limit < 0 else subsample(groups, args.limit)
    batches = [load(g)["image"][None] for g in scored]
    print(f"512x512 pair, {args.threads} threads; FLOP limit (64->64 3x3 conv): "
          f"{limit / 1e9:.1f} GFLOP/s; {len(batches)} validation pairs scored\n")
    print("| i | block | backend | GFLOP / 512^2 | s / 512^2 (median) | GFLOP/s |"
          " x FLOP-limit time | QAB/F | VIF | min_S Q^S/F |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in exponents:
        seconds = statistics.median(times[i])
        quality = ["", "", ""]
        if batches:
            q, v, w = [], [], []
            for batch in batches:
                f = methods[i](batch)[0].numpy() * 255.0
                s = batch[0].numpy() * 255.0
                q.append(fm.qabf(f, *s))
                v.append(fm.vif(f, *s))
                w.append(fm.weaker_source_share(f, *s))
            quality = [f"{np.mean(q):.4f}", f"{np.mean(v):.4f}", f"{np.mean(w):.4f}"]
        ratio = seconds / max(flops[i] / limit, 1e-12)
        print(f"| {i} | {2**i}x{2**i} | {backends[i]} | {flops[i] / 1e9:.3f} | {seconds:.4f} | "
              f"{flops[i] / seconds / 1e9:.1f} | {ratio:.1f} | " + " | ".join(quality) + " |")


if __name__ == "__main__":
    main()
