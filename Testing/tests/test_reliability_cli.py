"""Reliability of the command line: batch plans that would lose data are refused before any work,
exit codes follow one documented convention, and SIGTERM cleans up like Ctrl-C.

Every case checks the exit code, the one-line message, that nothing is left behind and that the
inputs are unchanged. Fixtures are built from ``../shared/data`` at test time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfusion.cli import EXIT_CODES_HELP, Terminated, main

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = ("25030.png", "25031.png")


def _digests(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (to prove inputs unchanged)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def pairs(tmp_path: Path, aanlib: Path) -> Path:
    """``tmp_path/data/{MRI,PET}/<two real aanlib slices>``; returns ``tmp_path/data``."""
    root = tmp_path / "data"
    for modality in ("MRI", "PET"):
        (root / modality).mkdir(parents=True)
        for name in NAMES:
            shutil.copy(aanlib / "PET-MRI" / modality / name, root / modality / name)
    return root


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("medfusion: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- batch safety
BAD_LISTS = {
    # name: (list file name, content, words the message must contain)
    "escape-dotdot": ("groups.csv",
                      "reference,other,output\n"
                      "MRI/25030.png,PET/25030.png,../escaped.png\n"
                      "MRI/25031.png,PET/25031.png,fine.png\n",
                      ["line 2 of groups.csv", "'../escaped.png' is outside"]),
    "escape-absolute": ("groups.json",
                        json.dumps([{"inputs": ["MRI/25030.png", "PET/25030.png"],
                                     "output": "{ABSOLUTE}"}]),
                        ["group 1 of groups.json", "is outside"]),
    "overwrites-other-input": ("groups.csv",
                               "reference,other,output\n"
                               "MRI/25030.png,PET/25030.png,PET/25031.png\n"
                               "MRI/25031.png,PET/25031.png,second.png\n",
                               ["line 2 of groups.csv", "'PET/25031.png' is an input of "
                                "line 3 of groups.csv"]),
    "duplicate-outputs": ("groups.json",
                          json.dumps([["MRI/25030.png", "PET/25030.png"],
                                      {"inputs": ["MRI/25031.png", "PET/25031.png"],
                                       "output": "MRI/../same.png"},
                                      {"inputs": ["MRI/25030.png", "PET/25031.png"],
                                       "output": "same.png"}]),
                          ["group 3 of groups.json", "'same.png' is also the output of "
                           "group 2 of groups.json"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LISTS))
def test_batch_list_that_would_lose_data_is_refused_before_any_work(
    case: str, pairs: Path, tmp_path: Path, capsys
) -> None:
    name, content, words = BAD_LISTS[case]
    escaped = tmp_path / "escaped.png"
    listing = pairs / name
    listing.write_text(content.replace("{ABSOLUTE}", str(escaped)))
    before = _digests(pairs)
    # -o is the data folder itself, so an output *can* name an input (the dangerous case).
    code = main(["batch", "--list", str(listing), "-o", str(pairs), "--method", "average",
                 "--progress", "none"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    line = _one_error_line(captured.err)
    assert "batch refused, nothing was fused" in line
    for word in words:
        assert word in line, line
    assert _digests(pairs) == before  # nothing written, nothing overwritten
    assert not escaped.exists() and not (tmp_path / "escaped.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_batch_folders_into_an_input_folder_is_refused(pairs: Path, capsys) -> None:
    before = _digests(pairs)
    code = main(["batch", str(pairs / "MRI"), str(pairs / "PET"), "-o", str(pairs / "PET"),
                 "--method", "average", "--progress", "none"])  # fmt: skip
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "entry 25030.png: output '25030.png' is an input of the same group" in line
    assert _digests(pairs) == before


def test_batch_output_dir_that_is_a_file_is_one_line(pairs: Path, tmp_path: Path,
                                                     capsys) -> None:  # fmt: skip
    existing = tmp_path / "results"
    existing.write_text("not a folder\n")
    before = _digests(pairs)
    code = main(["batch", str(pairs / "MRI"), str(pairs / "PET"), "-o", str(existing),
                 "--method", "average", "--progress", "none"])  # fmt: skip
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"-o must be a folder, but {existing} is a file" in line
    assert existing.read_text() == "not a folder\n"
    assert _digests(pairs) == before


def test_batch_list_with_safe_outputs_fuses_every_group(pairs: Path, tmp_path: Path,
                                                        capsys) -> None:  # fmt: skip
    listing = pairs / "groups.csv"
    listing.write_text("reference,other,output\n"
                       "MRI/25030.png,PET/25030.png,first.png\n"
                       "MRI/25031.png,PET/25031.png,sub/second.png\n")  # fmt: skip
    before = _digests(pairs)
    out = tmp_path / "out"
    code = main(["batch", "--list", str(listing), "-o", str(out), "--method", "average",
                 "--progress", "none"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "first.png", "sub/second.png"]
    assert _digests(pairs) == before


def test_batch_help_documents_the_list_format(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "group list (--list FILE)" in text
    assert "reference,other,output" in text  # CSV example
    assert '{"inputs": [REF, OTHER, ...], "output": NAME}' in text  # JSON form
    assert "must stay inside OUT_DIR" in text
    assert "use only trusted folders" in " ".join(text.split())  # --bundle runs bundle code


# --------------------------------------------------------------------------- exit codes
def test_a_folder_or_device_beside_a_2d_image_is_named_for_what_it_is(
        pairs: Path, tmp_path: Path, capsys) -> None:
    """A second input that is a device is "not a regular file", and a folder beside a 2D
    image is called a DICOM series folder: both were called a 3D volume."""
    image = pairs / "MRI" / NAMES[0]
    (tmp_path / "scans").mkdir()
    for other, words in (("/dev/null", "null is not a regular file"),
                         (str(tmp_path / "scans"), "with a DICOM series folder (scans)")):
        assert main(["fuse", str(image), other, "-o", str(tmp_path / "f.png")]) == 1
        assert words in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "f.png").exists()


def test_usage_errors_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    """argparse's exit code and our one-line message, nothing written; once as a real process."""
    output = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "medfusion", "fuse", "only-one.png", "-o",
                           str(output)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done.stderr)
    assert line.startswith("medfusion: error: fuse: the following arguments are required")
    assert line.endswith("(see medfusion fuse --help)") and done.stdout == ""
    for argv in (["fuse", "a.png", "b.png", "-o", str(output), "--method", "nonsense"],
                 ["pacs", "fuse", "--config", "x.toml"],
                 ["batch", "-o", str(tmp_path / "out"), "--batch-size", "many"],
                 ["no-such-command"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        captured = capsys.readouterr()
        assert "--help)" in _one_error_line(captured.err) and captured.out == ""
    assert sorted(tmp_path.iterdir()) == []


def test_user_errors_exit_1_and_the_convention_is_documented(tmp_path: Path, capsys) -> None:
    code = main(["fuse", str(tmp_path / "missing.png"), str(tmp_path / "other.png"),
                 "-o", str(tmp_path / "out.png")])  # fmt: skip
    assert code == 1
    _one_error_line(capsys.readouterr().err)
    assert sorted(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(EXIT_CODES_HELP.split()) in help_text
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    for promise in ("exit code 1", "exit code 2", "130", "143"):
        assert promise in readme


# --------------------------------------------------------------------------- signals
@pytest.mark.parametrize(("interrupt", "code", "word"),
                         [(KeyboardInterrupt, 130, "cancelled"), (Terminated, 143, "terminated")])
def test_a_signal_surfacing_from_c_code_is_still_an_interrupt(monkeypatch, capsys, interrupt,
                                                               code, word) -> None:
    """A signal whose handler raises while C code runs (numba compiling the metrics' loops on
    their first call) comes out as SystemError("... returned a result with an exception set")
    caused by the KeyboardInterrupt: the CLI exits as for the signal; a plain bug still raises."""
    import medfusion.cli as cli

    def raising(error: BaseException):
        def func(args):
            raise error
        return func

    def from_c_code(cause: BaseException) -> SystemError:
        try:
            try:
                raise cause
            except BaseException as inner:
                raise SystemError("returned a result with an exception set") from inner
        except SystemError as error:
            return error

    import argparse

    class OneCommand(argparse.ArgumentParser):  # any command line runs ``func``
        def __init__(self, func) -> None:
            super().__init__()
            self.func = func

        def parse_args(self, args=None, namespace=None):
            return argparse.Namespace(func=self.func, verbose=False)

    def parser_with(func):
        return lambda: OneCommand(func)

    monkeypatch.setattr(cli, "build_parser", parser_with(raising(from_c_code(interrupt()))))
    assert cli.main(["demo"]) == code
    assert capsys.readouterr().err.strip().endswith(word)
    monkeypatch.setattr(cli, "build_parser", parser_with(raising(SystemError("a real bug"))))
    with pytest.raises(SystemError, match="a real bug"):
        cli.main(["demo"])


def test_sigterm_during_a_volume_fusion_cleans_up_and_exits_143(tmp_path: Path,
                                                                spm12: Path) -> None:  # fmt: skip
    """Real SIGTERM to a real ``python -m medfusion fuse`` while it fuses slices."""
    inputs = [spm12 / "T1.nii", spm12 / "PET.nii"]
    before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs}
    out_dir, private_tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    private_tmp.mkdir()
    environment = {**os.environ, "TMPDIR": str(private_tmp), "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "medfusion", "fuse", *map(str, inputs), "-o",
         str(out_dir / "fused.nii.gz"), "--method", "laplacian", "--batch-size", "1",
         "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:  # wait until slices are being fused
            event = json.loads(line)
            if event.get("event") == "progress" and 0 < event["done"] < event["total"]:
                break
        # Freeze it first so a fast machine cannot finish the fusion before the SIGTERM lands.
        process.send_signal(signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "medfusion: terminated"
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # no output, no temp file beside it
    assert list(private_tmp.iterdir()) == []
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs} == before


def test_sigterm_handler_is_only_active_while_main_runs(tmp_path: Path, capsys) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["fuse", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "-o", str(tmp_path / "o.png")]) == 1  # fmt: skip
    capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_while_an_output_is_written_removes_its_temp_file(tmp_path: Path,
                                                                  spm12: Path) -> None:  # fmt: skip
    """A real SIGTERM to this process while the temporary file beside the output exists: the
    handler ``main`` installs raises, the atomic writer removes the temporary file."""
    import SimpleITK as sitk

    from medfusion.cli import Terminated, signals_raise
    from medfusion.io.atomic import atomic_output

    target = tmp_path / "fused.nii.gz"
    with pytest.raises(Terminated), signals_raise():
        with atomic_output(target) as temporary:
            sitk.WriteImage(sitk.ReadImage(str(spm12 / "T1.nii")), str(temporary))
            assert temporary.parent == tmp_path and temporary.stat().st_size > 0
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler raises at the next bytecode; never loops long
                time.sleep(0.01)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_an_import_waits_for_the_import(tmp_path: Path, monkeypatch,
                                                        signum: int) -> None:
    """A Ctrl-C or SIGTERM that lands while a module is imported (torch's import runs Python
    code called from C++, which an exception cannot pass: the process aborted, exit -6) is
    delivered again once the import is done: the module is whole, then the interrupt comes."""
    import importlib
    import sys

    from medfusion.cli import Terminated, signals_raise

    (tmp_path / "slow_module_for_signals.py").write_text(
        "import os, signal, time\n"
        f"os.kill(os.getpid(), {int(signum)})\n"
        "for _ in range(30):\n"
        "    time.sleep(0.01)  # the handler runs here, inside the import\n"
        "DONE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    imported = None
    with pytest.raises(expected), signals_raise():
        imported = importlib.import_module("slow_module_for_signals")
        for _ in range(1000):  # the signal comes again 50 ms after the import
            time.sleep(0.01)
    sys.modules.pop("slow_module_for_signals", None)
    assert imported is not None and imported.DONE
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_after_a_finished_command_leaves_its_success(tmp_path: Path,
                                                              aanlib: Path) -> None:
    """SIGTERM during the interpreter's teardown, after the fused image was written and the
    command had returned 0: the process died with 143 and the fused image in place (a caller
    took a finished fusion for a terminated one). The entry point ignores it there."""
    inputs = [aanlib / "PET-MRI" / m / NAMES[0] for m in ("MRI", "PET")]
    output = tmp_path / "fused.png"
    script = ("import atexit, os, signal, sys; "
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM)); "
              "sys.argv = ['medfusion', *sys.argv[1:]]; "
              "from medfusion.cli import run; run()")
    done = subprocess.run(
        [sys.executable, "-c", script, "fuse", *map(str, inputs), "-o", str(output),
         "--method", "average"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert output.is_file()
