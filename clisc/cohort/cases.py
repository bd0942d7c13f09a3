"""The cases of a cohort and their pre-processing (METHOD.md §B step 1).

A cohort is a folder of image files, a folder of DICOM series folders, or a CSV/text list of paths. Each
case is pre-processed as the paper does: crop to the bounding box of the body (the non-background voxels),
clip at the 99.9th percentile, z-score; 2D models see each axial slice (the K axis) min-max scaled to uint8.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..readers import VOLUME_SUFFIXES
from ..volume import Volume

LIST_SUFFIXES = (".csv", ".txt")
PATH_COLUMNS = ("image", "path", "image_path")


@dataclass
class Case:
    """One volume of a cohort: ``case_id`` is unique and filesystem-safe; ``path`` a file or DICOM folder."""

    case_id: str
    path: Path


def list_cohort(cohort: str | Path) -> list[Case]:
    """The cases of a cohort, sorted by ``case_id``.

    Args:
        cohort: a folder of volumes (NIfTI, NRRD, MHA), a folder whose sub-folders each hold one DICOM series,
            or a ``.csv``/``.txt`` list of paths, one per row. CSV: the column headed "image", "path" or
            "image_path", else the first column of every row (no header). Text: ``#`` starts a comment line.
            Relative paths are relative to the list's folder.

    Raises:
        InputError: the cohort does not exist or holds no case, or a listed path does not exist.
    """
    cohort = Path(cohort)
    if not cohort.exists():
        raise InputError(f"{cohort}: no such cohort folder or list")
    if cohort.is_dir():
        paths = [p for p in cohort.iterdir() if p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES)]
        paths = [p for p in paths if not p.name.startswith(".")]
    elif cohort.suffix.lower() in LIST_SUFFIXES:
        paths = _read_list(cohort)
    else:
        raise InputError(f"{cohort}: a cohort is a folder of volumes, a folder of DICOM series folders, "
                         "or a .csv/.txt list of paths")
    if not paths:
        raise InputError(f"{cohort}: holds no case; expected image files ({', '.join(VOLUME_SUFFIXES)}) or "
                         "DICOM series folders")
    ids = _unique_ids(paths)
    return sorted((Case(case_id, path) for case_id, path in zip(ids, paths)), key=lambda case: case.case_id)


def _read_list(list_file: Path) -> list[Path]:
    paths = [Path(entry).expanduser() for entry in read_list_column(list_file, PATH_COLUMNS)]
    paths = [path if path.is_absolute() else list_file.parent / path for path in paths]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise InputError(f"{list_file}: listed path(s) do not exist: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return paths


def read_case_list(path: Path, option: str = "--cases") -> list[str]:
    """Case ids from a list file (`read_list_column`, the CSV column headed case_id); ``option`` names the
    file in error messages."""
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file")
    ids = read_list_column(path, ("case_id",))
    if not ids:
        raise InputError(f"{option} {path}: lists no case id")
    return ids


def read_list_column(path: Path, headers: tuple[str, ...]) -> list[str]:
    """The entries of a list file: a text file, one per line (``#`` starts a comment line), or a CSV: the
    column whose header (any case) is the first of ``headers`` present, else the first column of every row
    (no header). Blank entries are left out; cells are stripped. Read as UTF-8 whatever the locale, with the byte
    order mark that Excel's "CSV UTF-8" writes."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        if path.suffix.lower() != ".csv":
            return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle)]
    header = [cell.lower() for cell in rows[0]] if rows else []
    column = next((header.index(name) for name in headers if name in header), None)
    body = rows if column is None else rows[1:]
    column = column or 0
    return [row[column] for row in body if len(row) > column and row[column]]


def _unique_ids(paths: list[Path]) -> list[str]:
    """File stems (folder names for DICOM), prefixed with parent folder names where they would collide
    (``pat1/flair.nii.gz`` and ``pat2/flair.nii.gz`` become ``pat1_flair`` and ``pat2_flair``)."""
    parts = [list(path.resolve().parts[:-1]) + [_stem(path)] for path in paths]
    depth = 1
    while True:
        ids = [re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(p[-depth:])) for p in parts]
        if len(set(ids)) == len(ids) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"the cohort lists the same case more than once: {', '.join(duplicates)}")
    return ids


def _stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def body_mask(array: np.ndarray) -> np.ndarray:
    """The body (K, J, I) bool: the voxels that differ from the background value.

    The background value is the one shared by the 8 corners of the volume when they agree (0 in a raw MRI,
    the constant fill of a volume normalised before it was saved, as the BraTS files of ../shared/data),
    else 0 (the paper's "non-zero" rule).
    """
    corners = array[np.ix_(*[[0, -1]] * 3)].ravel()
    background = corners[0] if (corners == corners[0]).all() else 0
    return array != background


def preprocess(volume: Volume) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Crop, clip and z-score a volume as the paper does.

    Returns:
        ``(array, crop)``: ``array`` (K', J', I') float32 is ``volume.array[crop]`` clipped at the 99.9th
        percentile of its body voxels (`body_mask`) and z-scored with their mean and standard deviation;
        background voxels get the lowest value of the body, so they stay the darkest, as in the scan.
        ``crop`` is the (k, j, i) slices of the body's bounding box: `uncrop` puts a result back. The body
        on the cropped grid is ``body_mask(volume.array)[crop]``.

    Raises:
        InputError: the volume has no body voxel (it is constant).
    """
    body = body_mask(volume.array)
    if not body.any():
        raise InputError(f"{volume.source or 'volume'}: every voxel has the same value; nothing to segment")
    crop = tuple(slice(int(indices.min()), int(indices.max()) + 1) for indices in np.nonzero(body))
    array = volume.array[crop].astype(np.float32)
    inside = body[crop]
    values = np.minimum(array[inside], np.percentile(array[inside], 99.9))
    normalised = (values - values.mean()) / max(float(values.std()), 1e-6)
    out = np.full(array.shape, normalised.min(), dtype=np.float32)
    out[inside] = normalised
    return out, crop


def uncrop(array: np.ndarray, crop: tuple[slice, slice, slice], shape: tuple, fill=0) -> np.ndarray:
    """Put ``array`` (a result on the cropped grid) back on the full (K, J, I) grid ``shape``."""
    full = np.full(shape, fill, dtype=array.dtype)
    full[crop] = array
    return full


def minmax_slices(array: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Per-slice min-max scaling of ``array`` (K, J, I) to [0, 1] in ``dtype``; a flat slice becomes 0."""
    array = array.astype(dtype)
    low = array.min(axis=(1, 2), keepdims=True)
    span = array.max(axis=(1, 2), keepdims=True) - low
    return np.divide(array - low, span, out=np.zeros_like(array), where=span > 0)


def to_uint8(scaled: np.ndarray) -> np.ndarray:
    """An array scaled to [0, 1] as uint8 (rounded to the nearest of 0-255)."""
    return (scaled * 255).round().astype(np.uint8)


def to_uint8_slices(array: np.ndarray) -> np.ndarray:
    """Per-slice min-max scaling of ``array`` (K, J, I) to uint8 (K, J, I); a flat slice becomes 0."""
    return to_uint8(minmax_slices(array))


def to_truncated_uint8_slices(array: np.ndarray) -> np.ndarray:
    """As `to_uint8_slices`, but truncated (``floor(255 x)``) rather than rounded: the slice images the reference
    classifier trains on (``(s - min) / (max - min) * 255`` then ``.astype(np.uint8)``, CLISC step0_get_clip_label.py)."""
    return (minmax_slices(array) * 255).astype(np.uint8)
