"""What a bundle run refused for bad input must look like (shared by the bundles' tests), and
the bad-input runs started together."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# a run_concurrently outcome: the finished process, or the exception its run raised
Outcome = subprocess.CompletedProcess | BaseException


def assert_one_line_bundle_error(done: Outcome, message: str,
                                 output: Path) -> None:
    """A non-zero exit, no traceback (in the log on stdout either), exactly one
    ``medfusion bundle: error: ...`` line that contains ``message``, and nothing written under
    ``output``."""
    done = finished(done)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stdout, done.stdout[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("medfusion bundle: error: "), done.stderr
    assert message in errors[0]
    assert not output.exists() or not any(output.iterdir())


def run_concurrently(runs: Mapping[Hashable, Callable[[], subprocess.CompletedProcess]]
                     ) -> dict[Hashable, Outcome]:
    """Each of ``runs`` called, as many at once as this machine has CPUs (at least two): by key,
    its finished process, or the exception it raised (a timeout, say), which
    :func:`finished` raises again in that case's own test. Why: each bad-input run is a fresh
    process that spends its ~4-6 s importing MONAI and torch on one core, and pytest runs the
    tests one after the other, so run one by one they left the other core idle."""
    try:
        workers = max(2, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        workers = max(2, os.cpu_count() or 1)
    with ThreadPoolExecutor(min(workers, max(1, len(runs)))) as pool:
        futures = {key: pool.submit(run) for key, run in runs.items()}
        return {key: future.exception() or future.result() for key, future in futures.items()}


def finished(outcome: Outcome) -> subprocess.CompletedProcess:
    """The finished process of a :func:`run_concurrently` outcome; its exception raised."""
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_bad_inputs(cases: Iterable[Hashable], new_folder: Callable[[str], Path],
                   options_for: Callable[[Hashable, Path], list[str]],
                   run: Callable[..., subprocess.CompletedProcess]
                   ) -> dict[Hashable, tuple[Outcome, Path]]:
    """Per case: a folder of its own (``new_folder(name)``, the name made from the case, e.g.
    ``tmp_path_factory.mktemp``), the options that set the case up there
    (``options_for(case, folder)``), and ``run(*options, "--output_dir", folder / "fused")``;
    the runs started together (:func:`run_concurrently`). Returns each run's outcome and the
    output folder it was given."""
    cases = list(cases)
    if len(set(cases)) != len(cases):  # a repeated case would hand its test another's run
        raise ValueError(f"bad-input cases repeat: {cases}")
    runs, outputs = {}, {}
    for case in cases:
        folder = new_folder(re.sub(r"\W+", "_", str(case)).strip("_")[:40] or "case")
        options = options_for(case, folder)
        outputs[case] = folder / "fused"
        runs[case] = functools.partial(run, *options, "--output_dir", str(outputs[case]))
    done = run_concurrently(runs)
    return {case: (done[case], outputs[case]) for case in runs}
