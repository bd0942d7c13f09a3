"""CLISCTrain: pseudo-label a cohort and self-train a 3D U-Net (CLISC), from Slicer's GUI or its Python console.

Training runs the engine (``python -m clisc train ... --json-progress``) in a background process started with
Slicer's Python (a `CLISCLib.jobs.ProcessJob`): Slicer stays responsive, a timer on the main thread reads the
process's JSON-lines progress, Cancel ends the whole process tree, and the run folder, which the engine writes
file by file atomically, can be resumed. Applying the trained U-Net and computing a case's prediction run on a
worker thread (a `CLISCLib.jobs.ThreadJob`). The run folder's layout is the engine's
(`clisc.cohort.run_folder.RunFolder`). Everything the GUI does works from the console::

    import CLISCTrain
    logic = CLISCTrain.CLISCTrainLogic()
    summary = logic.run("/data/cohort", "brain tumor", "/data/run1", wait=True, unet_epochs=100, device="cuda")
    volumeNode, segmentationNode = logic.loadCase("/data/run1", "pat0001", "pseudo_label")
    segmentationNode = logic.apply("/data/run1", someVolumeNode)

What this module shares with CLISCSegment is in CLISCLib. The engine is imported only inside functions (importing
this file installs nothing; the first Start installs the missing Python packages), and there is no
``from __future__ import annotations`` (the parameter node wrapper reads the annotations as types).
"""
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

from CLISCLib import mrml
from CLISCLib.dependencies import ensurePackages, requireSupportedSlicer
from CLISCLib.jobs import Progress, ProcessJob, ThreadJob, engineEnvironment, pythonExecutable
from CLISCLib.progress import runWithProgressDialog, showProgress
from CLISCLib.serverSection import ServerSection
from CLISCLib.widget import ModuleWidget

CASE_PATH_ATTRIBUTE = "CLISC.CasePath"  # on volume nodes loadCase made: the cohort file they were read from
SCENE_COHORT_FOLDER = "cohort"  # in the output folder: where a cohort of scene volumes is written (not the engine's)


#
# CLISCTrain
#


class CLISCTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLISC Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CLISC developers (SlicerCLISC project)"]
        self.parent.helpText = (
            "Train a 3D segmentation model on a whole cohort without annotations (CLISC): CLIP labels the slices, "
            "a classifier's CAMs prompt Segment Anything for pseudo-labels, and a 3D U-Net trains on them with "
            "SAM-Seg similarity filtering. The run folder keeps every stage's output; an interrupted run resumes. "
            "Review any case's pseudo-label or prediction, and apply the trained model to a loaded volume here "
            "or in CLISC Segment.")
        self.parent.acknowledgementText = (
            "Built on Segment Anything (Meta), open_clip, MONAI and SimpleITK. Method: CLISC (ISBI 2025).")


#
# CLISCTrainParameterNode
#


@parameterNodeWrapper
class CLISCTrainParameterNode:
    """The GUI's settings (folder and file paths are read from their widgets, which remember recent ones)."""

    prompt: str = ""
    trainUNet: bool = True
    classifierEpochs: int = 20
    unetEpochs: int = 400
    s3fRounds: int = 1
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    sam: str = ""
    classifier: Annotated[str, Choice(["auto", "resnet50", "efficientnet-lite0"])] = "auto"
    applyVolume: vtkMRMLScalarVolumeNode


#
# CLISCTrainWidget
#


class CLISCTrainWidget(ModuleWidget):
    """The module panel: cohort, prompt and training settings, Start / Resume (Cancel while training), the review of
    a run's cases and applying its model."""

    def __init__(self, parent=None) -> None:
        ModuleWidget.__init__(self, parent, pollIntervalMs=300)  # the watcher's job is the training process

    def setup(self) -> None:
        if not self.setupPanel("UI/CLISCTrain.ui"):
            return
        self.logic = CLISCTrainLogic()
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.loadPseudoLabelButton.connect("clicked(bool)", lambda: self.onLoadCase("pseudo_label"))
        self.ui.loadPredictionButton.connect("clicked(bool)", lambda: self.onLoadCase("prediction"))
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.applyOnServerButton.connect("clicked(bool)", self.onApplyOnServer)
        self.serverSection = ServerSection(self.ui, self.log, self.logic.useServer, self._listServerRuns)
        for pathEdit in (self.ui.cohortPath, self.ui.outputPath, self.ui.runPath):
            pathEdit.connect("currentPathChanged(QString)", self.updateGui)
        self.ui.runPath.connect("currentPathChanged(QString)", self._listCases)
        self.ui.caseComboBox.connect("currentIndexChanged(int)", self.updateGui)
        for radio in (self.ui.cohortFromFilesRadio, self.ui.cohortFromSceneRadio):
            radio.connect("toggled(bool)", self.updateGui)
        self.ui.cohortVolumes.connect("checkedNodesChanged()", self.updateGui)
        self.ui.progressBar.hide()
        self.initializeParameterNode()  # closing the scene leaves the training process running: it uses files only

    def updateGui(self, caller=None, event=None) -> None:
        from clisc.cohort.run_folder import RunFolder

        parameters = self._parameterNode
        if parameters is None:
            return
        fromScene = self.ui.cohortFromSceneRadio.checked
        self.ui.cohortPath.enabled = not fromScene
        self.ui.cohortVolumes.enabled = fromScene
        if not self.watcher.running:
            cohortChosen = bool(self.ui.cohortVolumes.checkedNodes() if fromScene else self.ui.cohortPath.currentPath)
            output = self.ui.outputPath.currentPath
            ready = cohortChosen and bool(parameters.prompt.strip()) and bool(output)
            resuming = bool(output) and RunFolder(output).is_run()
            self.ui.startButton.text = "Resume" if resuming else "Start"
            self.ui.startButton.enabled = ready
            self.ui.startButton.toolTip = (
                ("Continue the run in the output folder" if resuming else "Start the cohort run") if ready
                else "Choose a cohort, type the target prompt and choose an output folder")
        runDir = self.ui.runPath.currentPath
        finished = bool(runDir) and RunFolder(runDir).is_finished()
        hasCase = self.ui.caseComboBox.count > 0
        self.ui.loadPseudoLabelButton.enabled = hasCase and not self._chosenCase()[1]  # held out: no pseudo-label
        self.ui.loadPredictionButton.enabled = hasCase and finished
        self.ui.applyButton.enabled = finished and parameters.applyVolume is not None
        self.ui.applyOnServerButton.enabled = bool(self.ui.serverRunComboBox.currentText) and (
            parameters.applyVolume is not None)

    # -- Start / Resume / Cancel

    def onStartButton(self) -> None:
        from clisc.cohort.run_folder import RunFolder

        if self.watcher.running:
            self.log("Cancelling: ending the engine process...")
            with slicer.util.WaitCursor():
                self.watcher.cancel()
            return
        with slicer.util.tryWithErrorDisplay("CLISC could not start the cohort run.", waitCursor=True):
            if not ensurePackages(self.log):
                return
            parameters = self._parameterNode
            outputDir = self.ui.outputPath.currentPath
            if self.ui.cohortFromSceneRadio.checked:
                cohort = self.ui.cohortVolumes.checkedNodes()
            else:
                cohort = self.ui.cohortPath.currentPath
            options = dict(classifier_epochs=parameters.classifierEpochs, unet_epochs=parameters.unetEpochs,
                           s3f_rounds=parameters.s3fRounds, device=parameters.device,
                           stop_after=None if parameters.trainUNet else "pseudo_labels",
                           classifier=parameters.classifier)
            if self.ui.labelsPath.currentPath:
                options["labels"] = self.ui.labelsPath.currentPath
            if self.ui.holdoutSplitPath.currentPath:
                options["holdout_split"] = self.ui.holdoutSplitPath.currentPath
            if parameters.sam.strip():
                options["sam"] = parameters.sam.strip()
            resume = RunFolder(outputDir).is_run()
            self.watcher.watch(self.logic.run(cohort, parameters.prompt, outputDir, resume=resume, **options))
            self.ui.outputPath.addCurrentPathToHistory()
            self.log(f"{'Resuming' if resume else 'Started'} the run in {outputDir}")
            self._setRunning(True)

    def _setRunning(self, running: bool) -> None:
        self.ui.startButton.text = "Cancel" if running else "Start"
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        self.ui.stageLabel.text = ""
        self.updateGui()

    def onJobUpdate(self, update) -> None:
        if isinstance(update, Progress):
            showProgress(self.ui.progressBar, update, self.ui.stageLabel)
        else:
            self.ui.statusLog.appendPlainText(update)  # the engine's log line (the run folder's run.log keeps it)

    def onJobFinished(self, job) -> None:
        if job.error is None:
            from clisc.cohort.evaluation import summary_lines

            self.log("Finished: " + "\n".join(summary_lines(job.result)))
            self.ui.runPath.currentPath = self.ui.outputPath.currentPath
            self._listCases()  # the path may not have changed, the cases have
        elif job.cancelled:
            self.log("Cancelled. What was finished is kept: press Resume to continue.")
        else:
            self.log(f"Failed: {job.error}")
            slicer.util.errorDisplay(f"The CLISC cohort run failed: {job.error}")
        self._setRunning(False)

    # -- review

    def _listCases(self, *unused) -> None:
        from clisc.cohort.run_folder import RunFolder

        self.ui.caseComboBox.clear()
        runDir = self.ui.runPath.currentPath
        if runDir and RunFolder(runDir).is_run():
            heldOut = self.logic.heldOutCaseIds(runDir)
            for caseId in self.logic.caseIds(runDir):
                self.ui.caseComboBox.addItem(f"{caseId} (held out)" if caseId in heldOut else caseId, caseId)
        self.updateGui()

    def _chosenCase(self) -> tuple:
        """(case id, whether it is held out) of the case chosen in the review list."""
        caseId = self.ui.caseComboBox.currentData
        return caseId, caseId in self.logic.heldOutCaseIds(self.ui.runPath.currentPath)

    def onLoadCase(self, kind: str) -> None:
        caseId = self._chosenCase()[0]
        title = self.logic.resultTitle(kind)
        loaded = self._runWithProgressDialog(
            f"Could not load the {title}.", f"Loading {caseId}...",
            lambda: self.logic.startLoadingCase(self.ui.runPath.currentPath, caseId, kind, self._parameterNode.device))
        if loaded:
            volumeNode, segmentationNode = loaded
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.log(f"Loaded the {title} of {caseId}: {segmentationNode.GetName()}")

    # -- apply

    def onApplyButton(self) -> None:
        volumeNode = self._parameterNode.applyVolume
        segmentationNode = self._runWithProgressDialog(
            "Could not apply the trained model.", f"Segmenting {volumeNode.GetName()}...",
            lambda: self.logic.startApplying(self.ui.runPath.currentPath, volumeNode, self._parameterNode.device))
        if segmentationNode:
            self.log(f"Applied the trained model to {volumeNode.GetName()}: {segmentationNode.GetName()}")

    def _listServerRuns(self, info: dict) -> None:
        self.ui.serverRunComboBox.clear()
        self.ui.serverRunComboBox.addItems(info["runs"])
        self.updateGui()

    def onApplyOnServer(self) -> None:
        """Apply the server's run chosen in Server run to the volume, on the server (only the remote client's
        packages are needed here)."""
        volumeNode, run = self._parameterNode.applyVolume, self.ui.serverRunComboBox.currentText
        segmentationNode = self._runWithProgressDialog(
            "Could not apply the trained model on the server.", f"Segmenting {volumeNode.GetName()} on the server...",
            lambda: self.logic.startApplying(run, volumeNode, onServer=True), ready=self.serverSection.use)
        if segmentationNode:
            self.log(f"Applied the server's run {run} to {volumeNode.GetName()}: {segmentationNode.GetName()}")

    def _runWithProgressDialog(self, failure: str, label: str, startJob, ready=None):
        """Start a job (``startJob()``) and wait for it behind a progress dialog with a Cancel button; its result,
        or None when cancelled or failed (a failure is shown). ``ready()``: whether the job can start (default: the
        engine's packages are installed, asked for)."""
        from clisc.errors import Cancelled

        with slicer.util.tryWithErrorDisplay(failure):
            if not (ready or functools.partial(ensurePackages, self.log))():
                return None
            try:
                return runWithProgressDialog(startJob(), "CLISC", label)
            except Cancelled:
                self.log("Cancelled: nothing was added to the scene.")
        return None


#
# CLISCTrainLogic
#


class CLISCTrainLogic(ScriptedLoadableModuleLogic):
    """Cohort runs in a background engine process, and their results in MRML; no GUI needed.

    Attributes:
        engineCommand: how to start the engine, before ``train ...``: by default Slicer's Python running
            ``-m clisc``. Replaceable (tests start the engine with their own models).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        requireSupportedSlicer()
        self.engineCommand = [pythonExecutable(), "-m", "clisc"]
        self.server = None  # a CLISCLib.remote.EngineServer to apply runs on (useServer)

    def getParameterNode(self):
        return CLISCTrainParameterNode(super().getParameterNode())

    # -- training

    def run(self, cohort, prompt, outputDir, wait=False, resume=False, **options):
        """Pseudo-label a cohort and train a 3D U-Net in a background process.

        Args:
            cohort: a folder of volumes (or of DICOM series folders), a CSV or text list of paths, or a list of
                volume nodes (written as NIfTI into ``outputDir/cohort`` first).
            prompt: the target, e.g. "brain tumor".
            outputDir: the run folder (created). With ``resume``, an interrupted run there continues.
            wait: block until the run ends (processing Slicer's events meanwhile) and return its summary;
                otherwise return the running `CLISCLib.jobs.ProcessJob` at once.
            options: `clisc.cohort.options.CohortOptions` fields, e.g. ``unet_epochs=100, device="cuda",
                stop_after="pseudo_labels", labels="/data/labels"``; ``classifier_weights=None`` for random.

        Returns:
            The started `ProcessJob` (its `result` is the summary once finished), or with ``wait`` the summary.

        Raises:
            ValueError: an unknown option. With ``wait``: RuntimeError with the engine's message when the run
            failed, `clisc.errors.Cancelled` when it was cancelled.
        """
        outputDir = Path(outputDir)
        if not isinstance(cohort, (str, os.PathLike)):
            sceneCohort = outputDir / SCENE_COHORT_FOLDER
            cohort = sceneCohort if resume and sceneCohort.is_dir() else self.writeCohort(cohort, sceneCohort)
        job = ProcessJob(self.commandLine(cohort, prompt, outputDir, resume, options), engineEnvironment())
        job.start()
        return self.wait(job) if wait else job

    def commandLine(self, cohort, prompt, outputDir, resume=False, options=None) -> list:
        """The engine's command line for a run (``clisc train ... --json-progress``)."""
        from clisc.cohort.options import CohortOptions

        fields = CohortOptions.__dataclass_fields__
        unknown = sorted(set(options or {}) - set(fields))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
        command = [*self.engineCommand, "train", str(cohort), "--prompt", str(prompt), "--out", str(outputDir),
                   "--json-progress"]
        for name, value in (options or {}).items():
            if name == "classifier_weights" and value is None:
                value = "none"
            if value is not None:
                command += [f"--{name.replace('_', '-')}", str(value)]
        return command + (["--resume"] if resume else [])

    @staticmethod
    def wait(job: ProcessJob) -> dict:
        """Wait for a run started without ``wait`` to end, logging its output and progress and processing Slicer's
        events meanwhile; its summary (errors as `run` with ``wait``)."""
        def logProgress(stage, done, total, message="", **fields) -> None:
            logging.info(json.dumps({"stage": stage, **fields, "done": done, "total": total}))

        return job.wait(progress=logProgress, log=logging.info)

    @staticmethod
    def writeCohort(volumeNodes, folder) -> Path:
        """Write volume nodes as ``folder/NAME.nii.gz`` (names made file-safe and unique); returns the folder.
        Geometry (IJK→RAS) is kept exactly; the engine reads the files back."""
        from clisc.writers import write_volume

        if not volumeNodes:
            raise ValueError("no volume selected for the cohort")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        taken = set()
        for node in volumeNodes:
            name = base = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName()).strip("._") or "volume"
            number = 2
            while name in taken:
                name, number = f"{base}_{number}", number + 1
            taken.add(name)
            write_volume(folder / f"{name}.nii.gz", mrml.volumeFromNode(node))
        return folder

    # -- review and apply

    @staticmethod
    def resultTitle(kind: str) -> str:
        """A kind of case result (`clisc.cohort.run_folder.RESULTS`) in words: "pseudo_label" -> "pseudo-label"."""
        return kind.replace("_", "-")

    @staticmethod
    def caseIds(runDir) -> list:
        """The cases of a run to review: those that have a pseudo-label, then its held-out cases (`heldOutCaseIds`:
        no pseudo-label, a prediction once the run has finished)."""
        from clisc.cohort.run_folder import RunFolder

        run = RunFolder(runDir)
        heldOut = CLISCTrainLogic.heldOutCaseIds(runDir)
        return [caseId for caseId in run.cases()
                if caseId not in heldOut and run.result(caseId, "pseudo_label").is_file()] + heldOut

    @staticmethod
    def heldOutCaseIds(runDir) -> list:
        """The cases a run kept out of every stage (its --holdout-split)."""
        from clisc.cohort.run_folder import RunFolder

        run = RunFolder(runDir)
        return run.held_out_cases() if runDir and run.is_run() else []

    def loadCase(self, runDir, caseId, result="pseudo_label", device="auto", progress=None, cancel=None):
        """Load a case's input volume (once; later calls reuse its node) and its pseudo-label or prediction
        (``result``: a kind of `clisc.cohort.run_folder.RESULTS`) as a segmentation node over it; returns
        (volume node, segmentation node). Blocks until done; see `startLoadingCase`. ``progress`` (called on this
        thread as ``progress(stage, done, total, message, **fields)``) and ``cancel`` (a
        `clisc.progress.CancelToken`) are for a computed prediction."""
        return self.startLoadingCase(runDir, caseId, result, device, cancel).wait(progress=progress)

    def startLoadingCase(self, runDir, caseId, result="pseudo_label", device="auto", cancel=None) -> ThreadJob:
        """Start loading a case's result (see `loadCase`) on a worker thread: the case volume is read unless a node
        holds it already, and the result is the labelmap the run wrote, or, for a prediction not in the run folder
        (the engine writes them for held-out cases and with labels), computed with the run's final U-Net. The
        job's finish step (main thread) adds the nodes; its result is (volume node, segmentation node)."""
        from clisc.cohort.run_folder import RunFolder
        from clisc.readers import read_volume
        from clisc.result import SegmentResult

        run = RunFolder(runDir)
        resultFile = run.result(caseId, result)
        casePath = run.cases().get(caseId)
        if casePath is None:
            raise ValueError(f"{run.path}: no case {caseId!r} in its cohort")
        if result != "prediction" and not resultFile.is_file():
            raise ValueError(f"{run.path}: case {caseId} has no {self.resultTitle(result)} yet")
        prompt = run.config()["prompt"]
        volumeNode = self._caseVolumeNode(casePath)
        loadedVolume = mrml.volumeFromNode(volumeNode) if volumeNode else None

        def work(progress, cancel):  # worker thread: files and inference, no MRML
            volume = loadedVolume or read_volume(casePath)
            if not resultFile.is_file():
                from clisc.cohort.apply import apply_run

                return volume, apply_run(run.path, volume, device, progress=progress, cancel=cancel)
            labelmap = read_volume(resultFile).array
            if labelmap.shape != volume.array.shape:
                raise ValueError(f"{resultFile}: its grid {labelmap.shape} is not the case volume's")
            return volume, SegmentResult([labelmap > 0], [prompt], [], {})

        def finish(output):  # main thread
            volume, segmented = output
            node = volumeNode if volumeNode and slicer.mrmlScene.IsNodePresent(volumeNode) else None
            if node is None:
                node = mrml.addVolumeNode(volume, caseId)
                node.SetAttribute(CASE_PATH_ATTRIBUTE, str(casePath))
            segmentationNode = mrml.addSegments(node, segmented)
            segmentationNode.SetName(slicer.mrmlScene.GenerateUniqueName(f"{caseId} {self.resultTitle(result)}"))
            return node, segmentationNode

        job = ThreadJob(work, finish, token=cancel)
        job.start()
        return job

    @staticmethod
    def _caseVolumeNode(casePath):
        """The volume node `loadCase` made for a cohort file, or None."""
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(CASE_PATH_ATTRIBUTE) == str(casePath):
                return node
        return None

    def useServer(self, url, apiKey=None, caFile=None):
        """Apply runs on the `clisc serve` at ``url`` (``apply(..., onServer=True)``); returns its
        `CLISCLib.remote.EngineServer` (``runs()`` lists its trained runs). None: no server."""
        from CLISCLib.remote import EngineServer

        self.server = EngineServer(url, apiKey, caFile) if url else None
        return self.server

    def apply(self, runDir, volumeNode, device="auto", segmentationNode=None, progress=None, cancel=None,
              onServer=False):
        """Segment ``volumeNode`` with a finished run's U-Net; returns the segmentation node (one segment named
        after the run's prompt, added to ``segmentationNode`` if given). Blocks until done (the U-Net runs on a
        worker thread); ``progress`` and ``cancel`` as in `loadCase`. ``onServer``: ``runDir`` is the name of a run
        on the server (`useServer`), which runs it; the volume is sent there, the segment comes back."""
        return self.startApplying(runDir, volumeNode, device, segmentationNode, cancel, onServer).wait(
            progress=progress)

    def startApplying(self, runDir, volumeNode, device="auto", segmentationNode=None, cancel=None,
                      onServer=False) -> ThreadJob:
        """Copy the volume out of MRML and start the run's U-Net on it on a worker thread, or on the server (see
        `apply`); the job's finish step (main thread) adds the segment, its result is the segmentation node."""
        if onServer and self.server is None:
            from clisc.errors import InputError

            raise InputError("no server to apply the run on: give its address (and key) first (useServer)")
        volume = mrml.volumeFromNode(volumeNode)

        def work(progress, cancel):
            from clisc.cohort.apply import apply_run

            if onServer:
                session = self.server.openSession(volume, progress, cancel)
                try:
                    return session.apply(str(runDir), progress, cancel)
                finally:
                    session.close()

            return apply_run(runDir, volume, device, progress=progress, cancel=cancel)

        job = ThreadJob(work, lambda segmented: mrml.addSegments(volumeNode, segmented, segmentationNode),
                        token=cancel)
        job.start()
        return job


#
# CLISCTrainTest
#


class CLISCTrainTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a two-volume cohort from the scene, trained for one epoch in the real engine process
    with a tiny CLIP of the real classes, a randomly initialised LiteMedSAM and a random ResNet-50 classifier whose
    head is biased towards "abnormal" (a plain random one finds no abnormal slice: every pseudo-label would be
    empty, and the run stops before the U-Net). That shows the mechanics (Slicer's Python starting the engine,
    progress, results back in MRML on the volumes' grids), not accuracy."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_train_on_scene_volumes_and_load_the_results()

    def test_train_on_scene_volumes_and_load_the_results(self):
        import tempfile

        import numpy as np
        import torch
        from clisc.cohort.classifier import build_classifier
        from clisc.cohort.run_folder import RunFolder
        from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam

        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            self.delayDisplay("Writing tiny models with random weights")
            clip = save_random_clip(folder / "clip", TINY_CLIP_CONFIG)
            sam = save_random_sam(folder / "litemedsam.pth", "litemedsam")
            classifier = build_classifier(seed=0)
            with torch.no_grad():
                classifier.fc[-1].bias.copy_(torch.tensor([-4.0, 4.0]))
            torch.save(classifier.state_dict(), folder / "classifier.pt")
            k, j, i = np.indices((6, 32, 32))
            nodes = []
            for n in range(2):
                body = ((k - 3) / 4) ** 2 + ((j - 16) / 14) ** 2 + ((i - 16) / 13) ** 2 < 1
                array = np.where(body, 60 + 40 * (((j - 12 - n) / 5) ** 2 + ((i - 18) / 5) ** 2 < 1), 0)
                ijk_to_ras = np.diag([-1.2, 1.1, 2.5 + n, 1.0])
                nodes.append(slicer.util.addVolumeFromArray(array.astype(np.float32), ijk_to_ras, f"case {n}"))

            self.delayDisplay("Training in the engine process")
            logic = CLISCTrainLogic()
            summary = logic.run(nodes, "tumor", folder / "run", wait=True, clip=str(clip), sam=str(sam),
                                classifier="resnet50", classifier_weights=str(folder / "classifier.pt"),
                                classifier_epochs=1, classifier_image_size=32,
                                unet_epochs=1, patch_size=32, s3f_rounds=0, device="cpu")
            self.assertEqual(summary["loaded"], 2)
            self.assertTrue(RunFolder(folder / "run").is_finished())

            self.delayDisplay("Loading the results")
            self.assertEqual(logic.caseIds(folder / "run"), ["case_0", "case_1"])
            volumeNode, segmentationNode = logic.loadCase(folder / "run", "case_1", "prediction", device="cpu")
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volumeNode),
                                           slicer.util.arrayFromVolume(nodes[1])))
            segmentation = segmentationNode.GetSegmentation()
            self.assertEqual(segmentation.GetNthSegment(0).GetName(), "tumor")
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetNthSegmentID(0),
                                                                  volumeNode)
            self.assertEqual(labelmap.shape, (6, 32, 32))
            applied = logic.apply(folder / "run", nodes[1], device="cpu")
            self.assertEqual(applied.GetSegmentation().GetNumberOfSegments(), 1)
        self.delayDisplay("Test passed")
