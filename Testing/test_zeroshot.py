"""The zero-shot pipeline: slices, saliency → prompts → SAM → 3D, geometry, bad input.

Random weights cannot show that CLIP finds a tumour. So the geometry tests replace the saliency by one
derived from the ground truth (an "oracle") and SAM's mask by its box: they show that prompts and masks land
on the right slices and voxels, whatever the axis and IJK→RAS. The end-to-end tests run the real pipeline
with tiny models of the real classes (mechanics, report, determinism, cancel), not accuracy.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import shared_data
from scipy.ndimage import gaussian_filter
from test_volume_io import GEOMETRIES, mask_points_lps, values_at

from clisc.errors import Cancelled, InputError
from clisc.models.loaders import load_clip
from clisc.models.random_weights import TINY_CLIP_CONFIG, save_random_clip, tiny_sam
from clisc.progress import CancelToken
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.writers import write_masks
from clisc.zeroshot import (
    ZeroShotSegmenter,
    check_prompts,
    preset_options,
    slice_axis,
    to_uint8,
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny CLIP and SAM; the mechanics tests use GradCAM (the cheapest) unless the method is the point."""
    folder = save_random_clip(tmp_path_factory.mktemp("clip") / "tiny", TINY_CLIP_CONFIG)
    return load_clip(folder), tiny_sam()


class OracleSegmenter(ZeroShotSegmenter):
    """Saliency = the blurred ground truth of the slice; SAM's mask = its box prompt, filled."""

    def __init__(self, options, models, truth: np.ndarray, blur: float = 2.0):
        super().__init__(options, *models)
        self.blur = blur
        self.truth_slices = np.moveaxis(truth, slice_axis(Volume(truth, np.eye(4)), options.axis), 0)
        self.sam.embed = lambda images: torch.zeros(len(images), 1)
        self.sam.predict = self._box

    def slice_saliency(self, index, image, text, shape, beta):
        return gaussian_filter(self.truth_slices[index].astype(float), self.blur)

    @staticmethod
    def _box(embedding, shape, prompt):
        mask = np.zeros(shape, bool)
        for x0, y0, x1, y1 in prompt.boxes.astype(int):
            mask[y0:y1 + 1, x0:x1 + 1] = True
        return mask


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


def test_oracle_prompts_land_on_the_tumour_slices_and_voxels_brats(tiny_models):
    volume = read_volume(shared_data("brats2015/pat0001/flair.nii.gz"))
    truth = read_volume(shared_data("brats2015/pat0001/label.nii.gz")).array > 0
    options = preset_options("fast", slices="all", components=1)
    result = OracleSegmenter(options, tiny_models, truth).segment(volume, ["brain tumor"])
    mask = result.masks[0]
    tumour_slices = np.flatnonzero(truth.any(axis=(1, 2)))
    assert result.report["axis"] == 0
    assert np.array_equal(np.flatnonzero(mask.any(axis=(1, 2))), tumour_slices)
    assert dice(mask, slice_boxes(truth, 0)) > 0.9
    prompted = sorted(int(i) for i in result.report["sam_prompts"]["brain tumor"])
    assert prompted == tumour_slices.tolist()


def test_oracle_on_the_ct_dicom_series_along_another_axis(tiny_models):
    volume = read_volume(shared_data("ct_dicom/series"))
    liver = read_volume(shared_data("ct_dicom/reference_seg.nii.gz"))
    # the reference labelmap has another direction: resample it onto the CT grid through physical space
    to_reference = np.linalg.inv(liver.ijk_to_ras) @ volume.ijk_to_ras
    k, j, i = np.indices(volume.array.shape)
    mapped = np.rint(to_reference[:3, :3] @ np.stack([i, j, k]).reshape(3, -1) + to_reference[:3, 3:]).astype(int)
    labels = liver.array[mapped[2], mapped[1], mapped[0]].reshape(volume.array.shape)
    truth = labels == np.bincount(labels[labels > 0].ravel()).argmax()
    options = preset_options("fast", slices="all", axis="coronal")
    result = OracleSegmenter(options, tiny_models, truth).segment(volume, ["largest organ"])
    axis = result.report["axis"]
    assert axis == 1
    assert dice(result.masks[0], slice_boxes(truth, axis)) > 0.85


@pytest.mark.parametrize("geometry", ["flipped", "oblique", "anisotropic-oblique"])
@pytest.mark.parametrize("axis", ["auto", "i"])
def test_oracle_mask_written_lands_on_the_planted_block(tmp_path, tiny_models, geometry, axis):
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
    result = OracleSegmenter(preset_options("fast", slices="all", axis=axis), tiny_models, truth, blur=0).segment(
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
    options = preset_options("fast", saliency=saliency, prompt_type=prompt_type, slices="all",
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
    assert set(report["seconds"]) == {"relevance", "saliency", "sam"}
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


def test_blank_or_non_finite_volume_gives_empty_segments_with_a_warning(tiny_models, caplog):
    segmenter = ZeroShotSegmenter(preset_options("fast", saliency="gradcam", slices="all"), *tiny_models)
    zeros = Volume(np.zeros((3, 32, 32), np.float32), np.eye(4))
    result = segmenter.segment(zeros, ["brain tumor"])
    assert not result.masks[0].any() and "no slice has any contrast" in caplog.text
    array = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    array[0, :4] = np.nan
    array[1, :4] = np.inf
    assert np.isfinite(to_uint8(array)).all()
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
