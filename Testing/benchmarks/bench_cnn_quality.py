"""Fusion quality of the bundle's CNN per pair type against the classical bars (not a test).

Scores every validation pair (or ``--limit`` per pair type) at block exponent ``i``: the fused
slice is rounded to 8 bits (``rint``) like the sources, then QAB/F, VIF and the weaker source's
share QSF_MIN (``medfusion.metrics``, ``data_range=255``) are averaged per pair type and printed
next to the best classical method on each (issue 11's bars: the CNN should beat them all).

    python Testing/benchmarks/bench_cnn_quality.py [--weights W.pt [W2.pt ...]]
        [--block-exponent 3] [--limit N] [--ranks docs/report/metrics.csv]

``--ranks CSV`` also gives the weights' mean rank per pair type over the report's 8 ranking
metrics against the other methods' rows of a report's ``metrics.csv`` (the same groups, the
report's ``mean_ranks``), so a checkpoint can be ranked without re-running the whole report.

Each weights file (a bare state dict or MONAI's ``{"model": ...}``) runs from a temporary copy
of ``monai_bundle/`` whose ``models/model.pt`` is replaced (its ``model.ts`` removed, so only
those weights can be used); without ``--weights`` the shipped bundle is scored.
``--method max --method gff`` scores classical methods the same way: here they come out within
2e-3 of the bars (e.g. max PET-MRI QSF_MIN 0.4754, SPECT-MRI 0.4321; gff SPECT-MRI QABF 0.7825).

Last run (session 19, the shipped weights 0.2.0, ``--threads 1``): CT-MRI 0.5987 / 0.7838 /
0.4328 (3 of 3 bars), PET-MRI 0.7936 / 1.0698 / 0.7456 (2 of 3: Q^{AB/F}), SPECT-MRI 0.7758 /
1.0063 / 0.3100 (1 of 3: VIF); the report's numbers differ by <= 1e-3 (the ``auto`` backend may
pick ONNX Runtime or torch, whose outputs differ by ~1e-5 before the rounding to 8 bits).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "monai_bundle"))

from bundle_weights import bundle_with_weights  # noqa: E402
from scripts.datalist import build_groups  # noqa: E402
from scripts.transforms import LoadFusionGroupd  # noqa: E402

from medfusion.methods import get_method  # noqa: E402
from medfusion.metrics import compute_metrics  # noqa: E402
from medfusion.report.runner import PREFERRED_RANK_METRICS, mean_ranks  # noqa: E402

METRICS = ("QABF", "VIF", "QSF_MIN")
# best classical method per pair type and metric at i = 3 on all 189 validation pairs (issue 11)
BARS = {
    "CT-MRI": {"QABF": ("gff", 0.5875), "VIF": ("max", 0.6403), "QSF_MIN": ("laplacian", 0.4268)},
    "PET-MRI": {"QABF": ("gff", 0.7986), "VIF": ("max", 0.8730), "QSF_MIN": ("max", 0.4742)},
    "SPECT-MRI": {"QABF": ("gff", 0.7820), "VIF": ("gff", 0.9819), "QSF_MIN": ("max", 0.4304)},
}


def load_pairs(dataset_dir: str, limit: int) -> list[tuple[str, str, torch.Tensor]]:
    """``(pair type, group name, (K, H, W) luminance in [0, 1])`` of the validation groups."""
    load, seen, pairs = LoadFusionGroupd(), defaultdict(int), []
    for group in build_groups(dataset_dir, "validation"):
        if limit and seen[group["pair"]] >= limit:
            continue
        seen[group["pair"]] += 1
        name = str(Path(group["name"]).with_suffix(""))  # the report's group name
        pairs.append((group["pair"], name, torch.as_tensor(load(group)["image"]).float()))
    return pairs


def to8(image: torch.Tensor) -> np.ndarray:
    return np.rint(image.clamp(0.0, 1.0).cpu().numpy() * 255.0).astype(np.uint8)


def score(method, pairs: list[tuple[str, str, torch.Tensor]], rank_rows: list[dict] | None = None
          ) -> dict[str, np.ndarray]:
    """Mean ``[QABF, VIF, QSF_MIN]`` per pair type; with ``rank_rows`` (a report's metrics.csv
    rows) the method's rank-metric rows are appended to it as method ``cnn``."""
    rows: dict[str, list[list[float]]] = defaultdict(list)
    names = list(dict.fromkeys([*METRICS, *(PREFERRED_RANK_METRICS if rank_rows is not None
                                             else ())]))
    for pair, name, image in pairs:
        fused = to8(method(image[None])[0])
        values = compute_metrics(fused, [to8(s) for s in image], names=names, data_range=255)
        rows[pair].append([values[metric] for metric in METRICS])
        if rank_rows is not None:
            rank_rows.append({"pair_type": pair, "group": name, "method": "cnn", **values})
    return {pair: np.nanmean(values, axis=0) for pair, values in rows.items()}


def read_report_rows(path: str) -> list[dict]:
    """The rows of a report's metrics.csv except the ``cnn`` ones, rank metrics as floats."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["method"] != "cnn"]
    for row in rows:
        for metric in PREFERRED_RANK_METRICS:
            row[metric] = float(row[metric])
    return rows


def print_ranks(rows: list[dict]) -> None:
    """Mean rank per pair type of every method in ``rows`` (the report's rule)."""
    for pair in sorted({row["pair_type"] for row in rows}):
        subset = [row for row in rows if row["pair_type"] == pair]
        methods = sorted({row["method"] for row in subset})
        ranks = mean_ranks(subset, methods, PREFERRED_RANK_METRICS, {})
        ordered = sorted(ranks.items(), key=lambda item: item[1])
        print(f"mean rank {pair}: " + ", ".join(f"{m} {r:.2f}" for m, r in ordered))


def report(name: str, means: dict[str, np.ndarray], counts: dict[str, int]) -> None:
    print(f"\nweights: {name}")
    print("| pair type | n | QABF | VIF | QSF_MIN | bars met |")
    print("|---|---|---|---|---|---|")
    for pair in sorted(means):
        cells, met = [], 0
        for j, metric in enumerate(METRICS):
            value = means[pair][j]
            bar = BARS.get(pair, {}).get(metric)
            if bar is None:
                cells.append(f"{value:.4f}")
                continue
            ok = value > bar[1]
            met += ok
            cells.append(f"{value:.4f} {'>' if ok else '<='} {bar[0]} {bar[1]:.4f}")
        print(f"| {pair} | {counts[pair]} | " + " | ".join(cells) + f" | {met}/3 |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.environ.get("MEDFUSION_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset_dir", default=os.path.join(data, "aanlib"))
    parser.add_argument("--weights", nargs="*", default=[],
                        help="weights files to score (default: the shipped bundle)")
    parser.add_argument("--block-exponent", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="pairs per pair type (0: all)")
    parser.add_argument("--method", action="append", default=[],
                        help="also score this classical method (e.g. max, gff; repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--ranks", metavar="CSV", help="a report's metrics.csv: also print the "
                        "mean rank per pair type against its other methods")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = load_pairs(args.dataset_dir, args.limit)
    counts: dict[str, int] = defaultdict(int)
    for pair, _, _ in pairs:
        counts[pair] += 1
    for name in args.method:
        start = time.perf_counter()
        means = score(get_method(name), pairs)
        report(f"method {name} ({time.perf_counter() - start:.0f} s)", means, counts)
    for weights in args.weights or ([] if args.method else [None]):
        start = time.perf_counter()
        with bundle_with_weights(weights) as bundle:
            method = get_method("cnn", bundle_dir=bundle, block_exponent=args.block_exponent)
            rank_rows = read_report_rows(args.ranks) if args.ranks else None
            means = score(method, pairs, rank_rows)
        report(f"{weights or 'shipped'} (i = {args.block_exponent}, "
               f"{time.perf_counter() - start:.0f} s)", means, counts)
        if rank_rows is not None:
            print_ranks(rank_rows)


if __name__ == "__main__":
    main()
