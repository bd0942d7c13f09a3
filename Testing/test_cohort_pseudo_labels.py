"""CLISC pseudo-labelling steps (METHOD.md §B steps 2-5) on constructed inputs with known answers.

Slice-label smoothing, CAM post-processing, AMDA and SAM prompts are checked exactly. The classifier is a
real ResNet-50 with random weights trained for a few steps on a toy task (a bright square or not): that shows
it learns and that LayerCAM points at what it learnt, not how it does on scans. Random-weight CLIP and SAM
only exercise the mechanics (prompt orientation, batching, shapes).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clisc.clip_scoring import ClipScorer
from clisc.cohort.amda import amda_masked_copies
from clisc.cohort.classifier import (
    build_classifier,
    classify,
    layer_cam,
    postprocess_cams,
    to_input,
    train_classifier,
)
from clisc.cohort.pseudo_labels import equalised_rgb, sam_pseudo_label, slice_prompt
from clisc.cohort.slice_labels import (
    clip_slice_labels,
    default_prompts,
    smooth_slice_labels,
)
from clisc.errors import Cancelled, InputError
from clisc.models.loaders import load_clip
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam
from clisc.progress import CancelToken
from clisc.sam import SliceSegmenter
from clisc.torchvision_compat import import_torchvision

# --- step 2: CLIP slice labels ---------------------------------------------------------------------------


def test_default_prompts_for_brain_tumor_are_the_papers():
    normal, abnormal = default_prompts("brain tumor")
    assert normal == ("an image of brain tissue showing typical signal intensity without any regions of "
                      "abnormal intensity or suspicious mass")
    assert abnormal == ("an image of brain tissue showing a tumor with uneven hyperintensity and irregular "
                        "borders distinct from surroundings")
    assert default_prompts("liver lesion")[1].startswith("an image of liver tissue showing a lesion with")
    assert default_prompts("edema")[1].startswith("an image of tissue showing an edema with")


def test_confident_slices_are_kept_and_few_neighbours_do_not_vote():
    labels = smooth_slice_labels(np.array([0.9, 0.5, 0.1, 0.6, 0.4, 0.59]))
    assert labels.tolist() == [1, -1, 0, 1, 0, -1]


def test_a_lone_slice_takes_the_majority_of_its_neighbours():
    p = np.full(20, 0.9)
    p[10] = 0.1  # ten abnormal neighbours within ±5 kept positions
    assert (smooth_slice_labels(p) == 1).all()
    p[[2, 17]] = 0.5  # unsure slices do not vote and are not labelled
    expected = np.ones(20, int)
    expected[[2, 17]] = -1
    assert smooth_slice_labels(p).tolist() == expected.tolist()


def test_neighbours_further_than_max_gap_slices_do_not_vote():
    p = np.full(30, 0.5)
    p[0:5] = p[26:30] = 0.9
    p[25] = 0.1
    # slice 25 is within ±5 kept positions of all 9 other kept slices, but only 26-29 are within 6 slices
    assert smooth_slice_labels(p)[25] == 0
    assert smooth_slice_labels(p, max_gap=100)[25] == 1


def test_a_tie_makes_the_slice_normal_and_votes_use_the_labels_before_smoothing():
    p = np.array([0.9] * 5 + [0.1] + [0.1] * 5)  # slice 5: 5 abnormal, 5 normal neighbours
    assert smooth_slice_labels(p)[5] == 0
    p[5] = 0.9
    assert smooth_slice_labels(p)[5] == 0  # METHOD.md: on a tie the slice becomes normal, whatever its own label
    # slice 5 votes 6:4 and flips to 1; slice 6 then ties 5:5 with the labels before smoothing and stays 0
    # (updating in place would give it 6:4 and flip it too)
    labels = np.array([1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0])
    smoothed = smooth_slice_labels(np.where(labels == 1, 0.9, 0.1))
    assert smoothed.tolist() == [1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return ClipScorer(load_clip(save_random_clip(tmp_path_factory.mktemp("clip") / "tiny", TINY_CLIP_CONFIG)),
                      torch.device("cpu"))


def test_clip_slice_labels_score_abnormal_against_normal_in_batches(tiny_clip):
    """Random CLIP: no meaning, but the labels must be the smoothing of P(abnormal) per slice, whatever the
    batching, and swapping the prompts must swap the labels."""
    rng = np.random.default_rng(0)
    slices = rng.integers(0, 256, (5, 40, 50), dtype=np.uint8)
    normal, abnormal = default_prompts("brain tumor")
    labels = clip_slice_labels(tiny_clip, slices, normal, abnormal, threshold=0.5, batch_size=3)
    embeddings = tiny_clip.image_embeddings(tiny_clip.images(slices))
    p = tiny_clip.relevance(embeddings, tiny_clip.text_embedding([abnormal]), tiny_clip.text_embedding([normal]))
    assert np.abs(p - 0.5).min() > 1e-6  # else the swap below would not be a test
    assert labels.tolist() == smooth_slice_labels(p, threshold=0.5).tolist()
    swapped = clip_slice_labels(tiny_clip, slices, abnormal, normal, threshold=0.5)
    assert swapped.tolist() == (1 - labels).tolist()


# --- step 3: classifier and LayerCAM ---------------------------------------------------------------------

TOY_SIZE, TOY_SQUARE = 96, 24  # layer3 sees 6×6 cells of 16 px; the square covers about 2×2 of them


def toy_slices(count: int, seed: int):
    """Noisy dark slices; the odd ones (label 1) hold a bright square at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.normal(40, 10, (count, TOY_SIZE, TOY_SIZE)).clip(0, 255)
    labels = np.arange(count) % 2
    squares = np.zeros(images.shape, bool)
    for n in np.flatnonzero(labels):
        row, col = rng.integers(0, TOY_SIZE - TOY_SQUARE, 2)
        squares[n, row:row + TOY_SQUARE, col:col + TOY_SQUARE] = True
    images[squares] = 200
    return images.astype(np.uint8), labels, squares


@pytest.fixture(scope="module")
def toy_classifier():
    images, labels, _ = toy_slices(16, seed=0)
    model = build_classifier(None, seed=0)
    losses = train_classifier(model, images, labels, epochs=2, batch_size=8, lr=1e-3, seed=0,
                              image_size=TOY_SIZE)
    return model, losses, images


def reestimate_batch_norm(model: nn.Module, images: np.ndarray) -> None:
    """Running BN statistics of the final weights (4 steps at momentum 0.1 leave them far from it; a real
    cohort trains for hundreds of steps)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over this pass
    model.train()
    with torch.no_grad():
        model(to_input(torch.as_tensor(images), TOY_SIZE))
    model.eval()


def test_build_classifier_has_the_papers_head_and_loads_imagenet_weights(tmp_path):
    tv = import_torchvision()
    backbone = tv.models.resnet50(weights=None)
    torch.save(backbone.state_dict(), tmp_path / "resnet50.pth")
    model = build_classifier(tmp_path / "resnet50.pth")
    torch.testing.assert_close(model.conv1.weight, backbone.conv1.weight)
    assert [type(layer) for layer in model.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.fc[0].in_features == 2048 and model.fc[2].p == 0.5 and model.fc[3].out_features == 2
    seeded = build_classifier(None, seed=3)
    torch.testing.assert_close(seeded.fc[0].weight, build_classifier(None, seed=3).fc[0].weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="neither ImageNet resnet50 weights nor a CLISC slice classifier"):
        build_classifier(tmp_path / "other.pth")


def test_training_on_a_separable_toy_task_lowers_the_loss(toy_classifier):
    _, losses, _ = toy_classifier
    assert len(losses) == 2 and losses[1] < 0.75 * losses[0]  # 0.42 -> 0.04 here; 0.97 -> 0.45 at worst of 3 other seeds


def test_layer_cam_of_the_trained_toy_classifier_falls_on_the_square(toy_classifier):
    """The only evidence here that the CAM shows what the classifier learnt: the square covers 6% of a slice,
    its share of the CAM mass must be several times that on every held-out positive slice (3 to 4 times with
    these seeds)."""
    model, _, train_images = toy_classifier
    reestimate_batch_norm(model, train_images)
    images, labels, squares = toy_slices(12, seed=1)
    assert ((classify(model, images, image_size=TOY_SIZE) > 0.5) == labels).all()
    cams = layer_cam(model, images, batch_size=5, image_size=TOY_SIZE)
    assert cams.shape == images.shape and cams.dtype == np.float32
    assert cams.min() >= 0 and np.isclose(cams.reshape(12, -1).max(1), 1).all()
    positive = labels == 1
    mass_on_square = (cams * squares).sum(axis=(1, 2))[positive] / cams.sum(axis=(1, 2))[positive]
    area = squares[positive].mean()
    assert (mass_on_square > 2.5 * area).all()


class Brightness(nn.Module):
    """layer3 = the input's first channel; class 1 scores its mean, class 0 minus its mean."""

    cam_layer = "layer3"

    def __init__(self):
        super().__init__()
        self.layer3 = nn.Identity()

    def forward(self, x):
        score = self.layer3(x[:, :1]).mean(dim=(1, 2, 3))
        return torch.stack([-score, score], dim=1)


def test_layer_cam_keeps_activations_with_positive_gradients_only():
    """Class 1: gradients are all positive, so the CAM is ReLU(activation), min-max scaled: 1 exactly on the
    bright pixels (above ImageNet's red mean), 0 elsewhere. Class 0: negative gradients, a flat CAM of 0."""
    images = np.zeros((2, 16, 16), np.uint8)  # at the classifier's input size: no resampling
    images[0, 3:8, 4:15] = 200
    images[1, 10:, :5] = 250
    cam = layer_cam(Brightness(), images, target_class=1, image_size=16)
    assert np.array_equal(cam > 0.5, images > 0) and np.allclose(cam[images == 0], 0, atol=1e-6)
    assert (layer_cam(Brightness(), images, target_class=0, image_size=16) == 0).all()


def test_postprocess_cams_thresholds_opens_and_keeps_the_large_components():
    rng = np.random.default_rng(0)
    cams = rng.uniform(0, 0.2, (8, 32, 32))
    blob = np.zeros(cams.shape, bool)
    blob[2:6, 5:15, 5:15] = True
    cams[blob] = 0.9
    cams[2:5, 20:24, 20:23] = 0.9  # 36 voxels < a third of 400: dropped
    cams[3, 28, 3] = cams[4, 2, 28] = 0.95  # speckles: removed by the opening
    cams[2:6, 25:31, 25:31] = 0.9  # outside the body
    cams[6, 5:15, 5:15] = 0.9  # a slice the classifier calls normal
    body = np.ones(cams.shape, bool)
    body[:, 25:, 25:] = False
    positive = np.array([0, 1, 1, 1, 1, 1, 0, 0], bool)
    for method in ("otsu", "kmeans"):
        assert np.array_equal(postprocess_cams(cams, body, positive, method), blob)
    assert not postprocess_cams(cams, body, np.zeros(8, bool)).any()
    assert not postprocess_cams(np.full(cams.shape, 0.5), body, positive).any()


# --- step 4: AMDA ------------------------------------------------------------------------------------------


def test_amda_hides_the_top_fifth_of_the_cam_range_in_the_box_of_abnormal_slices():
    images = np.full((3, 20, 24), 100, np.uint8)
    cams = np.zeros((3, 20, 24))
    cams[0] = np.linspace(0, 1, 24)[None, :]  # rises left to right
    cams[0, :, 20:] = 1.0  # high, but outside the box: kept
    masks = np.zeros((3, 20, 24), bool)
    masks[0, 4:10, 2:12] = True  # box rows 4-9, cols 2-11
    labels = np.array([1, 0, 0])
    copies = amda_masked_copies(images, cams, masks, labels, np.random.default_rng(0))
    box = cams[0, 4:10, 2:12]
    tau = box.min() + 0.8 * (box.max() - box.min())
    expected = np.full((20, 24), 100, np.uint8)
    expected[4:10, 2:12][box > tau] = 0
    assert np.array_equal(copies[0], expected)
    assert (images == 100).all()  # inputs untouched
    hidden = int((expected == 0).sum())
    for copy in copies[1:]:  # normal slices: one rectangle of about the same area
        rows, cols = np.nonzero(copy == 0)
        assert abs(len(rows) - hidden) <= max(np.ptp(rows) + 1, np.ptp(cols) + 1)
        assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    again = amda_masked_copies(images, cams, masks, labels, np.random.default_rng(0))
    other = amda_masked_copies(images, cams, masks, labels, np.random.default_rng(1))
    assert np.array_equal(again, copies) and not np.array_equal(other, copies)


# --- step 5: SAM pseudo-labels -----------------------------------------------------------------------------


def prompt_case():
    """A slice whose mask holds 7 bright pixels (120 on 50; min + 0.6 range of the mask = 92). A brighter
    pixel outside the mask would raise a whole-slice cut to 153 and leave no candidate."""
    image = np.zeros((20, 20), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 4:12] = True
    image[mask] = 50
    for row, col in [(9, 11), (5, 6), (8, 8), (5, 10), (6, 4), (9, 5), (7, 7)]:
        image[row, col] = 120
    image[0, 0] = 255
    return image, mask


def test_slice_prompt_takes_the_papers_points_and_a_clipped_dilated_box():
    image, mask = prompt_case()
    prompt = slice_prompt(image, mask, box_dilation=3)
    # row-major candidates (5,6) (5,10) (6,4) (7,7) (8,8) (9,5) (9,11): n = 7 -> indices 0, 2, 3, 4, 6
    assert prompt.points[:5].tolist() == [[6, 5], [4, 6], [7, 7], [8, 8], [11, 9]]  # (x, y)
    assert prompt.boxes.tolist() == [[1, 2, 14, 12]]
    assert prompt.points[5:].tolist() == [[1, 2], [14, 2], [1, 12], [14, 12]]
    assert prompt.labels.tolist() == [1] * 5 + [0] * 4
    clipped = slice_prompt(image, mask, box_dilation=10)
    assert clipped.boxes.tolist() == [[0, 0, 19, 19]]
    assert clipped.points[5:].tolist() == [[0, 0], [19, 0], [0, 19], [19, 19]]
    single = np.zeros_like(mask)
    single[3, 4] = True
    assert slice_prompt(image, single, 0).points[:5].tolist() == [[4, 3]] * 5


class RecordingSegmenter:
    """Stands in for `SliceSegmenter`: records what SAM would get; its mask is the box, filled."""

    batch_size = 2

    def __init__(self):
        self.images, self.prompts = [], []

    def embed(self, images):
        self.images.append(images)
        return torch.zeros(len(images), 1)

    def predict(self, embedding, shape, prompt):
        self.prompts.append(prompt)
        x0, y0, x1, y1 = prompt.boxes[0].astype(int)
        mask = np.zeros(shape, bool)
        mask[y0:y1 + 1, x0:x1 + 1] = True
        return mask


def test_sam_pseudo_label_prompts_every_slice_with_a_mask_and_only_those():
    image, mask = prompt_case()
    slices = np.stack([image, image, image // 2, image])
    masks = np.stack([mask, np.zeros_like(mask), mask, mask])
    segmenter = RecordingSegmenter()
    calls = []
    labels = sam_pseudo_label(segmenter, slices, masks, box_dilation=3,
                              progress=lambda stage, done, total, message: calls.append((done, total)))
    assert [len(batch) for batch in segmenter.images] == [2, 1]  # slices 0, 2 | 3
    first = segmenter.images[0][0]
    assert first.shape == (20, 20, 3) and first.dtype == np.uint8
    assert np.array_equal(first, equalised_rgb(image)) and not np.array_equal(first[..., 0], image)
    for prompt, k in zip(segmenter.prompts, [0, 2, 3]):
        expected = slice_prompt(slices[k], masks[k], 3)
        assert np.array_equal(prompt.points, expected.points) and np.array_equal(prompt.boxes, expected.boxes)
    assert labels.dtype == bool and not labels[1].any()
    assert labels[0].sum() == 14 * 11 and np.array_equal(labels[0], labels[3])
    assert calls[-1] == (3, 3)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        sam_pseudo_label(RecordingSegmenter(), slices, masks, cancel=token)


def test_sam_pseudo_label_runs_with_a_real_tiny_sam():
    """Random SAM weights: only shapes, empty slices and determinism can be checked."""
    image, mask = prompt_case()
    slices = np.stack([np.kron(image, np.ones((3, 3), np.uint8))] * 2)
    masks = np.stack([np.kron(mask, np.ones((3, 3), bool))] * 2)
    masks[1] = False
    segmenter = SliceSegmenter(tiny_sam(), batch_size=2)
    labels = sam_pseudo_label(segmenter, slices, masks)
    assert labels.shape == slices.shape and labels.dtype == bool and not labels[1].any()
    assert np.array_equal(labels, sam_pseudo_label(segmenter, slices, masks))
