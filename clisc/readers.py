"""Read images from files into a `Volume`: NIfTI, NRRD, MHA, a DICOM series folder, PNG/JPG."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError
from .volume import Volume

logger = logging.getLogger(__name__)

IMAGE_2D_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd), a DICOM series folder, PNG or JPG"
LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's "L" conversion


def read_volume(path: str | Path, series_uid: Optional[str] = None) -> Volume:
    """Read an image file or DICOM series folder into a scalar `Volume`.

    Args:
        path: an image file, or a folder holding a DICOM series.
        series_uid: for a folder holding several DICOM series, the SeriesInstanceUID to read
            (default: the series with the most files, with a warning naming the others).

    Raises:
        InputError: missing path, unreadable or non-image file, folder without DICOM, 4D or
            multi-component (non-RGB) image, or an empty image.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "") if str(error).strip() else ""
            raise InputError(
                f"{path}: not a readable image ({reason}). Supported inputs: {SUPPORTED}."
            ) from None
    return _to_volume(image, path)


def _read_dicom_series(folder: Path, series_uid: Optional[str]):
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr about non-DICOM files
    series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
              for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    if not series:
        raise InputError(
            f"{folder}: folder holds no DICOM series. Give a folder of DICOM files (one series) or an image file "
            f"({SUPPORTED})."
        )
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"{folder}: no DICOM series with UID {series_uid}; the folder holds: {', '.join(series)}")
        chosen = series_uid
    else:
        chosen = max(series, key=lambda uid: len(series[uid]))
        if len(series) > 1:
            others = ", ".join(f"{uid} ({len(files)} files)" for uid, files in series.items() if uid != chosen)
            logger.warning(
                "%s holds %d DICOM series; reading %s (%d files, the largest). Others: %s. "
                "To choose one, pass its UID (CLI: --series UID).",
                folder, len(series), chosen, len(series[chosen]), others,
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[chosen])
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: could not read DICOM series {chosen}: {str(error).strip()[-300:]}") from None


def _to_volume(image, path: Path) -> Volume:
    import SimpleITK as sitk

    if image.GetDimension() not in (2, 3):
        raise InputError(
            f"{path}: {image.GetDimension()}D image of size {image.GetSize()}; CLISC segments 2D or 3D images. "
            "Extract one 3D frame first (for example with Slicer's Sequences module)."
        )
    if 0 in image.GetSize():
        raise InputError(f"{path}: the image is empty (size {image.GetSize()})")
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        if image.GetDimension() == 2 and components in (3, 4):
            rgb = sitk.GetArrayFromImage(image)[..., :3].astype(np.float32)
            gray = sitk.GetImageFromArray(rgb @ LUMINANCE.astype(np.float32))
            gray.CopyInformation(sitk.VectorIndexSelectionCast(image, 0))
            image = gray
        else:
            raise InputError(
                f"{path}: {components} values per voxel; CLISC needs a scalar (grey-level) image. "
                "Convert it to a single-component image first."
            )
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        logger.info("%s: a 3D image with one slice, treated as 2D", path)
    return Volume.from_sitk(image, source=str(path))
