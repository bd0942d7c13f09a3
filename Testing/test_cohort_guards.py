"""`clisc train` on cohorts a new user met (issue 19): a run that cannot learn anything, a one-slice image among
volumes, and the pseudo-label stage's progress.

The cohort: small synthetic volumes (a body holding a bright blob, 12 × 40 × 40 voxels) and, in one run, a
one-slice image. Models of the real architectures, saved and loaded through the real loaders: a tiny open_clip
CLIP, a random LiteMedSAM, and a random ResNet-50 slice classifier whose head is biased towards "normal" (so that
no slice reaches LayerCAM and every pseudo-label is empty, as with a CLIP that labels every slice normal) or
towards "abnormal" (so that SAM gets a prompt on every slice the CAM marks). What this shows: the run's
decisions and reports; not accuracy (random weights).
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from clisc.cli import main
from clisc.cohort.classifier import build_classifier
from clisc.cohort.options import CohortOptions
from clisc.cohort.run import run_cohort
from clisc.errors import InputError
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, save_random_sam
from clisc.volume import Volume
from clisc.writers import write_volume

OPTIONS = dict(classifier="resnet50", clip_threshold=0.5, classifier_epochs=1, classifier_image_size=32,
               classifier_batch_size=64, unet_epochs=1, patch_size=32, batch_size=1, s3f_rounds=0, device="cpu",
               sam_batch_size=2, loader_workers=0, seed=0)


def synthetic_case(seed: int, slices: int = 12) -> np.ndarray:
    """(slices, 40, 40) float32: a body (about 50) holding a bright blob (about 150), background exactly 0."""
    k, j, i = np.indices((slices, 40, 40))
    centre = (slices - 1) / 2
    body = ((k - centre) / max(slices / 2 + 1, 1)) ** 2 + ((j - 20) / 17) ** 2 + ((i - 20) / 16) ** 2 < 1
    blob = ((k - centre) / max(slices / 4, 1)) ** 2 + ((j - 16 - seed) / 5) ** 2 + ((i - 22) / 6) ** 2 < 1
    noise = np.random.default_rng(seed).normal(0, 4, body.shape)
    return np.where(body, 50 + 100 * blob + noise, 0).astype(np.float32)


def save_biased_classifier(path, abnormal: bool):
    """A random ResNet-50 slice classifier whose head calls every slice abnormal (or normal), even after an epoch
    of training."""
    model = build_classifier(seed=0)
    with torch.no_grad():
        model.fc[-1].bias.copy_(torch.tensor([-4.0, 4.0] if abnormal else [4.0, -4.0]))
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return dict(clip=str(save_random_clip(root / "clip", TINY_CLIP_CONFIG, seed=0)),
                sam=str(save_random_sam(root / "sam.pth", "litemedsam")),
                normal=save_biased_classifier(root / "normal.pt", abnormal=False),
                abnormal=save_biased_classifier(root / "abnormal.pt", abnormal=True))


def write_cohort(folder, cases: dict) -> str:
    (folder / "images").mkdir(parents=True)
    for name, array in cases.items():
        write_volume(folder / "images" / f"{name}.nii.gz", Volume(array, np.diag([1.2, 1.1, 2.5, 1.0])))
    return str(folder / "images")


@pytest.fixture(scope="module")
def stopped_run(models, tmp_path_factory):
    """A cohort of two volumes and a one-slice image, run with the "normal" classifier and labels: (run dir, the
    error, the log records, the cohort folder)."""
    root = tmp_path_factory.mktemp("nothing_to_learn")
    cohort = write_cohort(root, {"a": synthetic_case(0), "b": synthetic_case(1), "flat": synthetic_case(2, 1)})
    (root / "labels").mkdir()
    for name in ("a", "b"):
        write_volume(root / "labels" / f"{name}.nii.gz", Volume((synthetic_case(0) > 100).astype(np.uint8),
                                                                np.diag([1.2, 1.1, 2.5, 1.0])))
    options = CohortOptions(**OPTIONS, clip=models["clip"], sam=models["sam"], classifier_weights=models["normal"],
                            labels=str(root / "labels"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("clisc").addHandler(handler)
    try:
        with pytest.raises(InputError) as error:
            run_cohort(cohort, "brain tumor", root / "run", options)
    finally:
        logging.getLogger("clisc").removeHandler(handler)
    return root / "run", str(error.value), records, cohort


def test_a_run_with_only_empty_pseudo_labels_stops_before_the_unet_saying_what_to_try(stopped_run):
    run_dir, message, records, _ = stopped_run
    assert "every pseudo-label is empty" in message and "was not trained" in message
    for flag in ("--clip-threshold", "--normal-prompt", "--abnormal-prompt", "--classifier-epochs",
                 "--cam-threshold", "--classifier efficientnet-lite0"):
        assert flag in message
    assert "the classifier called no slice abnormal" in message
    assert not (run_dir / "unet" / "final.pt").exists() and not list((run_dir / "unet").glob("round*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] is None and "every pseudo-label is empty" in summary["stopped"]
    assert set(summary["empty_pseudo_labels"]) == {"a", "b"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["empty_pseudo_labels"] == summary["empty_pseudo_labels"]
    assert metrics["stopped"] == summary["stopped"]


def test_each_empty_pseudo_label_is_warned_about(stopped_run):
    _, _, records, _ = stopped_run
    warned = [record.getMessage() for record in records if record.levelno == logging.WARNING]
    for case in ("a", "b"):
        assert any(text.startswith(f"case {case}: its pseudo-label is empty") for text in warned)


def test_a_one_slice_image_is_skipped_with_a_warning_and_listed(stopped_run):
    run_dir, _, records, _ = stopped_run
    skipped = json.loads((run_dir / "skipped" / "flat.json").read_text())
    assert skipped["stage"] == "load" and "1 axial slice(s)" in skipped["reason"]
    assert any(record.levelno == logging.WARNING and "flat" in record.getMessage() and "axial slice" in
               record.getMessage() for record in records)
    assert not (run_dir / "slice_labels" / "flat.json").exists()
    assert sorted(path.stem for path in (run_dir / "slice_labels").glob("*.json")) == ["a", "b"]


def test_the_command_line_exits_non_zero_with_the_message(stopped_run, models, tmp_path, capsys):
    _, _, _, cohort = stopped_run
    code = main(["train", cohort, "--prompt", "brain tumor", "--out", str(tmp_path / "run"),
                 "--clip", models["clip"], "--sam", models["sam"], "--classifier", "resnet50",
                 "--classifier-weights", models["normal"], "--clip-threshold", "0.5", "--classifier-epochs", "1",
                 "--classifier-image-size", "32", "--device", "cpu", "--loader-workers", "0"])
    assert code == 2
    error = capsys.readouterr().err
    assert "every pseudo-label is empty" in error and "--clip-threshold (now 0.5)" in error


def test_the_pseudo_label_stage_ticks_per_slice_from_its_start(models, tmp_path):
    """The stage's bar counts the slices SAM segments (those with a CAM mask), starts at 0 before the first case
    and moves by at most a SAM batch; it used to tick once per case, after the case."""
    cohort = write_cohort(tmp_path, {"a": synthetic_case(0), "b": synthetic_case(1)})
    events = []
    options = CohortOptions(**{**OPTIONS, "stop_after": "pseudo_labels"}, clip=models["clip"], sam=models["sam"],
                            classifier_weights=models["abnormal"])
    run_cohort(cohort, "brain tumor", tmp_path / "run", options, events=events.append)
    prompted = sum(int(np.load(tmp_path / "run" / "cams_amda" / f"{case}.npz")["mask"].any(axis=(1, 2)).sum())
                   for case in ("a", "b"))
    assert prompted > 4  # the test needs several slices per case
    ticks = [(event["done"], event["total"]) for event in events if event["stage"] == "pseudo_labels"]
    assert ticks[0] == (0, prompted) and ticks[-1] == (prompted, prompted)
    assert all(total == prompted for _, total in ticks)
    steps = np.diff([done for done, _ in ticks])
    assert (steps >= 0).all() and steps.max() <= OPTIONS["sam_batch_size"]
