"""CLISCSegment: segment a loaded volume from a text prompt (CLIP saliency + Segment Anything).

A thin adapter around the engine (`clisc.zeroshot`), in three steps: copy the volume out of MRML (main
thread), run the engine (any thread: the GUI uses a worker thread), write the segments back (main thread).
Everything the GUI does works from Slicer's Python console::

    import CLISCSegment
    logic = CLISCSegment.CLISCSegmentLogic()
    segmentationNode = logic.segment(volumeNode, ["brain tumor"], clip="biomedclip", sam="sam_vit_b", device="cuda")

The engine is imported only inside functions: this file must load before its Python packages are installed, and
importing it installs and downloads nothing. Python packages are installed on the first Segment (after the user
agrees), model weights on first use into a cache folder the Models section shows. Like Slicer's module template, no
``from __future__ import annotations``: the parameter node wrapper reads the annotations as types.
"""
import importlib.metadata
import logging
import os
import re
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Annotated, Optional, Union

import numpy as np
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLVectorVolumeNode,
)
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from clisc.environment import MINIMUM_PYTHON, TORCH_PACKAGES
from clisc.environment import REQUIREMENTS as ENGINE_REQUIREMENTS
from clisc.profiles import PROFILES

PROMPT_TAG = "CLISC.Prompt"               # segment tag holding the prompt that made the segment
SALIENCY_REFERENCE = "CLISC.Saliency"     # segmentation node -> its saliency volumes, in segment order

# The engine's Python packages (clisc.environment, which imports only the standard library, so it loads before
# they are installed), in two parts. torch and torchvision belong to the PyTorch extension, whose PyTorchUtils
# installs the build that fits the computer; pip installs the others, with a constraints file that keeps the
# installed versions of PINNED.
TORCH_REQUIREMENTS = [str(r) for r in ENGINE_REQUIREMENTS if r.distribution in TORCH_PACKAGES]
REQUIREMENTS = [str(r) for r in ENGINE_REQUIREMENTS if r.distribution not in TORCH_PACKAGES]
PINNED = ("torch", "torchvision", "numpy", "SimpleITK")  # the PyTorch extension's and Slicer's own

# Terminology entries for common prompts: a small subset of SNOMED CT, with the codes of Slicer's
# "3D Slicer General Anatomy list" (which names a tumour "Mass"; anatomic regions from the DICOM master list).
# Other prompts keep Slicer's default entry.
ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
ALTERED_STRUCTURE = "SCT^49755003^Morphologically Altered Structure"
ORGANS = {
    "brain": "SCT^12738006^Brain", "liver": "SCT^10200004^Liver", "lung": "SCT^39607008^Lung",
    "kidney": "SCT^64033007^Kidney", "spleen": "SCT^78961009^Spleen", "heart": "SCT^80891009^Heart",
    "pancreas": "SCT^15776009^Pancreas", "prostate": "SCT^41216001^Prostate",
}
PAIRED_ORGANS = ("lung", "kidney")
LESIONS = {
    "tumor": "SCT^4147007^Mass", "tumour": "SCT^4147007^Mass", "mass": "SCT^4147007^Mass",
    "cancer": "SCT^4147007^Mass", "edema": "SCT^79654002^Edema", "oedema": "SCT^79654002^Edema",
    "necrosis": "SCT^6574001^Necrosis", "cyst": "SCT^367643001^Cyst", "hemorrhage": "SCT^50960005^Hemorrhage",
}
SIDES = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right"}
NO_CODE = "^^"


def splitPrompts(text: str) -> list:
    """The prompts in a semicolon-separated text, stripped, empty ones dropped."""
    return [part.strip() for part in text.split(";") if part.strip()]


def terminologyEntry(prompt: str) -> Optional[str]:
    """Slicer terminology entry string for a prompt naming a known organ and/or lesion, else None.

    "left lung" -> Anatomical Structure / Lung / Left; "brain tumor" -> Morphologically Altered Structure /
    Mass, in the region Brain.
    """
    words = [word[:-1] if word[:-1] in ORGANS or word[:-1] in LESIONS else word  # "lungs", "tumors"
             for word in re.findall(r"[a-z]+", prompt.lower())]
    organ = next((word for word in words if word in ORGANS), None)
    lesion = next((LESIONS[word] for word in words if word in LESIONS), None)
    side = next((SIDES[word] for word in words if word in SIDES and organ in PAIRED_ORGANS), NO_CODE)
    if lesion:
        region = ORGANS[organ] if organ else NO_CODE
        return "~".join([ANATOMY_CONTEXT, ALTERED_STRUCTURE, lesion, NO_CODE, REGION_CONTEXT, region, side])
    if organ:
        return "~".join([ANATOMY_CONTEXT, ANATOMICAL_STRUCTURE, ORGANS[organ], side, REGION_CONTEXT, NO_CODE, NO_CODE])
    return None


def unsupportedSlicerMessage() -> Optional[str]:
    """Why this Slicer cannot run CLISC (its Python is older than 3.10: Slicer 5.8 or older), or None."""
    if tuple(sys.version_info[:2]) >= MINIMUM_PYTHON:
        return None
    application = getattr(slicer, "app", None)  # absent outside the Slicer application
    return (f"CLISC needs 3D Slicer 5.10 or newer (this is Slicer "
            f"{application.applicationVersion if application else 'unknown'} with Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}). Install the current Slicer from "
            "https://download.slicer.org and add the CLISC extension to it.")


def showUnsupportedSlicer(layout) -> bool:
    """Show, in place of a module's controls, why this Slicer cannot run CLISC; True if it cannot."""
    unsupported = unsupportedSlicerMessage()
    if unsupported:
        label = qt.QLabel(unsupported)
        label.wordWrap = True
        layout.addWidget(label)
    return unsupported is not None


def canonicalName(distribution: str) -> str:
    """A distribution name as pip compares them: "Open_CLIP.torch" -> "open-clip-torch"."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installedVersions() -> dict:
    """Installed Python distributions: canonical name -> version (the first found on the path, as import does)."""
    versions = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"]:
            versions.setdefault(canonicalName(dist.metadata["Name"]), dist.version)
    return versions


def _packaging():
    """The ``packaging`` library (requirements and versions); in a Slicer without it, the copy inside pip."""
    try:
        import packaging.requirements
        import packaging.version
    except ImportError:
        import pip._vendor.packaging.requirements
        import pip._vendor.packaging.version
        return pip._vendor.packaging
    return packaging


def unmetRequirements(requirements, installed: dict) -> list:
    """The pip requirements that the installed versions (canonical name -> version) leave unmet: missing or too old.
    Decided by versions, not by whether a module imports."""
    Requirement = _packaging().requirements.Requirement
    unmet = []
    for text in requirements:
        requirement = Requirement(text)
        version = installed.get(canonicalName(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            unmet.append(text)
    return unmet


def pipConstraints(installed: dict) -> str:
    """A pip constraints file that pins the installed versions of `PINNED`, so that installing the other packages
    cannot replace the PyTorch extension's torch and torchvision or Slicer's numpy and SimpleITK."""
    return "".join(f"{name}=={installed[canonicalName(name)]}\n" for name in PINNED if canonicalName(name) in installed)


def torchInstallArguments(installed: dict) -> dict:
    """Keyword arguments for ``PyTorchUtils.PyTorchUtilsLogic().installTorch`` that install what `TORCH_REQUIREMENTS`
    lacks. An installed torch is kept (its exact release is asked for, so that a missing torchvision comes paired
    with it); a torch too old for CLISC cannot be replaced in a running Slicer: RuntimeError says how to update it."""
    packaging = _packaging()
    torch, torchvision = (packaging.requirements.Requirement(text) for text in TORCH_REQUIREMENTS)
    torchVersion = installed.get("torch")
    if torchVersion is None:
        torchSpecifier = str(torch.specifier)
    elif unmetRequirements([str(torch)], installed):
        raise RuntimeError(
            f"CLISC needs {torch}, and this Slicer has torch {torchVersion}. Update it in the PyTorch Utils module "
            "(Uninstall PyTorch, restart Slicer, Install PyTorch), then try again.")
    else:
        torchSpecifier = f"=={packaging.version.Version(torchVersion).public}"
    arguments = {"askConfirmation": True, "torchVersionRequirement": torchSpecifier}
    if str(torchvision.specifier):  # only newer PyTorchUtils take this argument
        arguments["torchvisionVersionRequirement"] = str(torchvision.specifier)
    return arguments


def formatSize(size: int) -> str:
    """A size in bytes for people: "2.4 GB", "350 MB", "12 kB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size / scale:.0f} {unit}"
    return f"{size} B"


def uniqueSegmentName(segmentation, name: str) -> str:
    """``name``, or ``name 2``, ``name 3``... if a segment of ``segmentation`` already has it."""
    taken = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} {number}", number + 1
    return candidate


#
# CLISCSegment
#


class CLISCSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLISC Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CLISC developers (SlicerCLISC project)"]
        self.parent.helpText = (
            "Segment a volume from a text prompt such as \"brain tumor\" or \"left lung\", without annotation: "
            "CLIP finds where the prompt is in each slice, Segment Anything draws the mask. Several prompts are "
            "separated by semicolons; each becomes a segment named after it. Review and edit the result in the "
            "Segment Editor. Runs on a CUDA GPU in seconds, on a CPU in minutes (use the fast preset).")
        self.parent.acknowledgementText = (
            "Built on Segment Anything (Meta), open_clip, BiomedCLIP (Microsoft), MONAI and SimpleITK. "
            "Methods: MedCLIP-SAM (Koleilat et al., MICCAI 2024) and CLISC (ISBI 2025).")


#
# CLISCSegmentParameterNode
#


@parameterNodeWrapper
class CLISCSegmentParameterNode:
    """The GUI's settings. Empty clip/sam: the engine's defaults (catalogue names or local paths otherwise)."""

    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]  # the node types of its selector
    prompts: str = ""
    negativePrompt: str = ""
    preset: Annotated[str, Choice(["accurate", "fast"])] = "accurate"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    saliency: Annotated[str, Choice(["preset", "m2ib", "gscorecam", "gradcam"])] = "preset"
    profile: Annotated[str, Choice(["auto", *PROFILES])] = "auto"
    promptType: Annotated[str, Choice(["profile", "box", "points", "both"])] = "profile"
    axis: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    slices: Annotated[str, Choice(["auto", "all"])] = "auto"
    clip: str = ""
    sam: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    showSaliency: bool = False


#
# CLISCSegmentWidget
#


class CLISCSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None          # the running SegmentJob
        self._jobTargets = None   # (volume node, output segmentation node or None, show saliency)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._pollJob)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if showUnsupportedSlicer(self.layout):
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CLISCSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CLISCSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.trainedRunPath.connect("currentPathChanged(QString)", self._updateGui)
        self.ui.exportSegNrrdButton.connect("clicked(bool)", self.onExportSegNrrd)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.modelsCollapsibleButton.connect("contentsCollapsed(bool)",
                                                lambda collapsed: collapsed or self._listModels())
        self.ui.modelsTable.connect("itemSelectionChanged()", self._updateModelButtons)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job:
            self._job.cancel.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic:  # None in a Slicer too old for CLISC
            self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job:
            self._job.cancel.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode: Optional[CLISCSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        onCpu = parameters.device == "cpu" or (parameters.device == "auto" and not self.logic.cudaAvailable())
        self.ui.cpuWarningLabel.setVisible(onCpu)
        if self._job:
            return  # the button is the Cancel button
        trained = bool(self.ui.trainedRunPath.currentPath)
        ready = bool(parameters.inputVolume and (trained or splitPrompts(parameters.prompts)))
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = ("Segment the input volume" if ready
                                         else "Select an input volume and type a prompt (or choose a trained model)")
        for widget in (self.ui.promptsLineEdit, self.ui.negativePromptLineEdit, self.ui.presetComboBox,
                       self.ui.advancedCollapsibleButton):
            widget.enabled = not trained
        segmentation = parameters.outputSegmentation
        for button in (self.ui.exportSegNrrdButton, self.ui.exportLabelmapButton, self.ui.exportDicomSegButton):
            button.enabled = segmentation is not None

    def log(self, message: str) -> None:
        self.ui.statusLog.appendPlainText(message)
        logging.info(message)

    # -- Segment / Cancel

    def onSegmentButton(self) -> None:
        if self._job:
            self._job.cancel.cancel()
            self.log("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay("CLISC could not start the segmentation.", waitCursor=True):
            parameters = self._parameterNode
            if not ensurePackages(self.log):
                return
            options = dict(clip=parameters.clip.strip() or None, sam=parameters.sam.strip() or None,
                           device=parameters.device, preset=parameters.preset,
                           negativePrompts=splitPrompts(parameters.negativePrompt) or None,
                           saliency=None if parameters.saliency == "preset" else parameters.saliency,
                           profile=parameters.profile,
                           prompt_type=None if parameters.promptType == "profile" else parameters.promptType,
                           axis=parameters.axis, slices=parameters.slices)
            trainedRun = self.ui.trainedRunPath.currentPath
            if trainedRun:
                options = dict(device=parameters.device, trainedRun=trainedRun)
                prompts, what = None, f"with the trained model in {trainedRun}"
            else:
                if not self.ensureModels(options["clip"], options["sam"]):
                    return
                prompts = splitPrompts(parameters.prompts)
                what = "; ".join(prompts)
            volume = self.logic.volumeFromNode(parameters.inputVolume)
            self._jobTargets = (parameters.inputVolume, parameters.outputSegmentation, parameters.showSaliency)
            self._job = SegmentJob(self.logic.run, volume=volume, prompts=prompts, **options)
            self._job.start()
            self.log(f"Segmenting {parameters.inputVolume.GetName()}: {what}")
            self._setRunning(True)

    def _setRunning(self, running: bool) -> None:
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if running:
            self._timer.start()
        else:
            self._timer.stop()
            self._updateGui()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            return
        stage, done, total, message = job.progress
        self.ui.progressBar.setFormat(f"{stage} {message} %p%")
        self.ui.progressBar.value = int(100 * done / total) if total else 0
        if not job.finished:
            return
        from clisc.errors import Cancelled, InputError

        self._job = None
        self._setRunning(False)
        volumeNode, segmentationNode, showSaliency = self._jobTargets
        if job.cancel.cancelled or isinstance(job.error, Cancelled):
            self.log("Cancelled: nothing was added to the scene.")
        elif job.error is not None:
            self.log(f"Failed: {job.error}")
            if not isinstance(job.error, InputError):
                logging.error("".join(traceback.format_exception(type(job.error), job.error, job.error.__traceback__)))
            slicer.util.errorDisplay(f"CLISC segmentation failed: {job.error}")
        elif not slicer.mrmlScene.IsNodePresent(volumeNode):
            self.log("The input volume was removed during the run: nothing was added.")
        else:
            if segmentationNode is not None and not slicer.mrmlScene.IsNodePresent(segmentationNode):
                segmentationNode = None
            segmentationNode = self.logic.addSegments(volumeNode, job.result, segmentationNode, showSaliency)
            self._parameterNode.outputSegmentation = segmentationNode
            for name, mask in zip(job.result.names, job.result.masks):
                relevant = job.result.report.get("selected_slices", {}).get(name)
                note = " (no slice looked relevant: try Slices: all)" if not mask.any() and not relevant else ""
                profile = job.result.report.get("profiles", {}).get(name)
                chosen = f", profile {profile['profile']} ({profile['why']})" if profile else ""
                self.log(f"  {name}: {int(mask.sum())} voxels{chosen}{note}")
            seconds = sum(job.result.report.get("seconds", {}).values())
            self.log(f"Done in {seconds:.0f} s on {job.result.report.get('device')}: {segmentationNode.GetName()}")
            count = segmentationNode.GetNumberOfNodeReferences(SALIENCY_REFERENCE)
            if showSaliency and count:
                saliencyNode = segmentationNode.GetNthNodeReference(SALIENCY_REFERENCE, count - 1)
                saliencyNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
                slicer.util.setSliceViewerLayers(foreground=saliencyNode, foregroundOpacity=0.4)

    # -- first use: packages and weights

    def ensureModels(self, clip: Optional[str], sam: Optional[str]) -> bool:
        """Download the catalogue weights not in the cache yet, with a progress dialog; offer an offline import
        when the download fails. True when all are installed."""
        from clisc.errors import Cancelled
        from clisc.models.cache import import_model
        from clisc.models.catalogue import get_entry
        from clisc.models.download import DownloadError

        for name in self.logic.missingModels(clip, sam):
            entry = get_entry(name)
            if slicer.app.testingEnabled():
                raise RuntimeError(f"model weights '{name}' are not installed (not downloaded in testing mode)")
            if not slicer.util.confirmOkCancelDisplay(
                    f"CLISC needs the weights '{name}' ({entry.description} Licence: {entry.licence}).\n"
                    f"Download them now from {entry.homepage}?"):
                return False
            try:
                self._downloadWithDialog(name)
            except Cancelled:
                self.log(f"Download of {name} cancelled; it resumes next time.")
                return False
            except DownloadError as error:
                oneFile = len(entry.files) == 1
                if not slicer.util.confirmOkCancelDisplay(
                        f"{error}\n\nImport a copy from this computer instead "
                        f"({'the file ' + entry.files[0].filename if oneFile else 'a folder holding its files'})?"):
                    return False
                source = (qt.QFileDialog.getOpenFileName(None, f"Weights file for {name}") if oneFile
                          else qt.QFileDialog.getExistingDirectory(None, f"Folder with the files of {name}"))
                if not source:
                    return False
                with slicer.util.WaitCursor():
                    import_model(name, source)
            self.log(f"Installed the weights {name}.")
            self._listModels()
        return True

    def _downloadWithDialog(self, name: str) -> None:
        from clisc.models.cache import download_model

        runWithProgressDialog(
            "CLISC: downloading weights", f"Downloading {name}...",
            lambda stage, done, total: f"{stage}: {done / 1e6:.0f} of {total / 1e6:.0f} MB" if total else stage,
            lambda progress, cancel: download_model(name, progress=progress, cancel=cancel))

    # -- the weights cache

    def _listModels(self) -> None:
        """Show the weights folder, and each model in it with its size (when the Models section opens, and after a
        download: listing imports the engine)."""
        try:
            folder, models = self.logic.modelsFolder(), self.logic.installedModels()
        except ImportError as error:  # the engine's packages are not installed yet: the first Segment installs them
            self.ui.modelsFolderLabel.text = f"Shown once CLISC's Python packages are installed ({error})."
            return
        self.ui.modelsFolderLabel.text = f"Folder: {folder}"
        self.ui.modelsTable.setRowCount(len(models))
        for row, (name, path, size) in enumerate(models):
            for column, text in enumerate((name, formatSize(size))):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(str(path))
                self.ui.modelsTable.setItem(row, column, item)
        self._updateModelButtons()

    def _updateModelButtons(self) -> None:
        self.ui.removeModelButton.enabled = bool(self.ui.modelsTable.selectedItems())

    def onRemoveModel(self) -> None:
        row = self.ui.modelsTable.currentRow()
        name = self.ui.modelsTable.item(row, 0).text()
        path = self.ui.modelsTable.item(row, 0).toolTip()
        if slicer.util.confirmOkCancelDisplay(f"Delete the weights '{name}' ({path})?\n"
                                              "They are downloaded again when a segmentation needs them."):
            with slicer.util.tryWithErrorDisplay(f"Could not delete the weights '{name}'.", waitCursor=True):
                self.logic.removeModel(name)
                self.log(f"Deleted the weights {name}.")
            self._listModels()

    # -- export

    def onExportSegNrrd(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, "Export segmentation", "", "Slicer segmentation (*.seg.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportSegmentation(self._parameterNode.outputSegmentation, path)
                self.log(f"Wrote {path}")

    def onExportLabelmap(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, "Export labelmap", "", "Labelmap (*.nii.gz *.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportLabelmap(self._parameterNode.outputSegmentation,
                                          self._parameterNode.inputVolume, path)
                self.log(f"Wrote {path}")

    def onExportDicomSeg(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, "Folder for the DICOM SEG file")
        if folder:
            with slicer.util.tryWithErrorDisplay("DICOM SEG export failed.", waitCursor=True):
                self.logic.exportDicomSeg(self._parameterNode.outputSegmentation, folder)
                self.log(f"Wrote DICOM SEG into {folder}")


def ensurePackages(log) -> bool:
    """Before a run (both modules' GUIs): install the engine's missing Python packages once the user agrees, torch
    and torchvision through the PyTorch extension, the others with pip (`CLISCSegmentLogic.installPackages`).
    Nothing is installed in testing mode. True when the engine can run now; False when the user declined or Slicer
    must restart first. ``log(text)`` reports progress."""
    logic = CLISCSegmentLogic()
    missingTorch, missing = logic.missingTorch(), logic.missingPackages()
    if not missingTorch + missing:
        return True
    if slicer.app.testingEnabled():
        raise RuntimeError("missing Python packages (not installed in testing mode): "
                           + ", ".join(missingTorch + missing))
    if missingTorch:
        if not installTorch():
            return False
        missing = logic.missingPackages()
    if missing:
        if not slicer.util.confirmOkCancelDisplay(
                f"CLISC needs these Python packages: {', '.join(missing)}.\n"
                "Install them now? It takes a few minutes and needs an internet connection. "
                "PyTorch stays as the PyTorch extension installed it."):
            return False
        log(f"Installing {', '.join(missing)}...")
        with slicer.util.WaitCursor():
            changed = logic.installPackages()
        if changed or logic.missingPackages():  # pip upgraded a package this session may have imported already
            note = f" ({', '.join(changed)} changed version)" if changed else ""
            if slicer.util.confirmOkCancelDisplay(f"The packages are installed{note}; Slicer must restart to use "
                                                  "them. Restart now?"):
                slicer.util.restart()
            return False
    return True


def installTorch() -> bool:
    """Have the PyTorch extension's PyTorchUtils install torch and torchvision (the build for this computer's GPU or
    CPU; it asks the user first). True when it did."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError("CLISC needs PyTorch, which the PyTorch extension installs: install \"PyTorch\" from the "
                           "Extensions Manager, restart Slicer and try again.") from None
    arguments = torchInstallArguments(installedVersions())
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(**arguments) is None:
        return False
    importlib.invalidate_caches()
    return True


def runWithProgressDialog(title: str, label: str, describe, work):
    """``work(progress, cancel)`` on the main thread behind a progress dialog whose Cancel button cancels it
    (the engine raises `clisc.errors.Cancelled` at its next check); returns what ``work`` returns.
    ``describe(stage, done, total)`` is the dialog's text for each progress report."""
    from clisc.progress import CancelToken

    dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=label, maximum=100)
    cancel = CancelToken()

    def progress(stage, done, total, message=""):
        dialog.labelText = describe(stage, done, total)
        dialog.value = int(100 * done / total) if total else 0
        slicer.app.processEvents()
        if dialog.wasCanceled:
            cancel.cancel()

    try:
        return work(progress, cancel)
    finally:
        dialog.close()


#
# SegmentJob
#


class SegmentJob:
    """Runs ``run(**arguments, progress=..., cancel=...)`` on a worker thread. The main thread polls
    `progress` and `finished`, then reads `result` or `error`; the worker never touches MRML."""

    def __init__(self, run, **arguments) -> None:
        from clisc.progress import CancelToken

        self.cancel = CancelToken()
        self.progress = ("starting", 0, 0, "")  # the latest (stage, done, total, message)
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._work, args=(run, arguments), daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    def _report(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.progress = (stage, done, total, message)

    def _work(self, run, arguments) -> None:
        try:
            self.result = run(**arguments, progress=self._report, cancel=self.cancel)
        except BaseException as error:  # handed to the main thread, which reports it
            self.error = error


#
# CLISCSegmentLogic
#


class CLISCSegmentLogic(ScriptedLoadableModuleLogic):
    """Text-prompted segmentation of volume nodes; no GUI needed (see the module docstring)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        unsupported = unsupportedSlicerMessage()
        if unsupported:
            raise RuntimeError(unsupported)
        self._models = {}  # family -> (spec, loaded model): the last CLIP and SAM, kept between runs

    def getParameterNode(self):
        return CLISCSegmentParameterNode(super().getParameterNode())

    def segment(self, volumeNode, prompts, clip=None, sam=None, device="auto", preset="accurate",
                negativePrompts=None, segmentationNode=None, showSaliency=False, progress=None, cancel=None,
                trainedRun=None, **options):
        """Segment ``volumeNode`` from text prompts; returns the segmentation node (one segment per prompt).

        Args:
            volumeNode: a scalar (or RGB) volume node.
            prompts: a list of prompts, or one text with prompts separated by semicolons.
            clip, sam: a catalogue name, a local path (as the CLI's --clip/--sam) or an already loaded model;
                None: the engine's defaults (biomedclip, sam_vit_b).
            device: auto, cuda or cpu. preset: accurate or fast.
            negativePrompts: what the target is not (replaces the engine's default negative ensemble).
            segmentationNode: add the segments to this node (existing segments are kept); None: a new node.
            showSaliency: also add the saliency maps as volume nodes on the input's grid.
            progress: called as ``progress(stage, done, total, message)``. cancel: a `clisc.progress.CancelToken`.
            trainedRun: a finished CLISC Train run folder: segment with its 3D U-Net instead (one segment, named
                after the run's prompt; ``prompts``, the models and the zero-shot options are not used).
            options: other `clisc.zeroshot.SegmentOptions` fields, e.g. ``slices="all"``, ``axis="axial"``.
        """
        volume = self.volumeFromNode(volumeNode)
        result = self.run(volume, prompts, clip, sam, device, preset, negativePrompts, progress, cancel, trainedRun,
                          **options)
        return self.addSegments(volumeNode, result, segmentationNode, showSaliency)

    # -- step 1, main thread

    @staticmethod
    def volumeFromNode(volumeNode):
        """A `clisc.volume.Volume` holding a copy of the node's voxels (K, J, I) and its IJK→RAS."""
        from clisc.volume import Volume

        array = slicer.util.arrayFromVolume(volumeNode).copy()
        if array.ndim == 4:  # an RGB(A) image (a loaded PNG/JPG): the engine reads its grey level
            array = array[..., :3].mean(axis=-1).astype(np.float32)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return Volume(array, slicer.util.arrayFromVTKMatrix(matrix), volumeNode.GetName())

    # -- step 2, any thread: no MRML

    def run(self, volume, prompts, clip=None, sam=None, device="auto", preset="accurate", negativePrompts=None,
            progress=None, cancel=None, trainedRun=None, **options):
        """The engine on a `Volume`; returns a `clisc.result.SegmentResult` (masks on the volume's grid)."""
        from clisc.progress import no_progress
        from clisc.zeroshot import ZeroShotSegmenter, preset_options

        if trainedRun:
            from clisc.cohort.run import apply_run

            return apply_run(trainedRun, volume, device, progress=progress or no_progress, cancel=cancel)

        if isinstance(prompts, str):
            prompts = splitPrompts(prompts)
        named = {family: str(spec) if isinstance(spec, (str, os.PathLike)) else None
                 for family, spec in (("clip", clip), ("sam", sam))}
        settings = preset_options(preset, device=device, **named, **options,
                                  negative_prompts=tuple(negativePrompts) if negativePrompts else None)
        report = progress or no_progress
        report("loading models", 0, 1, "")
        clipModel = self.loadModel("clip", settings.clip if clip is None else clip)
        samModel = self.loadModel("sam", settings.sam if sam is None else sam)
        report("loading models", 1, 1, "")
        segmenter = ZeroShotSegmenter(settings, clip=clipModel, sam=samModel)
        return segmenter.segment(volume, prompts, progress=report, cancel=cancel)

    def loadModel(self, family: str, spec):
        """A loaded CLIP ("clip") or SAM ("sam") from a catalogue name or path; a loaded model passes through.
        The last one of each family is kept, so that the next run with the same spec does not reload it."""
        if not isinstance(spec, (str, os.PathLike)):
            return spec
        cached = self._models.get(family)
        if cached is None or cached[0] != str(spec):
            from clisc.models.loaders import load_clip, load_sam

            self._models.pop(family, None)  # free the old one before loading the new one
            self._models[family] = (str(spec), (load_clip if family == "clip" else load_sam)(spec))
        return self._models[family][1]

    # -- step 3, main thread

    def addSegments(self, volumeNode, result, segmentationNode=None, showSaliency=False):
        """Write a `SegmentResult` as new segments (named after the prompts, never replacing existing ones)
        of ``segmentationNode`` or of a new segmentation node placed beside ``volumeNode``; returns the node.
        If writing fails, the segments and nodes added so far are removed again."""
        from clisc.writers import SEGMENT_COLORS

        scene = slicer.mrmlScene
        created = segmentationNode is None
        if created:
            segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                       scene.GenerateUniqueName(f"{volumeNode.GetName()} CLISC"))
            segmentationNode.CreateDefaultDisplayNodes()
            self._placeBeside(volumeNode, segmentationNode)
        if created or not segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole()):
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        added, saliencyNodes = [], []
        try:
            for n, (mask, prompt) in enumerate(zip(result.masks, result.names)):
                color = SEGMENT_COLORS[segmentation.GetNumberOfSegments() % len(SEGMENT_COLORS)]
                segmentId = segmentation.AddEmptySegment("", uniqueSegmentName(segmentation, prompt), color)
                added.append(segmentId)
                segment = segmentation.GetSegment(segmentId)
                segment.SetTag(PROMPT_TAG, prompt)
                terminology = terminologyEntry(prompt)
                if terminology:
                    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentationNode, segmentId,
                                                                  volumeNode)
                if showSaliency and result.saliency:
                    saliencyNodes.append(self._addSaliencyVolume(volumeNode, result.saliency[n],
                                                                 f"{segment.GetName()} saliency"))
                    segmentationNode.AddNodeReferenceID(SALIENCY_REFERENCE, saliencyNodes[-1].GetID())
        except Exception:
            for segmentId in added:
                segmentation.RemoveSegment(segmentId)
            for node in saliencyNodes + ([segmentationNode] if created else []):
                displayNodes = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
                for removed in displayNodes + [node]:
                    scene.RemoveNode(removed)
            raise
        return segmentationNode

    def _addSaliencyVolume(self, volumeNode, saliency, name):
        """A volume node holding ``saliency`` (K, J, I) on the grid of ``volumeNode``, shown in 0..1."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        node = slicer.util.addVolumeFromArray(saliency.astype(np.float32), matrix,
                                              slicer.mrmlScene.GenerateUniqueName(name))
        node.GetDisplayNode().AutoWindowLevelOff()
        node.GetDisplayNode().SetWindowLevelMinMax(0.0, 1.0)
        self._placeBeside(volumeNode, node)
        return node

    @staticmethod
    def _placeBeside(volumeNode, node) -> None:
        """Put ``node`` under the parent of ``volumeNode`` in the subject hierarchy (its study, where DICOM SEG
        export looks) and under the same transform."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)

        def item(dataNode):  # Slicer's GUI creates the items of new nodes; headless MRML does not
            return hierarchy.GetItemByDataNode(dataNode) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), dataNode)

        hierarchy.SetItemParent(item(node), hierarchy.GetItemParent(item(volumeNode)))
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())

    # -- first use: Python packages

    @staticmethod
    def missingPackages() -> list:
        """The requirements of `REQUIREMENTS` that the installed distributions leave unmet (missing or too old)."""
        return unmetRequirements(REQUIREMENTS, installedVersions())

    @staticmethod
    def missingTorch() -> list:
        """The unmet requirements of `TORCH_REQUIREMENTS`: for the PyTorch extension to install (see `installTorch`),
        never pip here."""
        return unmetRequirements(TORCH_REQUIREMENTS, installedVersions())

    def installPackages(self) -> list:
        """pip-install `missingPackages` (never torch or torchvision) with a constraints file pinning the installed
        `PINNED` packages, through ``slicer.packaging.pip_ensure`` (Slicer 5.12) or ``slicer.util.pip_install``.
        Returns the distributions whose installed version changed (Slicer must restart to use them)."""
        missing = self.missingPackages()
        if not missing:
            return []
        before = installedVersions()
        with tempfile.TemporaryDirectory() as folder:
            constraints = Path(folder) / "constraints.txt"
            constraints.write_text(pipConstraints(before), encoding="utf-8")
            try:
                from slicer.packaging import pip_ensure
            except ImportError:  # Slicer 5.10
                slicer.util.pip_install(["-c", str(constraints), *missing])
            else:
                pip_ensure(missing, constraints=constraints, requester="CLISC", prompt_install=False,
                           prompt_restart=False, skip_in_testing=False)
        importlib.invalidate_caches()
        after = installedVersions()
        return sorted(name for name, version in before.items() if after.get(name, version) != version)

    # -- first use: model weights

    @staticmethod
    def missingModels(clip=None, sam=None) -> list:
        """The catalogue names among ``clip`` and ``sam`` (None: the engine's defaults) not downloaded yet."""
        from clisc.models.cache import is_installed
        from clisc.models.catalogue import CATALOGUE
        from clisc.zeroshot import SegmentOptions

        entries = {entry.name: entry for entry in CATALOGUE}
        names = [SegmentOptions.clip if clip is None else clip, SegmentOptions.sam if sam is None else sam]
        return [name for name in names if isinstance(name, str) and name in entries and not is_installed(entries[name])]

    @staticmethod
    def modelsFolder() -> Path:
        """Where downloaded weights are kept: ``$CLISC_HOME/models`` (default ``~/.clisc/models``)."""
        from clisc.models.cache import clisc_home

        return clisc_home() / "models"

    @staticmethod
    def installedModels() -> list:
        """The catalogue models with files in the weights folder, as (name, folder, size in bytes of those files),
        in catalogue order. A partial download (which the next download resumes) is not counted."""
        from clisc.models.cache import installed_size, model_dir
        from clisc.models.catalogue import CATALOGUE

        models = [(entry.name, model_dir(entry.name), installed_size(entry.name)) for entry in CATALOGUE]
        return [model for model in models if model[2]]

    def removeModel(self, name: str) -> None:
        """Delete the weights ``name`` from the weights folder (and forget them if loaded); they are downloaded
        again when needed."""
        from clisc.models.cache import remove_model

        remove_model(name)
        self._models = {family: loaded for family, loaded in self._models.items() if loaded[0] != name}

    @staticmethod
    def cudaAvailable() -> bool:
        try:
            import torch
        except ImportError:
            return False
        return torch.cuda.is_available()

    # -- export

    @staticmethod
    def exportSegmentation(segmentationNode, path) -> None:
        """Write a Slicer segmentation file (.seg.nrrd): segments with names, colours, tags, terminology."""
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentationNode):
            raise RuntimeError(f"could not write {path}")

    @staticmethod
    def exportLabelmap(segmentationNode, referenceVolumeNode, path) -> None:
        """Write the visible segments as one labelmap (.nii.gz, .nrrd) on the reference volume's grid: label n
        is the n-th segment (1-based; where segments overlap, the later one wins)."""
        scene = slicer.mrmlScene
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            if not slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(
                    segmentationNode, labelmapNode, referenceVolumeNode):
                raise RuntimeError(f"could not export {segmentationNode.GetName()} as a labelmap")
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            if not storage.WriteData(labelmapNode):
                raise RuntimeError(f"could not write {path}")
        finally:
            displayNode = labelmapNode.GetDisplayNode()
            if displayNode and displayNode.GetColorNode():
                scene.RemoveNode(displayNode.GetColorNode())
            scene.RemoveNode(labelmapNode)

    @staticmethod
    def exportDicomSeg(segmentationNode, outputFolder) -> None:
        """Write a DICOM SEG file with Slicer's DICOM segmentation exporter. The segmentation must sit in the
        study of a volume loaded from DICOM (segment() puts it there)."""
        try:
            from DICOMSegmentationPlugin import DICOMSegmentationPluginClass
        except ImportError:
            raise RuntimeError(
                "DICOM SEG export needs Slicer's DICOM segmentation plugin, which the QuantitativeReporting "
                "extension provides (with DCMQI): install QuantitativeReporting from the Extensions Manager, "
                "restart Slicer and export again.") from None
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        exporter = DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(hierarchy.GetItemByDataNode(segmentationNode))
        if not exportables:
            raise RuntimeError("the segmentation cannot be exported as DICOM SEG: its reference volume must be "
                               "loaded from DICOM (DICOM module) and the segmentation must sit in its study")
        for exportable in exportables:
            exportable.directory = str(outputFolder)
        error = exporter.export(exportables)
        if error:
            raise RuntimeError(error)


#
# CLISCSegmentTest
#


class CLISCSegmentTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: segments a small synthetic volume with tiny models of the real architectures and
    random weights. That shows the mechanics (MRML in and out, names, tags, geometry), not accuracy."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_synthetic_volume()

    def test_segment_synthetic_volume(self):
        import tempfile

        from clisc.models.loaders import load_clip
        from clisc.models.random_weights import (
            TINY_CLIP_CONFIG,
            save_random_clip,
            tiny_sam,
        )

        self.delayDisplay("Building tiny CLIP and SAM models with random weights")
        with tempfile.TemporaryDirectory() as folder:
            clip = load_clip(save_random_clip(os.path.join(folder, "clip"), TINY_CLIP_CONFIG))
            sam = tiny_sam()
            k, j, i = np.mgrid[:2, :96, :96]
            ball = (2 * (k - 1)) ** 2 + (j - 40) ** 2 + (i - 50) ** 2 < 300
            array = (ball * 100 + np.random.default_rng(0).normal(0, 5, ball.shape)).astype(np.float32)
            volumeNode = slicer.util.addVolumeFromArray(array, np.diag([0.8, 0.8, 3.0, 1.0]), "CLISC test volume")

            self.delayDisplay("Segmenting")
            logic = CLISCSegmentLogic()
            prompts = ["tumor", "liver"]
            segmentationNode = logic.segment(volumeNode, prompts, clip=clip, sam=sam, device="cpu", preset="fast",
                                             saliency="gradcam", slices="all", showSaliency=True)
            segmentation = segmentationNode.GetSegmentation()
            self.assertEqual(segmentation.GetNumberOfSegments(), 2)
            for index, prompt in enumerate(prompts):
                segment = segmentation.GetNthSegment(index)
                self.assertEqual(segment.GetName(), prompt)
                tag = vtk.reference("")
                self.assertTrue(segment.GetTag(PROMPT_TAG, tag))
                self.assertEqual(str(tag), prompt)
                labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(
                    segmentationNode, segmentation.GetNthSegmentID(index), volumeNode)
                self.assertEqual(labelmap.shape, array.shape)
            self.assertEqual(segmentationNode.GetNumberOfNodeReferences(SALIENCY_REFERENCE), 2)
        self.delayDisplay("Test passed")
