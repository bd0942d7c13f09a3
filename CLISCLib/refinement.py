"""Refining a segment with SAM in Slicer: clicks in RAS to slice pixels, and the Refine section's interaction.

- `slicePixels`, `sliceBox`: RAS positions (mm, in a volume's own frame) to the (x, y) pixels of one slice along
  an array axis, as `clisc.refine.Refiner` takes them (through the engine's `clisc.volume.slice_point`).
- `ReportingSegmenter`: a SAM slice segmenter that reports each image embedding it computes and stops at Cancel,
  so that a `clisc.refine.Refiner`'s work shows progress in a background job.
- `RefineSession`: what the Refine section does, without Qt: the segment being refined, the markups the user
  places (positive points, negative points, a box), refining the slice each click lands on, propagating, undo.
  The widget gives it buttons and shortcuts; it can be driven from the console or a test the same way.

Nothing here imports the engine at load time.
"""
import logging
import traceback
from typing import Callable, Optional

import numpy as np
import slicer

from CLISCLib import mrml


def slicePixels(volume, axis: int, sliceIndex: int, rasPoints) -> np.ndarray:
    """(P, 2) (x, y) = (column, row) pixels on slice ``sliceIndex`` along ``axis`` of RAS points (mm, the volume's
    own RAS), each at its nearest voxel. `clisc.errors.InputError` for a point outside the volume or on another
    slice."""
    from clisc.errors import InputError
    from clisc.volume import slice_point

    pixels = []
    for ras in rasPoints:
        index, xy = slice_point(volume, ras, axis)
        if index != sliceIndex:
            raise InputError(f"the point at RAS {np.round(ras, 2).tolist()} mm lies on slice {index}, not on slice "
                             f"{sliceIndex} (along array axis {axis}): give each slice its own points")
        pixels.append(xy)
    return np.array(pixels, dtype=float).reshape(-1, 2)


def sliceBox(volume, axis: int, rasCorners) -> np.ndarray:
    """(4,) x0, y0, x1, y1 in slice pixels of a box given by RAS corners (mm, the volume's own RAS; two opposite
    corners, or all eight of a markups ROI): the corners' extent in the slice plane, whatever the box's thickness
    across the slices, rounded to the nearest pixel. The engine clips it to the slice and refuses one outside."""
    corners = np.asarray(rasCorners, dtype=float).reshape(-1, 3)
    ijk = (np.linalg.inv(volume.ijk_to_ras) @ np.c_[corners, np.ones(len(corners))].T)[:3].T  # (N, 3) i, j, k
    kji = ijk[:, ::-1]
    rows, cols = [kji[:, a] for a in range(3) if a != axis]
    return np.round([cols.min(), rows.min(), cols.max(), rows.max()])


class ReportingSegmenter:
    """A `clisc.sam.SliceSegmenter` (or one like it) that counts the image embeddings it computes, reports each as
    progress and checks for Cancel before each: the only long step of refining and propagating. Everything else
    is the wrapped segmenter's. ``progress`` and ``cancel`` are set by the job using it, and reset after."""

    def __init__(self, segmenter) -> None:
        self.segmenter = segmenter
        self.embedded = 0
        self.progress: Optional[Callable] = None
        self.cancel = None
        self.total = 0  # for the progress report: how many embeddings the job may need at most
        self.message = ""  # said when an embedding starts (e.g. that the clicked slice was not cached)

    def __getattr__(self, name):
        return getattr(self.segmenter, name)

    def embed(self, images):
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        if self.progress is not None and self.message:
            self.progress("SAM image embedding", self.embedded, self.total, self.message)
        embeddings = self.segmenter.embed(images)
        self.embedded += len(images)
        if self.progress is not None:
            self.progress("SAM image embedding", self.embedded, self.total, "")
        return embeddings


def waitForJob(job, onFinished: Callable) -> None:
    """Run a started job to its end (processing Slicer's events meanwhile), then ``onFinished(job)``: how a
    `RefineSession` runs its jobs from the console or a test. The widget watches them with a timer instead."""
    try:
        job.wait()
    except Exception:  # the job holds its error; onFinished reports it
        pass
    onFinished(job)


class RefineSession:
    """Refining one segment by clicks: the Refine section's behaviour, on MRML only.

    `start` picks the segment and its volume and makes three markups nodes: positive points, negative points
    (point lists) and a box (an ROI). Each point is placed with Slicer's usual click-to-place interaction (`place`)
    on any slice of any view; when its position is defined (or a point or the box is moved), the slice it lies on
    (along the volume's slice axis: nearest voxel) is refined with every point and the box on that slice, through
    ``logic.startRefining``. One job runs at a time; clicks made meanwhile refine their slices after it.
    `propagate` carries the last refined slice to its neighbours; `undo` and `redo` use the segmentation's undo
    states (``logic.undo`` / ``logic.redo``).

    Args:
        logic: the `CLISCSegment.CLISCSegmentLogic`.
        runJob: ``runJob(job, onFinished)`` watches a started job and calls ``onFinished(job)`` once it has
            finished (the widget: a `CLISCLib.progress.JobWatcher`; default `waitForJob`).
        log: where messages go (the module's status log).
    """

    POSITIVE, NEGATIVE, BOX = "positive", "negative", "box"
    NODE_NAMES = {POSITIVE: "CLISC positive points", NEGATIVE: "CLISC negative points", BOX: "CLISC box"}
    COLORS = {POSITIVE: (0.2, 0.9, 0.2), NEGATIVE: (0.95, 0.2, 0.2), BOX: (1.0, 0.85, 0.1)}
    OBSERVED_EVENTS = ("PointPositionDefinedEvent", "PointEndInteractionEvent")  # placed; dragged and dropped

    def __init__(self, logic, runJob: Callable = waitForJob, log: Callable = logging.info) -> None:
        self.logic = logic
        self.runJob = runJob
        self.log = log
        self.segmentationNode = self.segmentId = self.volumeNode = None
        self.options = {}  # axis, sam, device: passed to the logic's refine and propagate
        self.nodes = {}  # POSITIVE / NEGATIVE / BOX -> markups node
        self.lastSlice: Optional[int] = None  # the slice last refined: where Propagate starts
        self.running = None  # the job running now
        self._waiting = []  # what to run after it: ("refine", slice) or ("propagate", direction)
        self._known = {}  # (node ID, control point ID) -> world RAS when last seen: tells placed and moved points
        self._observations = []

    # -- the segment

    @property
    def active(self) -> bool:
        return self.segmentationNode is not None

    def start(self, segmentationNode, segmentId: str, volumeNode, **options) -> None:
        """Refine ``segmentId`` of ``segmentationNode`` on ``volumeNode``'s grid from now on; ``options`` (axis,
        sam, device) go to the logic. `clisc.errors.InputError` with the reason when the segment lies on another
        grid. The markups nodes are made (or reused) and observed; their points are cleared."""
        from clisc.errors import InputError

        problem = mrml.segmentGridProblem(segmentationNode, segmentId, volumeNode)
        if problem:
            raise InputError(problem)
        self.stop()
        self.segmentationNode, self.segmentId, self.volumeNode = segmentationNode, segmentId, volumeNode
        self.options = dict(options)
        for kind, name in self.NODE_NAMES.items():
            className = "vtkMRMLMarkupsROINode" if kind == self.BOX else "vtkMRMLMarkupsFiducialNode"
            node = slicer.mrmlScene.GetFirstNode(name, className) or slicer.mrmlScene.AddNewNodeByClass(className, name)
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*self.COLORS[kind])
            node.GetDisplayNode().SetColor(*self.COLORS[kind])
            node.RemoveAllControlPoints()
            self.nodes[kind] = node
            for event in self.OBSERVED_EVENTS:
                tag = node.AddObserver(getattr(slicer.vtkMRMLMarkupsNode, event), self.onMarkupsChanged)
                self._observations.append((node, tag))
        self._known = {}
        self.lastSlice = None
        segmentName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        self.log(f"Refining {segmentName!r} on {volumeNode.GetName()}: place positive or negative points, or a box.")

    def stop(self) -> None:
        """Stop observing the markups (they stay in the scene) and leave place mode; a running job still finishes."""
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        self._waiting = []
        self.segmentationNode = self.segmentId = self.volumeNode = None
        self.leavePlaceMode()

    # -- placing markups

    def place(self, kind: str) -> None:
        """Enter Slicer's place mode for positive points, negative points (several, until Escape or another tool)
        or the box (one: it replaces the previous box)."""
        node = self.nodes[kind]
        if kind == self.BOX:
            node.RemoveAllControlPoints()
        selection = slicer.mrmlScene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.mrmlScene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        interaction.SetPlaceModePersistence(0 if kind == self.BOX else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    @staticmethod
    def leavePlaceMode() -> None:
        interaction = slicer.mrmlScene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        if interaction is not None:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)

    def clearPoints(self) -> None:
        """Remove every point and the box (the segment stays as it is)."""
        for node in self.nodes.values():
            node.RemoveAllControlPoints()
        self._known = {}

    def _definedPoints(self, node) -> dict:
        """(node ID, control point ID) -> world RAS of the node's control points whose position is defined."""
        points = {}
        for n in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(n) == node.PositionDefined:
                points[(node.GetID(), node.GetNthControlPointID(n))] = tuple(node.GetNthControlPointPositionWorld(n))
        return points

    def _sliceOf(self, worldRas, report: bool = False) -> Optional[int]:
        """The slice a world RAS position lies on; None when it is outside the volume (said, with ``report``)."""
        from clisc.errors import InputError
        from clisc.volume import slice_point

        geometry, axis = mrml.sliceGeometry(self.volumeNode, self.options.get("axis"))
        try:
            return slice_point(geometry, mrml.volumeRasFromWorld(self.volumeNode, worldRas), axis)[0]
        except InputError as error:
            if report:
                self.log(f"Ignored: {error}")
            return None

    def onMarkupsChanged(self, caller=None, event=None) -> None:
        """A point was placed or moved, or the box changed: refine the slices they lie on (and the slice a moved
        point left)."""
        if not self.active:
            return
        if caller is self.nodes.get(self.BOX):
            if self.nodes[self.BOX].GetNumberOfControlPoints():
                index = self._sliceOf(self.nodes[self.BOX].GetCenterWorld(), report=True)
                if index is not None:
                    self.refineSlice(index)
            return
        points = {}
        for kind in (self.POSITIVE, self.NEGATIVE):
            points.update(self._definedPoints(self.nodes[kind]))
        changed = {key for key, ras in points.items() if self._known.get(key) != ras}
        slices = []
        for key in changed:
            for ras in (self._known.get(key), points[key]):  # where a moved point was, and where it is now
                index = None if ras is None else self._sliceOf(ras, report=ras == points[key])
                if index is not None and index not in slices:
                    slices.append(index)
        self._known = points
        for index in slices:
            self.refineSlice(index)

    # -- refining and propagating

    def slicePrompts(self, index: int) -> tuple:
        """(points, labels, box corners) on slice ``index``: every defined point whose nearest voxel lies on it (world
        RAS), 1 for positive and 0 for negative, and the box's eight corners when its centre lies on it."""
        points, labels = [], []
        for kind, label in ((self.POSITIVE, 1), (self.NEGATIVE, 0)):
            for ras in self._definedPoints(self.nodes[kind]).values():
                if self._sliceOf(ras) == index:
                    points.append(ras)
                    labels.append(label)
        box = None
        roi = self.nodes[self.BOX]
        if roi.GetNumberOfControlPoints() and self._sliceOf(roi.GetCenterWorld()) == index:
            box = roiCornersWorld(roi)
        return points, labels, box

    def refineSlice(self, index: int) -> None:
        """Refine slice ``index`` of the segment from its points and box (after the running job, if one runs)."""
        if self.running is not None:
            if ("refine", index) not in self._waiting:
                self._waiting.append(("refine", index))
            return
        points, labels, box = self.slicePrompts(index)
        if not points and box is None:
            return  # its last point moved away: nothing prompts this slice any more
        if self._run(lambda: self.logic.startRefining(self.segmentationNode, self.segmentId, index, points=points,
                                                      labels=labels, box=box, volumeNode=self.volumeNode,
                                                      **self.options), f"slice {index}"):
            self.lastSlice = index

    def propagate(self, direction: str) -> None:
        """Carry the last refined slice "up" (increasing slice index), "down" or "both" ways."""
        if self.running is not None:
            self._waiting.append(("propagate", direction))
            return
        if self.lastSlice is None:
            self.log("Place a point on a slice first: propagation starts from the slice last refined.")
            return
        self._run(lambda: self.logic.startPropagating(self.segmentationNode, self.segmentId, self.lastSlice,
                                                      direction, volumeNode=self.volumeNode, **self.options),
                  f"propagation {direction} from slice {self.lastSlice}")

    def _run(self, startJob: Callable, what: str) -> bool:
        """Start a job and hand it to ``runJob``; False (with a message) when its input is refused."""
        from clisc.errors import InputError

        try:
            self.running = startJob()
        except InputError as error:
            self.log(f"{what}: {error}")
            return False
        self.runJob(self.running, lambda finished: self._finished(finished, what))
        return True

    def _finished(self, job, what: str) -> None:
        from clisc.errors import Cancelled, InputError

        self.running = None
        if isinstance(job.error, Cancelled):
            self.log(f"{what}: cancelled, nothing changed.")
        elif isinstance(job.error, InputError):
            self.log(f"{what}: {job.error}")
        elif job.error is not None:
            self.log(f"{what} failed: {job.error}")
            logging.error("".join(traceback.format_exception(type(job.error), job.error, job.error.__traceback__)))
        elif hasattr(job.result, "reports"):  # a clisc.refine.Propagation
            self.log(f"Propagation: {job.result.message}")
        else:
            self.log(f"Refined {what}: {int(job.result.mask.sum())} pixels (SAM's predicted IoU {job.result.iou:.2f})")
        if self._waiting and self.active:
            action, argument = self._waiting.pop(0)
            (self.refineSlice if action == "refine" else self.propagate)(argument)

    def undo(self) -> None:
        if not (self.active and self.logic.undo(self.segmentationNode)):
            self.log("Nothing to undo.")

    def redo(self) -> None:
        if not (self.active and self.logic.redo(self.segmentationNode)):
            self.log("Nothing to redo.")


def roiCornersWorld(roi) -> np.ndarray:
    """(8, 3) world RAS corners of a markups ROI (its own orientation kept)."""
    bounds = [0.0] * 6
    roi.GetObjectBounds(bounds)
    matrix = slicer.util.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix())
    corners = np.array([[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
    return (matrix @ corners.T)[:3].T
