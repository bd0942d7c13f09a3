"""The CLISCTrain Slicer module on real MRML (slicer-core): its Logic starts the real engine process.

The cohort: three synthetic volumes (a bright blob in a body, 12 × 40 × 40 voxels) with different IJK→RAS
(axis-aligned anisotropic, flipped, oblique). The engine process is the real ``python -m clisc``, given models of
the real architectures through its options: a tiny CLIP, a random LiteMedSAM checkpoint and a random slice
classifier biased towards "abnormal" (`conftest.save_abnormal_classifier`).

What this shows: the Logic starts the engine in a separate process (a `CLISCLib.jobs.ProcessJob`), reads its
JSON-lines progress, gets its summary or its error message; a pseudo-label-only run resumes into training; Cancel
ends the process group and leaves only whole files, and the run resumes to the end; results load as segmentation
nodes that hold, voxel for voxel, what the engine wrote or computes (on a worker thread, a `ThreadJob`), on the
case volumes, whatever their IJK→RAS; CLISCSegment segments with a trained run. What it cannot show: the quality of the masks (random weights) and the Qt widget (real
Slicer only: its .ui is checked in test_slicer_module_files.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import save_abnormal_classifier, slicer_module

from clisc.cohort.apply import apply_run
from clisc.cohort.run_folder import RunFolder
from clisc.errors import Cancelled
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.writers import write_volume

PROMPT = "brain tumor"
CASES = ("axial", "flipped", "oblique")
OPTIONS = dict(clip_threshold=0.5, classifier_epochs=1, classifier_image_size=32,
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
    save_random_sam(root / "sam.pth", "litemedsam")
    save_abnormal_classifier(root / "classifier.pt")
    return root


def logic_for_tests(module):
    return module.CLISCTrainLogic()


def run_options(cohort, **changes) -> dict:
    return dict(OPTIONS, clip=str(cohort / "clip"), sam=str(cohort / "sam.pth"),
                classifier_weights=str(cohort / "classifier.pt"), **changes)


def wait_for(jobs, process, condition, timeout: float = 600):
    """Poll ``process`` until a progress report satisfies ``condition``; that report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for update in process.poll():
            if isinstance(update, jobs.Progress) and condition(update):
                return update
        if process.finished:
            pytest.fail(f"the engine ended first (exit {process.returncode}): {process.errorMessage()}")
        time.sleep(0.05)
    pytest.fail("no such progress report in time")


@pytest.fixture(scope="module")
def finished_run(module, jobs, cohort, tmp_path_factory):
    """A run started without waiting, then waited for: (run folder, process, summary)."""
    run_dir = tmp_path_factory.mktemp("train_runs") / "run"
    logic = logic_for_tests(module)
    process = logic.run(cohort / "images", PROMPT, run_dir, **run_options(cohort))
    assert isinstance(process, jobs.ProcessJob) and not process.finished
    summary = logic.wait(process)
    return run_dir, process, summary


def test_module_file_imports_with_the_stand_ins(module):
    parent = SimpleNamespace()
    module.CLISCTrain(parent)
    assert parent.title == "CLISC Train" and parent.dependencies == []  # CLISCLib is shared, not CLISCSegment
    for name in ("CLISCTrainWidget", "CLISCTrainLogic", "CLISCTrainParameterNode", "CLISCTrainTest"):
        assert hasattr(module, name)


def test_the_engine_runs_in_its_own_process_and_reports_json_progress(jobs, finished_run, cohort):
    run_dir, process, summary = finished_run
    assert process.finished and process.error is None and process.result == summary
    assert process.returncode == 0 and process.process.pid != os.getpid()
    assert process.command[:3] == [sys.executable, "-m", "clisc"] and "--json-progress" in process.command
    assert summary["cases"] == 3 and summary["loaded"] == 3 and not summary["skipped"]
    assert summary["model"] == str(RunFolder(run_dir).final_model) and Path(summary["model"]).is_file()
    stages = [event["stage"] for event in process.events]
    for stage in ("load", "slice_labels", "classifier", "cams", "pseudo_labels", "unet_round0", "unet_round1"):
        assert stage in stages
    assert stages[-1] == "finished"
    unet = [event for event in process.events if event["stage"] == "unet_round0"]
    assert [event["epoch"] for event in unet] == [1, 2, 3] and all(event["loss"] > 0 for event in unet)
    assert process.progress.stage == stages[-2]  # the last report before the summary
    assert isinstance(process.progress, jobs.Progress)
    assert any("step pseudo_labels finished" in line for line in process.log)  # the engine's log, from stderr
    config = RunFolder(run_dir).config()
    assert config["options"]["unet_epochs"] == 3
    assert config["options"]["classifier_weights"] == str(cohort / "classifier.pt")


@pytest.mark.parametrize("case", CASES)
def test_pseudo_labels_load_over_their_volumes_voxel_for_voxel(module, mrml, scene, finished_run, cohort, case):
    import slicer

    run_dir, _, _ = finished_run
    logic = logic_for_tests(module)
    assert logic.caseIds(run_dir) == sorted(CASES)
    volumeNode, segmentationNode = logic.loadCase(run_dir, case, "pseudo_label")

    written = read_volume(RunFolder(run_dir).pseudo_label(case)).array > 0
    source = read_volume(cohort / "images" / f"{case}.nii.gz")
    assert np.array_equal(slicer.util.arrayFromVolume(volumeNode), source.array)
    np.testing.assert_allclose(mrml.volumeFromNode(volumeNode).ijk_to_ras, GEOMETRIES[case], atol=1e-5)
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
    assert any(read_volume(RunFolder(run_dir).pseudo_label(case)).array.any() for case in CASES)


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


def test_stop_after_pseudo_labels_then_cancel_then_resume_to_the_end(module, jobs, cohort, tmp_path):
    run_dir = tmp_path / "run"
    logic = logic_for_tests(module)
    summary = logic.run(cohort / "images", PROMPT, run_dir, wait=True,
                        **run_options(cohort, unet_epochs=40, stop_after="pseudo_labels"))
    assert summary["model"] is None and all(RunFolder(run_dir).pseudo_label(case).is_file() for case in CASES)
    assert not RunFolder(run_dir).is_done("unet_round0")

    process = logic.run(cohort / "images", PROMPT, run_dir, resume=True, **run_options(cohort, unet_epochs=40))
    wait_for(jobs, process, lambda report: report.stage == "unet_round0" and report.fields["epoch"] >= 2)
    process.cancel()
    assert process.returncode == -signal.SIGTERM and process.cancelled
    with pytest.raises(Cancelled):
        process.wait(60)
    assert process.result is None
    assert _live_group_members(process.process.pid) == []  # nothing of its process group is left running
    assert "pseudo_labels" not in [event["stage"] for event in process.events]  # resumed, not redone
    assert not RunFolder(run_dir).final_model.exists()
    assert whole_files_only(run_dir) == []

    resumed = logic.run(cohort / "images", PROMPT, run_dir, resume=True, **run_options(cohort, unet_epochs=40))
    summary = logic.wait(resumed)
    assert summary["model"] == str(RunFolder(run_dir).final_model)
    first_epoch = next(event["epoch"] for event in resumed.events if event["stage"] == "unet_round0")
    assert first_epoch > 2  # continued from the epoch checkpoint
    assert whole_files_only(run_dir) == [] and not list(run_dir.rglob(".*partial*"))


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX; Windows uses taskkill /T")
def test_cancel_ends_children_of_the_engine_too(jobs, tmp_path):
    marker = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(300)']); open({str(marker)!r}, 'w').write(str(child.pid)); print('{{}}', flush=True); "
            "time.sleep(300)")
    process = jobs.ProcessJob([sys.executable, "-c", code])
    process.start()
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


def _live_group_members(group: int) -> list:
    """The processes of process group ``group`` that are not zombies (the engine's DataLoader workers are members;
    killed, they wait as zombies until init reaps them)."""
    if not Path("/proc").is_dir():  # no /proc (macOS): any member, zombies included
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        return [group]
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, process_group = stat.read_text().split(")")[-1].split()[:3]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(process_group) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


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


def test_the_default_engine_command_starts_the_clisc_package(module, jobs):
    logic = module.CLISCTrainLogic()
    assert logic.engineCommand[1:] == ["-m", "clisc"]
    process = jobs.ProcessJob(logic.engineCommand + ["--version"], jobs.engineEnvironment())
    process.start()
    assert process.wait(120) is None  # no summary: it is not a run
    assert process.returncode == 0 and process.log[-1].startswith("clisc ")


def test_in_slicer_self_test_runs_on_headless_mrml(module, scene):
    module.CLISCTrainTest().runTest()


def test_a_computed_prediction_reports_progress_and_can_be_cancelled(module, jobs, scene, finished_run):
    import slicer

    from clisc.progress import CancelToken

    run_dir, _, _ = finished_run
    logic = logic_for_tests(module)
    reports = []
    logic.loadCase(run_dir, "axial", "prediction", device="cpu",
                   progress=lambda stage, done, total, message="", **fields: reports.append(
                       (stage, done, total, threading.current_thread() is threading.main_thread())))
    assert reports[0][:2] == ("apply", 0) and reports[-1][1] == reports[-1][2] > 0
    assert all(onMainThread for *_, onMainThread in reports)  # the U-Net ran on the job's worker thread
    job = logic.startLoadingCase(run_dir, "oblique", "prediction", device="cpu")  # the GUI's path
    assert isinstance(job, jobs.ThreadJob)
    volumeNode, segmentationNode = job.wait(120)
    assert segmentationNode.GetName() == "oblique prediction"
    applying = logic.startApplying(run_dir, volumeNode, device="cpu")
    assert isinstance(applying, jobs.ThreadJob)
    assert applying.wait(120).GetSegmentation().GetNthSegment(0).GetName() == PROMPT

    cancel = CancelToken()
    cancel.cancel()
    segmentations = len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))
    volumes = len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
    with pytest.raises(Cancelled):
        logic.loadCase(run_dir, "flipped", "prediction", device="cpu", cancel=cancel)
    with pytest.raises(Cancelled):
        logic.apply(run_dir, volumeNode, device="cpu", cancel=cancel)
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == segmentations
    assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == volumes  # a cancelled load adds nothing


def test_slicer_older_than_5_10_is_refused_with_a_message(module, dependencies, monkeypatch):
    assert module.requireSupportedSlicer is dependencies.requireSupportedSlicer  # the one check both modules use
    monkeypatch.setattr(dependencies, "sys", SimpleNamespace(version_info=(3, 9, 10, "final", 0)))
    with pytest.raises(RuntimeError, match=r"CLISC needs 3D Slicer 5\.10 or newer \(this is Slicer .* Python 3\.9\)"):
        module.CLISCTrainLogic()
