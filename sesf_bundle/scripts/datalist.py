"""Datalist of single source images for reconstruction training, from the atlas ``splits.json``.

Every source image of every co-registered group of a split is one sample
``{"image": path, "modality": str, "name": "<PAIR>/<MODALITY>/<file>"}`` (MONAI datalist style);
the groups themselves (:func:`build_groups`) are what ``configs/inference.json`` fuses.
The groups are those of ``monai_bundle/scripts/datalist.py`` (one ``splits.json`` reading,
``scripts/splits.py``), so the
SESF encoder never sees a validation patient either. Usage as a script writes the datalist JSON::

    python sesf_bundle/scripts/datalist.py ../shared/data/aanlib datalist.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    from scripts.splits import split_entries
except ImportError:  # run as a script (see the usage above)
    from splits import split_entries

SPLITS = {"training": "train", "validation": "validation"}


def build_groups(dataset_dir: str | Path, split: str, pairs: list[str] | None = None) -> list[dict]:
    """Co-registered groups of one split (``"train"`` or ``"validation"``) of ``dataset_dir``:
    ``{"sources": [path per modality], "modalities": [...], "name": "<PAIR>/<file>"}``."""
    root = Path(dataset_dir)
    return [{"sources": [str(root / pair / modality / name) for modality in modalities],
             "modalities": modalities, "name": f"{pair}/{name}"}
            for pair, modalities, name in split_entries(root, split, pairs)]


def build_images(dataset_dir: str | Path, split: str, pairs: list[str] | None = None) -> list[dict]:
    """Source images of one split of ``dataset_dir``, each group's images in turn."""
    images: list[dict] = []
    for group in build_groups(dataset_dir, split, pairs):
        pair, name = group["name"].split("/", 1)
        for path, modality in zip(group["sources"], group["modalities"], strict=True):
            images.append({"image": path, "modality": modality,
                           "name": f"{pair}/{modality}/{name}"})
    return images


def build_datalist(
    dataset_dir: str | Path, pairs: list[str] | None = None, datalist_file: str | None = None
) -> dict[str, list[dict]]:
    """``{"training": [...], "validation": [...]}``; read ``datalist_file`` instead when given."""
    if datalist_file:
        return json.loads(Path(datalist_file).read_text())
    return {key: build_images(dataset_dir, split, pairs) for key, split in SPLITS.items()}


def subsample(items: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` items spread evenly over the list (all pair types), or all."""
    if not limit or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: datalist.py DATASET_DIR OUTPUT_JSON")
    Path(sys.argv[2]).write_text(json.dumps(build_datalist(sys.argv[1]), indent=1))
