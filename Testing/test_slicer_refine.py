"""The Refine section of CLISCSegment on real MRML (slicer-core): the Logic's refine / propagate / undo, the markups
session behind the section's buttons, the geometry of clicks, and the choice of DICOM SEG exporter.

Two kinds of SAM:
- a tiny real SAM (`tiny_sam`, random weights, in `clisc.sam.SliceSegmenter`): its masks mean nothing, so these
  tests show the mechanics only: which voxels may change (the refined slice of the refined segment, nothing
  else), that a cached slice costs no new embedding, undo/redo, refusals with their reasons. They cannot show
  that a click improves a segment (test_refine.py does, with the real LiteMedSAM).
- `DiscSegmenter`: a stand-in SAM that draws a disc around the first positive point it is sent. With it, where
  the disc lands shows where a RAS click landed, voxel for voxel, on oblique and flipped grids.

Not shown here (needs real Slicer): the widget, its shortcuts, the place-mode interaction in a view (here the
points are added to the markups nodes as a click would), the JobWatcher's timer, and a real DICOM SEG export.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import oblique_ijk_to_ras, slicer_module

from clisc.errors import Cancelled, InputError
from clisc.progress import CancelToken
from clisc.sam import SlicePrediction

DISC_RADIUS = 3


@pytest.fixture(scope="module")
def module():
    return slicer_module("CLISCSegment")


@pytest.fixture(scope="module")
def refinement():
    return slicer_module("CLISCLib.refinement")


@pytest.fixture(scope="module")
def tiny_segmenter():
    from clisc.models.random_weights import tiny_sam
    from clisc.sam import SliceSegmenter

    return SliceSegmenter(tiny_sam(image_size=256))


class DiscSegmenter:
    """A stand-in SAM: the mask is a disc of `DISC_RADIUS` pixels around the first positive point sent (else the
    centre of the box); counts its embeddings."""

    box_prompts_only = False

    def __init__(self):
        self.embedded = 0
        self.prompts = []

    def embed(self, images):
        self.embedded += len(images)
        return torch.zeros(len(images), 256, 64, 64)

    def predict_logits(self, embedding, image_shape, points=None, labels=None, box=None, mask_input=None,
                       multimask=None):
        self.prompts.append((None if points is None else np.asarray(points).tolist(), labels, box))
        if points is not None and (np.asarray(labels) == 1).any():
            x, y = np.asarray(points)[np.asarray(labels) == 1][0]
        else:
            x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        rows, cols = np.indices(image_shape)
        mask = (rows - y) ** 2 + (cols - x) ** 2 <= DISC_RADIUS ** 2
        return SlicePrediction(mask, torch.zeros(1, 256, 256), 0.9)

    def mask_to_logits(self, mask):
        return torch.zeros(1, 256, 256)


GEOMETRIES = {"axis-aligned": np.diag([0.8, 0.8, 2.0, 1.0]),
              "flipped": np.diag([-0.8, 0.8, -2.0, 1.0]),
              "oblique": oblique_ijk_to_ras(25.0),
              "oblique flipped": oblique_ijk_to_ras(25.0, flip=(-1, 1, -1))}


def scene_with_segments(ijk_to_ras, shape=(5, 40, 48)):
    """A volume with a bright block, and a segmentation over it holding "tumor" (the block on slices 1-3) and
    "other" (overlapping it), as CLISC writes them."""
    import slicer

    rng = np.random.default_rng(0)
    array = rng.normal(size=shape).astype(np.float32)
    array[:, 10:30, 12:36] += 3
    volumeNode = slicer.util.addVolumeFromArray(array, ijk_to_ras, "volume")
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "volume CLISC")
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    masks = {"tumor": np.zeros(shape, bool), "other": np.zeros(shape, bool)}
    masks["tumor"][1:4, 12:28, 14:34] = True
    masks["other"][0:3, 20:35, 30:45] = True
    ids = {}
    for name, mask in masks.items():
        ids[name] = segmentationNode.GetSegmentation().AddEmptySegment("", name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentationNode, ids[name],
                                                          volumeNode)
    return volumeNode, segmentationNode, ids, masks


def segment_array(segmentationNode, segmentId, volumeNode) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0


def ras_of_voxel(ijk_to_ras, k, j, i) -> list:
    return (np.asarray(ijk_to_ras) @ [i, j, k, 1.0])[:3].tolist()


def test_a_click_refines_only_its_slice_of_its_segment(module, scene, tiny_segmenter):
    """Tiny random SAM: shows which voxels may change, not that the new slice is any good."""
    volumeNode, segmentationNode, ids, masks = scene_with_segments(GEOMETRIES["oblique flipped"])
    logic = module.CLISCSegmentLogic()
    matrix = GEOMETRIES["oblique flipped"]
    points = [ras_of_voxel(matrix, 2, 20, 24), ras_of_voxel(matrix, 2, 5, 5)]
    refinement = logic.refine(segmentationNode, ids["tumor"], 2, points=points, labels=[1, 0],
                              volumeNode=volumeNode, sam=tiny_segmenter)
    assert refinement.index == 2 and refinement.axis == 0  # k: the thick-slice axis
    tumor = segment_array(segmentationNode, ids["tumor"], volumeNode)
    assert np.array_equal(tumor[2], refinement.mask)
    others = [0, 1, 3, 4]
    assert np.array_equal(tumor[others], masks["tumor"][others])  # the user's segment outside the refined slice
    assert np.array_equal(segment_array(segmentationNode, ids["other"], volumeNode), masks["other"])


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_a_point_placed_in_ras_lands_on_its_voxel(module, scene, geometry):
    """DiscSegmenter: the disc is drawn around the pixel the engine was sent; its centre on the segment must be the
    voxel whose RAS centre the point was placed at, on every grid. Shows the RAS → slice → pixel → voxel chain;
    a rounding error or an i/j swap would move or transpose the disc."""
    import slicer

    matrix = GEOMETRIES[geometry]
    volumeNode, segmentationNode, _, _ = scene_with_segments(matrix)
    empty = segmentationNode.GetSegmentation().AddEmptySegment("", "drawn")
    logic = module.CLISCSegmentLogic()
    k, j, i = 3, 11, 31  # off-centre and j != i, so that a transposition shows
    logic.refine(segmentationNode, empty, k, points=[ras_of_voxel(matrix, k, j, i)], volumeNode=volumeNode,
                 sam=DiscSegmenter())
    drawn = segment_array(segmentationNode, empty, volumeNode)
    assert drawn[[0, 1, 2, 4]].sum() == 0
    rows, cols = np.nonzero(drawn[k])
    assert (rows.mean(), cols.mean()) == (j, i) and drawn[k, j, i]
    assert drawn[k].sum() == (np.add.outer(np.arange(-3, 4) ** 2, np.arange(-3, 4) ** 2) <= 9).sum()

    # a point 0.4 voxel off the centre still lands on the same voxel; the same through a markups node's world RAS
    near = (np.asarray(matrix) @ [i + 0.4, j - 0.4, k + 0.3, 1.0])[:3]
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*near)
    world = points.GetNthControlPointPositionWorld(0)
    refinement = logic.refine(segmentationNode, empty, k, points=[world], volumeNode=volumeNode, sam=DiscSegmenter())
    assert np.array_equal(np.nonzero(refinement.mask)[0].mean(), j)


@pytest.mark.parametrize("axis, index", [(1, 11), (2, 31)])
def test_a_point_lands_on_its_voxel_along_another_slice_axis(module, scene, axis, index):
    """Slices along j (axis 1) and i (axis 2) of an oblique flipped grid: slice index and (x, y) swap roles."""
    matrix = GEOMETRIES["oblique flipped"]
    volumeNode, segmentationNode, _, _ = scene_with_segments(matrix)
    empty = segmentationNode.GetSegmentation().AddEmptySegment("", "drawn")
    k, j, i = 2, 11, 31
    module.CLISCSegmentLogic().refine(segmentationNode, empty, index, points=[ras_of_voxel(matrix, k, j, i)],
                                      volumeNode=volumeNode, axis=axis, sam=DiscSegmenter())
    drawn = segment_array(segmentationNode, empty, volumeNode)
    assert drawn[k, j, i] and np.moveaxis(drawn, axis, 0)[index].sum() == drawn.sum()
    assert tuple(np.mean(np.nonzero(drawn), axis=1)) == (k, j, i)


def test_a_point_under_a_transform_lands_on_its_voxel(module, scene):
    """Markups give world RAS; a volume and its segmentation under a transform are refined in the volume's frame."""
    import slicer
    import vtk

    matrix = GEOMETRIES["flipped"]
    volumeNode, segmentationNode, _, _ = scene_with_segments(matrix)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 12.5)
    shift.SetElement(2, 3, -7.0)
    transform.SetMatrixTransformToParent(shift)
    for node in (volumeNode, segmentationNode):
        node.SetAndObserveTransformNodeID(transform.GetID())
    empty = segmentationNode.GetSegmentation().AddEmptySegment("", "drawn")
    k, j, i = 2, 8, 30
    world = np.add(ras_of_voxel(matrix, k, j, i), [12.5, 0, -7.0])
    module.CLISCSegmentLogic().refine(segmentationNode, empty, k, points=[world], volumeNode=volumeNode,
                                      sam=DiscSegmenter())
    drawn = segment_array(segmentationNode, empty, volumeNode)
    rows, cols = np.nonzero(drawn[k])
    assert (rows.mean(), cols.mean()) == (j, i)


def test_a_box_is_its_corners_extent_on_the_slice(module, refinement, scene):
    """Two RAS corners → slice pixels; the disc stand-in draws at the box centre."""
    matrix = GEOMETRIES["oblique"]
    volumeNode, segmentationNode, _, _ = scene_with_segments(matrix)
    empty = segmentationNode.GetSegmentation().AddEmptySegment("", "boxed")
    segmenter = DiscSegmenter()
    corners = [ras_of_voxel(matrix, 1, 10, 20), ras_of_voxel(matrix, 1, 16, 30)]
    module.CLISCSegmentLogic().refine(segmentationNode, empty, 1, box=corners, volumeNode=volumeNode, sam=segmenter)
    assert segmenter.prompts[-1][2].tolist() == [20, 10, 30, 16]
    drawn = segment_array(segmentationNode, empty, volumeNode)
    rows, cols = np.nonzero(drawn[1])
    assert (rows.mean(), cols.mean()) == (13, 25)


def test_bad_input_is_refused_with_the_reason_and_changes_nothing(module, scene, tiny_segmenter):
    import slicer

    matrix = GEOMETRIES["axis-aligned"]
    volumeNode, segmentationNode, ids, masks = scene_with_segments(matrix)
    logic = module.CLISCSegmentLogic()
    with pytest.raises(InputError, match="outside the volume"):
        logic.refine(segmentationNode, ids["tumor"], 2, points=[ras_of_voxel(matrix, 2, 20, 60)],
                     volumeNode=volumeNode, sam=tiny_segmenter)
    with pytest.raises(InputError, match="lies on slice 3, not on slice 2"):
        logic.refine(segmentationNode, ids["tumor"], 2, points=[ras_of_voxel(matrix, 3, 20, 20)],
                     volumeNode=volumeNode, sam=tiny_segmenter)

    # a segmentation drawn on another volume's grid (half the spacing): refused, with the reason
    fine = slicer.util.addVolumeFromArray(np.zeros((10, 80, 96), np.float32), np.diag([0.4, 0.4, 1.0, 1.0]), "fine")
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "on another grid")
    other.SetReferenceImageGeometryParameterFromVolumeNode(fine)
    otherId = other.GetSegmentation().AddEmptySegment("", "drawn elsewhere")
    block = np.zeros((10, 80, 96), np.uint8)
    block[4:6, 20:40, 20:40] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(block, other, otherId, fine)
    with pytest.raises(InputError, match=r"another voxel grid than volume \(its voxels: 0\.4 × 0\.4 × 1 mm, "
                                         r"the volume's: 0\.8 × 0\.8 × 2 mm"):
        logic.refine(other, otherId, 2, points=[ras_of_voxel(matrix, 2, 20, 20)], volumeNode=volumeNode,
                     sam=tiny_segmenter)
    with pytest.raises(InputError, match="lies on another voxel grid"):
        logic.propagate(other, otherId, 2, "up", volumeNode=volumeNode, sam=tiny_segmenter)
    # an empty slice and no prompt; a slice outside the volume
    with pytest.raises(InputError, match="slice 0 is empty and no point or box was given"):
        logic.refine(segmentationNode, ids["tumor"], 0, volumeNode=volumeNode, sam=tiny_segmenter)
    with pytest.raises(InputError, match="slice 9 along axis 0 is outside the volume"):
        logic.refine(segmentationNode, ids["tumor"], 9, volumeNode=volumeNode, sam=tiny_segmenter)
    # propagation from an empty slice: nothing happens, and the message says why
    propagation = logic.propagate(segmentationNode, ids["tumor"], 0, "both", volumeNode=volumeNode,
                                  sam=tiny_segmenter)
    assert propagation.changed_slices == [] and "slice 0 is empty: nothing to propagate" in propagation.message
    for name, mask in masks.items():
        assert np.array_equal(segment_array(segmentationNode, ids[name], volumeNode), mask)
    assert not logic.undo(segmentationNode)  # nothing was written, so no undo state was saved


def test_propagation_rewrites_only_the_slices_it_reports_and_undo_redo_restore(module, scene):
    """DiscSegmenter (predicted IoU 0.9 and full overlap: propagation runs to the ends): the slices reported are
    the ones rewritten, the start slice and the other segment are kept; undo and redo walk the states."""
    matrix = GEOMETRIES["oblique flipped"]
    volumeNode, segmentationNode, ids, masks = scene_with_segments(matrix)
    logic = module.CLISCSegmentLogic()
    segmenter = DiscSegmenter()
    refined = logic.refine(segmentationNode, ids["tumor"], 2, points=[ras_of_voxel(matrix, 2, 20, 24)],
                           volumeNode=volumeNode, sam=segmenter)
    after_click = segment_array(segmentationNode, ids["tumor"], volumeNode)
    reports = []
    propagation = logic.propagate(segmentationNode, ids["tumor"], 2, "up", volumeNode=volumeNode, sam=segmenter,
                                  progress=lambda stage, done, total, message="", **f: reports.append((done, total)))
    assert propagation.changed_slices == [3, 4] and "reached the end of the volume" in propagation.message
    assert reports[-1] == (2, 2)  # two slices reached, each one embedding (slice 2's was cached by the click)
    assert segmenter.embedded == 3
    tumor = segment_array(segmentationNode, ids["tumor"], volumeNode)
    assert np.array_equal(tumor[[0, 1, 2]], after_click[[0, 1, 2]])
    assert all(np.array_equal(tumor[k], refined.mask) for k in (3, 4))  # the disc carried on, same box
    assert np.array_equal(segment_array(segmentationNode, ids["other"], volumeNode), masks["other"])

    assert logic.undo(segmentationNode)
    assert np.array_equal(segment_array(segmentationNode, ids["tumor"], volumeNode), after_click)
    assert logic.undo(segmentationNode)
    assert np.array_equal(segment_array(segmentationNode, ids["tumor"], volumeNode), masks["tumor"])
    assert not logic.undo(segmentationNode)
    assert logic.redo(segmentationNode) and logic.redo(segmentationNode)
    assert np.array_equal(segment_array(segmentationNode, ids["tumor"], volumeNode), tumor)
    assert not logic.redo(segmentationNode)
    assert np.array_equal(segment_array(segmentationNode, ids["other"], volumeNode), masks["other"])


def test_a_cached_slice_costs_no_embedding_and_cancel_writes_nothing(module, scene):
    matrix = GEOMETRIES["axis-aligned"]
    volumeNode, segmentationNode, ids, masks = scene_with_segments(matrix)
    logic = module.CLISCSegmentLogic()
    segmenter = DiscSegmenter()
    for n in range(3):  # three clicks on slice 1, then one on slice 3
        logic.refine(segmentationNode, ids["tumor"], 1, points=[ras_of_voxel(matrix, 1, 20, 20 + n)],
                     volumeNode=volumeNode, sam=segmenter)
    assert segmenter.embedded == 1
    logic.refine(segmentationNode, ids["tumor"], 3, points=[ras_of_voxel(matrix, 3, 20, 20)], volumeNode=volumeNode,
                 sam=segmenter)
    assert segmenter.embedded == 2
    before = segment_array(segmentationNode, ids["tumor"], volumeNode)
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        logic.propagate(segmentationNode, ids["tumor"], 1, "both", volumeNode=volumeNode, sam=segmenter,
                        cancel=cancel)
    assert np.array_equal(segment_array(segmentationNode, ids["tumor"], volumeNode), before)


def test_clicks_on_the_markups_refine_the_slice_each_lands_on(module, refinement, scene):
    """The session behind the Refine section: points added to its markups nodes (as Slicer's place mode adds them)
    refine the slice each lies on, with every point of that slice; moving a point refines again; Propagate starts
    from the last refined slice; undo/redo. The view interaction itself needs real Slicer."""
    import slicer

    matrix = GEOMETRIES["oblique"]
    volumeNode, segmentationNode, ids, masks = scene_with_segments(matrix)
    logic = module.CLISCSegmentLogic()
    segmenter = DiscSegmenter()
    messages = []
    session = refinement.RefineSession(logic, log=messages.append)
    session.start(segmentationNode, ids["tumor"], volumeNode, sam=segmenter)
    session.place(session.POSITIVE)
    interaction = slicer.mrmlScene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    selection = slicer.mrmlScene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert selection.GetActivePlaceNodeID() == session.nodes[session.POSITIVE].GetID()

    session.nodes[session.POSITIVE].AddControlPoint(*ras_of_voxel(matrix, 2, 15, 18))
    tumor = segment_array(segmentationNode, ids["tumor"], volumeNode)
    rows, cols = np.nonzero(tumor[2])
    assert (rows.mean(), cols.mean()) == (15, 18) and session.lastSlice == 2
    assert np.array_equal(tumor[[0, 1, 3, 4]], masks["tumor"][[0, 1, 3, 4]])

    session.nodes[session.NEGATIVE].AddControlPoint(*ras_of_voxel(matrix, 2, 30, 40))
    assert segmenter.prompts[-1][0] == [[18, 15], [40, 30]] and segmenter.prompts[-1][1].tolist() == [1, 0]
    session.nodes[session.POSITIVE].AddControlPoint(*ras_of_voxel(matrix, 4, 25, 25))  # another slice: its own
    assert segmenter.prompts[-1][0] == [[25, 25]] and session.lastSlice == 4
    session.nodes[session.POSITIVE].SetNthControlPointPositionWorld(0, *ras_of_voxel(matrix, 2, 20, 22))
    session.nodes[session.POSITIVE].InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)  # a drag ends
    rows, cols = np.nonzero(segment_array(segmentationNode, ids["tumor"], volumeNode)[2])
    assert (rows.mean(), cols.mean()) == (20, 22)

    session.nodes[session.POSITIVE].AddControlPoint(*ras_of_voxel(matrix, 2, 20, 200))  # off the image
    assert any("Ignored" in m and "outside the volume" in m for m in messages)

    before = segment_array(segmentationNode, ids["tumor"], volumeNode)
    session.propagate("down")  # from slice 2, the last refined
    assert any(m.startswith("Propagation: down: slices 1..0") for m in messages)
    assert np.array_equal(segment_array(segmentationNode, ids["other"], volumeNode), masks["other"])
    session.undo()
    assert np.array_equal(segment_array(segmentationNode, ids["tumor"], volumeNode), before)
    session.redo()
    session.clearPoints()
    assert all(node.GetNumberOfControlPoints() == 0 for node in session.nodes.values())
    session.stop()
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform


def test_clicks_made_while_a_job_runs_refine_their_slices_after_it(module, refinement, scene):
    """The widget's runJob watches a job and returns at once; a click made meanwhile waits for it (one job at a
    time on the Refiner), then runs. The first job says the slice had no embedding yet."""
    matrix = GEOMETRIES["axis-aligned"]
    volumeNode, segmentationNode, ids, _ = scene_with_segments(matrix)
    watched = []
    session = refinement.RefineSession(module.CLISCSegmentLogic(), lambda job, done: watched.append((job, done)),
                                       log=lambda message: None)
    session.start(segmentationNode, ids["tumor"], volumeNode, sam=DiscSegmenter())
    session.nodes[session.POSITIVE].AddControlPoint(*ras_of_voxel(matrix, 1, 20, 20))
    session.nodes[session.POSITIVE].AddControlPoint(*ras_of_voxel(matrix, 3, 22, 22))
    assert len(watched) == 1  # the second click waits
    reports = []
    job, done = watched[0]
    job.wait(progress=lambda stage, count, total, message="", **f: reports.append(message))
    assert "slice 1 has no image embedding yet: computing it" in reports[0]
    done(job)
    assert len(watched) == 2
    job, done = watched[1]
    job.wait()
    done(job)
    tumor = segment_array(segmentationNode, ids["tumor"], volumeNode)
    assert tumor[1, 20, 20] and tumor[3, 22, 22] and session.running is None


def test_refined_segments_are_tagged_semiautomatic_for_dicom_seg(module, mrml, scene):
    import vtk

    matrix = GEOMETRIES["axis-aligned"]
    volumeNode, segmentationNode, ids, _ = scene_with_segments(matrix)
    module.CLISCSegmentLogic().refine(segmentationNode, ids["tumor"], 1, points=[ras_of_voxel(matrix, 1, 20, 20)],
                                      volumeNode=volumeNode, sam=DiscSegmenter())
    segmentation = segmentationNode.GetSegmentation()
    for segmentId, expected in ((ids["tumor"], ("SEMIAUTOMATIC", "CLISC")), (ids["other"], None)):
        values = [vtk.reference("") for _ in range(2)]
        found = [segmentation.GetSegment(segmentId).GetTag(name, value)
                 for name, value in zip((mrml.ALGORITHM_TYPE_TAG, mrml.ALGORITHM_NAME_TAG), values)]
        assert (tuple(str(v) for v in values) if all(found) else None) == expected


def test_the_box_markup_refines_the_slice_of_its_centre(module, refinement, scene):
    import slicer

    matrix = GEOMETRIES["axis-aligned"]
    volumeNode, segmentationNode, ids, _ = scene_with_segments(matrix)
    segmenter = DiscSegmenter()
    session = refinement.RefineSession(module.CLISCSegmentLogic(), log=lambda message: None)
    empty = segmentationNode.GetSegmentation().AddEmptySegment("", "boxed")
    session.start(segmentationNode, empty, volumeNode, sam=segmenter)
    session.place(session.BOX)
    roi = session.nodes[session.BOX]
    roi.SetCenterWorld(*ras_of_voxel(matrix, 3, 20, 24))
    roi.SetSize(8.0, 4.0, 0.0)  # 10 × 5 voxels of 0.8 mm, flat, as one drawn on an axial slice
    roi.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)
    assert segmenter.prompts[-1][2].tolist() == [19, 18, 29, 22]
    assert segment_array(segmentationNode, empty, volumeNode)[3, 20, 24]


def test_the_session_refuses_a_segment_on_another_grid(module, refinement, scene):
    import slicer

    volumeNode, _, _, _ = scene_with_segments(GEOMETRIES["axis-aligned"])
    shifted = slicer.util.addVolumeFromArray(np.zeros((5, 40, 48), np.float32),
                                             np.diag([0.8, 0.8, 2.0, 1.0]) + np.c_[np.zeros((4, 3)), [0.3, 0, 0, 0]],
                                             "shifted")
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(shifted)
    segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "shifted by 0.3 mm")
    session = refinement.RefineSession(module.CLISCSegmentLogic(), log=lambda message: None)
    with pytest.raises(InputError, match="another voxel grid"):
        session.start(segmentationNode, segmentId, volumeNode)
    assert not session.active


def test_help_text_documents_every_refine_shortcut(module):
    section = slicer_module("CLISCLib.refineSection").RefineSection
    parent = SimpleNamespace()
    module.CLISCSegment(parent)
    keys = [key for key, _, _ in section.SHORTCUTS]
    assert len(keys) == len(set(keys)) >= 8
    for key, description, method in section.SHORTCUTS:
        assert f"{key}: {description}" in parent.helpText
        assert callable(getattr(section, method))


# -- DICOM SEG: which exporter (the export itself needs Slicer's DICOM database)


def test_dicom_seg_exporter_is_slicers_core_plugin_on_5_12_and_quantitative_reportings_on_5_10(mrml, monkeypatch):
    import slicer

    class Plugin:
        pass

    monkeypatch.setitem(sys.modules, "DICOMSegmentationPlugin", SimpleNamespace(DICOMSegmentationPluginClass=Plugin))
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=12), raising=False)
    assert mrml.dicomSegExporter() == ("Slicer's core DICOMSegmentationPlugin", Plugin)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=10), raising=False)
    assert mrml.dicomSegExporter() == ("QuantitativeReporting's DICOMSegmentationPlugin", Plugin)

    class Registered:
        pass

    monkeypatch.setattr(slicer.modules, "dicomPlugins", {"DICOMSegmentationPlugin": Registered}, raising=False)
    assert mrml.dicomSegExporter()[1] is Registered  # Slicer's DICOM plugin registry first

    monkeypatch.setattr(slicer.modules, "dicomPlugins", {}, raising=False)
    monkeypatch.setitem(sys.modules, "DICOMSegmentationPlugin", None)  # neither: 5.10 without the extension
    with pytest.raises(RuntimeError, match="built into Slicer 5.12 and newer; on Slicer 5.10 install the "
                                           "QuantitativeReporting extension"):
        mrml.dicomSegExporter()


def test_dicom_seg_export_names_the_exporter_and_passes_its_error_on(mrml, scene, monkeypatch, tmp_path):
    import slicer

    volumeNode, segmentationNode, _, _ = scene_with_segments(GEOMETRIES["axis-aligned"])
    calls = []

    class Plugin:
        def examineForExport(self, item):
            calls.append(item)
            return [SimpleNamespace(directory=None)]

        def export(self, exportables):
            calls.append(exportables[0].directory)
            return ""

    monkeypatch.setitem(sys.modules, "DICOMSegmentationPlugin", SimpleNamespace(DICOMSegmentationPluginClass=Plugin))
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=12), raising=False)
    assert mrml.exportDicomSeg(segmentationNode, tmp_path) == "Slicer's core DICOMSegmentationPlugin"
    assert calls[1] == str(tmp_path)
    Plugin.export = lambda self, exportables: "Empty segments found"
    with pytest.raises(RuntimeError, match="Slicer's core DICOMSegmentationPlugin: Empty segments found"):
        mrml.exportDicomSeg(segmentationNode, tmp_path)
