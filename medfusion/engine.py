"""The fusion engine: fuse 2D images or 3D volumes with any registered method.

- :func:`fuse_images`: 2D greyscale or colour images of one size. Colour inputs are fused
  through their luminance Y (BT.601) and their chroma is put back (see
  :func:`medfusion.color.merge_chroma` for several colour inputs).
- :func:`fuse_volumes`: 3D volumes on any grids. Other inputs are resampled once onto the
  reference grid, then slices along the chosen patient axis are normalised per batch and fused
  in batches, written into one preallocated float32 output on the reference grid. Memory: the
  inputs (in their stored dtype), the output, one batch of float slices, and the method's
  working set for as many slices per call as fit ``MEDFUSION_MEMORY_BUDGET_MB`` (default 256;
  see :func:`slices_per_call`).
- :func:`fuse_files`: paths in, file out, for the command line and batch mode.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfusion import color, geometry, intensity
from medfusion.errors import CancelledError, GeometryError, InputError, OutputError
from medfusion.io import full_suffix, input_kind
from medfusion.methods import FusionMethod, get_method, resolve_device
from medfusion.methods.tiling import (  # noqa: F401 (public: the one budget)
    DEFAULT_MEMORY_BUDGET_MB,
    MEMORY_BUDGET_ENV,
    memory_budget_bytes,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
# on_batch(start, stop, sources (B, K, H, W), fused (B, H, W)): slices start..stop along the axis.
BatchCallback = Callable[[int, int, np.ndarray, np.ndarray], None]
CancelFlag = Callable[[], bool] | threading.Event | None

# the one memory budget of a method call, read in medfusion.methods.tiling (re-exported here)
# peak working memory of a classical method per source pixel (float32 copies and pyramids)
DEFAULT_BYTES_PER_SOURCE_PIXEL = 64.0


@dataclass
class FusedImage:
    """Result of :func:`fuse_images`.

    ``luminance``: (H, W) float32 [0, 1], the fused intensity; ``rgb``: (H, W, 3) float32 [0, 1]
    when an input was colour, else None; ``sources``: the normalised (K, H, W) luminance inputs
    (what the method saw, for metrics).
    """

    luminance: np.ndarray
    rgb: np.ndarray | None
    sources: np.ndarray
    decision_map: np.ndarray | None = None  # (H, W) uint8 1..K, with decision_map=True

    def to_uint8(self) -> np.ndarray:
        """8-bit image for saving: (H, W, 3) if colour, else (H, W); rounded, never wrapped."""
        from medfusion.io.images import to_uint8

        return to_uint8(self.rgb if self.rgb is not None else self.luminance)


# The description a volume decision map carries (NIfTI descrip; its space is the reference's)
DECISION_MAP_DESCRIPTION = "MedFusion decision map (labels 1..K: the source kept per voxel)"

# What the metrics score for a 2D result (said in their output): the image the user gets.
SCORED_IMAGE = ("the fused image as written (8-bit; for colour, the luminance Y of its RGB), "
                "against the sources' luminance as stored")


def luminance_for_scoring(samples: np.ndarray) -> np.ndarray:
    """Stored 2D samples (e.g. an 8-bit image as written or read) -> float64 [0, 1] luminance:
    scaled by the storage range, colour reduced to Y (BT.601). ``fuse --metrics`` and
    ``medfusion metrics`` score images through this one function, so they agree."""
    from medfusion.io.images import to_unit_range

    unit = to_unit_range(np.asarray(samples))
    if unit.ndim == 3:
        unit = color.luminance(unit) if color.is_colour(unit) else unit[..., 0]
    return np.asarray(unit, dtype=np.float64)


def _label(item: Any, index: int) -> str:
    if isinstance(item, (str, Path)):
        return Path(item).name
    return "reference" if index == 0 else f"input {index + 1}"


def _labels(items: Sequence[Any]) -> list[str]:
    """Each input's name in messages: its file name, or where inputs share a name (``A/3.png``
    and ``C/3.png``, as a batch of folders gives them) the shortest ends of their paths that
    tell them apart (one file given twice keeps its name: it is said to be fused with itself)."""
    labels = [_label(item, index) for index, item in enumerate(items)]
    for name in {label for label in labels if labels.count(label) > 1}:
        where = [index for index, label in enumerate(labels)
                 if label == name and isinstance(items[index], (str, Path))]
        paths = [Path(items[index]) for index in where]
        if len({path.resolve() for path in paths}) == len(paths):
            for index, tail in zip(where, _distinct_tails(paths), strict=True):
                labels[index] = tail
    return labels


def _is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _build_method(method: str | FusionMethod, device: str | Any, options: dict) -> FusionMethod:
    if isinstance(method, str):
        return get_method(method, device=device, **options)
    return method


def check_decision_method(fuse: FusionMethod) -> None:
    """A decision map needs a method that makes one (``fuse_with_decision``, e.g. sesf)."""
    if not callable(getattr(fuse, "fuse_with_decision", None)):
        raise InputError(f"method {getattr(fuse, 'name', fuse)} makes no decision map; "
                         "use --method sesf to save one")


def slices_per_call(fuse: FusionMethod, sources: int, height: int, width: int) -> int:
    """How many slices one method call gets so that its working set fits the memory budget.

    A method may declare ``bytes_per_source_pixel`` (its peak working memory per input pixel
    of one source, e.g. the CNN's activations); the default is that of the classical methods.
    At least one slice per call (a slice larger than the budget is the method's to tile, with
    the same budget: :mod:`medfusion.methods.tiling`).
    """
    per_pixel = float(getattr(fuse, "bytes_per_source_pixel", DEFAULT_BYTES_PER_SOURCE_PIXEL))
    per_slice = max(1.0, per_pixel * sources * height * width)
    return max(1, int(memory_budget_bytes() // per_slice))


def _run_method(fuse: FusionMethod, batch: np.ndarray, device, decision: list | None = None):
    """Run the method on a (B, K, H, W) float32 numpy batch; return (B, H, W) float32 numpy.

    The batch goes to the method in calls of :func:`slices_per_call` slices, so that a large
    batch of large slices does not hold the activations of all its slices at once (with the
    CNN at 512x512 and batch 16 that was over 5 GB). With a ``decision`` list, the method's
    (B, H, W) uint8 decision map is appended to it (one array for the whole batch).
    """
    import torch

    count = batch.shape[0]
    step = slices_per_call(fuse, *batch.shape[1:])
    out = np.empty((count, *batch.shape[2:]), np.float32)
    with torch.inference_mode():
        labels_parts = []
        for start in range(0, count, step):
            part = batch[start:start + step]
            tensor = torch.from_numpy(part).to(device, non_blocking=True)
            if decision is None:
                fused = fuse(tensor)
            else:
                fused, labels = fuse.fuse_with_decision(tensor)
                labels_parts.append(labels.to(torch.uint8).cpu().numpy())
            if tuple(fused.shape) != (part.shape[0], *part.shape[2:]):
                raise RuntimeError(
                    f"method {getattr(fuse, 'name', fuse)} returned shape {tuple(fused.shape)} "
                    f"for a batch of shape {part.shape}"
                )
            out[start:start + step] = fused.float().clamp(0.0, 1.0).cpu().numpy()
            del tensor, fused
    if decision is not None:
        decision.append(np.concatenate(labels_parts))
    return out


def fuse_images(
    inputs: Sequence[str | Path | np.ndarray],
    method: str | FusionMethod = "cnn",
    device: str | Any = "auto",
    normalisation: str | Sequence[str] = "none",
    ct_window: tuple[float, float] | None = None,
    decision_map: bool = False,
    **method_options: Any,
) -> FusedImage:
    """Fuse two or more co-registered 2D images of one size.

    ``inputs``: file paths, or arrays (H, W) / (H, W, 3) of uint8, uint16 or float in [0, 1]; the
    first is the reference. Colour inputs enter the method as their luminance; the result is
    colour when any input was colour (chroma put back, merged by saturation when several are).
    ``normalisation``: ``none`` by default (display-ready images; 8/16-bit scaled by their
    storage range), or any policy of :mod:`medfusion.intensity`, once or per input.
    ``decision_map=True`` also keeps the method's decision map (``FusedImage.decision_map``).
    """
    from medfusion.io.images import read_image, to_unit_range

    if len(inputs) < 2:
        raise InputError("give at least two images to fuse (a reference and one other)")
    labels = _labels(inputs)
    arrays = []
    for item, label in zip(inputs, labels, strict=True):
        array = read_image(item) if isinstance(item, (str, Path)) else np.asarray(item)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
            raise InputError(f"{label} has shape {array.shape}; expected (H, W) or (H, W, 3)")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        intensity.check_finite(array, label)
        arrays.append(array)
    geometry.check_same_dimensions([a.shape[:2] for a in arrays], labels)
    policies = intensity.policies_for(len(arrays), normalisation, ct_window)

    lumas, chromas = [], []
    for array, label, policy in zip(arrays, labels, policies, strict=True):
        if color.is_colour(array):
            ycbcr = color.rgb_to_ycbcr(to_unit_range(array))
            unit, raw = ycbcr[..., 0], ycbcr[..., 0]
            chromas.append(ycbcr[..., 1:])
        else:
            raw = array if array.ndim == 2 else array[..., 0]
            unit = to_unit_range(raw)
        # A CT window applies to the stored values (HU); every other policy to [0, 1] samples.
        values = raw if policy == "ct-window" else unit
        normaliser = intensity.fit_normaliser(values, policy, label=label, ct_window=ct_window)
        lumas.append(normaliser(values))

    sources = np.stack(lumas)  # (K, H, W)
    fuse = _build_method(method, device, method_options)
    decision = [] if decision_map else None
    if decision is not None:
        check_decision_method(fuse)
    fused = _run_method(fuse, sources[None], resolve_device(device), decision)[0]
    rgb = None
    if chromas:
        merged = color.merge_chroma(chromas)
        rgb = color.ycbcr_to_rgb(np.concatenate([fused[..., None], merged], axis=-1))
    labels = decision[0][0] if decision else None
    return FusedImage(luminance=fused, rgb=rgb, sources=sources, decision_map=labels)


def load_volumes(
    references: Sequence[Any], allow_slice_gaps: bool = False
) -> tuple[list, list[str]]:
    """Read paths (kept as they are for SimpleITK images); return images and labels.

    Every volume's geometry is checked (:func:`medfusion.geometry.check_geometry`);
    ``allow_slice_gaps`` lets DICOM series with missing slices through, restacked regularly.
    """
    from medfusion.io.volumes import read_volume

    images = []
    labels = _labels(references)
    for item, label in zip(references, labels, strict=True):
        if isinstance(item, (str, Path)):
            image = read_volume(item, allow_slice_gaps=allow_slice_gaps)
        else:
            image = item
            geometry.check_geometry(image, label)
        if image.GetDimension() != 3:
            raise InputError(f"{label} has {image.GetDimension()} dimensions; expected 3D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{label} is a colour/vector volume; give a scalar volume")
        images.append(image)
    return images, labels


def warn_frames_of_reference(references: Sequence[Any], labels: Sequence[str]) -> None:
    """Log a warning when DICOM series among ``references`` lie in different frames of
    reference (FrameOfReferenceUID). Why: fusion compares volumes in patient coordinates, and
    series from different frames (two scanners, two sessions) share them only if someone
    registered them; the content check of :func:`medfusion.registration.align_for_fusion`
    may still pass on a small shift. Folders are named by their label, or where two labels are
    the same (two folders called ``DICOM``) by the shortest ends of their paths that tell them
    apart (``a/DICOM``: the folders above may name the patient); the UIDs are not logged."""
    from medfusion.io.dicom_series import frame_of_reference

    folders = [(Path(item), label) for item, label in zip(references, labels, strict=True)
               if isinstance(item, (str, Path)) and Path(item).is_dir()]
    frames = [(folder, label, frame_of_reference(folder)) for folder, label in folders]
    if len({uid for _, _, uid in frames if uid}) < 2:
        return
    named = [label for _, label, _ in frames]
    tails = _distinct_tails([folder for folder, _, _ in frames])
    names = [label if named.count(label) == 1 else tail
             for (_, label, _), tail in zip(frames, tails, strict=True)]
    logger.warning(
        "%s lie in different DICOM frames of reference (FrameOfReferenceUID): their patient "
        "coordinates agree only if the series were registered; check the fused result or "
        "use --register rigid", " and ".join(names))


def _distinct_tails(paths: Sequence[Path]) -> list[str]:
    """Each path (folders, files) cut to its own fewest last parts that no other path ends
    with. The paths as given, made absolute but not resolved: a link's target folders (which
    may name the patient) never show, and no path gets more folders than it needs."""
    absolute = [Path(os.path.abspath(path)).parts for path in paths]
    tails = []
    for index, parts in enumerate(absolute):
        others = [other for number, other in enumerate(absolute) if number != index]
        count = 1
        while count < len(parts) and any(other[-count:] == parts[-count:] for other in others):
            count += 1
        tails.append(str(Path(*parts[-count:])))
    return tails


def fuse_volumes(
    reference: Any,
    others: Sequence[Any],
    method: str | FusionMethod = "cnn",
    axis: str = "axial",
    device: str | Any = "auto",
    batch_size: int = 16,
    normalisation: str | Sequence[str] = "percentile",
    ct_window: tuple[float, float] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag = None,
    on_batch: BatchCallback | None = None,
    allow_slice_gaps: bool = False,
    register: str = "none",
    check_alignment: bool = True,
    on_alignment: Callable[[Any], None] | None = None,
    decision_map: bool = False,
    **method_options: Any,
):
    """Fuse co-registered volumes slice by slice; return a float32 ``SimpleITK.Image`` in [0, 1]
    (with ``decision_map=True``: ``(fused, labels)``, labels a uint8 image 1..K on the same grid).

    ``reference`` and ``others``: paths (file or DICOM folder) or ``SimpleITK.Image``. The output
    has the reference's size, origin, spacing, direction and metadata dictionary. Other inputs
    on another grid are resampled onto it (logged); inputs that do not overlap it raise
    :class:`GeometryError`. ``axis``: ``axial``, ``coronal`` or ``sagittal`` in patient space.
    ``normalisation``: one policy for all inputs or one per input (see
    :mod:`medfusion.intensity`); ``ct_window`` (level, width) for ``ct-window``.
    ``progress(done, total)`` is called after each batch with slice counts; ``cancel`` (a
    callable or a ``threading.Event``) is checked before each batch and stops with
    :class:`CancelledError`. ``on_batch(start, stop, sources, fused)`` sees each batch's
    normalised sources and fused slices (e.g. to compute per-slice metrics while streaming).
    ``allow_slice_gaps``: accept DICOM series with missing slices (restacked on a regular grid).
    ``register`` (``none``, ``rigid``, ``affine``), ``check_alignment`` and ``on_alignment``:
    see :func:`medfusion.registration.align_for_fusion` (misaligned inputs are warned about).
    """
    import SimpleITK as sitk

    from medfusion import registration
    from medfusion.io.volumes import copy_metadata, writable_array_view

    if not others:
        raise InputError("give at least two volumes to fuse (a reference and one other)")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    images, labels = load_volumes([reference, *others], allow_slice_gaps=allow_slice_gaps)
    if register == "none":  # registered inputs are brought into one frame here
        warn_frames_of_reference([reference, *others], labels)
    policies = intensity.policies_for(len(images), normalisation, ct_window)
    torch_device = resolve_device(device)
    fuse = _build_method(method, torch_device, method_options)
    if decision_map:
        check_decision_method(fuse)
    slice_axis = geometry.slicing_axis(images[0], axis)

    ref_image = images[0]
    views, normalisers = [], []
    for index, (image, label, policy) in enumerate(zip(images, labels, policies, strict=True)):
        if _is_cancelled(cancel):
            raise CancelledError("fusion cancelled")
        if index > 0:
            image = registration.align_for_fusion(
                ref_image, image, label, kind=register, check=check_alignment,
                on_alignment=on_alignment)
            images[index] = image  # keep the resampled image alive while its view is used
        view = sitk.GetArrayViewFromImage(image)
        intensity.check_finite(view, label)
        normalisers.append(
            intensity.fit_normaliser(view, policy, label=label, ct_window=ct_window)
        )
        views.append(np.moveaxis(view, slice_axis, 0))

    output = sitk.Image(ref_image.GetSize(), sitk.sitkFloat32)
    output.CopyInformation(ref_image)
    copy_metadata(ref_image, output)
    out_view = np.moveaxis(writable_array_view(output), slice_axis, 0)
    labels = label_view = None
    if decision_map:
        labels = sitk.Image(ref_image.GetSize(), sitk.sitkUInt8)
        labels.CopyInformation(ref_image)
        copy_metadata(ref_image, labels, description=DECISION_MAP_DESCRIPTION)
        label_view = np.moveaxis(writable_array_view(labels), slice_axis, 0)

    total = out_view.shape[0]
    batch = np.empty((min(batch_size, total), len(views), *out_view.shape[1:]), np.float32)
    for start in range(0, total, batch_size):
        if _is_cancelled(cancel):
            raise CancelledError("fusion cancelled")
        stop = min(start + batch_size, total)
        chunk = batch[: stop - start]
        for k, (view, normaliser) in enumerate(zip(views, normalisers, strict=True)):
            chunk[:, k] = normaliser(view[start:stop])
        decision = [] if label_view is not None else None
        fused = _run_method(fuse, chunk, torch_device, decision)
        out_view[start:stop] = fused
        if decision:
            label_view[start:stop] = decision[0]
        if on_batch is not None:
            on_batch(start, stop, chunk, fused)
        if progress is not None:
            progress(stop, total)
    return (output, labels) if decision_map else output


def check_files(inputs: Sequence[str | Path], output: str | Path) -> str:
    """Cheap checks before any work; return the inputs' kind (``"image"`` or ``"volume"``).

    At least two inputs that exist, all 2D images or all 3D volumes; ``output`` in an existing
    folder, with an extension for that kind, and not one of the inputs.
    """
    from medfusion.io.atomic import check_not_an_input
    from medfusion.io.formats import check_contents_match_names, check_input_file, check_path_name
    from medfusion.io.images import check_image_output
    from medfusion.io.volumes import check_volume_output

    if len(inputs) < 2:
        raise InputError("give at least two inputs to fuse (a reference and one other)")
    for path in inputs:
        check_path_name(path)
        if not Path(path).exists():
            raise InputError(f"input not found: {path}")
    kinds = [input_kind(path) for path in inputs]
    if len(set(kinds)) > 1:
        check_contents_match_names(inputs)  # a PNG named .nii is no 2D/3D mix
        image = inputs[kinds.index("image")]
        volume = inputs[kinds.index("volume")]
        check_input_file(volume, folders_allowed=True)  # (a device or a FIFO is no volume)
        what = "a DICOM series folder" if Path(volume).is_dir() else "a 3D volume"
        raise GeometryError(
            f"cannot fuse a 2D image ({Path(image).name}) with {what} "
            f"({Path(volume).name}); give only 2D images or only 3D volumes"
        )
    target = check_not_an_input(output, inputs)
    if kinds[0] == "image":
        check_image_output(target)
    else:
        check_volume_output(target)
    return kinds[0]


def _warn_repeated_inputs(inputs: Sequence[str | Path]) -> None:
    """Say so when one file is given twice (or through a link): it is fused with itself."""
    seen: dict[Path, str] = {}
    for path in inputs:
        resolved = Path(path).resolve()
        if resolved in seen:
            logger.warning("%s and %s are the same file: it is fused with itself",
                           seen[resolved], Path(path).name)
        seen.setdefault(resolved, Path(path).name)


def fuse_files(
    inputs: Sequence[str | Path],
    output: str | Path,
    method: str | FusionMethod = "cnn",
    device: str | Any = "auto",
    normalisation: str | Sequence[str] | None = None,
    ct_window: tuple[float, float] | None = None,
    axis: str = "axial",
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag = None,
    on_batch: BatchCallback | None = None,
    allow_slice_gaps: bool = False,
    register: str = "none",
    check_alignment: bool = True,
    on_alignment: Callable[[Any], None] | None = None,
    decision_map: str | Path | None = None,
    **method_options: Any,
) -> FusedImage | Any:
    """Fuse files (all 2D images or all 3D volumes) and write the result atomically to ``output``
    (and the method's decision map, a label image/volume 1..K, to ``decision_map`` if given).

    Checks before any work that the inputs are of one kind, exist, and differ from ``output``,
    and that ``output`` has a matching extension in an existing folder. Returns the
    :class:`FusedImage` or the fused ``SimpleITK.Image``.
    """
    from medfusion.io.images import write_image
    from medfusion.io.volumes import write_volume

    kind = check_files(inputs, output)
    _warn_repeated_inputs(inputs)
    if decision_map is not None:
        if Path(decision_map).resolve() == Path(output).resolve():
            raise OutputError("the decision map and the fused output must be different files")
        check_files(inputs, decision_map)
        if full_suffix(decision_map) in (".jpg", ".jpeg"):
            raise OutputError("a decision map holds labels 1..K: save it as .png, .tif or .bmp, "
                              f"not {Path(decision_map).name} (JPEG is lossy: it would change "
                              "the labels)")
        if not isinstance(method, str):
            check_decision_method(method)
    target = Path(output)
    if kind == "image" and register != "none":
        raise InputError("--register applies to 3D volumes; 2D images carry no physical "
                         "geometry to register in (align them beforehand)")
    want_map = decision_map is not None
    if kind == "image":
        result = fuse_images(
            list(inputs), method=method, device=device, normalisation=normalisation or "none",
            ct_window=ct_window, decision_map=want_map, **method_options,
        )
        if progress is not None:
            progress(1, 1)
        write_image(target, result.to_uint8())
        if want_map:
            write_image(decision_map, result.decision_map)
        return result
    result = fuse_volumes(
        inputs[0], list(inputs[1:]), method=method, axis=axis, device=device,
        batch_size=batch_size, normalisation=normalisation or "percentile", ct_window=ct_window,
        progress=progress, cancel=cancel, on_batch=on_batch, allow_slice_gaps=allow_slice_gaps,
        register=register, check_alignment=check_alignment, on_alignment=on_alignment,
        decision_map=want_map,
        **method_options,
    )
    result, labels = result if want_map else (result, None)
    write_volume(target, result)
    if labels is not None:
        write_volume(decision_map, labels)
    return result
