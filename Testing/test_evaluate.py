"""`clisc evaluate`: scores of constructed masks known by hand (anisotropic voxels), the empty-case rule, grid
mismatches, missing cases, a RUN_DIR, the JSON/CSV/PNG outputs, and a real BraTS label against itself shifted."""
from __future__ import annotations

import csv
import json
import math
import sys
import unicodedata
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from clisc.cli import build_parser, main
from clisc.evaluate import read_case_list
from clisc.metrics import EMPTY_CASE_RULE, NSD_TOLERANCE_MM
from clisc.readers import read_volume
from clisc.writers import write_masks
from conftest import shared_data

SPACING = (1.5, 4.0, 4.0)  # mm along i, j, k (SimpleITK's order)
ORIGIN = (10.0, -5.0, 3.0)
DIAGONAL_MM = math.sqrt((20 * 1.5) ** 2 + (20 * 4.0) ** 2 + (10 * 4.0) ** 2)  # of the (10, 20, 20) grid


def box(shift_i: int = 0) -> np.ndarray:
    """A 3×5×5 box (K, J, I) in a (10, 20, 20) grid, shifted by ``shift_i`` voxels along i."""
    mask = np.zeros((10, 20, 20), np.uint8)
    mask[2:5, 5:10, 5 + shift_i:10 + shift_i] = 1
    return mask


def save(path, array, spacing=SPACING, origin=ORIGIN, direction=None):
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def run(capsys, *args):
    code = main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_boxes_offset_along_the_fine_axis_score_what_is_computed_by_hand(tmp_path, capsys):
    prediction, label = save(tmp_path / "case1.nii.gz", box(2)), save(tmp_path / "truth.nii.gz", box())
    code, out, _ = run(capsys, prediction, label, "--json", tmp_path / "r.json")
    assert code == 0
    scores = json.loads((tmp_path / "r.json").read_text())["cases"]["case1"]
    # Overlap 3×5×3 of 75 voxels each: Dice 0.6. Each box has 66 surface voxels: 36 shared, 12 one voxel (1.5 mm)
    # and 18 two voxels (3 mm) along i from the other surface (along j or k a voxel is 4 mm). NSD at 2 mm
    # counts 36 + 12 of 66 on each side; the 95th percentile of the distances is 3 mm.
    assert scores == {"dice": pytest.approx(0.6), "hd95_mm": pytest.approx(3.0), "nsd": pytest.approx(48 / 66),
                      "predicted_voxels": 75, "truth_voxels": 75}
    assert "case1" in out and "0.6000" in out and "NSD 2 mm" in out and EMPTY_CASE_RULE in out

    code, out, _ = run(capsys, prediction, label, "--nsd-tolerance", "1", "--json", tmp_path / "r.json",
                       "--overwrite")
    assert code == 0 and "NSD 1 mm" in out
    assert json.loads((tmp_path / "r.json").read_text())["cases"]["case1"]["nsd"] == pytest.approx(36 / 66)


def test_empty_cases_follow_the_rule_and_are_counted(tmp_path, capsys):
    predictions, labels = tmp_path / "pred", tmp_path / "lab"
    predictions.mkdir(), labels.mkdir()
    empty = np.zeros_like(box())
    for case, prediction, label in (("both_empty", empty, empty), ("missed", empty, box()),
                                    ("false_alarm", box(), empty), ("exact", box(), box())):
        save(predictions / f"{case}.nii.gz", prediction), save(labels / f"{case}.nii.gz", label)
    code, out, _ = run(capsys, predictions, labels, "--json", tmp_path / "r.json")
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    scores = {case: (s["dice"], s["nsd"], s["hd95_mm"]) for case, s in report["cases"].items()}
    assert scores == {"both_empty": (1.0, 1.0, 0.0), "exact": (1.0, 1.0, 0.0),
                      "missed": (0.0, 0.0, pytest.approx(DIAGONAL_MM)),
                      "false_alarm": (0.0, 0.0, pytest.approx(DIAGONAL_MM))}
    summary = report["summary"]
    assert (summary["cases"], summary["empty_predictions"], summary["empty_labels"]) == (4, 2, 2)
    assert summary["mean"] == {"dice": 0.5, "nsd": 0.5, "hd95_mm": pytest.approx(DIAGONAL_MM / 2)}
    assert summary["median"] == {"dice": 0.5, "nsd": 0.5, "hd95_mm": pytest.approx(DIAGONAL_MM / 2)}
    assert report["empty_case_rule"] == EMPTY_CASE_RULE
    assert "empty predictions: 2, empty labels: 2" in out and f"empty cases: {EMPTY_CASE_RULE}" in out


@pytest.mark.parametrize("change, shown", [
    ({"spacing": (1.5, 4.0, 5.0)}, "spacing 1.5 4 5 mm"),
    ({"origin": (10.0, -5.0, 4.0)}, "origin 10 -5 4 mm (LPS)"),
    ({"direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}, "direction 0 1 0 1 0 0 0 0 1"),
])
def test_a_label_on_another_grid_is_refused_naming_both_grids(tmp_path, capsys, change, shown):
    prediction = save(tmp_path / "case.nii.gz", box())
    label = save(tmp_path / "label.nii.gz", box(), **change)
    code, _, err = run(capsys, prediction, label)
    assert code == 2
    assert "different voxel grids" in err and str(prediction) in err and str(label) in err
    assert "spacing 1.5 4 4 mm, origin 10 -5 3 mm (LPS), direction 1 0 0 0 1 0 0 0 1" in err and shown in err
    assert "Nothing is resampled" in err


def test_a_label_of_another_shape_is_refused(tmp_path, capsys):
    prediction = save(tmp_path / "case.nii.gz", box())
    code, _, err = run(capsys, prediction, save(tmp_path / "label.nii.gz", box()[:, :, :18]))
    assert code == 2 and "20 × 20 × 10 voxels" in err and "18 × 20 × 10 voxels" in err


def test_folders_report_cases_missing_a_label_or_a_prediction(tmp_path, capsys):
    predictions, labels = tmp_path / "pred", tmp_path / "lab"
    predictions.mkdir(), labels.mkdir()
    save(predictions / "a.nii.gz", box(2)), save(labels / "a.nii.gz", box())
    save(predictions / "b.nii.gz", box())     # no label
    save(labels / "c.nii.gz", box())          # no prediction
    save(predictions / ".a.nii.gz.1234.partial.nii.gz", box())  # an interrupted write: ignored
    (predictions / "notes.txt").write_text("not a volume")
    code, out, _ = run(capsys, predictions, labels, "--json", tmp_path / "r.json")
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["cases"]) == ["a"] and report["cases"]["a"]["dice"] == pytest.approx(0.6)
    assert report["not_evaluated"] == {"b": "no label", "c": "no prediction"}
    assert "not evaluated: b (no label), c (no prediction)" in out

    cases = tmp_path / "test.txt"
    cases.write_text("# held-out cases\na\nd\n")
    code, out, _ = run(capsys, predictions, labels, "--cases", cases, "--json", tmp_path / "r.json", "--overwrite")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and list(report["cases"]) == ["a"]
    assert report["not_evaluated"] == {"d": "no prediction and no label"}

    cases.write_text("b\nc\n")
    code, _, err = run(capsys, predictions, labels, "--cases", cases)
    assert code == 2 and "no case has both a prediction and a label" in err


def test_case_lists_are_text_or_csv(tmp_path):
    (tmp_path / "a.txt").write_text("# test set\n p1 \n\np2\n")
    (tmp_path / "b.csv").write_text("split,case_id\ntest,p1\ntest,p2\n")
    (tmp_path / "c.csv").write_text("p1,extra\np2\n")
    for name in ("a.txt", "b.csv", "c.csv"):
        assert read_case_list(tmp_path / name) == ["p1", "p2"]


def test_one_labelmap_is_for_one_prediction(tmp_path, capsys):
    predictions = tmp_path / "pred"
    predictions.mkdir()
    save(predictions / "a.nii.gz", box()), save(predictions / "b.nii.gz", box())
    code, _, err = run(capsys, predictions, save(tmp_path / "label.nii.gz", box()))
    assert code == 2 and "one labelmap but" in err and "2 predictions" in err


def test_run_dir_with_a_labels_csv_and_the_cohort_images_in_the_montage(tmp_path, capsys):
    cohort, run_dir, labels = tmp_path / "cohort", tmp_path / "run", tmp_path / "labels"
    for folder in (cohort, run_dir / "predictions", labels):
        folder.mkdir(parents=True)
    rows = ["case_id,label"]
    for n, case in enumerate(("p1", "p2", "p3")):
        ramp = np.broadcast_to(np.linspace(0, 100, 20, dtype=np.float32)[:, None], box().shape)
        save(cohort / f"{case}.nii.gz", ramp + 150.0 * box())
        save(run_dir / "predictions" / f"{case}.nii.gz", box(n))
        save(labels / f"{case}_seg.nii.gz", box())
        rows.append(f"{case},labels/{case}_seg.nii.gz")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "config.json").write_text(json.dumps({"cohort": str(cohort), "prompt": "tumour"}))
    code, out, _ = run(capsys, run_dir, tmp_path / "labels.csv", "--csv", tmp_path / "r.csv",
                       "--montage", tmp_path / "m.png")
    assert code == 0
    with open(tmp_path / "r.csv", newline="") as file:
        table = {row["case_id"]: row for row in csv.DictReader(file)}
    # shifts of 0, 1, 2 voxels along i: overlaps of 5, 4, 3 columns of the 5
    assert {case: float(row["dice"]) for case, row in table.items()} == {
        "p1": pytest.approx(1.0), "p2": pytest.approx(0.8), "p3": pytest.approx(0.6)}
    assert float(table["p3"]["hd95_mm"]) == pytest.approx(3.0) and table["p3"]["truth_voxels"] == "75"
    assert list(table["p1"]) == ["case_id", "dice", "hd95_mm", "nsd", "predicted_voxels", "truth_voxels"]
    pixels = np.asarray(Image.open(tmp_path / "m.png").convert("RGB")).astype(int)
    # two worst (p3, p2) and one best (p1) over their images (a grey ramp along j)
    assert pixels.shape[:2] == (int((3.4 * 2 + 0.4) * 100), int(3.2 * 2 * 100))
    assert grey_fraction(pixels) > 0.05
    assert contour_pixels(pixels) == (True, True)


def grey_fraction(pixels: np.ndarray) -> float:
    """The fraction of the PNG's pixels (H, W, 3) that are mid-grey (neither black, white nor coloured)."""
    grey = (pixels.max(axis=-1) - pixels.min(axis=-1) < 4) & (pixels[..., 0] > 40) & (pixels[..., 0] < 215)
    return float(grey.mean())


def contour_pixels(pixels: np.ndarray) -> tuple[bool, bool]:
    """Whether the PNG's pixels (H, W, 3) hold the ground truth's lime and the prediction's magenta."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    lime = (green > 200) & (red < 80) & (blue < 80)
    magenta = (red > 200) & (blue > 200) & (green < 80)
    return bool(lime.sum() > 20), bool(magenta.sum() > 20)


def test_montage_without_images_has_a_black_background(tmp_path, capsys):
    predictions, labels = tmp_path / "pred", tmp_path / "lab"
    predictions.mkdir(), labels.mkdir()
    for n in range(7):
        save(predictions / f"c{n}.nii.gz", box(n % 4)), save(labels / f"c{n}.nii.gz", box())
    code, out, _ = run(capsys, predictions, labels, "--montage", tmp_path / "m.png")
    assert code == 0 and f"wrote {tmp_path / 'm.png'}" in out
    pixels = np.asarray(Image.open(tmp_path / "m.png").convert("RGB")).astype(int)
    assert pixels.shape[:2] == (int((3.4 * 2 + 0.4) * 100), int(3.2 * 3 * 100))
    assert contour_pixels(pixels) == (True, True)
    assert (pixels.max(axis=-1) < 10).mean() > 0.2 and grey_fraction(pixels) < 0.01  # six black backgrounds


def test_segmentation_predictions_score_any_or_one_named_segment(tmp_path, capsys):
    label = save(tmp_path / "label.nii.gz", box())
    tumour, oedema = box().astype(bool), box(5).astype(bool)
    write_masks(tmp_path / "case.seg.nrrd", [tumour, oedema], ["tumour", "oedema"], read_volume(label))
    code, _, _ = run(capsys, tmp_path / "case.seg.nrrd", label, "--segment", "tumour", "--json", tmp_path / "r.json")
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["cases"]["case"]["dice"] == 1.0
    code, _, _ = run(capsys, tmp_path / "case.seg.nrrd", label, "--json", tmp_path / "r.json", "--overwrite")
    scores = json.loads((tmp_path / "r.json").read_text())["cases"]["case"]
    assert code == 0 and scores["predicted_voxels"] == 150 and scores["dice"] == pytest.approx(2 * 75 / 225)
    code, _, err = run(capsys, tmp_path / "case.seg.nrrd", label, "--segment", "edema")
    assert code == 2 and "no segment named 'edema'" in err and "tumour, oedema" in err


def test_label_value_selects_one_label(tmp_path, capsys):
    labels = box() + 2 * box(5)  # 1 in the first box, 2 in the next one along i
    label = save(tmp_path / "label.nii.gz", labels.astype(np.uint8))
    prediction = save(tmp_path / "case.nii.gz", box(5))
    for value, expected in (("2", 1.0), ("1", 0.0)):
        code, out, _ = run(capsys, prediction, label, "--label", value)
        assert code == 0 and f"case    {expected:6.4f}" in out and f"label == {value}" in out


def test_outputs_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    prediction, label = save(tmp_path / "case.nii.gz", box()), save(tmp_path / "label.nii.gz", box())
    (tmp_path / "r.json").write_text("{}")
    code, out, err = run(capsys, prediction, label, "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert code == 2 and "exists" in err and "--overwrite" in err and out == ""
    assert not (tmp_path / "r.csv").exists()
    code, _, err = run(capsys, prediction, label, "--montage", tmp_path / "m.jpg")
    assert code == 2 and "--montage must end with one of .png" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, out, err = run(capsys, prediction, label, "--montage", tmp_path / "m.png", "--csv", tmp_path / "r.csv")
    assert code == 2 and "pip install matplotlib" in err and out == ""
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "m.png").exists()


def test_the_command_line_default_tolerance_is_the_metrics_one():
    assert build_parser().parse_args(["evaluate", "p", "l"]).nsd_tolerance == NSD_TOLERANCE_MM


@pytest.mark.slow
def test_brats_label_against_itself_shifted_by_two_voxels(tmp_path, capsys):
    label_file = shared_data("brats2015/pat0001/label.nii.gz")
    image = sitk.ReadImage(str(label_file))
    truth = sitk.GetArrayFromImage(image) > 0
    shifted = np.zeros_like(truth)
    shifted[:, :, 2:] = truth[:, :, :-2]  # 2 voxels (2 mm) along i; the tumour is far from the edge
    assert truth[:, :, -2:].sum() == 0 and truth.sum() > 10000
    prediction = sitk.GetImageFromArray(shifted.astype(np.uint8))
    prediction.CopyInformation(image)
    sitk.WriteImage(prediction, str(tmp_path / "pat0001.nii.gz"))
    code, _, _ = run(capsys, tmp_path / "pat0001.nii.gz", label_file, "--json", tmp_path / "r.json")
    assert code == 0
    scores = json.loads((tmp_path / "r.json").read_text())["cases"]["pat0001"]
    assert scores["dice"] == pytest.approx(2 * (truth & shifted).sum() / (2 * truth.sum()), abs=1e-6)
    assert 0.5 < scores["dice"] < 0.99
    # The shift moves every surface voxel 2 mm: no voxel of either surface is further than 2 mm from the other.
    assert scores["nsd"] == pytest.approx(1.0) and 0.5 < scores["hd95_mm"] <= 2.0 + 1e-6
    code, _, _ = run(capsys, tmp_path / "pat0001.nii.gz", label_file, "--nsd-tolerance", "0.5", "--json",
                     tmp_path / "r.json", "--overwrite")
    strict = json.loads((tmp_path / "r.json").read_text())["cases"]["pat0001"]
    # On a 1 mm grid, within 0.5 mm means on both surfaces (a surface voxel: in the mask, not in its erosion).
    surfaces = [mask & ~ndimage.binary_erosion(mask) for mask in (truth, shifted)]
    shared = (surfaces[0] & surfaces[1]).sum()
    assert code == 0 and strict["nsd"] == pytest.approx(2 * shared / (surfaces[0].sum() + surfaces[1].sum()))
    assert 0.05 < strict["nsd"] < 0.5


def test_predictions_and_labels_that_are_not_masks_are_refused_naming_the_file(tmp_path, capsys):
    """A saliency map given as the prediction counted its NaN as 9145 "predicted" voxels; a label's NaN was
    background. A float labelmap of whole numbers is a mask."""
    label, prediction = save(tmp_path / "label.nii.gz", box()), save(tmp_path / "case.nii.gz", box())
    with_nan = box().astype(np.float32)
    with_nan[0, :3, :3] = np.nan
    fraction = box() * np.float32(0.75)
    for name, array, what in (("nan.nii.gz", with_nan, "9 of its 4000 voxels are NaN or infinite"),
                              ("fraction.nii.gz", fraction, "75 of its 4000 voxels hold fractions (e.g. 0.75)")):
        path = save(tmp_path / name, array)
        for arguments in ((path, label), (prediction, path)):
            code, out, err = run(capsys, *arguments)
            assert code == 2 and f"{path}: not a mask or labelmap: {what}" in err and out == ""
    code, out, _ = run(capsys, save(tmp_path / "floats.nii.gz", box().astype(np.float32)), label)
    assert code == 0 and "1.0000" in out


def test_a_label_value_in_no_label_is_refused_and_one_missing_from_some_is_named(tmp_path, capsys, caplog):
    predictions, labels = tmp_path / "pred", tmp_path / "lab"
    predictions.mkdir(), labels.mkdir()
    for case, values in (("a", box() + 2 * box(5)), ("b", box())):
        save(predictions / f"{case}.nii.gz", box(5)), save(labels / f"{case}.nii.gz", values.astype(np.uint8))
    code, out, err = run(capsys, predictions / "b.nii.gz", labels / "b.nii.gz", "--label", "7")
    assert code == 2 and "--label 7: no label holds the value 7" in err and "b.nii.gz: 0, 1)" in err and out == ""
    code, out, err = run(capsys, predictions, labels, "--label", "2")
    assert code == 0 and "a       1.0000" in out
    assert "--label 2: the labels of 1 of 2 cases do not hold the value 2 (b)" in caplog.text


def test_a_segmentation_without_segments_is_refused(tmp_path, capsys):
    label = save(tmp_path / "label.nii.gz", box())
    write_masks(tmp_path / "case.seg.nrrd", [], [], read_volume(label))
    code, _, err = run(capsys, tmp_path / "case.seg.nrrd", label)
    assert code == 2 and "case.seg.nrrd: the segmentation holds no segment" in err


def test_a_segment_named_in_any_script_is_found(tmp_path, capsys):
    """The reported case: --segment 脑肿瘤 found "no segment named '脑肿瘤'; its segments: tumeur crbrale, , tumor"."""
    label = save(tmp_path / "label.nii.gz", box())
    names = ["tumeur cérébrale", "脑肿瘤", "🧠 tumor 🎯"]
    write_masks(tmp_path / "case.seg.nrrd", [box(1), box(), box(5)], names, read_volume(label))
    for name, dice in zip(names, ("0.8000", "1.0000", "0.0000")):
        code, out, err = run(capsys, tmp_path / "case.seg.nrrd", label, "--segment", name)
        assert code == 0 and f"case    {dice}" in out, err
    decomposed = unicodedata.normalize("NFD", "tumeur cérébrale")  # as a macOS terminal may pass it
    assert decomposed != names[0]
    code, out, _ = run(capsys, tmp_path / "case.seg.nrrd", label, "--segment", decomposed)
    assert code == 0 and "case    0.8000" in out


def test_a_labels_csv_with_missing_files_names_all_of_them(tmp_path, capsys):
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for case in ("a", "b", "c"):
        save(predictions / f"{case}.nii.gz", box())
    save(tmp_path / "a_label.nii.gz", box())
    (tmp_path / "labels.csv").write_text("case_id,label\na,a_label.nii.gz\nb,gone/b.nii.gz\nc,gone/c.nii.gz\n")
    code, _, err = run(capsys, predictions, tmp_path / "labels.csv")
    assert code == 2 and "labels.csv: 2 of the label files it lists do not exist:" in err
    assert str(tmp_path / "gone" / "b.nii.gz") in err and str(tmp_path / "gone" / "c.nii.gz") in err


def test_monai_deprecation_warnings_stay_out_of_the_report(tmp_path, capsys):
    prediction, label = save(tmp_path / "case.nii.gz", box(2)), save(tmp_path / "label.nii.gz", box())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, _ = run(capsys, prediction, label)
    assert code == 0 and [str(warning.message) for warning in caught] == []
