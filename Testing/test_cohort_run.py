"""`clisc train` / `clisc apply` end to end on three downsampled BraTS FLAIR volumes, with random weights.

The cohort: three BraTS 2015 FLAIR volumes cut to the 40 axial slices around the tumours and downsampled
(6 × 6 in-plane, 4 axially: 10 × 40 × 40 voxels of 6 × 6 × 4 mm), an unreadable file and an all-zero volume.
Models: a tiny open_clip CLIP of the real classes, saved and loaded through the real loader; a small SAM of
the real `segment_anything` classes (256-pixel input) in place of `load_sam`; a random ResNet-50.

What random weights can show: every stage runs on real arrays, writes its outputs where the run directory
says, aligned with the inputs; a killed run resumes to the very same results; bad cases are skipped and
reported; evaluation reads the labels. What they cannot show: accuracy. A random classifier calls no slice
abnormal, which would leave CAMs, AMDA and SAM with nothing to do, so `classify` is replaced by one that
calls every slice abnormal (LayerCAM, AMDA, thresholds and SAM then run for real).
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from conftest import shared_data
from tiny_engine import every_slice_abnormal

from clisc.cli import main
from clisc.cohort import classifier
from clisc.cohort.cases import body_mask
from clisc.cohort.run import CohortOptions, run_cohort
from clisc.errors import Cancelled, InputError
from clisc.models import loaders
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam
from clisc.progress import CancelToken
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.writers import write_volume

CASES = ("pat0001", "pat0002", "pat0003")
OPTIONS = dict(clip_threshold=0.5, classifier_weights=None, classifier_epochs=1, classifier_image_size=32,
               classifier_batch_size=64, unet_epochs=2, patch_size=32, batch_size=2, s3f_rounds=1, s3f_keep=0.67,
               device="cpu", seed=0)
CLI_OPTIONS = ["--clip-threshold", "0.5", "--classifier-weights", "none", "--classifier-epochs", "1",
               "--classifier-image-size", "32", "--classifier-batch-size", "64", "--unet-epochs", "2",
               "--patch-size", "32", "--batch-size", "2", "--s3f-rounds", "1", "--s3f-keep", "0.67",
               "--device", "cpu", "--seed", "0"]
STEPS_BEFORE_UNET = ("slice_labels", "classifier", "cams", "classifier_amda", "cams_amda", "pseudo_labels")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    brats = shared_data("brats2015")
    root = tmp_path_factory.mktemp("cohort")
    for folder in ("images", "labels"):
        (root / folder).mkdir()
    for case in CASES:
        for name, folder in (("flair", "images"), ("label", "labels")):
            volume = read_volume(brats / case / f"{name}.nii.gz")
            ijk_to_ras = volume.ijk_to_ras.copy()
            ijk_to_ras[:3, :3] = volume.ijk_to_ras[:3, :3] @ np.diag([6, 6, 4])
            ijk_to_ras[:3, 3] = volume.ijk_to_ras[:3] @ [0, 0, 52, 1]
            write_volume(root / folder / f"{case}.nii.gz",
                         Volume(np.ascontiguousarray(volume.array[52:92:4, ::6, ::6]), ijk_to_ras))
    (root / "images" / "broken.nii.gz").write_bytes(b"not an image")
    write_volume(root / "images" / "zeros.nii.gz", Volume(np.zeros((5, 8, 8), np.float32), np.eye(4)))
    (root / "labels.csv").write_text("case_id,label\n" + "".join(f"{c},labels/{c}.nii.gz\n" for c in CASES))
    save_random_clip(root / "clip", TINY_CLIP_CONFIG, seed=0)
    (root / "sam.pth").write_bytes(b"")  # a path for --sam; load_sam is replaced by tiny_sam(image_size=256)
    return root


@pytest.fixture(scope="module")
def patched():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classifier, "classify", every_slice_abnormal)
        patch.setattr(loaders, "load_sam", lambda spec, device="cpu": tiny_sam(image_size=256))
        yield


@pytest.fixture(scope="module")
def cli_run(cohort, patched, tmp_path_factory):
    """`clisc train ... --json-progress`, uninterrupted: (run dir, exit code, stdout lines)."""
    run_dir = tmp_path_factory.mktemp("runs") / "cli"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", str(cohort / "images"), "--prompt", "brain tumor", "--out", str(run_dir),
                     "--clip", str(cohort / "clip"), "--sam", str(cohort / "sam.pth"),
                     "--labels", str(cohort / "labels.csv"), "--json-progress", *CLI_OPTIONS])
    return run_dir, code, stdout.getvalue().splitlines()


def test_train_writes_every_stage_output(cli_run, cohort):
    run_dir, code, _ = cli_run
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["unet_epochs"] == 2 and config["options"]["labels"] == str(cohort / "labels.csv")
    assert config["labels_used_for_training"] is False
    assert config["normal_prompt"].startswith("an image of brain tissue")
    for case in CASES:
        volume = read_volume(cohort / "images" / f"{case}.nii.gz")
        labels = json.loads((run_dir / "slice_labels" / f"{case}.json").read_text())
        assert len(labels) == volume.array.shape[0] and set(labels) <= {-1, 0, 1}
        for folder in ("cams", "cams_amda"):
            cams = np.load(run_dir / folder / f"{case}.npz")
            assert cams["cam"].shape == cams["mask"].shape and cams["mask"].any()
        pseudo = read_volume(run_dir / "pseudo_labels" / f"{case}.nii.gz")
        assert pseudo.array.shape == volume.array.shape
        np.testing.assert_allclose(pseudo.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
        outside_crop = np.ones(volume.array.shape, bool)
        outside_crop[tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(body_mask(volume.array)))] = False
        assert outside_crop.any()
        assert not pseudo.array[outside_crop].any()
    assert any(read_volume(run_dir / "pseudo_labels" / f"{c}.nii.gz").array.any() for c in CASES)
    for round_ in (0, 1):
        assert torch.load(run_dir / "unet" / f"round{round_}" / "last.pt", weights_only=True)["epoch"] == 2
    assert (run_dir / "unet" / "final.pt").is_file()
    table = (run_dir / "s3f" / "round1.csv").read_text().splitlines()
    assert table[0] == "rank,case_id,similarity,kept" and len(table) == 4
    similarities = [float(line.split(",")[2]) for line in table[1:]]
    assert similarities == sorted(similarities, reverse=True)
    assert [line.split(",")[3] for line in table[1:]] == ["1", "1", "0"]  # 0.67 × 3 cases -> 2 kept
    losses = json.loads((run_dir / "losses.json").read_text())
    assert set(losses) == {"classifier/classifier", "classifier/classifier_amda", "unet/round0", "unet/round1"}
    pytest.importorskip("matplotlib")
    assert (run_dir / "loss_curves.png").stat().st_size > 0


def test_bad_cases_are_reported_and_skipped(cli_run):
    run_dir, _, _ = cli_run
    skipped = {path.stem: json.loads(path.read_text()) for path in (run_dir / "skipped").glob("*.json")}
    assert set(skipped) == {"broken", "zeros"}
    assert "not a readable image" in skipped["broken"]["reason"] and "nothing to segment" in skipped["zeros"]["reason"]
    assert "case broken skipped at load" in (run_dir / "run.log").read_text()


def test_evaluation_reports_dice_and_hd95_per_case(cli_run):
    run_dir, _, _ = cli_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "diagonal" in metrics["empty_case_rule"]
    assert set(metrics["cases"]) == set(CASES)
    assert set(metrics["not_evaluated"]) == {"broken", "zeros"}
    for scores in metrics["cases"].values():
        assert 0 <= scores["dice"] <= 1 and scores["hd95_mm"] >= 0 and scores["truth_voxels"] > 0
    assert metrics["mean_dice"] == pytest.approx(np.mean([s["dice"] for s in metrics["cases"].values()]))


def test_json_progress_is_one_object_per_line(cli_run):
    _, _, lines = cli_run
    events = [json.loads(line) for line in lines]
    assert all({"stage", "case", "epoch", "loss", "done", "total"} <= set(event) for event in events[:-1])
    assert events[-1]["stage"] == "finished" and events[-1]["loaded"] == 3
    unet = [event for event in events if event["stage"] == "unet_round0"]
    assert [event["epoch"] for event in unet] == [1, 2] and all(event["loss"] > 0 for event in unet)
    assert {event["case"] for event in events if event["stage"] == "pseudo_labels"} == set(CASES)


def test_apply_segments_a_volume_aligned_with_it(cli_run, cohort, tmp_path):
    run_dir, _, _ = cli_run
    output = tmp_path / "pat0001_seg.nii.gz"
    assert main(["apply", str(run_dir), str(cohort / "images" / "pat0001.nii.gz"), "-o", str(output)]) == 0
    result, volume = read_volume(output), read_volume(cohort / "images" / "pat0001.nii.gz")
    assert result.array.shape == volume.array.shape
    np.testing.assert_allclose(result.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    # the same model and pre-processing as the run's own evaluation
    np.testing.assert_array_equal(result.array > 0,
                                  read_volume(run_dir / "predictions" / "pat0001.nii.gz").array > 0)


def test_resume_after_interruptions_gives_the_same_results(cli_run, cohort, patched, tmp_path):
    """Killed (cancelled) after the first case's pseudo-label, resumed and killed again during the first U-Net
    epoch, then resumed to the end: finished steps and cases are not redone, training continues at epoch 2,
    and every result equals the uninterrupted run's, bit for bit."""
    reference, _, _ = cli_run
    run_dir = tmp_path / "run"
    options = CohortOptions(clip=str(cohort / "clip"), sam=str(cohort / "sam.pth"),
                            labels=str(cohort / "labels.csv"), **OPTIONS)

    def run_until(stage: str, done: int, events: list) -> None:
        cancel = CancelToken()

        def record(event):
            events.append(event)
            if event["stage"] == stage and event["done"] == done:
                cancel.cancel()

        with pytest.raises(Cancelled):
            run_cohort(cohort / "images", "brain tumor", run_dir, options, cancel=cancel, events=record,
                       resume=(run_dir / "config.json").exists())

    run_until("pseudo_labels", 1, [])
    first = run_dir / "pseudo_labels" / "pat0001.nii.gz"
    assert first.is_file() and not (run_dir / "pseudo_labels" / "pat0002.nii.gz").exists()
    assert (run_dir / "done" / "cams_amda").is_file() and not (run_dir / "done" / "pseudo_labels").exists()
    written = first.stat().st_mtime_ns

    with pytest.raises(InputError, match="--resume"):
        run_cohort(cohort / "images", "brain tumor", run_dir, options)
    with pytest.raises(InputError, match="--unet-epochs"):
        run_cohort(cohort / "images", "brain tumor", run_dir, CohortOptions(**{**vars(options), "unet_epochs": 3}),
                   resume=True)

    events = []
    run_until("unet_round0", 1, events)
    assert not {event["stage"] for event in events} & set(STEPS_BEFORE_UNET[:-1])
    assert first.stat().st_mtime_ns == written
    assert all((run_dir / "done" / step).is_file() for step in STEPS_BEFORE_UNET)
    assert torch.load(run_dir / "unet" / "round0" / "last.pt", weights_only=True)["epoch"] == 1

    events = []
    run_cohort(cohort / "images", "brain tumor", run_dir, options, events=events.append, resume=True)
    assert not {event["stage"] for event in events} & set(STEPS_BEFORE_UNET)
    assert [event["epoch"] for event in events if event["stage"] == "unet_round0"] == [2]

    for case in CASES:
        np.testing.assert_array_equal(read_volume(run_dir / "pseudo_labels" / f"{case}.nii.gz").array,
                                      read_volume(reference / "pseudo_labels" / f"{case}.nii.gz").array)
    assert (run_dir / "s3f" / "round1.csv").read_text() == (reference / "s3f" / "round1.csv").read_text()
    final, expected = (torch.load(d / "unet" / "final.pt", weights_only=True)["model"] for d in (run_dir, reference))
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    assert (json.loads((run_dir / "metrics.json").read_text())["cases"]
            == json.loads((reference / "metrics.json").read_text())["cases"])
