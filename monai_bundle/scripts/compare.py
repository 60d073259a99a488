"""Validation table: the CNN beside the classical baselines, per pair type, on 0-255 luminance.

Runs every method of ``medfusion.methods`` (the CNN through its bundle loader) on each group of a
split and averages ``medfusion.metrics`` per pair type. Usage (from the repository root)::

    python monai_bundle/scripts/compare.py --split validation --out eval/compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parent.parent
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.datalist import build_groups, subsample  # noqa: E402
from scripts.transforms import LoadFusionGroupd  # noqa: E402

METRICS = ("qabf", "vif", "entropy", "standard_deviation", "spatial_frequency",
           "mutual_information", "scd", "ssim")
SHORT = {"qabf": "QAB/F", "vif": "VIF", "entropy": "EN", "standard_deviation": "SD",
         "spatial_frequency": "SF", "mutual_information": "MI", "scd": "SCD", "ssim": "SSIM"}
SOURCE_FREE = {"entropy", "standard_deviation", "spatial_frequency"}


def _metric_functions() -> dict:
    import medfusion.metrics as fm

    return {name: getattr(fm, name) for name in METRICS}


def score(fused: np.ndarray, sources: np.ndarray, fns: dict) -> dict[str, float]:
    """All table metrics of one fused image (0-255) against its sources (K, H, W, 0-255)."""
    out = {}
    for name, fn in fns.items():
        if name in SOURCE_FREE:
            out[name] = float(fn(fused, data_range=255.0))
        else:
            out[name] = float(fn(fused, *sources, data_range=255.0))
    return out


def evaluate(methods: dict, groups: list[dict]) -> dict:
    """``{pair: {method: {metric: mean}}}`` plus ``seconds`` per method (fusion time only)."""
    fns = _metric_functions()
    load = LoadFusionGroupd()
    sums: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    seconds: dict = defaultdict(float)
    for group in groups:
        image = load(group)["image"][None].float()
        sources = image[0].numpy() * 255.0
        for name, method in methods.items():
            start = time.perf_counter()
            with torch.no_grad():
                fused = method(image)[0].numpy() * 255.0
            seconds[name] += time.perf_counter() - start
            for metric, value in score(fused, sources, fns).items():
                sums[group["pair"]][name][metric].append(value)
                sums["all"][name][metric].append(value)
    table = {
        pair: {m: {k: float(np.nanmean(v)) for k, v in per.items()} for m, per in by_method.items()}
        for pair, by_method in sums.items()
    }
    table["seconds_per_image"] = {m: s / max(len(groups), 1) for m, s in seconds.items()}
    return table


def markdown(table: dict) -> str:
    """Model-card table: one block per pair type, methods as rows, metrics as columns."""
    lines = []
    for pair in sorted(k for k in table if k != "seconds_per_image"):
        lines.append(f"\n**{pair}**\n")
        lines.append("| method | " + " | ".join(SHORT[m] for m in METRICS) + " |")
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for method, values in table[pair].items():
            cells = " | ".join(f"{values[m]:.4f}" for m in METRICS)
            lines.append(f"| {method} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from medfusion.methods import get_method

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.environ.get("MEDFUSION_DATA", str(BUNDLE.parent.parent / "shared" / "data"))
    parser.add_argument("--dataset_dir", default=os.path.join(data, "aanlib"))
    parser.add_argument("--split", default="validation", choices=["train", "validation"])
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--methods", default="max,average,laplacian,cnn")
    parser.add_argument("--bundle_dir", default=None)
    parser.add_argument("--block_exponent", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    methods = {}
    for name in args.methods.split(","):
        opts = {}
        if name == "cnn":
            opts = {"bundle_dir": args.bundle_dir, "block_exponent": args.block_exponent}
        methods[name] = get_method(name, device="cpu", **opts)
    groups = subsample(build_groups(args.dataset_dir, args.split), args.limit)
    table = evaluate(methods, groups)
    text = json.dumps(table, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    print(markdown(table))


if __name__ == "__main__":
    main()
