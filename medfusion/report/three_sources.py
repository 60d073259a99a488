"""The 3-source case: SPM12 T1 (MRI) + PET + SPECT templates fused and scored per axial slice.

The three templates share one brain space but SPECT is stored on a flipped grid; the report's
volume loader aligns it onto the T1 grid in physical space and normalises each source, as for
any volume group. Every method fuses the whole volume; the metrics' multi-source forms (QAB/F
over all three sources' edges, VIF/SSIM/MI summed over sources, the weaker source's share
min_S Q^{S/F}) score the brain slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfusion.report.dataset import Group
from medfusion.report.fusion import MethodSpec, fuse, load_group, metric_axis

MODALITIES = ("T1", "PET", "SPECT")
METHODS = ("cnn", "max", "average", "laplacian", "gff")
METRICS = ("QABF", "VIF", "QSF_MIN", "SSIM", "MI")
SLICES = range(25, 66, 5)  # axial slices through the brain (91 in all)


def find_templates(dataset: Path) -> list[Path] | None:
    """The SPM12 T1, PET and SPECT templates beside the atlas (``data/volumes/spm12``)."""
    for root in (Path(dataset).parent, Path(dataset)):
        folder = root / "volumes" / "spm12"
        paths = [folder / f"{name}.nii" for name in MODALITIES]
        if all(p.is_file() for p in paths):
            return paths
    return None


def three_source_case(dataset: Path, specs: Sequence[MethodSpec], device: str) -> dict:
    """Per-slice rows and per-method means of the 3-source fusion; {} without the templates."""
    from medfusion.metrics import compute_metrics

    paths = find_templates(dataset)
    if paths is None:
        return {}
    group = Group("T1+PET+SPECT", "spm12", MODALITIES, tuple(paths), "volume")
    item = load_group(group)
    axis = metric_axis(item)
    chosen = [s for s in specs if s.name in METHODS and s.label == s.name]
    rows, panels = [], {}
    for spec in chosen:
        fused = fuse(item, spec, device).luminance
        for index in SLICES:
            f = np.take(fused, index, axis=axis)
            sources = [np.take(s, index, axis=axis) for s in item.sources]
            values = compute_metrics(f, sources, names=list(METRICS), data_range=1.0)
            rows.append({"slice": index, "method": spec.label, **values})
        panels[spec.label] = np.take(fused, 45, axis=axis)
    summary = {}
    for spec in chosen:
        mine = [r for r in rows if r["method"] == spec.label]
        summary[spec.label] = {
            m: float(np.mean([r[m] for r in mine if math.isfinite(r[m])])) for m in METRICS
        }
    sources = {m: np.take(s, 45, axis=axis) for m, s in zip(MODALITIES, item.sources,
                                                               strict=True)}
    return {
        "description": (
            f"SPM12 templates T1 (MRI) + PET + SPECT (SPECT aligned onto the T1 grid in "
            f"physical space), fused as volumes by each method with the same network weights as "
            f"the pairs; scored on {len(SLICES)} axial slices ({SLICES.start}..{SLICES.stop - 1} "
            "step 5) with the metrics' multi-source forms: QABF pools all three sources' edges, "
            "VIF, SSIM and MI are summed over the three sources, QSF_MIN is the worst-kept "
            "source's edge share."
        ),
        "metrics": list(METRICS),
        "rows": rows,
        "summary": summary,
        "panel": {"sources": sources, "fused": panels},
    }
