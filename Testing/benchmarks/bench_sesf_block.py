"""Precision and speed of ``sesf`` versus its block exponent ``i`` (decisions on 2^i x 2^i blocks).

For each ``i``: on ``--limit`` validation pairs of the atlas (spread over the pair types, the
sesf bundle's ``build_groups`` + ``subsample``), the 8-bit fused image's QAB/F and the weaker
source's share min_S Q^{S/F} (the scored image of ``medfusion fuse --metrics``), and the median
seconds of the method call per 256^2 pair (runs interleaved over ``i``, so a busy machine slows
all alike). Prints a Markdown table; this chose the bundle's default ``block_exponent``.

    python Testing/benchmarks/bench_sesf_block.py --limit 12 --exponents 0,1,2,3,4
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
sys.path.insert(0, str(REPO / "sesf_bundle"))

from scripts.datalist import build_groups, subsample  # noqa: E402

from medfusion.engine import fuse_images, luminance_for_scoring  # noqa: E402
from medfusion.methods import get_method  # noqa: E402
from medfusion.metrics import compute_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=12, help="validation pairs scored")
    parser.add_argument("--exponents", default="0,1,2,3,4", help="block exponents i")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dataset_dir", help="atlas folder (default: $MEDFUSION_DATA/aanlib)")
    args = parser.parse_args()
    data = Path(os.environ.get("MEDFUSION_DATA", REPO.parent / "shared" / "data"))
    args.dataset_dir = args.dataset_dir or str(data / "aanlib")
    torch.set_num_threads(args.threads)
    exponents = [int(e) for e in args.exponents.split(",")]
    methods = {i: get_method("sesf", block_exponent=i) for i in exponents}
    groups = subsample(build_groups(args.dataset_dir, "validation"), args.limit)
    scores: dict[int, list[dict]] = {i: [] for i in exponents}
    seconds: dict[int, list[float]] = {i: [] for i in exponents}
    for group in groups:
        for i in exponents:
            start = time.perf_counter()
            result = fuse_images(group["sources"], method=methods[i], device="cpu")
            seconds[i].append(time.perf_counter() - start)
            fused = luminance_for_scoring(result.to_uint8())
            sources = [np.asarray(s, dtype=np.float64) for s in result.sources]
            scores[i].append(compute_metrics(fused, sources, names=["QABF", "QSF_MIN"],
                                             data_range=1.0))
    pair_types = sorted({g["name"].split("/")[0] for g in groups})
    print(f"{len(groups)} validation pairs ({', '.join(pair_types)}), {args.threads} threads\n")
    print("| i | block | QAB/F | min_S Q^{S/F} | s per pair |")
    print("|---|---|---|---|---|")
    for i in exponents:
        qabf = statistics.mean(s["QABF"] for s in scores[i])
        share = statistics.mean(s["QSF_MIN"] for s in scores[i])
        print(f"| {i} | {2**i}x{2**i} | {qabf:.3f} | {share:.3f} | "
              f"{statistics.median(seconds[i]):.3f} |")
    for kind in pair_types:
        row = [f"{kind}:"]
        for i in exponents:
            picked = [s for s, g in zip(scores[i], groups, strict=True)
                      if g["name"].startswith(kind)]
            row.append(f"i={i} {statistics.mean(s['QABF'] for s in picked):.3f}/"
                       f"{statistics.mean(s['QSF_MIN'] for s in picked):.3f}")
        print("  ".join(row))


if __name__ == "__main__":
    main()
