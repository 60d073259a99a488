"""FuseVolumesLib's background runner against the real ``python -m medfusion fuse``.

Small NRRD volumes are written with SimpleITK; the runner starts the real command line, parses
its JSON progress, and moves the staged outputs into place. Cancel, core errors and the CUDA
fallback are exercised on the real process too. ``--method average`` keeps it fast.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedFusionExtension" / "FuseVolumes"))

from FuseVolumesLib import (  # noqa: E402
    FuseRequest,
    FusionProcess,
    build_fuse_command,
    explain_failure,
    extract_warnings,
    parse_progress_line,
    read_metrics_csv,
)
from FuseVolumesLib.messages import cuda_unavailable  # noqa: E402


def write_volume(path: Path, array: np.ndarray, origin=(-20.0, 10.0, 4.0),
                 spacing=(0.9, 1.1, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated in-plane
    sitk.WriteImage(image, str(path))
    return path


def phantom(shape=(8, 48, 56), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like ramp and an MRI-like blob, both with real structure."""
    k, j, i = np.indices(shape, dtype=np.float32)
    rng = np.random.default_rng(seed)
    ramp = i * 20.0 - 300.0 + rng.normal(0, 5, shape)
    centre = np.array(shape) / 2
    radius = np.sqrt(((k - centre[0]) * 3) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    blob = np.where(radius < 15, 900.0, 150.0) + rng.normal(0, 10, shape)
    return ramp, blob


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Files and folders in ``folder`` other than ``keep`` (staging folders, temp files)."""
    return sorted(name for name in os.listdir(folder) if name not in keep)


def test_runner_fuses_with_progress_and_staged_outputs(tmp_path):
    ramp, blob = phantom()
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    output, metrics = tmp_path / "out" / "fused.nrrd", tmp_path / "out" / "metrics.csv"
    request = FuseRequest(reference, [other], output, metrics, method="average", device="cpu",
                          batch_size=3)
    process = FusionProcess(request)
    events = []
    process.start()
    assert process.running
    result = process.wait(timeout=120, on_event=events.append)

    assert result.ok, result.message + "\n".join(result.stderr)
    assert not process.running
    progress = [e for e in events if e.kind == "progress"]
    assert [e.done for e in progress] == [3, 6, 8]
    assert {e.total for e in progress} == {8}
    assert progress[-1].fraction == 1.0
    assert [e.kind for e in events if e.kind in ("progress", "done")][-1] == "done"
    assert result.output == output and result.metrics == metrics

    fused = sitk.ReadImage(str(output))
    ref = sitk.ReadImage(str(reference))
    assert fused.GetSize() == ref.GetSize()
    assert np.allclose(fused.GetOrigin(), ref.GetOrigin())
    assert np.allclose(fused.GetSpacing(), ref.GetSpacing())
    assert np.allclose(fused.GetDirection(), ref.GetDirection())
    values = sitk.GetArrayFromImage(fused)
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 0.05

    table = read_metrics_csv(metrics)
    assert table.columns[0] == "slice" and len(table.columns) > 5
    assert table.column("slice")[-1] == "mean"
    assert all(table.numeric[1:])
    assert len(table.rows) == 9  # 8 slices with content + the mean row
    assert leftovers(output.parent, {"fused.nrrd", "metrics.csv"}) == []


def test_runner_cancel_stops_the_process_and_leaves_nothing(tmp_path):
    ramp, blob = phantom(shape=(120, 96, 96))
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    output = tmp_path / "fused.nrrd"
    request = FuseRequest(reference, [other], output, tmp_path / "metrics.csv",
                          method="average", device="cpu", batch_size=1)
    process = FusionProcess(request, grace_seconds=10)
    process.start()
    deadline = time.monotonic() + 90
    while process.last_progress is None and process.result is None:
        process.poll()
        assert time.monotonic() < deadline, "no progress from medfusion fuse"
        time.sleep(0.05)
    assert process.result is None, process.result.message
    assert process.last_progress.done < process.last_progress.total
    pid = process.pid
    process.cancel()
    result = process.wait(timeout=60)

    assert result.status == "cancelled"
    assert result.message == "Fusion cancelled."
    assert result.returncode == 130  # the CLI saw Ctrl-C and cleaned up, no kill needed
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left of its process group either
    assert not output.exists()
    assert leftovers(tmp_path, {"ct.nrrd", "mr.nrrd"}) == []


def test_output_names_that_clash_are_refused_before_anything_runs(tmp_path):
    """The runner stages the outputs, so the core never saw these names: an output named as the
    reference overwrote it (reported as success); a decision map named as the output was lost."""
    ramp, blob = phantom(shape=(4, 32, 32))
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    before = {p.name: p.read_bytes() for p in (reference, other)}
    clashes = {
        "would overwrite an input": dict(output=reference),
        "would overwrite an input ": dict(output=tmp_path / "o.nrrd", decision_map=other),
        "have one name": dict(output=tmp_path / "o.nrrd", decision_map=tmp_path / "o.nrrd"),
    }
    for message, names in clashes.items():
        request = FuseRequest(reference, [other], method="sesf", device="cpu", **names)
        with pytest.raises(ValueError, match=message.strip()):
            FusionProcess(request)
    assert {p.name: p.read_bytes() for p in (reference, other)} == before
    assert leftovers(tmp_path, {"ct.nrrd", "mr.nrrd"}) == []


def test_runner_stages_the_decision_map(tmp_path):
    """The decision map is written in the staging folder like the fused volume (a cancel or a
    failure after it was written left it in place), and moved beside it on success. Each staged
    output has its own folder: a fused volume asked for as ``decision-map.nrrd`` beside a
    decision map ``map.nrrd`` met there under one name (a false "one name" failure). Messages
    name the outputs as asked, and leave the inputs' names alone (an input named
    ``fused-decision-map.nrrd`` was told as ``decision-map.nrrd``)."""
    ramp, blob = phantom(shape=(3, 32, 32))
    reference = write_volume(tmp_path / "fused-decision-map.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    output, decision = tmp_path / "decision-map.nrrd", tmp_path / "map.nrrd"
    request = FuseRequest(reference, [other], output, method="sesf", device="cpu",
                          decision_map=decision)
    process = FusionProcess(request)
    process.start()
    staged = Path(process.command[process.command.index("--save-decision-map") + 1])
    staged_output = Path(process.command[process.command.index("-o") + 1])
    staging = staged.parent.parent
    assert staging != tmp_path and staging.parent == tmp_path
    assert staged_output.parent.parent == staging and staged_output.parent != staged.parent
    assert (staged.name, staged_output.name) == (decision.name, output.name)
    told = process._as_asked(f"cannot write {staged_output}, {staged} or {staging}/x; "
                             f"read {reference} and {other}")
    assert told == (f"cannot write {output}, {decision} or {tmp_path}/x; "
                    f"read {reference} and {other}")
    result = process.wait(timeout=300)
    assert result.ok, result.message + "\n".join(result.stderr)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(decision)))
    assert set(np.unique(labels)) <= {1, 2}
    assert sitk.ReadImage(str(output)).GetSize() == (32, 32, 3)
    assert leftovers(tmp_path, {reference.name, "mr.nrrd", output.name, decision.name}) == []


def test_metrics_in_another_folder_or_file_system(tmp_path):
    """The metrics file goes where it is asked for: a folder that does not exist yet, or another
    file system (os.replace raised there: an exception out of poll(), then "wrote no fused
    volume" although the fused volume was in place)."""
    ramp, blob = phantom(shape=(3, 32, 32))
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    elsewhere = Path("/dev/shm")
    other_fs = elsewhere.is_dir() and os.stat(elsewhere).st_dev != os.stat(tmp_path).st_dev
    folders = [tmp_path / "new" / "folder"]
    if other_fs and os.access(elsewhere, os.W_OK):
        folders.append(Path(tempfile.mkdtemp(dir=elsewhere)))
    try:
        for index, folder in enumerate(folders):
            output, metrics = tmp_path / f"fused{index}.nrrd", folder / "metrics.csv"
            request = FuseRequest(reference, [other], output, metrics, method="average",
                                  device="cpu")
            process = FusionProcess(request)
            process.start()
            result = process.wait(timeout=120)
            assert result.ok, result.message
            assert result.output == output and output.is_file()
            assert result.metrics == metrics and read_metrics_csv(metrics).rows
            assert leftovers(folder, {"metrics.csv"}) == []
    finally:
        if len(folders) > 1:
            shutil.rmtree(folders[1], ignore_errors=True)


def test_json_metrics_name_the_fused_volume_as_asked(tmp_path):
    """The core writes the metrics beside the staged volume and names that one in the JSON's
    ``output``: the runner names the volume the user asked for (it named the staging folder,
    deleted by then)."""
    ramp, blob = phantom(shape=(3, 32, 32))
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    output, metrics = tmp_path / "fused.nrrd", tmp_path / "metrics.json"
    process = FusionProcess(FuseRequest(reference, [other], output, metrics, method="average",
                                        device="cpu"))
    process.start()
    result = process.wait(timeout=120)
    assert result.ok, result.message
    payload = json.loads(metrics.read_text(encoding="utf-8"))
    assert payload["output"] == str(output)
    assert payload["inputs"] == [str(reference), str(other)] and payload["metrics"]


def test_runner_reports_non_overlapping_inputs(tmp_path):
    ramp, blob = phantom()
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    far = write_volume(tmp_path / "mr.nrrd", blob, origin=(500.0, 500.0, 500.0))
    request = FuseRequest(reference, [far], tmp_path / "fused.nrrd", method="average",
                          device="cpu")
    process = FusionProcess(request)
    process.start()
    result = process.wait(timeout=120)
    assert result.status == "failed" and result.returncode == 1
    assert "overlap" in result.message
    assert "co-registered" in result.message  # the module's hint after the core's message
    assert leftovers(tmp_path, {"ct.nrrd", "mr.nrrd"}) == []


def test_failure_messages_name_the_files_asked_for_not_the_staged_ones(tmp_path):
    """The runner writes into a staging folder; a message of the core about an output names
    the file the user asked for (it named ``.medfusion-staging-.../metrics-stats.txt``)."""
    ramp, blob = phantom()
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    request = FuseRequest(reference, [other], tmp_path / "fused.nrrd", tmp_path / "stats.txt",
                          method="average", device="cpu")
    process = FusionProcess(request)
    process.start()
    result = process.wait(timeout=120)
    assert result.status == "failed"
    assert "not stats.txt" in result.message, result.message
    assert "staging" not in result.message and "metrics-" not in result.message
    assert leftovers(tmp_path, {"ct.nrrd", "mr.nrrd"}) == []


def test_runner_reports_a_missing_bundle(tmp_path):
    ramp, blob = phantom()
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    request = FuseRequest(reference, [other], tmp_path / "fused.nrrd", method="cnn",
                          bundle_dir=tmp_path / "no-such-bundle", device="cpu")
    process = FusionProcess(request)
    process.start()
    result = process.wait(timeout=120)
    assert result.status == "failed"
    assert "no-such-bundle" in result.message
    assert "bundle shipped with MedFusion" in result.message


def test_runner_falls_back_to_cpu_when_cuda_is_absent(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    ramp, blob = phantom()
    reference = write_volume(tmp_path / "ct.nrrd", ramp)
    other = write_volume(tmp_path / "mr.nrrd", blob)
    request = FuseRequest(reference, [other], tmp_path / "fused.nrrd", method="average",
                          device="cuda")
    process = FusionProcess(request)
    events = []
    process.start()
    result = process.wait(timeout=120, on_event=events.append)
    assert result.ok, result.message
    assert any("CUDA" in w and "CPU" in w for w in result.warnings)
    assert any(e.kind == "warning" for e in events)
    assert (tmp_path / "fused.nrrd").is_file()


def test_build_command_only_sends_model_options_to_learned_methods(tmp_path):
    base = dict(reference=tmp_path / "a.nrrd", others=[tmp_path / "b.nrrd"],
                output=tmp_path / "o.nrrd", bundle_dir=tmp_path / "bundle", block_exponent=2,
                batch_size=4, metrics=tmp_path / "m.csv")
    cnn = build_fuse_command(FuseRequest(**base, method="cnn"), python="py")
    assert cnn[:4] == ["py", "-m", "medfusion", "fuse"]
    assert cnn[cnn.index("--bundle") + 1] == str(tmp_path / "bundle")
    assert cnn[cnn.index("--block-exponent") + 1] == "2"
    assert cnn[-2:] == ["--progress", "json"]
    sesf = build_fuse_command(FuseRequest(**base, method="sesf"), python="py")
    assert sesf[sesf.index("--block-exponent") + 1] == "2"  # the combo applies to sesf too
    assert "--bundle" not in sesf  # the folder field is a cnn bundle
    average = build_fuse_command(FuseRequest(**base, method="average"), python="py")
    assert "--bundle" not in average and "--block-exponent" not in average
    assert average[average.index("--batch-size") + 1] == "4"
    defaults = build_fuse_command(FuseRequest(base["reference"], base["others"], base["output"]))
    assert "--batch-size" not in defaults and "--metrics" not in defaults
    with pytest.raises(ValueError, match="at least one other"):
        FuseRequest(base["reference"], [], base["output"]).validate()
    with pytest.raises(ValueError, match="At most 4"):
        FuseRequest(base["reference"], [tmp_path / f"{i}.nrrd" for i in range(4)],
                    base["output"]).validate()
    with pytest.raises(ValueError, match="twice"):
        FuseRequest(base["reference"], [base["reference"]], base["output"]).validate()


def test_progress_lines_parse():
    event = parse_progress_line('{"event": "progress", "done": 3, "total": 12}\n')
    assert (event.kind, event.done, event.total, event.fraction) == ("progress", 3, 12, 0.25)
    done = parse_progress_line('{"event": "done", "output": "/x/fused.nrrd"}')
    assert done.kind == "done" and done.output == "/x/fused.nrrd"
    assert parse_progress_line("   \n") is None
    assert parse_progress_line("loading bundle").kind == "log"
    assert parse_progress_line("[1, 2]").kind == "log"
    assert parse_progress_line('{"event": "progress", "done": "x"}').kind == "log"
    # an infinite count raised OverflowError, which ended the runner's stdout reader thread
    assert parse_progress_line('{"event": "progress", "done": 1e400, "total": 3}').kind == "log"
    assert parse_progress_line('{"event": "progress", "done": -2, "total": 3}').fraction == 0.0


def test_failure_messages_from_real_stderr():
    oom = ["Traceback (most recent call last):",
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
           "7.79 GiB total capacity; 5.12 GiB already allocated)"]
    assert "smaller batch size" in explain_failure(1, oom, "cuda")
    assert "CPU" in explain_failure(1, oom, "cuda")
    assert "smaller batch size" in explain_failure(-9, [], "cpu")  # OOM killer
    cpu_oom = ["RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
               "can't allocate memory: you tried to allocate 8589934592 bytes."]
    assert "block size" in explain_failure(1, cpu_oom, "cpu")
    assert explain_failure(130, ["medfusion: cancelled"]) == "Fusion cancelled."
    missing = ["ModuleNotFoundError: No module named 'monai'"]
    assert "'monai' is missing" in explain_failure(1, missing)
    usage = ["usage: medfusion fuse ...", "medfusion fuse: error: unrecognized arguments: --x"]
    assert "does not accept" in explain_failure(2, usage)
    assert "exit code 3" in explain_failure(3, ["boom"])
    cuda = ["medfusion: error: device 'cuda' requested but no CUDA GPU is available; use cpu"]
    assert cuda_unavailable(cuda)
    assert not cuda_unavailable(["medfusion: error: CNN bundle folder not found: /x"])
    warnings = extract_warnings(["medfusion: wrote /x.nrrd",
                                 "medfusion: CUDA is not available, falling back to CPU",
                                 "UserWarning: something deprecated",
                                 "medfusion: error: nope"])
    assert warnings == ["CUDA is not available, falling back to CPU",
                        "UserWarning: something deprecated"]


def test_metrics_csv_without_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("metric,value\nEN,7.1\nSSIM,\nQABF,0.61\n", encoding="utf-8")
    table = read_metrics_csv(path)
    assert table.columns == ["metric", "value"] and table.numeric == [False, True]
    assert table.column("metric") == ["EN", "SSIM", "QABF"]
    assert table.column("value")[0] == pytest.approx(7.1)
    assert np.isnan(table.column("value")[1])
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_metrics_csv(tmp_path / "empty.csv")
