"""Volumes in and masks out: formats, geometry (a mask lands on the physical points it came from), bad input."""
from __future__ import annotations

import gzip
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import shared_data, write_dicom_series

from clisc import writers
from clisc.errors import InputError, WriteError
from clisc.readers import read_segmentation, read_volume
from clisc.volume import LPS_TO_RAS, Volume
from clisc.writers import atomic_path, remove_partial_files, write_bytes, write_masks, write_segmentation, write_volume


def rotation(x_degrees: float, z_degrees: float) -> np.ndarray:
    a, b = np.radians(x_degrees), np.radians(z_degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


GEOMETRIES = {  # direction (LPS, as ITK stores it), spacing (i, j, k) in mm
    "lps": (np.eye(3), (1.0, 1.0, 1.0)),
    "ras": (np.diag([-1.0, -1.0, 1.0]), (1.0, 1.0, 1.0)),
    "flipped": (np.diag([1.0, -1.0, -1.0]), (1.0, 1.0, 1.0)),
    "oblique": (rotation(30, 20), (1.0, 1.0, 1.0)),
    "anisotropic-oblique": (rotation(-25, 40) @ np.diag([1.0, 1.0, -1.0]), (0.7, 1.3, 3.0)),
}


def planted_image(direction: np.ndarray, spacing) -> sitk.Image:
    """A 24×20×12 (I, J, K) image: noise below 100, an asymmetric L-shaped block of value 500."""
    rng = np.random.default_rng(0)
    array = rng.uniform(0, 100, size=(12, 20, 24)).astype(np.float32)
    array[3:7, 4:9, 5:15] = 500
    array[3:5, 9:15, 5:8] = 500
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((12.5, -40.25, 7.0))
    return image


def mask_points_lps(path) -> np.ndarray:
    """Physical (LPS) points of the non-zero voxels of a labelmap or .seg.nrrd file, as the file says."""
    if str(path).endswith(".seg.nrrd"):
        segmentation = slicerio.read_segmentation(str(path))
        ijk = np.argwhere(segmentation["voxels"] > 0)
        return (segmentation["ijkToLPS"] @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    image = sitk.ReadImage(str(path))
    kji = np.argwhere(sitk.GetArrayViewFromImage(image) > 0)
    return np.array([image.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]) for idx in kji])


def values_at(image: sitk.Image, points_lps: np.ndarray) -> np.ndarray:
    array = sitk.GetArrayViewFromImage(image)
    indices = [image.TransformPhysicalPointToIndex(tuple(p)) for p in points_lps]
    return np.array([array[k, j, i] for i, j, k in indices])


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("input_suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("output_suffix", [".seg.nrrd", ".nii.gz", ".nrrd"])
def test_mask_lands_on_the_physical_points_it_was_computed_from(tmp_path, geometry, input_suffix, output_suffix):
    direction, spacing = GEOMETRIES[geometry]
    image = planted_image(direction, spacing)
    source = tmp_path / f"image{input_suffix}"
    sitk.WriteImage(image, str(source))

    volume = read_volume(source)
    mask = volume.array > 250
    output = tmp_path / f"mask{output_suffix}"
    write_masks(output, [mask], ["block"], volume)

    points = mask_points_lps(output)
    assert len(points) == mask.sum() == 10 * 5 * 4 + 6 * 3 * 2
    assert np.all(values_at(sitk.ReadImage(str(source)), points) == 500)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_ijk_to_ras_agrees_with_simpleitk_index_to_physical(geometry):
    image = planted_image(*GEOMETRIES[geometry])
    volume = Volume.from_sitk(image)
    for ijk in [(0, 0, 0), (23, 0, 0), (3, 17, 11), (23, 19, 11)]:
        lps = image.TransformIndexToPhysicalPoint(ijk)
        ras = volume.ijk_to_ras @ [*ijk, 1]
        np.testing.assert_allclose(ras[:3], (LPS_TO_RAS[:3, :3] @ lps), atol=1e-9)
    assert volume.array.shape == (12, 20, 24)
    np.testing.assert_allclose(volume.spacing, GEOMETRIES[geometry][1])


def test_dicom_jpeg2000_series_geometry(tmp_path):
    """The real JPEG-2000 CT series: a bone mask written as .seg.nrrd lands on voxels whose HU are > 300."""
    series = shared_data("ct_dicom/series")
    volume = read_volume(series)
    assert volume.array.shape == (20, 512, 512)
    np.testing.assert_allclose(volume.spacing, [0.9765625, 0.9765625, 2.0])
    mask = volume.array > 300
    output = tmp_path / "bone.seg.nrrd"
    write_masks(output, [mask], ["bone"], volume)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    dicom = reader.Execute()
    points = mask_points_lps(output)
    assert len(points) == mask.sum() > 1000
    sample = points[np.random.default_rng(0).choice(len(points), 2000, replace=False)]
    assert np.all(values_at(dicom, sample) > 300)


def test_dicom_reference_labelmap_on_another_grid_maps_to_same_points():
    """The CT series and its reference labelmap store different directions (y flipped); their voxels still
    coincide in RAS, which is what the `Volume` geometry must preserve."""
    volume = read_volume(shared_data("ct_dicom/series"))
    reference = read_volume(shared_data("ct_dicom/reference_seg.nii.gz"))
    assert not np.allclose(volume.ijk_to_ras, reference.ijk_to_ras)
    to_reference = np.linalg.inv(reference.ijk_to_ras) @ volume.ijk_to_ras
    ijk = np.array([[0, 0, 0, 1], [511, 0, 19, 1], [100, 300, 7, 1]]).T
    mapped = (to_reference @ ijk)[:3]
    assert np.allclose(mapped, np.round(mapped), atol=1e-3)
    assert np.all((mapped >= 0) & (mapped <= [[511], [511], [19]]))


def test_folder_with_several_series_reads_the_largest_and_says_how_to_choose(tmp_path, caplog):
    folder = tmp_path / "study"
    write_dicom_series(folder, np.zeros((3, 8, 8)), "1.2.3.4.1")
    write_dicom_series(folder, np.ones((5, 8, 8)), "1.2.3.4.2")
    volume = read_volume(folder)
    assert volume.array.shape == (5, 8, 8)
    assert "1.2.3.4.1" in caplog.text and "--series" in caplog.text
    chosen = read_volume(folder, series_uid="1.2.3.4.1")
    assert chosen.array.shape == (3, 8, 8)
    np.testing.assert_allclose(chosen.spacing, [0.8, 0.8, 2.5])
    with pytest.raises(InputError, match="1.2.3.4.9"):
        read_volume(folder, series_uid="1.2.3.4.9")


@pytest.mark.parametrize("suffix, dtype", [(".nrrd", np.float32), (".nii", np.float32), (".nii.gz", np.float64)])
def test_nan_and_infinite_voxels_are_replaced_with_one_warning_that_counts_them(tmp_path, caplog, suffix, dtype):
    """ITK's NIfTI reader reads NaN and infinities as 0 without a word: they are found in the file itself."""
    array = np.random.default_rng(0).uniform(10, 100, size=(3, 4, 5)).astype(dtype)
    low, high = float(array.min()), float(array.max())
    array[0, 0, :4] = np.nan
    array[1, 2, 3], array[2, 3, 4] = np.inf, -np.inf
    path = tmp_path / f"resampled{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    volume = read_volume(path)
    assert [record.message for record in caplog.records] == [
        f"{path}: 6 of 60 voxels are NaN or infinite; they are read as {low:g} (NaN, -Inf: the lowest value of the "
        f"image) and {high:g} (+Inf: the highest)"]
    assert volume.array[0, 0, :4].tolist() == [low] * 4 and volume.array[2, 3, 4] == low
    assert volume.array[1, 2, 3] == high and np.isfinite(volume.array).all()
    finite = np.isfinite(array)
    assert np.array_equal(volume.array[finite], array[finite])
    assert np.isnan(read_volume(path, finite=False).array).sum() == 4


def test_non_finite_voxels_are_found_across_chunk_boundaries_in_either_byte_order():
    from clisc.nifti import Layout, _scan

    values = np.random.default_rng(0).uniform(-5, 5, size=1000)
    values[[0, 17, 18, 500, 999]] = [np.nan, np.inf, -np.inf, np.nan, np.nan]
    for dtype in (np.dtype(">f8"), np.dtype("<f4")):
        data = b"header" * 59 + values.astype(dtype).tobytes() + b"trailing bytes"
        layout = Layout((10, 100), 354, 354 + values.size * dtype.itemsize, dtype)
        size, found = _scan([data[start:start + 7] for start in range(0, len(data), 7)], layout)
        assert size == len(data) and found.indices.tolist() == [0, 17, 18, 500, 999]
        np.testing.assert_array_equal(found.values, values[[0, 17, 18, 500, 999]])


def test_png_and_jpg_become_one_slice_volumes(tmp_path):
    from PIL import Image

    rgb = np.zeros((30, 40, 3), dtype=np.uint8)
    rgb[10:20, 5:15] = (200, 100, 50)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    Image.fromarray(rgb).save(tmp_path / "image.jpg", quality=100)
    for name in ("image.png", "image.jpg"):
        volume = read_volume(tmp_path / name)
        assert volume.array.shape == (1, 30, 40)
        assert volume.acquisition_axis() == 0
        expected = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
        assert abs(float(volume.array[0, 15, 10]) - expected) < 3
        assert float(volume.array[0, 0, 0]) < 3


def test_busi_png_with_its_mask_round_trips(tmp_path):
    image = shared_data("busi/benign/benign (1).png")
    mask_file = shared_data("busi/benign/benign (1)_mask.png")
    volume = read_volume(image)
    mask = read_volume(mask_file).array > 0
    assert volume.array.shape == mask.shape and volume.array.shape[0] == 1
    output = tmp_path / "lesion.nii.gz"
    write_masks(output, [mask], ["lesion"], volume)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert written.reshape(mask.shape).astype(bool).tolist() == mask.tolist()


def test_seg_nrrd_has_names_colours_and_overlapping_segments(tmp_path):
    volume = Volume(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    first = np.zeros(volume.array.shape, bool)
    first[1:3, 1:4, 2:5] = True
    second = np.zeros_like(first)
    second[2:4, 2:5, 3:6] = True
    output = tmp_path / "two.seg.nrrd"
    write_masks(output, [first, second], ["brain tumor", "edema"], volume)
    segmentation = slicerio.read_segmentation(str(output))
    names = [s["name"] for s in segmentation["segments"]]
    colours = [tuple(s["color"]) for s in segmentation["segments"]]
    assert names == ["brain tumor", "edema"]
    assert len(set(colours)) == 2
    for name, expected in zip(names, [first, second]):
        extracted = slicerio.extract_segments(segmentation, [(name, 1)])
        assert np.array_equal(extracted["voxels"].transpose(2, 1, 0) > 0, expected)


def test_writers_leave_no_temporary_file_and_refuse_missing_folder(tmp_path):
    volume = Volume(np.ones((2, 3, 4), np.float32), np.eye(4))
    write_volume(tmp_path / "map.nrrd", volume)
    assert [p.name for p in tmp_path.iterdir()] == ["map.nrrd"]
    with pytest.raises(InputError, match="does not exist"):
        write_volume(tmp_path / "missing" / "map.nrrd", volume)


def test_a_killed_writer_leaves_only_a_marked_partial_file_which_is_found_and_removed(tmp_path):
    (tmp_path / "cases").mkdir()
    target = tmp_path / "cases" / "case.nii.gz"
    left = atomic_path(target).__enter__()  # a writer killed before its rename: the context never exits
    left.write_bytes(b"half a volume")
    assert left.name.startswith(".case.nii.gz.") and left.name.endswith(".partial.nii.gz")
    keep = [tmp_path / ".hidden_user_file", tmp_path / "cases" / "other.partial_results.csv"]
    for path in keep:
        path.write_text("kept")
    assert remove_partial_files(tmp_path) == [left]
    assert not left.exists() and all(path.exists() for path in keep)


# Bad input: a clear InputError naming the file and the problem.

def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("name, content", [("corrupt.nii.gz", b"\x1f\x8b\x08garbage"), ("notes.nrrd", b"hello"),
                                           ("text.png", b"not a png")])
def test_corrupt_or_non_image_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=name):
        read_volume(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM"):
        read_volume(tmp_path)


def test_4d_volume(tmp_path):
    frames = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)) for _ in range(2)]
    path = tmp_path / "timeseries.nrrd"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    with pytest.raises(InputError, match="4D"):
        read_volume(path)


def test_empty_image(tmp_path):
    path = tmp_path / "empty.nrrd"
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 0 4 4\nencoding: raw\n\n")
    with pytest.raises(InputError, match="empty.nrrd"):
        read_volume(path)


def noise_volume() -> Volume:
    """A 12×20×24 (K, J, I) float volume of noise (so that it compresses poorly), 0.8×0.9×2.5 mm."""
    array = np.random.default_rng(0).uniform(0, 100, size=(12, 20, 24)).astype(np.float32)
    return Volume(array, np.diag([0.8, 0.9, 2.5, 1.0]))


@pytest.mark.parametrize("source", ["written by write_volume", "BraTS FLAIR"])
def test_truncated_nifti_is_refused(tmp_path, source):
    """SimpleITK reads a NIfTI cut short (a partial copy or download) without complaint, the missing voxels as
    zeros: it must be refused, naming the file. Three cuts: the gzip stream cut short (the reported
    `head -c 217567 flair.nii.gz`), an uncompressed .nii cut short, and a complete gzip stream of a cut .nii."""
    if source == "BraTS FLAIR":
        original, cut = shared_data("brats2015/pat0001/flair.nii.gz"), 217567
    else:
        original = tmp_path / "whole.nii.gz"
        write_volume(original, noise_volume())
        cut = original.stat().st_size // 2
    assert read_volume(original).array.ndim == 3  # the whole file reads
    content = original.read_bytes()
    uncompressed = gzip.decompress(content)
    cuts = {
        "cut.nii.gz": content[:cut],
        "cut.nii": uncompressed[:-1000],
        "complete_gzip_of_cut.nii.gz": gzip.compress(uncompressed[:-1000]),
    }
    for name, data in cuts.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=rf"{name}: the file is truncated or corrupt.*Copy or export it again"):
            read_volume(tmp_path / name)
    (tmp_path / "whole.nii").write_bytes(uncompressed)
    assert read_volume(tmp_path / "whole.nii").array.shape == read_volume(original).array.shape


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha"])
def test_image_with_a_zero_length_dimension_is_refused(tmp_path, suffix):
    """A 16×16×0 image: SimpleITK reads a NIfTI one as 16×16×1, so the header itself is checked."""
    one_slice = tmp_path / f"one_slice{suffix}"
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkFloat32), str(one_slice))
    assert read_volume(one_slice).array.shape == (1, 16, 16)
    content = gzip.decompress(one_slice.read_bytes()) if suffix == ".nii.gz" else one_slice.read_bytes()
    if suffix == ".mha":
        content = content.replace(b"DimSize = 16 16 1", b"DimSize = 16 16 0")
    else:
        assert struct.unpack_from("<4h", content, 40) == (3, 16, 16, 1)
        content = content[:46] + struct.pack("<h", 0) + content[48:]
    empty = tmp_path / f"no_slices{suffix}"
    empty.write_bytes(gzip.compress(content) if suffix == ".nii.gz" else content)
    with pytest.raises(InputError, match=rf"no_slices{suffix}: .*16 × 16 × 0.*has 0 slices"):
        read_volume(empty)


def test_seg_nrrd_writes_non_ascii_names_as_utf8_as_slicer_does(tmp_path, monkeypatch):
    """Slicer writes segment names as UTF-8 bytes in the NRRD header and reads them with ITK's NRRD reader
    (as SimpleITK does): that reader must return the names exactly. slicerio (via pynrrd, which drops
    non-ASCII header bytes) must still read the file: its segments, voxels and ASCII names."""
    volume = Volume(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    masks = [np.zeros(volume.array.shape, bool) for _ in range(3)]
    for index, mask in enumerate(masks):
        mask[index, 1:4, 2:5] = True
    names = ["tumeur cérébrale", "脑肿瘤", "edema"]
    output = tmp_path / "prompt.seg.nrrd"
    write_segmentation(output, masks, names, volume, tags=[{"prompt": name} for name in names])

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(output))
    reader.ReadImageInformation()
    assert [reader.GetMetaData(f"Segment{index}_Name") for index in range(3)] == names
    assert reader.GetMetaData("Segment0_Tags") == "prompt:tumeur cérébrale|"
    assert "Segment1_Name:=脑肿瘤\n".encode() in output.read_bytes().split(b"\n\n")[0] + b"\n"
    segmentation = slicerio.read_segmentation(str(output))
    assert len(segmentation["segments"]) == 3 and segmentation["segments"][2]["name"] == "edema"
    edema = slicerio.extract_segments(segmentation, [("edema", 1)])["voxels"].transpose(2, 1, 0) > 0
    assert np.array_equal(edema, masks[2])

    def fail(path, utf8):  # a failure (disk full, cancellation) after slicerio wrote the temporary file
        raise OSError("no space left on device")

    monkeypatch.setattr(writers, "_restore_utf8", fail)
    (tmp_path / "failed").mkdir()
    with pytest.raises(WriteError, match="no space.*Nothing was written under that name"):
        write_masks(tmp_path / "failed" / "prompt.seg.nrrd", masks, names, volume)
    assert list((tmp_path / "failed").iterdir()) == []


def test_segment_names_read_back_exactly_from_clisc_and_slicer_files(tmp_path):
    """pynrrd drops non-ASCII header bytes ("tumeur crbrale", "", "tumor"); `read_segmentation` must not. Slicer's
    file is slicerio's sample, written by 3D Slicer, with one name changed to the UTF-8 bytes Slicer writes."""
    volume = Volume(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    names = ["tumeur cérébrale", "脑肿瘤", "🧠 tumor 🎯", "edema"]
    masks = [np.zeros(volume.array.shape, bool) for _ in names]
    for index, mask in enumerate(masks):
        mask[index, 1:4, index:index + 2] = True
    write_segmentation(tmp_path / "clisc.seg.nrrd", masks, names, volume)
    segmentation = read_segmentation(tmp_path / "clisc.seg.nrrd")
    assert [segment["name"] for segment in segmentation["segments"]] == names
    for name, mask in zip(names, masks):
        assert np.array_equal(slicerio.extract_segments(segmentation, [(name, 1)])["voxels"].transpose(2, 1, 0) > 0,
                              mask)

    sample = Path(slicerio.__file__).parent / "data" / "Segmentation.seg.nrrd"
    content = sample.read_bytes()
    assert b"Segment0_Name:=ribs\n" in content
    (tmp_path / "slicer.seg.nrrd").write_bytes(
        content.replace(b"Segment0_Name:=ribs\n", "Segment0_Name:=côtes 肋骨 🦴\n".encode()))
    original = [segment["name"] for segment in slicerio.read_segmentation(str(sample))["segments"]]
    assert [segment["name"] for segment in read_segmentation(tmp_path / "slicer.seg.nrrd")["segments"]] == [
        "côtes 肋骨 🦴", *original[1:]]
    assert [segment["name"] for segment in read_segmentation(sample)["segments"]] == original


def test_mhd_header_refers_to_its_data_file_by_the_final_name(tmp_path, monkeypatch):
    volume = noise_volume()
    output = tmp_path / "out.mhd"
    for array in (volume.array, volume.array * 2):  # a new file, then an overwrite
        write_volume(output, volume, array)
        assert "ElementDataFile = out.zraw\n" in output.read_text()
        assert sorted(path.name for path in tmp_path.iterdir()) == ["out.mhd", "out.zraw"]
        image = sitk.ReadImage(str(output))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
        np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.9, 2.5))
    write_masks(tmp_path / "mask.mhd", [volume.array > 50], ["noise"], volume)
    assert "ElementDataFile = mask.zraw\n" in (tmp_path / "mask.mhd").read_text()
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.mhd"))), volume.array > 50)

    def fail(temporary, path):  # fails once SimpleITK has written the temporary header and data
        raise OSError("no space left on device")

    monkeypatch.setattr(writers, "_keep_mode", fail)
    (tmp_path / "failed").mkdir()
    with pytest.raises(WriteError, match="no space.*Nothing was written under that name"):
        write_volume(tmp_path / "failed" / "out.mhd", volume)
    assert list((tmp_path / "failed").iterdir()) == []


def test_outputs_get_the_umask_mode_and_an_overwrite_keeps_the_existing_mode(tmp_path):
    """New files get 0666 minus the umask, as other tools give them (not tempfile's 0600); a file that
    replaces an existing one keeps that file's mode, as `cp` does."""
    volume = noise_volume()
    mask = volume.array > 50
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    previous = os.umask(0o027)
    try:
        write_volume(tmp_path / "map.nii.gz", volume)
        write_masks(tmp_path / "mask.seg.nrrd", [mask], ["tumeur cérébrale"], volume)
        write_masks(tmp_path / "mask.mhd", [mask], ["noise"], volume)
        write_bytes(tmp_path / "run.json", b"{}")
        assert {path.name: mode(path) for path in tmp_path.iterdir()} == {
            name: 0o640 for name in ["map.nii.gz", "mask.seg.nrrd", "mask.mhd", "mask.zraw", "run.json"]
        }
        for name, existing_mode in [("map.nii.gz", 0o644), ("run.json", 0o604), ("mask.mhd", 0o664),
                                    ("mask.zraw", 0o660)]:
            (tmp_path / name).chmod(existing_mode)
        write_volume(tmp_path / "map.nii.gz", volume, volume.array * 2)
        write_bytes(tmp_path / "run.json", b"[]")
        write_masks(tmp_path / "mask.mhd", [~mask], ["noise"], volume)
        assert mode(tmp_path / "map.nii.gz") == 0o644 and mode(tmp_path / "run.json") == 0o604
        assert mode(tmp_path / "mask.mhd") == 0o664 and mode(tmp_path / "mask.zraw") == 0o660
        assert (tmp_path / "run.json").read_bytes() == b"[]"
    finally:
        os.umask(previous)
