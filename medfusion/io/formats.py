"""Is the file the one named, whole, with the content its name says?

SimpleITK picks a reader by content and resolves names on its own (``a.nii.gz`` missing, it reads
``a.nii``), and its NIfTI reader fills a file cut short with zeros and reads NaN as 0. These
checks run before (inputs) and after (outputs) SimpleITK or PIL touch a file:

- :func:`check_path_name`: every name within the file system's limits (one-line error instead of
  an ``ENAMETOOLONG`` traceback).
- :func:`check_content_matches_name`: the first bytes are those of the format the extension says
  (a PNG renamed ``.nii`` or a plain ``.nii`` named ``.nii.gz`` is refused).
- :func:`check_nifti_data`: the voxel data is as long as the header says (``.nii.gz`` streamed
  through gzip, so a cut stream is caught) and holds no NaN/inf (read raw, as nibabel does).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfusion.errors import InputError, MedFusionError, OutputError
from medfusion.io import full_suffix

# Leading bytes of each format, by extension (any one of the listed signatures matches).
_IMAGE_SIGNATURES = {
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".jpg": (b"\xff\xd8\xff",),
    ".jpeg": (b"\xff\xd8\xff",),
    ".tif": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    ".tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    ".bmp": (b"BM",),
}
_FORMAT_NAMES = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
    ".bmp": "BMP", ".nii": "NIfTI", ".nii.gz": "gzip-compressed NIfTI", ".nrrd": "NRRD",
    ".nhdr": "NRRD header", ".mha": "MetaImage", ".mhd": "MetaImage header", ".dcm": "DICOM",
}
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_MAGICS = (b"n+1\x00", b"ni1\x00")  # NIfTI-1 at byte 344; NIfTI-2 "n+2\0" at byte 4
_CHUNK_BYTES = 1 << 24


def format_name(path: str | Path) -> str:
    """Human name of the format an extension stands for ('NIfTI', 'PNG', ...)."""
    return _FORMAT_NAMES.get(full_suffix(path), full_suffix(path) or "extension-less")


def check_path_name(path: str | Path, error: type[MedFusionError] = InputError) -> None:
    """Raise ``error`` when a component of ``path`` or the whole path is longer than the file
    system allows (checked by length, so no ``ENAMETOOLONG`` can come out of a later call)."""
    text = os.fsencode(str(path))
    name_max, path_max = 255, 4096
    probe = Path(path).parent
    while not os.path.isdir(probe) and probe != probe.parent:
        probe = probe.parent
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
        path_max = os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        pass
    for part in text.split(b"/"):
        if len(part) > name_max:
            shown = os.fsdecode(part[:40])
            raise error(
                f"file or folder name too long ({len(part)} bytes, the limit here is "
                f"{name_max}): {shown}..."
            )
    if len(text) > path_max:
        raise error(f"path too long ({len(text)} bytes, the limit here is {path_max})")


def check_input_file(path: str | Path, folders_allowed: bool = False) -> Path:
    """The input exactly as named: it exists, and it is a regular file (or, when
    ``folders_allowed``, a DICOM series folder whose name is not that of a file format, so a
    folder called ``x.png`` or ``t1.nii.gz`` is never taken for a volume)."""
    from medfusion.io import IMAGE_SUFFIXES, VOLUME_SUFFIXES

    source = Path(path)
    check_path_name(source)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    if source.is_dir():
        if not folders_allowed or full_suffix(source) in IMAGE_SUFFIXES + VOLUME_SUFFIXES:
            raise InputError(
                f"{source.name} is a folder, not a {format_name(source)} file; give the file "
                "itself (a DICOM series folder needs a name without a file extension)"
            )
        return source
    if not source.is_file():
        raise InputError(f"{source.name} is not a regular file")
    return source


def _head(path: Path, size: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _is_nifti_header(header: bytes) -> bool:
    return header[344:348] in _NIFTI_MAGICS or header[4:8] in (b"n+2\x00", b"ni2\x00")


def check_content_matches_name(path: str | Path) -> None:
    """Raise InputError unless the file's first bytes are those of the format its extension
    names. Unknown extensions are refused: MedFusion reads only the formats it lists."""
    from medfusion.io import IMAGE_SUFFIXES, VOLUME_SUFFIXES

    source = Path(path)
    suffix = full_suffix(source)
    what = f"cannot read {'image' if suffix in IMAGE_SUFFIXES else 'volume'} {source.name}"
    if suffix not in IMAGE_SUFFIXES + VOLUME_SUFFIXES:
        known = "/".join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)
        raise InputError(
            f"{source.name}: unsupported file extension {suffix or '(none)'!r}; give one of "
            f"{known} or a DICOM series folder"
        )
    try:
        head = _head(source, 1024)
    except OSError as error:
        raise InputError(f"{what}: {error.strerror}") from error
    if not head:
        raise InputError(f"{what}: the file is empty (0 bytes)")
    if _matches(source, suffix, head):
        return
    found = _guess(head)
    said = f" (its content looks like {found})" if found else ""
    raise InputError(
        f"{what}: not a valid {_FORMAT_NAMES[suffix]} file{said}; give the file its right "
        "extension"
    )


def check_contents_match_names(paths: Sequence[str | Path]) -> None:
    """:func:`check_content_matches_name` for each of ``paths`` that is a file (folders are
    DICOM series): run before refusing a 2D/3D mix, so a renamed file is named as such."""
    for path in paths:
        if Path(path).is_file():
            check_content_matches_name(path)


def _matches(source: Path, suffix: str, head: bytes) -> bool:
    if suffix in _IMAGE_SIGNATURES:
        return head.startswith(_IMAGE_SIGNATURES[suffix])
    if suffix == ".nii":
        return _is_nifti_header(head)
    if suffix == ".nii.gz":
        if not head.startswith(_GZIP_MAGIC):
            return False
        try:
            with gzip.open(source, "rb") as handle:
                return _is_nifti_header(handle.read(540))
        except (OSError, EOFError, zlib.error):
            return False
    if suffix in (".nrrd", ".nhdr"):
        return head.startswith(b"NRRD")
    if suffix in (".mha", ".mhd"):
        text = head.decode("latin-1")
        return any(key in text for key in ("NDims", "ObjectType", "ElementType"))
    if suffix == ".dcm":
        return head[128:132] == b"DICM"
    return False


def _guess(head: bytes) -> str:
    """Best guess of a file's real format from its first bytes ('' when unknown)."""
    for suffix, signatures in _IMAGE_SIGNATURES.items():
        if head.startswith(signatures):
            return _FORMAT_NAMES[suffix]
    if head.startswith(_GZIP_MAGIC):
        return "gzip-compressed data"
    if _is_nifti_header(head):
        return "uncompressed NIfTI"
    if head.startswith(b"NRRD"):
        return "NRRD"
    if head[128:132] == b"DICM":
        return "DICOM"
    return ""


def check_nifti_data(path: str | Path, error: type[MedFusionError] = InputError) -> None:
    """Raise ``error`` when a NIfTI file's voxel data is shorter than its header says, its gzip
    stream is cut or corrupt, or its float voxels hold NaN/inf (read raw, chunk by chunk)."""
    source = Path(path)
    try:
        header = _raw_nifti_header(source)
    except Exception as exc:  # nibabel raises many types for a broken header
        raise error(f"cannot read the NIfTI header of {source.name}: corrupt file") from exc
    if error is InputError:
        check_nifti_geometry(header, source.name)
    dtype = header.get_data_dtype()
    shape = tuple(int(n) for n in header.get_data_shape())
    offset = int(header.get_data_offset())
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    check_values = dtype.kind in "fc"
    if full_suffix(source) == ".nii" and not check_values:
        actual = source.stat().st_size - offset
        if actual < expected:
            _truncated(source, actual, expected, shape, error)
        return
    opener = gzip.open if full_suffix(source) == ".nii.gz" else open
    read, carry = 0, b""
    try:
        with opener(source, "rb") as handle:
            handle.seek(offset)
            while read < expected:
                chunk = handle.read(min(_CHUNK_BYTES, expected - read))
                if not chunk:
                    break
                read += len(chunk)
                if check_values:
                    chunk = carry + chunk  # a short read may split a voxel: keep its bytes
                    usable = len(chunk) - len(chunk) % dtype.itemsize
                    carry = chunk[usable:]
                    values = np.frombuffer(chunk[:usable], dtype=dtype)
                    if not np.isfinite(values).all():
                        raise error(
                            f"{source.name} contains NaN or infinite values; fix or mask them "
                            "first"
                        )
    except EOFError:
        _truncated(source, read, expected, shape, error)
    except (OSError, zlib.error) as exc:
        raise error(f"cannot read {source.name}: corrupt compressed data ({exc})") from exc
    if read < expected:
        _truncated(source, read, expected, shape, error)


def _raw_nifti_header(source: Path):
    """The NIfTI header as stored (``nibabel.load`` would 'fix' a zero or negative pixdim)."""
    import io

    import nibabel

    opener = gzip.open if full_suffix(source) == ".nii.gz" else open
    with opener(source, "rb") as handle:
        raw = handle.read(540)
    kind = nibabel.Nifti2Header if raw[4:8] in (b"n+2\x00", b"ni2\x00") else nibabel.Nifti1Header
    return kind.from_fileobj(io.BytesIO(raw), check=False)


def check_nifti_geometry(header, label: str) -> None:
    """Raise GeometryError for header geometry that ITK would silently change: a voxel size
    (pixdim) that is zero, negative or not finite (ITK makes it 1 or its absolute value,
    flipping the axis), or a non-finite or singular qform/sform."""
    from medfusion.errors import GeometryError

    spatial = min(int(header["dim"][0]), 3)
    pixdim = np.asarray(header["pixdim"][1 : 1 + spatial], dtype=float)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        shown = "x".join(f"{v:g}" for v in pixdim)
        raise GeometryError(
            f"{label} has an unusable voxel spacing in its NIfTI header (pixdim {shown}): every "
            "spacing must be a positive number; fix the file's header"
        )
    if int(header["qform_code"]) > 0:
        quaternion = [float(header[key]) for key in ("quatern_b", "quatern_c", "quatern_d",
                                                      "qoffset_x", "qoffset_y", "qoffset_z")]
        if not np.all(np.isfinite(quaternion)):
            raise GeometryError(f"{label} has a non-finite qform (orientation or origin) in its "
                                "NIfTI header; fix the file's header")
    if int(header["sform_code"]) > 0:
        rows = np.array([header["srow_x"], header["srow_y"], header["srow_z"]], dtype=float)
        if not np.all(np.isfinite(rows)) or abs(np.linalg.det(rows[:, :3])) < 1e-12:
            raise GeometryError(f"{label} has a non-finite or singular sform in its NIfTI "
                                "header, so its voxels cannot be placed in space; fix the header")


def _truncated(source: Path, actual: int, expected: int, shape: tuple, error) -> None:
    slices = shape[2] if len(shape) > 2 else 1
    per_slice = max(expected // max(slices, 1), 1)
    raise error(
        f"{source.name} is truncated: it holds {max(actual, 0) // per_slice} of its {slices} "
        f"slices ({max(actual, 0)} of {expected} bytes of voxel data); the file is incomplete"
    )


def output_error(path: str | Path, exc: OSError) -> OutputError:
    """One-line OutputError for an OSError while writing ``path`` (full disk, quota, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"cannot write {Path(path).name}: {reason}")
