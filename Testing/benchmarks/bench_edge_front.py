"""How much of the weaker source's edges a fusion can keep at a given Q^{AB/F} (not a test).

Why: issue 11 asks, per pair type, for a weaker-source share ``min_S Q^{S/F}`` at least that of
``max`` *and* a Q^{AB/F} above ``gff``'s. Both are sums over pixels of how well the fused
gradient matches a source's gradient, weighted by that source's edge strength; where the two
sources' edges cross, one gradient has to win. This script traces that trade-off with a fusion
that keeps whole gradients by construction (no network, no blending of edges;
``scripts.targets.edge_selection_fusion``, also a candidate of the CNN's supervised targets):

    per pixel, follow the gradient of the source with the largest s_k = G_2(|grad x_k|) / D_k^a,
    D_k = mean |grad x_k| over the image, and integrate the chosen gradient field (a Poisson
    solve, DCT with Neumann borders); the lowest frequencies are set to those of ``max``.

``a = 0`` keeps the strongest edge at every pixel (Q^{AB/F}'s own weighting); larger ``a``
favour the source with the weaker edges overall (its share rises). The points ``(Q^{AB/F},
min_S Q^{S/F})`` over ``a`` are a reference curve of what whole-edge selection reaches (not a
bound: blending can beat it where the sources' edges agree, as the CNN does on PET-MRI); the
rows of ``max``, ``gff``, ``laplacian`` and (``--cnn``) the bundle's CNN are printed beside them.
Scores as in the report: 8-bit rint of the fused luminance, ``data_range=255``.

Last run (session 19, all 189 validation pairs, ``--cnn --exponents 0,0.2,0.3,0.4,0.5,0.7,1``,
the session-18 CNN), Q^{AB/F} / VIF / min_S Q^{S/F}: SPECT-MRI a=0 0.7924 / 0.9790 / 0.2336,
a=0.3 0.7800 / 0.8899 / 0.2956, a=0.7 0.7272 / 0.7569 / 0.4144, a=1 0.6464 / 0.6815 / 0.5125
against gff 0.7825 / 0.9824 / 0.1992, max 0.6545 / 0.7460 / 0.4321 and the CNN 0.7742 / 1.0077
/ 0.3061: where whole-edge selection keeps max's share of SPECT's edges, its Q^{AB/F} is ~0.71,
far under gff's. PET-MRI a=0.3 0.8002 / 0.8514 / 0.5675 (the CNN 0.7940 / 1.0619 / 0.7359 lies
above the curve); CT-MRI a=0 0.5933 / 0.5213 / 0.4746.

``--oracle a:b[,a:b...]`` adds an *oracle* per objective: each fused image optimised pixel by
pixel (Adam on the pixels, 100 steps, from the a = 0.3 edge selection) for ``Q^{AB/F} + a *
softmin_S Q^{S/F} + b * VIF / K`` (the bundle's training loss, ``FusionLoss``, with those terms).
It is no method (it needs the metrics at fusion time); it shows what one fused image can reach,
so whether a bar is out of reach of any fusion or only of a network's form. Session 27 (SPECT-MRI,
``--step 8`` = 7 pairs, ``--oracle 1:0,1:2``, ~2.5 min): oracle 1:0 0.793 / 0.684 / 0.518,
1:2 0.794 / 1.059 / 0.440, both Q^{AB/F} and share (and VIF for 1:2) above issue 11's
SPECT-MRI bars, far above the whole-edge curve (a=0.3 0.783 / 0.872 / 0.306 on the same pairs).
Every CNN checkpoint trained so far lies on that curve (0.790 / 0.251 to 0.763 / 0.353 on all
56 pairs): its fused image is a convex per-pixel selection of the sources; the oracle's is not
(it adds a smooth part of the SPECT to the whole MRI).

    python Testing/benchmarks/bench_edge_front.py [--step 1] [--exponents 0,0.3,0.5,0.7,1]
        [--pairs SPECT-MRI,PET-MRI] [--cnn] [--oracle 1:0,1:2]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "monai_bundle"))

from scripts.datalist import build_groups  # noqa: E402
from scripts.losses import FusionLoss  # noqa: E402
from scripts.targets import edge_selection_fusion  # noqa: E402
from scripts.transforms import LoadFusionGroupd  # noqa: E402

import medfusion.metrics as fm  # noqa: E402
from medfusion.methods import get_method  # noqa: E402


def scores(fused: np.ndarray, sources: np.ndarray) -> tuple[float, ...]:
    """Q^{AB/F}, VIF, and Q^{S/F} of each source, on the report's 8-bit scale."""
    fused8 = np.rint(np.clip(fused, 0, 1) * 255.0)
    sources8 = [np.rint(s * 255.0) for s in sources]
    shares = fm.per_source_qabf(fused8, *sources8, data_range=255)
    return (fm.qabf(fused8, *sources8, data_range=255),
            fm.vif(fused8, *sources8, data_range=255), min(shares), *shares)


def oracle(sources: np.ndarray, share_weight: float, fidelity_weight: float,
           iterations: int = 100) -> np.ndarray:
    """A fused image ``(H, W)`` in [0, 1] optimised pixel by pixel for
    ``Q^{AB/F} + share_weight * softmin_S Q^{S/F} + fidelity_weight * VIF / K``: the training
    loss (``FusionLoss``) with only those three terms, minimised over the pixels."""
    batch = torch.from_numpy(sources[None].astype(np.float32))
    no_target = torch.zeros_like(batch[:, :2])  # the target and has-target channels: unused
    label = torch.cat([batch, no_target], dim=1)
    loss = FusionLoss(l1=0.0, ssim=0.0, source_ssim=0.0, gradient=0.0, intensity=0.0, edge=1.0,
                      weaker_edge=share_weight, vif=fidelity_weight)
    start = edge_selection_fusion(sources, 0.3)
    fused = torch.tensor(start[None, None], dtype=torch.float32, requires_grad=True)
    optimiser = torch.optim.Adam([fused], lr=0.004)
    for _ in range(iterations):
        optimiser.zero_grad()
        loss(fused, label).backward()
        optimiser.step()
        with torch.no_grad():
            fused.clamp_(0.0, 1.0)
    return fused.detach()[0, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.environ.get("MEDFUSION_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset_dir", default=os.path.join(data, "aanlib"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--pairs", default="CT-MRI,PET-MRI,SPECT-MRI")
    parser.add_argument("--step", type=int, default=1, help="every step-th group of a pair type")
    parser.add_argument("--exponents", default="0,0.3,0.5,0.7,1")
    parser.add_argument("--cnn", action="store_true", help="also score the bundle's CNN")
    parser.add_argument("--oracle", default="", metavar="A:B,...",
                        help="also pixel-optimised images for Q^AB/F + A*share + B*VIF/K")
    args = parser.parse_args()
    torch.set_num_threads(1)

    exponents = [float(a) for a in args.exponents.split(",")]
    objectives = [tuple(float(v) for v in item.split(":"))
                  for item in args.oracle.split(",") if item]
    methods = {name: get_method(name) for name in ["max", "gff", "laplacian"]
               + (["cnn"] if args.cnn else [])}
    load = LoadFusionGroupd()
    results: dict[tuple[str, str], list[tuple[float, ...]]] = defaultdict(list)
    modalities: dict[str, list[str]] = {}
    for pair in args.pairs.split(","):
        groups = build_groups(args.dataset_dir, args.split, [pair])[::args.step]
        for group in groups:
            modalities[pair] = [Path(p).parent.name for p in group["sources"]]
            image = load(group)["image"]
            sources = image.numpy().astype(np.float64)
            for name, method in methods.items():
                with torch.inference_mode():
                    fused = method(image[None])[0].numpy()
                results[(pair, name)].append(scores(fused, sources))
            for a in exponents:
                fused = edge_selection_fusion(sources, a)
                results[(pair, f"edge selection a={a:g}")].append(scores(fused, sources))
            for a, b in objectives:
                fused = oracle(sources, a, b)
                results[(pair, f"oracle {a:g}:{b:g}")].append(scores(fused, sources))
        names = [*methods, *(f"edge selection a={a:g}" for a in exponents),
                 *(f"oracle {a:g}:{b:g}" for a, b in objectives)]
        per_source = " ".join(f"Q^{m}/F" for m in modalities[pair])
        print(f"\n{pair} ({len(groups)} groups, split {args.split})")
        print(f"{'fusion':24s} QAB/F    VIF      min_S Q^S/F  {per_source}")
        for name in names:
            mean = np.mean(results[(pair, name)], axis=0)
            shares = " ".join(f"{v:.4f}" for v in mean[3:])
            print(f"{name:24s} {mean[0]:.4f}   {mean[1]:.4f}   {mean[2]:.4f}       {shares}")


if __name__ == "__main__":
    main()
