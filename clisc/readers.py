"""Read images from files into a `Volume`: NIfTI, NRRD, MHA, a DICOM series folder, PNG/JPG; and Slicer
segmentations (.seg.nrrd) with their segment names."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .dicom_series import check_regular_stack, choose_series, series_text
from .errors import InputError
from .nifti import check_nifti
from .volume import Volume

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")  # 3D image files (a DICOM series is a folder)
IMAGE_2D_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd), a DICOM series folder, PNG or JPG"
LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's "L" conversion


def rgb_to_grey(pixels: np.ndarray) -> np.ndarray:
    """The grey level of RGB or RGBA pixels, (..., 3 or 4) -> (...) float32: ITU-R BT.601 luma (`LUMINANCE`, as
    PIL's "L" conversion); alpha is ignored. The one colour-to-grey conversion of CLISC: the readers use it for
    PNG/JPG files, CLISC in Slicer for colour volume nodes, so an image gives the same grey levels in both."""
    return pixels[..., :3].astype(np.float32) @ LUMINANCE.astype(np.float32)


def read_volume(path: str | Path, series_uid: Optional[str] = None, finite: bool = True) -> Volume:
    """Read an image file or DICOM series folder into a scalar `Volume`.

    Args:
        path: an image file, or a folder holding a DICOM series.
        series_uid: for a folder holding several DICOM series, the SeriesInstanceUID to read, or the name of
            one of its files (`clisc.dicom_series.choose_series`; default: the series with the most files, with
            a warning naming the others).
        finite: replace NaN and infinite voxels, with one warning that counts them (`replace_non_finite`);
            False keeps them (for masks, which `clisc evaluate` refuses when they hold any).

    Raises:
        InputError: missing path, unreadable or non-image file, a truncated or corrupt NIfTI (see
            `clisc.nifti.check_nifti`), folder without DICOM, a DICOM series that is no regular stack of slices
            (a missing slice: see `clisc.dicom_series.check_regular_stack`), 4D or multi-component (non-RGB)
            image, or an image with a zero-length dimension.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    non_finite = None
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
    else:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            non_finite = check_nifti(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "") if str(error).strip() else ""
            raise InputError(
                f"{path}: not a readable image ({reason}). Supported inputs: {SUPPORTED}. If it is one of "
                "these, it may be truncated or corrupt: copy or export it again."
            ) from None
    volume = _to_volume(image, path)
    if non_finite is not None and non_finite.indices.size:  # ITK's NIfTI reader gives them as 0
        np.put(volume.array, non_finite.indices, non_finite.values)
    return replace_non_finite(volume) if finite else volume


def replace_non_finite(volume: Volume) -> Volume:
    """``volume`` with its NaN and -Inf voxels set to its lowest finite value, +Inf to its highest (0 when none
    is finite), with one warning giving their number; ``volume`` itself when every voxel is finite. NaN most
    often marks voxels outside the field of view of a resampled image, so they become background."""
    array = volume.array
    if not np.issubdtype(array.dtype, np.floating):
        return volume
    finite = np.isfinite(array)
    count = array.size - int(np.count_nonzero(finite))
    if count == 0:
        return volume
    low, high = (float(array[finite].min()), float(array[finite].max())) if count < array.size else (0.0, 0.0)
    logger.warning("%s: %d of %d voxels are NaN or infinite; they are read as %g (NaN, -Inf: the lowest value of the "
                   "image) and %g (+Inf: the highest)", volume.source or "the image", count, array.size, low, high)
    return volume.with_array(np.nan_to_num(array, nan=low, neginf=low, posinf=high))


def _read_dicom_series(folder: Path, selector: Optional[str]):
    """The SimpleITK image of the series `choose_series` chooses, after `check_regular_stack`."""
    import SimpleITK as sitk

    uid, files = choose_series(folder, selector)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: could not read DICOM series {series_text(uid, files)}: "
                         f"{str(error).strip()[-300:]}") from None
    if len(files) > 1:
        try:
            positions, orientations = (np.array([[float(value) for value in reader.GetMetaData(k, tag).split("\\")]
                                                 for k in range(len(files))]) for tag in ("0020|0032", "0020|0037"))
        except (RuntimeError, ValueError):  # files without a position or orientation: no geometry to check
            return image
        check_regular_stack(folder, files, positions, orientations, image)
    return image


def _to_volume(image, path: Path) -> Volume:
    import SimpleITK as sitk

    if image.GetDimension() not in (2, 3):
        raise InputError(
            f"{path}: {image.GetDimension()}D image of size {image.GetSize()}; CLISC segments 2D or 3D images. "
            "Extract one 3D frame first (for example with Slicer's Sequences module)."
        )
    if 0 in image.GetSize():
        raise InputError(
            f"{path}: the image is empty (size {' × '.join(map(str, image.GetSize()))}: it has 0 slices, a "
            "zero-length dimension), so there is nothing to segment. Export the image again."
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        if image.GetDimension() == 2 and components in (3, 4):
            gray = sitk.GetImageFromArray(rgb_to_grey(sitk.GetArrayFromImage(image)))
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


def read_segmentation(path: str | Path) -> dict:
    """A Slicer segmentation (.seg.nrrd) as ``slicerio.read_segmentation`` returns it, with each segment's name
    exactly as the file holds it.

    3D Slicer (and `clisc.writers.write_segmentation`) write names as UTF-8 bytes in the NRRD header, but pynrrd,
    which slicerio uses, decodes the header as ASCII and drops every other byte ("脑肿瘤" reads as ""). So the
    header is also read here, decoded as UTF-8, and parsed by pynrrd's own header parser; slicerio lists the
    segments in the order of their header index N (SegmentN_...). Raises what slicerio raises on a broken file.
    """
    import nrrd
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    lines = []
    with open(path, "rb") as file:
        for line in file:
            lines.append(line.decode("utf-8", errors="replace"))
            if not line.strip():  # the blank line that ends the header
                break
    fields = {match.groups(): value for key, value in nrrd.read_header(lines).items()
              if (match := re.match(r"^Segment([0-9]+)_(.+)", key))}  # slicerio's pattern
    for index, segment in zip(sorted({int(index) for index, _ in fields}), segmentation["segments"]):
        if (str(index), "Name") in fields:
            segment["name"] = fields[str(index), "Name"]
    return segmentation
