"""3D volumes through SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders in; NIfTI, NRRD
or MHA out (atomically).

A DICOM folder must hold exactly one series; otherwise the error lists the series by description
and file count (never patient data). DICOM tags are not copied into the image's metadata
dictionary, so they cannot leak into NIfTI/NRRD headers of derived files.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medfusion.errors import InputError, OutputError
from medfusion.io import dicom_series, full_suffix
from medfusion.io.atomic import atomic_output
from medfusion.io.formats import (
    check_content_matches_name,
    check_input_file,
    check_nifti_data,
    format_name,
)

logger = logging.getLogger(__name__)

WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's own stderr warnings (we report what matters through logging)."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


# The ITK reader for each extension: SimpleITK never picks another one by content.
_IMAGE_IO = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO",
             ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO",
             ".dcm": "GDCMImageIO", ".png": "PNGImageIO", ".jpg": "JPEGImageIO",
             ".jpeg": "JPEGImageIO", ".tif": "TIFFImageIO", ".tiff": "TIFFImageIO",
             ".bmp": "BMPImageIO"}


def read_volume(path: str | Path, allow_slice_gaps: bool = False):
    """Read a 3D scalar volume (file or DICOM series folder) as a ``SimpleITK.Image``.

    The file read is the file named, whole, with the content its extension says (see
    :mod:`medfusion.io.formats`); NIfTI voxel data is checked raw for truncation and NaN/inf.
    A 2D file becomes a one-slice volume; a 4D file with one time point is squeezed; colour
    volumes are refused; the geometry must be usable (:func:`medfusion.geometry.check_geometry`).
    ``allow_slice_gaps``: a DICOM series with missing slices is restacked on a regular grid
    instead of refused. Raises :class:`InputError` with a one-line reason on failure.
    """
    import SimpleITK as sitk

    from medfusion.geometry import check_geometry

    source = check_input_file(path, folders_allowed=True)
    if source.is_dir():
        image = _read_dicom_folder(source, allow_slice_gaps)
    else:
        suffix = full_suffix(source)
        check_content_matches_name(source)
        if suffix in (".nii", ".nii.gz"):
            check_nifti_data(source)
        reader = sitk.ImageFileReader()
        reader.SetImageIO(_IMAGE_IO[suffix])
        reader.SetFileName(str(source))
        try:
            with _quiet_itk():
                image = reader.Execute()
        except RuntimeError as error:
            if "orthonormal direction cosines" in str(error):
                raise InputError(
                    f"cannot read volume {source.name}: its voxel axes are not orthogonal "
                    "(a sheared affine), which ITK cannot represent; resample it onto an "
                    "orthogonal grid first"
                ) from error
            raise InputError(
                f"cannot read volume {source.name}: corrupt, truncated or unsupported "
                f"{format_name(source)} file"
            ) from error
    image = _as_scalar_3d(image, source.name)
    check_geometry(image, source.name)
    return image


def _as_scalar_3d(image, label: str):
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{label} is a colour/vector volume; give a greyscale (scalar) volume")
    dimension = image.GetDimension()
    if dimension == 2:
        image = sitk.JoinSeries([image])
    elif dimension == 4:
        size = list(image.GetSize())
        if size[3] != 1:
            raise InputError(
                f"{label} is a 4D series with {size[3]} time points; give one 3D volume"
            )
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    elif dimension != 3:
        raise InputError(f"{label} has {dimension} dimensions; expected a 3D volume")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{label} holds complex voxels; give a real-valued volume")
    return image


def _series_label(reader_cls, files: list[str]) -> str:
    """'description' #number (N files), from the first file's header; no patient data."""
    reader = reader_cls()
    reader.SetFileName(files[0])
    description, number = "", ""
    try:
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            description = reader.GetMetaData("0008|103e").strip()
        if reader.HasMetaDataKey("0020|0011"):
            number = reader.GetMetaData("0020|0011").strip()
    except RuntimeError:
        pass
    parts = [f"'{description}'" if description else "(no description)"]
    if number:
        parts.append(f"#{number}")
    parts.append(f"({len(files)} files)")
    return " ".join(parts)


def _read_dicom_folder(folder: Path, allow_slice_gaps: bool = False):
    import SimpleITK as sitk

    with _quiet_itk():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"no DICOM series found in folder {folder.name}")
    series = {
        uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        for uid in series_ids
    }
    if len(series) > 1:
        labels = "; ".join(_series_label(sitk.ImageFileReader, files) for files in series.values())
        raise InputError(
            f"folder {folder.name} holds {len(series)} DICOM series ({labels}); "
            "put each series in its own folder and give one"
        )
    files = next(iter(series.values()))
    dicom_series.check_no_stray_files(folder, files)
    infos = dicom_series.read_slice_infos(files)
    dicom_series.check_consistent(infos, folder.name)
    restack = dicom_series.check_positions(infos, folder.name, allow_slice_gaps)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"cannot read the DICOM series in {folder.name}: corrupt or unsupported file"
        ) from error
    uneven = None if restack else dicom_series.uneven_spacing(infos)
    if restack or uneven:
        regular = dicom_series.restack_regularly(image, infos, folder.name)
        if uneven:
            logger.warning(
                "%s: uneven DICOM slice spacing (%.2f to %.2f mm; stacked evenly, a slice would "
                "be %.1f mm off its position): resampled onto a regular %.2f mm grid at the "
                "slices' real positions", folder.name, *uneven, regular.GetSpacing()[2],
            )
        return regular
    for key in list(image.GetMetaDataKeys()):
        image.EraseMetaData(key)
    return image


def check_volume_output(path: str | Path) -> None:
    """Raise OutputError unless the path has a writable volume extension."""
    suffix = full_suffix(path)
    if suffix == ".mhd":
        raise OutputError("MHD writes two files; save the result as .mha (one file) instead")
    if suffix not in WRITABLE_SUFFIXES:
        raise OutputError(
            f"a 3D result must be saved as {'/'.join(WRITABLE_SUFFIXES)}, not {Path(path).name}"
        )


def write_volume(path: str | Path, image) -> Path:
    """Write a SimpleITK image atomically (compressed where the format allows)."""
    import SimpleITK as sitk

    check_volume_output(path)
    name = Path(path).name

    def verify(written: Path) -> None:
        _check_written_volume(written, image, name)

    with atomic_output(path, verify=verify) as temporary, _quiet_itk():
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True)
        except RuntimeError as error:
            raise OutputError(f"cannot write {name}: {str(error).strip().splitlines()[-1]}") \
                from error
    return Path(path)


def _check_written_volume(written: Path, image, name: str) -> None:
    """Read the written file back (header and every voxel; ITK reports a full disk only on
    stderr); raise OutputError unless it is whole and has the image's size."""
    import SimpleITK as sitk

    try:
        if full_suffix(written) in (".nii", ".nii.gz"):
            check_nifti_data(written, OutputError)
        reader = sitk.ImageFileReader()
        reader.SetImageIO(_IMAGE_IO[full_suffix(written)])
        reader.SetFileName(str(written))
        with _quiet_itk():
            reader.ReadImageInformation()
            size = tuple(reader.GetSize())
            if full_suffix(written) not in (".nii", ".nii.gz"):
                reader.Execute()  # NRRD and MetaImage raise when their data is cut short
    except (RuntimeError, OutputError) as error:
        raise OutputError(f"{name} was not written completely (disk full?); nothing saved") \
            from error
    if size[:3] != tuple(image.GetSize())[:3]:
        raise OutputError(f"{name} was written with size {size}, not {image.GetSize()}")


def writable_array_view(image) -> np.ndarray:
    """Writable numpy view (z, y, x) of a scalar SimpleITK image's own pixel buffer.

    SimpleITK only offers read-only views; filling the image in place avoids a second full copy
    of a large output volume. The caller must keep ``image`` alive while using the view.
    """
    import SimpleITK as sitk

    read_only = sitk.GetArrayViewFromImage(image)  # makes the buffer unique first
    address = read_only.__array_interface__["data"][0]
    buffer = (ctypes.c_char * read_only.nbytes).from_address(address)
    return np.frombuffer(buffer, dtype=read_only.dtype).reshape(read_only.shape)


def copy_metadata(source, target) -> None:
    """Copy every metadata-dictionary entry of ``source`` onto ``target``."""
    for key in source.GetMetaDataKeys():
        target.SetMetaData(key, source.GetMetaData(key))
