"""`clisc evaluate`: score segmentation results against ground-truth labelmaps, case by case.

- Predictions: one labelmap (.nii.gz, .nii, .nrrd, .mha, .mhd) or Slicer segmentation (.seg.nrrd), a folder of
  such files named CASE_ID + suffix, or the RUN_DIR of `clisc train` (its predictions/CASE_ID.nii.gz).
  Foreground: label > 0 of a labelmap; any segment of a .seg.nrrd, or the one named by ``segment``.
- Labels: one labelmap (for one prediction), or a folder / CSV as `clisc.cohort.run.label_paths` reads them.
  Foreground: label > 0, or label == ``label_value``.
- What is not a mask is refused, naming the file: a labelmap holding NaN, infinite or fractional values (a
  probability or saliency map), a .seg.nrrd without segments, a ``label_value`` found in no label (one found
  in some labels only is scored, with a warning naming the others).

Masks are (K, J, I) bool arrays. A prediction must lie on its label's voxel grid (`check_same_grid`): it is
never resampled. Scores are `clisc.metrics.evaluate`'s (Dice, HD95 in mm, NSD at a tolerance in mm) with the
voxel spacing, empty masks scored by `clisc.metrics.EMPTY_CASE_RULE`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .cohort.cases import list_cohort, read_case_list
from .cohort.evaluation import label_paths
from .cohort.run_folder import RunFolder
from .errors import InputError
from .metrics import EMPTY_CASE_RULE, NSD_TOLERANCE_MM, evaluate
from .progress import ProgressCallback, no_progress
from .readers import VOLUME_SUFFIXES, read_segmentation, read_volume
from .volume import LPS_TO_RAS, Volume
from .writers import SEGMENTATION_SUFFIX

logger = logging.getLogger("clisc")

PREDICTION_SUFFIXES = (SEGMENTATION_SUFFIX,) + VOLUME_SUFFIXES  # .seg.nrrd before .nrrd
GRID_TOLERANCE_MM = 1e-3     # on every element of the voxel-to-patient matrices (spacing × direction, origin)
METRICS = ("dice", "hd95_mm", "nsd")
MONTAGE_CASES = 3            # the montage shows this many worst and best cases by Dice
TRUTH_COLOUR, PREDICTION_COLOUR = "lime", "magenta"


@dataclass
class Evaluation:
    """What to score: the prediction and label file of each case, and how to read their foreground.

    ``case_ids`` are the cases asked for (sorted); those missing a prediction or a label are not scored.
    """

    predictions: dict[str, Path]
    labels: dict[str, Path]
    case_ids: list[str]
    label_value: Optional[int] = None
    segment: Optional[str] = None

    def masks(self, case_id: str) -> tuple[Volume, Volume]:
        """The prediction's and the label's foreground (bool volumes) of one case, on the same grid."""
        prediction = read_mask(self.predictions[case_id], segment=self.segment)
        truth = read_mask(self.labels[case_id], value=self.label_value)
        check_same_grid(prediction, truth)
        return prediction, truth

    def foreground(self) -> str:
        truth = "label > 0" if self.label_value is None else f"label == {self.label_value}"
        prediction = (f"segment {self.segment!r}" if self.segment else "label > 0 (.seg.nrrd: any segment)")
        return f"labels: {truth}; predictions: {prediction}"


def match_cases(prediction: Path, labels: Path, cases_file: Optional[Path] = None,
                label_value: Optional[int] = None, segment: Optional[str] = None) -> Evaluation:
    """Pair predictions with labels by case id.

    The cases asked for are those of ``cases_file`` (see `read_case_list`) when given, else the one case of a
    single prediction file, else every case that has a prediction or a label.
    """
    predictions = prediction_paths(prediction)
    if not labels.exists():
        raise InputError(f"{labels}: no such labelmap, folder or CSV")
    if labels.is_file() and labels.suffix.lower() != ".csv":
        if len(predictions) != 1:
            raise InputError(f"{labels} is one labelmap but {prediction} holds {len(predictions)} predictions; "
                             "give a folder of CASE_ID.nii.gz labelmaps or a CSV with columns case_id,label")
        label_files = {next(iter(predictions)): labels}
    else:
        label_files = label_paths(labels)
    if cases_file is not None:
        case_ids = read_case_list(cases_file, "--cases")
    elif prediction.is_file():
        case_ids = list(predictions)
    else:
        case_ids = sorted(set(predictions) | set(label_files))
    missing = [str(label_files[case]) for case in sorted(case_ids) if case in label_files
               and not label_files[case].is_file()]
    if missing:
        raise InputError(f"{labels}: {len(missing)} of the label files it lists do not exist: {', '.join(missing)}")
    return Evaluation(predictions, label_files, sorted(case_ids), label_value, segment)


def case_id(path: Path) -> Optional[str]:
    """The file name without its volume suffix; None for a hidden file (a partial write) or a non-volume."""
    if path.name.startswith("."):
        return None
    suffix = next((s for s in PREDICTION_SUFFIXES if path.name.lower().endswith(s)), None)
    return path.name[:-len(suffix)] if suffix else None


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is the --out folder of `clisc train`."""
    return RunFolder(path).is_run() and RunFolder(path).predictions.is_dir()


def prediction_paths(prediction: Path) -> dict[str, Path]:
    """{case_id: file} of one prediction file, a folder of them, or a RUN_DIR's predictions/."""
    if not prediction.exists():
        raise InputError(f"{prediction}: no such prediction file or folder")
    if prediction.is_file():
        if case_id(prediction) is None:
            raise InputError(f"{prediction}: a prediction is a labelmap or a Slicer segmentation "
                             f"({', '.join(PREDICTION_SUFFIXES)})")
        return {case_id(prediction): prediction}
    folder = RunFolder(prediction).predictions if is_run_dir(prediction) else prediction
    found = {case_id(path): path for path in sorted(folder.iterdir()) if path.is_file() and case_id(path)}
    if not found:
        hint = " (`clisc train` writes them at the end of a run given --labels)" if folder != prediction else ""
        raise InputError(f"{folder}: holds no prediction file ({', '.join(PREDICTION_SUFFIXES)}){hint}")
    return found


def read_mask(path: Path, value: Optional[int] = None, segment: Optional[str] = None) -> Volume:
    """The foreground (K, J, I) bool of a labelmap (label > 0, or == ``value``) or of a .seg.nrrd (any segment,
    or the one named ``segment``), with its grid."""
    if path.name.lower().endswith(SEGMENTATION_SUFFIX):
        if value is not None:
            raise InputError(f"{path}: --label selects a value of a labelmap; this is a .seg.nrrd")
        return _read_segmentation(path, segment)
    if segment is not None:
        raise InputError(f"{path}: --segment selects a segment of a .seg.nrrd; this is a labelmap")
    volume = read_volume(path, finite=False)
    check_labelmap(volume.array, path)
    return volume.with_array(volume.array > 0 if value is None else volume.array == value)


def check_labelmap(array: np.ndarray, path: Path) -> None:
    """InputError naming ``path`` unless ``array`` holds whole numbers only (no NaN, infinity or fraction)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    fractional = finite & (array != np.round(array))
    if finite.all() and not fractional.any():
        return
    what = (f"{array.size - np.count_nonzero(finite)} of its {array.size} voxels are NaN or infinite"
            if not finite.all() else
            f"{np.count_nonzero(fractional)} of its {array.size} voxels hold fractions (e.g. {array[fractional][0]:g})")
    raise InputError(f"{path}: not a mask or labelmap: {what}. Give a labelmap of whole numbers (0 for the "
                     "background); threshold a probability or saliency map first")


def _read_segmentation(path: Path, segment: Optional[str]) -> Volume:
    try:
        segmentation = read_segmentation(path)
    except Exception as error:  # pynrrd and slicerio raise many kinds on a broken file
        raise InputError(f"{path}: not a readable Slicer segmentation ({error})") from None
    if not segmentation["segments"]:
        raise InputError(f"{path}: the segmentation holds no segment, so it has nothing to score (an empty segment "
                         "would score as an empty prediction); export it again with its segments")
    names = [s["name"] for s in segmentation["segments"]]
    wanted = segment and unicodedata.normalize("NFC", segment)  # as typed on macOS, "é" may come decomposed
    if segment is not None and wanted not in [unicodedata.normalize("NFC", name) for name in names]:
        raise InputError(f"{path}: no segment named {segment!r}; its segments: {', '.join(names)}")
    voxels = segmentation["voxels"]  # (I, J, K), or (layer, I, J, K) when segments overlap
    mask = np.zeros(voxels.shape[-3:], bool)
    for entry in segmentation["segments"]:
        if segment is None or unicodedata.normalize("NFC", entry["name"]) == wanted:
            layer = voxels[entry.get("layer", 0)] if voxels.ndim == 4 else voxels
            mask |= layer == entry.get("labelValue", 1)
    return Volume(mask.transpose(2, 1, 0), LPS_TO_RAS @ np.asarray(segmentation["ijkToLPS"], float), str(path))


def grid_text(volume: Volume) -> str:
    """The voxel grid in words: size (i × j × k), spacing (mm), origin (LPS mm) and direction cosines."""
    def numbers(values) -> str:
        return " ".join(f"{value:.6g}" for value in np.ravel(values))

    direction = volume.ijk_to_lps[:3, :3] / volume.spacing
    return (f"{' × '.join(map(str, volume.array.shape[::-1]))} voxels, spacing {numbers(volume.spacing)} mm, "
            f"origin {numbers(volume.ijk_to_lps[:3, 3])} mm (LPS), direction {numbers(direction)}")


def check_same_grid(volume: Volume, reference: Volume) -> None:
    """InputError naming both grids unless they have the same shape and voxel-to-patient matrix (within
    `GRID_TOLERANCE_MM`)."""
    if volume.array.shape == reference.array.shape and np.allclose(
            volume.ijk_to_ras, reference.ijk_to_ras, rtol=0, atol=GRID_TOLERANCE_MM):
        return
    raise InputError(f"{volume.source} and {reference.source} are on different voxel grids: {grid_text(volume)}; "
                     f"versus {grid_text(reference)}. Nothing is resampled: resample the prediction onto the "
                     "label's grid first (e.g. in 3D Slicer: Resample Image (BRAINS), nearest neighbour)")


def score(evaluation: Evaluation, nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
          progress: ProgressCallback = no_progress) -> dict:
    """The report: every scored case's `clisc.metrics.evaluate` under "cases", the reason each other case was
    not scored under "not_evaluated", `summarise`'s "summary", and what the numbers mean."""
    if not (np.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise InputError(f"--nsd-tolerance {nsd_tolerance_mm}: give a distance in mm, 0 or more")
    not_evaluated = {}
    for case in evaluation.case_ids:
        missing = [what for what, files in (("prediction", evaluation.predictions), ("label", evaluation.labels))
                   if case not in files]
        if missing:
            not_evaluated[case] = "no " + " and no ".join(missing)
    scored = [case for case in evaluation.case_ids if case not in not_evaluated]
    if not scored:
        raise InputError(f"no case has both a prediction and a label: predictions {_some(evaluation.predictions)}; "
                         f"labels {_some(evaluation.labels)}; cases asked for {_some(evaluation.case_ids)}")
    cases = {}
    for n, case in enumerate(scored):
        progress("evaluate", n, len(scored), case)
        prediction, truth = evaluation.masks(case)
        cases[case] = evaluate(prediction.array, truth.array, truth.spacing[::-1], nsd_tolerance_mm)
    progress("evaluate", len(scored), len(scored), "")
    _check_label_value(evaluation, cases)
    return {"foreground": evaluation.foreground(), "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "empty_case_rule": EMPTY_CASE_RULE, "cases": cases, "not_evaluated": not_evaluated,
            "summary": summarise(cases)}


def _check_label_value(evaluation: Evaluation, cases: dict[str, dict]) -> None:
    """InputError when ``label_value`` occurs in no scored label (a wrong value: every truth would be empty); a
    warning naming the cases whose label lacks it (scored against an empty truth)."""
    value = evaluation.label_value
    absent = [case for case, scores in cases.items() if scores["truth_voxels"] == 0]
    if value is None or not absent:
        return
    if len(absent) == len(cases):
        path = evaluation.labels[absent[0]]
        found = np.unique(read_volume(path, finite=False).array)
        raise InputError(f"--label {value}: no label holds the value {value}, so there is nothing to score (the "
                         f"values in {path}: {', '.join(f'{v:g}' for v in found[:20])}); give one of those")
    logger.warning("--label %d: the labels of %d of %d cases do not hold the value %d (%s): they are scored against an "
                   "empty truth", value, len(absent), len(cases), value, _some(absent))


def _some(ids, count: int = 5) -> str:
    ids = sorted(ids)
    return (", ".join(ids[:count]) + (f" and {len(ids) - count} more" if len(ids) > count else "")) or "none"


def summarise(cases: dict[str, dict]) -> dict:
    """Mean and median of each metric over the cases, their number, and how many predictions and labels are
    empty."""
    return {"cases": len(cases),
            "empty_predictions": sum(scores["predicted_voxels"] == 0 for scores in cases.values()),
            "empty_labels": sum(scores["truth_voxels"] == 0 for scores in cases.values()),
            **{statistic: {metric: float(function([scores[metric] for scores in cases.values()]))
                           for metric in METRICS}
               for statistic, function in (("mean", np.mean), ("median", np.median))}}


def format_report(report: dict) -> str:
    """The terminal table: one row per case, then the mean and median, the counts and the empty-case rule."""
    cases, summary = report["cases"], report["summary"]
    width = max(len(name) for name in [*cases, "median"])
    nsd_title = f"NSD {report['nsd_tolerance_mm']:g} mm"
    lines = [f"{'case':<{width}}  {'Dice':>6}  {'HD95 mm':>8}  {nsd_title:>10}  {'predicted':>10}  {'truth':>10}"]

    def row(name: str, scores: dict, sizes: bool) -> str:
        text = f"{name:<{width}}  {scores['dice']:6.4f}  {scores['hd95_mm']:8.2f}  {scores['nsd']:10.4f}"
        return text + (f"  {scores['predicted_voxels']:10d}  {scores['truth_voxels']:10d}" if sizes else "")

    lines += [row(name, scores, True) for name, scores in cases.items()]
    lines += [row(statistic, summary[statistic], False) for statistic in ("mean", "median")]
    lines.append(f"{summary['cases']} case(s) scored ({report['foreground']}); empty predictions: "
                 f"{summary['empty_predictions']}, empty labels: {summary['empty_labels']}")
    if report["not_evaluated"]:
        lines.append("not evaluated: " + ", ".join(f"{case} ({why})" for case, why in report["not_evaluated"].items()))
    lines.append(f"empty cases: {report['empty_case_rule']}")
    return "\n".join(lines)


def report_csv(report: dict) -> str:
    """One row per scored case: case_id, dice, hd95_mm, nsd, predicted_voxels, truth_voxels."""
    buffer = io.StringIO()
    columns = [*METRICS, "predicted_voxels", "truth_voxels"]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", *columns])
    for case, scores in report["cases"].items():
        writer.writerow([case, *(scores[column] for column in columns)])
    return buffer.getvalue()


def report_json(report: dict) -> str:
    return json.dumps(report, indent=1)


# ---- montage ------------------------------------------------------------------------------------------------

def check_matplotlib() -> None:
    """InputError unless matplotlib (not a dependency of CLISC) is installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--montage needs matplotlib, which is not installed: pip install matplotlib")


def image_paths(images: Optional[Path], prediction: Path, case_ids: list[str]) -> dict[str, Path]:
    """{case_id: image volume} for the montage's background: from ``images`` (one volume when there is one
    case, else a cohort as `list_cohort` reads it), else from a RUN_DIR's cohort; {} when there is neither."""
    if images is None:
        if not is_run_dir(prediction):
            return {}
        images = Path(RunFolder(prediction).config()["cohort"])
        if not images.exists():
            logger.warning("the run's cohort %s is not there: the montage has a blank background (--images "
                           "gives the images)", images)
            return {}
    elif images.is_file() and images.suffix.lower() not in (".csv", ".txt"):
        if len(case_ids) != 1:
            raise InputError(f"--images {images} is one volume for {len(case_ids)} cases; give a folder or list")
        return {case_ids[0]: images}
    return {case.case_id: case.path for case in list_cohort(images)}


def montage_cases(report: dict) -> list[tuple[str, list[str]]]:
    """[("worst", case ids), ("best", case ids)]: the `MONTAGE_CASES` lowest and highest Dice (ties by id),
    each case once (with fewer cases, the lower half are the worst); no best row for a single case."""
    ranked = sorted(report["cases"], key=lambda case: (report["cases"][case]["dice"], case))
    worst = ranked[:min(MONTAGE_CASES, (len(ranked) + 1) // 2)]
    best = ranked[max(len(worst), len(ranked) - MONTAGE_CASES):][::-1]
    return [("worst", worst)] + ([("best", best)] if best else [])


def montage_slice(prediction: np.ndarray, truth: np.ndarray, worst: bool) -> int:
    """The k of the slice of (K, J, I) masks to show: the most error voxels (a worst case) or label voxels (a
    best case); else the most voxels of either mask; the middle slice when both are empty."""
    for area in ((prediction ^ truth) if worst else truth, prediction | truth):
        counts = area.sum(axis=(1, 2))
        if counts.any():
            return int(counts.argmax())
    return truth.shape[0] // 2


def montage_png(evaluation: Evaluation, report: dict, images: dict[str, Path]) -> bytes:
    """A PNG of the worst and best cases (see `montage_cases`): for each, one k slice (`montage_slice`) with
    the ground-truth and predicted contours over the image (grey, 1st-99th percentile window), or over a
    black background when the case has no image. In-plane voxels keep their aspect ratio."""
    from matplotlib.figure import Figure  # no pyplot: leaves the host application's backend alone

    rows = montage_cases(report)
    columns = max(2, *(len(cases) for _, cases in rows))  # at least 2: room for the title
    figure = Figure(figsize=(3.2 * columns, 3.4 * len(rows) + 0.4), layout="constrained")
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for row, (kind, cases) in enumerate(rows):
        for column, case in enumerate(cases):
            prediction, truth = evaluation.masks(case)
            k = montage_slice(prediction.array, truth.array, worst=kind == "worst")
            background = np.zeros(truth.array.shape[1:], np.float32)
            if case in images:
                image = read_volume(images[case])
                check_same_grid(image, truth)
                background = image.array[k].astype(np.float32)
            low, high = np.percentile(background, (1, 99))
            axis = axes[row, column]
            axis.imshow(background, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), interpolation="nearest",
                        aspect=truth.spacing[1] / truth.spacing[0])
            # the thinner prediction contour leaves the truth's visible where they agree
            for mask, colour, width in ((truth.array[k], TRUTH_COLOUR, 3.0),
                                        (prediction.array[k], PREDICTION_COLOUR, 1.0)):
                if mask.any():
                    axis.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width)
            name = f"{kind}: {case}" if len(rows) > 1 else case
            axis.set_title(f"{name}\nDice {report['cases'][case]['dice']:.3f}, slice k = {k}", fontsize=9)
    figure.suptitle(f"contours: ground truth ({TRUTH_COLOUR}), prediction ({PREDICTION_COLOUR})", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
