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

``--map-oracle a:b[,...]`` asks the same of the bundle network's own form: its composition
(``combine_sources``: a convex selection of the sources plus the detail gains) with the maps
optimised per image for that objective (300 steps, from the network's maps with the logits × 0.1
and the gains at sigmoid 0.5), on the block grid (``--map-grid block``: the best a block CNN at
the shipped i could output for that image) or per pixel. Session 35 (SPECT-MRI, ``--step 6`` =
10 pairs, ``--exponents 0.3 --cnn``; max 0.6610 / 0.7629 / 0.4303, gff 0.7841 / 0.9907 /
0.2026, the CNN 0.7910 / 1.0456 / 0.2431): block 1:1 0.7778 / 1.0473 / 0.3870, block 2:1
0.7488 / 1.0033 / 0.4668, pixel 1:2 0.7947 / 1.0123 / 0.3724 (~4 min per objective alone, 1
thread); ``--map-exponent 2``: 1:1 0.7931 / 1.0152 / 0.3430, 2:1 0.7708 / 0.9463 / 0.4117;
``--map-exponent 1``: 1:1 0.7966 / 0.9717 / 0.3716, 2:1 0.7754 / 0.8828 / 0.4327. At max's
share the block form's Q^{AB/F} is 0.76-0.78, under gff's: even the best maps found per image
(a local optimum) miss one of the two SPECT-MRI bars at every grid tried. ``--map-form
two-band``: block i = 3 1:1 0.7728 / 1.0689 / 0.3957, 2:1 0.7310 / 0.9693 / 0.4986 (the same
curve); per pixel 1:1 0.7851 / 0.9540 / 0.4544 (Q^{AB/F} and share above their bars, VIF
under gff's), 1:2 0.7825 / 1.1205 / 0.3902 (only VIF above): close to all three, none met by
either objective; finer control than the block grid is what the bars need. Session 36 (same
10 pairs): per pixel two-band 1:1.5 0.7855 / 1.0379 / 0.4203 (Q^{AB/F} and VIF above, the share
0.01 under max's); on the block grid (i = 3) control finer than the block at its cost does not
move the curve: ``--map-guided intensity`` two-band 1:1 0.7772 / 1.0637 / 0.4063, ``--map-guided
gradient`` 1:1 0.7792 / 1.0567 / 0.4046, 1:1.5 0.7776 / 1.1053 / 0.3822; ``--map-form
three-band`` (a free gain on each source's smooth band too) 1:1 0.7786 / 1.1189 / 0.3968, 1:1.5
0.7795 / 1.1666 / 0.3691 (VIF up, share not).

``--save-png DIR`` writes one picture per group (sources, every fusion, a zoom;
``medfusion.report.figures.image_panel``) and ``--per-image CSV`` every group's scores, so the
images are looked at and an operating point can be chosen per image; ``--half-resolution``
scores every fusion again on 2x2 block means of it and its sources. Session 38 (same 10 pairs,
``--pairs SPECT-MRI --step 6 --exponents 0.3 --cnn --map-oracle 1:1.25 --map-form two-band
--half-resolution``, ~6 min per objective): per pixel 1:1.25
0.7855 / 0.9992 / 0.4368, all three SPECT-MRI bars met on these pairs, but the pictures show
concentric rings and hatching over the MRI (``docs/images/spect_mri_map_oracle_40016.png``):
gradients that agree with the SPECT's on some pixels and with the MRI's on the next. At half
resolution its share falls to 0.3230 (Q^{AB/F} / VIF 0.7344 / 0.8732) while max keeps 0.4124
(0.6385 / 0.6764) and gff and the CNN rise (0.2242 and 0.2533; Q^{AB/F} / VIF 0.7345 / 0.8935
and 0.7427 / 0.9304): the oracle meets the bars with a pixel-scale pattern, not by keeping the
SPECT's structure. ``--map-half-weight 1`` (the objective on 2x2 block means too): 1:1.25
0.7744 / 0.9762 / 0.4539, at half resolution 0.7547 / 0.8883 / 0.4255; 1:1 0.7722 / 0.9187 /
0.4723, half 0.7561 / 0.8468 / 0.4409: the share now holds at half resolution, Q^{AB/F} and VIF
at full resolution fall under gff's, and the pictures show the rings and hatching at a coarser
scale. ``--map-smoothness S`` (session 39; ``--pairs SPECT-MRI --step 6 --exponents 0.3 --cnn
--map-form two-band --half-resolution --map-smoothness S``, per pixel): S times the maps' total
variation added to the objective. 1:1.25 at S = 0.1 0.7881 / 1.0047 / 0.4436 and S = 1 0.7903 /
0.9954 / 0.4407 (both meet all three bars; at half resolution their share is 0.3308 / 0.3414),
S = 3 0.7893 / 0.9930 / 0.4276 (the share already under max's), S = 10 0.7867 / 0.9964 / 0.4014;
S = 5 at 1.25:1.25 0.7839 / 0.9643 / 0.4420, S = 10 at 1.5:1.5 0.7796 / 0.9699 / 0.4358.
Looked at (40016's pons, zoomed; ``docs/images/spect_mri_map_smoothness_40016.png``, put
together from one map oracle per S): the rings fade as S grows, are still seen at S = 1, 3 and
5 and are gone at S = 10, where the share is under max's; with both weights raised at S = 10
the share is met and Q^{AB/F} and VIF fall under gff's. So the smoothness that removes the
pattern also removes the share above max's. On the block grid (``--map-grid block
--map-exponent I``, two-band, no smoothness): i = 1 1:1.25 0.7968 / 1.0402 / 0.3988, 1.5:1.25
0.7863 / 0.9672 / 0.4529, 2:1.25 0.7727 / 0.9174 / 0.4901, 1.25:1.5 0.7936 / 1.0332 / 0.4100,
1.5:2 0.7885 / 1.0574 / 0.4068; i = 2 1:1.25 0.7890 / 1.0620 / 0.3737, 1.5:1.25 0.7774 /
0.9946 / 0.4254, 2:1.25 0.7596 / 0.9349 / 0.4712 (i = 1 at 1:1.25 shows the rings too).

    python Testing/benchmarks/bench_edge_front.py [--step 1] [--exponents 0,0.3,0.5,0.7,1]
        [--pairs SPECT-MRI,PET-MRI] [--cnn] [--oracle 1:0,1:2]
        [--map-oracle 1:1,2:1 --map-grid block [--map-exponent 2]
         [--map-form convex|two-band|three-band] [--map-guided intensity|gradient]]
        [--map-half-weight 1] [--map-smoothness S] [--save-png DIR] [--per-image CSV]
        [--half-resolution]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "monai_bundle"))

from scripts.datalist import build_groups  # noqa: E402
from scripts.losses import FusionLoss, sobel  # noqa: E402
from scripts.network import FusionNet, combine_sources, upsample_bilinear  # noqa: E402
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


SCORE_NAMES = ("QABF", "VIF", "QSF_MIN", "QSF_1", "QSF_2", "QSF_3")  # as :func:`scores` returns


def half_resolution(images: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` images as their 2x2 block means (``avg_pool2d``: odd last rows and
    columns dropped), for the scores and for the map oracle's objective alike."""
    planes = images.reshape(-1, 1, *images.shape[-2:])
    half = torch.nn.functional.avg_pool2d(planes, 2)
    return half.reshape(*images.shape[:-2], *half.shape[-2:])


def save_panel(path: Path, sources: np.ndarray, modalities: list[str],
               fusions: dict[str, np.ndarray], title: str) -> None:
    """One group's sources and fusions (luminance, 8-bit as scored) and a zoom, as a PNG."""
    from medfusion.report.figures import image_panel

    path.parent.mkdir(parents=True, exist_ok=True)
    grey = {name: np.rint(np.clip(fused, 0, 1) * 255.0) / 255.0 for name, fused in fusions.items()}
    image_panel(dict(zip(modalities, sources, strict=True)), grey, path, title)


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


def smooth_band(images: torch.Tensor) -> torch.Tensor:
    """``low``: the bilinear upsampling of 16x16 block means of ``(B, K, H, W)`` images (H and
    W multiples of 16), the coarsest band of the two-band forms."""
    return upsample_bilinear(torch.nn.functional.avg_pool2d(images, 16), 16)


def edge_strength(images: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Sobel gradient magnitude ``sqrt(gx^2 + gy^2 + eps)`` of each ``(B, K, H, W)`` plane."""
    gx, gy = sobel(images.reshape(-1, 1, *images.shape[-2:]))
    return torch.sqrt(gx * gx + gy * gy + eps).reshape(images.shape)


def network_layers(net: FusionNet, x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the network's composition works on, for ``(B, K, H, W)`` sources: the padded
    sources, the selection logits on the block grid ``(B, K, h, w)``, the base layer and the
    16x16 smooth band (both padded size)."""
    with torch.no_grad():
        padded = net._padded(x)
        stats, coarse = net._block_stats(padded, 1 << net.block_exponent)
        maps = net._block_maps(stats, x.shape[0], x.shape[1])
        base = upsample_bilinear(coarse, net.base_pool)
        return padded, maps[:, 0::2], base, smooth_band(padded)


def two_band_fusion(x: torch.Tensor, base: torch.Tensor, low: torch.Tensor,
                    logit: torch.Tensor, detail_gain: torch.Tensor, band_gain: torch.Tensor,
                    max_prior: torch.Tensor) -> torch.Tensor:
    """The two-band form, unclamped ``(B, 1, H, W)``: ``sum_k softmax_k(logit_k + beta x_k)
    x_k + detail_gain_k (x_k - base_k) + band_gain_k (base_k - low_k)``."""
    weights = torch.softmax(logit + max_prior * x, dim=1)
    fused = weights * x + detail_gain * (x - base) + band_gain * (base - low)
    return fused.sum(dim=1, keepdim=True)


def map_oracle(net: FusionNet, sources: np.ndarray, share_weight: float,
               fidelity_weight: float, grid: str = "pixel", form: str = "convex",
               iterations: int = 300, logit_scale: float = 0.1,
               guided: str = "", half_weight: float = 0.0, smoothness: float = 0.0
               ) -> np.ndarray:
    """The network's own composition (:func:`scripts.network.combine_sources`: a convex
    selection plus the detail gains) with its maps optimised for one image, for the same
    objective as :func:`oracle`. The maps start from the network's, the selection logits scaled
    by ``logit_scale`` and the gains reset to sigmoid 0.5: the trained logits lie tens apart,
    where the softmax has no gradient. ``grid`` "pixel" frees every pixel's logit and gain,
    "block" only the block grid's (then upsampled as in ``forward``): what a block CNN could
    output for this image at best (no bound: it is not a trained network).

    ``form`` "two-band" tries a form that is no convex selection instead: the same selection
    ``sum_k w_k x_k`` plus each source's detail ``x_k - base_k`` and coarser band ``base_k -
    low_k`` (``low``: bilinear 16x16 block means) with free real gains (from 0), three maps per
    source on the same grid; "three-band" adds a fourth, a free gain on each source's ``low``
    itself (so a smooth part of one source can be added to the whole other).

    ``guided`` "intensity" or "gradient" makes every map, within a block, affine in the pixel's
    own source's intensity (or Sobel gradient magnitude) and in the sources' mean of it (three
    coefficients per map and block, as in a guided filter's local linear model): control finer
    than the block grid at the block grid's cost.

    ``half_weight`` W > 0 adds W times the same objective on 2x2 block means of the fusion and
    the sources: maps that keep a source's edges at both scales, not by a pixel-scale
    pattern. ``smoothness`` S > 0 adds S times the maps' total variation (the mean absolute
    difference between neighbouring pixels of every full-resolution map the fusion is composed
    with, after ``guided``'s affine model): rings and hatching (maps that alternate from pixel to
    pixel) cost, one sharp change of source little."""
    x = torch.from_numpy(sources[None].astype(np.float32))
    label = torch.cat([x, torch.zeros_like(x[:, :2])], dim=1)
    loss = FusionLoss(l1=0.0, ssim=0.0, source_ssim=0.0, gradient=0.0, intensity=0.0, edge=1.0,
                      weaker_edge=share_weight, vif=fidelity_weight)
    block, k, (h, w) = 1 << net.block_exponent, x.shape[1], x.shape[-2:]
    padded, block_logits, base, low = network_layers(net, x)
    channels = {"convex": 2, "two-band": 3, "three-band": 4}[form]
    terms = 3 if guided else 1  # a map, or a map affine in the guide and the sources' mean
    with torch.no_grad():
        logits = block_logits[:, :, None]
        gains = torch.zeros_like(logits).expand(-1, -1, channels - 1, -1, -1)
        maps = torch.cat([logits * logit_scale, gains], 2)
        if guided:
            maps = torch.stack([maps, torch.zeros_like(maps), torch.zeros_like(maps)], 3)
        maps = maps.reshape(1, channels * terms * k, *block_logits.shape[-2:])
        if grid == "pixel":
            maps = upsample_bilinear(maps, block)
        guide = edge_strength(padded) if guided == "gradient" else padded
    maps.requires_grad_(True)
    optimiser = torch.optim.Adam([maps], lr=0.1 if grid == "pixel" else 0.05)

    def compose() -> tuple[torch.Tensor, torch.Tensor]:
        """The fused image and the full-resolution maps it was composed with."""
        full = maps if grid == "pixel" else upsample_bilinear(maps, block)
        if guided:
            full = full.reshape(1, k, channels, terms, *padded.shape[-2:])
            own = guide[:, :, None]
            mean = guide.mean(dim=1, keepdim=True)[:, :, None]
            full = full[:, :, :, 0] + full[:, :, :, 1] * own + full[:, :, :, 2] * mean
        full = full.reshape(1, k, channels, *padded.shape[-2:])
        if form in ("two-band", "three-band"):
            fused = two_band_fusion(padded, base, low, full[:, :, 0], full[:, :, 1],
                                    full[:, :, 2], net.max_prior)
            if form == "three-band":  # and the smooth band itself, any source's, added
                fused = fused + (full[:, :, 3] * low).sum(dim=1, keepdim=True)
        else:
            fused = combine_sources(padded, base, full[:, :, 0], full[:, :, 1], net.max_prior)
        return fused.clamp(0.0, 1.0)[..., :h, :w], full

    for _ in range(iterations):
        optimiser.zero_grad()
        fused, full = compose()
        value = loss(fused, label)
        if smoothness > 0:
            value = value + smoothness * total_variation(full)
        if half_weight > 0:
            value = value + half_weight * loss(half_resolution(fused), half_resolution(label))
        value.backward()
        optimiser.step()
    with torch.no_grad():
        return compose()[0][0, 0].numpy()


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between vertically and horizontally neighbouring pixels of
    ``(..., H, W)`` maps, the two directions added."""
    return ((maps[..., 1:, :] - maps[..., :-1, :]).abs().mean()
            + (maps[..., :, 1:] - maps[..., :, :-1]).abs().mean())


def bundle_network(block_exponent: int | None = None) -> FusionNet:
    """The bundle's network as the ``cnn`` method loads it (its block exponent unless one is
    given), with no gradients for its weights (only the maps are optimised)."""
    options = {} if block_exponent is None else {"block_exponent": block_exponent}
    return get_method("cnn", **options).module.requires_grad_(False)


def add_dataset_arguments(parser: argparse.ArgumentParser, pairs: str) -> None:
    """The groups a benchmark scores: ``--dataset_dir`` (the atlas pairs under
    ``MEDFUSION_DATA``, default ``../shared/data``), ``--split``, ``--pairs`` (default
    ``pairs``) and ``--step`` (every step-th group of a pair type)."""
    data = os.environ.get("MEDFUSION_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset_dir", default=os.path.join(data, "aanlib"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--pairs", default=pairs)
    parser.add_argument("--step", type=int, default=1, help="every step-th group of a pair type")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataset_arguments(parser, "CT-MRI,PET-MRI,SPECT-MRI")
    parser.add_argument("--exponents", default="0,0.3,0.5,0.7,1")
    parser.add_argument("--cnn", action="store_true", help="also score the bundle's CNN")
    parser.add_argument("--oracle", default="", metavar="A:B,...",
                        help="also pixel-optimised images for Q^AB/F + A*share + B*VIF/K")
    parser.add_argument("--map-oracle", default="", metavar="A:B,...",
                        help="also the network's composition with its maps optimised per "
                             "image for the same objective (see map_oracle)")
    parser.add_argument("--map-grid", default="pixel", choices=["pixel", "block"])
    parser.add_argument("--map-form", default="convex",
                        choices=["convex", "two-band", "three-band"],
                        help="the network's composition, or a non-convex candidate (map_oracle)")
    parser.add_argument("--map-guided", default="", choices=["", "intensity", "gradient"],
                        help="each block's maps affine in the pixel's own and the sources' "
                             "mean intensity or Sobel gradient magnitude")
    parser.add_argument("--map-half-weight", type=float, default=0.0, metavar="W",
                        help="the map oracle's objective also on 2x2 block means, weight W")
    parser.add_argument("--map-smoothness", type=float, default=0.0, metavar="S",
                        help="the map oracle's objective plus S times its maps' total "
                             "variation (against rings and hatching)")
    parser.add_argument("--map-exponent", type=int, default=None,
                        help="block exponent i of the map oracle's network (default: shipped)")
    parser.add_argument("--save-png", type=Path, default=None, metavar="DIR",
                        help="one picture per group: sources, every fusion, a zoom")
    parser.add_argument("--half-resolution", action="store_true",
                        help="also score every fusion and its sources as 2x2 block means: a "
                             "share kept by pixel-scale patterns does not survive it")
    parser.add_argument("--per-image", type=Path, default=None, metavar="CSV",
                        help="every group's scores, one row per group and fusion")
    args = parser.parse_args()
    torch.set_num_threads(1)

    exponents = [float(a) for a in args.exponents.split(",")]
    objectives = [tuple(float(v) for v in item.split(":"))
                  for item in args.oracle.split(",") if item]
    map_objectives = [tuple(float(v) for v in item.split(":"))
                      for item in args.map_oracle.split(",") if item]
    net = bundle_network(args.map_exponent) if map_objectives else None
    grid = args.map_grid if net is None or args.map_grid == "pixel" else \
        f"block i={net.block_exponent}"
    grid += "" if args.map_form == "convex" else f" {args.map_form}"
    grid += f" guided by {args.map_guided}" if args.map_guided else ""
    grid += f" +half x{args.map_half_weight:g}" if args.map_half_weight else ""
    grid += f" +TV x{args.map_smoothness:g}" if args.map_smoothness else ""
    methods = {name: get_method(name) for name in ["max", "gff", "laplacian"]
               + (["cnn"] if args.cnn else [])}
    load = LoadFusionGroupd()
    results: dict[tuple[str, str], list[tuple[float, ...]]] = defaultdict(list)
    rows: list[dict[str, object]] = []
    modalities: dict[str, list[str]] = {}
    for pair in args.pairs.split(","):
        groups = build_groups(args.dataset_dir, args.split, [pair])[::args.step]
        for group in groups:
            modalities[pair] = [Path(p).parent.name for p in group["sources"]]
            image = load(group)["image"]
            sources = image.numpy().astype(np.float64)
            fusions: dict[str, np.ndarray] = {}
            for name, method in methods.items():
                with torch.inference_mode():
                    fusions[name] = method(image[None])[0].numpy()
            for a in exponents:
                fusions[f"edge selection a={a:g}"] = edge_selection_fusion(sources, a)
            for a, b in objectives:
                fusions[f"oracle {a:g}:{b:g}"] = oracle(sources, a, b)
            for a, b in map_objectives:
                fusions[f"maps {grid} {a:g}:{b:g}"] = map_oracle(
                    net, sources, a, b, args.map_grid, args.map_form, guided=args.map_guided,
                    half_weight=args.map_half_weight, smoothness=args.map_smoothness)
            name_of_group = Path(group["sources"][0]).stem
            order = "/".join(modalities[pair])  # whose Q^{S/F} are QSF_1, QSF_2, ...
            for name, fused in fusions.items():
                score = scores(fused, sources)
                results[(pair, name)].append(score)
                rows.append({"pair_type": pair, "group": name_of_group, "sources": order,
                             "fusion": name, **dict(zip(SCORE_NAMES, score, strict=False))})
                if args.half_resolution:
                    half = scores(half_resolution(torch.from_numpy(fused)).numpy(),
                                  half_resolution(torch.from_numpy(sources)).numpy())
                    results[(pair, f"{name} (half res.)")].append(half)
                    rows.append({"pair_type": pair, "group": name_of_group, "sources": order,
                                 "fusion": f"{name} (half res.)",
                                 **dict(zip(SCORE_NAMES, half, strict=False))})
            if args.save_png is not None:
                save_panel(args.save_png / f"{pair}_{name_of_group}.png", sources,
                           modalities[pair], fusions, f"{pair} {name_of_group}")
        names = [*methods, *(f"edge selection a={a:g}" for a in exponents),
                 *(f"oracle {a:g}:{b:g}" for a, b in objectives),
                 *(f"maps {grid} {a:g}:{b:g}" for a, b in map_objectives)]
        if args.half_resolution:
            names += [f"{name} (half res.)" for name in names]
        per_source = " ".join(f"Q^{m}/F" for m in modalities[pair])
        print(f"\n{pair} ({len(groups)} groups, split {args.split})")
        width = max(24, *(len(name) for name in names))
        print(f"{'fusion':{width}s} QAB/F    VIF      min_S Q^S/F  {per_source}")
        for name in names:
            mean = np.mean(results[(pair, name)], axis=0)
            shares = " ".join(f"{v:.4f}" for v in mean[3:])
            print(f"{name:{width}s} {mean[0]:.4f}   {mean[1]:.4f}   {mean[2]:.4f}       {shares}")
    if args.per_image is not None:
        columns = ["pair_type", "group", "sources", "fusion", *SCORE_NAMES]
        with args.per_image.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
