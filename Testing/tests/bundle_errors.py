"""What a bundle run refused for bad input must look like (shared by the bundles' tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def assert_one_line_bundle_error(done: subprocess.CompletedProcess, message: str,
                                 output: Path) -> None:
    """A non-zero exit, no traceback (in the log on stdout either), exactly one
    ``medfusion bundle: error: ...`` line that contains ``message``, and nothing written under
    ``output``."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stdout, done.stdout[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("medfusion bundle: error: "), done.stderr
    assert message in errors[0]
    assert not output.exists() or not any(output.iterdir())
