"""DICOM SEG output (`clisc.dicom_seg`, `clisc segment|apply -o out.dcm | --dicom-seg DIR`), read back with pydicom.

Every SEG is checked frame by frame without trusting the writer's bookkeeping: a frame's source instance is
looked up among the series' own files, its slice index is computed from that file's ImagePositionPatient with the
volume's geometry, and the frame's pixels must equal the mask on that slice; the frame's own plane position must
be the file's. Segment labels, descriptions (the prompt) and SNOMED codes are read from the SEG's dataset.

- The synthetic series (pydicom, written here): oblique orientation, slices stored against their instance numbers
  (the reader sorts by position), shuffled file names, and an anonymised variant with empty study/series/SOP UIDs
  in the dataset: checks the geometry in any CI. It cannot show that a viewer displays the SEG right.
- The real CT (../shared/data, JPEG-2000 lossless, anonymised): the masks of the reference labelmap (moved onto the
  CT grid: same voxel centres, j flipped) must come back voxel for voxel. Skipped when the data is absent.
- The CLI tests replace only the segmenter (zero-shot) or the trained run (apply) by a function returning known
  masks: they show that what the engine returns is what the SEG holds, not how good a segmentation is.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom", reason="highdicom (optional: pip install 'clisc[dicom]') is not installed")

from clisc.cli import main  # noqa: E402
from clisc.dicom_seg import series_files, terminology, write_dicom_seg  # noqa: E402
from clisc.errors import InputError  # noqa: E402
from clisc.readers import read_volume  # noqa: E402
from conftest import shared_data  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def write_series(folder, array: np.ndarray, directions: np.ndarray, spacing=(0.7, 0.9, 2.5),
                 origin=(-80.0, -60.0, 20.0), anonymised: bool = False) -> None:
    """``array`` (K, J, I) int16 as a CT series: slice k at origin + k × spacing_k × normal (LPS mm), row
    direction ``directions[:, 0]``, column direction ``directions[:, 1]``, normal ``directions[:, 2]``.
    Instance numbers run against k, file names are shuffled; ``anonymised`` empties the dataset's
    SOP/Study/Series UIDs (the file meta keeps the SOP UIDs), as the real CT series has them."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    count, rows, columns = array.shape
    order = list(range(count))
    random.Random(1).shuffle(order)
    for k in range(count):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = ("", "") if anonymised else (CT_IMAGE_STORAGE, uid)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ("", "") if anonymised else (study, series)
        ds.FrameOfReferenceUID = frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "CT", "Test^Oblique", "T1", "20240101", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName, ds.SeriesNumber = "1", "", "", 3
        ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "O", "test"
        ds.InstanceNumber = count - k
        position = np.asarray(origin) + k * spacing[2] * directions[:, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[directions[:, 0], directions[:, 1]]]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (between rows, along j), column spacing
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = array[k].astype("<i2").tobytes()
        ds.save_as(folder / f"IM{order[k]:04d}", enforce_file_format=True)


def frames_by_slice(seg_path, volume, folder) -> dict:
    """{(segment number, slice k): frame (J, I) bool} of a SEG, each frame placed by its referenced source file's
    position; asserts that the frame's own position is that file's."""
    seg = pydicom.dcmread(str(seg_path))
    sources = {}
    for path in series_files(folder):
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID)] = np.asarray(
            ds.ImagePositionPatient, dtype=float)
    lps_to_ijk = np.linalg.inv(volume.ijk_to_lps)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    frames = {}
    for n, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = sources[source]
        np.testing.assert_allclose(np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float), position,
                                   atol=1e-3)
        ijk = (lps_to_ijk @ np.r_[position, 1])[:3]
        np.testing.assert_allclose(ijk[:2], 0, atol=1e-3)
        k = int(round(ijk[2]))
        assert abs(ijk[2] - k) < 1e-3
        identification = (group if "SegmentIdentificationSequence" in group  # shared when there is one segment
                          else seg.SharedFunctionalGroupsSequence[0]).SegmentIdentificationSequence[0]
        segment = int(identification.ReferencedSegmentNumber)
        frames[(segment, k)] = pixels[n].astype(bool)
    return frames


def assert_seg_holds(seg_path, masks, volume, folder) -> None:
    frames = frames_by_slice(seg_path, volume, folder)
    for number, mask in enumerate(masks, start=1):
        for k in range(volume.array.shape[0]):
            expected = mask[k]
            found = frames.get((number, k))
            if found is None:
                assert not expected.any(), f"segment {number}: slice {k} has a mask but no frame"
            else:
                np.testing.assert_array_equal(found, expected, err_msg=f"segment {number}, slice {k}")


@pytest.fixture
def oblique_series(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(-100, 300, size=(7, 20, 24)).astype(np.int16)
    directions = rotation(25, 35)
    directions[:, 2] *= -1  # the slices run along minus the cross product of row and column directions
    folder = tmp_path / "series"
    write_series(folder, array, directions)
    return folder, array


def asymmetric_masks(shape) -> list:
    """Two overlapping masks that differ on every slice, so a misplaced or flipped frame cannot match."""
    first, second = np.zeros(shape, bool), np.zeros(shape, bool)
    for k in range(1, shape[0] - 1):
        first[k, 2 + k: 9 + k, 3:6 + 2 * k] = True
        second[k, 1:4, 4 + k: 12] = True
    return [first, second]


def test_the_reader_and_the_writer_agree_on_slice_order_for_an_oblique_series(oblique_series, tmp_path):
    folder, array = oblique_series
    volume = read_volume(folder)
    files = series_files(folder)
    assert volume.array.shape == array.shape
    for k, path in enumerate(files):  # the reader's slice k is the file series_files puts at k
        np.testing.assert_array_equal(volume.array[k], pydicom.dcmread(str(path)).pixel_array)
    masks = asymmetric_masks(array.shape)
    out = write_dicom_seg(tmp_path / "seg.dcm", masks, ["left kidney", "brain tumor"], volume, folder)
    assert_seg_holds(out, masks, volume, folder)


def test_segment_labels_prompts_and_codes_are_written(oblique_series, tmp_path):
    folder, array = oblique_series
    volume = read_volume(folder)
    out = write_dicom_seg(tmp_path / "seg.dcm", asymmetric_masks(array.shape), ["left kidney", "brain tumor"], volume,
                          folder, prompts=["left kidney", "brain tumor"])
    seg = pydicom.dcmread(str(out))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    kidney, tumour = seg.SegmentSequence
    assert (kidney.SegmentLabel, kidney.SegmentDescription) == ("left kidney", "left kidney")
    assert kidney.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"  # Anatomical Structure
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert (kidney_type.CodeValue, kidney_type.CodingSchemeDesignator) == ("64033007", "SCT")
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Morphologically Altered Structure"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"  # Mass
    assert tumour.AnatomicRegionSequence[0].CodeMeaning == "Brain"
    assert tumour.SegmentAlgorithmName == "CLISC"
    study = pydicom.dcmread(str(series_files(folder)[0]), stop_before_pixels=True)
    assert seg.StudyInstanceUID == study.StudyInstanceUID and seg.FrameOfReferenceUID == study.FrameOfReferenceUID
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID)
                          for p in series_files(folder)}


def test_terminology_of_unknown_and_plural_prompts():
    assert terminology("lungs")["type"] == ("39607008", "Lung")
    assert terminology("liver tumors")["region"] == ("10200004", "Liver")
    assert terminology("something odd") == {"category": ("85756007", "Tissue"), "type": ("85756007", "Tissue"),
                                            "region": None, "modifier": None}


def test_an_anonymised_series_gets_its_uids_from_the_file_meta(tmp_path):
    array = np.arange(4 * 10 * 12, dtype=np.int16).reshape(4, 10, 12)
    folder = tmp_path / "anonymised"
    write_series(folder, array, np.eye(3), anonymised=True)
    volume = read_volume(folder)
    masks = [np.zeros(array.shape, bool)]
    masks[0][1:3, 2:5, 3:9] = True
    out = write_dicom_seg(tmp_path / "seg.dcm", masks, ["liver"], volume, folder)
    assert_seg_holds(out, masks, volume, folder)
    seg = pydicom.dcmread(str(out))
    assert seg.StudyInstanceUID  # derived, the same for every write of this series
    assert write_dicom_seg(tmp_path / "again.dcm", masks, ["liver"], volume, folder) and \
        pydicom.dcmread(str(tmp_path / "again.dcm")).StudyInstanceUID == seg.StudyInstanceUID


def test_a_volume_that_is_not_the_series_is_refused(oblique_series, tmp_path):
    folder, array = oblique_series
    volume = read_volume(folder)
    moved = volume.with_array(volume.array)
    moved.ijk_to_ras[:3, 3] += 1.0
    with pytest.raises(InputError, match="does not match slice 0"):
        write_dicom_seg(tmp_path / "seg.dcm", [np.zeros(array.shape, bool)], ["x"], moved, folder)
    with pytest.raises(InputError, match="not a DICOM series folder|must be a DICOM series folder"):
        write_dicom_seg(tmp_path / "seg.dcm", [np.zeros(array.shape, bool)], ["x"], volume, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_the_real_jpeg2000_ct_series_round_trips_voxel_for_voxel(tmp_path):
    import SimpleITK as sitk

    folder = shared_data("ct_dicom/series")
    volume = read_volume(folder)
    labels_image = sitk.ReadImage(str(shared_data("ct_dicom/reference_seg.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.Resample(labels_image, volume.to_sitk(), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0))
    names = {name: int(value) for value, name in
             json.loads(shared_data("ct_dicom/labels_total.json").read_text())["total"].items()}
    organs = ["liver", "spleen", "stomach", "aorta"]
    masks = [labels == names[organ] for organ in organs]
    assert all(mask.any() for mask in masks)
    out = write_dicom_seg(tmp_path / "ct_seg.dcm", masks, organs, volume, folder,
                          prompts=[o.replace("_", " ") for o in organs])
    assert_seg_holds(out, masks, volume, folder)
    seg = pydicom.dcmread(str(out))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == organs
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence] == [
        "Liver", "Spleen", "Stomach", "Aorta"]


# ---- the command line ----------------------------------------------------------------------------------------

def fake_zero_shot(monkeypatch, masks_for):
    """`ZeroShotSegmenter` replaced by one returning ``masks_for(volume)`` (no model is fetched or loads)."""
    import clisc.cli
    import clisc.zeroshot
    from clisc.result import SegmentResult

    class Fake:
        def __init__(self, options):
            import torch

            self.device = torch.device("cuda")  # skips the CLI's CPU warning; nothing runs on it

        def segment(self, volume, prompts, progress=None):
            return SegmentResult(masks_for(volume), list(prompts), [np.zeros(volume.array.shape, np.float32)] * len(prompts),
                                 {})

    monkeypatch.setattr(clisc.zeroshot, "ZeroShotSegmenter", Fake)
    monkeypatch.setattr(clisc.cli, "_prepare_models", lambda args, models: None)


def test_segment_writes_a_dicom_seg_with_o_and_with_dicom_seg(oblique_series, tmp_path, monkeypatch, capsys):
    folder, array = oblique_series
    masks = asymmetric_masks(array.shape)
    fake_zero_shot(monkeypatch, lambda volume: masks)
    out = tmp_path / "out.dcm"
    assert main(["segment", str(folder), "--prompt", "left kidney", "--prompt", "brain tumor", "-o", str(out)]) == 0
    volume = read_volume(folder)
    assert_seg_holds(out, masks, volume, folder)
    assert [s.SegmentLabel for s in pydicom.dcmread(str(out)).SegmentSequence] == ["left kidney", "brain tumor"]
    export = tmp_path / "export"
    assert main(["segment", str(folder), "--prompt", "left kidney", "--prompt", "brain tumor",
                 "-o", str(tmp_path / "out.seg.nrrd"), "--dicom-seg", str(export)]) == 0
    assert (tmp_path / "out.seg.nrrd").is_file()
    assert_seg_holds(export / "clisc_seg.dcm", masks, volume, folder)
    assert f"wrote {export / 'clisc_seg.dcm'}" in capsys.readouterr().out


def test_a_dicom_seg_of_a_non_dicom_input_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import SimpleITK as sitk

    image = tmp_path / "image.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 3, sitk.sitkInt16), str(image))
    fake_zero_shot(monkeypatch, lambda volume: pytest.fail("the segmenter ran"))
    assert main(["segment", str(image), "--prompt", "liver", "-o", str(tmp_path / "out.dcm")]) == 2
    assert "not a DICOM series folder" in capsys.readouterr().err
    assert main(["segment", str(image), "--prompt", "liver", "-o", str(tmp_path / "o.nii.gz"), "--dicom-seg",
                 str(tmp_path / "export")]) == 2
    assert not list(tmp_path.glob("o*")) and not (tmp_path / "out.dcm").exists()


def test_apply_writes_a_dicom_seg(oblique_series, tmp_path, monkeypatch):
    import clisc.cohort.apply
    from clisc.result import SegmentResult

    folder, array = oblique_series
    masks = asymmetric_masks(array.shape)[:1]
    monkeypatch.setattr(clisc.cohort.apply, "apply_run",
                        lambda run_dir, volume, device, progress=None: SegmentResult(masks, ["brain tumor"], [], {}))
    out = tmp_path / "applied.dcm"
    assert main(["apply", str(tmp_path), str(folder), "-o", str(out)]) == 0
    assert_seg_holds(out, masks, read_volume(folder), folder)
    assert pydicom.dcmread(str(out)).SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Mass"


def test_without_highdicom_a_dicom_seg_is_refused_before_any_work_with_the_fix(oblique_series, tmp_path,
                                                                               monkeypatch, capsys):
    import sys

    folder, _ = oblique_series
    fake_zero_shot(monkeypatch, lambda volume: pytest.fail("the segmenter ran"))
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom raises ImportError
    assert main(["segment", str(folder), "--prompt", "liver", "-o", str(tmp_path / "out.dcm")]) == 2
    assert "pip install 'highdicom>=0.23'" in capsys.readouterr().err
    assert not (tmp_path / "out.dcm").exists()
