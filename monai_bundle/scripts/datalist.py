"""Datalist of co-registered groups, built from the atlas ``splits.json``.

A group is ``{"sources": [path, ...], "target": path (optional), "pair": str, "name": str}``
(MONAI datalist style: list of dicts). Usage as a script writes the datalist JSON::

    python monai_bundle/scripts/datalist.py ../shared/data/aanlib datalist.json
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
    """Groups of one split (``"train"`` or ``"validation"``) of ``dataset_dir/splits.json``."""
    root = Path(dataset_dir)
    return [{"sources": [str(root / pair / modality / name) for modality in modalities],
             "pair": pair, "name": f"{pair}/{name}"}
            for pair, modalities, name in split_entries(root, split, pairs)]


def build_datalist(
    dataset_dir: str | Path, pairs: list[str] | None = None, datalist_file: str | None = None
) -> dict[str, list[dict]]:
    """``{"training": [...], "validation": [...]}``; read ``datalist_file`` instead when given."""
    if datalist_file:
        return json.loads(Path(datalist_file).read_text())
    return {key: build_groups(dataset_dir, split, pairs) for key, split in SPLITS.items()}


def subsample(groups: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` groups spread evenly over the list (all pair types), or all."""
    if not limit or limit >= len(groups):
        return groups
    step = len(groups) / limit
    return [groups[int(i * step)] for i in range(limit)]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: datalist.py DATASET_DIR OUTPUT_JSON")
    Path(sys.argv[2]).write_text(json.dumps(build_datalist(sys.argv[1]), indent=1))
