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
- :func:`check_data_file`: the data file a MetaImage or detached NRRD header names exists (and,
  raw, is as long as the header says), so its absence is told as such instead of as a bad header.

For outputs, :func:`nifti_space_codes` and :func:`patch_nifti_header` keep the space a NIfTI
header's qform/sform codes declare (ITK's writer always writes 1, scanner anatomical), and
:func:`short_write_cause` tells why a write came out short.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
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


# --------------------------------------------------------------------------- detached data files
# Bytes per value of MetaImage element types whose size does not depend on the platform.
_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                   "MET_UINT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                   "MET_DOUBLE": 8}
_HEADER_BYTES = 1 << 16  # a header is read this far at most


def check_data_file(path: str | Path) -> None:
    """Raise InputError when the voxel data file a header names is missing or cut short.

    A MetaImage header (``.mhd``, also ``.mha``) names it in ``ElementDataFile``, a NRRD header
    (``.nhdr``, also ``.nrrd``) in ``data file``; a name is relative to the header's folder.
    Without this check ITK prints its own complaint on stderr and the read fails with a reason
    that blames the header. Checked: a single file, each file of a ``LIST`` and each file of a
    ``%d`` pattern exists; a single raw, uncompressed MetaImage data file holds as many bytes as
    the header's size and element type need. Headers holding their data (``LOCAL``, NRRD without
    a data file) pass.
    """
    source = Path(path)
    suffix = full_suffix(source)
    if suffix not in (".mha", ".mhd", ".nhdr", ".nrrd"):
        return  # (NIfTI and the rest hold their data: no header to read)
    try:
        head = _head(source, _HEADER_BYTES)
    except OSError:
        return  # the reader reports an unreadable file
    if len(head) == _HEADER_BYTES:  # (read to the limit: its last line may be cut, so not read)
        head = head[:head.rfind(b"\n") + 1]
    text = head.decode("latin-1")
    if suffix in (".mha", ".mhd"):
        _check_meta_data_file(source, text)
    elif suffix in (".nhdr", ".nrrd"):
        _check_nrrd_data_file(source, text)


def _check_meta_data_file(source: Path, text: str) -> None:
    fields: dict[str, str] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines):
        key, equals, value = line.partition("=")
        if not equals:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            _check_named_files(source, fields["ElementDataFile"], lines[number + 1:],
                               "ElementDataFile", _meta_data_bytes(fields))
            return


def _meta_data_bytes(fields: dict[str, str]) -> int | None:
    """Bytes of voxel data a raw, uncompressed MetaImage data file must hold (None: unknown)."""
    if fields.get("CompressedData", "False").lower() == "true" or \
            fields.get("BinaryData", "True").lower() != "true":
        return None
    try:
        sizes = [int(n) for n in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header = int(fields.get("HeaderSize", "0"))
        value_bytes = _MET_TYPE_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None
    return int(np.prod(sizes, dtype=np.int64)) * channels * value_bytes + max(header, 0)


def _check_nrrd_data_file(source: Path, text: str) -> None:
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            return  # end of the header: the data follows in this file
        key, colon, value = line.partition(":")
        if colon and not value.startswith("=") and key.strip().lower() in ("data file",
                                                                           "datafile"):
            _check_named_files(source, value.strip(), lines[number + 1:], "NRRD 'data file'",
                               None)
            return


def _check_named_files(source: Path, value: str, rest: Sequence[str], field: str,
                       expected: int | None) -> None:
    """Check the data file(s) ``value`` (a header field's text) names, relative to ``source``."""
    words = value.split()
    if not words or words[0].upper() == "LOCAL":
        return
    if words[0].upper() == "LIST":
        names = [line.strip() for line in rest if line.strip()]
        expected = None
    elif "%" in words[0] and len(words) >= 3:
        names = _pattern_names(words)
        expected = None
    else:
        names = [value]
    folder = source.parent
    for name in names:
        data = Path(name) if Path(name).is_absolute() else folder / name
        what = f"cannot read volume {source.name}: its data file {name} ({field})"
        if not data.exists():
            raise InputError(f"{what} is missing")
        if not data.is_file():
            raise InputError(f"{what} is not a regular file")
        if expected is not None and data.stat().st_size < expected:
            raise InputError(f"{what} is truncated: it holds {data.stat().st_size} of the "
                             f"{expected} bytes the header needs; the file is incomplete")


def _pattern_names(words: Sequence[str]) -> list[str]:
    """File names of a ``name%03d.raw first last [step]`` data file pattern (at most 100 000)."""
    try:
        first, last = int(words[1]), int(words[2])
        step = int(words[3]) if len(words) > 3 else 1
        numbers = range(first, last + (1 if step > 0 else -1), step)
        if len(numbers) > 100_000 or not re.fullmatch(r"[^%]*%0?\d*d[^%]*", words[0]):
            return []
        return [words[0] % n for n in numbers]
    except (ValueError, TypeError):
        return []


# --------------------------------------------------------------------------- NIfTI outputs
_XFORM_NAMES = {0: "NIFTI_XFORM_UNKNOWN", 1: "NIFTI_XFORM_SCANNER_ANAT",
                2: "NIFTI_XFORM_ALIGNED_ANAT", 3: "NIFTI_XFORM_TALAIRACH",
                4: "NIFTI_XFORM_MNI_152", 5: "NIFTI_XFORM_TEMPLATE_OTHER"}


def xform_name(code: int) -> str:
    """NIfTI name of a qform/sform code (``4`` -> ``NIFTI_XFORM_MNI_152``)."""
    return _XFORM_NAMES.get(code, f"NIFTI_XFORM_{code}")


def nifti_space_codes(path: str | Path, affine: np.ndarray) -> tuple[int, int]:
    """The file's (qform_code, sform_code) as they hold for ``affine``: the voxel-to-RAS matrix
    of the voxels as ITK placed them.

    ITK reads one of a NIfTI header's two transforms (which one depends on their codes) and
    writes that one into both. When the header's qform and sform agree with ``affine``, their
    codes are returned as they are; when only one does, both get its code, so a derived file
    never labels ITK's geometry with the space of the transform ITK dropped (a scanner qform
    beside an MNI sform: the output is in the space of the one that was read). Codes of 0 (no
    transform) are kept.
    """
    header = _raw_nifti_header(Path(path))
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode <= 0 or scode <= 0 or qcode == scode:
        return qcode, scode
    spatial = max(1, min(int(header["dim"][0]), 3))
    qform_fits = _same_placement(header.get_qform(), affine, spatial)
    sform_fits = _same_placement(header.get_sform(), affine, spatial)
    if sform_fits and not qform_fits:
        return scode, scode
    if qform_fits and not sform_fits:
        return qcode, qcode
    return qcode, scode


def _same_placement(matrix: np.ndarray, affine: np.ndarray, spatial: int) -> bool:
    """Do two voxel-to-world matrices place the voxels alike (to 0.1% of a voxel)?"""
    matrix, affine = np.asarray(matrix, float), np.asarray(affine, float)
    if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(affine))):
        return False
    columns = list(range(spatial)) + [3]
    scale = max(1.0, float(np.max(np.linalg.norm(affine[:3, :spatial], axis=0))))
    return bool(np.allclose(matrix[:3, columns], affine[:3, columns], rtol=0,
                            atol=1e-3 * scale))


def patch_nifti_header(path: str | Path, fields: dict[str, int | str]) -> None:
    """Set header ``fields`` (e.g. ``qform_code``) of an uncompressed NIfTI file in place.

    Only the header's bytes are rewritten (same length), so the voxel data is not touched and
    the file does not grow. A file shorter than its header is left alone (the read-back check
    reports it as incomplete).
    """
    target = Path(path)
    if target.stat().st_size < 348:  # not even a NIfTI-1 header
        return
    try:
        header = _raw_nifti_header(target)
    except Exception:  # nibabel raises many types for a broken header; the check reports it
        return
    for key, value in fields.items():
        header[key] = value
    block = header.binaryblock
    if target.stat().st_size < len(block):
        return
    with open(target, "r+b") as handle:
        handle.write(block)


def short_write_cause(written: str | Path) -> str | None:
    """Why a write of ``written`` came out short, told from what is left when the writer does
    not say (ITK's NIfTI writer prints only how many bytes it wrote, on stderr): the process's
    file size limit (``RLIMIT_FSIZE``, ``ulimit -f``) reached, or a full file system. None when
    neither shows (a quota, an I/O error)."""
    target = Path(written)
    try:
        size = target.stat().st_size
    except OSError:
        size = -1
    try:
        import resource

        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit != resource.RLIM_INFINITY and size >= limit:
            return (f"{os.strerror(errno.EFBIG)}: over this process's file size limit "
                    f"(RLIMIT_FSIZE, ulimit -f) of {limit} bytes")
    except (ImportError, OSError, ValueError):
        pass
    try:
        stats = os.statvfs(target.parent)
    except (AttributeError, OSError):
        return None
    blocks = stats.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stats.f_bavail
    if blocks * stats.f_frsize < _NEARLY_FULL_BYTES:
        return f"{os.strerror(errno.ENOSPC)} (the disk is full)"
    return None


# Free space below which a short write is put down to a full disk.
_NEARLY_FULL_BYTES = 1 << 20


def output_error(path: str | Path, exc: OSError) -> OutputError:
    """One-line OutputError for an OSError while writing ``path`` (full disk, quota, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"cannot write {Path(path).name}: {reason}")
