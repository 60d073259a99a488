"""Exit codes and stderr of the background process turned into messages for users.

The core already reports user errors as one line, ``medfusion: error: <what and what to do>``,
with exit code 1; those lines are shown as they are, with a hint where the panel can help. Other
failures (out of memory, a missing package, a crash) are recognised here from their stderr.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130

_ERROR_PREFIX = "medfusion: error:"
_OOM_PATTERNS = re.compile(
    r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
    r"can't allocate memory|cannot allocate memory|\bMemoryError\b",
    re.IGNORECASE,
)
_CUDA_FALLBACK = re.compile(
    r"cuda.*(not available|unavailable|absent|fall(ing)? ?back|using cpu)|"
    r"(no|without) (cuda|gpu)",
    re.IGNORECASE,
)
_CUDA_UNAVAILABLE_ERROR = re.compile(
    r"(cuda|gpu).*(not available|unavailable|no cuda|absent)|no cuda gpu", re.IGNORECASE)
_MISSING_MODULE = re.compile(r"No module named '?([A-Za-z0-9_.]+)'?")
# Killed by the kernel (SIGKILL), the usual sign of the out-of-memory killer on Linux.
_KILLED_CODES = {-9, 137}


def _error_lines(stderr: Sequence[str]) -> list[str]:
    return [line.strip()[len(_ERROR_PREFIX):].strip()
            for line in stderr if line.strip().startswith(_ERROR_PREFIX)]


def _hint_for_core_error(message: str) -> str:
    lowered = message.lower()
    if "overlap" in lowered:
        return (" The volumes must be co-registered (same patient space); register them first,"
                " for example with the General Registration (BRAINS) module.")
    if "bundle" in lowered or "weights" in lowered or "checkpoint" in lowered:
        return (" Choose a valid MONAI bundle folder, or clear the model folder to use the"
                " bundle shipped with MedFusion.")
    return ""


def cuda_unavailable(stderr: Sequence[str]) -> bool:
    """True when the run failed because a CUDA device was requested on a machine without one."""
    return any(_CUDA_UNAVAILABLE_ERROR.search(line) for line in _error_lines(stderr))


def out_of_memory_message(device: str) -> str:
    """The advice for an out-of-memory failure on ``device``."""
    if device.startswith("cuda") or device == "auto":
        return ("Fusion ran out of memory. Use a smaller batch size (Advanced), or choose CPU"
                " as the device.")
    return "Fusion ran out of memory. Use a smaller batch size or block size (Advanced)."


def explain_failure(returncode: int, stderr: Sequence[str], device: str = "auto") -> str:
    """Return a one-paragraph message for a failed run (``returncode`` != 0)."""
    text = "\n".join(stderr)
    if returncode == EXIT_CANCELLED:
        return "Fusion cancelled."
    if _OOM_PATTERNS.search(text) or returncode in _KILLED_CODES:
        return out_of_memory_message(device)
    errors = _error_lines(stderr)
    if errors:
        return errors[-1] + _hint_for_core_error(errors[-1])
    missing = _MISSING_MODULE.findall(text)
    if missing:
        return (f"Python package '{missing[-1].split('.')[0]}' is missing in Slicer's Python."
                " Click Apply again to install MedFusion's dependencies.")
    last = next((line.strip() for line in reversed(stderr) if line.strip()), "")
    if returncode == EXIT_USAGE:
        return ("The installed MedFusion does not accept the options this module sent "
                f"(versions out of step?): {last}")
    detail = f": {last}" if last else ""
    return f"Fusion failed (exit code {returncode}){detail}. See the Python console for details."


def extract_warnings(stderr: Sequence[str]) -> list[str]:
    """The stderr lines a user should see even when fusion succeeds (e.g. CUDA fell back to CPU)."""
    warnings = []
    for line in stderr:
        text = line.strip()
        if not text or text.startswith(_ERROR_PREFIX):
            continue
        body = text[len("medfusion:"):].strip() if text.startswith("medfusion:") else text
        if _CUDA_FALLBACK.search(body) or re.search(r"warn", body, re.IGNORECASE):
            # the core names its command-line option; in the panel it is a check box
            warnings.append(body.replace("use --register rigid",
                                         "tick 'Register first (rigid)'"))
    return warnings
