"""Find the co-registered groups a benchmark runs on.

A *group* is two or more co-registered sources of one subject (an MRI slice and its CT slice, a
T1 volume and its PET volume). Three ways to point the benchmark at groups:

- a folder in the aanlib layout ``<PAIR>/<MODALITY>/<name>.<ext>``: files that share a name
  across the modality folders of one pair type form a group. An optional ``splits.json`` in the
  folder (``{"pairs": {PAIR: {"modalities": [...], "<split>": [names]}}}``) selects a split and
  fixes the modality order;
- a CSV file with a header: optional ``id``, ``pair_type`` and ``split`` columns, every other
  column is a modality whose cells are source paths (relative to the CSV's folder; empty cells are
  skipped);
- a JSON file: a list (or ``{"groups": [...]}``) of objects ``{"id", "pair_type", "split",
  "sources": {MODALITY: path}}``.

2D images (PNG, JPEG, TIFF, BMP) and 3D volumes (NIfTI, NRRD, MHA/MHD, DICOM series folders in a
CSV/JSON list) are told apart by the file name; one group holds only one kind.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from medfusion.errors import InputError
from medfusion.io import IMAGE_SUFFIXES, VOLUME_SUFFIXES, full_suffix, stem

SPLIT_FILE_NAME = "splits.json"
_RESERVED_COLUMNS = ("id", "pair_type", "split")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """Co-registered sources of one subject, fused together and scored as one item."""

    group_id: str
    pair_type: str
    modalities: tuple[str, ...]
    paths: tuple[Path, ...]
    kind: str  # "image" (2D) or "volume" (3D)

    @property
    def label(self) -> str:
        """A short unique name for tables and figures: ``PAIR/id``."""
        return f"{self.pair_type}/{self.group_id}"


def source_kind(path: Path) -> str | None:
    """Return ``"image"`` or ``"volume"`` (a DICOM series folder counts as a volume), or None."""
    if path.is_dir():
        return "volume"
    suffix = full_suffix(path)
    if suffix in VOLUME_SUFFIXES:
        return "volume"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    return None


def _make_group(
    group_id: str, pair_type: str | None, sources: Mapping[str, Path], where: str
) -> Group:
    """Check one group's sources (>= 2, existing, one kind) and build it."""
    if len(sources) < 2:
        raise InputError(f"{where}: group {group_id!r} has {len(sources)} source(s), needs >= 2")
    kinds = set()
    for modality, path in sources.items():
        if not path.exists():
            raise InputError(f"{where}: group {group_id!r}: {modality} file not found: {path}")
        kind = source_kind(path)
        if kind is None:
            raise InputError(f"{where}: group {group_id!r}: unsupported file type: {path.name}")
        kinds.add(kind)
    if len(kinds) != 1:
        raise InputError(f"{where}: group {group_id!r} mixes 2D images and 3D volumes")
    modalities = tuple(sources)
    return Group(
        group_id=group_id,
        pair_type=pair_type or "-".join(modalities),
        modalities=modalities,
        paths=tuple(sources.values()),
        kind=kinds.pop(),
    )


def _read_split_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read split file {path}: {error}") from error
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, dict):
        raise InputError(f"split file {path} has no 'pairs' object")
    return pairs


def _folder_groups(root: Path, split: str | None, split_file: Path | None) -> list[Group]:
    """Groups of an aanlib-style folder, optionally restricted to one split."""
    split_path = split_file or (root / SPLIT_FILE_NAME)
    split_info = _read_split_file(split_path) if split_path.is_file() else None
    if split is not None and split_info is None:
        raise InputError(f"--split {split} given but no split file at {split_path}")
    groups: list[Group] = []
    for pair_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        pair_type = pair_dir.name
        modality_dirs = {p.name: p for p in sorted(pair_dir.iterdir()) if p.is_dir()}
        info = (split_info or {}).get(pair_type)
        if info is not None and info.get("modalities"):
            order = [m for m in info["modalities"] if m in modality_dirs]
        else:
            order = sorted(modality_dirs)
        if len(order) < 2:
            continue
        files = {
            m: {p.name: p for p in modality_dirs[m].iterdir() if p.is_file() and source_kind(p)}
            for m in order
        }
        names = set.intersection(*(set(f) for f in files.values()))
        unpaired = sorted(set.union(*(set(f) for f in files.values())) - names)
        if unpaired and split is None:  # (a split names the files it uses)
            logger.warning(
                "%s: %d file(s) not in every modality folder, left out: %s%s", pair_type,
                len(unpaired), ", ".join(unpaired[:3]), " ..." if len(unpaired) > 3 else "")
        if split is not None:
            if info is None:
                continue
            if split not in info:
                known = sorted(k for k in info if k != "modalities")
                raise InputError(f"split {split!r} not in {split_path} for {pair_type} ({known})")
            wanted = list(info[split])
            missing = [n for n in wanted if n not in names]
            if missing:
                raise InputError(
                    f"{split_path}: {pair_type} {split} lists {len(missing)} file(s) that are "
                    f"not in every modality folder, e.g. {missing[0]}"
                )
            names = set(wanted)
        for name in sorted(names):
            sources = {m: files[m][name] for m in order}
            groups.append(_make_group(stem(name), pair_type, sources, str(root)))
    return groups


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _csv_groups(path: Path, split: str | None) -> list[Group]:
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"cannot read group list {path}: {error}") from error
    records = []
    for number, row in enumerate(rows, start=2):
        sources = {
            k.strip(): v.strip()
            for k, v in row.items()
            if k and k.strip() not in _RESERVED_COLUMNS and v and v.strip()
        }
        records.append(
            {
                "id": (row.get("id") or "").strip() or f"row{number}",
                "pair_type": (row.get("pair_type") or "").strip() or None,
                "split": (row.get("split") or "").strip() or None,
                "sources": sources,
            }
        )
    return _records_to_groups(records, path, split)


def _json_groups(path: Path, split: str | None) -> list[Group]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read group list {path}: {error}") from error
    if isinstance(data, dict):
        data = data.get("groups")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of groups or {{'groups': [...]}}")
    for index, record in enumerate(data):
        if not isinstance(record, dict) or not isinstance(record.get("sources"), dict):
            raise InputError(f"{path}: group #{index} has no 'sources' object")
    return _records_to_groups(data, path, split)


def _records_to_groups(records: Iterable[dict], path: Path, split: str | None) -> list[Group]:
    base = path.parent
    groups = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        if split is not None and record.get("split") != split:
            continue
        group_id = str(record.get("id") or f"group{index}")
        sources = {str(m): _resolve(base, str(p)) for m, p in record["sources"].items()}
        group = _make_group(group_id, record.get("pair_type"), sources, str(path))
        if group.label in seen:
            raise InputError(f"{path}: duplicate group {group.label!r}")
        seen.add(group.label)
        groups.append(group)
    return groups


def discover_groups(
    dataset: str | Path, split: str | None = None, split_file: str | Path | None = None
) -> list[Group]:
    """Return the dataset's groups, sorted by pair type then id.

    Raises :class:`InputError` when the dataset is missing, unreadable, or holds no group.
    """
    root = Path(dataset).expanduser()
    if not root.exists():
        raise InputError(f"dataset not found: {root}")
    if root.is_dir():
        groups = _folder_groups(root, split, Path(split_file) if split_file else None)
    elif root.suffix.lower() == ".csv":
        groups = _csv_groups(root, split)
    elif root.suffix.lower() == ".json":
        groups = _json_groups(root, split)
    else:
        raise InputError(f"dataset must be a folder, a .csv or a .json list: {root}")
    if not groups:
        where = f" (split {split!r})" if split else ""
        raise InputError(
            f"no co-registered groups found in {root}{where}: expected "
            "<PAIR>/<MODALITY>/<name>.png folders or a CSV/JSON list of groups"
        )
    return sorted(groups, key=lambda g: (g.pair_type, g.group_id))


def select_subset(groups: list[Group], size: int, seed: int) -> list[Group]:
    """A fixed, seeded subset of about ``size`` groups, spread over the pair types.

    Each pair type gets a share proportional to its count (at least one), so small pair types
    still appear in the studies that run on a subset.
    """
    import numpy as np

    if size <= 0 or size >= len(groups):
        return list(groups)
    by_type: dict[str, list[Group]] = {}
    for group in groups:
        by_type.setdefault(group.pair_type, []).append(group)
    rng = np.random.default_rng(seed)
    chosen: list[Group] = []
    for pair_type in sorted(by_type):
        members = by_type[pair_type]
        share = max(1, round(size * len(members) / len(groups)))
        picks = rng.choice(len(members), size=min(share, len(members)), replace=False)
        chosen.extend(members[i] for i in sorted(picks))
    return sorted(chosen, key=lambda g: (g.pair_type, g.group_id))
