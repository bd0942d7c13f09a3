"""Read images from files into a `Volume`: NIfTI, NRRD, MHA, a DICOM series folder, PNG/JPG."""
from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError
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


def read_volume(path: str | Path, series_uid: Optional[str] = None) -> Volume:
    """Read an image file or DICOM series folder into a scalar `Volume`.

    Args:
        path: an image file, or a folder holding a DICOM series.
        series_uid: for a folder holding several DICOM series, the SeriesInstanceUID to read
            (default: the series with the most files, with a warning naming the others).

    Raises:
        InputError: missing path, unreadable or non-image file, a truncated or corrupt NIfTI (see
            `check_nifti`), folder without DICOM, 4D or multi-component (non-RGB) image, or an image with a
            zero-length dimension.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
    else:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "") if str(error).strip() else ""
            raise InputError(
                f"{path}: not a readable image ({reason}). Supported inputs: {SUPPORTED}. If it is one of "
                "these, it may be truncated or corrupt: copy or export it again."
            ) from None
    return _to_volume(image, path)


def check_nifti(path: Path) -> None:
    """Refuse a single-file NIfTI-1 or NIfTI-2 (gzipped or not) that SimpleITK would read without complaint
    although it is broken: a header with a zero-length dimension (read as length 1), a gzip stream that
    ends early or fails its CRC, or less data than the header describes (vox_offset + voxels × bitpix / 8;
    the missing voxels would read as zeros). Other files (not NIfTI, or a .hdr/.img pair) are left to SimpleITK.
    A gzipped file is decompressed once, in chunks, to check it to its end."""
    try:
        with path.open("rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as stream:
            head = stream.read(540)
            layout = _nifti_layout(head)
            if layout is None:
                return
            shape, expected_bytes = layout
            if 0 in shape:
                raise InputError(
                    f"{path}: the header gives size {' × '.join(map(str, shape))}: the image has 0 slices (a "
                    "zero-length dimension), so there is nothing to segment. Export the image again."
                )
            if compressed:
                size = len(head) + sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 24), b""))
            else:
                size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise InputError(
            f"{path}: the file is truncated or corrupt ({error}). Copy or export it again."
        ) from None
    if size < expected_bytes:
        raise InputError(
            f"{path}: the file is truncated or corrupt: it holds {size} bytes of image but its header describes "
            f"{expected_bytes}. Copy or export it again."
        )


# Single-file NIfTI headers: (sizeof_hdr, magic offset, magic, dim format, dim offset, bitpix offset,
# vox_offset format, vox_offset offset); the byte order is the one in which sizeof_hdr reads right.
NIFTI_HEADERS = ((348, 344, b"n+1\0", "8h", 40, 72, "f", 108), (540, 4, b"n+2\0", "8q", 16, 14, "q", 168))


def _nifti_layout(header: bytes) -> Optional[tuple[tuple[int, ...], int]]:
    """(shape, bytes up to the end of the voxel data) from a single-file NIfTI-1 or NIfTI-2 header; None when
    ``header`` is not one (another format, the .hdr of a .hdr/.img pair, or an invalid dimension count)."""
    for size, magic_at, magic, dim_format, dim_at, bitpix_at, offset_format, offset_at in NIFTI_HEADERS:
        for order in "<>":
            if len(header) < size or header[magic_at:magic_at + 4] != magic:
                continue
            if struct.unpack_from(order + "i", header)[0] != size:
                continue
            dim = struct.unpack_from(order + dim_format, header, dim_at)
            (bitpix,) = struct.unpack_from(order + "h", header, bitpix_at)
            (offset,) = struct.unpack_from(order + offset_format, header, offset_at)
            if not (1 <= dim[0] <= 7 and math.isfinite(offset)):
                return None
            shape = tuple(dim[1:dim[0] + 1])
            return shape, int(offset) + math.ceil(math.prod(shape) * bitpix / 8)
    return None


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
