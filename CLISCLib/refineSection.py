"""The Refine section of CLISCSegment's panel, on Qt: its buttons, shortcuts and job progress.

What the section does is a `CLISCLib.refinement.RefineSession` (MRML only); this part connects it to the panel's
widgets (``ui``, from CLISCSegment's .ui), watches its jobs with a fast `CLISCLib.progress.JobWatcher` (a click on
a cached slice answers within one poll), and enables the buttons that apply.
"""
from typing import Callable

import qt
import slicer

from CLISCLib import mrml
from CLISCLib.jobs import Progress
from CLISCLib.progress import JobWatcher, showProgress
from CLISCLib.refinement import RefineSession


class RefineSection:
    """The Refine section of a panel.

    Args:
        ui: the panel's widgets (placePositiveButton, ..., refineProgressBar, refineSegmentSelector,
            inputVolumeSelector).
        logic: the CLISCSegment Logic (its ``startRefining``, ``startPropagating``, ``undo``...).
        log: the panel's status log.
        prepare: called before refining starts: the options of refinement (sam, device, axis, preset), once what it
            needs is installed; None when it cannot start (the reason logged).
    """

    # (key, what it does, the method it calls): the shortcuts and the module's help text are made from this
    SHORTCUTS = (
        ("Shift+P", "place positive points (part of the target)", "placePositive"),
        ("Shift+N", "place negative points (not part of the target)", "placeNegative"),
        ("Shift+B", "draw a box", "placeBox"),
        ("Shift+C", "clear the points and the box", "clearPoints"),
        ("Shift+U", "propagate up (increasing slice index)", "propagateUp"),
        ("Shift+D", "propagate down", "propagateDown"),
        ("Shift+A", "propagate both ways", "propagateBoth"),
        ("Ctrl+Z", "undo the last refinement or propagation", "undo"),
        ("Ctrl+Y", "redo", "redo"),
    )
    POLL_MS = 30

    def __init__(self, ui, logic, log: Callable, prepare: Callable) -> None:
        self.ui, self.log, self.prepare = ui, log, prepare
        self.session = RefineSession(logic, self._watch, log)
        self.watcher = JobWatcher(self._onUpdate, self._onJobFinished, self.POLL_MS)
        self._whenFinished = None  # the session's callback for the running job
        ui.refineSegmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentChanged)
        for button, method in ((ui.placePositiveButton, self.placePositive), (ui.placeNegativeButton, self.placeNegative),
                               (ui.placeBoxButton, self.placeBox), (ui.clearPointsButton, self.clearPoints),
                               (ui.propagateUpButton, self.propagateUp), (ui.propagateDownButton, self.propagateDown),
                               (ui.propagateBothButton, self.propagateBoth), (ui.undoButton, self.undo),
                               (ui.redoButton, self.redo), (ui.refineCancelButton, self.watcher.cancel)):
            button.connect("clicked(bool)", lambda checked=False, method=method: method())
        self._shortcuts = []
        for key, description, method in self.SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setEnabled(False)  # only while the module is shown
            shortcut.connect("activated()", getattr(self, method))
            self._shortcuts.append(shortcut)
        ui.refineProgressBar.hide()

    # -- the panel's life

    def enableShortcuts(self, enabled: bool) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(enabled)
        if not enabled:
            self.session.leavePlaceMode()

    def stop(self) -> None:
        """Cancel the running job and stop refining (the scene closes, or the panel goes away)."""
        self.watcher.cancel()
        self.session.stop()

    def cleanup(self) -> None:
        self.watcher.stop()
        self.session.stop()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)

    def updateButtons(self) -> None:
        segmentationNode, segmentId, volumeNode = self.target()
        for button in (self.ui.placePositiveButton, self.ui.placeNegativeButton, self.ui.placeBoxButton):
            button.enabled = None not in (segmentationNode, segmentId, volumeNode)
        for button in (self.ui.clearPointsButton, self.ui.propagateUpButton, self.ui.propagateDownButton,
                       self.ui.propagateBothButton, self.ui.undoButton, self.ui.redoButton):
            button.enabled = self.session.active
        self.ui.refineCancelButton.enabled = self.watcher.running

    def onSegmentChanged(self, segmentId=None) -> None:
        """Another segment (or input volume) was picked: stop refining the previous one, and say at once when the
        new one cannot be refined on the input volume. Refining starts with the first place button."""
        self.session.stop()
        segmentationNode, segmentId, volumeNode = self.target()
        if segmentationNode is not None and segmentId and volumeNode is not None:
            problem = mrml.segmentGridProblem(segmentationNode, segmentId, volumeNode)
            if problem:
                self.log(f"Cannot refine this segment: {problem}")
        self.updateButtons()

    def target(self) -> tuple:
        """(segmentation node, segment ID, input volume node) picked in the panel, each None when not picked."""
        return (self.ui.refineSegmentSelector.currentNode(), self.ui.refineSegmentSelector.currentSegmentID() or None,
                self.ui.inputVolumeSelector.currentNode())

    def _start(self) -> bool:
        """Start refining the picked segment on the input volume unless that is under way. False, with the reason,
        when it cannot."""
        from clisc.errors import InputError

        segmentationNode, segmentId, volumeNode = self.target()
        session = self.session
        if session.active and (session.segmentationNode, session.segmentId, session.volumeNode) == (
                segmentationNode, segmentId, volumeNode):
            return True
        if segmentationNode is None or segmentId is None or volumeNode is None:
            self.log("Pick the input volume (Inputs) and the segment to refine (Refine) first.")
            return False
        with slicer.util.tryWithErrorDisplay("CLISC could not start refining.", waitCursor=True):
            options = self.prepare()
            if options is None:
                return False
            try:
                session.start(segmentationNode, segmentId, volumeNode, **options)
            except InputError as error:
                self.log(f"Cannot refine this segment: {error}")
        self.updateButtons()
        return session.active

    # -- jobs

    def _watch(self, job, whenFinished) -> None:
        self._whenFinished = whenFinished
        self.watcher.watch(job)
        self.ui.refineProgressBar.value = 0
        self.ui.refineProgressBar.show()
        self.updateButtons()

    def _onUpdate(self, update) -> None:
        if isinstance(update, Progress):
            showProgress(self.ui.refineProgressBar, update)
            if update.message:
                self.log(update.message)
        else:
            self.log(update)

    def _onJobFinished(self, job) -> None:
        self.ui.refineProgressBar.hide()
        whenFinished, self._whenFinished = self._whenFinished, None
        whenFinished(job)  # may start the next job (clicks made meanwhile)
        self.updateButtons()

    # -- the buttons and shortcuts

    def placePositive(self) -> None:
        if self._start():
            self.session.place(RefineSession.POSITIVE)

    def placeNegative(self) -> None:
        if self._start():
            self.session.place(RefineSession.NEGATIVE)

    def placeBox(self) -> None:
        if self._start():
            self.session.place(RefineSession.BOX)

    def clearPoints(self) -> None:
        self._whenRefining(self.session.clearPoints)

    def propagateUp(self) -> None:
        self._whenRefining(self.session.propagate, "up")

    def propagateDown(self) -> None:
        self._whenRefining(self.session.propagate, "down")

    def propagateBoth(self) -> None:
        self._whenRefining(self.session.propagate, "both")

    def undo(self) -> None:
        self._whenRefining(self.session.undo)

    def redo(self) -> None:
        self._whenRefining(self.session.redo)

    def _whenRefining(self, action, *arguments) -> None:
        if not self.session.active:
            self.log("Place a point on the segment to refine first (Refine section).")
            return
        action(*arguments)
