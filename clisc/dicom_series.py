"""A folder of DICOM files as a volume: which series to read, and whether its slices form a regular stack.

Series are grouped and their files ordered by GDCM (through SimpleITK), by SeriesInstanceUID and by position
along the slice normal. ITK then stacks the files on a uniform grid: the first file's position and orientation,
the distance from the first to the last file divided evenly. For a series with a missing or duplicated slice,
slices of another orientation, or a gantry tilt, that grid is not where the data are (a missing slice between
two at 2 mm spacing spreads 19 slices over 20 positions at 2.11 mm). CLISC refuses such a series, saying what
is wrong and where, instead of computing on a grid the data are not on (`check_regular_stack`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

# A file may lie this far from its slice of the uniform grid: 3D Slicer's DICOM reader's spacingEpsilon; a DICOM
# SEG (`clisc.dicom_seg`) needs its frames this close to the files they reference.
SLICE_POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4  # on the direction cosines
IRREGULAR_SERIES_REMEDY = (
    "CLISC reads only a regular stack of slices, so it does not read this series. Add the missing files (a copy "
    "may have left them out) or export the series again; or load it in 3D Slicer, whose DICOM reader resamples an "
    "irregular series onto a uniform grid (with a warning), and save that volume as NRRD to segment it.")


def series_text(uid: str, files: Sequence[str]) -> str:
    """A series in words: its UID (or that it has none, with a file of it) and its number of files."""
    if uid:
        return f"{uid} ({len(files)} files)"
    return f"the series without a SeriesInstanceUID ({len(files)} files, e.g. {Path(files[0]).name})"


def choose_series(folder: Path, selector: Optional[str] = None, warn: bool = True) -> tuple[str, list[str]]:
    """(SeriesInstanceUID, its files in GDCM's order) of the series to read from a DICOM ``folder``.

    Args:
        selector: the series' SeriesInstanceUID, or the name of one of its files (the way to choose a series
            whose UID is empty, as anonymisation leaves it); default: the series with the most files, with a
            warning naming the others (unless not ``warn``).

    Raises:
        InputError: the folder holds no DICOM series, or none that ``selector`` names.
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr about non-DICOM files
    series = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
              for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series. Give a folder of DICOM files (one series) or an "
                         "image file.")
    held = "; ".join(series_text(uid, files) for uid, files in series.items())
    if selector is not None:
        chosen = next((uid for uid, files in series.items()
                       if selector == uid or selector in {Path(name).name for name in files}), None)
        if chosen is None:
            raise InputError(f"{folder}: no DICOM series has the UID or a file named {selector!r}; the folder "
                             f"holds: {held}")
        return chosen, series[chosen]
    chosen = max(series, key=lambda uid: len(series[uid]))
    if len(series) > 1 and warn:
        logger.warning("%s holds %d DICOM series; reading %s, the largest. The folder holds: %s. To choose one, "
                       "pass its UID or the name of one of its files (CLI: --series UID_OR_FILE).",
                       folder, len(series), series_text(chosen, series[chosen]), held)
    return chosen, series[chosen]


def check_regular_stack(folder: Path, files: Sequence[str], positions: np.ndarray, orientations: np.ndarray,
                        image) -> None:
    """InputError, saying what is wrong and where, unless file ``k`` lies at voxel (0, 0, k) of ``image`` (the
    SimpleITK volume read from ``files``) within `SLICE_POSITION_TOLERANCE_MM`, with the first file's
    orientation.

    Args:
        positions: (N, 3) each file's ImagePositionPatient (LPS mm), in the order of ``files``.
        orientations: (N, 6) each file's ImageOrientationPatient.
    """
    names = [Path(name).name for name in files]
    turned = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOLERANCE)
    if turned.size:
        k = turned[0]
        raise InputError(
            f"{folder}: the series mixes slice orientations: {names[k]} has {_numbers(orientations[k])}, "
            f"{names[0]} {_numbers(orientations[0])} (a localizer, or several stacks in one series?). "
            f"{IRREGULAR_SERIES_REMEDY}")
    grid = np.array([image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(k))) for k in range(len(files))])
    if np.linalg.norm(positions - grid, axis=1).max() <= SLICE_POSITION_TOLERANCE_MM:
        return
    along = positions @ np.cross(orientations[0, :3], orientations[0, 3:])  # mm along the slices' normal
    order = np.argsort(along, kind="stable")  # GDCM's order unless it could not sort them (a duplicate)
    names, positions, gaps = [names[k] for k in order], positions[order], np.diff(along[order])
    apart = gaps[gaps > SLICE_POSITION_TOLERANCE_MM]
    spacing = float(np.median(apart)) if apart.size else 0.0
    odd = np.flatnonzero(np.abs(gaps - spacing) > SLICE_POSITION_TOLERANCE_MM)
    if odd.size == 0:
        problem = (f"the slices are {spacing:.4g} mm apart but do not run along their normal, as a CT's gantry "
                   "tilt leaves them: stacked straight, they would be off their real places")
    else:
        places = [_gap_text(names, positions, gaps, spacing, k) for k in odd[:3]]
        more = f", and {odd.size - 3} more" if odd.size > 3 else ""
        problem = f"the slices are {spacing:.4g} mm apart except: {'; '.join(places)}{more}"
    raise InputError(f"{folder}: {problem}. {IRREGULAR_SERIES_REMEDY}")


def _gap_text(names: list[str], positions: np.ndarray, gaps: np.ndarray, spacing: float, k: int) -> str:
    """What is odd about the gap between file ``k`` and file ``k + 1``, in words."""
    where = f"{names[k]} at {_numbers(positions[k])} mm and {names[k + 1]} at {_numbers(positions[k + 1])} mm"
    if abs(gaps[k]) <= SLICE_POSITION_TOLERANCE_MM:
        return f"{where} are at the same place (two images of one slice: several acquisitions in one series?)"
    missing = round(gaps[k] / spacing) - 1
    if missing >= 1 and abs(gaps[k] - (missing + 1) * spacing) <= SLICE_POSITION_TOLERANCE_MM:
        return f"{missing} slice{'s are' if missing > 1 else ' is'} missing between {where} ({gaps[k]:.4g} mm apart)"
    return f"{where} are {gaps[k]:.4g} mm apart"


def _numbers(values) -> str:
    return "(" + ", ".join(f"{value:.6g}" for value in values) + ")"
