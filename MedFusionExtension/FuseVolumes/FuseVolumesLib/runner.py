"""The background fusion process: start, poll progress, cancel, collect the result.

The core's command line runs in its own process (as SlicerMONAIAuto3DSeg and
SlicerTotalSegmentator do), so Slicer's GUI stays responsive and a cancel is a signal, not a
flag the fusion loop may never see. The caller polls: Slicer from a ``QTimer`` on the GUI
thread, tests and scripts through :meth:`FusionProcess.wait`.

Outputs are staged: the process writes into a private folder next to the requested output
(the fused volume, metrics and decision map), and only a successful run moves the files into
place. A cancelled, failed or killed run leaves nothing behind, whatever state the process was
in when it stopped.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .command import FuseRequest, build_fuse_command
from .messages import EXIT_OK, cuda_unavailable, explain_failure, extract_warnings
from .progress import ProgressEvent, parse_progress_line

SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
_IS_WINDOWS = sys.platform.startswith("win")


@dataclass
class FusionResult:
    """How a run ended; ``output`` and ``metrics`` exist only when ``status`` is succeeded."""

    status: str
    returncode: int | None
    message: str
    warnings: list[str] = field(default_factory=list)
    output: Path | None = None
    metrics: Path | None = None
    stderr: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED


# The folder of the staging folder that each output of a request is written to.
_STAGED_FOLDERS = {"output": "fused", "metrics": "metrics", "decision_map": "decision"}


class FusionProcess:
    """One run of ``python -m medfusion fuse ... --progress json`` in the background.

    ``python`` is the interpreter with MedFusion installed (default: this one); ``env`` the
    environment for the process (default: this process's). ``grace_seconds`` is how long a
    cancelled process may take to stop on its own before it is killed.
    """

    def __init__(
        self,
        request: FuseRequest,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        grace_seconds: float = 5.0,
    ) -> None:
        request.validate()
        self.request = request
        self.python = python or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.grace_seconds = grace_seconds
        self.last_progress: ProgressEvent | None = None
        self._events: queue.Queue[ProgressEvent] = queue.Queue()
        self._stderr: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []
        self._staging: Path | None = None
        self._staged_request: FuseRequest | None = None
        self._cancelled = False
        self._result: FusionResult | None = None
        self._started_at = 0.0
        self._fallback_warnings: list[str] = []

    # -- starting -------------------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        """The command line that runs (with the staged output paths once started)."""
        return build_fuse_command(self._staged_request or self.request, self.python)

    def start(self) -> None:
        """Start the process; returns at once."""
        if self._proc is not None or self._result is not None:
            raise RuntimeError("this fusion process was already started")
        output = Path(self.request.output)
        for target in (output, self.request.metrics, self.request.decision_map):
            if target is not None:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix=".medfusion-staging-", dir=output.parent))
        try:
            self._staged_request = self._staged(self._staging)
            self._started_at = time.monotonic()
            self._launch()
        except BaseException:
            shutil.rmtree(self._staging, ignore_errors=True)
            raise

    def _staged(self, staging: Path) -> FuseRequest:
        """The request with every output in its own folder of ``staging``, under the name asked
        for: outputs asked for as ``decision-map.nrrd`` and ``map.nrrd`` (a decision map) must
        not meet there, and the core's messages then name the files as the user did."""
        def staged(path: str | Path | None, folder: str) -> Path | None:
            if path is None:
                return None
            (staging / folder).mkdir()
            return staging / folder / Path(path).name

        return dataclasses.replace(
            self.request,
            output=staged(self.request.output, _STAGED_FOLDERS["output"]),
            metrics=staged(self.request.metrics, _STAGED_FOLDERS["metrics"]),
            decision_map=staged(self.request.decision_map, _STAGED_FOLDERS["decision_map"]),
        )

    def _launch(self) -> None:
        """Start (or, after a CUDA fallback, restart) the process for the staged request."""
        env = dict(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        options: dict = {}
        if _IS_WINDOWS:
            options["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP
                                        | subprocess.CREATE_NO_WINDOW)
        else:
            options["start_new_session"] = True  # own process group: cancel reaches children
        try:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                env=env, **options,
            )
        except OSError as error:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
            self._result = FusionResult(FAILED, None, f"Could not start {self.python}: {error}")
            return
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(self._proc,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._proc,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            event = parse_progress_line(line)
            if event is not None:
                self._events.put(event)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            text = line.rstrip()
            if text:
                self._stderr.append(text)
                self._events.put(ProgressEvent("log", text=text, data={"stream": "stderr"}))

    # -- state ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """True from start until the result is known."""
        return self._proc is not None and self._result is None

    @property
    def result(self) -> FusionResult | None:
        return self._result

    def poll(self) -> list[ProgressEvent]:
        """Return the events since the last call; finish the run once the process has ended."""
        ended = (self._result is None and self._proc is not None
                 and self._proc.poll() is not None
                 and not any(reader.is_alive() for reader in self._readers))
        events = []
        while True:  # after the readers stopped, this drains everything they ever queued
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        events = [self._event_as_asked(event) for event in events]
        for event in events:
            if event.kind == "progress":
                self.last_progress = event
        if ended:
            self._finish()
        return events

    def _event_as_asked(self, event: ProgressEvent) -> ProgressEvent:
        """``event`` naming the outputs as the user asked for them, not as staged."""
        output = None if event.output is None else self._as_asked(event.output)
        return dataclasses.replace(event, text=self._as_asked(event.text), output=output)

    def wait(
        self,
        timeout: float | None = None,
        on_event: Callable[[ProgressEvent], None] | None = None,
        interval: float = 0.05,
    ) -> FusionResult:
        """Block until the run ends (cancelling it after ``timeout`` seconds); return the result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._result is None:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self._result is None:
                if deadline is not None and time.monotonic() > deadline and not self._cancelled:
                    self.cancel()
                time.sleep(interval)
        return self._result

    # -- cancelling -----------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the process to stop (Ctrl-C); kill its process tree if it has not stopped soon."""
        if self._proc is None or self._result is not None or self._cancelled:
            return
        self._cancelled = True
        if self._proc.poll() is not None:
            return
        if _IS_WINDOWS:
            self._kill_tree()  # no portable Ctrl-C for a background process group on Windows
            return
        try:
            os.killpg(self._proc.pid, signal.SIGINT)  # the CLI exits with 130, cleaning up
        except (ProcessLookupError, PermissionError):
            return
        timer = threading.Timer(self.grace_seconds, self._kill_tree)
        timer.daemon = True
        timer.start()

    def _kill_tree(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        if _IS_WINDOWS:
            subprocess.run(["taskkill", "/PID", str(self._proc.pid), "/T", "/F"],
                           capture_output=True, check=False)
        else:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # -- finishing ------------------------------------------------------------------------------

    def _fall_back_to_cpu(self) -> bool:
        """Restart on the CPU when a CUDA device was asked for but the machine has none."""
        assert self._proc is not None and self._staged_request is not None
        if (self._cancelled or self._proc.returncode == EXIT_OK
                or not self._staged_request.device.startswith("cuda")
                or not cuda_unavailable(self._stderr)):
            return False
        self._fallback_warnings.append(
            "CUDA was requested but no CUDA GPU is available: fused on the CPU instead.")
        self._events.put(ProgressEvent("warning", text=self._fallback_warnings[-1]))
        self._staged_request = dataclasses.replace(self._staged_request, device="cpu")
        self._stderr.clear()
        self._launch()
        return self._result is None

    def _as_asked(self, text: str) -> str:
        """``text`` of the core with the staged paths and folders replaced by the ones the user
        asked for. Whole paths only, so an input's name is never touched; one pass, longest
        first, so that a replacement is never replaced again."""
        if self._staged_request is None or self._staging is None:
            return text
        staged, asked = self._staged_request, self.request
        replacements = {str(self._staging): str(Path(asked.output).parent)}
        for name, folder in _STAGED_FOLDERS.items():
            where, wanted = getattr(staged, name), getattr(asked, name)
            if where is not None and wanted is not None:
                replacements[str(where)] = str(wanted)
                replacements[str(self._staging / folder)] = str(Path(wanted).parent)
        pattern = "|".join(re.escape(key) for key in sorted(replacements, key=len, reverse=True))
        return re.sub(pattern, lambda match: replacements[match.group(0)], text)

    def _name_output_as_asked(self, metrics: Path) -> None:
        """A JSON metrics file names the fused volume it scored: as asked, not as staged."""
        if metrics.suffix.lower() != ".json":
            return
        try:
            payload = json.loads(metrics.read_text(encoding="utf-8"))
        except ValueError:  # not the core's JSON: moved as it is
            return
        if isinstance(payload, dict) and isinstance(payload.get("output"), str):
            payload["output"] = self._as_asked(payload["output"])
            metrics.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    def _move_into_place(self, returncode: int, seconds: float,
                         warnings: list[str]) -> FusionResult:
        """Move the staged files to where they were asked for (the fused volume last)."""
        assert self._staged_request is not None
        staged, asked = self._staged_request, self.request
        metrics = None
        try:
            if staged.metrics is not None and Path(staged.metrics).is_file():
                metrics = Path(asked.metrics)  # type: ignore[arg-type]
                self._name_output_as_asked(Path(staged.metrics))
                _replace(Path(staged.metrics), metrics)
            if staged.decision_map is not None and Path(staged.decision_map).is_file():
                _replace(Path(staged.decision_map), Path(asked.decision_map))  # type: ignore[arg-type]
            _replace(Path(staged.output), Path(asked.output))
        except OSError as error:
            return FusionResult(FAILED, returncode, "Could not move the results into place: "
                                f"{error.strerror or error} ({error.filename})", warnings)
        message = f"Fused {1 + len(asked.others)} volumes in {seconds:.1f} s."
        return FusionResult(SUCCEEDED, returncode, message, warnings, Path(asked.output), metrics)

    def _finish(self) -> None:
        assert self._proc is not None and self._staged_request is not None
        if self._fall_back_to_cpu():
            return
        returncode = self._proc.returncode
        seconds = time.monotonic() - self._started_at
        stderr = list(self._stderr)
        warnings = self._fallback_warnings + [self._as_asked(w) for w in extract_warnings(stderr)]
        staged_output = Path(self._staged_request.output)
        try:
            if self._cancelled:
                result = FusionResult(CANCELLED, returncode, "Fusion cancelled.", warnings)
            elif returncode != EXIT_OK:
                message = self._as_asked(explain_failure(returncode, stderr,
                                                         self.request.device))
                result = FusionResult(FAILED, returncode, message, warnings)
            elif not staged_output.is_file():
                result = FusionResult(FAILED, returncode,
                                      "MedFusion reported success but wrote no fused volume.",
                                      warnings)
            else:
                result = self._move_into_place(returncode, seconds, warnings)
        finally:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
        result.stderr = stderr
        result.seconds = seconds
        self._result = result


def _replace(staged: Path, target: Path) -> None:
    """``os.replace``; onto another file system, a copy beside ``target`` renamed over it (so
    ``target`` is never half-written either)."""
    try:
        os.replace(staged, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            shutil.copyfile(staged, temporary)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
