"""Static checks of the 3D Slicer "Fuse Volumes" module (Slicer cannot run here).

They keep the shell honest: the module and its library compile; the library stays free of
Slicer imports; every widget the code uses exists in the .ui file with the right class; the
parameter node's fields are bound to widgets that can represent them; and the CMake lists name
every script and resource that exists, and nothing that does not.
"""

from __future__ import annotations

import ast
import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MedFusionExtension" / "FuseVolumes"
MODULE_PY = MODULE_DIR / "FuseVolumes.py"
LIB_DIR = MODULE_DIR / "FuseVolumesLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "FuseVolumes.ui"

# Widget name suffix -> the class the code expects (it calls that class's API on it).
CLASS_BY_SUFFIX = (
    ("CollapsibleButton", "ctkCollapsibleButton"),
    ("Selector", "qMRMLNodeComboBox"),
    ("ComboBox", "QComboBox"),
    ("SpinBox", "QSpinBox"),
    ("PathLineEdit", "ctkPathLineEdit"),
    ("Button", "QPushButton"),
    ("ProgressBar", "QProgressBar"),
    ("progressBar", "QProgressBar"),
    ("Label", "QLabel"),
    ("CheckBox", "QCheckBox"),
)
QT_CLASSES = {"QComboBox", "QSpinBox", "QPushButton", "QProgressBar", "QLabel", "QCheckBox",
              "QLineEdit", "QWidget"}


def ui_widgets() -> dict[str, str]:
    """Widget name -> class, for every widget in the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def ui_parameter_bindings() -> dict[str, tuple[str, str]]:
    """SlicerParameterName -> (widget name, widget class)."""
    root = ET.parse(UI_FILE).getroot()
    bindings = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[prop.findtext("string")] = (widget.get("name"), widget.get("class"))
    return bindings


def parameter_fields() -> dict[str, ast.expr]:
    """Field name -> annotation of the @parameterNodeWrapper class in FuseVolumes.py."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id: s.annotation for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in FuseVolumes.py")


def expected_class(name: str) -> str:
    for suffix, cls in CLASS_BY_SUFFIX:
        if name.endswith(suffix):
            return cls
    raise AssertionError(f"widget name {name!r} does not say what it is (no known suffix)")


def test_module_and_library_compile(tmp_path):
    files = [MODULE_PY, *sorted(LIB_DIR.glob("*.py"))]
    assert len(files) >= 7
    for index, path in enumerate(files):
        py_compile.compile(str(path), cfile=str(tmp_path / f"{index}.pyc"), doraise=True)


def test_library_has_no_slicer_imports():
    banned = {"slicer", "qt", "ctk", "vtk", "__main__"}
    for path in LIB_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
    # and it really imports in a plain interpreter without pulling any of them in
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import FuseVolumesLib; "
            "bad = {'slicer', 'qt', 'ctk', 'vtk', 'torch', 'medfusion'} & set(sys.modules); "
            "print(sorted(bad)); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_ui_name_used_exists_with_the_right_class():
    source = MODULE_PY.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", source))
    widgets = ui_widgets()
    assert {"applyButton", "progressBar", "statusLabel", "bundlePathLineEdit"} <= used
    for name in sorted(used):
        assert name in widgets, f"self.ui.{name} is not in FuseVolumes.ui"
        assert widgets[name] == expected_class(name), (name, widgets[name])
    # and no widget is orphaned: each is used by the code or bound to a parameter
    bound = {widget for widget, _ in ui_parameter_bindings().values()}
    for name, cls in widgets.items():
        if cls in ("QLabel", "qMRMLWidget") and name not in used:
            continue  # form labels and the top-level widget
        assert name in used or name in bound, f"{name} in the .ui is neither used nor bound"
        assert cls == expected_class(name), (name, cls)
    # the top-level widget is a qMRMLWidget (setMRMLScene is called on it)
    assert ET.parse(UI_FILE).getroot().find("widget").get("class") == "qMRMLWidget"


def test_custom_widgets_declared_and_node_selectors_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    for name, cls in ui_widgets().items():
        if cls not in QT_CLASSES:
            assert cls in declared, f"{name}: {cls} not declared in <customwidgets>"
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n for n, c in ui_widgets().items() if c == "qMRMLNodeComboBox"}
    assert len(selectors) == 6
    assert selectors <= connected, f"no scene for {sorted(selectors - connected)}"


def _annotation_kind(annotation: ast.expr) -> tuple[str, str | None]:
    """('node', class) | ('choice', None) | ('int', None) | ('str', None) | ..."""
    if isinstance(annotation, ast.Name):
        if annotation.id.startswith("vtkMRML"):
            return "node", annotation.id
        return annotation.id, None
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        elements = annotation.slice.elts  # type: ignore[attr-defined]
        base = elements[0].id
        validators = {getattr(e.func, "id", "") for e in elements[1:] if isinstance(e, ast.Call)}
        if base == "str" and "Choice" in validators:
            return "choice", None
        return base, None
    raise AssertionError(f"unexpected annotation {ast.dump(annotation)}")


def test_parameter_node_fields_bound_to_fitting_widgets():
    fields = parameter_fields()
    bindings = ui_parameter_bindings()
    root = ET.parse(UI_FILE).getroot()
    node_types = {
        w.get("name"): [s.text for p in w.findall("property") if p.get("name") == "nodeTypes"
                        for s in p.iter("string")]
        for w in root.iter("widget")
    }
    widget_for = {"choice": "QComboBox", "int": "QSpinBox", "float": "QDoubleSpinBox",
                  "bool": "QCheckBox", "str": "QLineEdit", "Path": "ctkPathLineEdit"}
    for parameter, (widget, cls) in bindings.items():
        assert parameter in fields, f"{widget} is bound to unknown parameter {parameter!r}"
        kind, node_class = _annotation_kind(fields[parameter])
        if kind == "node":
            assert cls == "qMRMLNodeComboBox", (parameter, cls)
            assert node_types[widget] == [node_class], (parameter, node_types[widget])
        else:
            assert cls == widget_for[kind], (parameter, kind, cls)
    unbound = set(fields) - set(bindings)
    # bundleFolder is a str ("" = shipped bundle) synced by hand with the ctkPathLineEdit
    assert unbound == {"bundleFolder"}, unbound
    source = MODULE_PY.read_text(encoding="utf-8")
    assert "bundlePathLineEdit.currentPath = node.bundleFolder" in source
    assert "self._parameterNode.bundleFolder = path" in source


def test_choices_match_the_core_cli():
    """The panel offers exactly the methods, axes and devices the core's CLI accepts."""
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from FuseVolumesLib import AXES, DEVICES, METHODS
    finally:
        sys.path.remove(str(MODULE_DIR))
    from medfusion.cli import build_parser

    parser = build_parser()
    fuse = parser._subparsers._group_actions[0].choices["fuse"]  # noqa: SLF001
    options = {a.dest: a for a in fuse._actions}  # noqa: SLF001
    assert set(options["method"].choices) == set(METHODS)
    assert set(options["axis"].choices) == set(AXES)
    for flag in ("bundle", "block_exponent", "batch_size", "metrics", "progress", "device"):
        assert flag in options, f"medfusion fuse lost --{flag.replace('_', '-')}"
    assert "json" in options["progress"].choices
    assert DEVICES == ("auto", "cpu", "cuda")


CMAKE_DRIVER = r"""
set(BUILD_TESTING ON)
set(_empty "${RECORD}.empty.cmake")
file(WRITE "${_empty}" "")
set(Slicer_USE_FILE "${_empty}")
set(Slicer_EXTENSION_GENERATE_CONFIG "${_empty}")
set(Slicer_EXTENSION_CPACK "${_empty}")
macro(project)
endmacro()
macro(find_package)
endmacro()
function(_record key value)
  file(APPEND "${RECORD}" "${key}\t${CURRENT_DIR}\t${value}\n")
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  _record(NAME "${M_NAME}")
  foreach(item IN LISTS M_SCRIPTS)
    _record(SCRIPT "${item}")
  endforeach()
  foreach(item IN LISTS M_RESOURCES)
    _record(RESOURCE "${item}")
  endforeach()
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(T "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  _record(UNITTEST "${T_TESTNAME_PREFIX}${T_SCRIPT}")
endfunction()
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer/qt-scripted-modules")
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer/qt-scripted-modules")
set(CMAKE_BINARY_DIR "${RECORD}.build")
function(install)
  cmake_parse_arguments(I "" "DESTINATION;COMPONENT" "FILES" ${ARGN})
  foreach(item IN LISTS I_FILES)
    _record(INSTALL "${I_DESTINATION}|${item}")
  endforeach()
endfunction()
function(configure_file)
endfunction()
function(add_subdirectory dir)
  set(CURRENT_DIR "${CURRENT_DIR}/${dir}")
  set(CMAKE_CURRENT_SOURCE_DIR "${CURRENT_DIR}")
  _record(SUBDIR "${dir}")
  include("${CURRENT_DIR}/CMakeLists.txt")
endfunction()
set(CMAKE_CURRENT_SOURCE_DIR "${CURRENT_DIR}")
include("${CURRENT_DIR}/CMakeLists.txt")
foreach(var IN ITEMS EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS
        EXTENSION_DESCRIPTION EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  _record(META "${var}=${${var}}")
endforeach()
"""


def _cmake_records(tmp_path: Path) -> list[tuple[str, Path, str]]:
    """Run the real CMake lists under stubs of Slicer's macros; return what they declared."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    driver = tmp_path / "driver.cmake"
    driver.write_text(CMAKE_DRIVER, encoding="utf-8")
    record = tmp_path / "record.tsv"
    done = subprocess.run(["cmake", f"-DRECORD={record}", f"-DCURRENT_DIR={REPO}", "-P",
                           str(driver)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in record.read_text(encoding="utf-8").splitlines()]
    return [(key, Path(folder), value) for key, folder, value in rows]


def test_cmake_lists_name_every_file_and_nothing_missing(tmp_path):
    records = _cmake_records(tmp_path)
    by_key: dict[str, list[tuple[Path, str]]] = {}
    for key, folder, value in records:
        by_key.setdefault(key, []).append((folder, value))
    assert [v for _, v in by_key["NAME"]] == ["FuseVolumes"]
    scripts = {(folder / v).resolve() for folder, v in by_key["SCRIPT"]}
    resources = {(folder / v).resolve() for folder, v in by_key["RESOURCE"]}
    existing_scripts = {p.resolve() for p in MODULE_DIR.rglob("*.py")
                        if "Testing" not in p.relative_to(MODULE_DIR).parts
                        and "__pycache__" not in p.parts}
    existing_resources = {p.resolve() for p in (MODULE_DIR / "Resources").rglob("*")
                          if p.is_file()}
    assert scripts == existing_scripts
    assert resources == existing_resources
    for folder, value in by_key["UNITTEST"]:
        script = value.removeprefix("nomainwindow_")
        assert (folder / script).resolve() == MODULE_PY.resolve()
    meta = dict(v.split("=", 1) for _, v in by_key["META"])
    assert meta["EXTENSION_CATEGORY"] in {"Filtering", "Quantification"}
    assert meta["EXTENSION_DEPENDS"] == "PyTorch"
    for key in ("EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert meta[key], key
    # no public homepage or hosted images exist yet: empty, never an invented address
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert meta[key] == "" or meta[key].startswith("https://"), key
    assert "Slicer 5.10" in meta["EXTENSION_DESCRIPTION"]


def test_icon_is_a_real_small_png():
    import numpy as np
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "FuseVolumes.png") as icon:
        assert icon.format == "PNG"
        assert icon.size[0] == icon.size[1] and 64 <= icon.size[0] <= 256
        pixels = np.asarray(icon.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 16  # a picture, not a flat square
