"""How much of a source's share ``Q^{S/F}`` is its pixel-replication staircase? (not a test)

Why: the atlas' PET and SPECT images are 128^2 scans stored at 256^2 by repeating each pixel
2x2 (their values change only between even and odd rows and columns; MRI and CT change
anywhere). A smooth SPECT's Sobel strength, the weight of ``Q^{SPECT/F}``, then lies largely on
the steps between 2x2 blocks, which are no anatomy: a fusion scores that source's share by
reproducing the steps, as ``max`` does where the SPECT is the brighter source. This script
measures it, per pair type and method:

- ``steps``: the share of each replicated source's Sobel weight ``sum g_S`` that the
  replication adds: ``1 - sum g_S' / sum g_S``, ``S'`` the same scan resampled from its 128^2
  samples by bilinear interpolation (half-pixel centres, edges replicated), which has the
  anatomy's edges and not the steps;
- per method: ``Q^{S/F}`` of the replicated source against the stored image ``S`` (the
  report's) and against ``S'``, and the weaker source's share ``min_S Q^{S/F}`` both ways
  (the other sources as stored).

Scores as in the report: 8-bit rint of the fused luminance, ``data_range=255``.

Session 38 (``--step 6``: 10 SPECT-MRI and 16 PET-MRI validation pairs): the steps carry 6.3 %
of the SPECT's Sobel weight (5.3-7.6 %) and 7.7 % of the PET's (4.0-9.9 %). Against the smooth
SPECT, max's share goes 0.4303 -> 0.3696 and the CNN's 0.2431 -> 0.2081 (gff 0.2026 -> 0.1826,
sesf 0.2167 -> 0.1896, average 0.2475 -> 0.2539): the gap between max and the CNN on SPECT-MRI
is no staircase effect. PET-MRI: max 0.4727 -> 0.4124, the CNN 0.7055 -> 0.6295 (min over both
sources).

    python Testing/benchmarks/bench_share_staircase.py [--pairs SPECT-MRI,PET-MRI]
        [--split validation] [--step 1] [--methods max,average,laplacian,gff,cnn,sesf]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_edge_front import add_dataset_arguments  # noqa: E402 (puts the bundle on the path)
from scripts.datalist import build_groups  # noqa: E402
from scripts.transforms import LoadFusionGroupd  # noqa: E402

import medfusion.metrics as fm  # noqa: E402
from medfusion.methods import get_method  # noqa: E402

REPLICATION = 2  # the atlas' PET and SPECT: each 128^2 sample stored as 2x2 pixels


def is_replicated(image: np.ndarray, factor: int = REPLICATION) -> bool:
    """Whether ``image`` (H, W) is constant on every ``factor x factor`` block."""
    h, w = image.shape
    if h % factor or w % factor:
        return False
    samples = image[::factor, ::factor]
    return bool(np.array_equal(np.repeat(np.repeat(samples, factor, 0), factor, 1), image))


def without_steps(image: np.ndarray, factor: int = REPLICATION) -> np.ndarray:
    """A replicated ``image`` resampled bilinearly from its samples (half-pixel centres):
    the same scan without the steps between its blocks."""
    samples = torch.from_numpy(np.ascontiguousarray(image[::factor, ::factor]))[None, None]
    smooth = torch.nn.functional.interpolate(samples, scale_factor=factor, mode="bilinear",
                                             align_corners=False)
    return smooth[0, 0].numpy()


def sobel_weight(image8: np.ndarray) -> float:
    """``sum g_S``: the Sobel strength that weights ``Q^{S/F}`` (as the metric computes it)."""
    _, weight = fm.structural.edge_sums(image8, image8)
    return weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataset_arguments(parser, "SPECT-MRI,PET-MRI")
    parser.add_argument("--methods", default="max,average,laplacian,gff,cnn,sesf")
    args = parser.parse_args()
    methods = {name: get_method(name) for name in args.methods.split(",")}
    load = LoadFusionGroupd()
    for pair in args.pairs.split(","):
        groups = build_groups(args.dataset_dir, args.split, [pair])[::args.step]
        steps: list[float] = []
        rows: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
        replicated_name = ""
        for group in groups:
            sources = load(group)["image"]
            planes = sources.numpy().astype(np.float64)
            replicated = [k for k, plane in enumerate(planes) if is_replicated(plane)]
            if len(replicated) != 1:
                continue  # no (or more than one) replicated source: nothing to compare
            k = replicated[0]
            replicated_name = Path(group["sources"][k]).parent.name
            stored8 = [np.rint(p * 255.0) for p in planes]
            smooth8 = list(stored8)
            smooth8[k] = np.rint(without_steps(planes[k]) * 255.0)
            steps.append(1.0 - sobel_weight(smooth8[k]) / sobel_weight(stored8[k]))
            for name, method in methods.items():
                with torch.inference_mode():
                    fused = method(sources[None])[0].numpy()
                fused8 = np.rint(np.clip(fused, 0, 1) * 255.0)
                stored = fm.per_source_qabf(fused8, *stored8, data_range=255)
                smooth = fm.per_source_qabf(fused8, *smooth8, data_range=255)
                rows[name].append((stored[k], smooth[k], min(stored), min(smooth)))
        if not steps:
            print(f"\n{pair}: no group with exactly one replicated source")
            continue
        print(f"\n{pair} ({len(steps)} groups, split {args.split}): {replicated_name} stored as "
              f"{REPLICATION}x{REPLICATION} blocks; the steps carry {np.mean(steps):.1%} of its "
              f"Sobel weight (range {min(steps):.1%}-{max(steps):.1%})")
        name_s = f"Q^{replicated_name}/F"
        print(f"{'method':12s} {name_s + ' stored':>18s} {name_s + ' smooth':>18s} "
              f"{'min_S stored':>13s} {'min_S smooth':>13s}")
        for name, values in rows.items():
            mean = np.mean(values, axis=0)
            print(f"{name:12s} {mean[0]:18.4f} {mean[1]:18.4f} {mean[2]:13.4f} {mean[3]:13.4f}")


if __name__ == "__main__":
    main()
