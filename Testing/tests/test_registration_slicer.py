"""The Slicer module's registration path, without Slicer: the "Register first" request runs the
real ``medfusion fuse --register rigid --save-transforms`` background process, and a misaligned
input without it comes back as a warning that names the panel's check box."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedFusionExtension" / "FuseVolumes"))

from FuseVolumesLib import FuseRequest, FusionProcess, build_fuse_command  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tcga: Path, tmp_path_factory) -> list[Path]:
    """t1 and flair of TCGA-FG-6692, binned 2x2 in-plane, named as the module names them."""
    folder = tmp_path_factory.mktemp("slicer-inputs")
    paths = []
    for index, name in enumerate(("t1", "flair")):
        image = sitk.BinShrink(sitk.ReadImage(str(tcga / f"{name}.nii.gz")), [2, 2, 1])
        path = folder / f"input{index}.nrrd"
        sitk.WriteImage(image, str(path))
        paths.append(path)
    return paths


def test_register_first_adds_options_only_when_chosen(tmp_path: Path) -> None:
    plain = FuseRequest(reference=tmp_path / "a.nrrd", others=[tmp_path / "b.nrrd"],
                        output=tmp_path / "f.nrrd", transforms_dir=tmp_path)
    assert "--register" not in build_fuse_command(plain)
    chosen = FuseRequest(reference=tmp_path / "a.nrrd", others=[tmp_path / "b.nrrd"],
                         output=tmp_path / "f.nrrd", register="rigid", transforms_dir=tmp_path)
    command = build_fuse_command(chosen)
    assert command[command.index("--register") + 1] == "rigid"
    assert command[command.index("--save-transforms") + 1] == str(tmp_path)
    with pytest.raises(ValueError, match="registration"):
        FuseRequest(reference=tmp_path / "a.nrrd", others=[tmp_path / "b.nrrd"],
                    output=tmp_path / "f.nrrd", register="elastic").validate()


def test_misaligned_input_warns_with_panel_hint_then_register_first_aligns(
    inputs: list[Path], tmp_path: Path
) -> None:
    request = FuseRequest(reference=inputs[0], others=[inputs[1]],
                          output=tmp_path / "plain.nrrd", method="average",
                          transforms_dir=tmp_path)
    result = _run(request)
    assert result.ok, result.message + "\n".join(result.stderr)
    misaligned = [w for w in result.warnings if "misaligned" in w]
    assert len(misaligned) == 1 and "Register first" in misaligned[0]

    request = FuseRequest(reference=inputs[0], others=[inputs[1]],
                          output=tmp_path / "registered.nrrd", method="average",
                          register="rigid", transforms_dir=tmp_path)
    result = _run(request)
    assert result.ok, result.message + "\n".join(result.stderr)
    assert not [w for w in result.warnings if "misaligned" in w]
    transform = sitk.ReadTransform(str(tmp_path / "input1.tfm"))
    assert transform.GetNumberOfParameters() == 6  # rigid: 3 rotations, 3 translations
    assert (tmp_path / "registered.nrrd").is_file()


def _run(request: FuseRequest):
    process = FusionProcess(request)
    process.start()
    return process.wait(timeout=300)
