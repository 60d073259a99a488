"""Fuse Volumes: fuse co-registered CT, MRI, PET and SPECT volumes with MedFusion in 3D Slicer.

The module is a thin shell over the ``medfusion`` core package: the panel collects volumes and
options, the logic writes the volumes to temporary NRRD files and runs ``medfusion fuse`` in a
background process (``FuseVolumesLib.runner``), a ``QTimer`` polls its JSON progress, and the
fused volume and metrics table come back into the scene. Resampling, normalisation, fusion and
metrics are the core's: nothing is computed twice. Volumes loaded from Slicer's DICOM database
(local import, PACS query/retrieve or the DICOMweb browser) are ordinary scalar volume nodes and
work the same way; the results are placed in the reference's study so DICOM export works.
"""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from FuseVolumesLib import (
    AXES,
    BLOCK_EXPONENTS,
    DEVICES,
    LEARNED_METHODS,
    METHODS,
    REQUIREMENTS,
    FuseRequest,
    FusionProcess,
    FusionResult,
    installed_versions,
    plan_installation,
    read_metrics_csv,
)
from FuseVolumesLib.dependencies import (
    CORE,
    find_core_source,
    installed_version,
    run_installation,
)
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Fused intensities are in [0, 1]; DICOM export stores them as integers times this factor.
DICOM_EXPORT_SCALE = 1000


#
# FuseVolumes
#


class FuseVolumes(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Fuse Volumes")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedFusion developers"]
        self.parent.helpText = _(
            "Fuse 2 to 4 co-registered volumes (CT, MRI, PET, SPECT) slice by slice with the"
            " MedFusion CNN (a MONAI bundle) or a classical method, on GPU or CPU. The result is"
            " a fused volume on the reference volume's grid and a table of fusion quality"
            " metrics. Volumes from Slicer's DICOM database work like any other volume; the"
            " fused volume can be exported as a DICOM series in the reference's study."
            " The inputs must already be registered: the physical extents must overlap."
            " Needs Slicer 5.10 or later (Python 3.12). On first use the module asks once, then"
            " installs the Python packages it needs: the MedFusion core and CNN bundle shipped"
            " with the extension, torch through the PyTorch extension, the others from the"
            " package index; Slicer's numpy, SimpleITK and pydicom are never changed."
        )
        self.parent.acknowledgementText = _(
            "MedFusion uses MONAI, PyTorch and SimpleITK. The background-process design follows"
            " SlicerMONAIAuto3DSeg and SlicerTotalSegmentator."
        )


#
# Parameter node
#


@parameterNodeWrapper
class FuseVolumesParameterNode:
    """Everything the panel sets; saved with the scene.

    referenceVolume: the volume whose grid (origin, spacing, direction) the result keeps.
    otherVolume1..3: the volumes fused with it (at least one).
    method: the bundle's CNN, sesf (decision map) or a classical method for comparison.
    bundleFolder: a MONAI bundle folder; empty means the bundle shipped with MedFusion.
    blockExponent: the block size exponent i of cnn and sesf (2^i x 2^i pixel blocks) or
        "default" (the bundle's).
    batchSize: 0 means the core's default.
    device: auto (GPU when available), cpu or cuda.
    outputVolume, metricsTable: where the results go (created when empty).
    """

    referenceVolume: vtkMRMLScalarVolumeNode
    otherVolume1: vtkMRMLScalarVolumeNode
    otherVolume2: vtkMRMLScalarVolumeNode
    otherVolume3: vtkMRMLScalarVolumeNode
    method: Annotated[str, Choice(METHODS)] = "cnn"
    bundleFolder: str = ""
    blockExponent: Annotated[str, Choice(BLOCK_EXPONENTS)] = "default"
    axis: Annotated[str, Choice(AXES)] = "axial"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    batchSize: Annotated[int, WithinRange(0, 1024)] = 0
    registerFirst: bool = False
    outputVolume: vtkMRMLScalarVolumeNode
    metricsTable: vtkMRMLTableNode


def otherVolumes(parameters) -> list:
    """The selected other volumes, in panel order, without empty slots."""
    return [v for v in (parameters.otherVolume1, parameters.otherVolume2, parameters.otherVolume3)
            if v]


#
# FuseVolumesWidget
#


class FuseVolumesWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds widgets to the parameter node, runs and polls the fusion task."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FuseVolumes.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FuseVolumesLogic()

        import ctk

        self.ui.bundlePathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.bundlePathLineEdit.settingKey = "FuseVolumes/BundleFolder"

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicomButton)
        self.ui.bundlePathLineEdit.connect("currentPathChanged(QString)", self.onBundlePathChanged)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self._updateModelWidgets)

        self._setProgress(None)
        self.ui.statusLabel.text = _("Select a reference volume and at least one other volume.")
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task is not None:
            self._task.process.cancel()
            self.logic.discardTask(self._task)
            self._task = None
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.referenceVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.referenceVolume = first

    def setParameterNode(self, inputParameterNode: FuseVolumesParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    # -- GUI state ------------------------------------------------------------------------------

    def _updateGui(self, caller=None, event=None) -> None:
        """Sync the bundle path field and the Apply button with the parameter node."""
        node = self._parameterNode
        if node is None:
            return
        if self.ui.bundlePathLineEdit.currentPath != node.bundleFolder:
            wasBlocked = self.ui.bundlePathLineEdit.blockSignals(True)
            self.ui.bundlePathLineEdit.currentPath = node.bundleFolder
            self.ui.bundlePathLineEdit.blockSignals(wasBlocked)
        self._updateModelWidgets()
        if self._task is not None:
            return  # the button is Cancel while a task runs
        problem = self.logic.inputProblem(node)
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Fuse the selected volumes.")
        self.ui.exportDicomButton.enabled = bool(node.outputVolume and node.referenceVolume)

    def _updateModelWidgets(self, index=None) -> None:
        method = self.ui.methodComboBox.currentText
        self.ui.bundlePathLineEdit.enabled = method == "cnn"  # a cnn bundle folder
        self.ui.blockExponentComboBox.enabled = method in LEARNED_METHODS  # cnn and sesf

    def onBundlePathChanged(self, path: str) -> None:
        if self._parameterNode is not None and self._parameterNode.bundleFolder != path:
            self._parameterNode.bundleFolder = path

    def _setProgress(self, fraction: float | None) -> None:
        """Show a fraction in [0, 1], a busy bar for ``-1`` (unknown), or hide for None."""
        bar = self.ui.progressBar
        if fraction is None:
            bar.hide()
            return
        bar.show()
        if fraction < 0:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 100)
            bar.value = int(round(100 * fraction))

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the fusion.") if running else _("Fuse the volumes.")
        self.ui.applyButton.enabled = True
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                       self.ui.outputsCollapsibleButton, self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        self.ui.exportDicomButton.enabled = not running

    # -- running --------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._task is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self._task.process.cancel()
            return
        try:
            if not self.logic.ensureDependencies(self.ui.statusLabel):
                self.ui.statusLabel.text = _("MedFusion's Python packages are not installed.")
                return
            self._task = self.logic.startFusion(self._parameterNode)
        except Exception as error:
            logging.exception("Fuse Volumes could not start")
            self.ui.statusLabel.text = str(error)
            slicer.util.errorDisplay(str(error), windowTitle=_("Fuse Volumes"))
            return
        self._setRunning(True)
        self._setProgress(-1)
        self.ui.statusLabel.text = _("Starting MedFusion (loading the model may take a while)...")
        self._timer.start()

    def onPollTimer(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        for event in task.process.poll():
            if event.kind == "progress" and event.total > 0:
                self._setProgress(event.fraction)
                self.ui.statusLabel.text = _("Fusing: {done} of {total} slices").format(
                    done=event.done, total=event.total)
            elif event.kind == "warning":
                logging.warning("MedFusion: %s", event.text)
                self.ui.statusLabel.text = event.text
            elif event.kind == "log":
                logging.info("MedFusion: %s", event.text)
            elif event.kind == "done":
                self.ui.statusLabel.text = _("Loading the results...")
        result = task.process.result
        if result is None:
            return
        self._timer.stop()
        self._task = None
        try:
            self._showResult(task, result)
        finally:
            self.logic.discardTask(task)
            self._setRunning(False)
            self._setProgress(None)
            self._updateGui()

    def _showResult(self, task, result: FusionResult) -> None:
        warnings = "\n".join(result.warnings)
        if not result.ok:
            self.ui.statusLabel.text = result.message
            if result.status != "cancelled":
                slicer.util.errorDisplay(result.message, windowTitle=_("Fuse Volumes"),
                                         detailedText="\n".join(result.stderr[-40:]))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the fusion results."),
                                             waitCursor=True):
            self.logic.importResults(task, result)
            self.ui.statusLabel.text = result.message + (f"\n{warnings}" if warnings else "")
            if warnings:
                slicer.util.warningDisplay(warnings, windowTitle=_("Fuse Volumes"))

    def onExportDicomButton(self) -> None:
        node = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Export the fused volume as a DICOM series to"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("DICOM export failed."), waitCursor=True):
            count = self.logic.exportToDicom(node.outputVolume, node.referenceVolume, folder)
            self.ui.statusLabel.text = _(
                "Exported {count} DICOM files to {folder} and added them to the DICOM database."
            ).format(count=count, folder=folder)


#
# FuseVolumesLogic
#


class FusionTask:
    """A running fusion: the background process, its temporary folder and target nodes."""

    def __init__(self, process: FusionProcess, workDir: Path, parameters) -> None:
        self.process = process
        self.workDir = workDir
        self.referenceVolume = parameters.referenceVolume
        self.outputVolume = parameters.outputVolume
        self.metricsTable = parameters.metricsTable
        self.parameters = parameters


class FuseVolumesLogic(ScriptedLoadableModuleLogic):
    """Fusion without the GUI: usable from the Python console and the self-test.

    The logic is thin: it moves volumes between the scene and files, and runs the core's
    command line (``FuseVolumesLib``) in a background process.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return FuseVolumesParameterNode(super().getParameterNode())

    # -- dependencies ---------------------------------------------------------------------------

    @staticmethod
    def pythonExecutable() -> str:
        """The interpreter for the background process (PythonSlicer inside Slicer)."""
        return shutil.which("PythonSlicer") or sys.executable

    def dependencyPlan(self):
        """What is missing in Slicer's Python for MedFusion, and how it would be installed."""
        try:
            import PyTorchUtils  # noqa: F401  (the PyTorch extension)
            hasPyTorchUtils = True
        except ImportError:
            hasPyTorchUtils = False
        return plan_installation(
            installed_versions(REQUIREMENTS),
            pytorch_installer=hasPyTorchUtils,
            core_installed=installed_version(CORE),
            core_source=find_core_source(__file__),
        )

    def ensureDependencies(self, statusLabel=None, askConfirmation: bool = True) -> bool:
        """Install what is missing, after asking once; False when the user declined.

        The core comes from the folder shipped with the extension (``FuseVolumesCore``), torch
        from the PyTorch extension, the other packages from the package index at the versions
        MedFusion was tested with; numpy, SimpleITK and pydicom of Slicer are never changed.
        A progress dialog shows each step.
        """
        plan = self.dependencyPlan()
        if plan.satisfied:
            return True
        if plan.blocking:
            raise RuntimeError(plan.describe())
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                plan.describe(), windowTitle=_("Install MedFusion's Python packages?")):
            return False
        steps = len(plan.pip_commands("constraints.txt")) + (1 if plan.torch_step else 0)
        dialog = slicer.util.createProgressDialog(
            labelText=_("Installing MedFusion's Python packages..."), maximum=steps, value=0)

        def say(text, step=None):
            logging.info(text)
            if statusLabel is not None:
                statusLabel.text = text
            dialog.labelText = text
            if step is not None:
                dialog.value = step
            slicer.app.processEvents()

        try:
            with slicer.util.WaitCursor():
                done = 0
                if plan.torch_step is not None:
                    say(_("Installing PyTorch with the PyTorch extension (several minutes)..."), 0)
                    import PyTorchUtils

                    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                    minimum = f">={plan.torch_step.requirement.minimum}"
                    # already asked once above: the PyTorch extension does not ask again
                    if torchLogic.installTorch(askConfirmation=False,
                                               torchVersionRequirement=minimum) is None:
                        raise RuntimeError(_("PyTorch was not installed; MedFusion needs it."))
                    done = 1
                    plan = self.dependencyPlan()  # torch is now frozen at the installed version
                run_installation(
                    plan, pip=lambda arguments: slicer.util.pip_install(arguments[1:]),
                    progress=lambda step, total, text: say(
                        f"{text} ({done + step}/{done + total})...", done + step - 1))
        finally:
            dialog.close()
        remaining = self.dependencyPlan()
        if not remaining.satisfied:
            raise RuntimeError(_("Installation finished but packages are still missing:\n")
                               + remaining.describe())
        say(_("MedFusion's Python packages are installed."))
        return True

    # -- inputs ---------------------------------------------------------------------------------

    def inputProblem(self, parameters) -> str | None:
        """Why the parameters cannot run (a message for the user), or None when they can."""
        if not parameters.referenceVolume:
            return _("Select a reference volume.")
        others = otherVolumes(parameters)
        if not others:
            return _("Select at least one other volume to fuse with the reference.")
        nodes = [parameters.referenceVolume, *others]
        if len({n.GetID() for n in nodes}) != len(nodes):
            return _("The same volume is selected twice.")
        for node in nodes:
            if node.GetImageData() is None:
                return _("Volume '{name}' has no image data.").format(name=node.GetName())
        output = parameters.outputVolume
        if output and output.GetID() in {n.GetID() for n in nodes}:
            return _("The output volume must not be one of the inputs; create a new volume.")
        if parameters.method == "cnn" and parameters.bundleFolder:
            if not (Path(parameters.bundleFolder) / "configs").is_dir():
                return _("'{folder}' is not a MONAI bundle folder (no configs/ inside).").format(
                    folder=parameters.bundleFolder)
        return None

    @staticmethod
    def _writeVolume(node, path: Path) -> None:
        """Write a volume in world coordinates (parent transforms hardened), scene untouched."""
        if hasattr(slicer.util, "exportNode"):
            slicer.util.exportNode(node, str(path), {"useCompression": 0}, world=True)
        else:  # Slicer < 5.4
            if node.GetParentTransformNode() is not None:
                raise ValueError(_("Harden the transform of '{name}' first.").format(
                    name=node.GetName()))
            if not slicer.util.saveNode(node, str(path), {"useCompression": 0}):
                raise OSError(_("Could not write '{name}' to {path}.").format(
                    name=node.GetName(), path=path))
        if not path.is_file():
            raise OSError(_("Could not write '{name}' to {path}.").format(
                name=node.GetName(), path=path))

    # -- running --------------------------------------------------------------------------------

    def startFusion(self, parameters) -> FusionTask:
        """Write the inputs and start the background process; returns at once."""
        problem = self.inputProblem(parameters)
        if problem:
            raise ValueError(problem)
        workDir = Path(tempfile.mkdtemp(prefix="FuseVolumes-", dir=slicer.app.temporaryPath))
        try:
            inputs = []
            for index, node in enumerate([parameters.referenceVolume, *otherVolumes(parameters)]):
                path = workDir / f"input{index}.nrrd"
                self._writeVolume(node, path)
                inputs.append(path)
            request = FuseRequest(
                reference=inputs[0],
                others=inputs[1:],
                output=workDir / "fused.nrrd",
                metrics=workDir / "metrics.csv",
                method=parameters.method,
                bundle_dir=Path(parameters.bundleFolder) if parameters.bundleFolder else None,
                block_exponent=(None if parameters.blockExponent == "default"
                                else int(parameters.blockExponent)),
                axis=parameters.axis,
                device=parameters.device,
                batch_size=parameters.batchSize,
                register="rigid" if parameters.registerFirst else "none",
                transforms_dir=workDir,
                decision_map=workDir / "decision.nrrd" if parameters.method == "sesf" else None,
            )
            process = FusionProcess(request, python=self.pythonExecutable(),
                                    env=slicer.util.startupEnvironment())
            logging.info("Fuse Volumes: %s", " ".join(process.command))
            process.start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return FusionTask(process, workDir, parameters)

    def _addTransforms(self, task: FusionTask) -> None:
        """Add each registration transform (``input<i>.tfm``, written by ``--save-transforms``)
        to the scene as "<volume> registered to <reference>", applied to that volume when it
        has no transform of its own (the fused volume already holds it aligned)."""
        for index, node in enumerate(otherVolumes(task.parameters), start=1):
            path = task.workDir / f"input{index}.tfm"
            if not path.is_file():
                continue
            transform = slicer.util.loadTransform(str(path))
            transform.SetName(slicer.mrmlScene.GenerateUniqueName(
                f"{node.GetName()} registered to {task.referenceVolume.GetName()}"))
            if node.GetParentTransformNode() is None:
                node.SetAndObserveTransformNodeID(transform.GetID())

    def discardTask(self, task: FusionTask) -> None:
        """Delete the task's temporary files (inputs and outputs were copied into the scene)."""
        shutil.rmtree(task.workDir, ignore_errors=True)

    def process(self, parameters, timeout: float | None = None) -> FusionResult:
        """Fuse synchronously (scripts, self-test): start, wait, import the results."""
        task = self.startFusion(parameters)
        try:
            result = task.process.wait(timeout=timeout,
                                       on_event=lambda e: e.kind == "log" and logging.info(e.text))
            if result.ok:
                self.importResults(task, result)
            return result
        finally:
            self.discardTask(task)

    # -- results --------------------------------------------------------------------------------

    def importResults(self, task: FusionTask, result: FusionResult) -> None:
        """Load the fused volume and metrics into their nodes, show them, file them in the study."""
        reference = task.referenceVolume
        output = task.outputVolume
        if output is None:
            output = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode",
                slicer.mrmlScene.GenerateUniqueName(f"{reference.GetName()} fused"))
            task.parameters.outputVolume = output
        loaded = slicer.util.loadVolume(str(result.output), {"show": False, "singleFile": True})
        try:
            ijkToRas = vtk.vtkMatrix4x4()
            loaded.GetIJKToRASMatrix(ijkToRas)
            output.SetIJKToRASMatrix(ijkToRas)
            output.SetAndObserveImageData(loaded.GetImageData())
        finally:
            slicer.mrmlScene.RemoveNode(loaded)
        output.SetAndObserveTransformNodeID(None)  # inputs were written in world coordinates
        output.SetAttribute("MedFusion.method", task.parameters.method)
        self._setDisplay(output)

        if result.metrics is not None:
            table = task.metricsTable
            if table is None:
                table = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName("Fusion metrics"))
                task.parameters.metricsTable = table
            self.fillTable(table, read_metrics_csv(result.metrics))
            self._placeInStudy(table, reference)
            self._showTable(table)
        self._placeInStudy(output, reference)
        self._addTransforms(task)
        slicer.util.setSliceViewerLayers(background=output, foreground=reference,
                                         foregroundOpacity=0.0, fit=True)
        decision = Path(task.workDir) / "decision.nrrd"
        if decision.is_file():  # sesf: which input won each voxel, as a label volume
            labels = slicer.util.loadLabelVolume(str(decision), {"show": False})
            labels.SetName(slicer.mrmlScene.GenerateUniqueName(f"{reference.GetName()} decision"))
            self._placeInStudy(labels, reference)
            slicer.util.setSliceViewerLayers(label=labels, labelOpacity=0.3)

    @staticmethod
    def _setDisplay(volume) -> None:
        """Grey colour map, window/level over the 1st-99th percentiles of the fused intensities."""
        import numpy as np

        volume.CreateDefaultDisplayNodes()
        display = volume.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        values = slicer.util.arrayFromVolume(volume)
        low, high = (float(v) for v in np.percentile(values, [1, 99]))
        if high <= low:
            low, high = float(values.min()), float(values.max()) or 1.0
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, high)

    @staticmethod
    def fillTable(table, metrics) -> None:
        """Replace the table's contents with the metrics (numeric columns as numbers)."""
        wasModifying = table.StartModify()
        table.RemoveAllColumns()
        for index, name in enumerate(metrics.columns):
            column = vtk.vtkDoubleArray() if metrics.numeric[index] else vtk.vtkStringArray()
            column.SetName(name)
            for row in metrics.rows:
                if metrics.numeric[index]:
                    column.InsertNextValue(float(row[index]))
                else:
                    column.InsertNextValue(str(row[index]))
            table.AddColumn(column)
        table.EndModify(wasModifying)

    @staticmethod
    def _showTable(table) -> None:
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no GUI (batch mode)
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    @staticmethod
    def _placeInStudy(node, reference) -> None:
        """Put ``node`` beside the reference in the subject hierarchy (its study, if any)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        referenceItem = shNode.GetItemByDataNode(reference)
        parent = shNode.GetItemParent(referenceItem)
        if parent and parent != shNode.GetSceneItemID():
            shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)

    # -- DICOM export ---------------------------------------------------------------------------

    def exportToDicom(self, volume, reference, folder: str) -> int:
        """Write ``volume`` as a DICOM series in the reference's study; add it to the database.

        Fused values in [0, 1] are stored as integers times ``DICOM_EXPORT_SCALE`` (scalar volume
        export writes integer pixels). Patient and study tags come from the subject hierarchy,
        so a reference loaded from DICOM gives a series in the same study.
        Returns the number of files written.
        """
        import DICOMScalarVolumePlugin
        import numpy as np
        from DICOMLib import DICOMUtils

        if volume is None or volume.GetImageData() is None:
            raise ValueError(_("There is no fused volume to export yet."))
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(reference))
        if not studyItem or shNode.GetItemLevel(studyItem) != "Study":
            patientItem = shNode.CreateSubjectItem(shNode.GetSceneItemID(), _("MedFusion patient"))
            studyItem = shNode.CreateStudyItem(patientItem, _("MedFusion study"))
        exported = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", volume.GetName())
        try:
            ijkToRas = vtk.vtkMatrix4x4()
            volume.GetIJKToRASMatrix(ijkToRas)
            exported.SetIJKToRASMatrix(ijkToRas)
            values = slicer.util.arrayFromVolume(volume)
            scaled = np.clip(np.rint(values * DICOM_EXPORT_SCALE), 0, DICOM_EXPORT_SCALE)
            slicer.util.updateVolumeFromArray(exported, scaled.astype(np.int16))
            exportedItem = shNode.GetItemByDataNode(exported)
            shNode.SetItemParent(exportedItem, studyItem)
            exporter = DICOMScalarVolumePlugin.DICOMScalarVolumePluginClass()
            exportables = exporter.examineForExport(exportedItem)
            if not exportables:
                raise RuntimeError(_("Slicer's DICOM exporter did not accept the fused volume."))
            before = set(os.listdir(folder))
            for exportable in exportables:
                exportable.directory = folder
                exportable.setTag("Modality", "OT")
                exportable.setTag("SeriesDescription", f"MedFusion fused ({volume.GetName()})")
            error = exporter.export(exportables)
            if error:
                raise RuntimeError(error)
        finally:
            slicer.mrmlScene.RemoveNode(exported)
        written = sorted(set(os.listdir(folder)) - before)
        DICOMUtils.importDicom(folder)
        return len(written)


#
# FuseVolumesTest
#


class FuseVolumesTest(ScriptedLoadableModuleTest):
    """Self-test: small synthetic volumes in the scene, fused through the logic."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_FuseVolumes_dependencies()
        self.setUp()
        self.test_FuseVolumes_cnn()
        self.setUp()
        self.test_FuseVolumes_average()
        self.setUp()
        self.test_FuseVolumes_cancel()
        self.setUp()
        self.test_FuseVolumes_input_problems()

    @staticmethod
    def _makeVolume(name: str, array, spacing=(1.5, 1.0, 2.0), origin=(-12.0, -10.0, 5.0)):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, array)
        node.SetSpacing(*spacing)
        node.SetOrigin(*origin)
        node.CreateDefaultDisplayNodes()
        return node

    def _scene(self, shape=(12, 48, 56)):  # slices >= 41x41: the metrics need that
        """A reference (CT-like ramp) and an MRI-like sphere on the same grid."""
        import numpy as np

        k, j, i = np.indices(shape, dtype=np.float32)
        ramp = (i * 40.0 - 300.0).astype(np.int16)
        centre = [s / 2 for s in shape]
        radius = np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
        sphere = np.where(radius < 6, 800.0, 100.0).astype(np.float32)
        reference = self._makeVolume("CT", ramp)
        other = self._makeVolume("MR", sphere)
        return reference, other

    def test_FuseVolumes_dependencies(self) -> None:
        """First use, as a user meets it: install what is missing (as the module would after
        asking), from the core shipped with the extension; Slicer's numpy is left as it is."""
        import numpy

        self.delayDisplay("Installing MedFusion's Python packages (first use; minutes)")
        numpyBefore = numpy.__version__
        logic = FuseVolumesLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        self.assertTrue(logic.dependencyPlan().satisfied)
        self.assertEqual(installed_version(REQUIREMENTS[0]), numpyBefore)
        self.delayDisplay("Dependencies installed")

    def test_FuseVolumes_cnn(self) -> None:
        """The default method, the shipped CNN bundle, end to end through the background process."""
        self._fuseAndCheck("cnn")
        self.delayDisplay("CNN fusion passed")

    def test_FuseVolumes_average(self) -> None:
        self._fuseAndCheck("average")
        self.delayDisplay("Average fusion passed")

    def _fuseAndCheck(self, method: str) -> None:
        import numpy as np

        self.delayDisplay(f"Fusing two small volumes with the {method} method")
        reference, other = self._scene()
        logic = FuseVolumesLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        parameters = logic.getParameterNode()
        parameters.referenceVolume = reference
        parameters.otherVolume1 = other
        parameters.method = method
        parameters.device = "cpu"
        self.assertIsNone(logic.inputProblem(parameters))
        result = logic.process(parameters, timeout=600)
        self.assertTrue(result.ok, result.message)

        output = parameters.outputVolume
        self.assertIsNotNone(output)
        self.assertEqual(output.GetImageData().GetDimensions(),
                         reference.GetImageData().GetDimensions())
        for a, b in zip(output.GetSpacing(), reference.GetSpacing(), strict=True):
            self.assertAlmostEqual(a, b, places=5)
        for a, b in zip(output.GetOrigin(), reference.GetOrigin(), strict=True):
            self.assertAlmostEqual(a, b, places=4)
        fused = slicer.util.arrayFromVolume(output)
        self.assertGreaterEqual(float(fused.min()), 0.0)
        self.assertLessEqual(float(fused.max()), 1.0)
        self.assertGreater(float(fused.std()), 0.0)

        table = parameters.metricsTable
        self.assertIsNotNone(table)
        self.assertGreater(table.GetNumberOfRows(), 0)
        self.assertGreater(table.GetNumberOfColumns(), 1)

        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(output)),
                         shNode.GetItemParent(shNode.GetItemByDataNode(reference)))
        self.assertTrue(np.isfinite(fused).all())

    def test_FuseVolumes_cancel(self) -> None:
        self.delayDisplay("Starting a fusion and cancelling it")
        reference, other = self._scene(shape=(160, 128, 128))
        logic = FuseVolumesLogic()
        parameters = logic.getParameterNode()
        parameters.referenceVolume = reference
        parameters.otherVolume1 = other
        parameters.method = "laplacian"
        parameters.device = "cpu"
        parameters.batchSize = 1
        parameters.outputVolume = None
        parameters.metricsTable = None
        task = logic.startFusion(parameters)
        task.process.cancel()
        result = task.process.wait(timeout=60)
        self.assertEqual(result.status, "cancelled")
        self.assertFalse(task.process.request.output.exists())
        self.assertEqual(sorted(p.name for p in task.workDir.iterdir()),
                         ["input0.nrrd", "input1.nrrd"])  # no output, no staging folder left
        logic.discardTask(task)
        self.assertIsNone(parameters.outputVolume)
        self.delayDisplay("Cancel passed")

    def test_FuseVolumes_input_problems(self) -> None:
        reference, other = self._scene()
        logic = FuseVolumesLogic()
        parameters = logic.getParameterNode()
        parameters.referenceVolume = reference
        parameters.otherVolume1 = None
        parameters.otherVolume2 = None
        parameters.otherVolume3 = None
        self.assertIn("at least one", logic.inputProblem(parameters))
        parameters.otherVolume1 = reference
        self.assertIn("twice", logic.inputProblem(parameters))
        parameters.otherVolume1 = other
        parameters.outputVolume = other
        self.assertIn("output", logic.inputProblem(parameters))
        self.delayDisplay("Input checks passed")
