"""Standalone inference of the fusion bundle on a user's images or volumes (no ``medfusion``).

``configs/inference.json`` uses these pieces:

- :func:`inference_items`: the groups to fuse, from a MONAI-style datalist
  (``{"testing": [{"sources": ["mri.png", "pet.png"]}, ...]}``, reference first, paths relative
  to the datalist's folder) or from a folder of paired files ``DIR/<modality>/<name>``
  (an atlas-layout folder with ``splits.json`` gives its ``split``).
- :class:`LoadSourcesd`: 2D images are read as luminance (colour PET/SPECT keep their chroma to
  put back); NIfTI/NRRD/MHA volumes are read with MONAI's readers (nibabel, ITK), resampled onto
  the reference's grid (``ResampleToMatch``) and scaled to [0, 1] by their 0.5-99.5th percentiles.
- :class:`SliceWiseInferer`: volumes go through the 2D network slice by slice, in batches.
- :class:`SaveFusedd`: an 8-bit PNG (in colour when a source was) or a float32 volume with the
  reference's affine, written atomically.

Every problem with the inputs is a ``ValueError``/``FileNotFoundError`` with a one-line message,
and :func:`check_sources` finds it before the first group is fused, so nothing is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform
from PIL import Image

from scripts import colour
from scripts.atomic_files import atomic_output
from scripts.one_line_errors import check_not_constant

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # world axis (x, y, z) normal to the slices


def _suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suffix in (*VOLUME_SUFFIXES, *IMAGE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def _kind(path: str | Path) -> str:
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VOLUME_SUFFIXES:
        return "volume"
    raise ValueError(f"unsupported file type {suffix or '(none)'}: {path} (images: "
                     f"{', '.join(IMAGE_SUFFIXES)}; volumes: {', '.join(VOLUME_SUFFIXES)})")


def _item(sources: Sequence[str | Path], name: str | None, where: str) -> dict:
    """A checked group: at least two existing files of one kind."""
    if len(sources) < 2:
        raise ValueError(f"{where}: 'sources' needs a reference and at least one other file")
    paths = [str(p) for p in sources]
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{where}: file not found: {path}")
    kinds = {_kind(p) for p in paths}
    if len(kinds) != 1:
        raise ValueError(f"{where}: 2D images and 3D volumes cannot be fused together: {paths}")
    kind = kinds.pop()
    if not name:
        name = Path(paths[0]).name
    if kind == "image":
        name = str(Path(name).with_suffix(".png"))
    return {"sources": paths, "name": name}


def read_datalist(datalist: str | Path, key: str = "testing") -> list[dict]:
    """The groups of a MONAI-style datalist file (``{key: [{"sources": [...]}, ...]}``)."""
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"datalist {path} is not valid JSON: {error}") from None
    entries = content.get(key) if isinstance(content, dict) else content
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"datalist {path} has no '{key}' list of items "
                         f'(expected {{"{key}": [{{"sources": ["reference", "other"]}}]}})')
    base = path.parent
    items = []
    for index, entry in enumerate(entries):
        where = f"datalist {path}, item {index}"
        if isinstance(entry, list):
            entry = {"sources": entry}
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ValueError(f"{where}: expected {{\"sources\": [file, file, ...]}}, got {entry!r}")
        resolved = [s if os.path.isabs(s) else str(base / s) for s in sources]
        items.append(_item(resolved, entry.get("name"), where))
    return items


def paired_folder(dataset_dir: str | Path, modalities: Sequence[str] | None = None) -> list[dict]:
    """Groups of same-named files ``DIR/<modality>/<name>``; the first modality is the reference.

    ``modalities`` gives the order (default: the sub-folders in alphabetical order). A name that
    is missing from one of the modality folders is an error, not a silent skip.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir not found: {root}")
    folders = list(modalities) if modalities else sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(f"dataset_dir {root} needs two or more modality folders "
                         f"(DIR/<modality>/<name>), found {folders}")
    names: list[set[str]] = []
    for folder in folders:
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"modality folder not found: {root / folder}")
        names.append({p.name for p in (root / folder).iterdir()
                      if p.is_file() and not p.name.startswith(".")})
    common = set.intersection(*names)
    unpaired = sorted(set.union(*names) - common)
    if unpaired:
        raise ValueError(f"dataset_dir {root}: {len(unpaired)} file(s) not present in every "
                         f"modality folder {folders}, e.g. {unpaired[0]}")
    if not common:
        raise ValueError(f"dataset_dir {root} has no files to fuse")
    return [_item([root / folder / name for folder in folders], name, f"dataset_dir {root}")
            for name in sorted(common)]


def inference_items(
    datalist: str = "",
    dataset_dir: str = "",
    modalities: Sequence[str] | None = None,
    split: str = "validation",
    pairs: Sequence[str] | None = None,
    limit: int = 0,
    key: str = "testing",
) -> list[dict]:
    """The groups to fuse: from ``datalist``, else from ``dataset_dir`` (see the module doc)."""
    if datalist:
        items = read_datalist(datalist, key)
    elif dataset_dir:
        if (Path(dataset_dir) / "splits.json").is_file():  # the atlas layout of the training data
            from scripts.datalist import build_groups

            items = build_groups(dataset_dir, split, list(pairs) if pairs else None)
        else:
            items = paired_folder(dataset_dir, modalities)
    else:
        raise ValueError("nothing to fuse: give --datalist FILE.json or --dataset_dir DIR")
    names = [item["name"] for item in items]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two items would write the same output {duplicate!r}: give them "
                         "distinct 'name's in the datalist")
    if limit and limit < len(items):
        step = len(items) / limit
        items = [items[int(i * step)] for i in range(limit)]
    check_sources(items)
    return items


def check_sources(items: Sequence[dict]) -> None:
    """Read every source once, one at a time, and refuse the run on the first bad one.

    Why: the evaluator reads a group only when it fuses it, so a bad later group (a constant
    PET, an unreadable volume) stopped the run after earlier groups had been written, with
    ignite's two tracebacks in the log. Checked here, a bad input is refused before anything
    is written. Images are read whole (cheap: also their sizes); volumes one at a time and
    let go (bounded memory; they are read again when fused).
    """
    loader = LoadSourcesd()
    for item in items:
        sources = [str(p) for p in item["sources"]]
        if _kind(sources[0]) == "image":
            loader._images(dict(item), sources)
        else:
            for path in sources:
                _read_volume(path)


def _read_image(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """8/16-bit image -> (luminance (H, W) in [0, 1], chroma (H, W, 2) or None for grey)."""
    try:
        with Image.open(path) as img:
            if img.mode in ("L", "I;16", "I", "F", "P", "LA"):
                if img.mode in ("P", "LA"):
                    img = img.convert("RGB") if img.mode == "P" else img.convert("L")
                if img.mode != "RGB":
                    arr = np.asarray(img, dtype=np.float32)
                    top = 65535.0 if img.mode in ("I;16", "I") else 255.0
                    return np.clip(arr / top, 0.0, 1.0), None
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    if not colour.is_colour(rgb):
        return rgb[..., 0].copy(), None
    ycbcr = colour.rgb_to_ycbcr(rgb)
    return np.clip(ycbcr[..., 0], 0.0, 1.0), ycbcr[..., 1:]


def _read_volume(path: str) -> torch.Tensor:
    """A checked single-channel 3D volume (1, X, Y, Z) as float32, with its affine (MONAI's
    ``LoadImage``: nibabel, ITK)."""
    from monai.transforms import LoadImage

    try:
        volume = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as error:  # MONAI's readers raise many kinds
        raise ValueError(f"cannot read volume {path}: {error}") from None
    if volume.shape[0] != 1 or volume.ndim != 4:
        raise ValueError(f"{path} is not a single-channel 3D volume "
                         f"(shape {tuple(volume.shape)})")
    if not torch.isfinite(volume).all():
        raise ValueError(f"{path} has NaN or infinite voxels")
    check_not_constant(volume, path)
    return volume.float()


def _slice_axis(affine: np.ndarray, axis: str) -> int:
    """The voxel axis whose direction is closest to the world axis normal to ``axis`` slices."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {sorted(AXES)}, got {axis!r}")
    directions = np.abs(np.asarray(affine, dtype=np.float64)[:3, :3])
    directions /= np.maximum(directions.sum(axis=0, keepdims=True), 1e-12)
    return int(np.argmax(directions[AXES[axis]]))


class LoadSourcesd(MapTransform):
    """Load ``sources`` into ``image``: (K, H, W) for images, (K, B, A, S) for volumes.

    Volumes are moved so that the slices (``axis``) are the last dimension, and each slice's
    rows run along the later of its two voxel axes (B of the volume's A, B), as MedFusion's core
    slices volumes (SimpleITK's (z, y, x) arrays), so both fuse the same slices; ``slice_axis``,
    ``affine`` (the reference's) and ``reference`` let :class:`SaveFusedd` write the result on
    the reference's grid. Images keep their chroma in ``chroma`` (2, H, W) when a source is in
    colour (``has_colour`` 1).
    """

    def __init__(self, axis: str = "axial", sources_key: str = "sources",
                 lower: float = 0.5, upper: float = 99.5) -> None:
        super().__init__(keys=[sources_key])
        self.axis, self.sources_key, self.lower, self.upper = axis, sources_key, lower, upper

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        sources = [str(p) for p in d[self.sources_key]]  # type: ignore[union-attr]
        if _kind(sources[0]) == "image":
            return self._images(d, sources)
        return self._volumes(d, sources)

    def _images(self, d: dict, sources: list[str]) -> dict:
        planes, chromas = zip(*(_read_image(p) for p in sources), strict=True)
        for plane, path in zip(planes, sources, strict=True):
            check_not_constant(plane, path)
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            raise ValueError(f"sources of {d.get('name', sources[0])} differ in size: "
                             f"{sorted(shapes)}")
        coloured = [c for c in chromas if c is not None]
        d["image"] = torch.from_numpy(np.stack(planes).astype(np.float32))
        height, width = planes[0].shape
        if coloured:
            d["chroma"] = torch.from_numpy(np.moveaxis(colour.merge_chroma(coloured), -1, 0).copy())
        else:
            d["chroma"] = torch.full((2, height, width), 0.5)
        d["has_colour"] = 1 if coloured else 0
        d["slice_axis"] = -1
        d["affine"] = torch.eye(4, dtype=torch.float64)
        d["reference"] = sources[0]
        return d

    def _volumes(self, d: dict, sources: list[str]) -> dict:
        from monai.transforms import ResampleToMatch, ScaleIntensityRangePercentiles

        scale = ScaleIntensityRangePercentiles(self.lower, self.upper, 0.0, 1.0, clip=True)
        volumes = [_read_volume(path) for path in sources]
        reference = volumes[0]
        others = [v if v.shape == reference.shape and torch.allclose(v.affine, reference.affine)
                  else ResampleToMatch(mode="bilinear", padding_mode="zeros")(v, reference)
                  for v in volumes[1:]]
        scaled = [scale(v) for v in [reference, *others]]
        stacked = torch.cat([_plain(v).float() for v in scaled])  # (K, X, Y, Z)
        axis = _slice_axis(reference.affine.numpy(), self.axis)
        # slices last; each slice's rows along the later of its two voxel axes, as MedFusion's
        # core slices SimpleITK's (z, y, x) arrays (the network is not transpose-invariant:
        # the other way round, the two fused the same volume differently, by up to 0.5)
        d["image"] = torch.movedim(stacked, 1 + axis, -1).transpose(1, 2).contiguous()
        d["chroma"] = torch.zeros(1)
        d["has_colour"] = 0
        d["slice_axis"] = axis
        d["affine"] = _plain(reference.affine).to(torch.float64)
        d["reference"] = sources[0]
        return d


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor (the affine is kept separately)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


class SliceWiseInferer:
    """Run a 2D ``inferer`` on (B, K, H, W) batches, or slice by slice on (B, K, A, B, S) volumes.

    ``slice_batch`` slices go through the network at once, so memory stays bounded whatever the
    number of slices.
    """

    def __init__(self, inferer: Callable, slice_batch: int = 16) -> None:
        self.inferer, self.slice_batch = inferer, max(1, int(slice_batch))

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        if inputs.dim() == 4:
            return self.inferer(inputs, network, *args, **kwargs)
        if inputs.dim() != 5:
            raise ValueError(f"expected (B, K, H, W) or (B, K, A, B, S) inputs, got "
                             f"{tuple(inputs.shape)}")
        outputs = []
        for volume in inputs:  # (K, A, B, S)
            slices = torch.movedim(volume, -1, 0)  # (S, K, A, B)
            fused = [self.inferer(slices[i:i + self.slice_batch], network, *args, **kwargs)
                     for i in range(0, slices.shape[0], self.slice_batch)]
            outputs.append(torch.movedim(torch.cat(fused)[:, 0], 0, -1)[None])  # (1, A, B, S)
        return torch.stack(outputs)


class SaveFusedd(MapTransform):
    """Write ``pred`` as ``output_dir/<name>``: an 8-bit PNG, or a float32 volume on the grid of
    the reference (its affine: origin, spacing, direction). Written to a temporary file and
    renamed, so a failed or interrupted run leaves no half-written output."""

    def __init__(self, output_dir: str, pred_key: str = "pred", name_key: str = "name") -> None:
        super().__init__(keys=[pred_key])
        self.output_dir, self.pred_key, self.name_key = Path(output_dir), pred_key, name_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        pred = torch.as_tensor(d[self.pred_key]).detach().float().cpu().clamp(0.0, 1.0)
        target = self.output_dir / str(d.get(self.name_key) or "fused.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(target, _suffix(target)) as temporary:  # same (double) suffix
            if int(d.get("slice_axis", -1)) < 0:
                self._write_image(d, pred[0].numpy(), temporary)
            else:
                self._write_volume(d, pred[0], temporary)
        d["fused_path"] = str(target)
        return d

    @staticmethod
    def _write_image(d: dict, luminance: np.ndarray, path: Path) -> None:
        if int(d.get("has_colour", 0)):
            chroma = np.moveaxis(torch.as_tensor(d["chroma"]).cpu().numpy(), 0, -1)
            pixels = colour.ycbcr_to_rgb(np.concatenate([luminance[..., None], chroma], -1))
        else:
            pixels = luminance
        Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8)).save(path, format="PNG")

    @staticmethod
    def _write_volume(d: dict, fused: torch.Tensor, path: Path) -> None:
        from monai.data.image_writer import resolve_writer

        axis = int(d["slice_axis"])
        array = torch.movedim(fused.transpose(0, 1), -1, axis).numpy().astype(np.float32)
        # (back to (X, Y, Z))
        affine = torch.as_tensor(d["affine"]).cpu().numpy()
        suffix = _suffix(path).lstrip(".")
        errors = []
        for writer_class in resolve_writer(suffix):
            try:
                writer = writer_class(output_dtype=np.float32)
                writer.set_data_array(array, channel_dim=None)
                writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
                writer.write(str(path), verbose=False)
                return
            except Exception as error:  # try the next writer MONAI offers for this format
                errors.append(f"{writer_class.__name__}: {error}")
        raise ValueError(f"cannot write {path.name}: " + "; ".join(errors))
