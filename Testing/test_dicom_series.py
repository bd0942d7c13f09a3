"""A DICOM folder as a volume: a series that is no regular stack of slices is refused, saying what and where
(ITK would spread it over a uniform grid the data are not on); a series without a UID can be chosen.

The synthetic series are oblique CT stacks written with pydicom (`test_dicom_seg.write_series`), then damaged
file by file as a copy or a scanner damages them; the real one is ../shared/data's CT series without a file.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from clisc.cli import main  # noqa: E402
from clisc.dicom_seg import series_files  # noqa: E402
from clisc.errors import InputError  # noqa: E402
from clisc.readers import read_volume  # noqa: E402
from conftest import shared_data  # noqa: E402
from test_dicom_seg import fake_zero_shot, rotation, write_series  # noqa: E402

SPACING_MM = 2.5


@pytest.fixture
def series(tmp_path):
    """An oblique 8-slice series; returns (folder, the file of each slice k, in order, the slice normal)."""
    directions = rotation(25, 35)
    folder = tmp_path / "series"
    write_series(folder, np.random.default_rng(0).integers(0, 500, (8, 12, 10)), directions,
                 spacing=(0.7, 0.9, SPACING_MM))
    along = {path: np.asarray(pydicom.dcmread(path).ImagePositionPatient, float) @ directions[:, 2]
             for path in folder.iterdir()}
    return folder, sorted(along, key=along.get), directions[:, 2]


def edit(path, **values) -> None:
    dataset = pydicom.dcmread(path)
    for name, value in values.items():
        setattr(dataset, name, value)
    dataset.save_as(path)


def moved(path, offset) -> list[str]:
    return [f"{value:.6f}" for value in np.asarray(pydicom.dcmread(path).ImagePositionPatient, float) + offset]


def test_a_regular_series_reads_and_a_jitter_below_the_tolerance_is_accepted(series):
    folder, files, normal = series
    assert read_volume(folder).array.shape == (8, 12, 10)
    edit(files[3], ImagePositionPatient=moved(files[3], 0.004 * normal))  # rounding in the file's text
    np.testing.assert_allclose(read_volume(folder).spacing[2], SPACING_MM, atol=1e-6)


@pytest.mark.parametrize("missing", [[3], [3, 4]])
def test_a_missing_slice_is_refused_naming_its_neighbours(series, missing):
    folder, files, _ = series
    for k in missing:
        files[k].unlink()
    before, after = files[missing[0] - 1].name, files[missing[-1] + 1].name
    count = f"{len(missing)} slice{'s are' if len(missing) > 1 else ' is'} missing"
    gap = (len(missing) + 1) * SPACING_MM
    with pytest.raises(InputError, match=rf"{count} between {before} at .* and {after} at .* \({gap:g} mm apart\)"):
        read_volume(folder)


def test_two_images_of_one_slice_are_refused(series):
    folder, files, _ = series
    copy = folder / "copy_of_slice_5"
    shutil.copy(files[5], copy)
    edit(copy, SOPInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(InputError, match="are at the same place"):
        read_volume(folder)


def test_an_irregular_gap_is_refused(series):
    folder, files, normal = series
    for path in files[4:]:
        edit(path, ImagePositionPatient=moved(path, 0.6 * normal))
    with pytest.raises(InputError, match=rf"{files[3].name} at .* and {files[4].name} at .* are 3.1 mm apart"):
        read_volume(folder)


def test_slices_of_another_orientation_are_refused(series):
    folder, files, _ = series
    edit(files[6], ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])
    with pytest.raises(InputError, match=rf"mixes slice orientations: {files[6].name} has \(1, 0, 0, 0, 1, 0\)"):
        read_volume(folder)


def test_a_gantry_tilt_is_refused(series):
    """Equal gaps along the normal, but each slice shifted in its plane: ITK would stack them straight."""
    folder, files, _ = series
    row = np.asarray(pydicom.dcmread(files[0]).ImageOrientationPatient, float)[:3]
    for k, path in enumerate(files):
        edit(path, ImagePositionPatient=moved(path, 0.3 * k * row))
    with pytest.raises(InputError, match="do not run along their normal"):
        read_volume(folder)


def test_a_dicom_seg_of_a_series_missing_a_slice_is_refused_before_any_work(series, tmp_path, monkeypatch, capsys):
    folder, files, _ = series
    files[3].unlink()
    fake_zero_shot(monkeypatch, lambda volume: pytest.fail("the segmenter ran"))
    for output in ("out.dcm", "out.nii.gz"):
        assert main(["segment", str(folder), "--prompt", "liver", "-o", str(tmp_path / output)]) == 2
        assert "1 slice is missing" in capsys.readouterr().err
        assert not (tmp_path / output).exists()


def test_the_real_ct_series_without_its_11th_file_is_refused(tmp_path):
    """The reported case: ITK read 19 slices at 2.111 mm; the truth is 2 mm with one 4 mm gap."""
    real = shared_data("ct_dicom/series")
    names = sorted(path.name for path in real.iterdir())
    folder = tmp_path / "series"
    folder.mkdir()
    for name in names[:10] + names[11:]:
        shutil.copy(real / name, folder / name)
    np.testing.assert_allclose(read_volume(real).spacing[2], 2.0)
    with pytest.raises(InputError) as refused:
        read_volume(folder)
    message = str(refused.value)
    assert "slices are 2 mm apart except: 1 slice is missing between" in message and "(4 mm apart)" in message
    assert names[9] in message and names[11] in message  # its neighbours, in either order along the normal


def test_a_series_without_a_uid_is_named_and_chosen_by_one_of_its_files(tmp_path, caplog):
    folder = tmp_path / "study"
    for name, count, anonymised in (("named", 6, False), ("anonymous", 4, True)):
        write_series(tmp_path / name, np.full((count, 8, 8), count), np.eye(3), anonymised=anonymised)
        for path in (tmp_path / name).iterdir():
            folder.mkdir(exist_ok=True)
            path.rename(folder / f"{name}_{path.name}")
    assert read_volume(folder).array.shape == (6, 8, 8)
    assert "the series without a SeriesInstanceUID (4 files, e.g. anonymous_IM" in caplog.text
    assert "--series UID_OR_FILE" in caplog.text
    chosen = read_volume(folder, series_uid="anonymous_IM0002")
    assert chosen.array.shape == (4, 8, 8) and (chosen.array == 4).all()
    assert sorted(path.name for path in series_files(folder, "anonymous_IM0002")) == [
        f"anonymous_IM{n:04d}" for n in range(4)]
    with pytest.raises(InputError, match="no DICOM series has the UID or a file named 'IM0099'"):
        read_volume(folder, series_uid="IM0099")
