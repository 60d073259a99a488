"""Precision / speed of the CNN versus the paper's block size ``i`` (sliding-window roi, overlap).

For each block size and overlap: mean seconds per 256x256 slice (batch of one, CPU unless
``--device``), mean QAB/F and VIF (``medfusion.metrics`` on 0-255 luminance) over validation
pairs, and the mean absolute difference to whole-slice inference (0-255). Prints a Markdown table.

    python Testing/benchmarks/bench_block_size.py --limit 30
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.environ.get("MEDFUSION_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset_dir", default=os.path.join(data, "aanlib"))
    parser.add_argument("--limit", type=int, default=30, help="validation pairs (0: all)")
    parser.add_argument("--blocks", default="32,64,128,256")
    parser.add_argument("--overlaps", default="0,0.25,0.5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    groups = subsample(build_groups(args.dataset_dir, "validation"), args.limit)
    load = LoadFusionGroupd()
    batches = [load(g)["image"][None] for g in groups]
    reference = get_method("cnn", device=args.device, block_size=256, overlap=0.0)
    whole = [reference(b.to(args.device)).cpu() for b in batches]
    print(f"{len(batches)} validation pairs, device {args.device}, {args.threads} threads\n")
    print("| block i | overlap | s / slice | QAB/F | VIF | mean abs diff to whole slice |")
    print("|---|---|---|---|---|---|")
    for block in (int(b) for b in args.blocks.split(",")):
        overlaps = [0.0] if block >= 256 else [float(o) for o in args.overlaps.split(",")]
        for overlap in overlaps:
            method = get_method("cnn", device=args.device, block_size=block, overlap=overlap)
            method(batches[0].to(args.device))  # warm-up
            seconds, q, v, diff = 0.0, [], [], []
            for batch, ref in zip(batches, whole, strict=True):
                start = time.perf_counter()
                fused = method(batch.to(args.device)).cpu()
                seconds += time.perf_counter() - start
                f, s = fused[0].numpy() * 255.0, batch[0].numpy() * 255.0
                q.append(fm.qabf(f, *s, data_range=255.0))
                v.append(fm.vif(f, *s, data_range=255.0))
                diff.append(float((fused - ref).abs().mean()) * 255.0)
            print(f"| {block} | {overlap:.2f} | {seconds / len(batches):.4f} | "
                  f"{np.mean(q):.4f} | {np.mean(v):.4f} | {np.mean(diff):.3f} |")


if __name__ == "__main__":
    main()
