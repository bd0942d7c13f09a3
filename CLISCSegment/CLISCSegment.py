"""CLISCSegment: segment a loaded volume from a text prompt (CLIP saliency + Segment Anything).

A thin adapter around the engine (`clisc.zeroshot`), in three steps: copy the volume out of MRML (main thread),
run the engine on a worker thread (a `CLISCLib.jobs.ThreadJob`), write the segments back (main thread,
`CLISCLib.mrml.addSegments`). Everything the GUI does works from Slicer's Python console::

    import CLISCSegment
    logic = CLISCSegment.CLISCSegmentLogic()
    segmentationNode = logic.segment(volumeNode, ["brain tumor"], clip="biomedclip", sam="sam_vit_b", device="cuda")

What this module shares with CLISCTrain (package installation, jobs, progress, the MRML adapter, terminology) is
in CLISCLib. The engine is imported only inside functions: this file loads before the engine's Python packages
are installed, and importing it installs and downloads nothing. Packages are installed on the first Segment
(after the user agrees), model weights on first use into a cache folder the Models section shows. Like Slicer's
module template, no ``from __future__ import annotations``: the parameter node wrapper reads the annotations as
types.
"""
import contextlib
import functools
import logging
import os
import threading
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Optional, Union

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
)

from clisc.profiles import PROFILES
from CLISCLib import mrml
from CLISCLib.dependencies import ensurePackages, requireSupportedSlicer
from CLISCLib.jobs import Progress, ThreadJob
from CLISCLib.progress import JobWatcher, runWithProgressDialog, showProgress
from CLISCLib.refinement import ReportingSegmenter, RefineSession, sliceBox, slicePixels
from CLISCLib.widget import ModuleWidget

DEFAULT_REFINE_SAM = "litemedsam"  # the fast preset's SAM: ships with CLISC, about 1 s per slice embedding on a CPU
EMBEDDING_CACHE_SLICES = 64  # refinement's embedding cache: 64 slices × 4 MiB = 256 MiB, for all volumes together
REFINED_VOLUMES = 3  # volumes whose Refiner (a copy of the voxels and their uint8 view for SAM) is kept
UNDO_STATES = 20  # undo states kept per segmentation

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
            "Segment Editor. Runs on a CUDA GPU in seconds, on a CPU in minutes (use the fast preset).\n\n"
            "Refine: pick a segment (any: a CLISC result, a trained model's, one you drew) over the input volume, "
            "then place positive points (part of the target), negative points (not part of it) or a box on any "
            "slice of any view: the slice each lies on (along the volume's slice direction, Advanced) is redrawn "
            "by Segment Anything with every point and the box on that slice. The first click on a slice computes "
            "its image embedding (about a second on a CPU with LiteMedSAM); later clicks there take a fraction of "
            "that. Propagate carries the last refined slice to its neighbours until SAM loses confidence or the "
            "shape jumps. Only the refined slices of the chosen segment change; Undo restores the segmentation.\n\n"
            "Shortcuts while this module is shown:\n" + "\n".join(
                f"{key}: {description}" for key, description, _ in CLISCSegmentWidget.REFINE_SHORTCUTS))
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


class CLISCSegmentWidget(ModuleWidget):
    """The module panel: input, prompts and settings, Segment (Cancel while it runs), Refine, exports, the weights
    cache. The Refine section's behaviour is a `CLISCLib.refinement.RefineSession`; its jobs are watched by a
    second, fast `JobWatcher` (a click on a cached slice answers within one poll)."""

    # (key, what it does, the widget method it calls): the shortcuts and the help text are made from this
    REFINE_SHORTCUTS = (
        ("Shift+P", "place positive points (part of the target)", "onPlacePositive"),
        ("Shift+N", "place negative points (not part of the target)", "onPlaceNegative"),
        ("Shift+B", "draw a box", "onPlaceBox"),
        ("Shift+C", "clear the points and the box", "onClearPoints"),
        ("Shift+U", "propagate up (increasing slice index)", "onPropagateUp"),
        ("Shift+D", "propagate down", "onPropagateDown"),
        ("Shift+A", "propagate both ways", "onPropagateBoth"),
        ("Ctrl+Z", "undo the last refinement or propagation", "onUndo"),
        ("Ctrl+Y", "redo", "onRedo"),
    )
    REFINE_POLL_MS = 30

    def __init__(self, parent=None) -> None:
        ModuleWidget.__init__(self, parent, pollIntervalMs=200)
        self._jobTargets = None  # (volume node, output segmentation node or None, show saliency) of the running job
        self.refineSession = None
        self._refineWatcher = None
        self._refineFinished = None  # the session's callback for the running refine job
        self._shortcuts = []

    def setup(self) -> None:
        if not self.setupPanel("UI/CLISCSegment.ui"):
            return
        self.logic = CLISCSegmentLogic()
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.trainedRunPath.connect("currentPathChanged(QString)", self.updateGui)
        self.ui.exportSegNrrdButton.connect("clicked(bool)", self.onExportSegNrrd)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.modelsCollapsibleButton.connect("contentsCollapsed(bool)",
                                                lambda collapsed: collapsed or self._listModels())
        self.ui.modelsTable.connect("itemSelectionChanged()", self._updateModelButtons)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.progressBar.hide()
        self._setupRefine()
        self.initializeParameterNode()

    def _setupRefine(self) -> None:
        self.refineSession = RefineSession(self.logic, self._watchRefineJob, self.log)
        self._refineWatcher = JobWatcher(self._onRefineUpdate, self._onRefineJobFinished, self.REFINE_POLL_MS)
        self.ui.refineSegmentSelector.connect("currentSegmentChanged(QString)", self.onRefineSegmentChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRefineSegmentChanged)
        for button, method in ((self.ui.placePositiveButton, self.onPlacePositive),
                               (self.ui.placeNegativeButton, self.onPlaceNegative),
                               (self.ui.placeBoxButton, self.onPlaceBox),
                               (self.ui.clearPointsButton, self.onClearPoints),
                               (self.ui.propagateUpButton, self.onPropagateUp),
                               (self.ui.propagateDownButton, self.onPropagateDown),
                               (self.ui.propagateBothButton, self.onPropagateBoth),
                               (self.ui.undoButton, self.onUndo), (self.ui.redoButton, self.onRedo),
                               (self.ui.refineCancelButton, self._refineWatcher.cancel)):
            button.connect("clicked(bool)", lambda checked=False, method=method: method())
        for key, description, method in self.REFINE_SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setEnabled(False)  # only while the module is shown
            shortcut.connect("activated()", getattr(self, method))
            self._shortcuts.append(shortcut)
        self.ui.refineProgressBar.hide()

    def enter(self) -> None:
        ModuleWidget.enter(self)
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
        if self.refineSession is not None:
            self.refineSession.leavePlaceMode()
        ModuleWidget.exit(self)

    def cleanup(self) -> None:
        if self._refineWatcher is not None:
            self._refineWatcher.stop()
        if self.refineSession is not None:
            self.refineSession.stop()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        ModuleWidget.cleanup(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.watcher.cancel()  # the volume goes away: its result would have nowhere to go
        self._refineWatcher.cancel()
        self.refineSession.stop()
        ModuleWidget.onSceneStartClose(self, caller, event)

    def initializeParameterNode(self) -> None:
        ModuleWidget.initializeParameterNode(self)
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def updateGui(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        onCpu = parameters.device == "cpu" or (parameters.device == "auto" and not self.logic.cudaAvailable())
        self.ui.cpuWarningLabel.setVisible(onCpu)
        if self.watcher.running:
            return  # the button is the Cancel button
        trained = bool(self.ui.trainedRunPath.currentPath)
        ready = bool(parameters.inputVolume and (trained or self.logic.splitPrompts(parameters.prompts)))
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = ("Segment the input volume" if ready
                                         else "Select an input volume and type a prompt (or choose a trained model)")
        for widget in (self.ui.promptsLineEdit, self.ui.negativePromptLineEdit, self.ui.presetComboBox,
                       self.ui.advancedCollapsibleButton):
            widget.enabled = not trained
        segmentation = parameters.outputSegmentation
        for button in (self.ui.exportSegNrrdButton, self.ui.exportLabelmapButton, self.ui.exportDicomSegButton):
            button.enabled = segmentation is not None
        self._updateRefineButtons()

    # -- Segment / Cancel

    def onSegmentButton(self) -> None:
        if self.watcher.running:
            self.watcher.cancel()
            self.log("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay("CLISC could not start the segmentation.", waitCursor=True):
            parameters = self._parameterNode
            if not ensurePackages(self.log):
                return
            trainedRun = self.ui.trainedRunPath.currentPath
            if trainedRun:
                options = dict(device=parameters.device, trainedRun=trainedRun)
                prompts, what = None, f"with the trained model in {trainedRun}"
            else:
                options = dict(clip=parameters.clip.strip() or None, sam=parameters.sam.strip() or None,
                               device=parameters.device, preset=parameters.preset,
                               negativePrompts=self.logic.splitPrompts(parameters.negativePrompt) or None,
                               saliency=None if parameters.saliency == "preset" else parameters.saliency,
                               profile=parameters.profile,
                               prompt_type=None if parameters.promptType == "profile" else parameters.promptType,
                               axis=parameters.axis, slices=parameters.slices)
                if not self.ensureModels(options["clip"], options["sam"]):
                    return
                prompts = self.logic.splitPrompts(parameters.prompts)
                what = "; ".join(prompts)
            self._jobTargets = (parameters.inputVolume, parameters.outputSegmentation, parameters.showSaliency)
            self.watcher.watch(self.logic.startSegmenting(parameters.inputVolume, prompts, **options))
            self.log(f"Segmenting {parameters.inputVolume.GetName()}: {what}")
            self._setRunning(True)

    def _setRunning(self, running: bool) -> None:
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if not running:
            self.updateGui()

    def onJobUpdate(self, update) -> None:
        if isinstance(update, Progress):
            showProgress(self.ui.progressBar, update)
        else:
            self.log(update)

    def onJobFinished(self, job) -> None:
        from clisc.errors import Cancelled, InputError

        self._setRunning(False)
        volumeNode, segmentationNode, showSaliency = self._jobTargets
        if job.cancelled or isinstance(job.error, Cancelled):
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
            result = job.result
            segmentationNode = mrml.addSegments(volumeNode, result, segmentationNode, showSaliency)
            self._parameterNode.outputSegmentation = segmentationNode
            for name, mask in zip(result.names, result.masks):
                relevant = result.report.get("selected_slices", {}).get(name)
                note = " (no slice looked relevant: try Slices: all)" if not mask.any() and not relevant else ""
                profile = result.report.get("profiles", {}).get(name)
                chosen = f", profile {profile['profile']} ({profile['why']})" if profile else ""
                self.log(f"  {name}: {int(mask.sum())} voxels{chosen}{note}")
            seconds = sum(result.report.get("seconds", {}).values())
            self.log(f"Done in {seconds:.0f} s on {result.report.get('device')}: {segmentationNode.GetName()}")
            count = segmentationNode.GetNumberOfNodeReferences(mrml.SALIENCY_REFERENCE)
            if showSaliency and count:
                saliencyNode = segmentationNode.GetNthNodeReference(mrml.SALIENCY_REFERENCE, count - 1)
                saliencyNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
                slicer.util.setSliceViewerLayers(foreground=saliencyNode, foregroundOpacity=0.4)

    # -- Refine

    def _updateRefineButtons(self) -> None:
        segmentationNode, segmentId, volumeNode = self._refineTarget()
        for button in (self.ui.placePositiveButton, self.ui.placeNegativeButton, self.ui.placeBoxButton):
            button.enabled = None not in (segmentationNode, segmentId, volumeNode)
        for button in (self.ui.clearPointsButton, self.ui.propagateUpButton, self.ui.propagateDownButton,
                       self.ui.propagateBothButton, self.ui.undoButton, self.ui.redoButton):
            button.enabled = self.refineSession.active
        self.ui.refineCancelButton.enabled = self._refineWatcher.running

    def onRefineSegmentChanged(self, segmentId=None) -> None:
        """Another segment (or input volume) was picked: stop refining the previous one, and say at once when the
        new one cannot be refined on the input volume. Refining starts with the first place button."""
        self.refineSession.stop()
        segmentationNode, segmentId, volumeNode = self._refineTarget()
        if segmentationNode is not None and segmentId and volumeNode is not None:
            problem = mrml.segmentGridProblem(segmentationNode, segmentId, volumeNode)
            if problem:
                self.log(f"Cannot refine this segment: {problem}")
        self._updateRefineButtons()

    def _refineTarget(self) -> tuple:
        """(segmentation node, segment ID, input volume node) picked in the GUI, each None when not picked."""
        return (self.ui.refineSegmentSelector.currentNode(), self.ui.refineSegmentSelector.currentSegmentID() or None,
                self.ui.inputVolumeSelector.currentNode())

    def _startRefining(self) -> bool:
        """Start refining the picked segment on the input volume unless that is under way: the engine's packages
        and the refinement SAM's weights first (asked for, as for Segment). False, with the reason, when it cannot."""
        from clisc.errors import InputError

        segmentationNode, segmentId, volumeNode = self._refineTarget()
        session = self.refineSession
        if session.active and (session.segmentationNode, session.segmentId, session.volumeNode) == (
                segmentationNode, segmentId, volumeNode):
            return True
        if segmentationNode is None or segmentId is None or volumeNode is None:
            self.log("Pick the input volume (Inputs) and the segment to refine (Refine) first.")
            return False
        with slicer.util.tryWithErrorDisplay("CLISC could not start refining.", waitCursor=True):
            if not ensurePackages(self.log):
                return False
            options = self._refineOptions()
            if not self.ensureWeights([name for name in self.logic.missingModels(sam=options["sam"])
                                       if name == options["sam"]]):
                return False
            try:
                session.start(segmentationNode, segmentId, volumeNode, **options)
            except InputError as error:
                self.log(f"Cannot refine this segment: {error}")
        self._updateRefineButtons()
        return session.active

    def _refineOptions(self) -> dict:
        """The SAM, device and slice direction of refinement: the Advanced section's (an empty SAM field: the
        preset's SAM)."""
        from clisc.zeroshot import preset_options

        parameters = self._parameterNode
        return dict(sam=parameters.sam.strip() or preset_options(parameters.preset).sam, device=parameters.device,
                    axis=parameters.axis)

    def _watchRefineJob(self, job, onFinished) -> None:
        self._refineFinished = onFinished
        self._refineWatcher.watch(job)
        self.ui.refineProgressBar.value = 0
        self.ui.refineProgressBar.show()
        self._updateRefineButtons()

    def _onRefineUpdate(self, update) -> None:
        if isinstance(update, Progress):
            showProgress(self.ui.refineProgressBar, update)
            if update.message:
                self.log(update.message)
        else:
            self.log(update)

    def _onRefineJobFinished(self, job) -> None:
        self.ui.refineProgressBar.hide()
        onFinished, self._refineFinished = self._refineFinished, None
        onFinished(job)  # may start the next job (clicks made meanwhile)
        self._updateRefineButtons()

    def onPlacePositive(self) -> None:
        if self._startRefining():
            self.refineSession.place(RefineSession.POSITIVE)

    def onPlaceNegative(self) -> None:
        if self._startRefining():
            self.refineSession.place(RefineSession.NEGATIVE)

    def onPlaceBox(self) -> None:
        if self._startRefining():
            self.refineSession.place(RefineSession.BOX)

    def onClearPoints(self) -> None:
        self._whenRefining(self.refineSession.clearPoints)

    def onPropagateUp(self) -> None:
        self._whenRefining(self.refineSession.propagate, "up")

    def onPropagateDown(self) -> None:
        self._whenRefining(self.refineSession.propagate, "down")

    def onPropagateBoth(self) -> None:
        self._whenRefining(self.refineSession.propagate, "both")

    def onUndo(self) -> None:
        self._whenRefining(self.refineSession.undo)

    def onRedo(self) -> None:
        self._whenRefining(self.refineSession.redo)

    def _whenRefining(self, action, *arguments) -> None:
        if not self.refineSession.active:
            self.log("Place a point on the segment to refine first (Refine section).")
            return
        action(*arguments)

    # -- first use: model weights

    def ensureModels(self, clip: Optional[str], sam: Optional[str]) -> bool:
        """`ensureWeights` of the CLIP and SAM a segmentation needs (None: the engine's defaults)."""
        return self.ensureWeights(self.logic.missingModels(clip, sam))

    def ensureWeights(self, names: list) -> bool:
        """Download the catalogue weights ``names`` (not in the cache yet), with a progress dialog; offer an
        offline import when the download fails. True when all are installed."""
        from clisc.errors import Cancelled
        from clisc.models.cache import download_model, import_model
        from clisc.models.catalogue import get_entry
        from clisc.models.download import DownloadError

        for name in names:
            entry = get_entry(name)
            if slicer.app.testingEnabled():
                raise RuntimeError(f"model weights '{name}' are not installed (not downloaded in testing mode)")
            if not slicer.util.confirmOkCancelDisplay(
                    f"CLISC needs the weights '{name}' ({entry.description} Licence: {entry.licence}).\n"
                    f"Download them now from {entry.homepage}?"):
                return False
            try:
                download = ThreadJob(functools.partial(download_model, name))
                download.start()
                runWithProgressDialog(
                    download, "CLISC: downloading weights", f"Downloading {name}...",
                    lambda progress: (f"{progress.stage}: {progress.done / 1e6:.0f} of {progress.total / 1e6:.0f} MB"
                                      if progress.total else progress.stage))
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

    # -- the weights cache

    @staticmethod
    def formatSize(size: int) -> str:
        """A size in bytes for people: "2.4 GB", "350 MB", "12 kB"."""
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if size >= scale:
                return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size / scale:.0f} {unit}"
        return f"{size} B"

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
            for column, text in enumerate((name, self.formatSize(size))):
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
                mrml.exportSegmentation(self._parameterNode.outputSegmentation, path)
                self.log(f"Wrote {path}")

    def onExportLabelmap(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, "Export labelmap", "", "Labelmap (*.nii.gz *.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                mrml.exportLabelmap(self._parameterNode.outputSegmentation, self._parameterNode.inputVolume, path)
                self.log(f"Wrote {path}")

    def onExportDicomSeg(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, "Folder for the DICOM SEG file")
        if folder:
            with slicer.util.tryWithErrorDisplay("DICOM SEG export failed.", waitCursor=True):
                exporter = mrml.exportDicomSeg(self._parameterNode.outputSegmentation, folder)
                self.log(f"Wrote DICOM SEG into {folder} ({exporter})")


#
# CLISCSegmentLogic
#


class CLISCSegmentLogic(ScriptedLoadableModuleLogic):
    """Text-prompted segmentation of volume nodes; no GUI needed (see the module docstring)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        requireSupportedSlicer()
        self._models = {}  # family -> (spec, loaded model): the last CLIP and SAM, kept between runs
        # refinement: one Refiner per volume (its image view and SAM's last logits), all sharing one bounded
        # embedding cache for the refinement SAM; undo states per segmentation node
        self._refiners = OrderedDict()  # volume node ID -> (signature, clisc.refine.Refiner)
        self._refineModelKey = self._refineSegmenter = self._embeddingCache = None
        self._refinerLock = threading.Lock()  # one refinement or propagation at a time
        self._histories = {}  # segmentation node ID -> vtkSegmentationHistory

    def getParameterNode(self):
        return CLISCSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def splitPrompts(text: str) -> list:
        """The prompts in a semicolon-separated text, stripped, empty ones dropped."""
        return [part.strip() for part in text.split(";") if part.strip()]

    def segment(self, volumeNode, prompts, clip=None, sam=None, device="auto", preset="accurate",
                negativePrompts=None, segmentationNode=None, showSaliency=False, progress=None, cancel=None,
                trainedRun=None, **options):
        """Segment ``volumeNode`` from text prompts; returns the segmentation node (one segment per prompt).
        Blocks until done (the engine runs on a worker thread meanwhile, and Slicer keeps processing events).

        Args:
            volumeNode: a scalar (or RGB) volume node.
            prompts: a list of prompts, or one text with prompts separated by semicolons.
            clip, sam: a catalogue name, a local path (as the CLI's --clip/--sam) or an already loaded model;
                None: the engine's defaults (biomedclip, sam_vit_b).
            device: auto, cuda or cpu. preset: accurate or fast.
            negativePrompts: what the target is not (replaces the engine's default negative ensemble).
            segmentationNode: add the segments to this node (existing segments are kept); None: a new node.
            showSaliency: also add the saliency maps as volume nodes on the input's grid.
            progress: called on this thread as ``progress(stage, done, total, message, **fields)``.
            cancel: a `clisc.progress.CancelToken`; cancelled, the call raises `clisc.errors.Cancelled`.
            trainedRun: a finished CLISC Train run folder: segment with its 3D U-Net instead (one segment, named
                after the run's prompt; ``prompts``, the models and the zero-shot options are not used).
            options: other `clisc.zeroshot.SegmentOptions` fields, e.g. ``slices="all"``, ``axis="axial"``.
        """
        job = self.startSegmenting(volumeNode, prompts, clip, sam, device, preset, negativePrompts, cancel,
                                   trainedRun, **options)
        return mrml.addSegments(volumeNode, job.wait(progress=progress), segmentationNode, showSaliency)

    def startSegmenting(self, volumeNode, prompts, clip=None, sam=None, device="auto", preset="accurate",
                        negativePrompts=None, cancel=None, trainedRun=None, **options) -> ThreadJob:
        """Copy the volume out of MRML (here, on the main thread) and start `run` on it on a worker thread; the
        started job, whose result is the `clisc.result.SegmentResult` for `CLISCLib.mrml.addSegments`. The
        arguments are `segment`'s."""
        volume = mrml.volumeFromNode(volumeNode)
        job = ThreadJob(functools.partial(self.run, volume, prompts, clip, sam, device, preset, negativePrompts,
                                          trainedRun=trainedRun, **options), token=cancel)
        job.start()
        return job

    def run(self, volume, prompts, clip=None, sam=None, device="auto", preset="accurate", negativePrompts=None,
            progress=None, cancel=None, trainedRun=None, **options):
        """The engine on a `clisc.volume.Volume`, on any thread (no MRML); returns a `clisc.result.SegmentResult`
        (masks on the volume's grid). The arguments are `segment`'s."""
        from clisc.progress import no_progress
        from clisc.zeroshot import ZeroShotSegmenter, preset_options

        report = progress or no_progress
        if trainedRun:
            from clisc.cohort.apply import apply_run

            return apply_run(trainedRun, volume, device, progress=report, cancel=cancel)

        if isinstance(prompts, str):
            prompts = self.splitPrompts(prompts)
        named = {family: str(spec) if isinstance(spec, (str, os.PathLike)) else None
                 for family, spec in (("clip", clip), ("sam", sam))}
        settings = preset_options(preset, device=device, **named, **options,
                                  negative_prompts=tuple(negativePrompts) if negativePrompts else None)
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

    # -- model weights

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

    # -- refinement: clicks on a slice, propagation, undo

    def sliceGeometry(self, volumeNode, axis=None) -> tuple:
        """(``volumeNode``'s grid as a `clisc.volume.Volume` without voxels, the slice axis as an array axis 0/1/2).
        ``axis``: None or "auto" (the acquisition axis), "axial", "coronal", "sagittal", "k", "j", "i", or 0/1/2."""
        from clisc.zeroshot.options import slice_axis

        geometry = mrml.volumeGeometry(volumeNode)
        if axis is None or isinstance(axis, str):
            return geometry, slice_axis(geometry, axis or "auto")
        return geometry, int(axis)

    @staticmethod
    def refineVolume(segmentationNode, volumeNode=None):
        """The volume a segmentation is refined on: ``volumeNode``, else its reference geometry's volume."""
        from clisc.errors import InputError

        volumeNode = volumeNode or segmentationNode.GetNodeReference(
            segmentationNode.GetReferenceImageGeometryReferenceRole())
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"{segmentationNode.GetName()} names no volume its segments were drawn on: give "
                             "volumeNode=, the image to refine them on")
        return volumeNode

    def refine(self, segmentationNode, segmentId, sliceIndex, points=None, labels=None, box=None, volumeNode=None,
               axis=None, sam=None, device="auto"):
        """Re-run SAM on one slice of a segment from clicks and/or a box, and write the new slice into the segment
        (one undo state); returns the `clisc.refine.SliceRefinement`. Blocks until done (the work runs on a worker
        thread meanwhile and Slicer keeps processing events).

        Args:
            segmentationNode, segmentId: the segment: any, a CLISC result, a trained U-Net's or one drawn by hand.
            sliceIndex: the slice, along ``axis`` of the volume's voxel array (for axial slices of an axial scan,
                the k index Slicer shows in the Data probe).
            points: the clicks of this slice (every one so far, as SAM takes them), in world RAS millimetres as
                markups give them (``markupsNode.GetNthControlPointPositionWorld(n)``); each is taken at its nearest
                voxel (`clisc.refine.slice_point`) and must lie on ``sliceIndex``.
            labels: one per point, 1 positive (part of the target), 0 negative; default all positive.
            box: RAS corners (mm, world) of a box: two opposite corners, or the eight of a markups ROI; its extent in
                the slice plane is used.
            volumeNode: the image (default the segmentation's reference geometry volume); the segment must lie on
                its voxel grid, or InputError says why not.
            axis: the slice direction, None = the volume's acquisition axis (see `sliceGeometry`).
            sam: a catalogue name, checkpoint path, loaded SAM, or a `clisc.sam.SliceSegmenter`; None: LiteMedSAM
                (`DEFAULT_REFINE_SAM`). device: auto, cpu or cuda.

        Only slice ``sliceIndex`` of this segment changes. The first click on a slice whose image embedding is not
        cached costs one SAM encoder pass; later clicks reuse it (`EMBEDDING_CACHE_SLICES`).
        """
        return self.startRefining(segmentationNode, segmentId, sliceIndex, points, labels, box, volumeNode, axis,
                                  sam, device).wait()

    def startRefining(self, segmentationNode, segmentId, sliceIndex, points=None, labels=None, box=None,
                      volumeNode=None, axis=None, sam=None, device="auto") -> ThreadJob:
        """`refine` as a started background job (what the Refine section runs): the inputs are checked and copied
        here (InputError for a segment on another grid, a point outside the volume or on another slice), SAM runs
        on a worker thread, and the job's finish step writes the slice back on the main thread."""
        volumeNode = self.refineVolume(segmentationNode, volumeNode)
        mask = mrml.segmentMask(segmentationNode, segmentId, volumeNode)
        geometry, axis = self.sliceGeometry(volumeNode, axis)
        pixels = None
        if points is not None and len(points):
            pixels = slicePixels(geometry, axis, sliceIndex, [mrml.volumeRasFromWorld(volumeNode, p) for p in points])
        boxPixels = None if box is None else sliceBox(geometry, axis,
                                                      [mrml.volumeRasFromWorld(volumeNode, c) for c in box])
        signature, prepare = self._refinerPreparation(volumeNode, axis, sam, device)

        uncached = (f"slice {sliceIndex} has no image embedding yet: computing it (one SAM encoder pass; the next "
                    "clicks on it reuse it)")

        def work(progress, cancel):
            with self._usingRefiner(prepare, progress, cancel, embeddings=1, message=uncached) as refiner:
                return refiner, refiner.refine(mask, sliceIndex, pixels, labels, boxPixels)

        def finish(output):
            refiner, refinement = output
            self._keepRefiner(volumeNode, signature, refiner)
            self._saveUndoState(segmentationNode)
            mrml.replaceSegmentSlices(segmentationNode, segmentId, volumeNode, axis, {refinement.index: refinement.mask})
            return refinement

        job = ThreadJob(work, finish)
        job.start()
        return job

    def propagate(self, segmentationNode, segmentId, sliceIndex, direction="both", volumeNode=None, axis=None,
                  sam=None, device="auto", progress=None, cancel=None):
        """Carry slice ``sliceIndex`` of a segment to its neighbours with SAM (`clisc.refine.Refiner.propagate`:
        each next slice prompted with the previous one's box, until SAM's predicted IoU or the overlap with the
        previous slice falls below its threshold) and write the slices it rewrote (one undo state); returns the
        `clisc.refine.Propagation`, whose ``message`` says where and why each direction stopped. From an empty
        slice nothing changes, and the message says so. Blocks until done.

        ``direction``: "up" (increasing slice index), "down" or "both". Each slice reached costs one SAM image
        embedding unless cached. ``progress(stage, done, total, message)`` and ``cancel`` (a
        `clisc.progress.CancelToken`: the call then raises `clisc.errors.Cancelled` and writes nothing) as in
        `segment`; the other arguments are `refine`'s.
        """
        return self.startPropagating(segmentationNode, segmentId, sliceIndex, direction, volumeNode, axis, sam,
                                     device, cancel).wait(progress=progress)

    def startPropagating(self, segmentationNode, segmentId, sliceIndex, direction="both", volumeNode=None,
                         axis=None, sam=None, device="auto", cancel=None) -> ThreadJob:
        """`propagate` as a started background job (cancellable; its progress counts the embeddings computed)."""
        volumeNode = self.refineVolume(segmentationNode, volumeNode)
        mask = mrml.segmentMask(segmentationNode, segmentId, volumeNode)
        geometry, axis = self.sliceGeometry(volumeNode, axis)
        count = geometry.array.shape[axis]
        reachable = {"up": count - 1 - sliceIndex, "down": sliceIndex}.get(direction, count - 1)
        signature, prepare = self._refinerPreparation(volumeNode, axis, sam, device)

        def work(progress, cancel):
            with self._usingRefiner(prepare, progress, cancel, embeddings=reachable, message="") as refiner:
                return refiner, refiner.propagate(mask, sliceIndex, direction)

        def finish(output):
            import numpy as np

            refiner, propagation = output
            self._keepRefiner(volumeNode, signature, refiner)
            changed = propagation.changed_slices
            if changed:
                self._saveUndoState(segmentationNode)
                slices = np.moveaxis(propagation.mask, axis, 0)
                mrml.replaceSegmentSlices(segmentationNode, segmentId, volumeNode, axis,
                                          {index: slices[index] for index in changed})
            return propagation

        job = ThreadJob(work, finish, token=cancel)
        job.start()
        return job

    def _refinerPreparation(self, volumeNode, axis: int, sam, device) -> tuple:
        """(the signature of the Refiner ``volumeNode`` needs, a function giving that Refiner on the worker
        thread): the kept one when the volume's voxels, geometry, the axis and the SAM are unchanged, else a new
        one, built from a copy of the voxels taken here. A new SAM empties the embedding cache (the old SAM's
        embeddings are of no use to it, and would keep the old model in memory)."""
        spec = DEFAULT_REFINE_SAM if sam is None else sam
        modelKey = (str(spec) if isinstance(spec, (str, os.PathLike)) else id(spec), device)
        if modelKey != self._refineModelKey:
            from clisc.refine import EmbeddingCache

            self._refineModelKey, self._refineSegmenter = modelKey, None
            self._embeddingCache = EmbeddingCache(EMBEDDING_CACHE_SLICES)
            self._refiners.clear()
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        signature = (volumeNode.GetImageData().GetMTime(), tuple(matrix.GetElement(r, c) for r in range(4)
                                                                  for c in range(4)), axis, modelKey)
        kept = self._refiners.get(volumeNode.GetID())
        if kept is not None and kept[0] == signature:
            return signature, lambda: kept[1]
        volume = mrml.volumeFromNode(volumeNode)

        def build():
            from clisc.refine import Refiner

            if self._refineSegmenter is None:
                self._refineSegmenter = ReportingSegmenter(self._sliceSegmenter(spec, device))
            return Refiner(self._refineSegmenter, volume, axis, cache=self._embeddingCache)

        return signature, build

    def _sliceSegmenter(self, sam, device):
        """A `clisc.sam.SliceSegmenter` of ``sam`` on ``device`` (one given already built is used as it is)."""
        if hasattr(sam, "predict_logits"):
            return sam
        from clisc.result import resolve_device
        from clisc.sam import SliceSegmenter

        return SliceSegmenter(self.loadModel("sam", sam).to(resolve_device(device)))

    @contextlib.contextmanager
    def _usingRefiner(self, prepare, progress, cancel, embeddings: int, message: str):
        """The prepared Refiner, for one job at a time (worker thread), its segmenter reporting to that job: at
        most ``embeddings`` embeddings, ``message`` said as each starts."""
        with self._refinerLock:
            refiner = prepare()
            segmenter = refiner.segmenter
            segmenter.progress, segmenter.cancel, segmenter.total, segmenter.embedded = progress, cancel, embeddings, 0
            segmenter.message = message
            try:
                yield refiner
            finally:
                segmenter.progress = segmenter.cancel = None

    def _keepRefiner(self, volumeNode, signature, refiner) -> None:
        """Keep ``refiner`` for ``volumeNode`` (main thread), dropping the least recently used beyond
        `REFINED_VOLUMES`."""
        self._refiners[volumeNode.GetID()] = (signature, refiner)
        self._refiners.move_to_end(volumeNode.GetID())
        while len(self._refiners) > REFINED_VOLUMES:
            self._refiners.popitem(last=False)

    def _history(self, segmentationNode):
        """The undo states of ``segmentationNode``'s segmentation (a `vtkSegmentationHistory`, as Segment Editor
        keeps), made on first use."""
        history = self._histories.get(segmentationNode.GetID())
        if history is None or history.GetSegmentation() is not segmentationNode.GetSegmentation():
            history = slicer.vtkSegmentationHistory()
            history.SetMaximumNumberOfStates(UNDO_STATES)
            history.SetSegmentation(segmentationNode.GetSegmentation())
            self._histories[segmentationNode.GetID()] = history
        return history

    def _saveUndoState(self, segmentationNode) -> None:
        self._history(segmentationNode).SaveState()

    def undo(self, segmentationNode) -> bool:
        """Put the segmentation back as it was before the last refinement or propagation; False when there is
        nothing to undo. Like Segment Editor's undo, it restores every segment of the segmentation to that state."""
        history = self._history(segmentationNode)
        return bool(history.IsRestorePreviousStateAvailable() and history.RestorePreviousState())

    def redo(self, segmentationNode) -> bool:
        """Redo what `undo` undid; False when there is nothing to redo (an edit since the undo clears it)."""
        history = self._history(segmentationNode)
        return bool(history.IsRestoreNextStateAvailable() and history.RestoreNextState())

    @staticmethod
    def cudaAvailable() -> bool:
        try:
            import torch
        except ImportError:
            return False
        return torch.cuda.is_available()


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
        self.setUp()
        self.test_refine_and_undo()

    def test_segment_synthetic_volume(self):
        import tempfile

        import numpy as np
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
                self.assertTrue(segment.GetTag(mrml.PROMPT_TAG, tag))
                self.assertEqual(str(tag), prompt)
                labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(
                    segmentationNode, segmentation.GetNthSegmentID(index), volumeNode)
                self.assertEqual(labelmap.shape, array.shape)
            self.assertEqual(segmentationNode.GetNumberOfNodeReferences(mrml.SALIENCY_REFERENCE), 2)
        self.delayDisplay("Test passed")

    def test_refine_and_undo(self):
        """A click refines only its slice of its segment; undo puts the segment back. A tiny random SAM: the
        mechanics, not the mask's quality."""
        import numpy as np
        from clisc.models.random_weights import tiny_sam
        from clisc.sam import SliceSegmenter

        self.delayDisplay("Refining a segment with a tiny SAM")
        array = np.random.default_rng(0).normal(size=(3, 48, 48)).astype(np.float32)
        array[:, 12:36, 12:36] += 3
        volumeNode = slicer.util.addVolumeFromArray(array, np.diag([-0.8, 0.8, 2.5, 1.0]), "CLISC refine test")
        drawn = np.zeros(array.shape, np.uint8)
        drawn[:, 14:30, 14:30] = 1
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "drawn")
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentationNode, segmentId, volumeNode)
        logic = CLISCSegmentLogic()
        ras = (np.diag([-0.8, 0.8, 2.5, 1.0]) @ [24, 24, 1, 1])[:3]
        refinement = logic.refine(segmentationNode, segmentId, 1, points=[ras], volumeNode=volumeNode,
                                  sam=SliceSegmenter(tiny_sam(image_size=256)))
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0
        self.assertTrue(np.array_equal(result[1], refinement.mask))
        self.assertTrue(np.array_equal(result[[0, 2]], drawn[[0, 2]] > 0))
        self.assertTrue(logic.undo(segmentationNode))
        restored = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertTrue(np.array_equal(restored, drawn))
        self.delayDisplay("Test passed")
