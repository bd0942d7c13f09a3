"""The MRML adapter: Slicer nodes to and from the engine's data, on the main thread.

- node -> `clisc.volume.Volume` (`volumeFromNode`: a copy of the voxels, (K, J, I), and the IJK→RAS; `volumeGeometry`:
  the grid alone), and back (`addVolumeNode`);
- a `clisc.result.SegmentResult` -> segments of a segmentation node (`addSegments`: names, colours, the prompt
  tag, terminology, saliency volumes, the subject hierarchy), removed again if writing fails;
- one segment <-> a (K, J, I) mask on a volume's grid, for refinement (`segmentMask`, refused with the reason when
  the segment lies on another grid: `segmentGridProblem`; `replaceSegmentSlices` writes only some slices back);
- world RAS (what markups give) -> a volume's own RAS (`volumeRasFromWorld`);
- a segmentation node -> files (`exportSegmentation` .seg.nrrd, `exportLabelmap`, `exportDicomSeg` through
  `dicomSegExporter`: Slicer's core DICOM SEG plugin on 5.12, QuantitativeReporting's on 5.10).

Only the main thread may call these; background jobs get the `Volume` and hand back the result.
"""
import numpy as np
import slicer
import vtk

from CLISCLib.terminology import terminologyEntry

PROMPT_TAG = "CLISC.Prompt"            # segment tag holding the prompt that made the segment
SALIENCY_REFERENCE = "CLISC.Saliency"  # segmentation node -> its saliency volumes, in segment order
# The segment tags Slicer's DICOM SEG exporter writes as SegmentAlgorithmType / SegmentAlgorithmName (untagged:
# MANUAL). CLISC's segments are AUTOMATIC, as `clisc.dicom_seg` writes them; a refined one is SEMIAUTOMATIC.
ALGORITHM_TYPE_TAG, ALGORITHM_NAME_TAG, ALGORITHM_NAME = "DICOM.SegmentAlgorithmType", "DICOM.SegmentAlgorithmName", "CLISC"


# -- volumes

def volumeFromNode(volumeNode):
    """A `clisc.volume.Volume` holding a copy of the node's voxels (K, J, I) and its IJK→RAS. A colour image (a
    loaded PNG/JPG: (K, J, I, 3 or 4)) becomes its grey level by `clisc.readers.rgb_to_grey`, and NaN or infinite
    voxels are replaced (`clisc.readers.replace_non_finite`, with a warning), as the CLI reads it."""
    from clisc.readers import replace_non_finite, rgb_to_grey
    from clisc.volume import Volume

    array = slicer.util.arrayFromVolume(volumeNode).copy()
    if array.ndim == 4:
        array = rgb_to_grey(array)
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return replace_non_finite(Volume(array, slicer.util.arrayFromVTKMatrix(matrix), volumeNode.GetName()))


def volumeGeometry(volumeNode):
    """A `clisc.volume.Volume` holding only the node's grid: its IJK→RAS, and a read-only array of its shape that
    takes no memory (no voxels are copied). For geometry (`clisc.volume.slice_point`, the slice axis)."""
    from clisc.volume import Volume

    shape = slicer.util.arrayFromVolume(volumeNode).shape[:3]
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return Volume(np.broadcast_to(np.zeros((), np.uint8), shape), slicer.util.arrayFromVTKMatrix(matrix),
                  volumeNode.GetName())


def volumeSignature(volumeNode) -> tuple:
    """What tells whether a volume node's voxels or geometry changed: its image data's modification time and its
    IJK→RAS (a kept copy of the volume, a Refiner or a server session, is reused while it is the same)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return volumeNode.GetImageData().GetMTime(), tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4))


def sliceGeometry(volumeNode, axis=None) -> tuple:
    """(``volumeNode``'s grid as a `clisc.volume.Volume` without voxels, the slice axis as an array axis 0/1/2).
    ``axis``: None or "auto" (the acquisition axis), "axial", "coronal", "sagittal", "k", "j", "i", or 0/1/2."""
    from clisc.volume import slice_axis

    geometry = volumeGeometry(volumeNode)
    if axis is None or isinstance(axis, str):
        return geometry, slice_axis(geometry, axis or "auto")
    return geometry, int(axis)


def addVolumeNode(volume, name: str):
    """A new scalar volume node holding a `clisc.volume.Volume` (its voxels and IJK→RAS)."""
    return slicer.util.addVolumeFromArray(volume.array, volume.ijk_to_ras, name)


def placeBeside(volumeNode, node) -> None:
    """Put ``node`` under the parent of ``volumeNode`` in the subject hierarchy (its study, where DICOM SEG export
    looks) and under the same transform."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)

    def item(dataNode):  # Slicer's GUI creates the items of new nodes; headless MRML does not
        return hierarchy.GetItemByDataNode(dataNode) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), dataNode)

    hierarchy.SetItemParent(item(node), hierarchy.GetItemParent(item(volumeNode)))
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())


def addSaliencyVolume(volumeNode, saliency: np.ndarray, name: str):
    """A volume node holding ``saliency`` (K, J, I) on the grid of ``volumeNode``, shown in 0..1, beside it."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    node = slicer.util.addVolumeFromArray(saliency.astype(np.float32), matrix,
                                          slicer.mrmlScene.GenerateUniqueName(name))
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevelMinMax(0.0, 1.0)
    placeBeside(volumeNode, node)
    return node


def showLastSaliency(segmentationNode) -> None:
    """Show the last saliency volume of a segmentation (`SALIENCY_REFERENCE`) over the slice views, in a rainbow."""
    count = segmentationNode.GetNumberOfNodeReferences(SALIENCY_REFERENCE)
    if count:
        saliencyNode = segmentationNode.GetNthNodeReference(SALIENCY_REFERENCE, count - 1)
        saliencyNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
        slicer.util.setSliceViewerLayers(foreground=saliencyNode, foregroundOpacity=0.4)


# -- segments

def uniqueSegmentName(segmentation, name: str) -> str:
    """``name``, or ``name 2``, ``name 3``... if a segment of ``segmentation`` already has it."""
    taken = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} {number}", number + 1
    return candidate


def addSegments(volumeNode, result, segmentationNode=None, showSaliency=False):
    """Write a `clisc.result.SegmentResult` as new segments of ``segmentationNode``, or of a new segmentation node
    placed beside ``volumeNode``; returns the node.

    Each mask (K, J, I) on the grid of ``volumeNode`` becomes one segment named after its prompt (never replacing
    an existing one: "tumor 2"), with the prompt in its `PROMPT_TAG` tag and, for a known organ or lesion, a
    terminology entry. With ``showSaliency``, each saliency map becomes a volume node referenced from the
    segmentation node as `SALIENCY_REFERENCE`. If writing fails, the segments and nodes added are removed again.
    """
    from clisc.writers import SEGMENT_COLORS

    scene = slicer.mrmlScene
    created = segmentationNode is None
    if created:
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                   scene.GenerateUniqueName(f"{volumeNode.GetName()} CLISC"))
        segmentationNode.CreateDefaultDisplayNodes()
        placeBeside(volumeNode, segmentationNode)
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
            segment.SetTag(ALGORITHM_TYPE_TAG, "AUTOMATIC")
            segment.SetTag(ALGORITHM_NAME_TAG, ALGORITHM_NAME)
            terminology = terminologyEntry(prompt)
            if terminology:
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentationNode, segmentId,
                                                              volumeNode)
            if showSaliency and result.saliency:
                saliencyNodes.append(addSaliencyVolume(volumeNode, result.saliency[n], f"{segment.GetName()} saliency"))
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


# -- one segment on a volume's grid (refinement)

GRID_TOLERANCE = 1e-3  # voxels: how far a segment's grid may be from the volume's and still count as the same


def _matrix(getter) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    getter(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def segmentImageToWorld(segmentationNode, segmentId) -> np.ndarray:
    """The 4x4 voxel-to-RAS matrix of a segment's binary labelmap; for an empty segment (which has no voxels yet),
    the segmentation's reference geometry, on which its first voxels will be drawn."""
    from slicer import vtkOrientedImageData, vtkSegmentationConverter

    segmentation = segmentationNode.GetSegmentation()
    labelmapName = vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    labelmap = segmentation.GetSegment(segmentId).GetRepresentation(labelmapName)
    extent = labelmap.GetExtent() if labelmap is not None else (0, -1)
    if labelmap is not None and extent[1] >= extent[0]:
        return _matrix(labelmap.GetImageToWorldMatrix)
    geometry = segmentation.GetConversionParameter(vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    reference = vtkOrientedImageData()
    if not geometry or not vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference):
        return None
    return _matrix(reference.GetImageToWorldMatrix)


def segmentGridProblem(segmentationNode, segmentId, volumeNode):
    """Why the segment cannot be refined on ``volumeNode``'s grid, in words; None when it can: its voxels are the
    volume's (same spacing and directions, shifted by whole voxels: Slicer crops labelmaps to their content), it
    sits under the same transform, and its segmentation is a binary labelmap one."""
    from slicer import vtkSegmentationConverter

    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetSegment(segmentId) is None:
        return f"{segmentationNode.GetName()} has no segment {segmentId!r}"
    if segmentation.GetSourceRepresentationName() != vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        return (f"{segmentationNode.GetName()} is stored as {segmentation.GetSourceRepresentationName()}, not as a "
                "binary labelmap: convert it in the Segmentations module (Representations) first")
    if segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        return (f"{segmentationNode.GetName()} and {volumeNode.GetName()} are under different transforms: harden the "
                "transforms, or put both under the same one")
    segmentToWorld = segmentImageToWorld(segmentationNode, segmentId)
    volumeToWorld = _matrix(volumeNode.GetIJKToRASMatrix)
    if segmentToWorld is not None:
        segmentToVolume = np.linalg.inv(volumeToWorld) @ segmentToWorld
        offset = segmentToVolume[:3, 3]
        if (np.allclose(segmentToVolume[:3, :3], np.eye(3), atol=GRID_TOLERANCE)
                and np.allclose(offset, np.round(offset), atol=GRID_TOLERANCE)):
            return None
    name = segmentation.GetSegment(segmentId).GetName()
    spacing = "unknown" if segmentToWorld is None else " × ".join(
        f"{s:.3g}" for s in np.linalg.norm(segmentToWorld[:3, :3], axis=0))
    volumeSpacing = " × ".join(f"{s:.3g}" for s in np.linalg.norm(volumeToWorld[:3, :3], axis=0))
    return (f"the segment {name!r} lies on another voxel grid than {volumeNode.GetName()} (its voxels: {spacing} mm, "
            f"the volume's: {volumeSpacing} mm, or another position or orientation): it was drawn on another volume "
            "or another segmentation geometry. Refine it on that volume, or resample it onto this one first "
            "(Segment Editor: Specify geometry)")


def segmentMask(segmentationNode, segmentId, volumeNode) -> np.ndarray:
    """A copy of one segment as a (K, J, I) bool array on ``volumeNode``'s grid; `clisc.errors.InputError` with
    the reason (`segmentGridProblem`) when the segment lies on another grid."""
    from clisc.errors import InputError

    problem = segmentGridProblem(segmentationNode, segmentId, volumeNode)
    if problem:
        raise InputError(problem)
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0


def replaceSegmentSlices(segmentationNode, segmentId, volumeNode, axis: int, slices: dict) -> None:
    """Write ``slices`` (slice index -> 2D bool mask, along array axis ``axis`` of ``volumeNode``'s grid) into the
    segment, and tag it SEMIAUTOMATIC (for DICOM SEG); every other voxel of it, and every other segment, stays as
    it is now (the segment is read again here, so edits made meanwhile elsewhere in it are kept)."""
    if not slices:
        return
    current = segmentMask(segmentationNode, segmentId, volumeNode)
    for index, sliceMask in slices.items():
        np.moveaxis(current, axis, 0)[index] = sliceMask
    slicer.util.updateSegmentBinaryLabelmapFromArray(current.astype(np.uint8), segmentationNode, segmentId,
                                                      volumeNode)
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    segment.SetTag(ALGORITHM_TYPE_TAG, "SEMIAUTOMATIC")  # partly drawn by SAM now, whoever drew the rest
    if not segment.GetTag(ALGORITHM_NAME_TAG, vtk.reference("")):
        segment.SetTag(ALGORITHM_NAME_TAG, ALGORITHM_NAME)


def volumeRasFromWorld(volumeNode, worldRas) -> np.ndarray:
    """A world RAS position (mm: what markups' ``GetNthControlPointPositionWorld`` gives) in the volume's own RAS,
    the frame of its IJK→RAS (they differ when the volume is under a transform)."""
    worldToVolume = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volumeNode.GetParentTransformNode(), worldToVolume)
    return np.array(worldToVolume.TransformPoint([float(v) for v in worldRas]))


# -- export

def exportSegmentation(segmentationNode, path) -> None:
    """Write a Slicer segmentation file (.seg.nrrd): segments with names, colours, tags, terminology."""
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentationNode):
        raise RuntimeError(f"could not write {path}")


def exportLabelmap(segmentationNode, referenceVolumeNode, path) -> None:
    """Write the visible segments as one labelmap (.nii.gz, .nrrd) on the reference volume's grid: label n is the
    n-th segment (1-based; where segments overlap, the later one wins)."""
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


def slicerVersion() -> tuple:
    """(major, minor) of the running Slicer; (0, 0) outside it."""
    application = getattr(slicer, "app", None)
    if application is None:
        return (0, 0)
    return (int(application.majorVersion), int(application.minorVersion))


def dicomSegExporter():
    """(what it is, in words; the plugin class) of the DICOM SEG exporter this Slicer has: Slicer's core
    DICOMSegmentationPlugin (Slicer 5.12 and newer; it uses dcmqi from pip), else QuantitativeReporting's plugin of
    the same name (Slicer 5.10, with that extension and its DCMQI). RuntimeError saying what to install when
    neither is there. The plugin is looked up in Slicer's DICOM plugin registry, else imported."""
    plugins = getattr(getattr(slicer, "modules", None), "dicomPlugins", None) or {}
    pluginClass = plugins.get("DICOMSegmentationPlugin")
    if pluginClass is None:
        try:
            from DICOMSegmentationPlugin import DICOMSegmentationPluginClass as pluginClass
        except ImportError:
            pluginClass = None
    version = slicerVersion()
    if pluginClass is None:
        raise RuntimeError(
            "DICOM SEG export needs Slicer's DICOM segmentation plugin, which this Slicer does not have: it is built "
            "into Slicer 5.12 and newer; on Slicer 5.10 install the QuantitativeReporting extension (with DCMQI) "
            "from the Extensions Manager, restart Slicer and export again.")
    if version >= (5, 12):
        return "Slicer's core DICOMSegmentationPlugin", pluginClass
    return "QuantitativeReporting's DICOMSegmentationPlugin", pluginClass


def exportDicomSeg(segmentationNode, outputFolder) -> str:
    """Write a DICOM SEG file with this Slicer's DICOM SEG exporter (`dicomSegExporter`); returns which exporter
    wrote it. The segmentation must sit in the study of a volume loaded from DICOM (`addSegments` puts it there)."""
    which, pluginClass = dicomSegExporter()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    exporter = pluginClass()
    exportables = exporter.examineForExport(hierarchy.GetItemByDataNode(segmentationNode))
    if not exportables:
        raise RuntimeError("the segmentation cannot be exported as DICOM SEG: its reference volume must be "
                           "loaded from DICOM (DICOM module) and the segmentation must sit in its study")
    for exportable in exportables:
        exportable.directory = str(outputFolder)
    error = exporter.export(exportables)
    if error:
        raise RuntimeError(f"{which}: {error}")
    return which
