"""Refining a segment node with SAM, on MRML: the Refine part of CLISCSegment's Logic, here or on a server.

`RefineLogic` turns a refinement of a segment (clicks and a box in world RAS on a slice) or a propagation into a
background job: the inputs are checked and copied on the main thread, SAM runs on a worker thread (a
`clisc.refine.Refiner` in this Python, or the same Refiner in a `clisc serve` session: `CLISCLib.remote`), and the
job's finish step writes the slices back on the main thread, one undo state each (a `vtkSegmentationHistory`, as
Segment Editor keeps). The CLISCSegment Logic offers its methods (``logic.refine``, ``logic.propagate``, ...).
"""
import contextlib
import os
import threading
from collections import OrderedDict

import numpy as np
import slicer

from CLISCLib import mrml
from CLISCLib.jobs import ThreadJob
from CLISCLib.refinement import ReportingSegmenter, sliceBox, slicePixels

DEFAULT_REFINE_SAM = "litemedsam"  # the fast preset's SAM: ships with CLISC, about 1 s per slice embedding on a CPU
EMBEDDING_CACHE_SLICES = 64  # refinement's embedding cache: 64 slices × 4 MiB = 256 MiB, for all volumes together
REFINED_VOLUMES = 3  # volumes whose Refiner (a copy of the voxels and their uint8 view for SAM) is kept
UNDO_STATES = 20  # undo states kept per segmentation
UNCACHED = ("slice {} has no image embedding yet: computing it (one SAM encoder pass; the next clicks on it reuse "
            "it)")


class RefineLogic:
    """Refinement and propagation of segment nodes, and their undo states.

    Args:
        loadModel: ``loadModel("sam", spec)``, the Logic's model loader (this computer).
        sessions: a function giving the Logic's `CLISCLib.remote.VolumeSessions` when it runs on a server, else None.
    """

    def __init__(self, loadModel, sessions) -> None:
        self._loadModel, self._sessions = loadModel, sessions
        self._refiners = OrderedDict()  # volume node ID -> (signature, clisc.refine.Refiner)
        self._modelKey = self._segmenter = self._embeddingCache = None
        self._lock = threading.Lock()  # one refinement or propagation at a time
        self._histories = {}  # segmentation node ID -> vtkSegmentationHistory

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

    def startRefining(self, segmentationNode, segmentId, sliceIndex, points=None, labels=None, box=None,
                      volumeNode=None, axis=None, sam=None, device="auto", preset=None) -> ThreadJob:
        """CLISCSegment's ``refine`` as a started job: the inputs are checked and copied here (InputError for a
        segment on another grid, a point outside the volume or on another slice), SAM runs on a worker thread (here
        or on the server), the finish step writes the slice back.

        Args:
            segmentationNode, segmentId: the segment: any, a CLISC result, a trained U-Net's or one drawn by hand.
            sliceIndex: the slice, along ``axis`` of the volume's voxel array (for axial slices of an axial scan,
                the k index Slicer shows in the Data probe).
            points: the clicks of this slice (every one so far, as SAM takes them), in world RAS millimetres as
                markups give them (``markupsNode.GetNthControlPointPositionWorld(n)``); each is taken at its nearest
                voxel (`clisc.volume.slice_point`) and must lie on ``sliceIndex``.
            labels: one per point, 1 positive (part of the target), 0 negative; default all positive.
            box: RAS corners (mm, world) of a box: two opposite corners, or the eight of a markups ROI; its extent in
                the slice plane is used.
            volumeNode: the image (default the segmentation's reference geometry volume); the segment must lie on
                its voxel grid, or InputError says why not.
            axis: the slice direction, None = the volume's acquisition axis (see `CLISCLib.mrml.sliceGeometry`).
            sam: a catalogue name, checkpoint path, loaded SAM, or a `clisc.sam.SliceSegmenter` (on a server: a
                model name it offers); None: the ``preset``'s SAM, else LiteMedSAM. device: auto, cpu or cuda.

        The first click on a slice whose image embedding is not cached costs one SAM encoder pass; later clicks
        reuse it (`EMBEDDING_CACHE_SLICES`; on a server, its own cache).
        """
        volumeNode = self.refineVolume(segmentationNode, volumeNode)
        mask = mrml.segmentMask(segmentationNode, segmentId, volumeNode)
        geometry, axis = mrml.sliceGeometry(volumeNode, axis)
        pixels = None
        if points is not None and len(points):
            pixels = slicePixels(geometry, axis, sliceIndex, [mrml.volumeRasFromWorld(volumeNode, p) for p in points])
        boxPixels = None if box is None else sliceBox(geometry, axis,
                                                      [mrml.volumeRasFromWorld(volumeNode, c) for c in box])
        run = self._runner(volumeNode, axis, sam, device, preset, embeddings=1, message=UNCACHED.format(sliceIndex))

        def finish(output):
            refinement, keep = output
            keep()
            self._saveUndoState(segmentationNode)
            mrml.replaceSegmentSlices(segmentationNode, segmentId, volumeNode, axis, {refinement.index: refinement.mask})
            return refinement

        job = ThreadJob(lambda progress, cancel: run(progress, cancel, "refine", mask, sliceIndex, pixels, labels,
                                                     boxPixels), finish)
        job.start()
        return job

    def startPropagating(self, segmentationNode, segmentId, sliceIndex, direction="both", volumeNode=None,
                         axis=None, sam=None, device="auto", cancel=None, preset=None) -> ThreadJob:
        """CLISCSegment's ``propagate`` as a started job: slice ``sliceIndex`` carried to its neighbours with SAM
        (`clisc.refine.Refiner.propagate`: each next slice prompted with the previous one's box, until SAM's
        predicted IoU or the overlap with the previous slice falls below its threshold). ``direction``: "up"
        (increasing slice index), "down" or "both". Each slice reached costs one SAM image embedding unless cached
        (the job's progress counts them). ``cancel``: a `clisc.progress.CancelToken` (the job then ends with
        `clisc.errors.Cancelled`, writing nothing). From an empty slice nothing changes, and the message says so.
        The other arguments are `startRefining`'s."""
        volumeNode = self.refineVolume(segmentationNode, volumeNode)
        mask = mrml.segmentMask(segmentationNode, segmentId, volumeNode)
        geometry, axis = mrml.sliceGeometry(volumeNode, axis)
        count = geometry.array.shape[axis]
        reachable = {"up": count - 1 - sliceIndex, "down": sliceIndex}.get(direction, count - 1)
        run = self._runner(volumeNode, axis, sam, device, preset, embeddings=reachable, message="")

        def finish(output):
            propagation, keep = output
            keep()
            changed = propagation.changed_slices
            if changed:
                self._saveUndoState(segmentationNode)
                slices = np.moveaxis(propagation.mask, axis, 0)
                mrml.replaceSegmentSlices(segmentationNode, segmentId, volumeNode, axis,
                                          {index: slices[index] for index in changed})
            return propagation

        job = ThreadJob(lambda progress, cancel: run(progress, cancel, "propagate", mask, sliceIndex, direction),
                        finish, token=cancel)
        job.start()
        return job

    def _runner(self, volumeNode, axis: int, sam, device, preset, embeddings: int, message: str):
        """On the main thread: ``run(progress, cancel, method, *arguments)`` for the worker thread, calling
        ``method`` ("refine" or "propagate") of the volume's Refiner here, or of its session on the server; it
        returns (the result, what the main thread then calls to keep the Refiner)."""
        sessions = self._sessions()
        if sessions is not None:
            if sam is not None and not isinstance(sam, str):
                from clisc.errors import InputError

                raise InputError("a server refines with the SAM models it offers: give a model name")
            prepare = sessions.prepare(volumeNode.GetID(), mrml.volumeSignature(volumeNode),
                                       lambda: mrml.volumeFromNode(volumeNode))

            def remotely(progress, cancel, method, *arguments):
                session = prepare(progress, cancel)
                return getattr(session, method)(*arguments, axis=axis, sam=sam, preset=preset, progress=progress,
                                                cancel=cancel), lambda: None
            return remotely

        if sam is None and preset is not None:
            from clisc.zeroshot import preset_options

            sam = preset_options(preset).sam
        signature, prepare = self._refinerPreparation(volumeNode, axis, sam, device)

        def locally(progress, cancel, method, *arguments):
            with self._usingRefiner(prepare, progress, cancel, embeddings, message) as refiner:
                return getattr(refiner, method)(*arguments), lambda: self._keep(volumeNode.GetID(), signature, refiner)
        return locally

    def _refinerPreparation(self, volumeNode, axis: int, sam, device) -> tuple:
        """(the signature of the Refiner ``volumeNode`` needs, a function giving that Refiner on the worker
        thread): the kept one when the volume's voxels, geometry, the axis and the SAM are unchanged, else a new
        one, built from a copy of the voxels taken here. A new SAM empties the embedding cache (the old SAM's
        embeddings are of no use to it, and would keep the old model in memory)."""
        spec = DEFAULT_REFINE_SAM if sam is None else sam
        modelKey = (str(spec) if isinstance(spec, (str, os.PathLike)) else id(spec), device)
        if modelKey != self._modelKey:
            from clisc.refine import EmbeddingCache

            self._modelKey, self._segmenter = modelKey, None
            self._embeddingCache = EmbeddingCache(EMBEDDING_CACHE_SLICES)
            self._refiners.clear()
        signature = (mrml.volumeSignature(volumeNode), axis, modelKey)
        kept = self._refiners.get(volumeNode.GetID())
        if kept is not None and kept[0] == signature:
            return signature, lambda: kept[1]
        volume = mrml.volumeFromNode(volumeNode)

        def build():
            from clisc.refine import Refiner

            if self._segmenter is None:
                self._segmenter = ReportingSegmenter(self._sliceSegmenter(spec, device))
            return Refiner(self._segmenter, volume, axis, cache=self._embeddingCache)

        return signature, build

    def _sliceSegmenter(self, sam, device):
        """A `clisc.sam.SliceSegmenter` of ``sam`` on ``device`` (one given already built is used as it is)."""
        if hasattr(sam, "predict_logits"):
            return sam
        from clisc.result import resolve_device
        from clisc.sam import SliceSegmenter

        return SliceSegmenter(self._loadModel("sam", sam).to(resolve_device(device)))

    @contextlib.contextmanager
    def _usingRefiner(self, prepare, progress, cancel, embeddings: int, message: str):
        """The prepared Refiner, for one job at a time (worker thread), its segmenter reporting to that job: at
        most ``embeddings`` embeddings, ``message`` said as each starts."""
        with self._lock:
            refiner = prepare()
            segmenter = refiner.segmenter
            segmenter.progress, segmenter.cancel, segmenter.total, segmenter.embedded = progress, cancel, embeddings, 0
            segmenter.message = message
            try:
                yield refiner
            finally:
                segmenter.progress = segmenter.cancel = None

    def _keep(self, volumeId, signature, refiner) -> None:
        """Keep ``refiner`` for the volume (main thread), dropping the least recently used beyond
        `REFINED_VOLUMES`."""
        self._refiners[volumeId] = (signature, refiner)
        self._refiners.move_to_end(volumeId)
        while len(self._refiners) > REFINED_VOLUMES:
            self._refiners.popitem(last=False)

    # -- undo states

    def _history(self, segmentationNode):
        """The undo states of ``segmentationNode``'s segmentation, made on first use."""
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
