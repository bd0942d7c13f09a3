"""CLISCTrain: pseudo-label a cohort and self-train a 3D U-Net (CLISC), from Slicer's GUI or its Python console.

The engine (``python -m clisc train ... --json-progress``) runs in a background process started with Slicer's
Python: Slicer stays responsive, a timer on the main thread reads the process's JSON-lines progress, Cancel ends
the whole process tree, and the run folder, which the engine writes file by file atomically, can be resumed.
Everything the GUI does works from the console::

    import CLISCTrain
    logic = CLISCTrain.CLISCTrainLogic()
    summary = logic.run("/data/cohort", "brain tumor", "/data/run1", wait=True, unet_epochs=100, device="cuda")
    volumeNode, segmentationNode = logic.loadCase("/data/run1", "pat0001", "pseudo_label")
    segmentationNode = logic.apply("/data/run1", someVolumeNode)

Like CLISCSegment, the engine is imported only inside functions (importing this file installs nothing; the first Start
installs the missing Python packages, as CLISCSegment does), and there is no ``from __future__ import annotations``
(the parameter node wrapper reads the annotations as types).
"""
import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CLISCSegment import (
    CLISCSegmentLogic,
    ensurePackages,
    runWithProgressDialog,
    showUnsupportedSlicer,
    unsupportedSlicerMessage,
)

CASE_PATH_ATTRIBUTE = "CLISC.CasePath"  # on volume nodes loadCase made: the cohort file they were read from
RESULTS = {"pseudo_label": ("pseudo_labels", "pseudo-label"), "prediction": ("predictions", "prediction")}


#
# CLISCTrain
#


class CLISCTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLISC Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["CLISCSegment"]
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
    applyVolume: vtkMRMLScalarVolumeNode


#
# EngineProcess
#


class EngineProcess:
    """A ``clisc`` command in a background process of its own process group (session).

    Two reader threads turn its stdout (JSON lines) and stderr (log lines) into a queue; the main thread calls
    `poll` to take what arrived (a Qt timer in the GUI, a loop in `CLISCTrainLogic.run` with ``wait=True``).
    No thread touches MRML.
    """

    def __init__(self, command: list, env: Optional[dict] = None) -> None:
        self.command = command
        self.events = []        # every JSON object the process printed, in order
        self.log = []           # its other output lines (stderr: the engine's log)
        self.summary = None     # the final {"stage": "finished", ...} event
        self._queue = queue.Queue()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        encoding="utf-8", errors="replace", bufsize=1, env=env,
                                        **_ownProcessGroup())
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.process.stdout, self.process.stderr)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        stream.close()

    def poll(self) -> list:
        """The lines that arrived since the last call, as (kind, value): ("event", dict) or ("log", str)."""
        arrived = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return arrived
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.events.append(event)
                if event.get("stage") == "finished":
                    self.summary = event
                arrived.append(("event", event))
            elif line.strip():
                self.log.append(line)
                arrived.append(("log", line))

    @property
    def finished(self) -> bool:
        """True once the process has ended and its output has been read to the end (call `poll` once more)."""
        return self.process.poll() is not None and not any(reader.is_alive() for reader in self._readers)

    @property
    def returncode(self) -> Optional[int]:
        return self.process.poll()

    def errorMessage(self) -> str:
        """What the engine said went wrong (its "clisc: error: ..." line, else the end of its log)."""
        errors = [line for line in self.log if line.startswith("clisc: ")]
        return errors[-1][len("clisc: "):] if errors else "\n".join(self.log[-20:])

    def cancel(self, grace: float = 5.0) -> None:
        """End the process and every process it started: SIGTERM to the group, SIGKILL after ``grace``
        seconds (Windows: ``taskkill /T /F``). The engine writes every file atomically, so what is left in the
        run folder is whole files only; resuming the run continues from them."""
        if self.process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True)
        else:
            _signalGroup(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            _signalGroup(self.process.pid, signal.SIGKILL)  # also children that outlived the leader
        self.process.wait()


def _ownProcessGroup() -> dict:
    """Popen arguments that put the child in a new process group, so that cancel reaches its children too
    (and, on Windows, open no console window)."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _signalGroup(groupId: int, signalNumber: int) -> None:
    try:
        os.killpg(groupId, signalNumber)
    except ProcessLookupError:
        pass


#
# CLISCTrainWidget
#


class CLISCTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None      # the running EngineProcess
        self._cancelRequested = False
        self._timer = qt.QTimer()
        self._timer.setInterval(300)
        self._timer.connect("timeout()", self._pollProcess)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if showUnsupportedSlicer(self.layout):
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CLISCTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CLISCTrainLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.loadPseudoLabelButton.connect("clicked(bool)", lambda: self.onLoadCase("pseudo_label"))
        self.ui.loadPredictionButton.connect("clicked(bool)", lambda: self.onLoadCase("prediction"))
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        for pathEdit in (self.ui.cohortPath, self.ui.outputPath, self.ui.runPath):
            pathEdit.connect("currentPathChanged(QString)", self._updateGui)
        self.ui.runPath.connect("currentPathChanged(QString)", self._listCases)
        for radio in (self.ui.cohortFromFilesRadio, self.ui.cohortFromSceneRadio):
            radio.connect("toggled(bool)", self._updateGui)
        self.ui.cohortVolumes.connect("checkedNodesChanged()", self._updateGui)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._process:
            self._process.cancel()
            self._process = None
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic:  # None in a Slicer too old for CLISC
            self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)  # the training process does not use the scene: it keeps running

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[CLISCTrainParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, *unused) -> None:
        parameters = self._parameterNode
        if parameters is None:
            return
        fromScene = self.ui.cohortFromSceneRadio.checked
        self.ui.cohortPath.enabled = not fromScene
        self.ui.cohortVolumes.enabled = fromScene
        if not self._process:
            cohortChosen = bool(self.ui.cohortVolumes.checkedNodes() if fromScene else self.ui.cohortPath.currentPath)
            output = self.ui.outputPath.currentPath
            ready = cohortChosen and bool(parameters.prompt.strip()) and bool(output)
            resuming = bool(output) and self.logic.isRun(output)
            self.ui.startButton.text = "Resume" if resuming else "Start"
            self.ui.startButton.enabled = ready
            self.ui.startButton.toolTip = (
                ("Continue the run in the output folder" if resuming else "Start the cohort run") if ready
                else "Choose a cohort, type the target prompt and choose an output folder")
        runDir = self.ui.runPath.currentPath
        finished = bool(runDir) and self.logic.isFinishedRun(runDir)
        hasCase = self.ui.caseComboBox.count > 0
        self.ui.loadPseudoLabelButton.enabled = hasCase
        self.ui.loadPredictionButton.enabled = hasCase and finished
        self.ui.applyButton.enabled = finished and parameters.applyVolume is not None

    def log(self, message: str) -> None:
        self.ui.statusLog.appendPlainText(message)
        logging.info(message)

    # -- Start / Resume / Cancel

    def onStartButton(self) -> None:
        if self._process:
            self.log("Cancelling: ending the engine process...")
            self._cancelRequested = True
            with slicer.util.WaitCursor():
                self._process.cancel()
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
                           stop_after=None if parameters.trainUNet else "pseudo_labels")
            if self.ui.labelsPath.currentPath:
                options["labels"] = self.ui.labelsPath.currentPath
            if parameters.sam.strip():
                options["sam"] = parameters.sam.strip()
            resume = self.logic.isRun(outputDir)
            self._process = self.logic.run(cohort, parameters.prompt, outputDir, resume=resume, **options)
            self._cancelRequested = False
            self.ui.outputPath.addCurrentPathToHistory()
            self.log(f"{'Resuming' if resume else 'Started'} the run in {outputDir}")
            self._setRunning(True)

    def _setRunning(self, running: bool) -> None:
        self.ui.startButton.text = "Cancel" if running else "Start"
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        self.ui.stageLabel.text = ""
        if running:
            self._timer.start()
        else:
            self._timer.stop()
        self._updateGui()

    def _pollProcess(self) -> None:
        process = self._process
        for kind, value in process.poll():
            if kind == "log":
                self.ui.statusLog.appendPlainText(value)
            elif value.get("stage") != "finished":
                self._showProgress(value)
        if not process.finished:
            return
        process.poll()
        self._process = None
        outputDir = self.ui.outputPath.currentPath
        if process.summary is not None:
            from clisc.cohort.run import summary_lines

            self.log("Finished: " + "\n".join(summary_lines(process.summary)))
            self.ui.runPath.currentPath = outputDir
            self._listCases()  # the path may not have changed, the cases have
        elif self._cancelRequested:
            self.log("Cancelled. What was finished is kept: press Resume to continue.")
        else:
            self.log(f"Failed: {process.errorMessage()}")
            slicer.util.errorDisplay(f"The CLISC cohort run failed: {process.errorMessage()}")
        self._setRunning(False)

    def _showProgress(self, event: dict) -> None:
        done, total = event.get("done") or 0, event.get("total") or 0
        self.ui.progressBar.value = int(100 * done / total) if total else 0
        self.ui.progressBar.setFormat(f"{event['stage']} {done}/{total}")
        details = [f"case {event['case']}" if event.get("case") else None,
                   f"epoch {event['epoch']}" if event.get("epoch") is not None else None,
                   f"loss {event['loss']:.4f}" if event.get("loss") is not None else None]
        self.ui.stageLabel.text = ", ".join(detail for detail in details if detail)

    # -- review

    def _listCases(self, *unused) -> None:
        self.ui.caseComboBox.clear()
        runDir = self.ui.runPath.currentPath
        if runDir and self.logic.isRun(runDir):
            for caseId in self.logic.caseIds(runDir):
                self.ui.caseComboBox.addItem(caseId)
        self._updateGui()

    def onLoadCase(self, result: str) -> None:
        caseId = self.ui.caseComboBox.currentText
        loaded = self._withProgress(f"Could not load the {RESULTS[result][1]}.", f"Loading {caseId}...",
                                    lambda progress, cancel: self.logic.loadCase(
                                        self.ui.runPath.currentPath, caseId, result, self._parameterNode.device,
                                        progress, cancel))
        if loaded:
            volumeNode, segmentationNode = loaded
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.log(f"Loaded the {RESULTS[result][1]} of {caseId}: {segmentationNode.GetName()}")

    # -- apply

    def onApplyButton(self) -> None:
        volumeNode = self._parameterNode.applyVolume
        segmentationNode = self._withProgress(
            "Could not apply the trained model.", f"Segmenting {volumeNode.GetName()}...",
            lambda progress, cancel: self.logic.apply(self.ui.runPath.currentPath, volumeNode,
                                                      self._parameterNode.device, progress=progress, cancel=cancel))
        if segmentationNode:
            self.log(f"Applied the trained model to {volumeNode.GetName()}: {segmentationNode.GetName()}")

    def _withProgress(self, failure: str, label: str, work):
        """``work(progress, cancel)`` behind a progress dialog; its result, or None when cancelled or failed
        (a failure is shown)."""
        from clisc.errors import Cancelled

        with slicer.util.tryWithErrorDisplay(failure):
            if not ensurePackages(self.log):
                return None
            try:
                return runWithProgressDialog("CLISC", label, lambda stage, done, total: f"{label} {done}/{total}",
                                             work)
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
        unsupported = unsupportedSlicerMessage()
        if unsupported:
            raise RuntimeError(unsupported)
        self.engineCommand = [pythonExecutable(), "-m", "clisc"]

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
                otherwise return the running `EngineProcess` at once.
            options: `clisc.cohort.run.CohortOptions` fields, e.g. ``unet_epochs=100, device="cuda",
                stop_after="pseudo_labels", labels="/data/labels"``; ``classifier_weights=None`` for random.

        Returns:
            The `EngineProcess`, or with ``wait`` the run's summary (dict).

        Raises:
            ValueError: an unknown option. RuntimeError (with ``wait``): the run failed or was cancelled; the
            message is the engine's.
        """
        outputDir = Path(outputDir)
        if not isinstance(cohort, (str, os.PathLike)):
            if not resume or not (outputDir / "cohort").is_dir():
                cohort = self.writeCohort(cohort, outputDir / "cohort")
            else:
                cohort = outputDir / "cohort"
        process = EngineProcess(self.commandLine(cohort, prompt, outputDir, resume, options), engineEnvironment())
        if not wait:
            return process
        return self.wait(process)

    def commandLine(self, cohort, prompt, outputDir, resume=False, options=None) -> list:
        """The engine's command line for a run (``clisc train ... --json-progress``)."""
        from clisc.cohort.run import CohortOptions

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
    def wait(process: EngineProcess) -> dict:
        """Wait for ``process`` to end, logging its output and processing Slicer's events; its summary."""
        application = getattr(slicer, "app", None)
        while not process.finished:
            for kind, value in process.poll():
                logging.info(value if kind == "log" else json.dumps(value))
            if application is not None:
                application.processEvents()
            time.sleep(0.2)
        process.poll()
        if process.summary is None:
            reason = "cancelled" if process.returncode < 0 else process.errorMessage()
            raise RuntimeError(f"the CLISC cohort run did not finish: {reason}")
        return {key: value for key, value in process.summary.items() if key != "stage"}

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
            write_volume(folder / f"{name}.nii.gz", CLISCSegmentLogic.volumeFromNode(node))
        return folder

    # -- run folders

    @staticmethod
    def isRun(runDir) -> bool:
        return (Path(runDir) / "config.json").is_file()

    @staticmethod
    def isFinishedRun(runDir) -> bool:
        return (Path(runDir) / "config.json").is_file() and (Path(runDir) / "unet" / "final.pt").is_file()

    @staticmethod
    def cases(runDir) -> dict:
        """{case id: input file or folder} of a run's cohort, as the engine lists it."""
        from clisc.cohort.cases import list_cohort

        config = json.loads((Path(runDir) / "config.json").read_text())
        return {case.case_id: case.path for case in list_cohort(config["cohort"])}

    def caseIds(self, runDir) -> list:
        """The cases of a run that have a pseudo-label."""
        return [caseId for caseId in self.cases(runDir)
                if (Path(runDir) / "pseudo_labels" / f"{caseId}.nii.gz").is_file()]

    # -- review and apply

    def loadCase(self, runDir, caseId, result="pseudo_label", device="auto", progress=None, cancel=None):
        """Load a case's input volume (once; later calls reuse its node) and its pseudo-label or prediction as
        a segmentation node over it. A prediction not in the run folder (the engine writes them only when
        evaluating against labels) is computed with the run's final model (``progress``, ``cancel`` as in
        `apply`). Returns (volume, segmentation)."""
        from clisc.readers import read_volume
        from clisc.result import SegmentResult

        if result not in RESULTS:
            raise ValueError(f"result {result!r}: use one of {', '.join(RESULTS)}")
        runDir = Path(runDir)
        casePath = self.cases(runDir).get(caseId)
        if casePath is None:
            raise ValueError(f"{runDir}: no case {caseId!r} in its cohort")
        volumeNode = self._caseVolumeNode(casePath, caseId)
        prompt = json.loads((runDir / "config.json").read_text())["prompt"]
        folder, title = RESULTS[result]
        labelFile = runDir / folder / f"{caseId}.nii.gz"
        if labelFile.is_file():
            labelmap = read_volume(labelFile).array
            if labelmap.shape != slicer.util.arrayFromVolume(volumeNode).shape:
                raise ValueError(f"{labelFile}: its grid {labelmap.shape} is not the case volume's")
            segmented = SegmentResult([labelmap > 0], [prompt], [], {})
        elif result == "prediction":
            segmented = CLISCSegmentLogic().run(CLISCSegmentLogic.volumeFromNode(volumeNode), None, device=device,
                                                progress=progress, cancel=cancel, trainedRun=runDir)
        else:
            raise ValueError(f"{runDir}: case {caseId} has no pseudo-label yet")
        segmentationNode = CLISCSegmentLogic().addSegments(volumeNode, segmented)
        segmentationNode.SetName(slicer.mrmlScene.GenerateUniqueName(f"{caseId} {title}"))
        return volumeNode, segmentationNode

    @staticmethod
    def _caseVolumeNode(casePath, caseId):
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(CASE_PATH_ATTRIBUTE) == str(casePath):
                return node
        from clisc.readers import read_volume

        volume = read_volume(casePath)
        node = slicer.util.addVolumeFromArray(volume.array, volume.ijk_to_ras, caseId)
        node.SetAttribute(CASE_PATH_ATTRIBUTE, str(casePath))
        return node

    def apply(self, runDir, volumeNode, device="auto", segmentationNode=None, progress=None, cancel=None):
        """Segment ``volumeNode`` with a finished run's U-Net; returns the segmentation node (one segment named
        after the run's prompt, added to ``segmentationNode`` if given)."""
        return CLISCSegmentLogic().segment(volumeNode, None, device=device, trainedRun=runDir,
                                           segmentationNode=segmentationNode, progress=progress, cancel=cancel)


def pythonExecutable() -> str:
    """Slicer's Python interpreter (PythonSlicer, on Slicer's PATH), or this Python outside Slicer."""
    return shutil.which("PythonSlicer") or sys.executable


def engineEnvironment() -> dict:
    """This process's environment, with the folder holding the ``clisc`` package first on PYTHONPATH (Slicer
    finds it among its module paths, which a child Python does not know)."""
    spec = importlib.util.find_spec("clisc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLISC engine (Python package clisc) is not installed")
    root = str(Path(list(spec.submodule_search_locations)[0]).parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


#
# CLISCTrainTest
#


class CLISCTrainTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a two-volume cohort from the scene, trained for one epoch in the real engine process
    with a tiny CLIP of the real classes, a randomly initialised SAM vit_b and a random classifier. That shows
    the mechanics (Slicer's Python starting the engine, progress, results back in MRML on the volumes' grids),
    not accuracy: a random classifier finds no abnormal slice, so the pseudo-labels are empty."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_train_on_scene_volumes_and_load_the_results()

    def test_train_on_scene_volumes_and_load_the_results(self):
        import tempfile

        import numpy as np
        from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam

        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            self.delayDisplay("Writing tiny models with random weights")
            clip = save_random_clip(folder / "clip", TINY_CLIP_CONFIG)
            sam = save_random_sam(folder / "sam_vit_b.pth")
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
                                classifier_weights=None, classifier_epochs=1, classifier_image_size=32,
                                unet_epochs=1, patch_size=32, s3f_rounds=0, device="cpu")
            self.assertEqual(summary["loaded"], 2)
            self.assertTrue(logic.isFinishedRun(folder / "run"))

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
