"""All of a command's outputs or none: ``fuse`` (fused image, metrics, decision map), ``demo``
(fused image, panel, metrics, its folder) and ``benchmark`` (the report folder) write to
temporary places and commit together; a failure part-way leaves nothing new, and outputs that
were there before keep their content. An unwritable report folder is refused before any work.

The faults are real: a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored, so a write past it
fails with EFBIG as on a full disk) chosen from a first, unlimited run so that the command's
first output fits and a later one does not; a path under a regular file (ENOTDIR); a folder
where a file is to be renamed (EISDIR).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_reliability_cli import _digests, _one_error_line

from medfusion.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
PAIR = ("CT-MRI", ("CT", "MRI"), "2004.png")  # greyscale: no colour, small PNGs


def _run(args: list[str], cwd: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    """``python -m medfusion ARGS`` in a real process; with ``limit``, no file it writes may
    grow past ``limit`` bytes (the write fails with EFBIG, like a full disk)."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(
        [sys.executable, "-m", "medfusion", *args], cwd=cwd, capture_output=True, text=True,
        timeout=300, preexec_fn=None if limit is None else limited,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def _between(fits: int, fails: int) -> int:
    """A size limit that the file of ``fits`` bytes passes and the one of ``fails`` does not."""
    assert fits < fails, (fits, fails)
    return (fits + fails) // 2


def _files(folder: Path) -> set[str]:
    """Every file and folder under ``folder`` (hidden temporaries included)."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one ``medfusion: error:`` line of a failed run (other log lines may precede it)."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("medfusion: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


@pytest.fixture
def small_pair(aanlib: Path, tmp_path: Path) -> list[Path]:
    """A 48x48 crop of a real CT-MRI pair, in folders with long names: the metrics JSON (which
    lists the inputs' paths) is then larger than the fused PNG that is written before it."""
    pair, modalities, name = PAIR
    folder = tmp_path / ("inputs-" + "d" * 190) / ("e" * 200)
    folder.mkdir(parents=True)
    paths = []
    for modality in modalities:
        with Image.open(aanlib / pair / modality / name) as image:
            image.crop((104, 104, 152, 152)).save(folder / f"{modality}.png")
        paths.append(folder / f"{modality}.png")
    return paths


# --------------------------------------------------------------------------- fuse
@pytest.mark.parametrize("existing", [False, True], ids=["new outputs", "over old outputs"])
def test_fuse_metrics_that_cannot_be_written_leave_no_fused_image(
        small_pair: Path, tmp_path: Path, existing: bool) -> None:
    """``fuse --metrics``: the fused image was written, then the metrics file failed (full
    disk), and the fused image was left beside exit 1. Now neither is left, and a fused image
    and metrics file of an earlier run keep their content."""
    first = tmp_path / "first"
    first.mkdir()
    args = [*map(str, small_pair), "-o", "out/f.png", "--method", "average", "--metrics",
            "out/m.json", "--progress", "none"]
    (first / "out").mkdir()
    done = _run(["fuse", *args], cwd=first)
    assert done.returncode == 0, done.stderr
    limit = _between((first / "out/f.png").stat().st_size, (first / "out/m.json").stat().st_size)

    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    if existing:
        (run / "out/f.png").write_bytes(b"the fused image of an earlier run")
        (run / "out/m.json").write_text('{"metrics": "of an earlier run"}')
    before = _digests(run / "out")
    done = _run(["fuse", *args], cwd=run, limit=limit)
    assert done.returncode == 1
    assert _one_error_line(done.stderr) == "medfusion: error: cannot write m.json: File too large"
    assert _digests(run / "out") == before
    assert _files(run / "out") == set(before)  # no temporary file or folder either

    done = _run(["fuse", *args], cwd=run)  # without the fault: both replaced, nothing else
    assert done.returncode == 0, done.stderr
    assert _files(run / "out") == {"f.png", "m.json"}
    assert _digests(run / "out") == _digests(first / "out")


def test_fuse_decision_map_that_cannot_be_written_leaves_no_fused_image(
        small_pair: Path, tmp_path: Path) -> None:
    """``fuse --method sesf --save-decision-map``: the decision map (written after the fused
    image) failed, and the fused image stayed. Now nothing is left."""
    args = [*map(str, small_pair), "-o", "f.png", "--method", "sesf", "--device", "cpu",
            "--save-decision-map", "dm.bmp", "--progress", "none"]
    first, run = tmp_path / "first", tmp_path / "run"
    first.mkdir()
    run.mkdir()
    done = _run(["fuse", *args], cwd=first)
    assert done.returncode == 0, done.stderr
    limit = _between((first / "f.png").stat().st_size, (first / "dm.bmp").stat().st_size)
    done = _run(["fuse", *args], cwd=run, limit=limit)
    assert done.returncode == 1
    assert _one_error_line(done.stderr).startswith("medfusion: error: dm.bmp was not written")
    assert _files(run) == set()


# --------------------------------------------------------------------------- demo
def test_demo_that_cannot_write_its_panel_leaves_no_folder(tmp_path: Path) -> None:
    """``demo``: fused.png was written, panel.png failed, and fused.png and the folder the
    command had made were left. Now a folder the command made is removed again, and a folder
    that was there keeps only what it had."""
    first = tmp_path / "first"
    first.mkdir()
    args = ["--method", "average", "--device", "cpu"]
    done = _run(["demo", "-o", "demo", *args], cwd=first)
    assert done.returncode == 0, done.stderr
    assert _files(first / "demo") == {"fused.png", "panel.png", "metrics.json"}
    limit = _between((first / "demo/fused.png").stat().st_size,
                     (first / "demo/panel.png").stat().st_size)

    run = tmp_path / "run"
    (run / "mine").mkdir(parents=True)
    (run / "mine" / "notes.txt").write_text("mine")
    for output in ("new/demo", "mine"):
        done = _run(["demo", "-o", output, *args], cwd=run, limit=limit)
        assert done.returncode == 1
        assert done.stdout == ""
        assert (_one_error_line(done.stderr)
                == "medfusion: error: cannot write panel.png: File too large")
    assert _files(run) == {"mine", "mine/notes.txt"}


# --------------------------------------------------------------------------- benchmark
@pytest.fixture
def dataset(aanlib: Path, tmp_path: Path) -> Path:
    """Two real groups in the ``<PAIR>/<MODALITY>/<name>.png`` layout."""
    root = tmp_path / "dataset"
    for pair, modalities, name in (PAIR, ("PET-MRI", ("MRI", "PET"), "25038.png")):
        for modality in modalities:
            (root / pair / modality).mkdir(parents=True)
            shutil.copy(aanlib / pair / modality / name, root / pair / modality / name)
    return root


BENCHMARK = ["--methods", "average", "--metrics", "QABF,SSIM,EN", "--speed-images", "0",
             "--perturbations", "none", "--block-exponents", "", "--workers", "1",
             "--no-progress"]


def test_benchmark_into_an_unwritable_place_is_one_line_before_any_work(
        dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``-o`` under a regular file (ENOTDIR) or in /proc: a 22-line traceback after all the
    fusing. Now one line before any work, and nothing is written."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    before = _files(tmp_path)
    code = main(["benchmark", str(dataset), "-o", str(a_file / "report"), *BENCHMARK])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert _one_error_line(captured.err) == (
        f"medfusion: error: cannot create the output folder {a_file / 'report'}: "
        f"{a_file} is a file")
    assert _files(tmp_path) == before and a_file.read_text() == "not a folder"

    # Nothing can be created in /proc (root passes the permission check: the real try fails).
    code = main(["benchmark", str(dataset), "-o", "/proc/medfusion-report", *BENCHMARK])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == "" and "/proc" in _one_error_line(captured.err)
    assert not Path("/proc/medfusion-report").exists()


def test_benchmark_that_cannot_write_a_figure_leaves_no_report(dataset: Path,
                                                               tmp_path: Path) -> None:
    """The tables and results.json were written, the first figure failed (full disk): they
    and an empty ``figures/`` were left. Now a new report folder is not created at all, and
    an earlier report (with a file of the user's) stays exactly as it was."""
    first = tmp_path / "first"
    first.mkdir()
    done = _run(["benchmark", str(dataset), "-o", "report", *BENCHMARK], cwd=first)
    assert done.returncode == 0, done.stderr
    report = first / "report"
    sizes = {name: (report / name).stat().st_size for name in _files(report)
             if (report / name).is_file()}
    figures = {name: size for name, size in sizes.items() if name.startswith("figures/")}
    tables = {name: size for name, size in sizes.items() if name not in figures}
    assert {"metrics.csv", "results.json", "report.md"} <= set(tables)
    limit = _between(max(tables.values()), min(figures.values()))

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(report, run / "earlier")
    (run / "earlier" / "notes.txt").write_text("mine")
    (run / "earlier" / "results.json").write_text(json.dumps({"an": "earlier report"}))
    before = _digests(run / "earlier")
    for output in ("new", "earlier"):
        done = _run(["benchmark", str(dataset), "-o", output, *BENCHMARK], cwd=run,
                    limit=limit)
        assert done.returncode == 1
        assert _error_line(done).endswith(": File too large")
    assert _files(run) - {f"earlier/{name}" for name in before} == {"earlier", "earlier/figures"}
    assert _digests(run / "earlier") == before


# --------------------------------------------------------------------------- the commit
def test_output_set_puts_back_old_files_when_a_later_rename_fails(tmp_path: Path) -> None:
    """The commit renames outputs one by one: when a later rename fails (here a folder is
    where the second output goes), the first output's old file comes back, a target that did
    not exist is removed again, and no temporary is left."""
    from medfusion.errors import OutputError
    from medfusion.io.atomic import OutputSet

    (tmp_path / "old.txt").write_text("old")
    with pytest.raises(OutputError, match=r"^cannot write second.txt: Is a directory$"):
        with OutputSet() as outputs:
            for name in ("new.txt", "old.txt", "second.txt"):
                outputs.stage(tmp_path / name).write_text(f"new {name}")
            (tmp_path / "second.txt").mkdir()  # after the check: the rename itself fails
            (tmp_path / "second.txt" / "inside").write_text("keeps the folder non-empty")
    assert _files(tmp_path) == {"old.txt", "second.txt", "second.txt/inside"}
    assert (tmp_path / "old.txt").read_text() == "old"


def test_output_set_commits_and_discards_files_put_in_place_early(tmp_path: Path) -> None:
    """Outputs that their writer puts in place before the commit (``fuse``'s transforms) are
    undone with the others when the command fails, and kept when it succeeds."""
    from medfusion.io.atomic import OutputSet

    (tmp_path / "a.tfm").write_text("old a")
    with pytest.raises(KeyboardInterrupt), OutputSet() as outputs:
        outputs.stage(tmp_path / "fused.png").write_text("fused")
        for name in ("a.tfm", "b.tfm"):
            outputs.protect(tmp_path / name)
            (tmp_path / name).write_text(f"new {name}")
        raise KeyboardInterrupt  # Ctrl-C before the commit
    assert _files(tmp_path) == {"a.tfm"} and (tmp_path / "a.tfm").read_text() == "old a"

    with OutputSet() as outputs:
        outputs.stage(tmp_path / "fused.png").write_text("fused")
        outputs.protect(tmp_path / "a.tfm")
        (tmp_path / "a.tfm").write_text("new a")
    assert _files(tmp_path) == {"a.tfm", "fused.png"}
    assert (tmp_path / "a.tfm").read_text() == "new a"


@pytest.mark.parametrize("moment", ["after the old file was set aside", "before it was"])
def test_an_interrupt_inside_the_commit_keeps_the_old_file_without_hard_links(
        moment: str, tmp_path: Path, monkeypatch) -> None:
    """On a file system without hard links the commit moves the old file aside; a Ctrl-C just
    after (or just before) that move puts it back. It was recorded only after the move, so an
    interrupt between the two lost the user's old file. (The interrupt is raised from the
    step itself: a real SIGINT cannot be aimed at one bytecode.)"""
    from medfusion.io import atomic

    old = tmp_path / "fused.png"
    old.write_text("old")

    def no_hard_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    real_set_aside = atomic._set_aside

    def interrupted(target: Path, backup: Path) -> None:
        if moment.startswith("after"):
            real_set_aside(target, backup)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "link", no_hard_links)
    monkeypatch.setattr(atomic, "_set_aside", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic.OutputSet() as outputs:
        outputs.stage(old).write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["fused.png"] and old.read_text() == "old"
