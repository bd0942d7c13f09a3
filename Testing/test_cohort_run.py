"""`clisc train` / `clisc apply` end to end on three downsampled BraTS FLAIR volumes, with random weights.

The cohort: three BraTS 2015 FLAIR volumes cut to the 40 axial slices around the tumours and downsampled
(6 × 6 in-plane, 4 axially: 10 × 40 × 40 voxels of 6 × 6 × 4 mm), an unreadable file and an all-zero volume.
Models, all of the real architectures, saved and loaded through the real loaders: a tiny open_clip CLIP; a
random LiteMedSAM checkpoint (--sam FILE); a random ResNet-50 slice classifier whose head is biased towards
"abnormal" (--classifier-weights FILE, `conftest.save_abnormal_classifier`), so that the real gate passes the
slices on to LayerCAM, AMDA and SAM (a plain random classifier passed 2 of 10 slices per case here, with empty
CAM masks).

What random weights can show: every stage runs on real arrays, writes its outputs where the run folder
says, aligned with the inputs; a killed run resumes to the very same results; bad cases are skipped and
reported; evaluation reads the labels; a held-out case (--holdout-split) takes part in no stage
and is scored apart. What they cannot show: accuracy.
"""
from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from conftest import save_abnormal_classifier, shared_data

from clisc.cli import main
from clisc.cohort.classifier import build_classifier, classify
from clisc.cohort.case_store import open_case
from clisc.cohort.cases import Case, body_mask
from clisc.cohort.options import CohortOptions
from clisc.cohort.run import run_cohort
from clisc.cohort.run_folder import RunFolder
from clisc.errors import Cancelled, InputError
from clisc.metrics import dice
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam
from clisc.progress import CancelToken
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.writers import write_volume

CASES = ("pat0001", "pat0002", "pat0003")
OPTIONS = dict(clip_threshold=0.5, classifier_epochs=1, classifier_image_size=32,
               classifier_batch_size=64, unet_epochs=2, patch_size=32, batch_size=2, s3f_rounds=1, s3f_keep=0.67,
               device="cpu", seed=0)
CLI_OPTIONS = ["--clip-threshold", "0.5", "--classifier-epochs", "1",
               "--classifier-image-size", "32", "--classifier-batch-size", "64", "--unet-epochs", "2",
               "--patch-size", "32", "--batch-size", "2", "--s3f-rounds", "1", "--s3f-keep", "0.67",
               "--device", "cpu", "--seed", "0"]
STEPS_BEFORE_UNET = ("slice_labels", "classifier", "cams", "classifier_amda", "cams_amda", "pseudo_labels")
MEANS = ("mean_dice", "median_dice", "mean_hd95_mm")
HELD_OUT, TRAINING = "pat0003", ("pat0001", "pat0002")


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
    save_random_sam(root / "sam.pth", "litemedsam")
    save_abnormal_classifier(root / "classifier.pt")
    return root


def model_options(cohort) -> dict:
    return dict(clip=str(cohort / "clip"), sam=str(cohort / "sam.pth"), classifier_weights=str(cohort / "classifier.pt"))


def model_arguments(cohort) -> list:
    return [f"--{key.replace('_', '-')}={value}" for key, value in model_options(cohort).items()]


@pytest.fixture(scope="module")
def cli_run(cohort, tmp_path_factory):
    """`clisc train ... --json-progress`, uninterrupted: (run dir, exit code, stdout lines)."""
    run_dir = tmp_path_factory.mktemp("runs") / "cli"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", str(cohort / "images"), "--prompt", "brain tumor", "--out", str(run_dir),
                     *model_arguments(cohort), "--labels", str(cohort / "labels.csv"), "--json-progress",
                     *CLI_OPTIONS])
    return run_dir, code, stdout.getvalue().splitlines()


def test_train_writes_every_stage_output(cli_run, cohort):
    run_dir, code, _ = cli_run
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["unet_epochs"] == 2 and config["options"]["labels"] == str(cohort / "labels.csv")
    assert config["labels_used_for_training"] is False
    for deviation in ("label-free CAM threshold", "pseudo-labels and S3F inside the body",
                      "box alone for a box-trained SAM"):
        assert any(note.startswith(deviation) for note in config["deviations"])
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
    # the gate is the trained classifier's own decision (a run's classifier.pt is a classifier checkpoint)
    trained, folder = build_classifier(run_dir / "classifier" / "classifier.pt"), RunFolder(run_dir)
    for case in CASES:
        stored = open_case(Case(case, cohort / "images" / f"{case}.nii.gz"), folder.preprocessed(case))
        gate = classify(trained, stored.classifier_slices(), image_size=OPTIONS["classifier_image_size"]) > 0.5
        assert gate.any()
        np.testing.assert_array_equal(np.load(folder.cams(case, amda=False))["positive"], gate)
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
    run_dir, _, lines = cli_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "diagonal" in metrics["empty_case_rule"] and "held_out" not in metrics
    training = metrics["training_cohort"]
    assert "not a test of generalisation" in training["note"]
    assert set(training["cases"]) == set(CASES)
    assert set(training["not_evaluated"]) == {"broken", "zeros"}
    for scores in training["cases"].values():
        assert 0 <= scores["dice"] <= 1 and scores["hd95_mm"] >= 0 and scores["truth_voxels"] > 0
    values = [s["dice"] for s in training["cases"].values()]
    assert training["mean_dice"] == pytest.approx(np.mean(values))
    assert training["median_dice"] == pytest.approx(np.median(values))
    summary = json.loads(lines[-1])
    assert summary["training_cohort"] == {"scored": 3, **{key: training[key] for key in MEANS}}
    assert "held_out" not in summary
    assert json.loads((run_dir / "summary.json").read_text()) == {k: v for k, v in summary.items() if k != "stage"}


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


def test_resume_after_interruptions_gives_the_same_results(cli_run, cohort, tmp_path):
    """Killed (cancelled) after the first case's pseudo-label, resumed and killed again during the first U-Net
    epoch, then resumed to the end: finished steps and cases are not redone, training continues at epoch 2,
    and every result equals the uninterrupted run's, bit for bit."""
    reference, _, _ = cli_run
    run_dir = tmp_path / "run"
    options = CohortOptions(**model_options(cohort), labels=str(cohort / "labels.csv"), **OPTIONS)

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
    assert (json.loads((run_dir / "metrics.json").read_text())["training_cohort"]
            == json.loads((reference / "metrics.json").read_text())["training_cohort"])


@pytest.fixture(scope="module")
def holdout_run(cohort, tmp_path_factory):
    """`clisc train ... --holdout-split test.csv --json-progress`, pat0003 held out: (run dir, the split file,
    exit code, the JSON events)."""
    folder = tmp_path_factory.mktemp("holdout")
    split = folder / "test.csv"
    split.write_text(f"split,case_id\ntest,{HELD_OUT}\n")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", str(cohort / "images"), "--prompt", "brain tumor", "--out", str(folder / "run"),
                     *model_arguments(cohort), "--labels", str(cohort / "labels.csv"), "--holdout-split",
                     str(split), "--json-progress", *CLI_OPTIONS])
    return folder / "run", split, code, [json.loads(line) for line in stdout.getvalue().splitlines()]


def test_a_held_out_case_takes_part_in_no_stage_and_is_scored_apart(holdout_run, cohort):
    run_dir, split, code, events = holdout_run
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["holdout_split"] == str(split) and config["held_out_cases"] == [HELD_OUT]
    for folder, suffix in (("slice_labels", ".json"), ("cams", ".npz"), ("cams_amda", ".npz"),
                           ("pseudo_labels", ".nii.gz"), ("s3f/round1", ".npz")):
        assert sorted(path.name for path in (run_dir / folder).iterdir()) == [case + suffix for case in TRAINING]
    table = (run_dir / "s3f" / "round1.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[1] for line in table) == list(TRAINING)
    assert [line.split(",")[3] for line in table] == ["1", "0"]  # 0.67 × 2 training cases -> 1 kept
    # not even loaded before the final U-Net exists
    held_out_events = [n for n, event in enumerate(events) if event.get("case") == HELD_OUT]
    assert {events[n]["stage"] for n in held_out_events} == {"load_held_out", "predictions_held_out"}
    assert min(held_out_events) > max(n for n, event in enumerate(events) if event["stage"] == "unet_round1")

    volume = read_volume(cohort / "images" / f"{HELD_OUT}.nii.gz")
    prediction = read_volume(run_dir / "predictions" / f"{HELD_OUT}.nii.gz")
    assert prediction.array.shape == volume.array.shape
    np.testing.assert_allclose(prediction.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    training, held_out = metrics["training_cohort"], metrics["held_out"]
    assert sorted(training["cases"]) == list(TRAINING) and set(training["not_evaluated"]) == {"broken", "zeros"}
    assert list(held_out["cases"]) == [HELD_OUT] and held_out["not_evaluated"] == {}
    assert "kept out of every stage" in held_out["note"] and metrics["holdout_split"] == str(split)
    truth = read_volume(cohort / "labels" / f"{HELD_OUT}.nii.gz").array > 0
    assert held_out["cases"][HELD_OUT]["dice"] == pytest.approx(dice(prediction.array > 0, truth))
    assert held_out["mean_dice"] == held_out["median_dice"] == held_out["cases"][HELD_OUT]["dice"]

    summary = events[-1]
    assert summary["loaded"] == 2 and summary["training_cohort"]["scored"] == 2
    assert summary["held_out"] == {"cases": [HELD_OUT], "predicted": 1, "scored": 1,
                                   **{key: held_out[key] for key in MEANS}}


@pytest.mark.parametrize("name, text", [("test.csv", f"case_id\n{HELD_OUT}\n"),
                                        ("test.txt", f"# the test set\n{HELD_OUT}\n")])
def test_evaluate_scores_a_run_on_its_holdout_file(holdout_run, cohort, tmp_path, name, text):
    run_dir = holdout_run[0]
    (tmp_path / name).write_text(text)
    assert main(["evaluate", str(run_dir), str(cohort / "labels.csv"), "--cases", str(tmp_path / name),
                 "--json", str(tmp_path / "scores.json")]) == 0
    report = json.loads((tmp_path / "scores.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(report["cases"]) == [HELD_OUT] and report["not_evaluated"] == {}
    assert report["cases"][HELD_OUT]["dice"] == pytest.approx(metrics["held_out"]["cases"][HELD_OUT]["dice"])


@pytest.mark.parametrize("text, message", [
    (None, "no such file"),
    ("# nothing yet\n\n", "lists no case id"),
    ("pat0001\npat9999\n", "not case ids of the cohort: pat9999 (its case ids are e.g. broken, pat0001, pat0002"),
    ("broken\npat0001\npat0002\npat0003\nzeros\n", "lists every case of the cohort: nothing is left to train on"),
])
def test_bad_holdout_splits_are_refused_before_any_work(cohort, tmp_path, text, message):
    split = tmp_path / "test.txt"
    if text is not None:
        split.write_text(text)
    options = CohortOptions(**model_options(cohort), holdout_split=str(split), **OPTIONS)
    with pytest.raises(InputError, match=re.escape(f"--holdout-split {split}") + ".*" + re.escape(message)):
        run_cohort(cohort / "images", "brain tumor", tmp_path / "run", options)
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_command_line_refuses_a_bad_holdout_split(cohort, tmp_path, capsys):
    (tmp_path / "test.csv").write_text("case_id\n")
    assert main(["train", str(cohort / "images"), "--prompt", "brain tumor", "--out", str(tmp_path / "run"),
                 "--holdout-split", str(tmp_path / "test.csv"), *CLI_OPTIONS]) == 2
    assert f"--holdout-split {tmp_path / 'test.csv'}: lists no case id" in capsys.readouterr().err


def test_resume_keeps_the_holdout_split(holdout_run, cohort, tmp_path, capsys):
    """--resume refuses another holdout file, or the same file listing other cases; with the same one it
    finishes at once and prints each cohort's scores; without --labels, the held-out predictions unscored."""
    run_dir, split, _, _ = holdout_run
    command = ["train", str(cohort / "images"), "--prompt", "brain tumor", "--out", str(run_dir),
               *model_arguments(cohort), "--labels", str(cohort / "labels.csv"), "--resume", *CLI_OPTIONS]
    other = tmp_path / "other.txt"
    other.write_text("pat0002\n")
    assert main([*command, "--holdout-split", str(other)]) == 2
    assert "cannot resume with different settings (--holdout-split, the cases --holdout-split lists)" in (
        capsys.readouterr().err)
    original = split.read_text()
    try:
        split.write_text("case_id\npat0002\n")
        assert main([*command, "--holdout-split", str(split)]) == 2
        assert "cannot resume with different settings (the cases --holdout-split lists)" in capsys.readouterr().err
    finally:
        split.write_text(original)
    assert main([*command, "--holdout-split", str(split)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "2 of 4 training case(s) loaded, 2 skipped, 1 held out" in out
    assert (f"training cohort (trained on: not a test of generalisation): mean Dice "
            f"{metrics['training_cohort']['mean_dice']:.4f}") in out
    assert f"held-out cases: mean Dice {metrics['held_out']['mean_dice']:.4f}" in out and "over 1 case(s)" in out

    # without --labels (it may change on --resume) the held-out case is still predicted, and said not scored
    prediction = run_dir / "predictions" / f"{HELD_OUT}.nii.gz"
    expected = read_volume(prediction).array
    prediction.unlink()
    (run_dir / "done" / "predictions_held_out").unlink()
    labels = command.index("--labels")
    assert main([*command[:labels], *command[labels + 2:], "--holdout-split", str(split)]) == 0
    out = capsys.readouterr().out
    np.testing.assert_array_equal(read_volume(prediction).array, expected)
    assert f"held-out cases: 1 predicted in {run_dir}/predictions, not scored: no --labels" in out
    assert "mean Dice" not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "training_cohort" not in summary and summary["held_out"]["predicted"] == 1
    assert "scored" not in summary["held_out"] and "not scored" in summary["held_out"]["note"]
