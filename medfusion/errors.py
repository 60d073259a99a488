"""User-facing error types.

Every problem caused by the user's input (missing file, mismatched geometry, NaN voxels, corrupt
DICOM, unreachable PACS, ...) raises a :class:`MedFusionError` subclass with a one-line message
that says what is wrong and, where possible, what to do. The command line prints that message
and exits non-zero; library callers (the Slicer module, the PACS path) show it as is.
"""


class MedFusionError(Exception):
    """Base class of all errors MedFusion reports to users."""


class InputError(MedFusionError):
    """An input file or array is missing, unreadable, or has unusable content."""


class GeometryError(MedFusionError):
    """Inputs cannot be brought onto a common grid (dimension mismatch, no physical overlap)."""


class ModelError(MedFusionError):
    """A fusion bundle or its weights are missing, broken or do not match the inputs."""


class PacsError(MedFusionError):
    """A PACS node is unreachable, refuses the association, or a retrieve/store failed."""


class CancelledError(MedFusionError):
    """The user cancelled a long-running operation."""


class OutputError(MedFusionError):
    """An output cannot be written (missing folder, wrong extension, would overwrite an input)."""
