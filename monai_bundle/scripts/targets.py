"""Supervised targets for the fusion CNN: per training group, the best of several fusion rules.

Why: the atlas has no fused ground truth, and each classical rule fails somewhere (``max`` drops
the darker source's edges, ``average`` halves every edge, ``laplacian`` and ``gff`` flatten
bright uptake). Per group we fuse with every candidate rule below, among them three whole-edge
selections (:func:`edge_selection_fusion`, a gradient-domain fusion), and keep the one with the
best ``QAB/F + VIF / K`` among those that keep the weaker source's edges at least as well as
``max`` and ``laplacian`` do (weaker-source share ``min_S Q^{S/F}`` within ``tolerance`` of
theirs; if none does, the candidates with the best share). ``max`` is scored as that bar only,
never chosen: as a target it taught the CNN a pixel maximum (session 18). Only the training split
is used (the validation split stays for model selection). Targets are 8-bit PNGs written under
``target_dir`` (not committed; rebuilt on demand, deterministic) with a ``targets.json`` index
recording the rule chosen per group and its scores.

Usage::

    python monai_bundle/scripts/targets.py ../shared/data/aanlib monai_bundle/eval/targets
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scripts.datalist import build_datalist
from scripts.transforms import _luminance

TOLERANCE = 0.01


def _pyramid_fusion(batch: torch.Tensor, base_rule: str, levels: int = 4) -> torch.Tensor:
    """Laplacian pyramid with max-|detail| selection and a ``max`` or ``mean`` base level."""
    from medfusion.methods.classical import _expand, _max_abs, _reduce

    b, k, h, w = batch.shape
    current = batch.reshape(b * k, 1, h, w)
    details = []
    for _ in range(levels):
        smaller = _reduce(current)
        details.append(current - _expand(smaller, current.shape[-2:]))
        current = smaller
    stacked = current.reshape(b, k, *current.shape[-2:])
    fused = (stacked.amax(dim=1) if base_rule == "max" else stacked.mean(dim=1))[:, None]
    for detail in reversed(details):
        fused = _expand(fused, detail.shape[-2:]) + _max_abs(
            detail.reshape(b, k, *detail.shape[-2:]))[:, None]
    return fused[:, 0].clamp(0.0, 1.0)


def _max_base_detail_sum(batch: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Brighter source's local mean plus every source's detail (what the CNN starts from)."""
    size = 2 * radius + 1
    base = F.avg_pool2d(F.pad(batch, (radius,) * 4, mode="replicate"), size, stride=1)
    detail = batch - base
    return (base.amax(dim=1) + detail.sum(dim=1)).clamp(0.0, 1.0)


def _forward_gradients(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward differences of ``(K, H, W)`` along x and y (0 on the last column / row)."""
    gx, gy = np.zeros_like(images), np.zeros_like(images)
    gx[..., :, :-1] = images[..., :, 1:] - images[..., :, :-1]
    gy[..., :-1, :] = images[..., 1:, :] - images[..., :-1, :]
    return gx, gy


def _integrate(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The zero-mean image whose forward differences best match ``(gx, gy)`` in least squares
    (Poisson equation, Neumann borders, solved exactly by a DCT-II)."""
    import scipy.fft

    h, w = gx.shape
    divergence = np.zeros((h, w))
    divergence[:, :-1] += gx[:, :-1]
    divergence[:, 1:] -= gx[:, :-1]
    divergence[:-1] += gy[:-1]
    divergence[1:] -= gy[:-1]
    eigen = ((2 * np.cos(np.pi * np.arange(h) / h) - 2)[:, None]
             + (2 * np.cos(np.pi * np.arange(w) / w) - 2)[None])
    eigen[0, 0] = 1.0
    spectrum = scipy.fft.dctn(divergence, norm="ortho") / eigen
    spectrum[0, 0] = 0.0
    return scipy.fft.idctn(spectrum, norm="ortho")


def edge_selection_fusion(sources: np.ndarray, exponent: float, saliency_sigma: float = 2.0,
                          anchor_sigma: float = 20.0) -> np.ndarray:
    """Whole-edge selection of ``(K, H, W)`` sources in [0, 1], a gradient-domain fusion.

    Per pixel the gradient of the source with the largest ``G(|grad x_k|) / D_k^exponent`` is
    kept (``G``: Gaussian of ``saliency_sigma``; ``D_k``: the source's mean gradient strength,
    so a larger exponent favours the source with the weaker edges), the chosen gradient field
    is integrated (Poisson solve), and frequencies below ``anchor_sigma`` are those of ``max``.
    Why: it keeps each chosen edge whole, with no seam where the choice changes source.
    """
    import scipy.ndimage

    sources = np.asarray(sources, dtype=np.float64)
    gx, gy = _forward_gradients(sources)
    strength = np.hypot(gx, gy)
    overall = strength.reshape(len(sources), -1).mean(axis=1).clip(1e-12)
    saliency = np.stack([scipy.ndimage.gaussian_filter(s, saliency_sigma) for s in strength])
    saliency /= overall[:, None, None] ** exponent
    chosen = saliency.argmax(axis=0)[None]
    fused = _integrate(np.take_along_axis(gx, chosen, 0)[0], np.take_along_axis(gy, chosen, 0)[0])
    reference = sources.max(axis=0)
    fused += reference.mean() - fused.mean()
    fused += (scipy.ndimage.gaussian_filter(reference, anchor_sigma)
              - scipy.ndimage.gaussian_filter(fused, anchor_sigma))
    return np.clip(fused, 0.0, 1.0)


EDGE_SELECTION_EXPONENTS = (0.0, 0.3, 0.6)
SHARE_BAR_RULES = ("max", "laplacian")
REFERENCE_ONLY = ("max",)  # scored as the bar, never a target: the CNN would learn a maximum


def candidate_fusions(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every candidate rule's fusion of ``(1, K, H, W)`` sources in [0, 1] -> ``{name: (H, W)}``."""
    try:
        from medfusion.methods import get_method
    except ModuleNotFoundError as error:  # the bundle used on its own, without MedFusion
        raise RuntimeError(
            "building the supervised targets needs MedFusion's fusion rules (pip install "
            "medfusion); without it, pass --target_dir with targets built elsewhere, or train "
            "without the supervised term (--supervised False)") from error

    out = {name: get_method(name)(batch)[0] for name in ("average", "max", "laplacian", "gff")}
    out["laplacian_maxbase"] = _pyramid_fusion(batch, "max")[0]
    out["maxbase_detailsum"] = _max_base_detail_sum(batch)[0]
    sources = batch[0].double().numpy()
    for exponent in EDGE_SELECTION_EXPONENTS:
        fused = edge_selection_fusion(sources, exponent)
        out[f"edge_selection_{exponent:g}"] = torch.from_numpy(fused).to(batch.dtype)
    return out


def choose_target(sources: np.ndarray, tolerance: float = TOLERANCE) -> tuple[str, np.ndarray,
                                                                              dict]:
    """Target for ``sources (K, H, W)`` in [0, 1] by the module's rule: ``(rule, 8-bit image,
    scores)`` (``QSF_MIN`` of every candidate, ``QABF`` and ``VIF`` of the eligible ones).

    Scored with the bundle's torch forms of the metrics (``scripts.losses``; they agree with
    ``medfusion.metrics`` to about 1e-3) on the 8-bit rounded candidates, all in one batch.
    """
    from scripts.losses import edge_preservation, per_source_edge_preservation, visual_fidelity

    batch = torch.from_numpy(sources[None].astype(np.float32))
    fusions = candidate_fusions(batch)
    names = list(fusions)
    fused = torch.stack([fusions[n] for n in names])[:, None]
    fused = torch.round(fused * 255.0) / 255.0
    stacked = batch.expand(len(names), -1, -1, -1)
    with torch.no_grad():
        share = per_source_edge_preservation(fused, stacked).amin(dim=1)
        # the bar of issue 11: keep at least as much of the weaker source's edges as max and
        # laplacian do; among the candidates that do, the best edges and fidelity win
        bar = max(float(share[names.index(n)]) for n in SHARE_BAR_RULES)
        choosable = [j for j, name in enumerate(names) if name not in REFERENCE_ONLY]
        eligible = [j for j in choosable if float(share[j]) >= bar - tolerance]
        if not eligible:  # nothing keeps as much: the candidates closest to the bar
            best = max(float(share[j]) for j in choosable)
            eligible = [j for j in choosable if float(share[j]) >= best - tolerance]
        edges = edge_preservation(fused[eligible], stacked[eligible])
        fidelity = visual_fidelity(fused[eligible], stacked[eligible])
    scores = {n: {"QSF_MIN": float(share[j])} for j, n in enumerate(names)}
    for e, j in enumerate(eligible):
        scores[names[j]].update(QABF=float(edges[e]), VIF=float(fidelity[e]))
    k = len(sources)
    rule = max((names[j] for j in eligible),
               key=lambda n: scores[n]["QABF"] + scores[n]["VIF"] / k)
    pixels = (fused[names.index(rule), 0].numpy() * 255.0 + 0.5).astype(np.uint8)
    return rule, pixels, scores


def _read_indexes(target_dir: Path) -> dict:
    """All index files of ``target_dir`` (``targets.json`` and those of parallel builders)."""
    index: dict = {}
    for file in sorted(target_dir.glob("targets*.json")):
        index.update(json.loads(file.read_text()))
    return index


def build_targets(dataset_dir: str | Path, target_dir: str | Path,
                  pairs: list[str] | None = None, reverse: bool = False,
                  with_targets: bool = True) -> dict[str, list[dict]]:
    """Datalist whose training groups carry ``target`` paths (built if missing; validation none).

    ``with_targets=False`` returns the same groups without targets (the ablation without the
    supervised term).

    ``reverse=True`` builds from the end of the list into ``targets.reverse.json`` so that a
    second process can share the work; every later call reads both indexes.
    """
    target_dir = Path(target_dir)
    index_file = target_dir / ("targets.reverse.json" if reverse else "targets.json")
    known = _read_indexes(target_dir) if target_dir.is_dir() else {}
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    datalist = build_datalist(dataset_dir, pairs)
    if not with_targets:
        return datalist
    changed = 0
    groups = datalist["training"][::-1] if reverse else datalist["training"]
    for group in groups:
        path = target_dir / group["name"]
        if group["name"] not in known and reverse:
            known.update(_read_indexes(target_dir))  # the other builder may have done it
        if group["name"] not in known or not path.is_file():
            sources = np.stack([_luminance(p) for p in group["sources"]])
            rule, pixels, scores = choose_target(sources)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp.png")
            Image.fromarray(pixels).save(temporary)
            temporary.replace(path)
            index[group["name"]] = known[group["name"]] = {"rule": rule, "scores": scores}
            changed += 1
            if changed % 25 == 0:  # a cut-off run resumes from here
                _write_index(index_file, index)
        group["target"] = str(path)
    if changed:
        _write_index(index_file, index)
    return datalist


def _write_index(index_file: Path, index: dict) -> None:
    index_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = index_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(index, indent=1, sort_keys=True))
    temporary.replace(index_file)


def summary(target_dir: str | Path) -> dict[str, dict[str, int]]:
    """How often each rule was chosen, per pair type (for the model card)."""
    index = _read_indexes(Path(target_dir))
    counts: dict[str, dict[str, int]] = {}
    for name, entry in index.items():
        pair = name.split("/")[0]
        counts.setdefault(pair, {}).setdefault(entry["rule"], 0)
        counts[pair][entry["rule"]] += 1
    return counts


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["--reverse"]):
        sys.exit("usage (in the bundle folder): python -m scripts.targets DATASET_DIR "
                 "TARGET_DIR [--reverse]")
    build_targets(sys.argv[1], sys.argv[2], reverse=sys.argv[3:] == ["--reverse"])
    print(json.dumps(summary(sys.argv[2]), indent=1))
