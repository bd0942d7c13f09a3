"""Cohort listing (folders, DICOM series folders, CSV and text lists, bad input) and pre-processing."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_data, write_dicom_series

from clisc.cohort.cases import (
    body_mask,
    list_cohort,
    preprocess,
    to_truncated_uint8_slices,
    to_uint8_slices,
    uncrop,
)
from clisc.errors import InputError
from clisc.readers import read_volume
from clisc.volume import Volume


def write_nifti(path, value=1):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 3, 4), value, np.int16)), str(path))
    return path


def test_a_folder_of_volumes_lists_each_file_sorted_by_id(tmp_path):
    for name in ("case_b.nii.gz", "case_a.nii", "case_c.nrrd"):
        write_nifti(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    cases = list_cohort(tmp_path)
    assert [case.case_id for case in cases] == ["case_a", "case_b", "case_c"]
    assert cases[1].path == tmp_path / "case_b.nii.gz"


def test_a_folder_of_dicom_series_folders_lists_each_series(tmp_path):
    rng = np.random.default_rng(0)
    for name, uid in (("patient 2", "1.2.3.2"), ("patient1", "1.2.3.1")):
        write_dicom_series(tmp_path / name, rng.integers(0, 100, (3, 8, 8)), uid)
    cases = list_cohort(tmp_path)
    assert [case.case_id for case in cases] == ["patient1", "patient_2"]  # filesystem-safe
    assert read_volume(cases[0].path).array.shape == (3, 8, 8)


def test_a_csv_list_uses_its_image_column_and_resolves_relative_paths(tmp_path):
    for patient in ("pat1", "pat2"):
        (tmp_path / patient).mkdir()
        write_nifti(tmp_path / patient / "flair.nii.gz")
    (tmp_path / "cohort.csv").write_text("label,image\nx,pat2/flair.nii.gz\ny,"
                                         f"{tmp_path / 'pat1' / 'flair.nii.gz'}\n")
    cases = list_cohort(tmp_path / "cohort.csv")
    # same file names: the folder names make the ids unique
    assert [(case.case_id, case.path) for case in cases] == [
        ("pat1_flair", tmp_path / "pat1" / "flair.nii.gz"), ("pat2_flair", tmp_path / "pat2" / "flair.nii.gz")]


def test_a_headerless_csv_and_a_text_list_use_the_first_column(tmp_path):
    write_nifti(tmp_path / "one.nii.gz")
    write_nifti(tmp_path / "two.nii.gz")
    (tmp_path / "list.csv").write_text("one.nii.gz,extra\ntwo.nii.gz,extra\n")
    (tmp_path / "list.txt").write_text("# my cohort\ntwo.nii.gz\n\none.nii.gz\n")
    for listing in ("list.csv", "list.txt"):
        assert [case.case_id for case in list_cohort(tmp_path / listing)] == ["one", "two"]


def test_bad_cohorts_raise_input_errors_that_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no such cohort"):
        list_cohort(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no case"):
        list_cohort(tmp_path / "empty")
    write_nifti(tmp_path / "here.nii.gz")
    (tmp_path / "list.txt").write_text("here.nii.gz\ngone.nii.gz\n")
    with pytest.raises(InputError, match="gone.nii.gz"):
        list_cohort(tmp_path / "list.txt")
    (tmp_path / "twice.txt").write_text("here.nii.gz\nhere.nii.gz\n")
    with pytest.raises(InputError, match="more than once"):
        list_cohort(tmp_path / "twice.txt")
    with pytest.raises(InputError, match="a cohort is"):
        list_cohort(tmp_path / "here.nii.gz")


def test_preprocess_crops_clips_and_z_scores_the_body():
    array = np.zeros((30, 40, 50), np.float32)
    rng = np.random.default_rng(0)
    array[2:27, 5:36, 3:44] = rng.uniform(10, 20, (25, 31, 41))
    array[10, 10, 10] = 10_000  # an outlier above the 99.9th percentile
    array[2, 5, 3] = 0  # a zero inside the box stays background
    normalised, crop = preprocess(Volume(array, np.eye(4)))
    assert crop == (slice(2, 27), slice(5, 36), slice(3, 44))
    assert normalised.dtype == np.float32 and normalised.shape == (25, 31, 41)
    body = array[crop] != 0
    assert np.array_equal(body_mask(array)[crop], body)
    assert abs(normalised[body].mean()) < 1e-4 and abs(normalised[body].std() - 1) < 1e-3
    assert normalised[10 - 2, 10 - 5, 10 - 3] < 2  # clipped; unclipped it would be ~30 standard deviations
    assert normalised[0, 0, 0] == normalised[body].min()  # background is the darkest value
    with pytest.raises(InputError, match="same value"):
        preprocess(Volume(np.zeros((2, 2, 2)), np.eye(4)))


def test_the_background_is_the_corner_value_when_the_corners_agree():
    array = np.full((4, 5, 6), -3.5)
    array[1:3, 1:4, 2:5] = [-4.0, 0.0, 2.0]  # the body holds zeros and values below the background
    assert body_mask(array).sum() == 2 * 3 * 3
    array[0, 0, 0] = 1.0  # corners disagree: the paper's non-zero rule
    assert np.array_equal(body_mask(array), array != 0)


def test_preprocess_on_brats_and_uncrop_give_back_the_input_grid():
    """These BraTS files were z-scored before they were saved: their background is a constant below zero."""
    path = shared_data("brats2015/pat0001/flair.nii.gz")
    volume = read_volume(path)
    brain = read_volume(path.with_name("brainmask.nii.gz")).array > 0
    normalised, crop = preprocess(volume)
    body = body_mask(volume.array)
    assert body.sum() == brain.sum() and (body == brain).mean() > 0.999
    assert normalised.shape == volume.array[crop].shape and normalised.size < volume.array.size / 2
    assert body[crop].sum() == body.sum()  # nothing of the brain is cropped away
    assert np.array_equal(uncrop(body[crop], crop, volume.array.shape), body)
    restored = uncrop(normalised, crop, volume.array.shape, fill=np.nan)
    assert np.array_equal(restored[crop], normalised) and np.isnan(restored).sum() == body.size - normalised.size
    inside = normalised[body[crop]]
    assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3
    assert (inside == inside.max()).mean() >= 0.0009  # the brightest 0.1% clipped to one value


def test_the_classifier_slices_are_truncated_to_uint8_as_the_reference_writes_its_pngs():
    """CLISC's step0_get_clip_label.py: (s - min) / (max - min) * 255, then .astype(np.uint8), which truncates."""
    array = np.stack([np.array([[0.0, 1.0], [2.0, 7.0]]), np.full((2, 2), 3.0)])
    slices = to_truncated_uint8_slices(array)
    assert slices.dtype == np.uint8
    assert slices[0].tolist() == [[0, 36], [72, 255]]  # 255/7 = 36.4, 510/7 = 72.9 (rounding would give 73)
    assert (slices[1] == 0).all()


def test_to_uint8_slices_scales_each_slice_and_keeps_flat_slices_black():
    array = np.stack([np.array([[-2.0, 0.0], [1.0, 2.0]]), np.full((2, 2), 7.0)])
    slices = to_uint8_slices(array)
    assert slices.dtype == np.uint8
    assert slices[0].tolist() == [[0, 128], [191, 255]]
    assert (slices[1] == 0).all()
