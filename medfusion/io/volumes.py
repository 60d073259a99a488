"""3D volumes through SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders in; NIfTI, NRRD
or MHA out (atomically).

A DICOM folder must hold exactly one series; otherwise the error lists the series by description
and file count (never patient data). DICOM tags are not copied into the image's metadata
dictionary, so they cannot leak into NIfTI/NRRD headers of derived files.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medfusion.errors import InputError, OutputError
from medfusion.io import dicom_series, full_suffix
from medfusion.io.atomic import atomic_output
from medfusion.io.formats import (
    check_content_matches_name,
    check_data_file,
    check_input_file,
    check_nifti_data,
    format_name,
    nifti_space_codes,
    patch_nifti_header,
    short_write_cause,
    xform_name,
)

logger = logging.getLogger(__name__)

WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
_NIFTI = (".nii", ".nii.gz")

# One capture of file descriptor 2 at a time: two threads redirecting it at once would restore
# each other's buffer and lose the real stderr for good.
_STDERR_LOCK = threading.RLock()
_CAPTURED_BYTES = 1 << 16  # what a failed call printed is read this far at most


class LibraryMessages:
    """What ITK's C and C++ code printed on stderr during one :func:`_quiet_itk` block: its
    non-empty lines, filled in when the block ends (also when it raises)."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[str] = []


@contextlib.contextmanager
def _quiet_itk() -> Iterator[LibraryMessages]:
    """Run an ITK read or write without its messages reaching the user's stderr.

    Why not ``SimpleITK.ProcessObject.SetGlobalWarningDisplay(False)`` alone: it is set here
    too, but it silences only ITK's warning macros. niftilib prints with ``fprintf(stderr)``
    (``** ERROR: NWAD: wrote only 65184 of 3610516 bytes to file`` on a full disk) and MetaIO
    with ``std::cerr`` (``MetaImage: Read: Cannot open data file``), straight to file
    descriptor 2, and so does GDCM; redirecting Python's ``sys.stderr`` cannot catch them.
    So, for the duration of the block only, descriptor 2 is pointed at an in-memory file
    (``os.dup``/``os.dup2``; restored in ``finally``, also on KeyboardInterrupt). What was
    captured is handed to the caller as :class:`LibraryMessages`, which turns it into its
    one-line reason when the call failed, and is logged at debug level (``--verbose``), not
    shown, either way: MedFusion's own one-line message is what the user reads.

    Narrow on purpose: one ITK call per block, one block at a time in the process (a lock), so
    the window in which another thread's stderr output would also land in the debug log is
    that call. Where descriptor 2 cannot be duplicated (a process without one) nothing is
    captured and the call runs as before.
    """
    import SimpleITK as sitk

    messages = LibraryMessages()
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with _STDERR_LOCK, _captured_stderr(messages):
            yield messages
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


@contextlib.contextmanager
def _captured_stderr(messages: LibraryMessages) -> Iterator[None]:
    """Point file descriptor 2 at a memory file for the block; put its lines in ``messages``."""
    _flush_python_stderr()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        capture = _capture_file()
    except OSError:
        os.close(saved)
        yield
        return
    try:
        os.dup2(capture, 2)
        try:
            yield
        finally:
            _flush_python_stderr()
            os.dup2(saved, 2)
    finally:
        os.close(saved)
        messages.lines = _read_captured(capture)
        os.close(capture)
        for line in messages.lines:
            logger.debug("ITK: %s", line)


def _capture_file() -> int:
    """A file descriptor of an anonymous file: in memory where the system offers it (a full
    disk must not stop the capture), else an unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("medfusion-stderr")
        except OSError:
            pass
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


def _read_captured(descriptor: int) -> list[str]:
    os.lseek(descriptor, 0, os.SEEK_SET)
    data = os.read(descriptor, _CAPTURED_BYTES)
    text = data.decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _flush_python_stderr() -> None:
    """Flush Python's buffered stderr text to where it belongs before descriptor 2 moves."""
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


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
        if suffix in _NIFTI:
            check_nifti_data(source)
        check_data_file(source)
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
    if not source.is_dir() and full_suffix(source) in _NIFTI:
        _settle_space_codes(image, source)
        _warn_without_transform(image, source.name)
    return image


def _warn_without_transform(image, label: str) -> None:
    """Say so when a NIfTI declares no space at all (qform_code = sform_code = 0, as old
    Analyze conversions): ITK then places its voxels from their sizes alone, at the origin and
    unrotated, so its fusion with anything else is right only by chance."""
    if all(image.HasMetaDataKey(key) and image.GetMetaData(key).strip() == "0"
           for key in ("qform_code", "sform_code")):
        logger.warning("%s has no spatial transform (NIfTI qform_code and sform_code 0): its "
                       "voxels are placed from their sizes alone, at the origin; check that it "
                       "lies where the other inputs do", label)


def _ras_affine(image) -> np.ndarray:
    """Voxel-to-RAS matrix of a 3D image (ITK's geometry is LPS), as a NIfTI header has it."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _settle_space_codes(image, source: Path) -> None:
    """Make the dictionary's ``qform_code``/``sform_code`` those of the transform ITK placed
    the voxels by (:func:`medfusion.io.formats.nifti_space_codes`), so that writing them to a
    derived file declares the space its geometry is in."""
    if not (image.HasMetaDataKey("qform_code") and image.HasMetaDataKey("sform_code")):
        return
    try:
        codes = nifti_space_codes(source, _ras_affine(image))
    except Exception:  # nibabel raises many types for odd headers; ITK's codes then stay
        return
    for key, code in zip(("qform_code", "sform_code"), codes, strict=True):
        if image.GetMetaData(key).strip() != str(code):
            image.SetMetaData(key, str(code))
            image.SetMetaData(f"{key}_name", xform_name(code))


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
    tilt = dicom_series.gantry_tilt(infos)  # (slices shifted in their planes: always restacked)
    if restack or uneven or tilt:
        regular = dicom_series.restack_regularly(image, infos, folder.name, tilt)
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
    """Write a SimpleITK image atomically (compressed where the format allows).

    A NIfTI output declares the space its metadata dictionary names (``qform_code``,
    ``sform_code``: those of a NIfTI reference, see :func:`copy_metadata`) instead of ITK's
    fixed 1 (scanner anatomical), and millimetres with the reference's time unit in
    ``xyzt_units`` (:func:`_nifti_header_fields`). Without such entries (DICOM, NRRD or
    MetaImage references) the file is ITK's, as it writes it. A write that fails or comes out
    short raises a one-line :class:`OutputError` saying why where that can be told (file size
    limit, full disk); ITK's own messages never reach stderr.
    """
    check_volume_output(path)
    name = Path(path).name
    fields = _nifti_header_fields(image) if full_suffix(path) in _NIFTI else {}

    def verify(written: Path) -> None:
        _check_written_volume(written, image, name)

    with atomic_output(path, verify=verify) as temporary:
        if fields and full_suffix(path) == ".nii.gz":
            _write_patched_nifti_gz(image, temporary, fields, name)
        else:
            _itk_write(image, temporary, name)
            if fields:
                patch_nifti_header(temporary, fields)
    return Path(path)


# What ITK's NIfTI writer puts in these header fields whatever the metadata dictionary says.
_ITK_NIFTI_WRITES = {"qform_code": 1, "sform_code": 1, "xyzt_units": 2 | 8}
_UNITS_MM, _TIME_UNITS = 2, 0x38


def _nifti_header_fields(image) -> dict[str, int]:
    """NIfTI header fields to set after ITK wrote the file: the space codes of the image's
    dictionary (0..5) and ``xyzt_units`` (millimetres, as ITK's geometry always is, with the
    dictionary's time unit); only those that differ from what ITK writes."""
    wanted: dict[str, int] = {}
    for key in ("qform_code", "sform_code"):
        code = _int_entry(image, key)
        if code is not None and 0 <= code <= 5:
            wanted[key] = code
    units = _int_entry(image, "xyzt_units")
    if units is not None and 0 <= units <= 255:
        wanted["xyzt_units"] = _UNITS_MM | (units & _TIME_UNITS)
    return {key: value for key, value in wanted.items() if _ITK_NIFTI_WRITES[key] != value}


def _int_entry(image, key: str) -> int | None:
    if not image.HasMetaDataKey(key):
        return None
    try:
        return int(image.GetMetaData(key).strip())
    except ValueError:
        return None


def _itk_write(image, temporary: Path, name: str) -> None:
    """``SimpleITK.WriteImage`` with its stderr captured; a failure is a one-line OutputError."""
    import SimpleITK as sitk

    with _quiet_itk() as messages:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True)
            failure = None
        except RuntimeError as error:
            failure = error
    if failure is not None:
        cause = short_write_cause(temporary)
        if cause is None:
            lines = str(failure).strip().splitlines() or messages.lines or ["ITK failed"]
            cause = lines[-1].strip()
        raise OutputError(f"cannot write {name}: {cause}; nothing saved") from failure


def _write_patched_nifti_gz(image, temporary: Path, fields: dict[str, int], name: str) -> None:
    """A ``.nii.gz`` whose header needs ``fields``: ITK writes it uncompressed beside the
    target (its header can only be patched there), the patched file is gzip-compressed into
    ``temporary`` (level 6, as ITK's), and the uncompressed one is removed."""
    handle, plain_name = tempfile.mkstemp(prefix=temporary.name[: -len(".nii.gz")] + ".",
                                          suffix=".nii", dir=temporary.parent)
    os.close(handle)
    plain = Path(plain_name)
    try:
        _itk_write(image, plain, name)
        _check_written_volume(plain, image, name)
        patch_nifti_header(plain, fields)
        with open(plain, "rb") as source, open(temporary, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6,
                              mtime=0) as compressed:
            shutil.copyfileobj(source, compressed, 1 << 24)
    finally:
        plain.unlink(missing_ok=True)


def _check_written_volume(written: Path, image, name: str) -> None:
    """Read the written file back (header and every voxel; ITK reports a full disk only on
    stderr); raise OutputError unless it is whole and has the image's size. The message says
    why the file is short where that can be told (:func:`short_write_cause`)."""
    import SimpleITK as sitk

    try:
        if full_suffix(written) in _NIFTI:
            check_nifti_data(written, OutputError)
        reader = sitk.ImageFileReader()
        reader.SetImageIO(_IMAGE_IO[full_suffix(written)])
        reader.SetFileName(str(written))
        with _quiet_itk():
            reader.ReadImageInformation()
            size = tuple(reader.GetSize())
            if full_suffix(written) not in _NIFTI:
                reader.Execute()  # NRRD and MetaImage raise when their data is cut short
    except (RuntimeError, OutputError) as error:
        cause = short_write_cause(written)
        if cause is not None:
            raise OutputError(f"cannot write {name}: {cause}; nothing saved") from error
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


# NIfTI header fields ITK's reader puts in the metadata dictionary that describe how the
# reference *file* stored its voxels (type, scaling, sizes, its transforms' numbers, slice
# timing): false for an image derived from it, whose own ITK writes anew from its geometry.
_NIFTI_FILE_FIELDS = frozenset({
    "ITK_original_direction", "ITK_original_spacing", "ITK_sform_corrected", "aux_file",
    "bitpix", "cal_max", "cal_min", "datatype", "dim_info", "intent_code", "intent_name",
    "intent_p1", "intent_p2", "intent_p3", "nifti_type", "qfac", "qoffset_x", "qoffset_y",
    "qoffset_z", "qto_xyz", "quatern_b", "quatern_c", "quatern_d", "scl_inter", "scl_slope",
    "slice_code", "slice_duration", "slice_end", "slice_start", "srow_x", "srow_y", "srow_z",
    "toffset", "vox_offset",
})
_NIFTI_INDEXED_FIELD = re.compile(r"(pixdim|dim)\[\d\]")
_DESCRIPTION_KEYS = ("ITK_FileNotes", "descrip")  # ITK writes NIfTI descrip from the first
_UNPRINTABLE = "[UNKNOWN_PRINT_CHARACTERISTICS]"  # SimpleITK's text for non-string entries
FUSION_DESCRIPTION = "MedFusion fusion (derived image; research use only)"


def copy_metadata(source, target, description: str = FUSION_DESCRIPTION) -> None:
    """Copy ``source``'s metadata dictionary onto ``target``, an image derived from it on the
    same grid (the fused output on the reference's grid).

    Kept: the entries that say what space the voxels are in, among them a NIfTI reference's
    ``qform_code``/``sform_code`` (with their names; :func:`write_volume` writes them, so an
    MNI template's fusion stays in MNI space) and ``xyzt_units``, and every entry that is not
    a NIfTI header field (the caller's own). Left out: the NIfTI fields that describe the
    reference file's own storage (:data:`_NIFTI_FILE_FIELDS`, ``dim[i]``, ``pixdim[i]``) and
    entries SimpleITK cannot print as text. A description (``descrip``, ITK's
    ``ITK_FileNotes``) becomes ``description``: the reference's describes the reference
    (dcm2niix puts its echo and acquisition times there), not the derived image. A source
    without one gets none (DICOM-read images have an empty dictionary, and so has the copy).
    """
    described = False
    for key in source.GetMetaDataKeys():
        if key in _DESCRIPTION_KEYS:
            described = True
            continue
        if key in _NIFTI_FILE_FIELDS or _NIFTI_INDEXED_FIELD.fullmatch(key):
            continue
        value = source.GetMetaData(key)
        if value.strip() == _UNPRINTABLE:
            continue
        target.SetMetaData(key, value)
    if described:
        for key in _DESCRIPTION_KEYS:
            target.SetMetaData(key, description)
