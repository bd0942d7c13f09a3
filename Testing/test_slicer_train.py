"""The CLISCTrain Slicer module on real MRML (slicer-core): its Logic starts the real engine process.

The cohort: three synthetic volumes (a bright blob in a body, 12 × 40 × 40 voxels) with different IJK→RAS
(axis-aligned anisotropic, flipped, oblique). The engine process is `Testing/tiny_engine.py`: the real ``clisc``
command line with a tiny CLIP and SAM of the real classes and a classifier that calls every slice abnormal.

What this shows: the Logic starts the engine in a separate process, reads its JSON-lines progress, gets its
summary or its error message; a pseudo-label-only run resumes into training; Cancel ends the process group and
leaves only whole files, and the run resumes to the end; results load as segmentation nodes that hold, voxel for
voxel, what the engine wrote or computes, on the case volumes, whatever their IJK→RAS; CLISCSegment segments
with a trained run. What it cannot show: the quality of the masks (random weights) and the Qt widget (real
Slicer only: its .ui is checked in test_slicer_module_files.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import slicer_module

from clisc.cohort.run import apply_run
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.writers import write_volume

TINY_ENGINE = Path(__file__).resolve().parent / "tiny_engine.py"
PROMPT = "brain tumor"
CASES = ("axial", "flipped", "oblique")
OPTIONS = dict(clip_threshold=0.5, classifier_weights=None, classifier_epochs=1, classifier_image_size=32,
               classifier_batch_size=64, unet_epochs=3, patch_size=32, batch_size=2, s3f_rounds=1, s3f_keep=0.67,
               device="cpu", seed=0)


def oblique(degrees: float, spacing, flip=(1, 1, 1)) -> np.ndarray:
    a = np.radians(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(np.multiply(spacing, flip))
    matrix[:3, 3] = (-30.0, 12.5, 40.0)
    return matrix


GEOMETRIES = {"axial": oblique(0, (1.5, 1.5, 3.0)), "flipped": oblique(0, (1.2, 1.2, 2.5), flip=(-1, 1, -1)),
              "oblique": oblique(25, (1.0, 1.3, 2.0), flip=(1, -1, 1))}


def synthetic_case(seed: int) -> np.ndarray:
    """(12, 40, 40) float32: a body (value ~50) holding a bright blob (~150), background exactly 0."""
    k, j, i = np.indices((12, 40, 40))
    body = ((k - 6) / 7) ** 2 + ((j - 20) / 17) ** 2 + ((i - 20) / 16) ** 2 < 1
    blob = ((k - 6) / 3) ** 2 + ((j - 16 - seed) / 5) ** 2 + ((i - 22) / 6) ** 2 < 1
    noise = np.random.default_rng(seed).normal(0, 4, body.shape)
    return np.where(body, 50 + 100 * blob + noise, 0).astype(np.float32)


@pytest.fixture(scope="module")
def module():
    return slicer_module("CLISCTrain")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cohort")
    (root / "images").mkdir()
    for seed, name in enumerate(CASES):
        write_volume(root / "images" / f"{name}.nii.gz", Volume(synthetic_case(seed), GEOMETRIES[name]))
    save_random_clip(root / "clip", TINY_CLIP_CONFIG, seed=0)
    (root / "sam.pth").write_bytes(b"")  # a path for --sam; tiny_engine.py loads its tiny SAM instead
    return root


def logic_for_tests(module):
    logic = module.CLISCTrainLogic()
    logic.engineCommand = [sys.executable, str(TINY_ENGINE)]
    return logic


def run_options(cohort, **changes) -> dict:
    return dict(OPTIONS, clip=str(cohort / "clip"), sam=str(cohort / "sam.pth"), **changes)


def wait_for(process, condition, timeout: float = 600):
    """Poll ``process`` until an event satisfies ``condition``; that event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for kind, value in process.poll():
            if kind == "event" and condition(value):
                return value
        if process.finished:
            pytest.fail(f"the engine ended first (exit {process.returncode}): {process.errorMessage()}")
        time.sleep(0.05)
    pytest.fail("no such progress event in time")


@pytest.fixture(scope="module")
def finished_run(module, cohort, tmp_path_factory):
    """A run started without waiting, then waited for: (run folder, process, summary)."""
    run_dir = tmp_path_factory.mktemp("train_runs") / "run"
    logic = logic_for_tests(module)
    process = logic.run(cohort / "images", PROMPT, run_dir, **run_options(cohort))
    assert isinstance(process, module.EngineProcess)
    summary = logic.wait(process)
    return run_dir, process, summary


def test_module_file_imports_with_the_stand_ins(module):
    parent = SimpleNamespace()
    module.CLISCTrain(parent)
    assert parent.title == "CLISC Train" and parent.dependencies == ["CLISCSegment"]
    for name in ("CLISCTrainWidget", "CLISCTrainLogic", "CLISCTrainParameterNode", "EngineProcess"):
        assert hasattr(module, name)


def test_the_engine_runs_in_its_own_process_and_reports_json_progress(finished_run, cohort):
    run_dir, process, summary = finished_run
    assert process.returncode == 0 and process.process.pid != os.getpid()
    assert process.command[:2] == [sys.executable, str(TINY_ENGINE)] and "--json-progress" in process.command
    assert summary["cases"] == 3 and summary["loaded"] == 3 and not summary["skipped"]
    assert summary["model"] == str(run_dir / "unet" / "final.pt") and Path(summary["model"]).is_file()
    stages = [event["stage"] for event in process.events]
    for stage in ("load", "slice_labels", "classifier", "cams", "pseudo_labels", "unet_round0", "unet_round1"):
        assert stage in stages
    assert stages[-1] == "finished"
    unet = [event for event in process.events if event["stage"] == "unet_round0"]
    assert [event["epoch"] for event in unet] == [1, 2, 3] and all(event["loss"] > 0 for event in unet)
    assert any("step pseudo_labels finished" in line for line in process.log)  # the engine's log, from stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["unet_epochs"] == 3 and config["options"]["classifier_weights"] is None


@pytest.mark.parametrize("case", CASES)
def test_pseudo_labels_load_over_their_volumes_voxel_for_voxel(module, scene, finished_run, cohort, case):
    import slicer

    run_dir, _, _ = finished_run
    logic = logic_for_tests(module)
    assert logic.caseIds(run_dir) == sorted(CASES)
    volumeNode, segmentationNode = logic.loadCase(run_dir, case, "pseudo_label")

    written = read_volume(run_dir / "pseudo_labels" / f"{case}.nii.gz").array > 0
    source = read_volume(cohort / "images" / f"{case}.nii.gz")
    assert np.array_equal(slicer.util.arrayFromVolume(volumeNode), source.array)
    np.testing.assert_allclose(module.CLISCSegmentLogic.volumeFromNode(volumeNode).ijk_to_ras, GEOMETRIES[case],
                               atol=1e-5)
    segmentation = segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == PROMPT
    loaded = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetNthSegmentID(0),
                                                        volumeNode) > 0
    assert np.array_equal(loaded, written)
    assert segmentationNode.GetName() == f"{case} pseudo-label"
    again, _ = logic.loadCase(run_dir, case, "pseudo_label")
    assert again is volumeNode  # the case volume is loaded once


def test_some_pseudo_label_is_not_empty(finished_run):
    """Otherwise the voxel-for-voxel comparisons above would compare empty masks."""
    run_dir, _, _ = finished_run
    assert any(read_volume(run_dir / "pseudo_labels" / f"{case}.nii.gz").array.any() for case in CASES)


def test_predictions_and_apply_hold_what_the_engine_computes(module, scene, finished_run, cohort):
    import slicer

    run_dir, _, _ = finished_run
    logic = logic_for_tests(module)
    for case in CASES:
        expected = apply_run(run_dir, read_volume(cohort / "images" / f"{case}.nii.gz"), "cpu").masks[0]
        assert 0 < expected.sum() < expected.size  # else the comparisons below would say little
        volumeNode, segmentationNode = logic.loadCase(run_dir, case, "prediction", device="cpu")
        segmentation = segmentationNode.GetSegmentation()
        predicted = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetNthSegmentID(0),
                                                               volumeNode) > 0
        assert np.array_equal(predicted, expected)

        applied = logic.apply(run_dir, volumeNode, device="cpu")
        segmentation = applied.GetSegmentation()
        assert segmentation.GetNthSegment(0).GetName() == PROMPT
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(
            applied, segmentation.GetNthSegmentID(0), volumeNode) > 0, expected)

    segmentModule = slicer_module("CLISCSegment")
    fromSegment = segmentModule.CLISCSegmentLogic().segment(volumeNode, None, device="cpu", trainedRun=run_dir)
    segmentation = fromSegment.GetSegmentation()
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(
        fromSegment, segmentation.GetNthSegmentID(0), volumeNode) > 0, expected)


def whole_files_only(run_dir: Path) -> list:
    """Read every file of a run folder under its final name; the names of those that do not read whole."""
    broken = []
    for path in run_dir.rglob("*"):
        if not path.is_file() or path.name.startswith(".") or path.suffix in (".log", ".png"):
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".npz":
                dict(np.load(path))
            elif path.name.endswith(".nii.gz"):
                read_volume(path)
            elif path.suffix == ".pt":
                torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - any failure to read counts
            broken.append(str(path))
    return broken


def test_stop_after_pseudo_labels_then_cancel_then_resume_to_the_end(module, cohort, tmp_path):
    run_dir = tmp_path / "run"
    logic = logic_for_tests(module)
    summary = logic.run(cohort / "images", PROMPT, run_dir, wait=True,
                        **run_options(cohort, unet_epochs=40, stop_after="pseudo_labels"))
    assert summary["model"] is None and len(list((run_dir / "pseudo_labels").glob("*.nii.gz"))) == 3
    assert not (run_dir / "done" / "unet_round0").exists()

    process = logic.run(cohort / "images", PROMPT, run_dir, resume=True, **run_options(cohort, unet_epochs=40))
    wait_for(process, lambda event: event["stage"] == "unet_round0" and event["epoch"] >= 2)
    process.cancel()
    assert process.returncode == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.killpg(process.process.pid, 0)  # nothing of its process group is left
    assert "pseudo_labels" not in [event["stage"] for event in process.events]  # resumed, not redone
    assert not (run_dir / "unet" / "final.pt").exists()
    assert whole_files_only(run_dir) == []

    resumed = logic.run(cohort / "images", PROMPT, run_dir, resume=True, **run_options(cohort, unet_epochs=40))
    summary = logic.wait(resumed)
    assert summary["model"] == str(run_dir / "unet" / "final.pt")
    first_epoch = next(event["epoch"] for event in resumed.events if event["stage"] == "unet_round0")
    assert first_epoch > 2  # continued from the epoch checkpoint
    assert whole_files_only(run_dir) == [] and not list(run_dir.rglob(".*partial*"))


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX; Windows uses taskkill /T")
def test_cancel_ends_children_of_the_engine_too(module, tmp_path):
    marker = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(300)']); open({str(marker)!r}, 'w').write(str(child.pid)); print('{{}}', flush=True); "
            "time.sleep(300)")
    process = module.EngineProcess([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(marker.read_text())
    process.cancel()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the engine's child outlived Cancel"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed child of a killed parent is reaped by init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_engine_errors_reach_the_caller(module, cohort, tmp_path):
    logic = logic_for_tests(module)
    with pytest.raises(RuntimeError, match="no such cohort folder or list"):
        logic.run(tmp_path / "nowhere", PROMPT, tmp_path / "run", wait=True, **run_options(cohort))
    with pytest.raises(ValueError, match="unknown option.*unet_epoch"):
        logic.run(cohort / "images", PROMPT, tmp_path / "run", unet_epoch=3)
    with pytest.raises(RuntimeError, match="--prompt is empty"):
        logic.run(cohort / "images", "  ", tmp_path / "run", wait=True, **run_options(cohort))


def test_cohort_from_scene_volumes_is_written_with_its_geometry(module, scene, tmp_path):
    import slicer

    arrays = [synthetic_case(0), synthetic_case(1)]
    nodes = [slicer.util.addVolumeFromArray(array, GEOMETRIES["oblique"], "T2 / axial") for array in arrays]
    folder = module.CLISCTrainLogic.writeCohort(nodes, tmp_path / "cohort")
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["T2_axial.nii.gz", "T2_axial_2.nii.gz"]
    for path, array in zip(files, arrays):
        volume = read_volume(path)
        assert np.array_equal(volume.array, array)
        np.testing.assert_allclose(volume.ijk_to_ras, GEOMETRIES["oblique"], atol=1e-5)
    with pytest.raises(ValueError, match="no volume"):
        module.CLISCTrainLogic.writeCohort([], tmp_path / "empty")


def test_the_default_engine_command_starts_the_clisc_package(module):
    logic = module.CLISCTrainLogic()
    assert logic.engineCommand[1:] == ["-m", "clisc"]
    process = module.EngineProcess(logic.engineCommand + ["--version"], module.engineEnvironment())
    process.process.wait(120)
    while not process.finished:
        time.sleep(0.05)
    process.poll()
    assert process.returncode == 0 and process.log[-1].startswith("clisc ")


def test_in_slicer_self_test_runs_on_headless_mrml(module, scene):
    module.CLISCTrainTest().runTest()


def test_a_computed_prediction_reports_progress_and_can_be_cancelled(module, scene, finished_run):
    import slicer

    from clisc.errors import Cancelled
    from clisc.progress import CancelToken

    run_dir, _, _ = finished_run
    logic = logic_for_tests(module)
    reports = []
    logic.loadCase(run_dir, "axial", "prediction", device="cpu",
                   progress=lambda stage, done, total, message="": reports.append((stage, done, total)))
    assert reports[0][:2] == ("apply", 0) and reports[-1][1] == reports[-1][2] > 0

    cancel = CancelToken()
    cancel.cancel()
    segmentations = len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))
    with pytest.raises(Cancelled):
        logic.loadCase(run_dir, "flipped", "prediction", device="cpu", cancel=cancel)
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == segmentations


def test_slicer_older_than_5_10_is_refused_with_a_message(module, monkeypatch):
    segment = sys.modules["CLISCSegment"]  # CLISCTrain uses CLISCSegment's check
    assert module.unsupportedSlicerMessage is segment.unsupportedSlicerMessage
    monkeypatch.setattr(segment, "sys", SimpleNamespace(version_info=(3, 9, 10, "final", 0)))
    with pytest.raises(RuntimeError, match=r"CLISC needs 3D Slicer 5\.10 or newer \(this is Slicer .* Python 3\.9\)"):
        module.CLISCTrainLogic()
