"""The atlas ``splits.json`` read and checked: which groups a split holds.

Shared by MedFusion's two bundles (``sesf_bundle/scripts/splits.py`` is a link to this file;
wheel, Slicer install and bundle copies take its content), so both read the same groups and
refuse the same mistakes: an unknown split or pair type is an error naming what the file has,
never an empty run that ends in success.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def split_entries(
    dataset_dir: str | Path, split: str, pairs: Sequence[str] | str | None = None
) -> list[tuple[str, list[str], str]]:
    """``(pair, modalities, file name)`` of every group of ``split`` (``"train"`` or
    ``"validation"``) in ``dataset_dir/splits.json``, of the pair types ``pairs`` (all when
    empty). FileNotFoundError or ValueError (one line) when the file, a pair or the split is
    not there."""
    root = Path(dataset_dir)
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        raise FileNotFoundError(f"no splits.json in dataset_dir {root}")
    try:
        spec = json.loads(splits_file.read_text())["pairs"]
        known = sorted(spec)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{splits_file} is not an atlas splits file (JSON with a 'pairs' "
                         "table)") from None
    wanted = [pairs] if isinstance(pairs, str) else list(pairs or ())
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"pair type(s) {', '.join(unknown)} not in {splits_file} (it has "
                         f"{', '.join(known)})")
    entries = []
    for pair in known:
        if wanted and pair not in wanted:
            continue
        info = spec[pair]
        if split not in info:
            splits = sorted(k for k in info if k != "modalities")
            raise ValueError(f"no split {split!r} for {pair} in {splits_file} (it has "
                             f"{', '.join(splits)})")
        entries += [(pair, list(info["modalities"]), name) for name in info[split]]
    return entries
