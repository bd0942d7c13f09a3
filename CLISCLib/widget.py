"""`ModuleWidget`: the part of Slicer's scripted module template that both CLISC module widgets share.

The template's widget loads its .ui into the module panel, binds the parameter node to it (again on entering the
module and after the scene closes), and observes the scene. A CLISC widget adds one background job at a time,
watched by a `CLISCLib.progress.JobWatcher`, and a status log. The module files keep what is their own: their
widgets' connections, what the GUI shows (`updateGui`), and what happens when their job reports or ends.
"""
import logging

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from CLISCLib.dependencies import showUnsupportedSlicer
from CLISCLib.progress import JobWatcher


class ModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """A CLISC module's widget, in the template's shape.

    A subclass calls `setupPanel` first in its ``setup`` (and stops there when it returns False: this Slicer is too
    old), sets ``self.logic``, connects its widgets, then calls `initializeParameterNode`. It implements
    `updateGui` (show the parameters' state), `onJobUpdate` (a `CLISCLib.jobs.Progress` report or a log line of
    the running job) and `onJobFinished` (the job has ended), and starts jobs with ``self.watcher.watch(job)``.
    """

    def __init__(self, parent=None, pollIntervalMs: int = 250) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None  # stays None in a Slicer too old for CLISC
        self.watcher = JobWatcher(self.onJobUpdate, self.onJobFinished, pollIntervalMs)
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setupPanel(self, uiFile: str) -> bool:
        """Load ``uiFile`` (relative to the module's Resources) into the panel as ``self.ui`` and observe the
        scene; False, with a message in its place, when this Slicer cannot run CLISC."""
        ScriptedLoadableModuleWidget.setup(self)
        if showUnsupportedSlicer(self.layout):
            return False
        uiWidget = slicer.util.loadUI(self.resourcePath(uiFile))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        return True

    def cleanup(self) -> None:
        self.watcher.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic:
            self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind ``inputParameterNode`` (a parameter node wrapper, or None) to the GUI, unbinding the previous one."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self.updateGui()

    def log(self, message: str) -> None:
        """Show ``message`` in the module's status log (``self.ui.statusLog``) and Slicer's log."""
        self.ui.statusLog.appendPlainText(message)
        logging.info(message)

    def updateGui(self, caller=None, event=None) -> None:
        raise NotImplementedError

    def onJobUpdate(self, update) -> None:
        raise NotImplementedError

    def onJobFinished(self, job) -> None:
        raise NotImplementedError
