"""The zero-shot pipeline: slices, saliency → prompts → SAM → 3D, geometry, bad input.

Random weights cannot show that CLIP finds a tumour. So the geometry tests give the pipeline a saliency
derived from the ground truth (an "oracle") and a SAM whose mask is its box, both through the segmenter's
parameters: they show that prompts and masks land on the right slices and voxels, whatever the axis and
IJK→RAS. The end-to-end tests run the real pipeline with tiny models of the real classes (mechanics, report,
determinism, cancel), not accuracy. The stage tests run each stage alone on small arrays with fakes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import shared_data
from scipy.ndimage import gaussian_filter
from test_volume_io import GEOMETRIES, mask_points_lps, values_at

from clisc.embeddings import EmbeddingCache, SliceEmbeddings
from clisc.errors import Cancelled, InputError
from clisc.models.loaders import load_clip
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam
from clisc.profiles import PROFILES
from clisc.progress import CancelToken
from clisc.prompts import SamPrompt
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.writers import write_masks
from clisc.zeroshot import (
    ZeroShotSegmenter,
    check_prompts,
    keep_3d,
    percentile_window_uint8,
    preset_options,
    slice_axis,
)
from clisc.zeroshot.stages import candidate_slices, saliency_maps, sam_masks, select_slices, slice_prompts


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny CLIP and SAM; the mechanics tests use GradCAM (the cheapest) unless the method is the point."""
    folder = save_random_clip(tmp_path_factory.mktemp("clip") / "tiny", TINY_CLIP_CONFIG)
    return load_clip(folder), tiny_sam()


class PixelScorer:
    """The part of a `SliceScorer` the pipeline uses without the gate (``--slices`` not auto): CLIP's input is
    the slice itself, (B, 3, H, W) uint8, and a map comes back to the slice unchanged."""

    def images(self, slices):
        return torch.as_tensor(slices)[:, None].expand(-1, 3, -1, -1)

    def prompt_embedding(self, prompt):
        return torch.zeros(4)

    def to_slice_grid(self, maps, shape):
        assert tuple(maps.shape[1:]) == tuple(shape)
        return maps.numpy()


class OracleSaliency:
    """A `SaliencyMethod` whose map is the blurred ground truth of the slice shown. The slice is found by its
    pixels, which `PixelScorer` passes through (no two slices with contrast are equal in these volumes)."""

    def __init__(self, volume: Volume, axis: str, truth: np.ndarray, blur: float) -> None:
        axis = slice_axis(volume, axis)
        slices = np.moveaxis(percentile_window_uint8(volume.array), axis, 0)
        shown = [(s, t) for s, t in zip(slices, np.moveaxis(truth, axis, 0)) if np.ptp(s) > 0]
        self.maps = {s.tobytes(): gaussian_filter(t.astype(float), blur) for s, t in shown}
        assert len(self.maps) == len(shown)

    def __call__(self, images, text_embeddings, beta):
        return torch.stack([torch.as_tensor(self.maps[image[0].numpy().tobytes()]) for image in images])


class BoxSam:
    """A `SliceSam` whose mask is its prompt's boxes, filled, their far corner excluded (the zero-shot box is
    MedCLIP-SAMv2's (x, y, x + w, y + h), one past the mask); it records the batches it embeds."""

    batch_size = 2
    box_prompts_only = False

    def __init__(self) -> None:
        self.batches = []

    def embed(self, images):
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8
        self.batches.append(len(images))
        return torch.zeros(len(images), 1)

    def predict(self, embedding, image_shape, prompt):
        mask = np.zeros(image_shape, bool)
        for x0, y0, x1, y1 in prompt.boxes.astype(int):
            mask[y0:y1, x0:x1] = True
        return mask


def oracle_segmenter(options, volume: Volume, truth: np.ndarray, blur: float = 2.0) -> ZeroShotSegmenter:
    """The pipeline with the oracle saliency and the box-filling SAM (``options.slices`` not auto and the
    every-slice mode: no CLIP; the seeded mode needs CLIP's relevance even then)."""
    return ZeroShotSegmenter(options, scorer=PixelScorer(), slice_sam=BoxSam(),
                             saliency=OracleSaliency(volume, options.axis, truth, blur))


def slice_boxes(truth: np.ndarray, axis: int) -> np.ndarray:
    """The per-slice bounding boxes of ``truth`` along ``axis``, filled."""
    slices = np.moveaxis(truth, axis, 0)
    boxes = np.zeros_like(slices)
    for index, plane in enumerate(slices):
        if plane.any():
            rows, cols = np.flatnonzero(plane.any(1)), np.flatnonzero(plane.any(0))
            boxes[index, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    return np.moveaxis(boxes, 0, axis)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_oracle_prompts_land_on_the_tumour_slices_and_voxels_brats():
    volume = read_volume(shared_data("brats2015/pat0001/flair.nii.gz"))
    truth = read_volume(shared_data("brats2015/pat0001/label.nii.gz")).array > 0
    options = preset_options("fast", mode="every-slice", slices="all", components=1)
    result = oracle_segmenter(options, volume, truth).segment(volume, ["brain tumor"])
    mask = result.masks[0]
    tumour_slices = np.flatnonzero(truth.any(axis=(1, 2)))
    assert result.report["axis"] == 0
    assert np.array_equal(np.flatnonzero(mask.any(axis=(1, 2))), tumour_slices)
    assert dice(mask, slice_boxes(truth, 0)) > 0.9
    prompted = sorted(int(i) for i in result.report["sam_prompts"]["brain tumor"])
    assert prompted == tumour_slices.tolist()


def test_oracle_on_the_ct_dicom_series_along_another_axis():
    volume = read_volume(shared_data("ct_dicom/series"))
    liver = read_volume(shared_data("ct_dicom/reference_seg.nii.gz"))
    # the reference labelmap has another direction: resample it onto the CT grid through physical space
    to_reference = np.linalg.inv(liver.ijk_to_ras) @ volume.ijk_to_ras
    k, j, i = np.indices(volume.array.shape)
    mapped = np.rint(to_reference[:3, :3] @ np.stack([i, j, k]).reshape(3, -1) + to_reference[:3, 3:]).astype(int)
    labels = liver.array[mapped[2], mapped[1], mapped[0]].reshape(volume.array.shape)
    truth = labels == np.bincount(labels[labels > 0].ravel()).argmax()
    options = preset_options("fast", mode="every-slice", slices="all", axis="coronal")
    result = oracle_segmenter(options, volume, truth).segment(volume, ["largest organ"])
    axis = result.report["axis"]
    assert axis == 1
    assert dice(result.masks[0], slice_boxes(truth, axis)) > 0.85


@pytest.mark.parametrize("geometry", ["flipped", "oblique", "anisotropic-oblique"])
@pytest.mark.parametrize("axis", ["auto", "i"])
def test_oracle_mask_written_lands_on_the_planted_block(tmp_path, geometry, axis):
    direction, spacing = GEOMETRIES[geometry]
    array = np.random.default_rng(0).uniform(0, 100, size=(12, 20, 24)).astype(np.float32)
    array[3:9, 4:12, 6:16] = 500
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    source = tmp_path / "planted.nrrd"
    sitk.WriteImage(image, str(source))

    volume = read_volume(source)
    truth = volume.array > 250
    result = oracle_segmenter(preset_options("fast", mode="every-slice", slices="all", axis=axis), volume, truth, blur=0).segment(
        volume, ["block"])
    assert np.array_equal(result.masks[0], truth)  # a box is the block itself
    output = tmp_path / "block.seg.nrrd"
    write_masks(output, result.masks, result.names, volume)
    points = mask_points_lps(output)
    assert len(points) == truth.sum()
    assert np.all(values_at(sitk.ReadImage(str(source)), points) == 500)


def brats_crop() -> Volume:
    """Slices 70-73 of pat0001 FLAIR (tumour present), cropped to the brain: a small real volume."""
    volume = read_volume(shared_data("brats2015/pat0001/flair.nii.gz"))
    crop = volume.array[70:74, 40:200, 40:200]
    shift = np.eye(4)
    shift[:3, 3] = [40, 40, 70]
    return Volume(np.ascontiguousarray(crop), volume.ijk_to_ras @ shift, volume.source)


@pytest.mark.parametrize("saliency, prompt_type", [("gradcam", "box"), ("gscorecam", "points"), ("m2ib", "both")])
def test_end_to_end_with_tiny_real_models(tiny_models, saliency, prompt_type):
    options = preset_options("fast", mode="every-slice", saliency=saliency, prompt_type=prompt_type, slices="all",
                             saliency_options={"steps": 2, "samples": 2} if saliency == "m2ib" else {})
    segmenter = ZeroShotSegmenter(options, *tiny_models)
    volume = brats_crop()
    stages = []
    result = segmenter.segment(volume, ["brain tumor", "edema"], progress=lambda s, d, t, m: stages.append(s))
    assert result.names == ["brain tumor", "edema"]
    for mask, saliency_map in zip(result.masks, result.saliency):
        assert mask.shape == saliency_map.shape == volume.array.shape and mask.dtype == bool
        assert 0 <= saliency_map.min() and saliency_map.max() <= 1 and saliency_map.max() > 0
    report = result.report
    assert report["slices_embedded"] == 4  # both prompts share the 4 slice embeddings
    assert set(report["seconds"]) == {"relevance", "saliency", "sam", "propagation"}
    assert report["options"]["saliency"] == saliency
    assert {"saliency", "SAM"} <= set(stages)
    again = ZeroShotSegmenter(options, *tiny_models).segment(volume, ["brain tumor", "edema"])
    assert all(np.array_equal(a, b) for a, b in zip(result.masks, again.masks))


def test_auto_slices_come_from_clip_relevance(tiny_models):
    """With random weights relevance is arbitrary; what must hold is that only slices CLIP called relevant
    (after smoothing) get saliency and prompts, and that the scores are reported per slice."""
    volume = brats_crop()
    options = preset_options("fast", saliency="gradcam", slices="auto", relevance_threshold=0.0)
    result = ZeroShotSegmenter(options, *tiny_models).segment(volume, ["brain tumor"])
    scores = result.report["relevance"]["brain tumor"]
    assert len(scores) == 4 and all(0 < s < 1 for s in scores)
    assert result.report["selected_slices"]["brain tumor"] == [0, 1, 2, 3]
    none = preset_options("fast", saliency="gradcam", slices="auto", relevance_threshold=1.0)  # relevance is a softmax, < 1
    empty = ZeroShotSegmenter(none, *tiny_models).segment(volume, ["brain tumor"])
    assert not empty.masks[0].any() and empty.report["slices_embedded"] == 0


def test_png_image_and_one_slice_volume(tiny_models):
    volume = read_volume(shared_data("busi/malignant/malignant (1).png"))
    result = ZeroShotSegmenter(preset_options("fast", saliency="gradcam", slices="all"), *tiny_models).segment(volume, ["tumor"])
    assert result.masks[0].shape == volume.array.shape and volume.array.shape[0] == 1
    assert result.report["axis"] == 0 and result.report["slices_embedded"] == 1


def test_blank_volume_is_refused_and_non_finite_values_are_windowed(tiny_models):
    segmenter = ZeroShotSegmenter(preset_options("fast", saliency="gradcam", slices="all"), *tiny_models)
    zeros = Volume(np.zeros((3, 32, 32), np.float32), np.eye(4))
    with pytest.raises(InputError, match="no slice has any contrast"):
        segmenter.segment(zeros, ["brain tumor"])
    array = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    array[0, :4] = np.nan
    array[1, :4] = np.inf
    assert np.isfinite(percentile_window_uint8(array)).all()
    result = segmenter.segment(Volume(array, np.eye(4)), ["brain tumor"])
    assert result.masks[0].shape == array.shape


def test_cancel_between_slices(tiny_models):
    segmenter = ZeroShotSegmenter(preset_options("fast", saliency="gradcam", slices="all"), *tiny_models)
    token = CancelToken()

    def cancel_after_first(stage, done, total, message):
        if done >= 1:
            token.cancel()

    with pytest.raises(Cancelled):
        segmenter.segment(brats_crop(), ["brain tumor"], progress=cancel_after_first, cancel=token)


@pytest.mark.parametrize("prompts, message", [([], "at least one"), (["  "], "empty"), (["x" * 10_000], "characters")])
def test_bad_prompts(prompts, message):
    with pytest.raises(InputError, match=message):
        check_prompts(prompts)


def test_non_ascii_and_spaced_prompts_are_kept(tiny_models):
    assert check_prompts(["  tumeur   cérébrale ", "脑肿瘤"]) == ["tumeur cérébrale", "脑肿瘤"]
    clip, _ = tiny_models
    tokens = clip.tokenizer(["tumeur cérébrale", "脑肿瘤"])
    assert (tokens.count_nonzero(dim=1) > 2).all()


def test_preset_saliency_settings_do_not_leak_into_another_method():
    assert preset_options("fast").saliency_options == {"steps": 10, "samples": 10}
    assert preset_options("fast", saliency="gradcam").saliency_options == {}
    assert preset_options("fast", saliency="m2ib", saliency_options={"beta": 2.0}).saliency_options == {"beta": 2.0}
    with pytest.raises(InputError, match="preset"):
        preset_options("slow")


def test_anatomical_axes_follow_ijk_to_ras():
    lps = Volume(np.zeros((4, 5, 6)), np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert [slice_axis(lps, a) for a in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    # a volume stored sagittal-first: i runs S→I, j A→P, k R→L
    sagittal = Volume(np.zeros((4, 5, 6)), np.array([[0, 0, -1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1.0]]))
    assert [slice_axis(sagittal, a) for a in ("axial", "coronal", "sagittal")] == [2, 1, 0]
    with pytest.raises(InputError, match="axis"):
        slice_axis(lps, "oblique")


# ---- the stages alone, on small arrays ------------------------------------------------------------------------


def test_percentile_window_maps_the_percentiles_of_the_non_zero_voxels_to_0_and_255():
    """Shows the window's end points and that zeros do not move it; cannot show it suits any modality."""
    array = np.zeros((2, 10, 100), np.float32)
    array[1] = np.linspace(1, 1000, 1000).reshape(10, 100)
    low, high = np.percentile(array[1], [0.5, 99.5])
    window = percentile_window_uint8(array)
    assert window.dtype == np.uint8 and window.shape == array.shape
    assert window[1].min() == 0 and window[1].max() == 255 and not window[0].any()
    assert window[1].flat[int(np.searchsorted(array[1].ravel(), (low + high) / 2))] in (127, 128)
    assert not percentile_window_uint8(np.zeros((2, 3, 3))).any()


def test_percentile_window_keeps_a_binary_images_contrast():
    """One non-zero value has no window of its own: a 0/1 image maps to 0/255, not to all zeros (which the
    contrast check would then refuse as empty)."""
    array = np.zeros((2, 8, 8), np.float32)
    array[:, 2:5, 2:5] = 1
    window = percentile_window_uint8(array)
    assert set(np.unique(window)) == {0, 255} and (window == 255).sum() == 18


def test_candidate_slices_are_the_contrasted_ones_in_the_range():
    """Shows the two conditions of a candidate; says nothing about relevance."""
    slices = np.zeros((5, 4, 4), np.uint8)
    slices[[1, 2, 4], 0, 0] = 9
    assert candidate_slices(slices, "all").tolist() == [False, True, True, False, True]
    assert candidate_slices(slices, "2:4").tolist() == [False, False, True, False, True]


class TableScorer:
    """The part of a `SliceScorer` the gate uses, with relevance from a table (P, N): an "image" is its slice
    index (M, 1) and prompt p's embedding is [p]."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def text_embedding(self, texts):
        return torch.tensor([-1.0])

    def image_embeddings(self, images):
        return images.float()

    def relevance(self, image_embeddings, positive, negative):
        assert negative.tolist() == [-1.0]
        return self.table[int(positive[0]), image_embeddings[:, 0].long().numpy()]


def test_select_slices_thresholds_the_smoothed_relevance_within_the_candidates():
    """Shows the gate's arithmetic (relevance on the candidates only, a moving average along the axis, the
    threshold) on a known table; cannot show that CLIP's relevance follows the target."""
    table = np.array([[0.9, 0.9, 0.9, 0.1, 0.1, 0.1], [0.0, 0.0, 0.2, 1.0, 1.0, 0.0]])
    candidates = np.array([True, True, True, True, True, False])
    images = torch.arange(6)[candidates][:, None]
    texts = [torch.tensor([0.0]), torch.tensor([1.0])]
    relevance, selected = select_slices(TableScorer(table), images, texts, candidates, ("normal",), threshold=0.5,
                                        smoothing=3)
    assert np.array_equal(relevance[:, :5], table[:, :5]) and not relevance[:, 5].any()
    # prompt 0: means 0.9, 0.9, 0.63, 0.37, 0.07; prompt 1: 0, 0.07, 0.4, 0.73, 0.67 (slice 5 scored 0)
    assert selected.tolist() == [[True, True, True, False, False, False], [False, False, False, True, True, False]]
    relevance, selected = select_slices(TableScorer(table), images, texts, candidates, None)
    assert not relevance.any() and np.array_equal(selected, np.repeat(candidates[None], 2, axis=0))


def test_saliency_maps_go_to_their_prompt_and_slice_with_the_prompts_beta():
    """Shows where each map lands, which image, text and β the method gets, and the progress and cancel
    checks; cannot show anything about a real saliency method (`test_saliency` does)."""
    slices = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    candidates = np.array([False, True, True])
    images = PixelScorer().images(slices[candidates])
    selected = np.array([[False, True, True], [False, False, True]])
    calls = []

    def saliency(image, text, beta):
        calls.append((int(image[0, 0, 0, 0]), float(text[0, 0]), beta))
        return torch.full((1, 4, 5), beta / 10, dtype=torch.float64)

    reported = []
    maps = saliency_maps(saliency, PixelScorer(), images, candidates, selected,
                         [torch.tensor([7.0]), torch.tensor([8.0])], [2.0, 1.0], (4, 5), ["tumor", "edema"],
                         lambda *args: reported.append(args), CancelToken())
    assert calls == [(20, 7.0, 2.0), (40, 7.0, 2.0), (40, 8.0, 1.0)]  # slice 1 starts at 20, slice 2 at 40
    assert maps.dtype == np.float32 and maps.shape == (2, 3, 4, 5)
    assert np.allclose(maps[0, 1:], 0.2) and np.allclose(maps[1, 2], 0.1)
    assert not maps[0, 0].any() and not maps[1, :2].any()
    assert reported == [("saliency", 0, 3, "tumor"), ("saliency", 1, 3, "tumor"), ("saliency", 2, 3, "edema"),
                        ("saliency", 3, 3, "")]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        saliency_maps(saliency, PixelScorer(), images, candidates, selected, [torch.zeros(1)] * 2, [1.0, 1.0],
                      (4, 5), ["a", "b"], lambda *args: None, token)


def test_slice_prompts_box_the_coarse_mask_of_each_selected_slice():
    """Shows that a prompt comes from the selected slices' maps only, with the profile's prompt type, and that
    a flat map gives none; the coarse mask itself is `test_prompts`'."""
    saliency = np.zeros((2, 3, 20, 20), np.float32)
    saliency[:, :, 5:10, 8:15] = 1.0
    saliency[0, 2] = 0.5  # flat
    selected = np.array([[True, False, True], [False, True, False]])
    profiles = [PROFILES["tumor"], PROFILES["organ"]]
    prompts = slice_prompts(saliency, selected, profiles, "kmeans", 10, 0, seed=0)
    assert sorted(prompts) == [0, 1] and list(prompts[0]) == [0] and list(prompts[1]) == [1]
    assert prompts[0][0].boxes.tolist() == [[8, 5, 15, 10]] and prompts[0][0].points is None
    pointed = [replace(PROFILES["tumor"], prompt_type="points")] * 2
    points = slice_prompts(saliency, selected, pointed, "kmeans", 4, 0, seed=3)
    again = slice_prompts(saliency, selected, pointed, "kmeans", 4, 0, seed=3)
    assert points[0][0].boxes is None and len(points[0][0].points) == 4
    assert np.array_equal(points[1][1].points, again[1][1].points)


def test_sam_masks_embed_each_prompted_slice_once_for_all_prompts():
    """Shows the batching (every prompted slice once, ``batch_size`` at a time), where each mask lands and the
    progress calls; cannot show SAM's accuracy (`test_sam`, `test_litemedsam`)."""
    slices = np.zeros((5, 8, 8), np.uint8)
    box = SamPrompt(np.array([[1.0, 2.0, 3.0, 4.0]]), None, None, 1)
    prompts = {0: {0: box, 1: box}, 2: {1: box}, 3: {0: box}}
    sam, reported = BoxSam(), []
    embeddings = SliceEmbeddings(sam, slices, 0, EmbeddingCache())
    masks = sam_masks(embeddings, prompts, 2, lambda *args: reported.append(args), CancelToken())
    assert sam.batches == [2, 1] and embeddings.computed == 3
    assert masks.shape == (2, 5, 8, 8)
    assert [np.flatnonzero(m.any(axis=(1, 2))).tolist() for m in masks] == [[0, 3], [0, 2]]
    assert masks[0, 0].sum() == 2 * 2 and masks[0, 0, 2:4, 1:3].all()
    assert reported == [("SAM", 0, 3, ""), ("SAM", 2, 3, ""), ("SAM", 3, 3, "")]


def test_keep_3d_applies_the_profiles_component_rule_in_mm3():
    """Shows the three rules on two blobs of 8 and 1 voxels (full connectivity, sizes in mm³ through the voxel
    volume); cannot show which rule suits a target (`test_profiles`)."""
    masks = np.zeros((4, 6, 6), bool)
    masks[0:2, 0:2, 0:2] = True
    masks[3, 5, 5] = True
    largest, every, sized = PROFILES["tumor"], replace(PROFILES["tumor"], keep_3d="all"), replace(
        PROFILES["lesion"], keep_3d="4")
    assert keep_3d(masks, largest, 1.0).sum() == 8
    assert np.array_equal(keep_3d(masks, every, 1.0), masks)
    assert keep_3d(masks, sized, 1.0).sum() == 8  # 4 mm³ = 4 voxels: the single voxel goes
    assert keep_3d(masks, sized, 4.0).sum() == 9  # 4 mm³ = 1 voxel: both stay


def test_a_model_and_the_object_built_on_it_are_not_both_given(tiny_models):
    clip, sam = tiny_models
    with pytest.raises(ValueError, match="clip or scorer"):
        ZeroShotSegmenter(preset_options("fast"), clip, scorer=PixelScorer(), slice_sam=BoxSam())
