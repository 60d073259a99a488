"""Peak memory while a block of code runs, on CPU (resident set) or on a CUDA device.

CPU: Linux keeps the peak resident set size (``VmHWM``) per process; writing ``5`` to
``/proc/self/clear_refs`` resets it, so the peak of one block can be measured without a sampling
thread. The result is the peak above the resident size at the start (the memory the work
needed). Where that reset is not allowed the value is None (unknown), never a guess.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024.0 * 1024.0


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as peak: ...``; then ``peak.mib``."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.mib: float | None = None  # peak above the start
        self.total_mib: float | None = None  # peak of the process (CPU) or of the device (GPU)
        self._base = 0
        self._cpu_ok = False

    def _is_cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def __enter__(self) -> PeakMemory:
        if self._is_cuda():
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._cpu_ok = _reset_cpu_peak()
            self._base = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._is_cuda():
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mib = (peak - self._base) / MIB
            self.total_mib = peak / MIB
        elif self._cpu_ok:
            peak = _status_kib("VmHWM")
            if peak is not None:
                self.mib = max(0.0, (peak * 1024 - self._base) / MIB)
                self.total_mib = peak * 1024 / MIB
