"""Slicer-free helpers of the Fuse Volumes module.

Nothing here imports ``slicer``, ``qt`` or ``vtk``: the pieces run (and are tested) in plain
Python. The module builds on them:

- :mod:`.command`: the ``python -m medfusion fuse ...`` command line for one fusion request.
- :mod:`.progress`: parsing of the CLI's ``--progress json`` lines.
- :mod:`.runner`: the background fusion process (start, poll, cancel, staged outputs).
- :mod:`.messages`: exit codes and stderr turned into messages for users.
- :mod:`.metrics_table`: the metrics CSV read into typed columns for a table node.
- :mod:`.dependencies`: which Python packages are missing and how to install them safely.
"""

from .command import (
    AXES,
    BLOCK_EXPONENTS,
    DEVICES,
    LEARNED_METHODS,
    METHODS,
    FuseRequest,
    build_fuse_command,
)
from .dependencies import (
    REQUIREMENTS,
    InstallPlan,
    Requirement,
    installed_versions,
    plan_installation,
)
from .messages import explain_failure, extract_warnings
from .metrics_table import MetricsTable, read_metrics_csv
from .progress import ProgressEvent, parse_progress_line
from .runner import FusionProcess, FusionResult

__all__ = [
    "AXES",
    "BLOCK_EXPONENTS",
    "DEVICES",
    "LEARNED_METHODS",
    "METHODS",
    "REQUIREMENTS",
    "FuseRequest",
    "FusionProcess",
    "FusionResult",
    "InstallPlan",
    "MetricsTable",
    "ProgressEvent",
    "Requirement",
    "build_fuse_command",
    "explain_failure",
    "extract_warnings",
    "installed_versions",
    "parse_progress_line",
    "plan_installation",
    "read_metrics_csv",
]
