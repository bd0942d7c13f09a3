"""CLISCSegment: segment a loaded volume from a text prompt (CLIP saliency + Segment Anything).

A thin adapter around the engine (`clisc.zeroshot`), in three steps: copy the volume out of MRML (main thread),
run the engine on a worker thread (a `CLISCLib.jobs.ThreadJob`), write the segments back (main thread,
`CLISCLib.mrml.addSegments`). Everything the GUI does works from Slicer's Python console::

    import CLISCSegment
    logic = CLISCSegment.CLISCSegmentLogic()
    segmentationNode = logic.segment(volumeNode, ["brain tumor"], clip="biomedclip", sam="sam_vit_b", device="cuda")

With ``logic.useServer(url, apiKey)`` (the GUI's Run on: a server) the same calls run on a `clisc serve` machine
(CLISCLib.remote), and Slicer needs no torch. What this module shares with CLISCTrain (package installation, jobs,
progress, the MRML adapter, terminology, the remote client) and the logic of its Refine, Models and engine parts
are in CLISCLib. The engine is imported only inside functions: this file loads before the engine's Python packages
are installed, and importing it installs and downloads nothing. Packages are installed on the first Segment
(after the user agrees), model weights on first use into a cache folder the Models section shows. Like Slicer's
module template, no ``from __future__ import annotations``: the parameter node wrapper reads the annotations as
types.
"""
import functools
import logging
import os
import traceback
from typing import Annotated, Union

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
from CLISCLib import mrml, weights
from CLISCLib.dependencies import requireSupportedSlicer
from CLISCLib.engines import LocalEngine, RemoteEngine, describeResult, splitPrompts
from CLISCLib.jobs import Progress, ThreadJob
from CLISCLib.progress import showProgress
from CLISCLib.refineLogic import RefineLogic
from CLISCLib.refineSection import RefineSection
from CLISCLib.serverSection import RUN_ON, ServerSection
from CLISCLib.widget import ModuleWidget

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
            "Refine: pick a segment over the input volume, then place positive or negative points or a box on any "
            "slice: Segment Anything redraws that slice. Propagate carries it to its neighbours; Undo restores.\n\n"
            "Run on a server: CLISC runs on a machine with `clisc serve` (a GPU server); Slicer needs no PyTorch.\n\n"
            "Shortcuts while this module is shown:\n" + "\n".join(
                f"{key}: {description}" for key, description, _ in RefineSection.SHORTCUTS))
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
    runOn: Annotated[str, Choice(RUN_ON)] = RUN_ON[0]
    serverUrl: str = ""
    serverCaFile: str = ""  # the API key is not a parameter: parameters are saved with the scene


#
# CLISCSegmentWidget
#


class CLISCSegmentWidget(ModuleWidget):
    """The module panel: input, prompts and settings, where CLISC runs, Segment (Cancel while it runs), Refine (a
    `CLISCLib.refineSection.RefineSection`), exports, the weights cache."""

    def __init__(self, parent=None) -> None:
        ModuleWidget.__init__(self, parent, pollIntervalMs=200)
        self._jobTargets = None  # (volume node, output segmentation node or None, show saliency) of the running job
        self.refineSection = None

    def setup(self) -> None:
        if not self.setupPanel("UI/CLISCSegment.ui"):
            return
        self.logic = CLISCSegmentLogic()
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.trainedRunPath.connect("currentPathChanged(QString)", self.updateGui)
        self.serverSection = ServerSection(self.ui, self.log, self.logic.useServer)
        for button, kind in ((self.ui.exportSegNrrdButton, "seg.nrrd"), (self.ui.exportLabelmapButton, "labelmap"),
                             (self.ui.exportDicomSegButton, "dicom")):
            button.connect("clicked(bool)", lambda checked=False, kind=kind: self.onExport(kind))
        self.weights = weights.WeightsSection(self.ui, self.logic, self.log)
        self.ui.progressBar.hide()
        self.refineSection = RefineSection(self.ui, self.logic, self.log, self._prepareRefining)
        self.initializeParameterNode()

    def enter(self) -> None:
        ModuleWidget.enter(self)
        self.refineSection.enableShortcuts(True)

    def exit(self) -> None:
        self.refineSection.enableShortcuts(False)
        ModuleWidget.exit(self)

    def cleanup(self) -> None:
        if self.refineSection is not None:
            self.refineSection.cleanup()
        ModuleWidget.cleanup(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.watcher.cancel()  # the volume goes away: its result would have nowhere to go
        self.refineSection.stop()
        ModuleWidget.onSceneStartClose(self, caller, event)

    def initializeParameterNode(self) -> None:
        ModuleWidget.initializeParameterNode(self)
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def updateGui(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        remote = parameters.runOn == RUN_ON[1]
        self.serverSection.updateGui()
        self.ui.deviceComboBox.enabled = not remote  # the server has its own
        onCpu = parameters.device == "cpu" or (parameters.device == "auto" and not self.logic.cudaAvailable())
        self.ui.cpuWarningLabel.setVisible(onCpu and not remote)
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
        self.refineSection.updateButtons()

    # -- Segment / Cancel

    def onSegmentButton(self) -> None:
        if self.watcher.running:
            self.watcher.cancel()
            self.log("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay("CLISC could not start the segmentation.", waitCursor=True):
            parameters = self._parameterNode
            if not self.serverSection.use():
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
                               axis=parameters.axis, slices=parameters.slices, saliencyMaps=parameters.showSaliency)
                if self.logic.server is None and not self.weights.ensureModels(options["clip"], options["sam"]):
                    return
                prompts = self.logic.splitPrompts(parameters.prompts)
                what = "; ".join(prompts)
            self._jobTargets = (parameters.inputVolume, parameters.outputSegmentation, parameters.showSaliency)
            self.watcher.watch(self.logic.startSegmenting(parameters.inputVolume, prompts, **options))
            where = f" on {self.logic.server.url}" if self.logic.server else ""
            self.log(f"Segmenting {parameters.inputVolume.GetName()}{where}: {what}")
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
            self.log("\n".join(describeResult(result, segmentationNode.GetName())))
            if showSaliency:
                mrml.showLastSaliency(segmentationNode)

    # -- Refine

    def _prepareRefining(self):
        """The Refine section's options (the Advanced section's SAM, else the preset's; the device; the slice
        direction), once what refining needs is installed; None when it cannot start."""
        parameters = self._parameterNode
        if not self.serverSection.use():
            return None
        sam = parameters.sam.strip() or None
        if self.logic.server is None:
            from clisc.zeroshot import preset_options

            sam = sam or preset_options(parameters.preset).sam
            if not self.weights.ensureWeights([name for name in self.logic.missingModels(sam=sam) if name == sam]):
                return None
        return dict(sam=sam, device=parameters.device, axis=parameters.axis, preset=parameters.preset)

    # -- export

    def onExport(self, kind: str) -> None:
        """Export the output segmentation: "seg.nrrd", "labelmap" (on the input volume's grid) or "dicom" (a DICOM
        SEG file into a folder, with this Slicer's exporter)."""
        parameters = self._parameterNode
        if kind == "dicom":
            path = qt.QFileDialog.getExistingDirectory(None, "Folder for the DICOM SEG file")
        else:
            path = qt.QFileDialog.getSaveFileName(None, f"Export {kind}", "", "Slicer segmentation (*.seg.nrrd)"
                                                  if kind == "seg.nrrd" else "Labelmap (*.nii.gz *.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                if kind == "dicom":
                    path = f"{path} ({mrml.exportDicomSeg(parameters.outputSegmentation, path)})"
                elif kind == "labelmap":
                    mrml.exportLabelmap(parameters.outputSegmentation, parameters.inputVolume, path)
                else:
                    mrml.exportSegmentation(parameters.outputSegmentation, path)
                self.log(f"Wrote {path}")


#
# CLISCSegmentLogic
#


class CLISCSegmentLogic(ScriptedLoadableModuleLogic):
    """Text-prompted segmentation of volume nodes; no GUI needed (see the module docstring)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        requireSupportedSlicer()
        self.local = LocalEngine()
        self.remote = None  # a CLISCLib.engines.RemoteEngine while CLISC runs on a server (useServer)
        self.refining = RefineLogic(self.loadModel, lambda: self.remote and self.remote.sessions)
        # the started jobs of `refine` and `propagate` (the Refine section's), and the undo states: RefineLogic's
        self.startRefining, self.startPropagating = self.refining.startRefining, self.refining.startPropagating
        self.undo, self.redo = self.refining.undo, self.refining.redo

    @property
    def server(self):
        """The `CLISCLib.remote.EngineServer` CLISC runs on; None: this computer."""
        return self.remote and self.remote.server

    def useServer(self, url, apiKey=None, caFile=None):
        """Run on the `clisc serve` at ``url`` from now on (None: on this computer); returns its
        `CLISCLib.remote.EngineServer`. ``apiKey``: the server's key (e.g. read from a file: never type it into a
        command others can see); ``caFile``: the CA certificate of a server with a self-signed certificate. Models
        are then the server's, by name (``server.info()``)."""
        if self.remote is None or self.remote.settings != (url, apiKey, caFile):
            if self.remote is not None:
                self.remote.close()
            self.remote = RemoteEngine(url, apiKey, caFile) if url else None
        return self.server

    def getParameterNode(self):
        return CLISCSegmentParameterNode(super().getParameterNode())

    splitPrompts = staticmethod(splitPrompts)

    def segment(self, volumeNode, prompts, clip=None, sam=None, device="auto", preset="accurate",
                negativePrompts=None, segmentationNode=None, showSaliency=False, progress=None, cancel=None,
                trainedRun=None, **options):
        """Segment ``volumeNode`` from text prompts; returns the segmentation node (one segment per prompt).
        Blocks until done (the engine runs on a worker thread meanwhile, and Slicer keeps processing events).

        Args:
            volumeNode: a scalar (or RGB) volume node. prompts: a list, or one text with prompts separated by ";".
            clip, sam: a catalogue name, a local path (as the CLI's --clip/--sam) or an already loaded model;
                None: the engine's defaults (biomedclip, sam_vit_b). On a server (`useServer`): its models' names.
            device: auto, cuda or cpu (a server chooses its own). preset: accurate or fast.
            negativePrompts: what the target is not (replaces the engine's default negative ensemble).
            segmentationNode: add the segments to this node (existing segments are kept); None: a new node.
            showSaliency: also add the saliency maps as volume nodes on the input's grid.
            progress: called on this thread as ``progress(stage, done, total, message, **fields)``.
            cancel: a `clisc.progress.CancelToken`; cancelled, the call raises `clisc.errors.Cancelled`.
            trainedRun: a finished CLISC Train run folder (on a server: a run's name): segment with its 3D U-Net.
            options: other `clisc.zeroshot.SegmentOptions` fields, e.g. ``slices="all"``, ``axis="axial"``.
        """
        job = self.startSegmenting(volumeNode, prompts, clip, sam, device, preset, negativePrompts, cancel,
                                   trainedRun, saliencyMaps=showSaliency, **options)
        return mrml.addSegments(volumeNode, job.wait(progress=progress), segmentationNode, showSaliency)

    def startSegmenting(self, volumeNode, prompts, clip=None, sam=None, device="auto", preset="accurate",
                        negativePrompts=None, cancel=None, trainedRun=None, saliencyMaps=True, **options) -> ThreadJob:
        """Copy the volume out of MRML (here, on the main thread) and start `run` on it on a worker thread, or on the
        server (`useServer`; a trained run is then the server's, by name; ``saliencyMaps``: fetch the saliency maps);
        the started job, whose result is the `clisc.result.SegmentResult` for `CLISCLib.mrml.addSegments`. The
        arguments are `segment`'s."""
        if self.remote is None:
            work = functools.partial(self.run, mrml.volumeFromNode(volumeNode), prompts, clip, sam, device, preset,
                                     negativePrompts, trainedRun=trainedRun, **options)
        else:
            work = self.remote.segmentWork(volumeNode, prompts, clip, sam, preset, negativePrompts, trainedRun,
                                           saliencyMaps, options)
        job = ThreadJob(work, token=cancel)
        job.start()
        return job

    def run(self, volume, prompts, clip=None, sam=None, device="auto", preset="accurate", negativePrompts=None,
            progress=None, cancel=None, trainedRun=None, **options):
        """The engine on a `clisc.volume.Volume` in this Python, on any thread (no MRML): a
        `clisc.result.SegmentResult`. The arguments are `segment`'s."""
        return self.local.run(volume, prompts, clip, sam, device, preset, negativePrompts, progress, cancel,
                              trainedRun, **options)

    def loadModel(self, family: str, spec):
        """A loaded CLIP ("clip") or SAM ("sam") from a catalogue name or path (the last of each kept)."""
        return self.local.loadModel(family, spec)

    # -- model weights (CLISCLib.weights)

    missingModels = staticmethod(weights.missingModels)
    modelsFolder = staticmethod(weights.modelsFolder)
    installedModels = staticmethod(weights.installedModels)

    def removeModel(self, name: str) -> None:
        """Delete the weights ``name`` (and forget them if loaded); they are downloaded again when needed."""
        weights.removeModel(name)
        self.local.forget(name)

    # -- refinement: clicks on a slice, propagation, undo (CLISCLib.refineLogic)

    def refine(self, segmentationNode, segmentId, sliceIndex, points=None, labels=None, box=None, volumeNode=None,
               axis=None, sam=None, device="auto", preset=None):
        """Re-run SAM on one slice of a segment from clicks (world RAS mm, as markups give them; labels 1 positive,
        0 negative) and/or a box (RAS corners), write the new slice into the segment (one undo state) and return the
        `clisc.refine.SliceRefinement`; only that slice of that segment changes. Blocks until done. The arguments:
        `CLISCLib.refineLogic.RefineLogic.startRefining`."""
        return self.refining.startRefining(segmentationNode, segmentId, sliceIndex, points, labels, box, volumeNode,
                                           axis, sam, device, preset).wait()

    def propagate(self, segmentationNode, segmentId, sliceIndex, direction="both", volumeNode=None, axis=None,
                  sam=None, device="auto", progress=None, cancel=None, preset=None):
        """Carry slice ``sliceIndex`` of a segment "up" (increasing index), "down" or "both" ways with SAM, write the
        slices it rewrote (one undo state) and return the `clisc.refine.Propagation` (its ``message``: where and why
        each direction stopped). Blocks until done; ``progress`` and ``cancel`` as in `segment`; the other
        arguments: `CLISCLib.refineLogic.RefineLogic.startPropagating`."""
        return self.refining.startPropagating(segmentationNode, segmentId, sliceIndex, direction, volumeNode, axis,
                                              sam, device, cancel, preset).wait(progress=progress)

    cudaAvailable = staticmethod(LocalEngine.cudaAvailable)


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
        from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam

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
