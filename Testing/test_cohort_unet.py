"""The 3D U-Net (training, epoch checkpoints and resumption, sliding-window prediction) and S3F ranking.

Tiny synthetic volumes (a bright box labelled as foreground) and patches of 32³ keep this fast. A falling
training loss shows the loop optimises; it says nothing about the accuracy of a full-length training.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clisc.errors import Cancelled, InputError
from clisc.cohort.s3f import rank_cases, read_table, self_consistency, write_table
from clisc.cohort.unet import check_patch_size, epoch_order, predict, train_unet
from clisc.progress import CancelToken

EPOCHS = 5


def synthetic_cases(count: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for n in range(count):
        image = rng.normal(0, 0.3, (20 + n, 24, 28)).astype(np.float32)
        label = np.zeros(image.shape, bool)
        label[6:12, 8:14, 10 + n:18 + n] = True
        image[label] += 2
        cases.append((image, label))
    return cases


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    model, losses = train_unet(synthetic_cases(), EPOCHS, patch_size=32, batch_size=2, seed=3, checkpoint_dir=folder)
    return folder, model, losses


def test_training_loss_decreases(uninterrupted):
    _, _, losses = uninterrupted
    assert len(losses) == EPOCHS
    assert losses[-1] < losses[0]


def test_resumed_training_repeats_the_uninterrupted_run(uninterrupted, tmp_path):
    """Killed after epoch 2 (cancelled during epoch 3), then resumed: the checkpoint says 2 epochs, and the
    resumed run ends with exactly the losses and weights of the uninterrupted one."""
    _, reference_model, reference_losses = uninterrupted
    cancel = CancelToken()

    def stop_after_two(stage, done, total, message="", **fields):
        assert fields["epoch"] == done and fields["loss"] == pytest.approx(float(message.split()[-1]), abs=1e-4)
        if done == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        train_unet(synthetic_cases(), EPOCHS, patch_size=32, batch_size=2, seed=3, checkpoint_dir=tmp_path,
                   progress=stop_after_two, cancel=cancel)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["losses"] == reference_losses[:2]

    epochs_run = []
    model, losses = train_unet(synthetic_cases(), EPOCHS, patch_size=32, batch_size=2, seed=3,
                               checkpoint_dir=tmp_path, resume=True,
                               progress=lambda stage, done, total, message="", **fields: epochs_run.append(done))
    assert epochs_run == [3, 4, 5]
    assert losses == reference_losses
    for name, value in reference_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_patches_cut_by_loader_workers_train_the_same_weights(uninterrupted, tmp_path):
    """Two DataLoader worker processes cut the patches: each patch is a function of (seed, epoch, position),
    so the losses and weights are those of patches cut in the training process."""
    _, reference_model, reference_losses = uninterrupted
    model, losses = train_unet(synthetic_cases(), EPOCHS, patch_size=32, batch_size=2, seed=3, loader_workers=2)
    assert losses == reference_losses
    for name, value in reference_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


class Sign(torch.nn.Module):
    """A stand-in "network" whose foreground logit is the input and background logit its negative: its
    argmax is exactly ``image > 0``, so any shift in stitching windows back together would show."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


def test_sliding_window_prediction_is_aligned_with_the_whole_volume():
    image = -np.ones((21, 45, 70), np.float32)  # not multiples of the window; one side smaller than it
    image[3:9, 30:41, 5:60] = 1
    image[18, 2, 66] = 1
    mask = predict(Sign(), image, patch_size=32)
    assert mask.dtype == bool and mask.shape == image.shape
    np.testing.assert_array_equal(mask, image > 0)


def test_prediction_reports_every_window_batch_and_can_be_cancelled():
    image = np.zeros((21, 45, 70), np.float32)  # windows of 32 every 16 voxels: 1 x 2 x 4 = 8, in batches of 2
    reports = []
    predict(Sign(), image, patch_size=32, progress=lambda stage, done, total, message="": reports.append((done, total)))
    assert reports == [(n, 4) for n in range(5)]

    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        predict(Sign(), image, patch_size=32, cancel=cancel)


def test_trained_unet_predicts_on_a_volume_of_another_size(uninterrupted):
    _, model, _ = uninterrupted
    image = synthetic_cases(4)[3][0][:, :, :25]
    assert predict(model, image, patch_size=32).shape == image.shape


def test_patch_size_must_suit_four_halvings():
    check_patch_size(32)
    check_patch_size(128)
    for bad in (16, 40, 0):
        with pytest.raises(InputError, match="multiple of 16"):
            check_patch_size(bad)


def test_epoch_order_fills_whole_batches_with_repeats():
    order = epoch_order(5, 4, seed=0, epoch=1)
    assert len(order) == 8 and sorted(set(order.tolist())) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(order[5:], order[:3])
    assert not np.array_equal(order, epoch_order(5, 4, seed=0, epoch=2))


# ---- S3F ---------------------------------------------------------------------------------------------


class BoxSegmenter:
    """A fake `SliceSegmenter`: SAM's mask is the filled prompt box. Re-prompting from S then returns S's
    per-slice bounding boxes, so Dice(Ŝ, S) is known from the shape of S."""

    batch_size = 4

    def embed(self, images: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(images), 1, 1, 1)

    def predict(self, embedding, image_shape, prompt) -> np.ndarray:
        x0, y0, x1, y1 = prompt.boxes[0].astype(int)
        mask = np.zeros(image_shape, bool)
        mask[y0:y1 + 1, x0:x1 + 1] = True
        return mask


def test_s3f_ranks_constructed_cases_in_their_known_order(tmp_path):
    """Box: Ŝ = S (similarity 1). Disc: S fills about π/4 of its box (Dice ≈ 0.83). Cross: a thin plus sign fills
    little of its box (low Dice). Empty prediction: dropped, not ranked. A stray blob beside the box is not part
    of S. Ŝ is kept inside the body."""
    shape = (4, 40, 40)
    slices = np.full(shape, 100, np.uint8)
    box = np.zeros(shape, bool)
    box[:, 5:15, 5:20] = True
    with_stray = box.copy()
    with_stray[:, 30:32, 30:32] = True
    rows, cols = np.mgrid[:40, :40]
    disc = np.broadcast_to((rows - 20) ** 2 + (cols - 20) ** 2 <= 12 ** 2, shape)
    cross = np.zeros(shape, bool)
    cross[:, 19:21, 5:35] = cross[:, 5:35, 19:21] = True

    similarities = {}
    for case_id, prediction in [("d_box", with_stray), ("c_disc", disc), ("b_cross", cross),
                                ("a_empty", np.zeros(shape, bool))]:
        largest, similarities[case_id] = self_consistency(prediction, slices, BoxSegmenter())
        if case_id == "d_box":
            np.testing.assert_array_equal(largest, box)
    assert similarities["d_box"] == pytest.approx(1.0)
    disc_area = disc[0].sum()  # about π/4 of its 25×25 bounding box
    assert similarities["c_disc"] == pytest.approx(2 * disc_area / (disc_area + 25 * 25))
    assert similarities["a_empty"] is None
    body = np.ones(shape, bool)
    body[:, :, 20:] = False  # the disc's box in the body: 25 rows × 12 columns; S ∩ body is Ŝ ∩ S
    _, inside = self_consistency(disc, slices, BoxSegmenter(), body)
    assert inside == pytest.approx(2 * (disc & body)[0].sum() / (disc_area + 25 * 12))

    rows = rank_cases(similarities, keep=0.5)  # floor(3 · 0.5) = 1 of the 3 ranked cases
    assert [(row.rank, row.case_id, row.kept) for row in rows] == [
        (1, "d_box", True), (2, "c_disc", False), (3, "b_cross", False), (None, "a_empty", False)]
    write_table(rows, tmp_path / "s3f.csv")
    assert read_table(tmp_path / "s3f.csv") == [
        type(row)(row.rank, row.case_id, None if row.similarity is None else round(row.similarity, 6), row.kept)
        for row in rows]


def test_s3f_keeps_the_floor_of_the_fraction_and_breaks_ties_by_case_id():
    rows = rank_cases({"b": 0.5, "a": 0.5, "c": 0.9}, keep=0.8)  # 2.4 cases -> 2
    assert [(row.rank, row.case_id, row.kept) for row in rows] == [(1, "c", True), (2, "a", True), (3, "b", False)]
    assert sum(row.kept for row in rank_cases({"a": 1.0, "b": 0.5}, keep=0.75)) == 1  # 1.5 -> 1 (METHOD.md)
    assert sum(row.kept for row in rank_cases({"a": 1.0, "b": 0.5}, keep=0.1)) == 1  # at least one
    with pytest.raises(ValueError):
        rank_cases({"a": 1.0}, keep=0)
