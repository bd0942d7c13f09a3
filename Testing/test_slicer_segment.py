"""The CLISCSegment Slicer module on real MRML (slicer-core), with stand-ins for Slicer's Qt side only.

The Logic runs the engine with tiny CLIP and SAM models of the real classes and random weights, so these tests
show the adapter's mechanics: the segments written into MRML hold, voxel for voxel, the masks the engine computes
for the same array (whatever the IJK→RAS), with the right names, colours, tags, terminology, hierarchy and
reference geometry; existing segments are kept; a cancelled run leaves the scene as it was. They cannot show that
the prompts find anything (that needs pretrained weights). The widget needs real Slicer; the module file's .ui
and CMake lists are checked as text in test_slicer_module_files.py, and the in-Slicer self-test runs here. What the
module takes from CLISCLib (the MRML adapter, package installation) is tested here through the module; the job
abstraction and the terminology table on their own in test_slicer_lib.py.
"""
from __future__ import annotations

import sys
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import oblique_ijk_to_ras, shared_data, slicer_module
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from clisc.errors import Cancelled
from clisc.models.catalogue import get_entry
from clisc.models.loaders import load_clip
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam
from clisc.progress import CancelToken
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.result import SegmentResult
from clisc.zeroshot import ZeroShotSegmenter, preset_options

ROOT = Path(__file__).resolve().parents[1]
# The same run for the module and for the engine: cheap saliency, every slice, CPU.
RUN = dict(preset="fast", device="cpu", saliency="gradcam", slices="all")


def synthetic_array(shape=(2, 96, 96)) -> np.ndarray:
    """A bright ellipsoid in noise, (K, J, I) float32 (the tiny random SAM draws nothing on 64-pixel slices)."""
    k, j, i = np.indices(shape)
    blob = (2 * (k - shape[0] // 2)) ** 2 + (j - 40) ** 2 + ((i - 50) / 1.5) ** 2 < 300
    return (blob * 100 + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def module():
    """The CLISCSegment module file, imported with the stand-ins, on a started MRML application."""
    return slicer_module("CLISCSegment")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = save_random_clip(tmp_path_factory.mktemp("clip") / "tiny", TINY_CLIP_CONFIG)
    return load_clip(folder), tiny_sam()


def add_volume(array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume"):
    import slicer

    return slicer.util.addVolumeFromArray(array, ijk_to_ras, name)


def segments(segmentationNode) -> list:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegment(n) for n in range(segmentation.GetNumberOfSegments())]


def tag(segment, name: str):
    """The value of a segment tag, None if the segment has no such tag."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def data_nodes(scene) -> list:
    import slicer

    return [node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLDisplayableNode", scene)]


def segment_masks(segmentationNode, volumeNode) -> list:
    """Each segment's binary labelmap on the grid of ``volumeNode``, (K, J, I) bool."""
    import slicer

    segmentation = segmentationNode.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    return [slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, i, volumeNode) > 0 for i in ids]


def engine_result(volume: Volume, prompts, models) -> SegmentResult:
    """The engine run directly, with the options the tests pass to the Logic."""
    options = preset_options(RUN["preset"], device=RUN["device"], saliency=RUN["saliency"], slices=RUN["slices"])
    return ZeroShotSegmenter(options, *models).segment(volume, prompts)


def check_matches_engine(module, array, ijk_to_ras, prompts, models):
    volumeNode = add_volume(array, ijk_to_ras)
    clip, sam = models
    segmentationNode = module.CLISCSegmentLogic().segment(volumeNode, prompts, clip=clip, sam=sam, **RUN)
    expected = engine_result(Volume(array, ijk_to_ras), prompts, models).masks
    for mask in expected:  # a mask that is empty or full would make the comparison say little
        assert 0 < mask.sum() < mask.size
    written = segment_masks(segmentationNode, volumeNode)
    assert len(written) == len(prompts)
    for mask, reference in zip(written, expected):
        assert mask.shape == array.shape
        assert np.array_equal(mask, reference)
    return volumeNode, segmentationNode


def test_module_file_imports_with_the_stand_ins(module):
    parent = SimpleNamespace()
    module.CLISCSegment(parent)
    assert parent.title == "CLISC Segment" and parent.categories == ["Segmentation"]
    for name in ("CLISCSegmentWidget", "CLISCSegmentLogic", "CLISCSegmentTest", "CLISCSegmentParameterNode"):
        assert hasattr(module, name)


@pytest.mark.parametrize("geometry, prompts", [("file", ["brain tumor", "edema"]), ("flipped", ["brain tumor"]),
                                               ("oblique", ["brain tumor"])])
def test_segments_match_the_engine_voxel_for_voxel_brats(module, scene, tiny_models, geometry, prompts):
    volume = read_volume(shared_data("brats2015/pat0001/flair.nii.gz"))
    array = np.ascontiguousarray(volume.array[70:72])  # two tumour slices
    ijk_to_ras = {"file": volume.ijk_to_ras, "flipped": volume.ijk_to_ras @ np.diag([-1.0, 1.0, -1.0, 1.0]),
                  "oblique": oblique_ijk_to_ras(flip=(-1, 1, 1))}[geometry]
    volumeNode, segmentationNode = check_matches_engine(module, array, ijk_to_ras, prompts, tiny_models)
    reference = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference is volumeNode


def test_segments_match_the_engine_on_an_oblique_flipped_synthetic_volume(module, scene, tiny_models):
    check_matches_engine(module, synthetic_array(), oblique_ijk_to_ras(flip=(1, -1, -1)), ["tumor"], tiny_models)


def test_names_colours_tags_terminology_hierarchy_and_saliency(module, mrml, scene, tiny_models):
    import slicer

    array, ijk_to_ras = synthetic_array(), oblique_ijk_to_ras()
    volumeNode = add_volume(array, ijk_to_ras)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    hierarchy.CreateItem(study, volumeNode)
    prompts = ["left lung", "brain tumor", "banana", "banana"]
    clip, sam = tiny_models
    segmentationNode = module.CLISCSegmentLogic().segment(volumeNode, prompts, clip=clip, sam=sam,
                                                          showSaliency=True, **RUN)

    found = segments(segmentationNode)  # the engine segments a prompt given twice once
    assert [s.GetName() for s in found] == ["left lung", "brain tumor", "banana"]
    assert [tag(s, mrml.PROMPT_TAG) for s in found] == prompts[:3]
    assert len({tuple(np.round(s.GetColor(), 3)) for s in found}) == 3
    terminology = [tag(s, slicer.vtkSegment.GetTerminologyEntryTagName()) for s in found]
    assert "SCT^39607008^Lung~SCT^7771000^Left" in terminology[0]
    assert "SCT^4147007^Mass" in terminology[1] and "SCT^12738006^Brain" in terminology[1]
    assert "123037004" not in terminology[2] and "49755003" not in terminology[2]  # Slicer's default entry
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentationNode)) == study

    assert segmentationNode.GetNumberOfNodeReferences(mrml.SALIENCY_REFERENCE) == len(found)
    saliency = [segmentationNode.GetNthNodeReference(mrml.SALIENCY_REFERENCE, n) for n in range(len(found))]
    expected = engine_result(Volume(array, ijk_to_ras), prompts, tiny_models).saliency
    for node, reference, segment in zip(saliency, expected, found):
        assert node.GetName() == f"{segment.GetName()} saliency"
        assert np.allclose(slicer.util.arrayFromVolume(node), reference)
        assert np.allclose(mrml.volumeFromNode(node).ijk_to_ras, ijk_to_ras)
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_adding_to_an_existing_segmentation_keeps_its_segments(module, mrml, scene, tiny_models):
    import slicer

    array = synthetic_array()
    volumeNode = add_volume(array, np.diag([0.8, 0.8, 3.0, 1.0]))
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    existing.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    manual = np.zeros(array.shape, np.uint8)
    manual[1, 10:20, 5:25] = 1  # a segment drawn by hand
    segmentId = existing.GetSegmentation().AddEmptySegment("", "tumor", (0.1, 0.2, 0.3))
    slicer.util.updateSegmentBinaryLabelmapFromArray(manual, existing, segmentId, volumeNode)

    clip, sam = tiny_models
    logic = module.CLISCSegmentLogic()
    returned = logic.segment(volumeNode, "tumor", clip=clip, sam=sam, segmentationNode=existing, **RUN)

    assert returned is existing
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1
    found = segments(existing)
    assert [s.GetName() for s in found] == ["tumor", "tumor 2"]
    assert np.allclose(found[0].GetColor(), (0.1, 0.2, 0.3))
    assert tag(found[0], mrml.PROMPT_TAG) is None  # the prompt tag is only on what CLISC made
    assert tag(found[1], mrml.PROMPT_TAG) == "tumor"
    masks = segment_masks(existing, volumeNode)
    assert np.array_equal(masks[0], manual > 0)
    expected = engine_result(Volume(array, np.diag([0.8, 0.8, 3.0, 1.0])), ["tumor"], tiny_models).masks
    assert np.array_equal(masks[1], expected[0])


def test_a_failed_write_removes_what_it_added(mrml, scene, monkeypatch):
    import slicer

    array = synthetic_array()
    volumeNode = add_volume(array, np.eye(4))
    masks = [array > 50, array > 60]
    result = SegmentResult(masks, ["a", "b"], [np.zeros(array.shape, np.float32)] * 2, {})
    existing = mrml.addSegments(volumeNode, SegmentResult(masks[:1], ["kept"], [], {}))
    write = slicer.util.updateSegmentBinaryLabelmapFromArray
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        write(*args, **kwargs)

    monkeypatch.setattr(slicer.util, "updateSegmentBinaryLabelmapFromArray", fail_second)
    nodes = data_nodes(scene)
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.addSegments(volumeNode, result, showSaliency=True)
    assert data_nodes(scene) == nodes  # the new segmentation and saliency volume are gone
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.addSegments(volumeNode, result, existing)
    assert [s.GetName() for s in segments(existing)] == ["kept"]


def test_segment_runs_the_engine_on_a_worker_thread_and_cancel_leaves_the_scene_as_it_was(module, jobs, mrml, scene,
                                                                                          tiny_models):
    array = synthetic_array()
    logic = module.CLISCSegmentLogic()
    clip, sam = tiny_models
    volumeNode = add_volume(array, np.eye(4))
    nodes = data_nodes(scene)
    job = logic.startSegmenting(volumeNode, ["tumor"], clip=clip, sam=sam, **RUN)  # the Segment button's path
    assert isinstance(job, jobs.ThreadJob)
    reports = []
    result = job.wait(120, progress=lambda stage, done, total, message="", **fields: reports.append(
        (stage, done, total, threading.current_thread() is threading.main_thread())))
    assert job.finished and job.error is None and result is job.result
    assert data_nodes(scene) == nodes  # the worker added nothing: the main thread writes the result
    assert np.array_equal(result.masks[0], engine_result(mrml.volumeFromNode(volumeNode), ["tumor"],
                                                         tiny_models).masks[0])
    # the fast preset seeds a tumour: the last stage is the propagation from its seeds
    assert job.progress.stage == "SAM propagation" and job.progress.done == job.progress.total > 0
    assert reports[-1][:3] == ("SAM propagation", job.progress.done, job.progress.total)
    assert {"saliency", "SAM"} <= {stage for stage, *_ in reports}
    assert all(onMainThread for *_, onMainThread in reports)  # progress reaches the caller on its own thread

    cancel = CancelToken()
    cancel.cancel()
    cancelled = logic.startSegmenting(volumeNode, ["tumor"], clip=clip, sam=sam, cancel=cancel, **RUN)
    with pytest.raises(Cancelled):
        cancelled.wait(120)
    assert cancelled.cancelled and isinstance(cancelled.error, Cancelled) and cancelled.result is None
    with pytest.raises(Cancelled):
        logic.segment(volumeNode, ["tumor"], clip=clip, sam=sam, cancel=cancel, **RUN)
    assert data_nodes(scene) == nodes


def test_models_by_path_are_loaded_once_and_missing_weights_are_named(module, dependencies, tmp_path, clisc_home):
    logic = module.CLISCSegmentLogic()
    first = save_random_clip(tmp_path / "a", TINY_CLIP_CONFIG)
    second = save_random_clip(tmp_path / "b", TINY_CLIP_CONFIG, seed=1)
    model = logic.loadModel("clip", first)
    assert logic.loadModel("clip", str(first)) is model
    assert logic.loadModel("clip", second) is not model
    assert logic.loadModel("sam", model) is model  # a loaded model passes through

    assert logic.missingModels() == ["biomedclip", "sam_vit_b"]
    assert logic.missingModels(clip="clip_vit_b16", sam=str(tmp_path)) == ["clip_vit_b16"]
    assert dependencies.missingPackages() == []


def test_prompt_splitting_and_terminology(module, terminology):
    terminologyEntry = terminology.terminologyEntry
    assert module.CLISCSegmentLogic.splitPrompts(" brain tumor ; ;edema;") == ["brain tumor", "edema"]
    assert terminologyEntry("Left lungs") == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^39607008^Lung~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")
    assert terminologyEntry("right kidney tumors") == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered "
        "Structure~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~SCT^64033007^Kidney~SCT^24028007^Right")
    assert "~SCT^12738006^Brain~^^~" in terminologyEntry("left brain")  # no laterality for the brain
    assert terminologyEntry("the thing on the left") is None


def test_exports_seg_nrrd_labelmap_and_explains_dicom_seg(mrml, scene, tmp_path):
    import slicer
    import slicerio

    array, ijk_to_ras = synthetic_array(), oblique_ijk_to_ras(flip=(1, 1, -1))
    volumeNode = add_volume(array, ijk_to_ras)
    masks = [array > 50, (array > 20) & (array < 60)]
    segmentationNode = mrml.addSegments(volumeNode, SegmentResult(masks, ["liver", "x"], [], {}))

    mrml.exportSegmentation(segmentationNode, tmp_path / "out.seg.nrrd")
    saved = slicerio.read_segmentation(str(tmp_path / "out.seg.nrrd"), skip_voxels=True)
    assert [s["name"] for s in saved["segments"]] == ["liver", "x"]
    assert saved["segments"][0]["tags"][mrml.PROMPT_TAG] == "liver"
    assert saved["segments"][0]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "out.seg.nrrd"))
    assert storage.ReadData(loaded)
    assert all(np.array_equal(a, b) for a, b in zip(segment_masks(loaded, volumeNode), masks))

    mrml.exportLabelmap(segmentationNode, volumeNode, tmp_path / "labels.nii.gz")
    labels = read_volume(tmp_path / "labels.nii.gz")
    assert np.allclose(labels.ijk_to_ras, ijk_to_ras, atol=1e-4)
    assert np.array_equal(labels.array == 1, masks[0] & ~masks[1])
    assert np.array_equal(labels.array == 2, masks[1])

    with pytest.raises(RuntimeError, match="QuantitativeReporting"):
        mrml.exportDicomSeg(segmentationNode, tmp_path)


def test_in_slicer_self_test_runs_on_headless_mrml(module, scene):
    module.CLISCSegmentTest().runTest()


# -- first use: Python packages (decided by installed versions; torch and torchvision are the PyTorch extension's)


def requirement_name(text: str) -> str:
    return canonicalize_name(Requirement(text).name)


def versions(dependencies, **changes) -> dict:
    """An installed-version table (canonical name -> version) satisfying every requirement, with ``changes``
    (None: not installed)."""
    table = {requirement_name(text): "999" for text in dependencies.REQUIREMENTS + dependencies.TORCH_REQUIREMENTS}
    table.update({canonicalize_name(name): version for name, version in changes.items()})
    return {name: version for name, version in table.items() if version is not None}


def test_requirements_are_pyprojects_dependencies_with_torch_apart(dependencies):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    torch = {"torch", "torchvision"}
    normal = {str(Requirement(text)) for text in pyproject}
    assert {str(Requirement(text)) for text in dependencies.REQUIREMENTS} == {
        text for text in normal if requirement_name(text) not in torch}
    assert {str(Requirement(text)) for text in dependencies.TORCH_REQUIREMENTS} == {
        text for text in normal if requirement_name(text) in torch}
    assert len(dependencies.REQUIREMENTS) + len(dependencies.TORCH_REQUIREMENTS) == len(pyproject)


def test_unmet_requirements_are_decided_by_installed_versions(dependencies, monkeypatch):
    assert dependencies.unmetRequirements(["monai>=1.3", "Pillow>=9", "open-clip-torch>=2.23", "tqdm"],
                                    {"monai": "1.2.0", "pillow": "10.4.0", "open-clip-torch": "2.24.0"}) == [
        "monai>=1.3", "tqdm"]  # too old, and missing; names compare canonically
    assert dependencies.unmetRequirements(["torch>=2.1"], {"torch": "2.13.0+cpu"}) == []  # a local build label is fine

    monai = next(text for text in dependencies.REQUIREMENTS if requirement_name(text) == "monai")
    monkeypatch.setattr(dependencies, "installedVersions", lambda: versions(dependencies, monai="0.1", torch=None))
    assert dependencies.missingPackages() == [monai]  # importable or not, an old release must be replaced
    assert dependencies.missingTorch() == [dependencies.TORCH_REQUIREMENTS[0]]  # torch is never pip's: it is not in REQUIREMENTS
    assert not {requirement_name(text) for text in dependencies.REQUIREMENTS} & {"torch", "torchvision"}
    assert dependencies.canonicalName("Open_CLIP.torch") == "open-clip-torch"
    assert all(name == dependencies.canonicalName(name) for name in dependencies.installedVersions())


def test_constraints_pin_the_installed_torch_torchvision_numpy_and_simpleitk(dependencies):
    installed = {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "numpy": "2.0.2", "simpleitk": "2.4.1", "tqdm": "4.6"}
    assert dependencies.pipConstraints(installed) == (
        "torch==2.13.0+cpu\ntorchvision==0.28.0\nnumpy==2.0.2\nSimpleITK==2.4.1\n")
    assert dependencies.pipConstraints({"numpy": "2.4.6"}) == "numpy==2.4.6\n"  # what is not installed is not pinned


def test_install_passes_only_missing_packages_to_pip_with_the_constraints(dependencies, monkeypatch):
    import slicer

    monai = next(text for text in dependencies.REQUIREMENTS if requirement_name(text) == "monai")
    tables = [versions(dependencies, monai=None, torch="2.13.0+cpu", torchvision="0.28.0", numpy="2.0.2")]
    monkeypatch.setattr(dependencies, "installedVersions", lambda: tables[-1])
    calls = []

    def pip_install(arguments):  # Slicer 5.10: slicer.util.pip_install, the constraints as pip's -c argument
        assert arguments[0] == "-c"
        calls.append((Path(arguments[1]).read_text(encoding="utf-8"), arguments[2:]))
        tables.append(versions(dependencies, monai="1.5.2", torch="2.13.0+cpu", torchvision="0.28.0", numpy="2.0.2"))

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    assert dependencies.installPackages() == []  # monai is new; nothing installed changed version
    constraints, requirements = calls[0]
    assert requirements == [monai]
    assert constraints.splitlines()[:3] == ["torch==2.13.0+cpu", "torchvision==0.28.0", "numpy==2.0.2"]
    assert dependencies.installPackages() == [] and len(calls) == 1  # nothing missing: pip is not run

    ensured = []  # Slicer 5.12: slicer.packaging.pip_ensure, which takes the constraints file itself
    tables.append(versions(dependencies, monai="0.1", numpy="2.0.2"))
    monkeypatch.setitem(sys.modules, "slicer.packaging", SimpleNamespace(pip_ensure=lambda requirements, **options: (
        ensured.append((requirements, Path(options["constraints"]).read_text(encoding="utf-8"), options)),
        tables.append(versions(dependencies, monai="1.5.2", numpy="2.0.2")))))
    assert dependencies.installPackages() == ["monai"]
    requirements, constraints, options = ensured[0]
    assert requirements == [monai] and "numpy==2.0.2\n" in constraints and len(calls) == 1
    assert options["requester"] == "CLISC" and not options["prompt_install"]


def test_torch_is_asked_of_the_pytorch_extension_never_pip(dependencies, monkeypatch):
    torch = Requirement(dependencies.TORCH_REQUIREMENTS[0])
    torchvision = Requirement(dependencies.TORCH_REQUIREMENTS[1])
    arguments = dependencies.torchInstallArguments(versions(dependencies, torch=None, torchvision=None))
    assert arguments["askConfirmation"] is True and arguments["torchVersionRequirement"] == str(torch.specifier)
    assert ("torchvisionVersionRequirement" in arguments) == bool(str(torchvision.specifier))
    kept = dependencies.torchInstallArguments(versions(dependencies, torch="2.13.0+cpu", torchvision=None))
    assert kept["torchVersionRequirement"] == "==2.13.0"  # the installed torch stays; torchvision comes paired
    with pytest.raises(RuntimeError, match="PyTorch Utils module"):
        dependencies.torchInstallArguments(versions(dependencies, torch="0.1"))

    asked = []
    monkeypatch.setattr(dependencies, "installedVersions", lambda: versions(dependencies, torch=None, torchvision=None))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=lambda: SimpleNamespace(
        installTorch=lambda **options: asked.append(options) or SimpleNamespace(__version__="2.13.0"))))
    assert dependencies.installTorch() and asked == [arguments]
    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=lambda: SimpleNamespace(
        installTorch=lambda **options: None)))  # the user declined
    assert not dependencies.installTorch()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        dependencies.installTorch()


def test_slicer_older_than_5_10_is_refused_with_a_message(module, dependencies, monkeypatch):
    import slicer

    assert dependencies.unsupportedSlicerMessage() is None
    monkeypatch.setattr(dependencies, "sys", SimpleNamespace(version_info=(3, 12, 10, "final", 0)))
    assert dependencies.unsupportedSlicerMessage() is None  # Slicer 5.10 and 5.12
    monkeypatch.setattr(dependencies, "sys", SimpleNamespace(version_info=(3, 9, 10, "final", 0)))
    monkeypatch.setattr(slicer, "app", SimpleNamespace(applicationVersion="5.8.1"), raising=False)
    assert dependencies.unsupportedSlicerMessage().startswith(
        "CLISC needs 3D Slicer 5.10 or newer (this is Slicer 5.8.1 with Python 3.9)")
    with pytest.raises(RuntimeError, match=r"CLISC needs 3D Slicer 5\.10 or newer"):
        module.CLISCSegmentLogic()


# -- the weights cache, shown in the Models section


def test_models_section_lists_the_cached_weights_with_sizes_and_removes_them(module, clisc_home):
    logic = module.CLISCSegmentLogic()
    assert logic.modelsFolder() == clisc_home / "models"
    assert logic.installedModels() == []
    entry = get_entry("sam_vit_b")
    folder = clisc_home / "models" / entry.name
    folder.mkdir(parents=True)
    (folder / entry.files[0].filename).write_bytes(b"\0" * 12345)
    partial = clisc_home / "models" / "sam_vit_l"
    partial.mkdir()
    (partial / (get_entry("sam_vit_l").files[0].filename + ".part")).write_bytes(b"\0" * 100)  # not installed yet
    assert logic.installedModels() == [(entry.name, folder, 12345)]
    logic.removeModel(entry.name)
    assert logic.installedModels() == [] and not folder.exists()
    assert [slicer_module("CLISCLib.weights").formatSize(size) for size in (375_042_000, 2_564_550_879, 12_345, 999)] == [
        "375 MB", "2.6 GB", "12 kB", "999 B"]
